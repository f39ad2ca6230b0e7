//! The audit log: append-only JSON lines, each carrying the SHA-256 of the line before, so
//! removing, reordering or editing an entry breaks the chain that [`verify`] checks.
//!
//! Request handlers never wait for the disk: [`Audit::record`] puts the entry on a bounded
//! queue, and one writer thread drains it in batches, writes each batch with one `write`
//! and one `fdatasync` (group commit). A full queue drops the entry and counts it; a
//! failing disk is logged and counted. Neither stalls a request.
//!
//! Line format (fields in this order; `hash` last):
//!
//! ```text
//! {"seq":7,"time":"…","node":"a","identity":"client","cert_serial":"<hex>"|null,
//!  "cert_sha256":"<64 hex>"|null,"role":"client","op":"keyring.fetch","key_id":"…"|null,"outcome":"ok","detail":null|"…","peer":"127.0.0.1:5555"|null,
//!  "prev":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! `hash` = SHA-256 of the line's bytes up to (not including) `,"hash":`. `prev` is the
//! previous line's `hash` (64 zeros for the first). `seq` counts from 1 without gaps.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sso_proto::KeyId;
use time::OffsetDateTime;

use crate::metrics::Metrics;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_MARK: &str = ",\"hash\":\"";
const MAX_DETAIL: usize = 512;
const MAX_BATCH: usize = 16_384;
/// Shortest interval between two fdatasyncs of the audit log.
const LINGER: Duration = Duration::from_millis(5);

/// One thing worth auditing.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// When it happened.
    pub time: std::time::SystemTime,
    /// Who: the certificate label, or `-` before a handshake completed.
    pub identity: Arc<str>,
    /// Which certificate: serial and fingerprint, so two certificates with the same
    /// names (a revoked one and its replacement) are told apart. `None` without one.
    pub cert: Option<Arc<CertRef>>,
    /// The role the caller held (`none` when it held none).
    pub role: &'static str,
    /// What: `keyring.fetch`, `key.fetch`, `admin.rotate`, `tls.handshake`, …
    pub op: &'static str,
    /// Which key, where one is concerned.
    pub key_id: Option<KeyId>,
    /// `ok`, `denied`, `not_found`, `error`, …
    pub outcome: &'static str,
    /// A short reason, never secret.
    pub detail: Option<String>,
    /// The remote address.
    pub peer: Option<std::net::SocketAddr>,
}

/// The certificate an audit entry is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRef {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub sha256: String,
}

/// The newest entry: sequence number and hash. Shown in admin status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    /// Sequence number of the last entry written (0 when empty).
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// The handle request handlers record through.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: SyncSender<AuditEvent>,
    metrics: Arc<Metrics>,
    head: Arc<Mutex<AuditHead>>,
}

/// Opening the audit log failed.
#[derive(Debug, thiserror::Error)]
#[error("audit log {}: {problem}", path.display())]
pub struct AuditError {
    path: PathBuf,
    problem: String,
}

impl Audit {
    /// Opens (or creates, mode 0600) the log at `path`, recovers the chain head from its
    /// last line, and starts the writer thread.
    pub fn open(path: &Path, node: &str, queue: usize, metrics: Arc<Metrics>) -> Result<Self, AuditError> {
        let fail = |problem: String| AuditError {
            path: path.to_path_buf(),
            problem,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(e.to_string()))?;
        let head = recover_head(&mut file).map_err(fail)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(queue);
        let head = Arc::new(Mutex::new(head));
        let writer = Writer {
            file,
            path: path.to_path_buf(),
            node: node.to_owned(),
            head: head.clone(),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self { tx, metrics, head })
    }

