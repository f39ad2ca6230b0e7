//! Versioned master secrets sealed at rest in SQLite or PostgreSQL, and the backup files
//! that carry them between stores.
//!
//! # Layout
//! - [`unseal`]: the operator's unseal secret ([`UnsealKey`]: passphrase through argon2id,
//!   or a 32-byte key file) from a file, an environment variable or a prompt.
//! - `wrap`: the key-encryption key and the per-row AES-256-GCM wrapping that binds
//!   material to its row.
//! - [`storage`]: [`Store`], the storage trait every caller holds (synchronous, and why),
//!   with what an engine must guarantee; [`SealedStore`] is its first engine.
//! - [`store`]: [`SealedStore`], the SQLite file (WAL, `synchronous=FULL`, mode 0600,
//!   migrations) and the key model's transitions: stage, promote, retire, destroy, merge.
//! - [`postgres`]: [`postgres::PgStore`], the PostgreSQL engine many nodes share (one
//!   serialisable transaction per change, retried; the epoch bumped and notified in it;
//!   versioned migrations; bounded timeouts; reconnects by itself), and
//!   [`postgres::ChangeFeed`], the LISTEN connection that tells a node the epoch moved.
//! - `sealing`: what both engines do alike with no SQL in it (the row and its wrap, the
//!   KDF header digest, the KEK check, the manifest sealed and checked, the body of every
//!   change written through a `RowWriter`), so the database never sees a key.
//! - [`model`]: the key model's rules with no storage in them: the stored lifecycle and
//!   its allowed moves (explicit, not the order of the storage codes), transition and
//!   merge decisions, primary derivation, generation choice, the key-set digest.
//! - [`manifest`]: the authenticated list of the store's keys (ids, generations, states,
//!   epoch) under an HMAC key derived from the KEK, rewritten with every change and
//!   checked on open, so a deleted, added or rolled-back row is found.
//! - [`backup`]: the password-sealed backup file format (`docs/backup-format.md`).
//! - [`fsutil`]: private (0600), atomic file writes.
//! - [`audit`]: the audit log's keyed chain (line format, key, anchor, verifier), shared
//!   by the server that writes it and `ssoctl audit verify`.
//!
//! Data flows from an [`UnsealKey`] to a KEK that lives only inside an open
//! [`SealedStore`]; plaintext secrets leave the store only as
//! [`sso_proto::MasterSecret`]s in zeroizing boxes.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit;
pub mod backup;
pub mod fsutil;
pub mod manifest;
pub mod model;
pub mod postgres;
mod sealing;
pub mod storage;
pub mod store;
pub mod unseal;
pub mod validate;
mod wrap;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

use std::path::{Path, PathBuf};

use sso_proto::KeyId;

pub use audit::{AuditAnchor, AuditKey};
pub use backup::{BackupInfo, OpenedBackup, PendingBackup, RestorePlan};
pub use model::KeyRecord;
pub use storage::Store;
pub use store::{CreateOptions, Keyring, MergeReport, SealedStore, StoreStatus};
pub use unseal::{KdfParams, UnsealKey, UnsealKind};
pub use wrap::{BlobProblem, WRAPPED_LEN, decode_blob};

