//! The pair protocol's bodies (`/v1/peer/…`, docs/pair.md): key records with their
//! material (written by [`records_json`] into an exact-size zeroizing buffer, read by
//! [`parse_records`]), and the small answers of merge, lease, stage, promote and coverage.
//!
//! Records body: `{"digest","epoch","node","keys":[{"created_at","generation","key_id",
//! "origin","state","key"?}]}`, `state` one of `staged`, `active` (promoted: the primary is
//! derived, so a record never says `primary`; a reader takes `primary` as `active`),
//! `retired`, `destroyed`; `key` is standard base64, absent for destroyed keys.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use super::exact::exact;
use crate::{KeyId, KeyMeta, KeyRecord, KeyState, MasterSecret};

/// The state a record carries: a promoted key is `active` whether or not it is the
/// primary here (the primary is derived from the key set, never sent).
fn record_state(state: KeyState) -> KeyState {
    match state {
        KeyState::Primary => KeyState::Active,
        other => other,
    }
}

/// The records body's head, fields in the order the writer has always used.
#[derive(Serialize)]
struct Head<'a> {
    digest: &'a str,
    epoch: u64,
    node: &'a str,
}

/// One record's fields but the material.
#[derive(Serialize)]
struct RecordHead<'a> {
    created_at: String,
    generation: u64,
    key_id: KeyId,
    origin: &'a str,
    state: KeyState,
}

/// Serialises key records into a zeroizing buffer sized exactly (two passes, see
/// [`exact`]): it never reallocates, whatever the key count or node names.
pub fn records_json(node: &str, epoch: u64, digest: &str, records: &[KeyRecord]) -> Zeroizing<Vec<u8>> {
    let header = serde_json::to_string(&Head { digest, epoch, node }).unwrap_or_else(|_| "{}".into());
    let fields: Vec<String> = records
        .iter()
        .map(|r| {
            let meta = &r.meta;
            serde_json::to_string(&RecordHead {
                created_at: meta.created_at.format(&Rfc3339).unwrap_or_default(),
                generation: meta.generation,
                key_id: meta.key_id,
                origin: &meta.origin,
                state: record_state(meta.state),
            })
            .unwrap_or_else(|_| "{}".into())
        })
        .collect();
    exact(|out| {
        out.put(&header.as_bytes()[..header.len() - 1]);
        out.put(b",\"keys\":[");
        for (i, (r, f)) in records.iter().zip(&fields).enumerate() {
            if i > 0 {
                out.put(b",");
            }
            out.put(&f.as_bytes()[..f.len() - 1]);
            if let Some(secret) = &r.secret {
                out.put(b",\"key\":\"");
                out.put_secret(secret);
                out.put(b"\"");
            }
            out.put(b"}");
        }
        out.put(b"]}");
    })
}

/// A peer's key set as one records body carries it.
#[derive(Debug)]
pub struct PeerKeys {
    /// The sender's node name.
    pub node: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its key-set digest (empty in pushes).
    pub digest: String,
    /// Every key it sent, promoted ones as `Active`.
    pub records: Vec<KeyRecord>,
}