    /// Queues an entry. Never blocks: a full queue drops the entry and counts it.
    pub fn record(&self, event: AuditEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(ev)) => {
                let dropped = self.metrics.audit_dropped.fetch_add(1, Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::error!(dropped, op = ev.op, "audit queue full: entries are being dropped");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.audit_failures.fetch_add(1, Relaxed);
            }
        }
    }

    /// The newest entry written.
    pub fn head(&self) -> AuditHead {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Writer {
    file: File,
    path: PathBuf,
    node: String,
    head: Arc<Mutex<AuditHead>>,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn run(mut self, rx: Receiver<AuditEvent>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut buf = Vec::with_capacity(1 << 16);
        let mut broken = false;
        let mut clock = TimeCache::default();
        while let Ok(first) = rx.recv() {
            let batch_started = std::time::Instant::now();
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(_) => break,
                }
            }
            if broken {
                // After a failed write the file may end in half a line; cut it off and
                // re-read the head before chaining onto it.
                match self
                    .file
                    .sync_all()
                    .map_err(|e| e.to_string())
                    .and_then(|()| recover_head(&mut self.file))
                {
                    Ok(head) => {
                        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head;
                        broken = false;
                    }
                    Err(problem) => {
                        self.fail(batch.len(), &problem);
                        batch.clear();
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner()).clone();
            buf.clear();
            for ev in batch.drain(..) {
                head = append_line(&mut buf, &self.node, head, &ev, &mut clock);
            }
            match self.file.write_all(&buf).and_then(|()| self.file.sync_data()) {
                Ok(()) => {
                    self.metrics
                        .audit_written
                        .fetch_add(head.seq - self.current_seq(), Relaxed);
                    *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head;
                }
                Err(e) => {
                    let lost = buf.iter().filter(|b| **b == b'\n').count();
                    self.fail(lost, &e.to_string());
                    broken = true;
                }
            }
            // Group commit: at most one fdatasync per LINGER. Under load this turns many
            // tiny syncs into few large ones; entries wait in the queue meanwhile, never
            // the requests that produced them.
            if let Some(rest) = LINGER.checked_sub(batch_started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }

    fn current_seq(&self) -> u64 {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).seq
    }

    fn fail(&self, lost: usize, problem: &str) {
        self.metrics.audit_failures.fetch_add(lost as u64, Relaxed);
        tracing::error!(path = %self.path.display(), lost, problem, "audit write failed");
    }
}

fn append_line(buf: &mut Vec<u8>, node: &str, head: AuditHead, ev: &AuditEvent, clock: &mut TimeCache) -> AuditHead {
    // Written by hand rather than through serde: this runs once per key fetch, and the
    // writer thread shares two cores with the request workers.
    let seq = head.seq + 1;
    let start = buf.len();
    buf.extend_from_slice(b"{\"seq\":");
    push_u64(buf, seq);
    buf.extend_from_slice(b",\"time\":\"");
    clock.push_rfc3339(buf, ev.time);
    buf.extend_from_slice(b"\",\"node\":");
    push_json_str(buf, node);
    buf.extend_from_slice(b",\"identity\":");
    push_json_str(buf, &ev.identity);
    match ev.cert.as_deref() {
        Some(c) => {
            buf.extend_from_slice(b",\"cert_serial\":");
            push_json_str(buf, &c.serial);
            buf.extend_from_slice(b",\"cert_sha256\":");
            push_json_str(buf, &c.sha256);
        }
        None => buf.extend_from_slice(b",\"cert_serial\":null,\"cert_sha256\":null"),
    }
    buf.extend_from_slice(b",\"role\":");
    push_json_str(buf, ev.role);
    buf.extend_from_slice(b",\"op\":");
    push_json_str(buf, ev.op);
    buf.extend_from_slice(b",\"key_id\":");
    match ev.key_id {
        Some(k) => {
            buf.push(b'"');
            push_hex(buf, k.as_bytes());
            buf.push(b'"');
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"outcome\":");
    push_json_str(buf, ev.outcome);
    buf.extend_from_slice(b",\"detail\":");
    match ev.detail.as_deref() {
        Some(d) => push_json_str(buf, truncate(d, MAX_DETAIL)),
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"peer\":");
    match ev.peer {
        Some(p) => {
            use std::io::Write as _;
            let _ = write!(buf, "\"{p}\"");
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"prev\":\"");
    buf.extend_from_slice(head.hash.as_bytes());
    buf.push(b'"');
    let digest = ring::digest::digest(&ring::digest::SHA256, &buf[start..]);
    let mut hash = Vec::with_capacity(64);
    push_hex(&mut hash, digest.as_ref());
    buf.extend_from_slice(HASH_MARK.as_bytes());
    buf.extend_from_slice(&hash);
    buf.extend_from_slice(b"\"}\n");
    // push_hex writes ASCII only.
    AuditHead {
        seq,
        hash: String::from_utf8(hash).unwrap_or_default(),
    }
}

fn push_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

fn push_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        buf.push(HEX[usize::from(b >> 4)]);
        buf.push(HEX[usize::from(b & 0x0f)]);
    }
}

/// Appends `s` as a JSON string: quotes, backslashes and control characters escaped.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => {
                use std::io::Write as _;
                let _ = write!(buf, "\\u{b:04x}");
            }
            _ => buf.push(b),
        }
    }
    buf.push(b'"');
}

