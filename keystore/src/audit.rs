//! The audit log's keyed chain: the line format both the server (which writes it) and
//! `ssoctl audit verify` (which checks it) use, the key, the anchor, and the verifier.
//!
//! Every line is one JSON object; its last field is
//!
//! ```text
//! ,"mac":"<64 hex>"}
//! ```
//!
//! `mac` = HMAC-SHA256 under the [`AuditKey`] of the line's bytes up to (not including)
//! `,"mac":`. Those bytes include `"prev"`, the previous line's `mac` (64 zeros before the
//! first line), and `"seq"`, which counts from 1. Without the key nobody can recompute a
//! line, so removing, reordering, editing or re-chaining entries is found by [`verify`].
//!
//! The [`AuditKey`] is derived with HKDF-SHA256 from the store's KEK: the same for every
//! process that can unseal the store, stable across restarts, never written anywhere.
//!
//! The [`AuditAnchor`] (entry count and head `mac`) is kept by the server outside the log
//! (in the store's `meta` table, and reported by `GET /v1/admin/status`): a log cut short
//! still chains, but it no longer reaches the anchor.
//!
//! Special lines (written by the server, keyed like every other line):
//! - `"op":"audit.gap"`: writes failed (disk full) or the queue overflowed; `detail`
//!   starts with `lost N entries`. Reported by [`verify`], not an error.
//! - `"op":"audit.truncated"`: at start the server found its log behind the anchor; the
//!   record's `seq` continues after the anchor, `detail` starts with `missing N entries`.
//!   [`verify`] fails on it: entries were removed.
//!
//! Lines written before the chain was keyed (`"hash"` instead of `"mac"`, a plain
//! SHA-256) are refused: anyone can write them. A server that finds such a log moves it
//! aside (`NAME.<seq>.unkeyed`) and continues the sequence in a new file.

use std::fs::File;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use ring::hmac;
use zeroize::Zeroizing;

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// What precedes the MAC on every keyed line.
pub const MAC_MARK: &str = ",\"mac\":\"";
const LEGACY_MARK: &str = ",\"hash\":\"";
/// `op` of a gap record.
pub const GAP_OP: &str = "audit.gap";
/// `op` of a truncation record.
pub const TRUNCATED_OP: &str = "audit.truncated";

/// The HMAC key of the audit chain. Derived from the KEK; never stored or logged. The raw
/// bytes are wiped right after ring expands them (ring keeps only the HMAC pad states).
#[derive(Clone)]
pub struct AuditKey(hmac::Key);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

impl AuditKey {
    /// HKDF-SHA256 from the KEK, with a fixed salt and info naming this use only.
    pub(crate) fn derive(kek: &[u8; 32]) -> Self {
        struct Len;
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"sso-keystore/audit-chain/v1");
        let prk = salt.extract(kek);
        // expand/fill only fail for lengths above 255 * 32 bytes.
        if let Ok(okm) = prk.expand(&[b"sso audit log hmac key"], Len) {
            let _ = okm.fill(raw.as_mut());
        }
        Self(hmac::Key::new(hmac::HMAC_SHA256, raw.as_ref()))
    }

    /// A key from raw bytes (tests and fuzzing; the server always derives it from the KEK).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The MAC of a line's body, as 64 lowercase hex characters.
    pub fn mac_hex(&self, body: &[u8]) -> [u8; 64] {
        let tag = hmac::sign(&self.0, body);
        let mut out = [0u8; 64];
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in tag.as_ref().iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        out
    }

    fn verify_hex(&self, body: &[u8], mac_hex: &str) -> bool {
        let Ok(tag) = hex::decode(mac_hex) else { return false };
        hmac::verify(&self.0, body, &tag).is_ok()
    }
}

/// The newest entry of a log, as kept outside it: its sequence number (the entry count)
/// and its `mac`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAnchor {
    /// Sequence number of the newest entry (0: none yet).
    pub count: u64,
    /// Its `mac`, 64 hex characters.
    pub head: String,
}

