//! Replication across the pair as domain logic: anti-entropy (pull the peer's key set
//! unless the digests match, merge it, report whether both sets are equal), its server
//! side ([`keys_answer`]), and the server's periodic and on-demand rounds with their
//! metrics and integrity alarms. The transport and the wire format are `peer`'s; the
//! rotation protocol is `rotation`'s. The round ([`anti_entropy_round`]) is generic over the
//! local node and a [`KeySource`], so the simulation in `sso-server/tests/sim.rs` runs it
//! too.
//!
//! Also the merge of a key set the peer pushed ([`merge_pushed`]), the pushes of one key's change after an operator's retire or destroy
//! ([`push_key`]) and the check that a staged key is not the peer's primary before it is
//! retired ([`ask_the_peer_before_retiring`]): domain results that `api` maps to HTTP.
//!
//! Imports `state`, `peer`, `rotation` and `audit`; nothing imports it but `api` and
//! `server`.

use std::future::Future;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::peer::{Peer, PeerError, PeerKeys};
use crate::rotation::LocalNode;
use crate::state::{AppState, ReadError};

/// The server side of `GET /v1/peer/keys?digest=D`: `None` when `their_digest` equals this
/// store's digest (in sync), else every key, serialised (the HTTP handler in the server, a
/// simulated link in `sso-server/tests/sim.rs`).
pub fn keys_answer(
    store: &dyn keystore::Store,
    node: &str,
    their_digest: &str,
) -> keystore::Result<Option<Zeroizing<Vec<u8>>>> {
    let digest = store.digest()?;
    if digest == their_digest {
        return Ok(None);
    }
    let records = store.export()?;
    Ok(Some(sso_proto::wire::records_json(
        node,
        store.epoch()?,
        &digest,
        &records,
    )))
}

/// This node's side of the peer's pull (`GET /v1/peer/keys?digest=D`): [`keys_answer`]
/// on the store, read without republishing anything.
pub async fn serve_keys(state: &Arc<AppState>, their_digest: String) -> Result<Option<Zeroizing<Vec<u8>>>, ReadError> {
    let node = state.node.clone();
    state
        .reading(move |store| keys_answer(store, &node, &their_digest))
        .await
}

/// Where one key's change stands after [`push_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// No peer is configured.
    Standalone,
    /// The peer merged it durably.
    Replicated,
    /// The peer did not take it now; anti-entropy will carry it.
    Pending,
}

impl Pushed {
    /// The answer's `replication` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Replicated => "replicated",
            Self::Pending => "pending",
        }
    }
}

/// Pushes one key's current record to the peer (after an operator's retire or destroy),
/// so the change reaches it now rather than at the next anti-entropy round.
pub async fn push_key(state: &Arc<AppState>, id: sso_proto::KeyId) -> Pushed {
    let Some(peer) = state.peer.clone() else {
        return Pushed::Standalone;
    };
    let record = state
        .reading(move |store| store.export().map(|all| all.into_iter().find(|r| r.meta.key_id == id)))
        .await;
    let Ok(Some(record)) = record else {
        return Pushed::Pending;
    };
    match peer.push(&state.node, state.snapshot.load().epoch, &[record]).await {
        Ok(_) => Pushed::Replicated,
        Err(e) => {
            state
                .metrics
                .replication_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "state change not replicated yet; anti-entropy will retry");
            Pushed::Pending
        }
    }
}

/// Why an operator's retire of a staged key was refused before anything changed.
#[derive(Debug)]
pub enum RetireCheck {
    /// The store could not say what the key is.
    Store(keystore::Error),
    /// The key is staged here and the peer could not be asked about it.
    PeerUnreachable(String),
}