/// Formats RFC 3339 UTC times, reusing the `YYYY-MM-DDTHH:MM:SS` part within a second.
#[derive(Default)]
struct TimeCache {
    second: i64,
    prefix: Vec<u8>,
}

impl TimeCache {
    fn push_rfc3339(&mut self, buf: &mut Vec<u8>, t: std::time::SystemTime) {
        let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs() as i64;
        if self.prefix.is_empty() || second != self.second {
            self.second = second;
            self.prefix.clear();
            let dt = OffsetDateTime::from_unix_timestamp(second).unwrap_or(OffsetDateTime::UNIX_EPOCH);
            use std::io::Write as _;
            let _ = write!(
                self.prefix,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            );
        }
        buf.extend_from_slice(&self.prefix);
        let micros = since.subsec_micros();
        buf.push(b'.');
        let mut digits = [b'0'; 6];
        let mut v = micros;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        buf.extend_from_slice(&digits);
        buf.push(b'Z');
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads the last complete line to find the chain head. A partial last line (a crash in
/// the middle of a write) is cut off; everything before it is kept.
fn recover_head(file: &mut File) -> Result<AuditHead, String> {
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if len == 0 {
        return Ok(AuditHead {
            seq: 0,
            hash: GENESIS.into(),
        });
    }
    let window = len.min(256 * 1024);
    file.seek(SeekFrom::Start(len - window)).map_err(|e| e.to_string())?;
    let mut tail = vec![0u8; window as usize];
    file.read_exact(&mut tail).map_err(|e| e.to_string())?;
    let complete = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if window == len => 0,
        None => return Err("last line is longer than 256 KiB: not an audit log?".into()),
    };
    if complete < tail.len() {
        let keep = len - window + complete as u64;
        tracing::warn!(
            cut = len - keep,
            "audit log ended in a partial line (crash during a write); cutting it off"
        );
        file.set_len(keep).map_err(|e| e.to_string())?;
    }
    let lines = &tail[..complete];
    let Some(last) = lines
        .strip_suffix(b"\n")
        .map(|l| l.rsplit(|b| *b == b'\n').next().unwrap_or(l))
    else {
        return Ok(AuditHead {
            seq: 0,
            hash: GENESIS.into(),
        });
    };
    let last = std::str::from_utf8(last).map_err(|_| "last line is not UTF-8".to_string())?;
    let parsed = parse_line(last).map_err(|p| format!("last line: {p}"))?;
    Ok(AuditHead {
        seq: parsed.seq,
        hash: parsed.hash.to_owned(),
    })
}

struct ParsedLine<'a> {
    seq: u64,
    prev: String,
    hash: &'a str,
    body_hash_ok: bool,
}

fn parse_line(line: &str) -> Result<ParsedLine<'_>, String> {
    let idx = line.rfind(HASH_MARK).ok_or("no hash field")?;
    let (body, rest) = line.split_at(idx);
    let hash = rest
        .strip_prefix(HASH_MARK)
        .and_then(|r| r.strip_suffix("\"}"))
        .filter(|h| h.len() == 64)
        .ok_or("malformed hash field")?;
    let computed = hex::encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()));
    #[derive(serde::Deserialize)]
    struct Fields {
        seq: u64,
        prev: String,
    }
    let fields: Fields = serde_json::from_str(&format!("{body}}}")).map_err(|e| format!("not valid JSON: {e}"))?;
    Ok(ParsedLine {
        seq: fields.seq,
        prev: fields.prev,
        hash,
        body_hash_ok: computed == hash,
    })
}

/// One line through the parser `verify` uses, for the fuzz target.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_line(line: &str) {
    let _ = parse_line(line);
}

/// What [`verify`] found in an intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// The last entry's hash.
    pub head: String,
}

/// Where and how a log's chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at line {line}: {problem}")]
pub struct VerifyError {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong there.
    pub problem: String,
}