/// Everything that can go wrong with a store or a backup file.
///
/// Messages never contain key material, passphrases or raw file contents; each says what
/// to do next where there is something to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The storage engine (SQLite today) failed: the disk, the file or the database
    /// server, not the data. No engine's own error type appears here.
    #[error("store database error: {0}")]
    Storage(StorageError),
    /// `open` found no store at the path.
    #[error("no store at {}: create one first (ssoctl init)", .0.display())]
    StoreNotFound(PathBuf),
    /// `create` found something at the path already.
    #[error("{} already exists: refusing to overwrite a store", .0.display())]
    StoreExists(PathBuf),
    /// The passphrase or key file does not unseal this store. Nothing was written.
    #[error("wrong {} for this store: nothing was changed; check which secret belongs to this store", .0.noun())]
    WrongUnsealKey(UnsealKind),
    /// The store's key-derivation header (unseal kind, argon2 cost, salt, store id) no
    /// longer matches the digest written at creation: it was edited. Reported before the
    /// KDF runs, so an edited header is not mistaken for a wrong passphrase.
    #[error("the store's key-derivation header does not verify: it was edited; restore the store from a backup")]
    TamperedHeader,
    /// The store's manifest lists a key whose row is gone: the row was deleted outside the
    /// service. `more` counts the other missing keys.
    #[error(
        "the key {key_id} (generation {generation}, {state}) is missing from the store: its row was deleted{}; restore the store from a backup or resync from the peer",
        more_keys(.more)
    )]
    MissingKey {
        /// The missing key (the one with the highest generation, when several are).
        key_id: KeyId,
        /// Its generation, as the manifest records it.
        generation: u64,
        /// Its state, as the manifest records it.
        state: sso_proto::KeyState,
        /// How many other keys are missing too.
        more: usize,
    },
    /// The store was created with the other kind of unseal secret.
    #[error("this store is unsealed with {expected}, but {given} was supplied")]
    UnsealKindMismatch {
        /// What the store was created with.
        expected: UnsealKind,
        /// What the caller supplied.
        given: UnsealKind,
    },
    /// The store's schema is newer than this build understands.
    #[error("store schema version {found} is newer than this build supports ({supported}): upgrade the software")]
    UnsupportedSchema {
        /// Version found in the file.
        found: u32,
        /// Highest version this build knows.
        supported: u32,
    },
    /// The file is not a store this software wrote, or it is damaged.
    #[error("not a valid store: {0}")]
    NotAStore(String),
    /// Stored data failed an integrity check: edited, swapped or corrupted rows.
    #[error("integrity error{}: {detail}; restore from a backup or resync from the peer", key_id.map(|k| format!(" for key {k}")).unwrap_or_default())]
    Integrity {
        /// The key whose row failed, when one did.
        key_id: Option<KeyId>,
        /// What failed, without any secret data.
        detail: String,
    },
    /// A key arrived (from a peer or a backup) with the same id but different material or
    /// generation than stored. Refused; nothing was written.
    #[error("integrity alarm: key {0} arrived with different material than stored; nothing was merged")]
    ConflictingKey(KeyId),
    /// A staged key from the peer whose generation is not above every stored key: a
    /// rotation that did not see this node's newest key. Nothing was written.
    #[error(
        "key {key_id} has generation {generation}, not above this store's highest generation {max}; the rotation must choose again"
    )]
    StaleGeneration {
        /// The key concerned.
        key_id: KeyId,
        /// Its generation.
        generation: u64,
        /// The highest generation stored here.
        max: u64,
    },
    /// A key record is inconsistent (for example a served key without material).
    #[error("malformed key record for {key_id}: {detail}")]
    MalformedRecord {
        /// The key concerned.
        key_id: KeyId,
        /// What is wrong.
        detail: &'static str,
    },
    /// No key with that id is stored.
    #[error("no key {0} in this store")]
    KeyNotFound(KeyId),
    /// A state change that would move a key backwards.
    #[error("key {key_id} is {from}; it cannot become {to} (states only move forward)")]
    InvalidTransition {
        /// The key concerned.
        key_id: KeyId,
        /// Its current state.
        from: sso_proto::KeyState,
        /// The state asked for.
        to: sso_proto::KeyState,
    },
    /// A staged key was not promoted: on a store shared by several nodes, another node
    /// promoted a key of a higher generation while this one waited (its staging pause).
    /// Promoting it would make an acknowledged key that is never the primary. Nothing was
    /// changed; the staged key is an orphan its node's next rotation retires.
    #[error(
        "key {key_id} (generation {generation}) was not promoted: another node promoted the newer key {by} (generation {by_generation}) while it was staged; nothing was changed"
    )]
    Overtaken {
        /// The staged key that was not promoted.
        key_id: KeyId,
        /// Its generation.
        generation: u64,
        /// The promoted key above it (the highest).
        by: KeyId,
        /// That key's generation.
        by_generation: u64,
    },
    /// Retiring the key that currently encrypts would leave clients sealing with an older one.
    #[error("key {0} is the primary: rotate first, then retire it")]
    RetirePrimary(KeyId),
    /// A peer or a backup asked for a state change this store refuses (for example
    /// destroying the key that is primary here). Nothing was written.
    #[error("refused: key {key_id} {detail}; nothing was merged")]
    RefusedTransition {
        /// The key concerned.
        key_id: KeyId,
        /// Why.
        detail: &'static str,
    },
    /// The next generation would overflow: a key with an absurd generation is stored.
    #[error(
        "no generation is left above the highest stored key: retire the key with the highest generation (ssoctl keys retire --force-retire-primary) and restore the other keys into a new store"
    )]
    GenerationExhausted,
    /// Destroy asked for a key that is still in use.
    #[error("key {0} is not retired: retire it first and make sure nothing still needs it")]
    DestroyUnretired(KeyId),
    /// A secret-bearing file is readable or writable by group or others.
    #[error("{} has mode {mode:03o}: it must not be accessible by group or others; run chmod 600 on it", path.display())]
    InsecurePermissions {
        /// The file concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file has the wrong contents.
    #[error("key file {}: {problem}", path.display())]
    KeyFile {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A key in an environment variable has the wrong contents.
    #[error("environment variable {var}: {problem}")]
    KeyEnv {
        /// The variable.
        var: String,
        /// What is wrong with its value.
        problem: &'static str,
    },
    /// The named environment variable is not set (or not UTF-8).
    #[error("environment variable {0} is not set")]
    EnvVarMissing(String),
    /// An empty passphrase was supplied.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// A passphrase file is not UTF-8.
    #[error("the passphrase file is not valid UTF-8")]
    PassphraseNotUtf8,
    /// Reading from the terminal failed.
    #[error("could not read the passphrase from the terminal: {0}")]
    Prompt(std::io::Error),
    /// The key derivation function rejected its parameters.
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
    /// The file does not start like a backup file.
    #[error("not a backup file (no SSO backup header)")]
    NotABackup,
    /// A backup written by a newer release.
    #[error("backup format version {0} is not supported by this build: use the release that wrote it, or a newer one")]
    UnsupportedBackupVersion(u8),
    /// The backup file ends early.
    #[error("backup file is truncated: {actual} bytes, the header declares {expected}; the copy is incomplete")]
    BackupTruncated {
        /// Length the header declares.
        expected: u64,
        /// Length found.
        actual: u64,
    },
    /// The backup's structure is invalid.
    #[error("backup file is malformed: {0}")]
    BackupMalformed(&'static str),
    /// The password does not open this backup. Nothing was restored.
    #[error("wrong backup password: nothing was restored (the file's hint may help)")]
    WrongBackupPassword,
    /// The password is right but the contents fail authentication: the file was changed.
    #[error("backup file failed authentication: it was modified or corrupted; nothing was restored")]
    BackupTampered,
}

fn more_keys(more: &usize) -> String {
    match *more {
        0 => String::new(),
        1 => " (and 1 more key)".into(),
        n => format!(" (and {n} more keys)"),
    }
}

impl Error {
    /// Whether this error means stored data failed an integrity check (an alarm, not a
    /// mistake by the caller).
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            Self::Integrity { .. } | Self::MissingKey { .. } | Self::TamperedHeader | Self::ConflictingKey(_)
        )
    }

    /// When this error means the store's file system refused a write or a read (disk
    /// full, read-only, an I/O error, the file gone): what happened and what to do, for an
    /// operator. `None` for every other error.
    pub fn store_fault(&self) -> Option<StoreFault> {
        match self {
            Self::Storage(e) => e.fault.clone(),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A failure of the storage engine, in words: what the engine said, what to do, and
/// whether it is a [`StoreFault`] (the file system refused a read or a write). Engines
/// build it; callers read it and never see the engine's own error type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageError {
    detail: String,
    remedy: &'static str,
    fault: Option<StoreFault>,
}

impl StorageError {
    /// An engine failure: `detail` is the engine's own words (never key material),
    /// `remedy` what the operator should do, `fault` set when the file system refused.
    pub fn new(detail: impl Into<String>, remedy: &'static str, fault: Option<StoreFault>) -> Self {
        Self {
            detail: detail.into(),
            remedy,
            fault,
        }
    }

    /// What the engine said.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// What the operator should do.
    pub fn remedy(&self) -> &'static str {
        self.remedy
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.detail, self.remedy)
    }
}