impl AuditAnchor {
    /// The anchor of an empty log.
    pub fn genesis() -> Self {
        Self {
            count: 0,
            head: GENESIS.into(),
        }
    }
}

/// One line, split and parsed (the MAC not yet checked).
#[derive(Debug)]
pub struct Line<'a> {
    /// `seq`.
    pub seq: u64,
    /// `prev`.
    pub prev: String,
    /// `op`.
    pub op: String,
    /// `detail`.
    pub detail: Option<String>,
    /// The bytes the MAC covers.
    pub body: &'a str,
    /// The `mac` (or legacy `hash`) value.
    pub mac: &'a str,
    /// A line from before the chain was keyed.
    pub legacy: bool,
}

/// Splits and parses one line (no trailing newline).
pub fn parse_line(line: &str) -> Result<Line<'_>, String> {
    let (idx, mark, legacy) = match line.rfind(MAC_MARK) {
        Some(i) => (i, MAC_MARK, false),
        None => match line.rfind(LEGACY_MARK) {
            Some(i) => (i, LEGACY_MARK, true),
            None => return Err("no mac field: not an audit line".into()),
        },
    };
    let (body, rest) = line.split_at(idx);
    let mac = rest
        .strip_prefix(mark)
        .and_then(|r| r.strip_suffix("\"}"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("malformed mac field")?;
    #[derive(serde::Deserialize)]
    struct Fields {
        seq: u64,
        prev: String,
        op: String,
        detail: Option<String>,
    }
    let fields: Fields = serde_json::from_str(&format!("{body}}}")).map_err(|e| format!("not valid JSON: {e}"))?;
    Ok(Line {
        seq: fields.seq,
        prev: fields.prev,
        op: fields.op,
        detail: fields.detail,
        body,
        mac,
        legacy,
    })
}

/// The number after `word` at the start of a special record's detail.
fn leading_count(detail: Option<&str>, word: &str) -> Option<u64> {
    detail?.strip_prefix(word)?.split(' ').next()?.parse().ok()
}

/// Where verification starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first file must begin with entry 1.
    Genesis,
    /// The first file may begin anywhere (earlier files were archived); its first line's
    /// `prev` cannot be checked.
    Any,
}

/// A gap record: entries the server could not write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Sequence number of the gap record.
    pub seq: u64,
    /// Entries lost.
    pub lost: u64,
    /// The record's detail.
    pub detail: String,
}

/// What [`verify`] found in an intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked (gap records included).
    pub entries: u64,
    /// Sequence number of the first entry checked.
    pub first_seq: u64,
    /// Sequence number of the last entry.
    pub last_seq: u64,
    /// The last entry's mac.
    pub head: String,
    /// Gap records, oldest first.
    pub gaps: Vec<Gap>,
    /// Whether an anchor was given and the log reaches it.
    pub anchored: bool,
}

/// Where and how a log is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", if *line == 0 { format!("{}: ", file.display()) } else { format!("{} line {line}: ", file.display()) })]
pub struct VerifyError {
    /// The file concerned.
    pub file: PathBuf,
    /// 1-based line number in it (0: the file as a whole, or the anchor).
    pub line: u64,
    /// What is wrong there.
    pub problem: String,
    /// The problem is that entries are missing at the end (the log was cut short).
    pub truncated: bool,
}

/// Checks `files` in order as one chain: every line's MAC under `key`, the `prev` links
/// (also from one file to the next), the sequence, and, when `anchor` is given, that the
/// log reaches it (the entry at the anchor's count has the anchor's mac, and nothing after
/// it is missing).
pub fn verify(
    files: &[PathBuf],
    key: &AuditKey,
    start: Start,
    anchor: Option<&AuditAnchor>,
) -> Result<VerifyReport, VerifyError> {
    verify_with(
        files,
        |p| File::open(p).map(std::io::BufReader::new),
        key,
        start,
        anchor,
    )
}