/// Checks a whole log: each line's hash, the chain of `prev` values and the sequence.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    use std::io::BufRead;
    let file = File::open(path).map_err(|e| VerifyError {
        line: 0,
        problem: e.to_string(),
    })?;
    let mut prev = GENESIS.to_owned();
    let mut entries = 0u64;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i as u64 + 1;
        let broken = |problem: String| VerifyError { line: n, problem };
        let line = line.map_err(|e| broken(e.to_string()))?;
        let parsed = parse_line(&line).map_err(broken)?;
        if !parsed.body_hash_ok {
            return Err(broken(
                "the entry was modified: its hash does not match its contents".into(),
            ));
        }
        if parsed.prev != prev {
            return Err(broken(
                "the chain is broken: an entry before this one was removed, reordered or replaced".into(),
            ));
        }
        if parsed.seq != n {
            return Err(broken(format!("sequence number {} where {n} was expected", parsed.seq)));
        }
        prev = parsed.hash.to_owned();
        entries += 1;
    }
    Ok(VerifyReport { entries, head: prev })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(op: &'static str) -> AuditEvent {
        AuditEvent {
            time: std::time::SystemTime::now(),
            identity: "client".into(),
            cert: None,
            role: "client",
            op,
            key_id: None,
            outcome: "ok",
            detail: Some("a \"quoted\" detail".into()),
            peer: None,
        }
    }

    fn wait_for(audit: &Audit, seq: u64) {
        for _ in 0..500 {
            if audit.head().seq >= seq {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("audit writer did not reach {seq}");
    }

    #[test]
    fn entries_chain_and_verify_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(&path, "a", 1024, Arc::new(Metrics::default())).unwrap();
        for _ in 0..50 {
            audit.record(event("keyring.fetch"));
        }
        wait_for(&audit, 50);
        let report = verify(&path).unwrap();
        assert_eq!(report.entries, 50);
        assert_eq!(report.head, audit.head().hash);

        // Reopening continues the chain.
        drop(audit);
        let audit = Audit::open(&path, "a", 1024, Arc::new(Metrics::default())).unwrap();
        audit.record(event("admin.rotate"));
        wait_for(&audit, 51);
        assert_eq!(verify(&path).unwrap().entries, 51);

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Edit one entry.
        let edited = text.replacen("admin.rotate", "admin.retire", 1);
        std::fs::write(&path, &edited).unwrap();
        assert_eq!(verify(&path).unwrap_err().line, 51);
        // Remove one entry.
        let removed: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 10)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        std::fs::write(&path, removed).unwrap();
        assert_eq!(verify(&path).unwrap_err().line, 11);
        // Swap two entries.
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        std::fs::write(&path, swapped.join("\n") + "\n").unwrap();
        assert_eq!(verify(&path).unwrap_err().line, 4);
    }

    #[test]
    fn a_partial_last_line_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(&path, "a", 16, Arc::new(Metrics::default())).unwrap();
        audit.record(event("x"));
        wait_for(&audit, 1);
        drop(audit);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"time\":\"half a li").unwrap();
        let audit = Audit::open(&path, "a", 16, Arc::new(Metrics::default())).unwrap();
        audit.record(event("y"));
        wait_for(&audit, 2);
        assert_eq!(verify(&path).unwrap().entries, 2);
    }

    #[test]
    fn a_failing_disk_is_counted_and_never_stalls() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let metrics = Arc::new(Metrics::default());
        let audit = Audit::open(Path::new("/dev/full"), "a", 1024, metrics.clone()).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            audit.record(event("keyring.fetch"));
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "recording stalled on a failing disk"
        );
        for _ in 0..500 {
            if metrics.audit_failures.load(Relaxed) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            metrics.audit_failures.load(Relaxed) > 0,
            "write failures were not counted"
        );
        assert_eq!(metrics.audit_written.load(Relaxed), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let audit = Audit::open(&dir.path().join("audit.log"), "a", 1, metrics.clone()).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..100_000 {
            audit.record(event("flood"));
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        let total = || metrics.audit_written.load(Relaxed) + metrics.audit_dropped.load(Relaxed);
        for _ in 0..500 {
            if total() == 100_000 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(total(), 100_000);
        assert!(metrics.audit_dropped.load(Relaxed) > 0);
    }
}
