//! The audit log: append-only JSON lines, each carrying an HMAC (keyed by a key derived
//! from the store's KEK) over its contents and the previous line's MAC, so removing,
//! reordering, editing or re-chaining an entry is found by `ssoctl audit verify`. The line
//! format, the key and the verifier live in [`keystore::audit`].
//!
//! Request handlers never wait for the disk: [`Audit::record`] puts the entry on a bounded
//! queue, and one writer thread drains it in batches, writes each batch with one `write`
//! and one `fdatasync` (group commit). A full queue drops the entry and counts it; a
//! failing disk is logged and counted. Neither stalls a request. When writing resumes, a
//! gap record (`"op":"audit.gap"`, `detail` "lost N entries: …") says how many were lost.
//!
//! The writer records the head (entry count and MAC) in the store's `meta` table (the
//! anchor) whenever it runs out of entries to write, and under continuous load at least
//! every [`ANCHOR_EVERY`], always after the batch's `fdatasync` (so the anchor never runs
//! ahead of the file), and once more when the server shuts down ([`Audit::close`]). At
//! start, a log that ends before the anchor was cut short: the server writes an
//! `audit.truncated` record that `verify` reports as tampering.
//!
//! Rotation: with `rotate_bytes` set, a full file is renamed to `NAME.<last seq, 20
//! digits>` and a new one started; SIGHUP reopens the path (for external logrotate). The
//! chain continues across files; each new file starts with an `audit.reopened` record.
//!
//! Line format (fields in this order; `mac` last):
//!
//! ```text
//! {"seq":7,"time":"…","node":"a","identity":"client","cert_serial":"<hex>"|null,
//!  "cert_sha256":"<64 hex>"|null,"role":"client","op":"keyring.fetch",
//!  "key_id":"…"|null,"outcome":"ok","detail":null|"…","peer":"127.0.0.1:5555"|null,
//!  "prev":"<64 hex>","mac":"<64 hex>"}
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keystore::audit::{AuditAnchor, AuditKey, GAP_OP, GENESIS, MAC_MARK, TRUNCATED_OP};
use sso_proto::KeyId;
use time::OffsetDateTime;

use crate::metrics::Metrics;

const MAX_DETAIL: usize = 512;
const MAX_BATCH: usize = 16_384;
/// Shortest interval between two fdatasyncs of the audit log.
const LINGER: Duration = Duration::from_millis(5);
/// Under continuous load, the longest the store's anchor lags the file (an idle writer
/// anchors at once). Each anchor is a store transaction with its own fsync and half a
/// dozen lock calls; written after every 5 ms batch it was most of the audit's system
/// time (docs/benchmarks.md, issue 16). The price: after an unclean stop under load
/// (SIGKILL, crash, power loss) a cut of at most this much of the log's tail is not
/// found against the anchor (SECURITY.md, "The audit log").
pub const ANCHOR_EVERY: Duration = Duration::from_millis(100);
/// `op` of the first record of a file opened by rotation or SIGHUP.
const REOPENED_OP: &str = "audit.reopened";

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

impl AuditEvent {
    fn internal(op: &'static str, outcome: &'static str, detail: String) -> Self {
        Self {
            time: std::time::SystemTime::now(),
            identity: "-".into(),
            cert: None,
            role: "none",
            op,
            key_id: None,
            outcome,
            detail: Some(detail),
            peer: None,
        }
    }
}

/// The newest entry: sequence number and MAC. Shown in admin status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    /// Sequence number of the last entry written (0 when empty).
    pub seq: u64,
    /// Its MAC.
    pub hash: String,
}

impl AuditHead {
    fn anchor(&self) -> AuditAnchor {
        AuditAnchor {
            count: self.seq,
            head: self.hash.clone(),
        }
    }

    fn from_anchor(a: &AuditAnchor) -> Self {
        Self {
            seq: a.count,
            hash: a.head.clone(),
        }
    }
}

/// Where the writer records each new head (the store's `meta` table in the server):
/// `Ok(false)` when the store is busy and the writer should try again later.
pub type AnchorSink = Box<dyn Fn(&AuditAnchor) -> Result<bool, String> + Send + Sync>;

/// Settings of an audit log beyond its path.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// This node's name, in every line.
    pub node: String,
    /// Queue length before entries are dropped (and counted, and later a gap record).
    pub queue: usize,
    /// Rotate when the file reaches this size (0: never; SIGHUP still reopens).
    pub rotate_bytes: u64,
}

/// The handle request handlers record through.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<Msg>,
    metrics: Arc<Metrics>,
    head: Arc<Mutex<AuditHead>>,
    shared: Arc<Shared>,
    path: PathBuf,
    key: AuditKey,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

struct Shared {
    /// Entries dropped on a full queue and not yet announced by a gap record.
    dropped_unrecorded: AtomicU64,
    reopen: AtomicBool,
    sink: OnceLock<AnchorSink>,
    /// [`Audit::close`] asked the writer to finish.
    closing: AtomicBool,
    /// Set by the writer when it has finished (queue drained, synced, anchored).
    closed: (Mutex<bool>, std::sync::Condvar),
}

