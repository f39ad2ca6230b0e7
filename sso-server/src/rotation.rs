//! Rotation across the pair, as domain logic: no HTTP, no JSON. The server drives it with
//! its store and its [`crate::peer::Peer`]; the deterministic simulation drives the same
//! code over a simulated network. The protocol and its invariants are in docs/pair.md.
//!
//! In short: a rotation holds its node's *rotation lease* and the peer's, learns the
//! peer's highest generation, chooses its generation inside the local write transaction
//! (above both nodes' keys), stages the key on the peer (which refuses a generation not
//! above its own keys), waits for watchers, promotes on the peer, then here, and answers
//! `replicated` only when both nodes reported the new key as their primary.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use keystore::{KeyRecord, Store};
use sso_proto::{KeyId, KeyMeta, KeyState, MasterSecret};
use tokio::time::Instant;

/// A node's rotation lease: at most one rotation (coordinated here or by the peer) may
/// create a key on this node at a time. Held by a random token; it lapses after its time
/// to live, so a coordinator that died does not block rotations for ever.
#[derive(Debug, Default)]
pub struct Lease {
    held: Mutex<Option<(u128, Instant)>>,
}

impl Lease {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u128, Instant)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the lease for `token` for `ttl`, or renews it when `token` holds it already.
    /// `false` while another token holds it.
    pub fn try_take(&self, token: u128, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut held = self.lock();
        match *held {
            Some((t, until)) if t != token && until > now => false,
            _ => {
                *held = Some((token, now + ttl));
                true
            }
        }
    }

    /// Whether `token` holds the lease now.
    pub fn holds(&self, token: u128) -> bool {
        matches!(*self.lock(), Some((t, until)) if t == token && until > Instant::now())
    }

    /// Gives the lease up, if `token` holds it.
    pub fn release(&self, token: u128) {
        let mut held = self.lock();
        if matches!(*held, Some((t, _)) if t == token) {
            *held = None;
        }
    }
}

/// Everything rotation needs from this node.
#[derive(Debug)]
pub struct Rotations {
    /// Serialises rotations asked of this node (queued, not refused).
    pub local: tokio::sync::Mutex<()>,
    /// The lease shared with rotations the peer coordinates.
    pub lease: Lease,
    /// How long a lease lives: the whole rotation must fit in it.
    pub ttl: Duration,
    /// How long a rotation waits for the leases before giving up.
    pub busy_budget: Duration,
}

impl Rotations {
    /// Lease time to live for a pair whose peer requests time out after `peer_timeout`
    /// and whose rotations wait `distribute_wait` between stage and promote.
    pub fn new(peer_timeout: Duration, distribute_wait: Duration) -> Self {
        Self {
            local: tokio::sync::Mutex::new(()),
            lease: Lease::default(),
            ttl: distribute_wait + peer_timeout * 4 + Duration::from_secs(2),
            busy_budget: Duration::from_secs(20),
        }
    }
}

/// The peer, as rotation sees it.
pub trait PeerLink: Sync {
    /// Asks the peer for its rotation lease; on success, its highest generation.
    fn lease(&self, node: &str, token: u128, ttl: Duration) -> impl Future<Output = Result<u64, LinkError>> + Send;
    /// Stages `record` on the peer under the lease: it refuses a generation not above its
    /// own keys.
    fn stage(&self, node: &str, token: u128, record: &KeyRecord) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// Merges `records` (the promotion and retired orphans) durably and releases the
    /// lease; answers the peer's primary afterwards, and the orphans it refused to retire
    /// because it holds them promoted.
    fn promote(
        &self,
        node: &str,
        token: u128,
        records: &[KeyRecord],
    ) -> impl Future<Output = Result<Promoted, LinkError>> + Send;
}

/// The peer's answer to a promotion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Promoted {
    /// The peer's primary after the merge.
    pub primary: Option<KeyId>,
    /// Keys sent as retired orphans that the peer holds promoted (a coordinator killed
    /// between the peer's promote and its own left them staged at home): the peer kept
    /// them, and the coordinator promotes them too.
    pub kept: Vec<KeyId>,
}