/// [`verify`] over readers `open` gives for each name (the fuzz target reads memory).
pub(crate) fn verify_with<R: BufRead>(
    files: &[PathBuf],
    open: impl Fn(&Path) -> std::io::Result<R>,
    key: &AuditKey,
    start: Start,
    anchor: Option<&AuditAnchor>,
) -> Result<VerifyReport, VerifyError> {
    let mut prev: Option<String> = match start {
        Start::Genesis => Some(GENESIS.to_owned()),
        Start::Any => None,
    };
    let mut report = VerifyReport {
        entries: 0,
        first_seq: 0,
        last_seq: 0,
        head: GENESIS.to_owned(),
        gaps: Vec::new(),
        anchored: false,
    };
    let mut expected_seq: Option<u64> = match start {
        Start::Genesis => Some(1),
        Start::Any => None,
    };
    let mut anchor_seen = anchor.is_some_and(|a| a.count == 0);
    let mut last_file = PathBuf::new();
    for (index, path) in files.iter().enumerate() {
        last_file = path.clone();
        let file = open(path).map_err(|e| VerifyError {
            file: path.clone(),
            line: 0,
            problem: e.to_string(),
            truncated: false,
        })?;
        let mut first_of_file = true;
        for (i, line) in file.lines().enumerate() {
            let n = i as u64 + 1;
            let broken = |problem: String| VerifyError {
                file: path.clone(),
                line: n,
                problem,
                truncated: false,
            };
            let line = line.map_err(|e| broken(e.to_string()))?;
            let parsed = parse_line(&line).map_err(&broken)?;
            if parsed.legacy {
                return Err(broken(
                    "an unkeyed line (the pre-keying format, or a forgery): it is not covered by the audit key".into(),
                ));
            }
            if !key.verify_hex(parsed.body.as_bytes(), parsed.mac) {
                return Err(broken(
                    "the entry was modified or forged: its mac does not verify under this store's audit key".into(),
                ));
            }
            let jump_ok = parsed.op == TRUNCATED_OP;
            if let Some(p) = &prev
                && parsed.prev != *p
            {
                let between = if first_of_file && index > 0 {
                    format!(
                        " (the file before this one ends at entry {}: a file in the sequence is missing or out of order)",
                        report.last_seq
                    )
                } else {
                    String::new()
                };
                return Err(broken(format!(
                    "the chain is broken: an entry before this one was removed, reordered or replaced{between}"
                )));
            }
            if let Some(want) = expected_seq
                && parsed.seq != want
                && !(jump_ok && parsed.seq > want)
            {
                return Err(broken(format!(
                    "sequence number {} where {want} was expected",
                    parsed.seq
                )));
            }
            if jump_ok {
                let missing = leading_count(parsed.detail.as_deref(), "missing ").unwrap_or(0);
                return Err(broken(format!(
                    "the server found {missing} entries missing when it started (entries {}..{} were removed or the log was replaced): {}",
                    parsed.seq.saturating_sub(missing),
                    parsed.seq.saturating_sub(1),
                    parsed.detail.as_deref().unwrap_or("")
                )));
            }
            if parsed.op == GAP_OP {
                report.gaps.push(Gap {
                    seq: parsed.seq,
                    lost: leading_count(parsed.detail.as_deref(), "lost ").unwrap_or(0),
                    detail: parsed.detail.clone().unwrap_or_default(),
                });
            }
            if report.entries == 0 {
                report.first_seq = parsed.seq;
            }
            if let Some(a) = anchor
                && a.count == parsed.seq
            {
                if a.head != parsed.mac {
                    return Err(broken(format!(
                        "entry {} is not the one the anchor names (anchor head {}): the log was rewritten",
                        a.count, a.head
                    )));
                }
                anchor_seen = true;
            }
            report.entries += 1;
            report.last_seq = parsed.seq;
            report.head = parsed.mac.to_owned();
            prev = Some(parsed.mac.to_owned());
            expected_seq = Some(parsed.seq + 1);
            first_of_file = false;
        }
    }
    if let Some(a) = anchor {
        if report.last_seq < a.count {
            return Err(VerifyError {
                file: last_file,
                line: 0,
                problem: format!(
                    "truncated: the log ends at entry {} but the anchor says {} entries (head {}): {} entries at the end are missing",
                    report.last_seq,
                    a.count,
                    a.head,
                    a.count - report.last_seq
                ),
                truncated: true,
            });
        }
        if !anchor_seen && report.first_seq <= a.count {
            return Err(VerifyError {
                file: last_file,
                line: 0,
                problem: format!("entry {} (the anchor) is not in the files given", a.count),
                truncated: false,
            });
        }
        report.anchored = anchor_seen;
    }
    Ok(report)
}

