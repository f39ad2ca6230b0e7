//! `ssoctl`: the operator CLI. Offline commands work on files (a new store, backup hints,
//! certificates, the audit log); online commands talk to a server over mTLS.
//!
//! # Layout
//! - [`cli`]: the clap definition (global connection flags, subcommands).
//! - [`Failure`]: every error with its exit code and a hint; printed as `error:` + `hint:`.
//! - `rewrap`: re-sealing envelope files under the primary, atomically per file.
//! - `online`: the mTLS connection (`--server`/`--ca`/`--cert`/`--key` or `--dev DIR`).
//! - `commands`: one function per subcommand; human output by default, `--json` for
//!   machines.
//! - `doctor`: the checklist of `ssoctl doctor`.
//! - `answers`: the servers' answers read for people (shared by `commands` and `doctor`).
//!
//! Exit codes: 0 success, 1 and 2 `ssoctl doctor` found warnings only / a failure,
//! 64 usage, 65 integrity or damaged data, 66 not found, 69 unavailable (a server, the
//! peer, or the store's database down), 70 internal, 74 the server's store cannot be
//! written (disk full, read-only, I/O error), 77 authentication or permission denied. docs/operations.md has
//! the table with remedies.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod answers;
pub mod cli;
mod commands;
mod doctor;
mod online;
mod rewrap;

use std::fmt;

pub use commands::run;

/// Exit code of `ssoctl doctor`: warnings only (something to act on soon), nothing failed.
pub const EX_DOCTOR_WARN: u8 = 1;
/// Exit code of `ssoctl doctor`: at least one check failed (act now).
pub const EX_DOCTOR_FAIL: u8 = 2;
/// Exit code: bad usage or configuration.
pub const EX_USAGE: u8 = 64;
/// Exit code: integrity failure or damaged input (tampered backup, conflicting keys).
pub const EX_DATAERR: u8 = 65;
/// Exit code: something named does not exist (key, file, store).
pub const EX_NOINPUT: u8 = 66;
/// Exit code: no server could be reached, or the store's database is down (PostgreSQL:
/// waiting, or bringing it back, helps).
pub const EX_UNAVAILABLE: u8 = 69;
/// Exit code: internal error.
pub const EX_SOFTWARE: u8 = 70;
/// Exit code: the server's store cannot be written (disk full, read-only, I/O error;
/// error code `store_unavailable`). Distinct from 69: waiting does not help, someone must
/// fix the disk. A `store_unavailable` whose cause is the database server (down,
/// unreachable) is 69 instead.
pub const EX_IOERR: u8 = 74;
/// Exit code: a temporary refusal (EX_TEMPFAIL): the rotation was overtaken or held off by
/// another one (409 `rotation_busy`, `rotation_refused`), or the same request is still
/// running (409 `in_progress`). Nothing was acknowledged; running it again is the remedy.
pub const EX_TEMPFAIL: u8 = 75;
/// Exit code: authentication or permission denied (wrong password, certificate refused,
/// 403).
pub const EX_NOPERM: u8 = 77;

/// A failed command: what happened, what to do, and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// What went wrong.
    pub message: String,
    /// The remedy.
    pub hint: String,
}

impl Failure {
    /// A failure with a code, a message and a hint.
    pub fn new(code: u8, message: impl fmt::Display, hint: impl fmt::Display) -> Self {
        Self {
            code,
            message: message.to_string(),
            hint: hint.to_string(),
        }
    }

    /// The stable name of the exit code, for `--json`.
    pub fn kind(&self) -> &'static str {
        match self.code {
            EX_USAGE => "usage",
            EX_DATAERR => "integrity",
            EX_NOINPUT => "not_found",
            EX_UNAVAILABLE => "unavailable",
            EX_IOERR => "store_unavailable",
            EX_NOPERM => "denied",
            EX_DOCTOR_WARN => "doctor_warn",
            EX_DOCTOR_FAIL => "doctor_fail",
            _ => "internal",
        }
    }
}

impl From<keystore::Error> for Failure {
    fn from(e: keystore::Error) -> Self {
        use keystore::Error as E;
        let (code, hint) = match &e {
            E::WrongUnsealKey(_) | E::UnsealKindMismatch { .. } => {
                (EX_NOPERM, "use the passphrase or key file this store was created with")
            }
            E::WrongBackupPassword => (
                EX_NOPERM,
                "check the password; `ssoctl backup-hint FILE` shows the hint stored with it",
            ),
            E::BackupTampered | E::BackupTruncated { .. } | E::BackupMalformed(_) | E::NotABackup => {
                (EX_DATAERR, "the file is damaged or not a backup: use another copy")
            }
            E::UnsupportedBackupVersion(_) | E::UnsupportedSchema { .. } => {
                (EX_DATAERR, "use the release that wrote it, or a newer one")
            }
            E::TamperedHeader => (
                EX_DATAERR,
                "stop and investigate: restore the store from a backup (the passphrase was not tried)",
            ),
            E::Integrity { .. } | E::MissingKey { .. } | E::ConflictingKey(_) => (
                EX_DATAERR,
                "stop and investigate: restore from a backup or resync from the peer",
            ),
            E::StoreNotFound(_) | E::KeyNotFound(_) => (EX_NOINPUT, "check the path or key id"),
            E::StoreExists(_) => (EX_USAGE, "choose a new path; init never overwrites a store"),
            E::InsecurePermissions { .. } => (EX_NOPERM, "chmod 600 the file, then retry"),
            E::EnvVarMissing(_) | E::EmptyPassphrase | E::KeyFile { .. } | E::KeyEnv { .. } => (
                EX_USAGE,
                "pass the secret with --password-file, the environment variable, or at the prompt",
            ),
            E::Io { .. } => (EX_NOINPUT, "check the path and its permissions"),
            // The store's database is down or unreachable: unavailable, as a server that is
            // down (SPEC 8); waiting helps. A disk that refused needs fixing (74).
            E::Storage(_) => match e.store_fault() {
                Some(fault) if fault.is_database_outage() => (
                    EX_UNAVAILABLE,
                    "nothing was changed; start the database or fix the way to it as the message says, then run the command again",
                ),
                Some(_) => (
                    EX_IOERR,
                    "nothing was changed; fix the store's filesystem as the message says, then run the command again",
                ),
                None => (EX_SOFTWARE, "see the message above"),
            },
            _ => (EX_SOFTWARE, "see the message above"),
        };
        Self::new(code, e, hint)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.message)?;
        if !self.hint.is_empty() {
            write!(f, "\nhint: {}", self.hint)?;
        }
        Ok(())
    }
}