/// What travels on the writer's queue.
enum Msg {
    Event(AuditEvent),
    /// Wakes an idle writer to see [`Shared::closing`].
    Close,
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
    /// last line (or, for an empty file, from `anchor`), compares it with `anchor`, and
    /// starts the writer thread.
    pub fn open(
        path: &Path,
        options: &AuditOptions,
        key: AuditKey,
        anchor: Option<AuditAnchor>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, AuditError> {
        let fail = |problem: String| AuditError {
            path: path.to_path_buf(),
            problem,
        };
        let mut file = open_append(path).map_err(|e| fail(e.to_string()))?;
        let mut first = Vec::new();
        let head = match recover_head(&mut file).map_err(&fail)? {
            Some((h, false)) => {
                if let Some(a) = &anchor
                    && (h.seq < a.count || (h.seq == a.count && h.hash != a.head))
                {
                    first.push(truncation_event(&h, a, "the log ends"));
                }
                h
            }
            Some((h, true)) => {
                // A log from before the chain was keyed: keep it beside, continue the
                // sequence in a new keyed file.
                let aside = PathBuf::from(format!(
                    "{}.unkeyed",
                    keystore::audit::rotated_name(path, h.seq).display()
                ));
                std::fs::rename(path, &aside).map_err(|e| fail(format!("moving the unkeyed log aside: {e}")))?;
                tracing::warn!(moved_to = %aside.display(), "audit log was written before the chain was keyed; moved aside, continuing in a new keyed file");
                file = open_append(path).map_err(|e| fail(e.to_string()))?;
                first.push(AuditEvent::internal(
                    REOPENED_OP,
                    "ok",
                    format!("continues the unkeyed log now at {}", aside.display()),
                ));
                h
            }
            None => match &anchor {
                Some(a) if a.count > 0 => {
                    let h = AuditHead::from_anchor(a);
                    // An empty file continues a rotated one, or the log was deleted.
                    if keystore::audit::rotated_name(path, a.count).exists() {
                        h
                    } else {
                        let empty = AuditHead {
                            seq: 0,
                            hash: GENESIS.into(),
                        };
                        first.push(truncation_event(&empty, a, "the log file is empty"));
                        empty
                    }
                }
                _ => AuditHead {
                    seq: 0,
                    hash: GENESIS.into(),
                },
            },
        };
        let len = file.metadata().map(|m| m.len()).map_err(|e| fail(e.to_string()))?;
        metrics.audit_entries.store(head.seq, Relaxed);
        let (tx, rx) = std::sync::mpsc::sync_channel(options.queue);
        let head = Arc::new(Mutex::new(head));
        let shared = Arc::new(Shared {
            dropped_unrecorded: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            sink: OnceLock::new(),
            closing: AtomicBool::new(false),
            closed: (Mutex::new(false), std::sync::Condvar::new()),
        });
        let writer = Writer {
            file,
            len,
            path: path.to_path_buf(),
            node: options.node.clone(),
            rotate_bytes: options.rotate_bytes,
            head: head.clone(),
            metrics: metrics.clone(),
            key: key.clone(),
            shared: shared.clone(),
            lost: 0,
            lost_reason: String::new(),
            failed: None,
            pending_first: first,
            anchor_failing: false,
            anchor_pending: None,
            anchored_at: None,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            tx,
            metrics,
            head,
            shared,
            path: path.to_path_buf(),
            key,
        })
    }

