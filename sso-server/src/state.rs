//! The server's shared state: the open store, and a published snapshot of what clients
//! are served, rebuilt on every change.
//!
//! Reads never touch SQLite: `GET /v1/keyring` clones a reference-counted, pre-serialised
//! body out of an [`ArcSwap`]. The body lives in a zeroizing buffer, so the key material
//! in it is wiped when the last response using it has been written and the next snapshot
//! has replaced it. Wrapped answers (docs/key-delivery.md) are sealed per request from the
//! snapshot's records; the plain bodies are not built at all when plain delivery is off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use keystore::{KeyRecord, Store};
use sso_proto::delivery::Sealer;
use sso_proto::wire::{key_json, keyring_json};
use sso_proto::{KeyId, KeyState};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::audit::Audit;
use crate::config::Limits;
use crate::identity::RoleMap;
use crate::metrics::Metrics;

/// What clients are served at one epoch.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The store's epoch when this was built.
    pub epoch: u64,
    /// The derived primary.
    pub primary: Option<KeyId>,
    /// `GET /v1/keyring` body (holds key material; zeroized on drop).
    pub keyring_body: Bytes,
    /// `GET /v1/keys/{id}` bodies for served keys (hold key material).
    pub key_bodies: HashMap<KeyId, Bytes>,
    /// Every key's state, for 404 vs 410.
    pub states: HashMap<KeyId, KeyState>,
    /// How many keys the keyring body holds.
    pub served: usize,
    /// The served keys, in keyring order, for wrapped answers (secrets zeroized on drop).
    pub records: Vec<KeyRecord>,
    /// Where each served key sits in `records`.
    pub positions: HashMap<KeyId, usize>,
    /// Retired and destroyed key ids, sorted (the keyring's `gone`).
    pub gone: Vec<KeyId>,
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// This node's name.
    pub node: String,
    /// The store, whatever engine holds it; every call goes through `spawn_blocking`
    /// (`keystore::storage` says why the trait is synchronous).
    pub store: Mutex<Box<dyn Store>>,
    /// What clients are served now.
    pub snapshot: ArcSwap<Snapshot>,
    /// Epoch announcements for watch long-polls.
    pub epoch_tx: watch::Sender<u64>,
    /// Set once the server is shutting down: open watches answer at once (503), so their
    /// clients move to another node instead of holding the shutdown for its grace period.
    /// Set it with [`AppState::stop`], which also wakes the watches.
    pub stopping: watch::Sender<bool>,
    /// Identity to role mapping.
    pub roles: RoleMap,
    /// The audit log.
    pub audit: Audit,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Request limits.
    pub limits: Limits,
    /// Whether key requests without a `Sso-Key-Wrap` header get plain base64 key material
    /// (`[delivery] allow_plain`); when not, plain bodies are never built.
    pub allow_plain: bool,
    /// Connection and watch caps, deadlines, aggregated audit of floods.
    pub limiter: Arc<crate::limits::Limiter>,
    /// Pause between staging a new key and promoting it, so watching clients hold it
    /// before anything is sealed under it.
    pub distribute_wait: std::time::Duration,
    /// The other node of the pair, if configured.
    pub peer: Option<Arc<crate::peer::Peer>>,
    /// The rotation queue and lease (see `rotation`).
    pub rotations: crate::rotation::Rotations,
    /// Recent answers to admin writes that carried an `Idempotency-Key`.
    pub idempotency: crate::idempotency::Idempotency,
    /// Per-process key for the idempotency table's request fingerprints.
    pub idempotency_secret: ring::hmac::Key,
}

impl AppState {
    /// Runs `f` on the store on a blocking thread, then republishes the snapshot; `None`
    /// when the task panicked. The admin writes (`lifecycle`, `backup`) and
    /// `status::own_coverage` use it.
    ///
    /// Not unified with `LocalNode::with_store` (below), on purpose: this one republishes
    /// after every successful call, whether or not the epoch moved, because a backup's
    /// `confirm_backup` changes what the snapshot's refresh publishes (the last-backup time
    /// in the metrics) without moving the epoch; and it counts integrity errors as alarms.
    /// The domain modules' one (rotation, replication) republishes only when the epoch
    /// moved: they run on every anti-entropy round, twice a second, and must not rebuild
    /// the snapshot for nothing. Making them one would change either the backup metric or
    /// the cost of every round.
    pub async fn publishing<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut dyn Store) -> keystore::Result<T> + Send + 'static,
    ) -> Option<keystore::Result<T>> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = state.store.lock().unwrap_or_else(|p| p.into_inner());
            let result = f(&mut **store);
            if let Err(e) = &result
                && let Some(fault) = e.store_fault()
            {
                state.metrics.health.store_failed(fault.to_string());
            }
            if let Err(e) = &result {
                state.metrics.count_if_integrity(e);
            }
            let out = result?;
            state.refresh(&**store)?;
            Ok(out)
        })
        .await
        .ok()
    }
}

impl AppState {
    /// Runs `f` on the store on a blocking thread for a read that changes nothing: no
    /// republish and no health mark (a failure is only the asker's), no epoch read around
    /// it. `status`, the peer's key-set pull (`replication::serve_keys`, twice a second per
    /// peer) and the push of one key (`replication::push_key`) use it, so that neither `api`
    /// nor a domain module locks the store itself (only `server`'s start, anchor and change
    /// feed do, and this module).
    pub async fn reading<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&dyn Store) -> keystore::Result<T> + Send + 'static,
    ) -> Result<T, ReadError> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
            f(&**store)
        })
        .await
        .map_err(|_| ReadError::Panicked)?
        .map_err(ReadError::Store)
    }
}