/// A peer request that did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// No answer: down, partitioned, timed out.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// Another rotation holds the peer's lease.
    #[error("the peer is busy with another rotation")]
    Busy,
    /// Our lease on the peer lapsed (we were too slow).
    #[error("our rotation lease on the peer lapsed")]
    LeaseLost,
    /// The peer holds a generation at or above ours.
    #[error("the peer holds generation {0} or above")]
    Stale(u64),
    /// The peer holds other material under one of the key ids: an integrity alarm.
    #[error("integrity alarm from the peer: {0}")]
    Conflict(String),
    /// Anything else the peer answered.
    #[error("unexpected answer from the peer: {0}")]
    Protocol(String),
}

/// This node, as rotation sees it.
pub trait LocalNode: Sync {
    /// This node's name.
    fn node(&self) -> &str;
    /// The rotation lease and queue.
    fn rotations(&self) -> &Rotations;
    /// Runs `f` on the store (on a blocking thread in the server) and republishes what
    /// clients are served.
    fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> keystore::Result<T> + Send + 'static,
    ) -> impl Future<Output = keystore::Result<T>> + Send;
    /// The pause between stage and promote, so watching clients hold the key first.
    fn distribute_wait(&self) -> Duration;
    /// A fresh random token.
    fn token(&self) -> u128;
    /// Adds what a finished rotation counts ([`Counted::of`] its outcome) to this node's
    /// counters; [`rotate`] calls it once per rotation, before it answers.
    fn count(&self, counted: Counted);
}

/// How far a rotation's key got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// No peer is configured.
    Standalone,
    /// Primary on both nodes when the answer was decided.
    Replicated,
    /// Primary here only (the peer was unreachable and the operator allowed it).
    Degraded,
}

impl Replication {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Replicated => "replicated",
            Self::Degraded => "degraded",
        }
    }
}

/// A finished rotation.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The new primary.
    pub meta: KeyMeta,
    /// Where it is primary.
    pub replication: Replication,
    /// Staged keys of interrupted rotations retired by this one.
    pub orphans_retired: usize,
}

/// A rotation that did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The peer was unreachable and degraded rotation was not allowed.
    #[error("the peer did not take the rotation ({error}); {changed}")]
    PeerUnavailable {
        /// What went wrong.
        error: LinkError,
        /// What was changed, for the operator.
        changed: String,
    },
    /// Another rotation held the leases for the whole budget.
    #[error("another rotation held the pair's rotation lease for {0:?}; nothing was changed; retry")]
    Busy(Duration),
    /// The peer refused in a way retrying will not fix.
    #[error("the peer refused the rotation ({error}); {changed}")]
    Refused {
        /// The refusal.
        error: LinkError,
        /// What was changed.
        changed: String,
    },
    /// The key was promoted but is not the primary on both nodes.
    #[error("key {key_id} was promoted but {where_} holds another primary; rotate again")]
    Superseded {
        /// The key.
        key_id: KeyId,
        /// Which node disagrees.
        where_: String,
    },
    /// The key was not promoted: on a database shared by several nodes, another node
    /// promoted a newer key while this rotation's key was staged (its staging pause).
    #[error(
        "this rotation's key {key_id} was not promoted: another node promoted the newer key {by} (generation {by_generation}) during this rotation's staging pause, so the cluster has a new primary already; nothing else was changed; rotate again only if you need a key newer than {by}"
    )]
    Overtaken {
        /// This rotation's key (left staged; this node's next rotation retires it).
        key_id: KeyId,
        /// The newer key another node promoted.
        by: KeyId,
        /// Its generation.
        by_generation: u64,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] keystore::Error),
}

/// What a rotation's outcome adds to its node's counters (the server's
/// `sso_replication_failures_total` and `sso_integrity_alarms_total`): decided here, with
/// the outcome, so that the HTTP layer only maps the outcome to an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    /// The key did not reach the peer as a replicated rotation's does: the rotation went
    /// degraded, the peer was unavailable, or it refused.
    pub replication_failure: bool,
    /// The peer refused because it holds other material under one of the key ids.
    pub integrity_alarm: bool,
}

impl Counted {
    /// What `outcome` counts. Every variant is named, so a new one has to be decided.
    pub fn of(outcome: &Result<Rotated, RotateError>) -> Self {
        match outcome {
            Ok(done) => match done.replication {
                Replication::Degraded => Self {
                    replication_failure: true,
                    integrity_alarm: false,
                },
                Replication::Standalone | Replication::Replicated => Self::default(),
            },
            Err(RotateError::PeerUnavailable { .. }) => Self {
                replication_failure: true,
                integrity_alarm: false,
            },
            Err(RotateError::Refused { error, .. }) => Self {
                replication_failure: true,
                integrity_alarm: matches!(error, LinkError::Conflict(_)),
            },
            Err(
                RotateError::Busy(_)
                | RotateError::Superseded { .. }
                | RotateError::Overtaken { .. }
                | RotateError::Store(_),
            ) => Self::default(),
        }
    }
}