    /// Queues an entry. Never blocks: a full queue drops the entry and counts it.
    pub fn record(&self, event: AuditEvent) {
        match self.tx.try_send(Msg::Event(event)) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                self.shared.dropped_unrecorded.fetch_add(1, Relaxed);
                let dropped = self.metrics.audit_dropped.fetch_add(1, Relaxed) + 1;
                if dropped.is_power_of_two() {
                    let op = match &msg {
                        Msg::Event(ev) => ev.op,
                        Msg::Close => "",
                    };
                    tracing::error!(dropped, op, "audit queue full: entries are being dropped");
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

    /// From now on, record every new head with `sink` (set once).
    pub fn anchor_to(&self, sink: AnchorSink) {
        let _ = self.shared.sink.set(sink);
    }

    /// Finishes the log for a shutdown: the writer writes and syncs every entry queued so
    /// far, records the head in the store one last time and stops. Waits at most
    /// `timeout`; returns whether the writer finished in time. Entries recorded after
    /// this are counted as failures.
    pub fn close(&self, timeout: Duration) -> bool {
        self.shared.closing.store(true, Relaxed);
        // Wakes a writer waiting for entries; a full queue means it is not waiting.
        let _ = self.tx.try_send(Msg::Close);
        let (done, cv) = &self.shared.closed;
        let guard = done.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Asks the writer to reopen the path (after an external rotation). Takes effect
    /// before the next batch, or within 250 ms.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Relaxed);
    }

    /// Verifies this server's own log: rotated files in the log's directory, then the
    /// current file, against the live head (and `extra`, an anchor from elsewhere).
    pub fn verify_own(
        &self,
        extra: Option<&AuditAnchor>,
    ) -> Result<keystore::audit::VerifyReport, keystore::audit::VerifyError> {
        let live = self.head().anchor();
        let mut files = keystore::audit::rotated_files(&self.path).map_err(|e| keystore::audit::VerifyError {
            file: self.path.clone(),
            line: 0,
            problem: format!("listing rotated files: {e}"),
            truncated: false,
        })?;
        files.push(self.path.clone());
        let report = keystore::audit::verify(&files, &self.key, keystore::audit::Start::Any, Some(&live))?;
        if let Some(a) = extra {
            keystore::audit::verify(&files, &self.key, keystore::audit::Start::Any, Some(a))?;
        }
        Ok(report)
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

fn truncation_event(file_head: &AuditHead, anchor: &AuditAnchor, what: &str) -> AuditEvent {
    let missing = anchor.count.saturating_sub(file_head.seq);
    tracing::error!(
        file_entries = file_head.seq,
        anchor_entries = anchor.count,
        "audit log is behind the anchor kept in the store: entries were removed; recording it"
    );
    AuditEvent::internal(
        TRUNCATED_OP,
        "tampered",
        format!(
            "missing {missing} entries: {what} at entry {} but the store's anchor is entry {} (head {})",
            file_head.seq, anchor.count, anchor.head
        ),
    )
}

/// A write that failed: what was pending before it and what it carried.
struct FailedWrite {
    base: AuditHead,
    lost_before: u64,
    events: u64,
    gap_first: bool,
}

struct Writer {
    file: File,
    len: u64,
    path: PathBuf,
    node: String,
    rotate_bytes: u64,
    head: Arc<Mutex<AuditHead>>,
    metrics: Arc<Metrics>,
    key: AuditKey,
    shared: Arc<Shared>,
    /// Entries lost and not yet announced by a gap record.
    lost: u64,
    lost_reason: String,
    failed: Option<FailedWrite>,
    /// Records to write before the next batch (truncation found at open, reopen notes).
    pending_first: Vec<AuditEvent>,
    /// The last anchor write failed (logged once per episode).
    anchor_failing: bool,
    /// A head not yet recorded in the store.
    anchor_pending: Option<AuditAnchor>,
    /// When the store last took an anchor.
    anchored_at: Option<std::time::Instant>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        self.write_until_closed(&rx);
        // Queue drained (or every handle gone): the file is synced; anchor the last head.
        self.record_anchor();
        let (done, cv) = &self.shared.closed;
        *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    fn write_until_closed(&mut self, rx: &Receiver<Msg>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut buf = Vec::with_capacity(1 << 16);
        let mut clock = TimeCache::default();
        loop {
            let first = if self.pending_first.is_empty() {
                let next = match rx.try_recv() {
                    Ok(msg) => Ok(msg),
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        if self.shared.closing.load(Relaxed) {
                            return;
                        }
                        // Nothing to write: the writer is going idle, so the store gets
                        // the latest head now rather than after ANCHOR_EVERY.
                        self.record_anchor();
                        rx.recv_timeout(Duration::from_millis(250))
                    }
                };
                match next {
                    Ok(Msg::Event(ev)) => Some(ev),
                    Ok(Msg::Close) => continue,
                    Err(RecvTimeoutError::Timeout) => {
                        self.record_anchor();
                        if self.shared.reopen.load(Relaxed) {
                            None
                        } else {
                            continue;
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            let batch_started = std::time::Instant::now();
            batch.append(&mut self.pending_first);
            batch.extend(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Event(ev)) => batch.push(ev),
                    Ok(Msg::Close) => {}
                    Err(_) => break,
                }
            }
            let reopen = self.shared.reopen.swap(false, Relaxed);
            // Recover on the file that failed (before any reopen): entries of the failed
            // write that reached it are kept and chained onto.
            if self.failed.is_some() && !self.recover() {
                if reopen {
                    // Give up on the old file: everything of the failed write is lost.
                    if let Some(f) = self.failed.take() {
                        self.lost = f.lost_before + f.events;
                        self.publish(f.base);
                    }
                } else {
                    self.lose(batch.len() as u64, None);
                    batch.clear();
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            if reopen {
                self.reopen("SIGHUP", &mut batch);
            }
            if self.rotate_bytes > 0 && self.len >= self.rotate_bytes {
                self.rotate(&mut batch);
            }
            let dropped = self.shared.dropped_unrecorded.swap(0, Relaxed);
            if dropped > 0 {
                self.lose(dropped, Some("the audit queue was full"));
            }
            let base = self.head.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut head = base.clone();
            buf.clear();
            let gap_first = self.lost > 0;
            if gap_first {
                let gap = AuditEvent::internal(
                    GAP_OP,
                    "gap",
                    format!("lost {} entries: {}", self.lost, self.lost_reason),
                );
                append_line(&mut buf, &self.node, &self.key, &mut head, &gap, &mut clock);
            }
            let events = batch.len() as u64;
            for ev in batch.drain(..) {
                append_line(&mut buf, &self.node, &self.key, &mut head, &ev, &mut clock);
            }
            match self.file.write_all(&buf).and_then(|()| self.file.sync_data()) {
                Ok(()) => {
                    self.len += buf.len() as u64;
                    if gap_first {
                        tracing::warn!(lost = self.lost, "audit writes resumed; gap record written");
                    }
                    self.lost = 0;
                    self.lost_reason.clear();
                    self.metrics.audit_written.fetch_add(events, Relaxed);
                    self.metrics.health.audit_ok();
                    self.publish(head);
                }
                Err(e) => {
                    self.failed = Some(FailedWrite {
                        base,
                        lost_before: self.lost,
                        events,
                        gap_first,
                    });
                    self.metrics.audit_failures.fetch_add(events, Relaxed);
                    self.metrics.health.audit_failed(format!(
                        "{} could not be written ({e}); free space on its filesystem",
                        self.path.display()
                    ));
                    tracing::error!(path = %self.path.display(), lost = events, problem = %e, "audit write failed");
                    if self.lost_reason.is_empty() {
                        self.lost_reason = format!("audit write failed ({e})");
                    }
                }
            }
            // Group commit: at most one fdatasync per LINGER. Under load this turns many
            // tiny syncs into few large ones; entries wait in the queue meanwhile, never
            // the requests that produced them. A closing writer does not linger.
            if let Some(rest) = LINGER.checked_sub(batch_started.elapsed())
                && !self.shared.closing.load(Relaxed)
            {
                std::thread::sleep(rest);
            }
        }
    }

    /// Counts `n` entries as lost (announced by the next gap record).
    fn lose(&mut self, n: u64, reason: Option<&str>) {
        self.lost += n;
        if self.lost_reason.is_empty() {
            self.lost_reason = reason.unwrap_or("audit writes failed").to_owned();
        }
    }

    /// After a failed write the file may end in half a line; cut it off and re-read the
    /// head. Entries of the failed write that did reach the file are not lost.
    fn recover(&mut self) -> bool {
        let Some(failed) = &self.failed else { return true };
        let recovered = self
            .file
            .sync_all()
            .map_err(|e| e.to_string())
            .and_then(|()| recover_head(&mut self.file));
        match recovered {
            Ok(found) => {
                let head = match found {
                    Some((h, _)) if h.seq >= failed.base.seq => h,
                    _ => failed.base.clone(),
                };
                let survived = head.seq - failed.base.seq;
                self.lost = if failed.gap_first && survived >= 1 {
                    failed.events - (survived - 1)
                } else {
                    failed.lost_before + failed.events - survived.min(failed.events)
                };
                self.len = self.file.metadata().map(|m| m.len()).unwrap_or(self.len);
                self.failed = None;
                self.publish(head);
                true
            }
            Err(problem) => {
                tracing::error!(path = %self.path.display(), problem, "audit log still failing");
                false
            }
        }
    }

    /// Makes `head` (written and synced) the live head; the store gets it as the anchor
    /// when the last anchor is [`ANCHOR_EVERY`] old, else when the writer goes idle.
    fn publish(&mut self, head: AuditHead) {
        self.metrics.audit_entries.store(head.seq, Relaxed);
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head.clone();
        self.anchor_pending = Some(head.anchor());
        if self.anchored_at.is_none_or(|t| t.elapsed() >= ANCHOR_EVERY) {
            self.record_anchor();
        }
    }

    /// Writes the pending anchor unless the store is busy (then the next batch, or the
    /// next idle wake-up within 250 ms, tries again: the writer never waits on the store).
    fn record_anchor(&mut self) {
        let (Some(sink), Some(anchor)) = (self.shared.sink.get(), self.anchor_pending.as_ref()) else {
            return;
        };
        match sink(anchor) {
            Ok(false) => {}
            Ok(true) => {
                self.anchor_pending = None;
                self.anchored_at = Some(std::time::Instant::now());
                if self.anchor_failing {
                    self.anchor_failing = false;
                    tracing::info!("audit anchor recorded in the store again");
                }
            }
            Err(e) => {
                if !self.anchor_failing {
                    self.anchor_failing = true;
                    tracing::error!(error = %e, "could not record the audit anchor in the store; retrying");
                }
            }
        }
    }

    fn reopen(&mut self, why: &str, batch: &mut Vec<AuditEvent>) {
        match open_append(&self.path).and_then(|f| f.metadata().map(|m| (f, m.len()))) {
            Ok((file, len)) => {
                self.file = file;
                self.len = len;
                tracing::info!(path = %self.path.display(), "{why}: audit log reopened");
                batch.insert(
                    0,
                    AuditEvent::internal(REOPENED_OP, "ok", format!("{why}: reopened {}", self.path.display())),
                );
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "{why}: reopening the audit log failed; still writing to the old file")
            }
        }
    }

    fn rotate(&mut self, batch: &mut Vec<AuditEvent>) {
        // The anchor must name the rotated file's last entry, or a crash before the new
        // file's first write reads as an emptied log at the next start.
        self.record_anchor();
        let seq = self.head.lock().unwrap_or_else(|p| p.into_inner()).seq;
        let to = keystore::audit::rotated_name(&self.path, seq);
        if let Err(e) = self.file.sync_all().and_then(|()| std::fs::rename(&self.path, &to)) {
            tracing::error!(path = %self.path.display(), error = %e, "audit log rotation failed; continuing in the same file");
            return;
        }
        tracing::info!(rotated_to = %to.display(), "audit log rotated");
        self.reopen("rotation", batch);
        if let Some(first) = batch.first_mut().filter(|e| e.op == REOPENED_OP) {
            first.detail = Some(format!("rotation: previous entries are in {}", to.display()));
        }
    }
}

/// Appends `ev`'s line, chained onto `head`, and moves `head` to it (in place: the MAC's
/// string keeps its allocation from one entry to the next).
fn append_line(
    buf: &mut Vec<u8>,
    node: &str,
    key: &AuditKey,
    head: &mut AuditHead,
    ev: &AuditEvent,
    clock: &mut TimeCache,
) {
    // Written by hand rather than through serde: this runs once per key fetch, and the
    // writer thread shares two cores with the request workers.
    let seq = if ev.op == TRUNCATED_OP {
        // Continue after the anchor: the record itself states how many entries are gone.
        head.seq + 1 + truncated_count(ev)
    } else {
        head.seq + 1
    };
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
        // What `Display` writes for an IPv4 address, without the formatting machinery.
        Some(std::net::SocketAddr::V4(p)) => {
            buf.push(b'"');
            for (i, octet) in p.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                push_u64(buf, u64::from(octet));
            }
            buf.push(b':');
            push_u64(buf, u64::from(p.port()));
            buf.push(b'"');
        }
        Some(p) => {
            use std::io::Write as _;
            let _ = write!(buf, "\"{p}\"");
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"prev\":\"");
    buf.extend_from_slice(head.hash.as_bytes());
    buf.push(b'"');
    let mac = key.mac_hex(&buf[start..]);
    buf.extend_from_slice(MAC_MARK.as_bytes());
    buf.extend_from_slice(&mac);
    buf.extend_from_slice(b"\"}\n");
    head.seq = seq;
    head.hash.clear();
    // mac_hex writes ASCII only.
    head.hash.push_str(std::str::from_utf8(&mac).unwrap_or_default());
}

fn truncated_count(ev: &AuditEvent) -> u64 {
    ev.detail
        .as_deref()
        .and_then(|d| d.strip_prefix("missing "))
        .and_then(|d| d.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
/// Runs that need no escape (almost every field) are copied whole.
/// The bytes [`push_json_str`] escapes: what JSON requires (`"`, `\\`, controls) and DEL,
/// so that no line of the log carries a control character.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table[0x7f] = true;
    table
};

/// `s` as a JSON string. The runs between escapes are copied whole: most strings (names,
/// hex, the constant operation and outcome names) have no escape at all.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    let mut rest = s.as_bytes();
    buf.reserve(rest.len() + 2);
    buf.push(b'"');
    while let Some(i) = rest.iter().position(|&b| ESCAPED[usize::from(b)]) {
        buf.extend_from_slice(&rest[..i]);
        let b = rest[i];
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                buf.extend_from_slice(b"\\u00");
                buf.push(HEX[usize::from(b >> 4)]);
                buf.push(HEX[usize::from(b & 0x0f)]);
            }
        }
        rest = &rest[i + 1..];
    }
    buf.extend_from_slice(rest);
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

/// Reads the last complete line to find the chain head: `None` for an empty file, and
/// whether the line is from before the chain was keyed. A partial last line (a crash in
/// the middle of a write) is cut off; everything before it is kept.
fn recover_head(file: &mut File) -> Result<Option<(AuditHead, bool)>, String> {
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if len == 0 {
        return Ok(None);
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
        return Ok(None);
    };
    let last = std::str::from_utf8(last).map_err(|_| "last line is not UTF-8".to_string())?;
    let parsed = keystore::audit::parse_line(last).map_err(|p| format!("last line: {p}"))?;
    Ok(Some((
        AuditHead {
            seq: parsed.seq,
            hash: parsed.mac.to_owned(),
        },
        parsed.legacy,
    )))
}

#[cfg(test)]
mod tests {
    use keystore::audit::{Start, verify};

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

    fn key() -> AuditKey {
        AuditKey::from_bytes(&[9u8; 32])
    }

    fn options() -> AuditOptions {
        AuditOptions {
            node: "a".into(),
            queue: 1024,
            rotate_bytes: 0,
        }
    }

    fn open(path: &Path, anchor: Option<AuditAnchor>) -> Audit {
        Audit::open(path, &options(), key(), anchor, Arc::new(Metrics::default())).unwrap()
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

    fn check(
        path: &Path,
        anchor: Option<&AuditAnchor>,
    ) -> Result<keystore::audit::VerifyReport, keystore::audit::VerifyError> {
        verify(&[path.to_path_buf()], &key(), Start::Genesis, anchor)
    }

    /// The log of 50 fetches with an `admin.rotate` every 10th entry; returns its anchor.
    fn write_log(path: &Path) -> AuditAnchor {
        let audit = open(path, None);
        for i in 0..150 {
            audit.record(event(if i % 10 == 0 { "admin.rotate" } else { "keyring.fetch" }));
        }
        wait_for(&audit, 150);
        audit.head().anchor()
    }

    /// Recomputes every line's chain with `scheme` (what an attacker without the key can
    /// do), keeping the lines `keep` accepts.
    fn rechain(text: &str, keep: impl Fn(&str) -> bool, mark: &str, scheme: impl Fn(&[u8]) -> String) -> String {
        let mut prev = GENESIS.to_owned();
        let mut out = String::new();
        for (seq, line) in text.lines().filter(|l| keep(l)).enumerate() {
            let body = &line[..line.rfind(MAC_MARK).unwrap()];
            let mut v: serde_json::Value = serde_json::from_str(&format!("{body}}}")).unwrap();
            // Keep the field order: replace seq and prev textually.
            let old_seq = v["seq"].as_u64().unwrap();
            let old_prev = v["prev"].as_str().unwrap().to_owned();
            let body = body
                .replacen(&format!("{{\"seq\":{old_seq},"), &format!("{{\"seq\":{},", seq + 1), 1)
                .replacen(&old_prev, &prev, 1);
            v["seq"] = (seq + 1).into();
            let mac = scheme(body.as_bytes());
            out.push_str(&format!("{body}{mark}{mac}\"}}\n"));
            prev = mac;
        }
        out
    }

    #[test]
    fn entries_chain_and_verify_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = open(&path, None);
        for _ in 0..50 {
            audit.record(event("keyring.fetch"));
        }
        wait_for(&audit, 50);
        let report = check(&path, Some(&audit.head().anchor())).unwrap();
        assert_eq!(report.entries, 50);
        assert_eq!(report.head, audit.head().hash);

        // Reopening continues the chain.
        let anchor = audit.head().anchor();
        drop(audit);
        let audit = open(&path, Some(anchor));
        audit.record(event("admin.rotate"));
        wait_for(&audit, 51);
        assert_eq!(check(&path, None).unwrap().entries, 51);

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Edit one field of one entry.
        let edited = text.replacen("admin.rotate", "admin.retire", 1);
        std::fs::write(&path, &edited).unwrap();
        let e = check(&path, None).unwrap_err();
        assert_eq!(e.line, 51);
        assert!(e.problem.contains("modified or forged"), "{e}");
        // Remove one entry.
        let removed: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 10)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        std::fs::write(&path, removed).unwrap();
        assert_eq!(check(&path, None).unwrap_err().line, 11);
        // Swap two entries.
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        std::fs::write(&path, swapped.join("\n") + "\n").unwrap();
        assert_eq!(check(&path, None).unwrap_err().line, 4);
    }

    /// The attack of issue 10 §6: drop every `admin.rotate` line and recompute the chain.
    /// Before the chain was keyed this verified as intact.
    #[test]
    fn removing_lines_and_recomputing_the_chain_without_the_key_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let keep = |l: &str| !l.contains("\"op\":\"admin.rotate\"");
        let sha = |b: &[u8]| hex::encode(ring::digest::digest(&ring::digest::SHA256, b));
        // The old scheme, exactly: SHA-256 in a "hash" field.
        std::fs::write(&path, rechain(&text, keep, ",\"hash\":\"", sha)).unwrap();
        let e = check(&path, None).unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        // The new field name with an unkeyed SHA-256, and a MAC under a guessed key.
        std::fs::write(&path, rechain(&text, keep, MAC_MARK, sha)).unwrap();
        assert_eq!(check(&path, None).unwrap_err().line, 1);
        let guessed = AuditKey::from_bytes(&[0u8; 32]);
        let forge = |b: &[u8]| String::from_utf8(guessed.mac_hex(b).to_vec()).unwrap();
        std::fs::write(&path, rechain(&text, keep, MAC_MARK, forge)).unwrap();
        assert!(check(&path, None).unwrap_err().problem.contains("forged"));
        // Sanity: the same rewrite with the real key would verify (the test can fail).
        let real = |b: &[u8]| String::from_utf8(key().mac_hex(b).to_vec()).unwrap();
        std::fs::write(&path, rechain(&text, keep, MAC_MARK, real)).unwrap();
        assert_eq!(check(&path, None).unwrap().entries, 135);
    }

    /// `head -n 100`: the cut log still chains, but it does not reach the anchor.
    #[test]
    fn a_log_cut_short_fails_against_the_anchor_and_the_server_records_it_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let anchor = write_log(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let head100: String = text.lines().take(100).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, &head100).unwrap();
        assert_eq!(
            check(&path, None).unwrap().entries,
            100,
            "without an anchor the cut is invisible"
        );
        let e = check(&path, Some(&anchor)).unwrap_err();
        assert!(e.truncated, "{e}");
        assert!(
            e.problem.contains("truncated") && e.problem.contains("50 entries"),
            "{e}"
        );
        // An anchor from earlier (entry 80) still holds: the prefix was not rewritten.
        let line80: serde_json::Value = serde_json::from_str(text.lines().nth(79).unwrap()).unwrap();
        let older = AuditAnchor {
            count: 80,
            head: line80["mac"].as_str().unwrap().to_owned(),
        };
        assert!(check(&path, Some(&older)).unwrap().anchored);

        // A server starting on the cut log against the store's anchor says so in the log,
        // under its key, and the sequence continues after the anchor.
        let audit = open(&path, Some(anchor.clone()));
        audit.record(event("keyring.fetch"));
        wait_for(&audit, 152);
        let e = check(&path, None).unwrap_err();
        assert_eq!(e.line, 101);
        assert!(e.problem.contains("50 entries missing"), "{e}");
        drop(audit);

        // An emptied log file (no rotated file ends at the anchor) is recorded too.
        std::fs::write(&path, "").unwrap();
        let audit = open(&path, Some(anchor));
        audit.record(event("keyring.fetch"));
        wait_for(&audit, 152);
        let e = check(&path, None).unwrap_err();
        assert!(e.problem.contains("150 entries missing"), "{e}");
    }

    #[test]
    fn rotation_by_size_continues_the_chain_and_a_missing_middle_file_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let metrics = Arc::new(Metrics::default());
        let options = AuditOptions {
            rotate_bytes: 4096,
            ..options()
        };
        let audit = Audit::open(&path, &options, key(), None, metrics.clone()).unwrap();
        for i in 0..200 {
            audit.record(event("keyring.fetch"));
            if i % 10 == 0 {
                // Several batches, so several rotations.
                wait_for(&audit, i + 1);
            }
        }
        // Sequence numbers include the `audit.reopened` records: wait until every event
        // and each rotation's record is written.
        for _ in 0..500 {
            let rotations = keystore::audit::rotated_files(&path).unwrap().len() as u64;
            if metrics.audit_written.load(Relaxed) == 200 + rotations && audit.head().seq == 200 + rotations {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut files = keystore::audit::rotated_files(&path).unwrap();
        assert!(files.len() >= 3, "expected several rotated files, got {files:?}");
        files.push(path.clone());
        let anchor = audit.head().anchor();
        let report = verify(&files, &key(), Start::Genesis, Some(&anchor)).unwrap();
        assert_eq!(report.last_seq, anchor.count);
        assert!(report.anchored);
        assert_eq!(audit.verify_own(None).unwrap().head, anchor.head);

        // Restarting on an empty current file continues from the anchor (a rotation just
        // happened), without a truncation record.
        drop(audit);
        let last = files.pop().unwrap();
        std::fs::rename(&last, keystore::audit::rotated_name(&path, anchor.count)).unwrap();
        files.push(keystore::audit::rotated_name(&path, anchor.count));
        let audit = open(&path, Some(anchor.clone()));
        audit.record(event("keyring.fetch"));
        wait_for(&audit, anchor.count + 1);
        files.push(path.clone());
        verify(&files, &key(), Start::Genesis, Some(&audit.head().anchor())).unwrap();

        // A middle file missing.
        let mut missing = files.clone();
        missing.remove(1);
        let e = verify(&missing, &key(), Start::Genesis, None).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.problem.contains("a file in the sequence is missing"), "{e}");
        // Out of order.
        let mut swapped = files.clone();
        swapped.swap(0, 1);
        assert!(verify(&swapped, &key(), Start::Genesis, None).is_err());
        // The first file missing: only with Start::Any, which reports where it began.
        let later = verify(&files[1..], &key(), Start::Any, None).unwrap();
        assert!(later.first_seq > 1);
        assert!(verify(&files[1..], &key(), Start::Genesis, None).is_err());
    }

    #[test]
    fn reopen_after_an_external_rename_continues_in_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = open(&path, None);
        for _ in 0..20 {
            audit.record(event("keyring.fetch"));
        }
        wait_for(&audit, 20);
        let old = dir.path().join("audit.log.1");
        std::fs::rename(&path, &old).unwrap();
        audit.reopen();
        audit.record(event("admin.rotate"));
        wait_for(&audit, 22);
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(new.lines().next().unwrap().contains(REOPENED_OP), "{new}");
        let report = verify(
            &[old, path.clone()],
            &key(),
            Start::Genesis,
            Some(&audit.head().anchor()),
        )
        .unwrap();
        assert_eq!(report.last_seq, 22);
    }