#[derive(Deserialize)]
struct WireRecords {
    node: String,
    epoch: u64,
    #[serde(default)]
    digest: String,
    keys: Vec<WireRecord>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRecord {
    key_id: KeyId,
    generation: u64,
    created_at: String,
    origin: String,
    state: String,
    #[serde(default)]
    key: Option<SecretString>,
}

/// Parses a records body (outside input: fuzzed by `fuzz/fuzz_targets/peer_records.rs`).
/// Errors name the problem, never key material.
pub fn parse_records(body: &[u8]) -> Result<PeerKeys, String> {
    let wire: WireRecords = serde_json::from_slice(body)
        .map_err(|e| format!("malformed peer body (line {}, column {})", e.line(), e.column()))?;
    let mut records = Vec::with_capacity(wire.keys.len());
    for w in wire.keys {
        let state = KeyState::from_name(&w.state)
            .map(record_state)
            .ok_or_else(|| format!("key {}: unknown state", w.key_id))?;
        let created_at =
            OffsetDateTime::parse(&w.created_at, &Rfc3339).map_err(|_| format!("key {}: bad created_at", w.key_id))?;
        let secret = match w.key {
            Some(b64) => Some(
                MasterSecret::from_base64(b64.expose_secret().as_bytes())
                    .map_err(|_| format!("key {}: material is not 32 bytes of base64", w.key_id))?,
            ),
            None => None,
        };
        records.push(KeyRecord {
            meta: KeyMeta {
                key_id: w.key_id,
                generation: w.generation,
                created_at,
                origin: w.origin,
                state,
            },
            secret,
        });
    }
    Ok(PeerKeys {
        node: wire.node,
        epoch: wire.epoch,
        digest: wire.digest,
        records,
    })
}

/// The header every answer of a `/v1/peer/…` route carries: the answering node's name.
/// A `204` to `GET /v1/peer/keys` (the key sets are equal) has no body, so without it a
/// node whose pair started in sync never learned its peer's name or epoch.
pub const NODE_HEADER: &str = "sso-node";

/// The header beside [`NODE_HEADER`]: the answering node's keyring epoch, in decimal.
pub const EPOCH_HEADER: &str = "sso-epoch";

/// Who answered a peer request, from [`NODE_HEADER`] and [`EPOCH_HEADER`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerContact {
    /// The peer's node name.
    pub node: String,
    /// The peer's keyring epoch when it answered.
    pub epoch: u64,
}

/// Reads the two contact headers (outside input: fuzzed by `wire_answers`); `None` when
/// either is missing (a peer that predates them) or malformed. A node name is 1-64
/// letters, digits, `-`, `_` or `.` ([`crate::key::NODE_NAME_RULE`]).
pub fn parse_contact(node: Option<&[u8]>, epoch: Option<&[u8]>) -> Option<PeerContact> {
    let node = std::str::from_utf8(node?).ok()?;
    let epoch = std::str::from_utf8(epoch?).ok()?;
    if !crate::key::is_valid_node_name(node) || epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(PeerContact {
        node: node.to_owned(),
        epoch: epoch.parse().ok()?,
    })
}

/// The answer to `POST /v1/peer/merge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeAnswer {
    /// Keys it did not have.
    pub added: usize,
    /// Keys whose state moved forward.
    pub advanced: usize,
    /// Its key-set digest after the merge.
    #[serde(default)]
    pub digest: String,
    /// Its epoch after the merge.
    pub epoch: u64,
}

/// `POST /v1/peer/lease`: a node asks its peer for the rotation lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// The asking node.
    pub node: String,
    /// The lease token, 32 lowercase hex characters.
    pub token: String,
    /// How long the lease holds, milliseconds.
    pub ttl_ms: u64,
}

/// The answer to a granted lease: the highest generation the granting node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// The granting node's highest generation.
    pub max_generation: u64,
}

/// The answer to `POST /v1/peer/stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageAnswer {
    /// The key staged.
    pub staged: KeyId,
}

/// The answer to `POST /v1/peer/promote`: the primary afterwards, and the promoted keys
/// the coordinator sent as orphans that this node kept. `kept` is absent in answers of
/// servers before it existed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteAnswer {
    /// Orphans kept promoted.
    #[serde(default)]
    pub kept: Vec<KeyId>,
    /// The primary afterwards.
    pub primary: Option<KeyId>,
}

/// Reads a peer's answer to `POST /v1/peer/promote` (outside input: fuzzed by
/// `peer_records`). The error never quotes the body.
pub fn parse_promote_answer(body: &[u8]) -> Result<PromoteAnswer, String> {
    serde_json::from_slice(body).map_err(|e| format!("promote answer: {}", crate::json::describe_error(&e)))
}

/// Which keys a node's backups cover (`GET /v1/peer/coverage`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Keys a backup written from (or restored into) the node's store covers.
    pub backed_up: Vec<KeyId>,
    /// When the node last wrote a backup, unix seconds.
    pub last_backup_unix: Option<i64>,
}

/// Reads a peer's coverage answer; `None` when it is not one. Outside input: fuzzed by
/// `fuzz/fuzz_targets/peer_coverage.rs`.
pub fn parse_coverage(body: &[u8]) -> Option<Coverage> {
    serde_json::from_slice(body).ok()
}