fn as_promoted(record: &KeyRecord) -> KeyRecord {
    KeyRecord {
        meta: KeyMeta {
            state: KeyState::Active,
            ..record.meta.clone()
        },
        secret: record.secret.as_ref().map(MasterSecret::clone_secret),
    }
}

/// What a promotion here does with this node's orphans (docs/pair.md, invariant O).
#[derive(Debug)]
enum Orphans {
    /// Leave them staged: nobody confirmed that they were never promoted elsewhere (a
    /// degraded rotation, a lost answer). The next replicated rotation settles them.
    Keep,
    /// No peer exists: every staged key of this node below the new one is an orphan.
    AllBelow,
    /// The peer retired these and holds `promote` promoted: retire the first, promote the
    /// second (records as the peer holds them).
    Confirmed {
        retire: Vec<KeyId>,
        promote: Vec<KeyRecord>,
    },
}

/// Promotes `id` here, settles this node's orphans as `orphans` says, and reports the
/// primary afterwards.
///
/// A rotation that stalled past its lease may find its key retired here already (in
/// earlier versions a later rotation retired it as an orphan). That rotation was
/// superseded; say so rather than answer a store error.
async fn promote_locally<N: LocalNode>(
    local: &N,
    id: KeyId,
    generation: u64,
    orphans: Orphans,
) -> Result<(KeyMeta, Option<KeyId>, usize), RotateError> {
    let out = local
        .with_store(move |store| {
            let retired = match orphans {
                Orphans::Keep => 0,
                Orphans::AllBelow => {
                    let ids = store.orphans_below(generation)?;
                    store.retire_orphans(&ids)?
                }
                Orphans::Confirmed { retire, promote } => {
                    store.merge(&promote)?;
                    store.retire_orphans(&retire)?;
                    // The peer retired them all; anti-entropy may have brought some of
                    // those retirements here already, between its answer and this call.
                    retire.len()
                }
            };
            let meta = store.promote(id)?;
            let primary = store.primary()?.map(|m| m.key_id);
            Ok((meta, primary, retired))
        })
        .await;
    match out {
        Ok(done) => Ok(done),
        Err(keystore::Error::InvalidTransition { key_id, .. }) if key_id == id => Err(RotateError::Superseded {
            key_id: id,
            where_: format!(
                "this node ({}), where a later rotation retired it as an orphan while this one was stalled past its lease,",
                local.node()
            ),
        }),
        Err(keystore::Error::Overtaken {
            key_id,
            by,
            by_generation,
            ..
        }) if key_id == id => Err(RotateError::Overtaken {
            key_id,
            by,
            by_generation,
        }),
        Err(e) => Err(e.into()),
    }
}

/// A rotation on this node alone (no peer, or a degraded one with the local lease held).
async fn rotate_alone<N: LocalNode>(local: &N, replication: Replication) -> Result<Rotated, RotateError> {
    let staged = local.with_store(|store| store.stage_new_above(0)).await?;
    tokio::time::sleep(local.distribute_wait()).await;
    // Without a peer every orphan of this node is settled here; a degraded rotation
    // cannot ask the peer whether one of them is its primary, so it leaves them.
    let orphans = match replication {
        Replication::Standalone => Orphans::AllBelow,
        _ => Orphans::Keep,
    };
    let (meta, _, orphans_retired) = promote_locally(local, staged.key_id, staged.generation, orphans).await?;
    Ok(Rotated {
        meta,
        replication,
        orphans_retired,
    })
}

/// Rotates: add → distribute → promote, serialised with every other rotation of the pair.
/// The outcome is counted on `local` ([`LocalNode::count`]) before it is returned.
pub async fn rotate<N: LocalNode, P: PeerLink>(
    local: &N,
    peer: Option<&P>,
    allow_degraded: bool,
) -> Result<Rotated, RotateError> {
    let outcome = rotate_queued(local, peer, allow_degraded).await;
    local.count(Counted::of(&outcome));
    outcome
}