/// A key staged here may be the peer's primary: a degraded rotation there whose stage
/// arrived and whose promote did not, with clients sealing under it. Retiring it here would
/// reach the peer by replication and strand them (docs/pair.md, invariant O). So before an
/// operator's retire of a staged key, one anti-entropy round brings the peer's state of it
/// (a promotion moves it forward here, and the retire then applies to what it really is);
/// a peer out of reach refuses the retire with nothing changed.
pub async fn ask_the_peer_before_retiring(state: &Arc<AppState>, id: sso_proto::KeyId) -> Result<(), RetireCheck> {
    let Some(peer) = &state.peer else { return Ok(()) };
    let staged = state
        .with_store(move |store| Ok(store.key_meta(id)?.state == sso_proto::KeyState::Staged))
        .await
        .map_err(RetireCheck::Store)?;
    if !staged {
        return Ok(());
    }
    match sync_now(state, peer).await {
        Ok(()) | Err(SyncError::Alarm(_)) => Ok(()),
        Err(SyncError::Other(e)) => Err(RetireCheck::PeerUnreachable(e)),
    }
}

/// What a key set the peer pushed (`POST /v1/peer/merge`) did here.
#[derive(Debug)]
pub struct Merged {
    /// The pushing node.
    pub from: String,
    /// The answer: what changed, and this node's epoch and digest afterwards.
    pub answer: sso_proto::wire::MergeAnswer,
}

/// Merges a key set the peer pushed (union by key id, states forward only), durably,
/// before the peer is answered. A key id that arrives with other material is an
/// integrity alarm, counted here; nothing of that key is written.
pub async fn merge_pushed(state: &Arc<AppState>, incoming: PeerKeys) -> keystore::Result<Merged> {
    let records = incoming.records;
    let result = state
        .with_store(move |store| {
            let report = store.merge(&records)?;
            Ok((report, store.digest()?))
        })
        .await;
    if let Err(e) = &result {
        state.metrics.count_if_integrity(e);
    }
    let (report, digest) = result?;
    Ok(Merged {
        from: incoming.node,
        answer: sso_proto::wire::MergeAnswer {
            added: report.added,
            advanced: report.advanced,
            digest,
            epoch: report.epoch,
        },
    })
}

/// Anti-entropy: pull the peer's key set every interval and merge it. Both nodes run
/// this, so after a restart, a partition or a wiped store each converges to the union
/// within one interval of the peer answering again.
pub async fn sync_loop(state: Arc<AppState>) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(peer) = state.peer.clone() else { return };
    let mut last_alarm: Option<String> = None;
    loop {
        let outcome = sync_once(&state, &peer).await;
        let ps = peer.status();
        match outcome {
            Ok(()) => last_alarm = None,
            Err(SyncError::Alarm(problem)) => {
                // An alarm repeats every interval until an operator acts; count and audit
                // it once per distinct problem.
                if last_alarm.as_deref() != Some(problem.as_str()) {
                    state.metrics.integrity_alarms.fetch_add(1, Relaxed);
                    tracing::error!(%problem, "integrity alarm during anti-entropy: the conflicting keys were not merged");
                    state.audit.record(crate::audit::AuditEvent {
                        time: std::time::SystemTime::now(),
                        identity: ps.node.clone().unwrap_or_else(|| "peer".into()).into(),
                        cert: None,
                        role: "peer",
                        op: "peer.sync",
                        key_id: None,
                        outcome: "integrity_alarm",
                        detail: Some(problem.clone()),
                        peer: None,
                    });
                    peer.alarm(&problem);
                    last_alarm = Some(problem);
                }
            }
            Err(SyncError::Other(e)) => {
                tracing::debug!(error = %e, "anti-entropy round failed");
            }
        }
        tokio::time::sleep(peer.interval).await;
    }
}

/// An anti-entropy round that did not finish.
#[derive(Debug)]
pub enum SyncError {
    /// The peer holds other material (or generation) under some of our key ids: those
    /// were not merged, every other key was.
    Alarm(String),
    /// Anything else (unreachable peer, store error): retried next interval.
    Other(String),
}

/// What one anti-entropy round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Our epoch afterwards.
    pub epoch: u64,
    /// Whether the two key sets were equal afterwards (equal digests).
    pub in_sync: bool,
    /// Keys the peer had and we did not.
    pub added: usize,
    /// Keys whose state moved forward here.
    pub advanced: usize,
}

