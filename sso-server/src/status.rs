//! What the admin status (`GET /v1/admin/status`) says of this node and the pair, as
//! domain logic with no HTTP: one anti-entropy round with the peer first, so the answer
//! describes the pair as it is and not as the last periodic round saw it; the store's
//! status; and the pair's backup coverage, since a key backed up through either node is in
//! a backup ([`merge_coverage`]); and this node's own coverage, which the peer asks for
//! ([`own_coverage`]). The result is a domain type ([`NodeStatus`]) that `api`
//! maps to `sso_proto::wire::answers::StatusAnswer`, with the health, audit head and peer
//! view it reads from memory.
//!
//! Imports `state` and `replication`; nothing imports it but `api`.

use std::sync::Arc;

use keystore::StoreStatus;
use time::OffsetDateTime;

use crate::replication::SyncError;
use crate::state::{AppState, ReadError};

/// Whose backups the status's backup section counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupCoverage {
    /// No peer is configured: this node's backups.
    Node,
    /// A peer is configured and did not answer: this node's backups only.
    NodeOnlyPeerUnreachable,
    /// Both nodes' backups.
    Pair,
}

impl BackupCoverage {
    /// The answer's `backup.coverage`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::NodeOnlyPeerUnreachable => "node_only_peer_unreachable",
            Self::Pair => "pair",
        }
    }
}

/// The store's status, with its backup fields made the pair's when the peer answered.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// The store's status; `not_backed_up` and `last_backup_at` cover what `coverage` says.
    pub store: StoreStatus,
    /// Whose backups those are.
    pub coverage: BackupCoverage,
}

/// This node's status: an anti-entropy round and the peer's backup coverage first (a peer
/// that did not answer the round is not asked again, so status stays fast), then the
/// store's status, merged with that coverage.
pub async fn node_status(state: &Arc<AppState>) -> Result<NodeStatus, ReadError> {
    let theirs = match &state.peer {
        Some(peer) => match crate::replication::sync_now(state, peer).await {
            Err(SyncError::Other(_)) => None,
            _ => peer.coverage().await,
        },
        None => None,
    };
    let mut store = state.reading(|store| store.status()).await?;
    let coverage = match (&state.peer, theirs) {
        (None, _) => BackupCoverage::Node,
        (Some(_), None) => BackupCoverage::NodeOnlyPeerUnreachable,
        (Some(_), Some(theirs)) => {
            merge_coverage(&mut store, &theirs);
            BackupCoverage::Pair
        }
    };
    Ok(NodeStatus { store, coverage })
}

/// What this node's own backups cover (the peer's side of the pair's coverage, `GET
/// /v1/peer/coverage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCoverage {
    /// Keys a backup written from (or restored into) this store covers.
    pub backed_up: Vec<sso_proto::KeyId>,
    /// When a backup was last written from this store.
    pub last_backup_at: Option<OffsetDateTime>,
}

/// What this node's own backups cover. Read through [`AppState::publishing`], as this
/// answer always was (it republishes the snapshot and marks a store fault in the health,
/// where [`AppState::reading`] would do neither).
pub async fn own_coverage(state: &Arc<AppState>) -> Result<OwnCoverage, ReadError> {
    let status = state
        .publishing(|store| store.status())
        .await
        .ok_or(ReadError::Panicked)?
        .map_err(ReadError::Store)?;
    Ok(OwnCoverage {
        backed_up: status.backed_up,
        last_backup_at: status.last_backup_at,
    })
}

/// Makes `status`'s backup fields the pair's: a key the peer's backups cover is backed up,
/// and the last backup is the later of the two nodes'. (`fuzz_targets/peer_coverage.rs`
/// runs `theirs` from outside input through it.)
pub fn merge_coverage(status: &mut StoreStatus, theirs: &sso_proto::wire::Coverage) {
    status.not_backed_up.retain(|id| !theirs.backed_up.contains(id));
    let their_last = theirs
        .last_backup_unix
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
    status.last_backup_at = status.last_backup_at.max(their_last);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sso_proto::KeyId;

    fn id(n: u8) -> KeyId {
        KeyId::from_bytes([n; 16])
    }

    fn ours(last: Option<i64>) -> StoreStatus {
        StoreStatus {
            node: "a".into(),
            store_id: "s".into(),
            epoch: 4,
            primary: Some(id(3)),
            keys: Vec::new(),
            not_backed_up: vec![id(1), id(2), id(3)],
            backed_up: Vec::new(),
            last_backup_at: last.map(|t| OffsetDateTime::from_unix_timestamp(t).unwrap()),
            unseal_kind: keystore::UnsealKind::KeyFile,
            shared_database: None,
        }
    }

    /// Our status (last backup at `ours`) merged with the peer's coverage.
    fn merged(ours_last: Option<i64>, backed_up: Vec<KeyId>, theirs_last: Option<i64>) -> StoreStatus {
        let mut status = ours(ours_last);
        let theirs = sso_proto::wire::Coverage {
            backed_up,
            last_backup_unix: theirs_last,
        };
        merge_coverage(&mut status, &theirs);
        status
    }

    fn last(status: &StoreStatus) -> Option<i64> {
        status.last_backup_at.map(OffsetDateTime::unix_timestamp)
    }

    /// A key the peer backed up is covered; the last backup is the later of the two; a
    /// time the peer sends that is no date leaves ours.
    #[test]
    fn the_pairs_backups_cover_what_either_node_backed_up() {
        let status = merged(Some(100), vec![id(2), id(9)], Some(200));
        assert_eq!(status.not_backed_up, vec![id(1), id(3)]);
        assert_eq!(last(&status), Some(200));
        let status = merged(Some(300), Vec::new(), Some(200));
        assert_eq!((status.not_backed_up.len(), last(&status)), (3, Some(300)));
        assert_eq!(last(&merged(None, Vec::new(), Some(i64::MAX))), None);
        assert_eq!(last(&merged(None, Vec::new(), Some(50))), Some(50));
        assert_eq!(last(&merged(Some(70), Vec::new(), None)), Some(70));
    }

    #[test]
    fn coverage_keeps_its_wire_names() {
        assert_eq!(BackupCoverage::Node.as_str(), "node");
        assert_eq!(
            BackupCoverage::NodeOnlyPeerUnreachable.as_str(),
            "node_only_peer_unreachable"
        );
        assert_eq!(BackupCoverage::Pair.as_str(), "pair");
    }
}