/// Rotated files of the log at `path`, oldest first: `NAME.<20-digit last seq>` in the
/// same directory.
pub fn rotated_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(digits) = file.strip_prefix(&prefix)
            && digits.len() == 20
            && digits.bytes().all(|b| b.is_ascii_digit())
        {
            found.push(dir.join(file));
        }
    }
    found.sort();
    Ok(found)
}

/// The name a rotated file gets: `NAME.<last seq, 20 digits>`, so names sort in order.
pub fn rotated_name(path: &Path, last_seq: u64) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{last_seq:020}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz seed is a valid log under the fuzz key, with one gap record.
    #[test]
    fn the_fuzz_seed_verifies_under_the_fuzz_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/audit_line/seed-0");
        let report = verify(&[path], &AuditKey::from_bytes(&[7u8; 32]), Start::Genesis, None).unwrap();
        assert_eq!(report.entries, 3);
        assert_eq!(report.gaps.len(), 1);
        assert_eq!(report.gaps[0].lost, 3);
    }

    #[test]
    fn the_anchor_round_trips_through_the_store_and_the_key_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let unseal = crate::UnsealKey::generate_key_file(&dir.path().join("unseal.key")).unwrap();
        let mut store = crate::SealedStore::create(&path, &unseal, &crate::CreateOptions::new("a")).unwrap();
        assert_eq!(store.audit_anchor().unwrap(), None);
        let anchor = AuditAnchor {
            count: 42,
            head: "ab".repeat(32),
        };
        store.set_audit_anchor(&anchor).unwrap();
        let mac = store.audit_key().mac_hex(b"line");
        drop(store);
        let store = crate::SealedStore::open(&path, &unseal).unwrap();
        assert_eq!(store.audit_anchor().unwrap(), Some(anchor));
        assert_eq!(
            store.audit_key().mac_hex(b"line"),
            mac,
            "the key must be stable across opens"
        );
        // Another store (another KEK) has another key.
        let other = crate::UnsealKey::generate_key_file(&dir.path().join("other.key")).unwrap();
        let store2 =
            crate::SealedStore::create(&dir.path().join("other.db"), &other, &crate::CreateOptions::new("b")).unwrap();
        assert_ne!(store2.audit_key().mac_hex(b"line"), mac);
    }

    #[test]
    fn the_key_depends_on_the_kek_and_is_not_it() {
        let a = AuditKey::derive(&[1u8; 32]);
        let b = AuditKey::derive(&[2u8; 32]);
        assert_ne!(a.mac_hex(b"x"), b.mac_hex(b"x"));
        assert_eq!(a.mac_hex(b"x"), AuditKey::derive(&[1u8; 32]).mac_hex(b"x"));
        assert_ne!(a.mac_hex(b"x"), AuditKey::from_bytes(&[1u8; 32]).mac_hex(b"x"));
        assert_eq!(format!("{a:?}"), "AuditKey([redacted])");
    }
}