async fn rotate_queued<N: LocalNode, P: PeerLink>(
    local: &N,
    peer: Option<&P>,
    allow_degraded: bool,
) -> Result<Rotated, RotateError> {
    let rotations = local.rotations();
    let _queue = rotations.local.lock().await;
    // A node that cannot write its store must not involve the peer: no lease taken there,
    // no key staged (issue 15). A full or failing disk is found here, before anything.
    local.with_store(|store| store.check_writable()).await?;
    let token = local.token();
    let Some(peer) = peer else {
        return rotate_alone(local, Replication::Standalone).await;
    };
    let node = local.node().to_owned();
    let started = Instant::now();
    let mut attempt: u32 = 0;
    // 1. Both leases: ours, then the peer's. On a busy peer give ours back and wait a
    //    little (random), so two nodes rotating at once cannot hold one lease each forever.
    let (peer_max, leased_at) = loop {
        attempt += 1;
        if started.elapsed() > rotations.busy_budget {
            return Err(RotateError::Busy(rotations.busy_budget));
        }
        if !rotations.lease.try_take(token, rotations.ttl) {
            backoff(token, attempt).await;
            continue;
        }
        let leased_at = Instant::now();
        match peer.lease(&node, token, rotations.ttl).await {
            Ok(max) => break (max, leased_at),
            Err(LinkError::Busy) => {
                rotations.lease.release(token);
                backoff(token, attempt).await;
            }
            Err(e @ LinkError::Unreachable(_)) if allow_degraded => {
                tracing::warn!(error = %e, "peer unreachable: rotating degraded");
                let out = rotate_alone(local, Replication::Degraded).await;
                rotations.lease.release(token);
                return out;
            }
            Err(error) => {
                rotations.lease.release(token);
                return Err(RotateError::PeerUnavailable {
                    error,
                    changed: "nothing was changed on either node".into(),
                });
            }
        }
    };
    let result = rotate_leased(local, peer, &node, token, peer_max, leased_at, allow_degraded).await;
    rotations.lease.release(token);
    result
}

async fn rotate_leased<N: LocalNode, P: PeerLink>(
    local: &N,
    peer: &P,
    node: &str,
    token: u128,
    peer_max: u64,
    leased_at: Instant,
    allow_degraded: bool,
) -> Result<Rotated, RotateError> {
    // 2. The generation, chosen inside our write transaction, above both nodes' keys.
    let staged = local.with_store(move |store| store.stage_new_above(peer_max)).await?;
    let id = staged.key_id;
    let orphan = |what: &str| {
        format!(
            "key {id} (generation {}) is staged {what} but not promoted: it is not in use, and the next successful rotation retires it",
            staged.generation
        )
    };
    let record = local.with_store(move |store| store.export_key(id)).await?;
    // 3. Staged on the peer, which checks the generation against its own keys.
    match peer.stage(node, token, &record).await {
        Ok(()) => {}
        Err(e @ LinkError::Unreachable(_)) if allow_degraded => {
            tracing::warn!(error = %e, "peer lost during rotation: promoting degraded");
            return finish_degraded(local, &staged).await;
        }
        Err(error @ LinkError::Unreachable(_)) => {
            return Err(RotateError::PeerUnavailable {
                error,
                changed: orphan("on this node"),
            });
        }
        Err(error) => {
            return Err(RotateError::Refused {
                error,
                changed: orphan("on this node"),
            });
        }
    }
    // 4. Distribute: both nodes serve it to watching clients before anything seals.
    tokio::time::sleep(local.distribute_wait()).await;
    // 5. Promote on the peer first (with this node's orphans older than this key, as
    //    retired), then here. The peer keeps any it holds promoted (invariant O).
    let orphans: Vec<KeyRecord> = local
        .with_store(move |store| {
            let ids = store.orphans_below(staged.generation)?;
            Ok(store
                .export()?
                .into_iter()
                .filter(|r| ids.contains(&r.meta.key_id))
                .map(|r| KeyRecord {
                    meta: KeyMeta {
                        state: KeyState::Retired,
                        ..r.meta
                    },
                    secret: r.secret,
                })
                .collect())
        })
        .await?;
    let mut records = Vec::with_capacity(orphans.len() + 1);
    records.push(as_promoted(&record));
    records.extend(orphans);
    let answer = match peer.promote(node, token, &records).await {
        Ok(answer) => answer,
        Err(e @ LinkError::Unreachable(_)) if allow_degraded => {
            tracing::warn!(error = %e, "peer lost during rotation: promoting degraded");
            return finish_degraded(local, &staged).await;
        }
        Err(error @ LinkError::Unreachable(_)) => {
            // The promote may have reached the peer and only its answer been lost: the
            // key may be the peer's primary already, with clients sealing under it. It is
            // on both nodes (staged), so promote it here too rather than leave it to be
            // retired as an orphan; anti-entropy completes the peer's side.
            // Its orphans stay staged: whether the peer retired them or holds one
            // promoted is in the lost answer; the next replicated rotation asks again.
            let (meta, _, _) = promote_locally(local, id, staged.generation, Orphans::Keep).await?;
            return Err(RotateError::PeerUnavailable {
                error,
                changed: format!(
                    "key {id} (generation {}) is on both nodes and now promoted on this node ({}); the peer's answer to its promotion was lost, so it may be the peer's primary already, and anti-entropy promotes it there once the link is back",
                    meta.generation,
                    local.node()
                ),
            });
        }
        Err(error) => {
            return Err(RotateError::Refused {
                error,
                changed: orphan("on both nodes"),
            });
        }
    };
    let settle = Orphans::Confirmed {
        retire: records[1..]
            .iter()
            .map(|r| r.meta.key_id)
            .filter(|k| !answer.kept.contains(k))
            .collect(),
        promote: records[1..]
            .iter()
            .filter(|r| answer.kept.contains(&r.meta.key_id))
            .map(as_promoted)
            .collect(),
    };
    let (meta, primary, orphans_retired) = promote_locally(local, id, staged.generation, settle).await?;
    if answer.primary != Some(id) {
        return Err(RotateError::Superseded {
            key_id: id,
            where_: "the peer".into(),
        });
    }
    if primary != Some(id) {
        return Err(RotateError::Superseded {
            key_id: id,
            where_: format!("this node ({})", local.node()),
        });
    }
    if leased_at.elapsed() >= local.rotations().ttl {
        // Our lease on the peer may have lapsed before the promotion: a later rotation
        // could already have superseded the key there. Do not claim what we cannot know.
        return Err(RotateError::Superseded {
            key_id: id,
            where_: "the peer (our rotation lease lapsed before the answer)".into(),
        });
    }
    Ok(Rotated {
        meta,
        replication: Replication::Replicated,
        orphans_retired,
    })
}