/// Why a store call on the blocking pool ([`AppState::reading`], or
/// [`AppState::publishing`] where a domain module maps its `None`) has no result.
#[derive(Debug)]
pub enum ReadError {
    /// The store could not be read.
    Store(keystore::Error),
    /// The blocking task ended without an answer (it panicked).
    Panicked,
}

impl crate::rotation::LocalNode for Arc<AppState> {
    fn node(&self) -> &str {
        &self.node
    }

    fn rotations(&self) -> &crate::rotation::Rotations {
        &self.rotations
    }

    /// Republishes the snapshot only when the epoch moved (anti-entropy calls this twice a
    /// second); [`AppState::publishing`] says why the admin writes' helper differs.
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> keystore::Result<T> + Send + 'static,
    ) -> keystore::Result<T> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = state.store.lock().unwrap_or_else(|p| p.into_inner());
            let store: &mut dyn Store = store.as_mut();
            let before = store.epoch()?;
            let out = f(store).inspect_err(|e| {
                if let Some(fault) = e.store_fault() {
                    state.metrics.health.store_failed(fault.to_string());
                }
            })?;
            if store.epoch()? != before {
                state.refresh(store)?;
            }
            Ok(out)
        })
        .await
        .map_err(|_| keystore::Error::Integrity {
            key_id: None,
            detail: "a store task panicked".into(),
        })?
    }

    fn distribute_wait(&self) -> std::time::Duration {
        self.distribute_wait
    }

    /// Into the counters the metrics listener renders.
    fn count(&self, counted: crate::rotation::Counted) {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = &self.metrics;
        metrics
            .replication_failures
            .fetch_add(u64::from(counted.replication_failure), Relaxed);
        metrics
            .integrity_alarms
            .fetch_add(u64::from(counted.integrity_alarm), Relaxed);
    }

    fn token(&self) -> u128 {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        // A failed fill leaves zeros: still a valid token, only less unique.
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        u128::from_le_bytes(b)
    }
}

impl AppState {
    /// Rebuilds the snapshot from the store and announces the epoch. Call after every
    /// change, with the store lock held by the caller or not.
    pub fn refresh(&self, store: &dyn Store) -> keystore::Result<()> {
        let snapshot = build_snapshot(store, self.allow_plain)?;
        let epoch = snapshot.epoch;
        self.metrics
            .keyring_epoch
            .store(epoch, std::sync::atomic::Ordering::Relaxed);
        if let Ok(status) = store.status()
            && let Some(t) = status.last_backup_at
        {
            self.metrics
                .last_backup_unix
                .store(t.unix_timestamp(), std::sync::atomic::Ordering::Relaxed);
        }
        self.snapshot.store(Arc::new(snapshot));
        self.epoch_tx.send_replace(epoch);
        Ok(())
    }

    /// The server is shutting down: sets `stopping`, then wakes every open watch through
    /// the epoch channel (a watch waits on that channel alone, to stay small), and each
    /// answers 503.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
        self.epoch_tx.send_modify(|_| {});
    }
}

/// Reads the store and serialises what clients are served; the plain bodies only when
/// `plain` delivery is allowed.
pub fn build_snapshot(store: &dyn Store, plain: bool) -> keystore::Result<Snapshot> {
    let keyring = store.keyring()?;
    let states: HashMap<KeyId, KeyState> = store.list()?.into_iter().map(|k| (k.key_id, k.state)).collect();
    let mut gone: Vec<KeyId> = states
        .iter()
        .filter(|(_, s)| !s.is_served())
        .map(|(id, _)| *id)
        .collect();
    gone.sort_unstable();
    let mut key_bodies = HashMap::with_capacity(keyring.keys.len());
    let mut keyring_body = Bytes::new();
    if plain {
        for record in &keyring.keys {
            key_bodies.insert(record.meta.key_id, zeroizing_bytes(key_json(record)));
        }
        keyring_body = zeroizing_bytes(keyring_json(keyring.epoch, keyring.primary, &keyring.keys, &gone));
    }
    let positions = keyring
        .keys
        .iter()
        .enumerate()
        .map(|(i, r)| (r.meta.key_id, i))
        .collect();
    Ok(Snapshot {
        epoch: keyring.epoch,
        primary: keyring.primary,
        keyring_body,
        key_bodies,
        states,
        served: keyring.keys.len(),
        records: keyring.keys,
        positions,
        gone,
    })
}

/// Wraps a zeroizing buffer as `Bytes` that wipes it when the last clone is dropped.
pub fn zeroizing_bytes(buf: Zeroizing<Vec<u8>>) -> Bytes {
    Bytes::from_owner(buf)
}

/// The wrapped `GET /v1/keyring` (and watch) body of a snapshot
/// ([`sso_proto::wire::keyring::wrapped_keyring_json`]).
pub fn wrapped_keyring_json(snap: &Snapshot, sealer: &mut Sealer) -> Result<Vec<u8>, sso_proto::Error> {
    sso_proto::wire::keyring::wrapped_keyring_json(snap.epoch, snap.primary, &snap.records, &snap.gone, sealer)
}
