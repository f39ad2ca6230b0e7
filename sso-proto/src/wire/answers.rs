//! The JSON answers that carry no key material: errors, and the admin answers (rotate,
//! retire, destroy, status, restore, audit verify, health). The server writes each through
//! its type here with `serde_json`; ssoctl and the peer read it back through the same
//! type. Fields are declared in alphabetical order, the order the server's `json!` bodies
//! always had (serde_json sorts an object's keys), so the bytes did not change.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::{KeyId, KeyMeta, KeyState};

/// Every refusal: `{"error": CODE, "message": …}` (docs/operations.md, the error table).
/// The message never holds key material.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable error code.
    #[serde(default)]
    pub error: String,
    /// What went wrong and what to do.
    #[serde(default)]
    pub message: String,
}

/// A key's metadata as admin answers show it (status, retire, destroy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    /// RFC 3339.
    pub created_at: String,
    /// Its generation.
    pub generation: u64,
    /// The key.
    pub key_id: KeyId,
    /// The node that generated it.
    pub origin: String,
    /// Its state, with the primary derived.
    pub state: KeyState,
}

impl From<&KeyMeta> for KeyView {
    fn from(meta: &KeyMeta) -> Self {
        Self {
            created_at: rfc3339(meta.created_at),
            generation: meta.generation,
            key_id: meta.key_id,
            origin: meta.origin.clone(),
            state: meta.state,
        }
    }
}

/// A time as every answer writes it: RFC 3339, empty if it cannot be (a year past 9999).
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `POST /v1/admin/rotate` (body optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Rotate on this node alone when the peer cannot take the rotation.
    #[serde(default)]
    pub allow_degraded: bool,
}

/// The answer to a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateAnswer {
    /// The new primary's generation.
    pub generation: u64,
    /// The new primary.
    pub key_id: KeyId,
    /// Staged keys of interrupted rotations this one retired.
    pub orphans_retired: usize,
    /// `replicated`, `degraded` or `standalone`.
    pub replication: String,
}

/// `POST /v1/admin/keys/{id}/retire` (body optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    /// Retire the key even if it is the primary (an operator's audited override for a
    /// primary of unknown origin); the next promoted key becomes the primary.
    #[serde(default)]
    pub force_retire_primary: bool,
}

/// The answer to a retire or a destroy: the key as it is now, and whether the change
/// reached the peer (`standalone`, `replicated`, or `pending`: anti-entropy carries it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChanged {
    /// The key.
    #[serde(flatten)]
    pub key: KeyView,
    /// Whether the change reached the peer.
    pub replication: String,
}

/// `GET /v1/admin/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// The audit log's head.
    pub audit: AuditHeadView,
    /// Backup coverage.
    pub backup: BackupView,
    /// The node's epoch.
    pub epoch: u64,
    /// Health, as `/v1/health` reports it.
    pub health: HealthView,
    /// Every key.
    pub keys: Vec<KeyView>,
    /// The node's name.
    pub node: String,
    /// The peer, when one is configured.
    pub peer: Option<PeerView>,
    /// The derived primary.
    pub primary: Option<KeyId>,
    /// On a node of a cluster, the PostgreSQL database it shares with the other nodes
    /// (`postgresql://USER@HOST:PORT/DB`, never a password); absent on a pair or a single
    /// node, whose store is its own SQLite file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_database: Option<String>,
    /// The node's clock, RFC 3339.
    pub time: String,
}

/// The audit log's head in a status answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHeadView {
    /// The last entry's MAC.
    pub head: String,
    /// The last entry's sequence number.
    pub seq: u64,
}

/// Backup coverage in a status answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupView {
    /// `pair` (backups through either node), `node`, or `node_only_peer_unreachable`.
    pub coverage: String,
    /// When the last backup was written, RFC 3339.
    pub last_backup_at: Option<String>,
    /// Keys in no backup.
    pub not_backed_up: Vec<KeyId>,
}

/// Health in a status answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    /// What is wrong, if anything.
    pub problems: Vec<String>,
    /// `ok` or `degraded`.
    pub status: String,
}