async fn finish_degraded<N: LocalNode>(local: &N, staged: &KeyMeta) -> Result<Rotated, RotateError> {
    let (meta, _, orphans_retired) = promote_locally(local, staged.key_id, staged.generation, Orphans::Keep).await?;
    Ok(Rotated {
        meta,
        replication: Replication::Degraded,
        orphans_retired,
    })
}

/// A short random pause, growing with the attempt (10 ms .. ~320 ms).
async fn backoff(token: u128, attempt: u32) {
    let spread = 10u64 << attempt.min(5);
    let jitter = (token.rotate_left(attempt.wrapping_mul(7)) as u64) % spread;
    tokio::time::sleep(Duration::from_millis(10 + jitter)).await;
}

/// The peer side of [`PeerLink::lease`]: grants the lease to `token` unless another
/// rotation holds it; answers this node's highest generation.
pub async fn grant<N: LocalNode>(local: &N, token: u128, ttl: Duration) -> Result<u64, LinkError> {
    let rotations = local.rotations();
    if !rotations
        .lease
        .try_take(token, ttl.min(rotations.ttl.max(Duration::from_secs(60))))
    {
        return Err(LinkError::Busy);
    }
    local
        .with_store(|store| store.max_generation())
        .await
        .map_err(|e| LinkError::Protocol(e.to_string()))
}

/// The peer side of [`PeerLink::stage`]: stores the staged key only under the lease, and
/// only above every stored generation.
pub async fn accept_stage<N: LocalNode>(local: &N, token: u128, record: KeyRecord) -> Result<(), LinkError> {
    if !local.rotations().lease.holds(token) {
        return Err(LinkError::LeaseLost);
    }
    match local.with_store(move |store| store.accept_staged(&record)).await {
        Ok(_) => Ok(()),
        Err(keystore::Error::StaleGeneration { max, .. }) => Err(LinkError::Stale(max)),
        Err(e @ keystore::Error::ConflictingKey(_)) => Err(LinkError::Conflict(e.to_string())),
        Err(e) => Err(LinkError::Protocol(e.to_string())),
    }
}