    #[test]
    fn a_busy_store_delays_the_anchor_but_the_latest_head_gets_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = open(&path, None);
        let stored: Arc<Mutex<Option<AuditAnchor>>> = Arc::default();
        let busy = Arc::new(AtomicBool::new(true));
        let (sink_stored, sink_busy) = (stored.clone(), busy.clone());
        audit.anchor_to(Box::new(move |a| {
            if sink_busy.load(Relaxed) {
                return Ok(false);
            }
            *sink_stored.lock().unwrap() = Some(a.clone());
            Ok(true)
        }));
        for _ in 0..20 {
            audit.record(event("keyring.fetch"));
        }
        wait_for(&audit, 20);
        assert!(stored.lock().unwrap().is_none());
        // The store frees up; no new entries arrive, yet the head is anchored.
        busy.store(false, Relaxed);
        for _ in 0..200 {
            if stored.lock().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stored.lock().unwrap().clone(), Some(audit.head().anchor()));
    }

    #[test]
    fn under_continuous_load_the_anchor_is_written_every_anchor_every_and_never_ahead_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // A queue no stall of the writer thread can fill (the test machine is shared): no
        // entry is dropped, so the head ends at exactly the entries sent.
        let options = AuditOptions {
            queue: 1 << 20,
            ..options()
        };
        let audit = Audit::open(&path, &options, key(), None, Arc::new(Metrics::default())).unwrap();
        let anchors: Arc<Mutex<Vec<AuditAnchor>>> = Arc::default();
        let (sink_anchors, sink_path) = (anchors.clone(), path.clone());
        audit.anchor_to(Box::new(move |a| {
            // Never ahead of the file: what the store gets is already written and synced.
            let text = std::fs::read_to_string(&sink_path).unwrap();
            assert!(
                text.lines().count() as u64 >= a.count,
                "anchor {} ahead of the file",
                a.count
            );
            sink_anchors.lock().unwrap().push(a.clone());
            Ok(true)
        }));
        // One second of entries arriving faster than the writer's 5 ms batches empty the
        // queue: the writer never goes idle.
        let load = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < load {
            // A few per 200 µs (at most 25,000/s): well inside the 1024-entry queue.
            for _ in 0..5 {
                audit.record(event("keyring.fetch"));
            }
            sent += 5;
            std::thread::sleep(Duration::from_micros(200));
        }
        let under_load = anchors.lock().unwrap().len();
        // ANCHOR_EVERY (100 ms): about 10 in the second. Before: one anchor per 5 ms
        // batch, about 200.
        let most = 15;
        assert!(
            under_load <= most,
            "{under_load} anchors in {load:?} of load; at most {most} expected"
        );
        assert!(under_load >= 2, "{under_load} anchors under load");
        // Idle again: the store gets the last head at once.
        for _ in 0..2000 {
            if audit.head().seq >= sent {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..100 {
            if anchors.lock().unwrap().last() == Some(&audit.head().anchor()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(anchors.lock().unwrap().last(), Some(&audit.head().anchor()));
        assert_eq!(audit.head().seq, sent);
    }

    #[test]
    fn close_writes_syncs_and_anchors_everything_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = open(&path, None);
        let stored: Arc<Mutex<Option<AuditAnchor>>> = Arc::default();
        let sink_stored = stored.clone();
        audit.anchor_to(Box::new(move |a| {
            *sink_stored.lock().unwrap() = Some(a.clone());
            Ok(true)
        }));
        for _ in 0..500 {
            audit.record(event("keyring.fetch"));
        }
        assert!(audit.close(Duration::from_secs(10)), "the writer did not finish");
        let anchor = stored.lock().unwrap().clone().expect("anchored");
        assert_eq!(anchor.count, 500);
        assert_eq!(anchor, audit.head().anchor());
        let report = check(&path, Some(&anchor)).unwrap();
        assert_eq!(report.entries, 500);
        assert!(report.anchored);
        // After close, an entry is a counted failure, never a hang.
        audit.record(event("keyring.fetch"));
        assert!(audit.close(Duration::from_secs(1)));
    }

    /// The escaper before the table-driven one (issue 16, hot16b): a line's bytes must not
    /// change with it.
    fn push_json_str_reference(buf: &mut Vec<u8>, s: &str) {
        let bytes = s.as_bytes();
        buf.push(b'"');
        let mut plain = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escaped: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f | 0x7f => b"",
                _ => continue,
            };
            buf.extend_from_slice(&bytes[plain..i]);
            plain = i + 1;
            if escaped.is_empty() {
                use std::io::Write as _;
                let _ = write!(buf, "\\u{b:04x}");
            } else {
                buf.extend_from_slice(escaped);
            }
        }
        buf.extend_from_slice(&bytes[plain..]);
        buf.push(b'"');
    }

    #[test]
    fn json_strings_are_escaped_byte_for_byte_as_before() {
        let mut cases: Vec<String> = (0u8..128).map(|b| char::from(b).to_string()).collect();
        cases.push((0u8..128).map(char::from).collect());
        cases.push((0u8..128).rev().map(char::from).collect());
        cases.extend(
            [
                "",
                "plain",
                "a\"b\\c\nd\re\tf\u{1}g\u{7f}h",
                "é \u{1f} 鍵 🔑\"",
                "\"\"\\\\",
            ]
            .map(String::from),
        );
        // Every pair of an interesting byte and a plain run, at both ends.
        for b in [0u8, 0x1f, b'"', b'\\', b'\n', 0x7f, b' ', b'~'] {
            let c = char::from(b);
            cases.push(format!("{c}abc{c}{c}def{c}"));
        }
        for case in cases {
            let (mut ours, mut before) = (b"x".to_vec(), b"x".to_vec());
            push_json_str(&mut ours, &case);
            push_json_str_reference(&mut before, &case);
            assert_eq!(ours, before, "{case:?}");
        }
    }

    #[test]
    fn a_peer_is_written_as_display_writes_it() {
        let clock = &mut TimeCache::default();
        for peer in [
            "127.0.0.1:5555",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.3.4:443",
            "[::1]:7443",
            "[fe80::1%2]:80",
            "[::ffff:10.0.0.1]:9",
        ] {
            let addr: std::net::SocketAddr = peer.parse().unwrap();
            let mut ev = event("keyring.fetch");
            ev.peer = Some(addr);
            let mut head = AuditHead {
                seq: 0,
                hash: GENESIS.into(),
            };
            let mut buf = Vec::new();
            append_line(&mut buf, "n", &key(), &mut head, &ev, clock);
            let line: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(line["peer"], addr.to_string(), "{peer}");
        }
    }

    #[test]
    fn the_head_moves_in_place_to_each_line_written() {
        let clock = &mut TimeCache::default();
        let mut head = AuditHead {
            seq: 0,
            hash: GENESIS.into(),
        };
        let mut buf = Vec::new();
        for n in 1..=3u64 {
            let prev = head.hash.clone();
            let start = buf.len();
            append_line(&mut buf, "n", &key(), &mut head, &event("keyring.fetch"), clock);
            let line: serde_json::Value = serde_json::from_slice(&buf[start..]).unwrap();
            assert_eq!(head.seq, n);
            assert_eq!(line["seq"], n);
            assert_eq!(line["prev"], prev.as_str());
            assert_eq!(line["mac"], head.hash.as_str());
            assert_eq!(head.hash.len(), 64);
        }
    }

    #[test]
    fn json_strings_are_escaped_as_a_json_parser_reads_them() {
        let mut cases: Vec<String> = (0u8..128).map(|b| format!("a{}b", char::from(b))).collect();
        cases.extend(
            [
                "",
                "plain",
                "\"",
                "\\\\\"",
                "\n\r\t\u{1}\u{7f}",
                "é ü 鍵 🔑",
                "end\\",
                "\"start",
            ]
            .map(String::from),
        );
        cases.push((0u8..128).map(char::from).collect());
        for case in cases {
            let mut buf = Vec::new();
            push_json_str(&mut buf, &case);
            let text = std::str::from_utf8(&buf).unwrap();
            assert!(!text.bytes().any(|b| b < 0x20 || b == 0x7f), "{text:?}");
            let back: String = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(back, case);
        }
    }

    #[test]
    fn a_partial_last_line_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = open(&path, None);
        audit.record(event("x"));
        wait_for(&audit, 1);
        drop(audit);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"time\":\"half a li").unwrap();
        let audit = open(&path, None);
        audit.record(event("y"));
        wait_for(&audit, 2);
        assert_eq!(check(&path, None).unwrap().entries, 2);
    }

    #[test]
    fn an_unkeyed_log_is_moved_aside_and_the_sequence_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let sha = |b: &[u8]| hex::encode(ring::digest::digest(&ring::digest::SHA256, b));
        std::fs::write(&path, rechain(&text, |_| true, ",\"hash\":\"", sha)).unwrap();
        let audit = open(&path, None);
        audit.record(event("keyring.fetch"));
        wait_for(&audit, 152);
        assert!(dir.path().join("audit.log.00000000000000000150.unkeyed").exists());
        let report = verify(std::slice::from_ref(&path), &key(), Start::Any, None).unwrap();
        assert_eq!((report.first_seq, report.last_seq), (151, 152));
    }

    #[test]
    fn a_failing_disk_is_counted_and_never_stalls() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let metrics = Arc::new(Metrics::default());
        let audit = Audit::open(Path::new("/dev/full"), &options(), key(), None, metrics.clone()).unwrap();
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
    fn a_full_queue_drops_and_counts_and_leaves_a_gap_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let metrics = Arc::new(Metrics::default());
        let options = AuditOptions { queue: 1, ..options() };
        let audit = Audit::open(&path, &options, key(), None, metrics.clone()).unwrap();
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
        let dropped = metrics.audit_dropped.load(Relaxed);
        assert!(dropped > 0);
        // The drops are announced by the time the next entry is written.
        audit.record(event("after"));
        let written = metrics.audit_written.load(Relaxed);
        for _ in 0..500 {
            if metrics.audit_written.load(Relaxed) > written {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let report = check(&path, Some(&audit.head().anchor())).unwrap();
        let lost: u64 = report.gaps.iter().map(|g| g.lost).sum();
        assert_eq!(lost, dropped, "{:?}", report.gaps);
        assert!(report.gaps.iter().all(|g| g.detail.contains("queue was full")));
    }
}