/// Where anti-entropy pulls the peer's key set from: the peer over mTLS in the server, a
/// simulated link in the deterministic simulation (`sso-server/tests/sim.rs`).
pub trait KeySource: Sync {
    /// The peer's key set, or `None` when its digest equals `local_digest`.
    fn pull_keys(&self, local_digest: &str) -> impl Future<Output = Result<Option<PeerKeys>, PeerError>> + Send;
}

impl KeySource for Peer {
    async fn pull_keys(&self, local_digest: &str) -> Result<Option<PeerKeys>, PeerError> {
        self.pull(local_digest).await
    }
}

/// One anti-entropy round: pull the peer's key set unless the digests match, merge it
/// (union by key id, states forward only), and report whether both sets are now equal.
pub async fn anti_entropy_round<N: LocalNode, S: KeySource>(local: &N, source: &S) -> Result<Round, SyncError> {
    let (digest, epoch) = local
        .with_store(|store| Ok((store.digest()?, store.epoch()?)))
        .await
        .map_err(|e| SyncError::Other(e.to_string()))?;
    let Some(keys) = source
        .pull_keys(&digest)
        .await
        .map_err(|e| SyncError::Other(e.to_string()))?
    else {
        return Ok(Round {
            epoch,
            in_sync: true,
            added: 0,
            advanced: 0,
        });
    };
    let theirs = keys.digest.clone();
    let merged = local
        .with_store(move |store| {
            let (report, conflicts) = store.merge_skipping_conflicts(&keys.records)?;
            Ok((report, conflicts, store.digest()?, store.epoch()?))
        })
        .await;
    match merged {
        Ok((report, conflicts, ours, epoch)) => {
            if report.changed() {
                tracing::info!(
                    added = report.added,
                    advanced = report.advanced,
                    "anti-entropy merged the peer's keys"
                );
            }
            if !conflicts.is_empty() {
                // Names the key ids only (never material): the same conflict gives the same
                // text every round, so the alarm is raised once per problem.
                let ids: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
                return Err(SyncError::Alarm(format!(
                    "the peer holds other material (or another generation) under key id {}: not merged; every other key was",
                    ids.join(", ")
                )));
            }
            Ok(Round {
                epoch,
                in_sync: ours == theirs,
                added: report.added,
                advanced: report.advanced,
            })
        }
        Err(e @ keystore::Error::ConflictingKey(_)) => Err(SyncError::Alarm(e.to_string())),
        Err(e) => Err(SyncError::Other(e.to_string())),
    }
}

/// One anti-entropy round now, bounded by twice the peer timeout: what status and restore
/// run first, so that "lag" is the peer's view at the time of asking (not at the last
/// periodic round, which missed a rotation's stage and promote), and a restore knows every
/// destruction the peer knows before it merges a backup.
pub async fn sync_now(state: &Arc<AppState>, peer: &Peer) -> Result<(), SyncError> {
    match tokio::time::timeout(peer.timeout * 2, sync_once(state, peer)).await {
        Ok(r) => r,
        Err(_) => Err(SyncError::Other("the peer did not answer in time".into())),
    }
}

/// One anti-entropy round, periodic or asked for (status); either way the peer gauges
/// show what it learned.
async fn sync_once(state: &Arc<AppState>, peer: &Peer) -> Result<(), SyncError> {
    let outcome = anti_entropy_round(state, peer).await.map(|round| {
        if round.in_sync {
            peer.synced(round.epoch);
        }
    });
    publish_peer_metrics(state, peer);
    outcome
}

/// Sets `sso_peer_up`, `sso_peer_last_contact_seconds` and `sso_peer_lag_epochs` from
/// what this node knows of its peer now.
fn publish_peer_metrics(state: &AppState, peer: &Peer) {
    use std::sync::atomic::Ordering::Relaxed;
    let ps = peer.status();
    state.metrics.peer_up.store(i64::from(ps.up), Relaxed);
    if let Some(t) = ps.last_contact {
        state.metrics.peer_last_contact_unix.store(t.unix_timestamp(), Relaxed);
    }
    let local = state.snapshot.load().epoch;
    state.metrics.peer_lag_epochs.store(
        ps.synced_local_epoch.map_or(local, |e| local.saturating_sub(e)),
        Relaxed,
    );
}