/// The peer side of [`PeerLink::promote`]: merges (states only move forward), releases the
/// lease, answers the primary.
///
/// A key sent as a retired orphan that this node holds promoted is kept, not retired, and
/// named in the answer: clients may have sealed under it here (its coordinator was killed
/// between this promote and its own, and its next rotation took the key still staged at
/// home for an orphan). Retiring it would strand their envelopes (docs/pair.md, O).
pub async fn accept_promote<N: LocalNode>(
    local: &N,
    token: u128,
    records: Vec<KeyRecord>,
) -> Result<Promoted, LinkError> {
    let out = local
        .with_store(move |store| {
            let held = store.list()?;
            let promoted_here = |id: KeyId| {
                held.iter()
                    .any(|m| m.key_id == id && matches!(m.state, KeyState::Primary | KeyState::Active))
            };
            let (kept, merged): (Vec<KeyRecord>, Vec<KeyRecord>) = records
                .into_iter()
                .partition(|r| r.meta.state == KeyState::Retired && promoted_here(r.meta.key_id));
            store.merge(&merged)?;
            Ok(Promoted {
                primary: store.primary()?.map(|m| m.key_id),
                kept: kept.iter().map(|r| r.meta.key_id).collect(),
            })
        })
        .await;
    local.rotations().lease.release(token);
    match out {
        Ok(promoted) => Ok(promoted),
        Err(e @ keystore::Error::ConflictingKey(_)) => Err(LinkError::Conflict(e.to_string())),
        Err(e) => Err(LinkError::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts the server's metrics took from a rotation when `api.rs` counted them
    /// (a degraded rotation, an unavailable or refusing peer: one replication failure; a
    /// peer's conflict: an integrity alarm too; nothing else), now decided here.
    #[test]
    fn a_rotation_counts_what_the_api_counted() {
        let meta = KeyMeta {
            key_id: KeyId::from_bytes([7; 16]),
            generation: 3,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            origin: "a".into(),
            state: KeyState::Primary,
        };
        let done = |replication| {
            Ok(Rotated {
                meta: meta.clone(),
                replication,
                orphans_retired: 0,
            })
        };
        let failure = Counted {
            replication_failure: true,
            integrity_alarm: false,
        };
        let changed = String::new;
        let cases: Vec<(Result<Rotated, RotateError>, Counted)> = vec![
            (done(Replication::Standalone), Counted::default()),
            (done(Replication::Replicated), Counted::default()),
            (done(Replication::Degraded), failure),
            (
                Err(RotateError::PeerUnavailable {
                    error: LinkError::Unreachable("down".into()),
                    changed: changed(),
                }),
                failure,
            ),
            (
                Err(RotateError::Refused {
                    error: LinkError::Stale(9),
                    changed: changed(),
                }),
                failure,
            ),
            (
                Err(RotateError::Refused {
                    error: LinkError::Conflict("other material".into()),
                    changed: changed(),
                }),
                Counted {
                    replication_failure: true,
                    integrity_alarm: true,
                },
            ),
            (Err(RotateError::Busy(Duration::from_secs(1))), Counted::default()),
            (
                Err(RotateError::Superseded {
                    key_id: meta.key_id,
                    where_: "the peer".into(),
                }),
                Counted::default(),
            ),
            (
                Err(RotateError::Overtaken {
                    key_id: meta.key_id,
                    by: meta.key_id,
                    by_generation: 4,
                }),
                Counted::default(),
            ),
            (
                Err(RotateError::Store(keystore::Error::GenerationExhausted)),
                Counted::default(),
            ),
        ];
        for (outcome, counted) in cases {
            assert_eq!(Counted::of(&outcome), counted, "{outcome:?}");
        }
    }

    #[tokio::test]
    async fn a_lease_excludes_other_tokens_until_released_or_lapsed() {
        let lease = Lease::default();
        let ttl = Duration::from_millis(200);
        assert!(lease.try_take(1, ttl));
        assert!(lease.try_take(1, ttl), "the holder renews");
        assert!(!lease.try_take(2, ttl));
        lease.release(2);
        assert!(lease.holds(1), "only the holder releases");
        lease.release(1);
        assert!(lease.try_take(2, ttl));
        tokio::time::sleep(ttl + Duration::from_millis(20)).await;
        assert!(!lease.holds(2));
        assert!(lease.try_take(3, ttl), "a lapsed lease is free");
    }
}
