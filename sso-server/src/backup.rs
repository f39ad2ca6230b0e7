//! Backup and restore as domain logic, with no HTTP: the sequencing of a backup (export
//! under the store lock, the KDF and the seal without it, confirm under it, so the key set
//! is marked backed up only once the file exists) and of a restore (one anti-entropy round
//! first, so the node knows every destruction the pair knows; the KDF without the lock;
//! the plan; then the forward-only merge, or a refusal when the peer could not be asked
//! and the backup would add keys the pair may have destroyed). Results are domain types
//! ([`BackedUp`], [`Restored`], [`BackupError`]) that `api` maps to HTTP.
//!
//! Imports `state` and `replication`; nothing imports it but `api`.

use std::sync::Arc;

use secrecy::SecretString;
use time::OffsetDateTime;

use crate::state::AppState;

/// The shortest backup password accepted.
pub const MIN_PASSWORD_LEN: usize = 8;

/// Why a backup or a restore did not happen.
#[derive(Debug)]
pub enum BackupError {
    /// The password is shorter than [`MIN_PASSWORD_LEN`].
    ShortPassword,
    /// The store, the backup file or its password refused.
    Store(keystore::Error),
    /// The peer could not be asked first, and the backup would add `unknown` keys the pair
    /// may have destroyed: nothing was restored.
    Unconfirmed {
        /// How many keys the backup would add.
        unknown: usize,
    },
    /// A blocking task ended without an answer (it panicked).
    Internal,
}

impl From<keystore::Error> for BackupError {
    fn from(e: keystore::Error) -> Self {
        Self::Store(e)
    }
}

/// A backup written and recorded: the sealed file (no plaintext secrets in it).
#[derive(Debug)]
pub struct BackedUp {
    /// The backup file's contents.
    pub bytes: Vec<u8>,
}

/// Seals every key into a backup file under `password`, then records the keys as backed
/// up. The KDF runs without the store lock.
pub async fn back_up(state: &Arc<AppState>, password: SecretString, hint: String) -> Result<BackedUp, BackupError> {
    if secrecy::ExposeSecret::expose_secret(&password).len() < MIN_PASSWORD_LEN {
        return Err(BackupError::ShortPassword);
    }
    let (records, node) = publishing(state, |store| Ok((store.export()?, store.node().to_owned()))).await?;
    let pending = tokio::task::spawn_blocking(move || {
        keystore::backup::seal_pending(&records, &password, &hint, &node, keystore::KdfParams::default())
    })
    .await
    .map_err(|_| BackupError::Internal)??;
    let bytes = publishing(state, move |store| {
        store.confirm_backup(&pending)?;
        Ok(pending.bytes)
    })
    .await?;
    Ok(BackedUp { bytes })
}

/// How a restore is asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreMode {
    /// Only work out the plan; change nothing.
    pub dry_run: bool,
    /// Restore although the peer could not be asked first.
    pub force: bool,
}

/// What a restore found before it changed anything.
#[derive(Debug, Clone)]
pub struct Planned {
    /// When the backup was written.
    pub backup_created_at: OffsetDateTime,
    /// What the merge does (or would do) with each key of the backup.
    pub plan: keystore::RestorePlan,
    /// Whether the peer answered the anti-entropy round first (`None`: no peer).
    pub peer_checked: Option<bool>,
}

/// What a restore did.
#[derive(Debug)]
pub enum Restored {
    /// A dry run: the plan, nothing changed.
    DryRun(Planned),
    /// The backup was merged (forward only: a key the node knows destroyed stays so).
    Merged {
        /// The plan it followed.
        planned: Planned,
        /// What the merge changed.
        report: keystore::MergeReport,
    },
}

/// What a restore does once the backup is opened and planned: the one decision of the
/// restore that is not the store's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Report the plan only.
    DryRun,
    /// Merge the backup.
    Merge,
    /// Refuse: the peer was not asked and the backup would add keys it may have destroyed.
    Unconfirmed,
}

/// Decides what a restore does with its plan: a dry run reports; a restore that would
/// add keys while the peer could not be asked first is refused unless forced (the pair
/// may have destroyed them); anything else merges.
pub fn decide(plan: &keystore::RestorePlan, peer_checked: Option<bool>, mode: RestoreMode) -> Decision {
    if mode.dry_run {
        Decision::DryRun
    } else if peer_checked == Some(false) && !plan.unknown.is_empty() && !mode.force {
        Decision::Unconfirmed
    } else {
        Decision::Merge
    }
}

/// Restores the backup file `file`: one anti-entropy round with the peer first, the KDF
/// without the store lock, the plan, then [`decide`] and the merge.
pub async fn restore(
    state: &Arc<AppState>,
    file: Vec<u8>,
    password: SecretString,
    mode: RestoreMode,
) -> Result<Restored, BackupError> {
    // First learn what the pair knows: a node that does not yet know of a destruction
    // (a fresh node, say) would otherwise take the key's material back from an older
    // backup. The forward-only merge keeps a known destruction.
    let peer_checked = match &state.peer {
        Some(peer) => Some(crate::replication::sync_now(state, peer).await.is_ok()),
        None => None,
    };
    let opened = tokio::task::spawn_blocking(move || keystore::backup::open_file(&file, &password))
        .await
        .map_err(|_| BackupError::Internal)??;
    let backup_created_at = opened.created_at();
    let (plan, opened) = publishing(state, move |store| Ok((store.restore_plan(&opened)?, opened))).await?;
    let planned = Planned {
        backup_created_at,
        plan,
        peer_checked,
    };
    match decide(&planned.plan, peer_checked, mode) {
        Decision::DryRun => Ok(Restored::DryRun(planned)),
        Decision::Unconfirmed => Err(BackupError::Unconfirmed {
            unknown: planned.plan.unknown.len(),
        }),
        Decision::Merge => {
            let report = publishing(state, move |store| store.restore_opened(&opened)).await?;
            Ok(Restored::Merged { planned, report })
        }
    }
}

/// [`AppState::publishing`], its panic as [`BackupError::Internal`].
async fn publishing<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&mut dyn keystore::Store) -> keystore::Result<T> + Send + 'static,
) -> Result<T, BackupError> {
    state
        .publishing(f)
        .await
        .ok_or(BackupError::Internal)?
        .map_err(BackupError::Store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(unknown: usize) -> keystore::RestorePlan {
        keystore::RestorePlan {
            destroyed: Vec::new(),
            unknown: (0..unknown as u8)
                .map(|i| sso_proto::KeyId::from_bytes([i; 16]))
                .collect(),
            known: 1,
        }
    }

    /// The restore's decision, apart from the store and the peer: a peer that could not be
    /// asked refuses only a restore that adds keys, and only unforced; a dry run changes
    /// nothing whatever the peer said.
    #[test]
    fn a_restore_that_would_add_keys_unasked_is_refused_unless_forced() {
        let plain = RestoreMode::default();
        let forced = RestoreMode { force: true, ..plain };
        let dry = RestoreMode { dry_run: true, ..plain };
        assert_eq!(decide(&plan(2), Some(false), plain), Decision::Unconfirmed);
        assert_eq!(decide(&plan(2), Some(false), forced), Decision::Merge);
        assert_eq!(decide(&plan(2), Some(false), dry), Decision::DryRun);
        assert_eq!(decide(&plan(0), Some(false), plain), Decision::Merge);
        assert_eq!(decide(&plan(2), Some(true), plain), Decision::Merge);
        assert_eq!(decide(&plan(2), None, plain), Decision::Merge);
    }
}