/// A store the file system will not let the service write (or read): the cause, SQLite's
/// own words for it, and the remedy. Shown as "the store could not be written: disk full
/// (database or disk is full); free space on the store's filesystem".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFault {
    /// The cause in a few words: `disk full`, `read-only`, `I/O error`.
    pub what: &'static str,
    /// What SQLite said.
    pub detail: String,
    /// What the operator should do.
    pub remedy: &'static str,
}

/// How a [`StoreFault`] begins when displayed.
const FAULT_PREFIX: &str = "the store could not be written: ";

/// How the `what` of every database-server fault begins (`database unreachable`,
/// `database refused`): see [`StoreFault::is_database_outage`].
pub const DATABASE_FAULT: &str = "database ";

impl StoreFault {
    /// Whether the store's database server is down, unreachable or refusing for now (a
    /// PostgreSQL outage): nothing on this host needs fixing and the call works again once
    /// the database is back, so it is "unavailable", not a disk to fix. `false` for a file
    /// system that refused (disk full, read-only, I/O error).
    pub fn is_database_outage(&self) -> bool {
        self.what.starts_with(DATABASE_FAULT)
    }

    /// [`Self::is_database_outage`] read back from a fault as displayed: the `message` of
    /// a server's 503 `store_unavailable`, which is how ssoctl tells a database that is
    /// down from a disk to fix.
    pub fn message_is_database_outage(message: &str) -> bool {
        message
            .strip_prefix(FAULT_PREFIX)
            .is_some_and(|rest| rest.starts_with(DATABASE_FAULT))
    }
}

impl std::fmt::Display for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{FAULT_PREFIX}{} ({}); {}", self.what, self.detail, self.remedy)
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod fault_tests {
    use super::StoreFault;

    fn fault(what: &'static str) -> StoreFault {
        StoreFault {
            what,
            detail: "detail".into(),
            remedy: "remedy",
        }
    }

    #[test]
    fn a_database_fault_is_an_outage_as_itself_and_as_displayed_and_a_disk_fault_is_not() {
        for what in ["database unreachable", "database refused"] {
            assert!(fault(what).is_database_outage(), "{what}");
            assert!(
                StoreFault::message_is_database_outage(&fault(what).to_string()),
                "{what}"
            );
        }
        for what in ["disk full", "read-only", "I/O error"] {
            assert!(!fault(what).is_database_outage(), "{what}");
            assert!(
                !StoreFault::message_is_database_outage(&fault(what).to_string()),
                "{what}"
            );
        }
        assert!(!StoreFault::message_is_database_outage("database unreachable"));
    }
}