/// The peer in a status answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// An integrity alarm raised by the last sync.
    pub integrity_alarm: Option<String>,
    /// Epochs this node moved since the two key sets were last seen equal.
    pub lag_epochs: Option<u64>,
    /// When the peer last answered, RFC 3339.
    pub last_contact: Option<String>,
    /// The last replication error.
    pub last_error: Option<String>,
    /// The peer's node name, once it answered.
    pub node: Option<String>,
    /// The peer's epoch at last contact.
    pub peer_epoch: Option<u64>,
    /// `up` or `down`.
    pub state: String,
    /// Its URL.
    pub url: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthAnswer {
    /// The node's name.
    pub node: String,
    /// `up`, `down`, or `none` without a configured peer.
    pub peer: String,
    /// What is wrong; absent when nothing is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Always false: a running server is unsealed.
    pub sealed: bool,
    /// `ok` or `degraded` (both answer 200).
    pub status: String,
}

/// `POST /v1/admin/backup` (the answer is the backup file itself). The server reads the
/// password as a [`SecretString`] (wiped on drop); ssoctl writes it from a borrowed
/// `&str` into a wiped buffer, so the password is never copied into a JSON value.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(missing_debug_implementations, reason = "holds a password; no Debug by design")]
pub struct BackupRequest<P = SecretString> {
    /// The backup password (at least 8 characters).
    pub password: P,
    /// A hint stored in the clear in the file.
    #[serde(default)]
    pub hint: String,
}

/// `POST /v1/admin/restore`; the password as in [`BackupRequest`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(missing_debug_implementations, reason = "holds a password; no Debug by design")]
pub struct RestoreRequest<P = SecretString> {
    /// The backup password.
    pub password: P,
    /// The backup file, standard base64.
    pub backup: String,
    /// Only work out what the restore would do (`plan`); change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Restore although the peer could not be asked first.
    #[serde(default)]
    pub force: bool,
}

/// What a restore does (or would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePlanView {
    /// When the backup was written, RFC 3339.
    pub backup_created_at: String,
    /// Keys in the backup the node holds destroyed: they stay destroyed.
    pub destroyed: Vec<KeyId>,
    /// Keys in the backup the node already holds.
    pub known: usize,
    /// Whether the node could ask its peer first (`None` without a peer).
    pub peer_checked: Option<bool>,
    /// Keys in the backup the node does not know: a restore adds them.
    pub unknown: Vec<KeyId>,
}

/// The answer to a restore with `dry_run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreDryRun {
    /// Always true.
    pub dry_run: bool,
    /// What a restore would do.
    pub plan: RestorePlanView,
}

/// The answer to a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// Keys added.
    pub added: usize,
    /// Keys whose state moved forward.
    pub advanced: usize,
    /// The node's epoch afterwards.
    pub epoch: u64,
    /// What the restore did.
    pub plan: RestorePlanView,
    /// Keys already held in the same or a later state.
    pub unchanged: usize,
}

/// A gap record in a verified audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapView {
    /// The record's detail.
    pub detail: String,
    /// Entries lost.
    pub lost: u64,
    /// Sequence number of the gap record.
    pub seq: u64,
}

/// `GET /v1/admin/audit/verify` (and `ssoctl audit verify --json`): intact, or where the
/// log is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditVerifyAnswer {
    /// Every entry checked out.
    Intact {
        /// Whether an anchor was given and the log reaches it (ssoctl's own check only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        anchored: Option<bool>,
        /// Entries checked.
        entries: u64,
        /// The first entry's sequence number.
        first_seq: u64,
        /// Gap records, oldest first.
        gaps: Vec<GapView>,
        /// The last entry's MAC.
        head: String,
        /// Always true.
        intact: bool,
        /// The last entry's sequence number.
        last_seq: u64,
    },
    /// The log is broken here.
    Broken {
        /// The file concerned.
        file: String,
        /// Always false.
        intact: bool,
        /// 1-based line (0: the file as a whole, or the anchor).
        line: u64,
        /// What is wrong there.
        problem: String,
        /// Entries are missing at the end.
        truncated: bool,
    },
}
