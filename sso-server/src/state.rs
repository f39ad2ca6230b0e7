//! The server's shared state: the open store, and a published snapshot of what clients
//! are served, rebuilt on every change.
//!
//! Reads never touch SQLite: `GET /v1/keyring` clones a reference-counted, pre-serialised
//! body out of an [`ArcSwap`]. The body lives in a zeroizing buffer, so the key material
//! in it is wiped when the last response using it has been written and the next snapshot
//! has replaced it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use keystore::{KeyRecord, SealedStore};
use sso_proto::{KeyId, KeyState};
use time::format_description::well_known::Rfc3339;
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
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// This node's name.
    pub node: String,
    /// The store; every call goes through `spawn_blocking`.
    pub store: Mutex<SealedStore>,
    /// What clients are served now.
    pub snapshot: ArcSwap<Snapshot>,
    /// Epoch announcements for watch long-polls.
    pub epoch_tx: watch::Sender<u64>,
    /// Set once the server is shutting down: open watches answer at once (503), so their
    /// clients move to another node instead of holding the shutdown for its grace period.
    pub stopping: watch::Sender<bool>,
    /// Identity to role mapping.
    pub roles: RoleMap,
    /// The audit log.
    pub audit: Audit,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Request limits.
    pub limits: Limits,
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

impl crate::rotation::LocalNode for Arc<AppState> {
    fn node(&self) -> &str {
        &self.node
    }

    fn rotations(&self) -> &crate::rotation::Rotations {
        &self.rotations
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SealedStore) -> keystore::Result<T> + Send + 'static,
    ) -> keystore::Result<T> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = state.store.lock().unwrap_or_else(|p| p.into_inner());
            let before = store.epoch()?;
            let out = f(&mut store)?;
            if store.epoch()? != before {
                state.refresh(&store)?;
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
    pub fn refresh(&self, store: &SealedStore) -> keystore::Result<()> {
        let snapshot = build_snapshot(store)?;
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
}

/// Reads the store and serialises what clients are served.
pub fn build_snapshot(store: &SealedStore) -> keystore::Result<Snapshot> {
    let keyring = store.keyring()?;
    let states: HashMap<KeyId, KeyState> = store.list()?.into_iter().map(|k| (k.key_id, k.state)).collect();
    let mut gone: Vec<KeyId> = states
        .iter()
        .filter(|(_, s)| matches!(s, KeyState::Retired | KeyState::Destroyed))
        .map(|(id, _)| *id)
        .collect();
    gone.sort_unstable();
    let mut key_bodies = HashMap::with_capacity(keyring.keys.len());
    for record in &keyring.keys {
        key_bodies.insert(record.meta.key_id, zeroizing_bytes(key_json(record)));
    }
    Ok(Snapshot {
        epoch: keyring.epoch,
        primary: keyring.primary,
        keyring_body: zeroizing_bytes(keyring_json(keyring.epoch, keyring.primary, &keyring.keys, &gone)),
        key_bodies,
        states,
        served: keyring.keys.len(),
    })
}

/// Wraps a zeroizing buffer as `Bytes` that wipes it when the last clone is dropped.
pub fn zeroizing_bytes(buf: Zeroizing<Vec<u8>>) -> Bytes {
    Bytes::from_owner(buf)
}

/// Where serialised JSON goes: first a [`Count`] to learn the exact length, then a
/// [`WipingBuf`] of exactly that capacity. One writer function serves both passes, so the
/// length can never disagree with what is written.
pub trait Sink {
    /// Appends bytes that are not secret.
    fn put(&mut self, bytes: &[u8]);
    /// Appends a key's material, standard base64.
    fn put_secret(&mut self, secret: &sso_proto::MasterSecret);
}

/// Length of a key's material in standard base64 (32 bytes → 44 characters).
const SECRET_B64_LEN: usize = 44;

/// Counts bytes: the first pass.
#[derive(Debug, Default)]
pub struct Count(pub usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }

    fn put_secret(&mut self, _: &sso_proto::MasterSecret) {
        self.0 += SECRET_B64_LEN;
    }
}

/// A buffer for key material that never reallocates in place: should it ever need more
/// room than it was sized for, it copies into a new zeroizing buffer and wipes the old one
/// (so no unwiped copy of a key is left in freed memory), and counts the event.
#[derive(Debug)]
pub struct WipingBuf {
    buf: Zeroizing<Vec<u8>>,
    grew: usize,
}

impl WipingBuf {
    /// An empty buffer of exactly `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::with_capacity(capacity)),
            grew: 0,
        }
    }

    fn room(&mut self, n: usize) {
        let need = self.buf.len().saturating_add(n);
        if need > self.buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(self.buf.capacity().saturating_mul(2))));
            bigger.extend_from_slice(&self.buf);
            // The old buffer is zeroized (its whole capacity) as it is dropped here.
            self.buf = bigger;
            self.grew += 1;
        }
    }

    /// How often it had to grow (0 when the first pass sized it exactly).
    pub fn grew(&self) -> usize {
        self.grew
    }

    /// The bytes written.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.buf
    }
}

impl Sink for WipingBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.buf.extend_from_slice(bytes);
    }

    fn put_secret(&mut self, secret: &sso_proto::MasterSecret) {
        self.room(SECRET_B64_LEN);
        secret.push_base64(&mut self.buf);
    }
}

/// Serialises with `write` twice: once to count, once into a buffer of exactly that size.
pub fn exact(write: impl Fn(&mut dyn Sink)) -> Zeroizing<Vec<u8>> {
    let mut count = Count::default();
    write(&mut count);
    let mut out = WipingBuf::with_capacity(count.0);
    write(&mut out);
    debug_assert_eq!(out.grew(), 0, "the serialiser's two passes disagree");
    out.into_inner()
}

fn write_key_json(out: &mut dyn Sink, record: &KeyRecord) {
    let meta = &record.meta;
    let created = meta.created_at.format(&Rfc3339).unwrap_or_default();
    out.put(b"{\"key_id\":\"");
    out.put(meta.key_id.to_string().as_bytes());
    out.put(b"\",\"generation\":");
    out.put(meta.generation.to_string().as_bytes());
    out.put(b",\"state\":\"");
    out.put(meta.state.as_str().as_bytes());
    out.put(b"\",\"created_at\":\"");
    out.put(created.as_bytes());
    out.put(b"\",\"key\":\"");
    if let Some(secret) = &record.secret {
        out.put_secret(secret);
    }
    out.put(b"\"}");
}

/// `{"key_id","generation","state","created_at","key"}` for one key.
pub fn key_json(record: &KeyRecord) -> Zeroizing<Vec<u8>> {
    exact(|out| write_key_json(out, record))
}

/// The `GET /v1/keyring` body. Beyond SPEC §5's fields it lists the ids of retired and
/// destroyed keys in `gone`, so a client can drop exactly those (a key merely missing from
/// one node's answer may be a key that node has not replicated yet). Sized exactly: it
/// never reallocates, whatever the key count.
pub fn keyring_json(epoch: u64, primary: Option<KeyId>, keys: &[KeyRecord], gone: &[KeyId]) -> Zeroizing<Vec<u8>> {
    exact(|out| {
        out.put(b"{\"primary\":");
        match primary {
            Some(id) => {
                out.put(b"\"");
                out.put(id.to_string().as_bytes());
                out.put(b"\"");
            }
            None => out.put(b"null"),
        }
        out.put(b",\"epoch\":");
        out.put(epoch.to_string().as_bytes());
        out.put(b",\"keys\":[");
        for (i, record) in keys.iter().enumerate() {
            if i > 0 {
                out.put(b",");
            }
            write_key_json(out, record);
        }
        out.put(b"],\"gone\":[");
        for (i, id) in gone.iter().enumerate() {
            if i > 0 {
                out.put(b",");
            }
            out.put(b"\"");
            out.put(id.to_string().as_bytes());
            out.put(b"\"");
        }
        out.put(b"]}");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use sso_proto::{KeyMeta, MasterSecret};

    fn record(rng: &ring::rand::SystemRandom, generation: u64, origin: &str, state: KeyState) -> KeyRecord {
        KeyRecord {
            meta: KeyMeta {
                key_id: KeyId::generate(rng).unwrap(),
                generation,
                created_at: time::OffsetDateTime::now_utc(),
                origin: origin.into(),
                state,
            },
            secret: Some(MasterSecret::generate(rng).unwrap()),
        }
    }

    #[test]
    fn keyring_json_is_valid() {
        let rng = ring::rand::SystemRandom::new();
        let keys: Vec<KeyRecord> = (1..=5)
            .map(|g| record(&rng, g, "node-with-a-long-name", KeyState::Active))
            .collect();
        let body = keyring_json(42, Some(keys[4].meta.key_id), &keys, &[keys[0].meta.key_id]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["epoch"], 42);
        assert_eq!(v["keys"].as_array().unwrap().len(), 5);
        let b64 = v["keys"][0]["key"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(decoded, keys[0].secret.as_ref().unwrap().expose_secret());
    }

    /// Issue 12: the old bound (160 bytes a key) was short of the real size, so a debug
    /// build panicked past a few dozen keys and a release build reallocated, leaving
    /// unwiped copies. Exact sizing means capacity == length, for any key count, node
    /// name, generation and state: a buffer that grew has spare capacity and fails here.
    #[test]
    fn keyring_json_is_sized_exactly_for_any_key_set() {
        let rng = ring::rand::SystemRandom::new();
        let origins = ["a", "node-with-a-long-name", "nœud-é\"\\\u{1}", &"x".repeat(300)];
        let states = [KeyState::Staged, KeyState::Primary, KeyState::Active];
        for count in [0usize, 1, 2, 7, 40, 41, 64, 200, 301] {
            let keys: Vec<KeyRecord> = (0..count)
                .map(|i| {
                    let generation = if i % 5 == 4 { u64::MAX - i as u64 } else { i as u64 + 1 };
                    record(&rng, generation, origins[i % origins.len()], states[i % states.len()])
                })
                .collect();
            let gone: Vec<KeyId> = keys.iter().take(count / 3).map(|k| k.meta.key_id).collect();
            let primary = keys.last().map(|k| k.meta.key_id);
            let body = keyring_json(u64::MAX, primary, &keys, &gone);
            assert_eq!(
                body.len(),
                body.capacity(),
                "{count} keys: the buffer was not sized exactly"
            );
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["keys"].as_array().unwrap().len(), count);
            for k in &keys {
                let one = key_json(k);
                assert_eq!(one.len(), one.capacity());
            }
        }
    }

    #[test]
    fn a_wiping_buffer_that_must_grow_keeps_its_contents() {
        let rng = ring::rand::SystemRandom::new();
        let secret = MasterSecret::generate(&rng).unwrap();
        let mut buf = WipingBuf::with_capacity(3);
        buf.put(b"ab");
        buf.put_secret(&secret);
        buf.put(b"cd");
        assert!(buf.grew() > 0);
        let out = buf.into_inner();
        assert_eq!(out.len(), 2 + 44 + 2);
        assert_eq!(&out[..2], b"ab");
        assert_eq!(&out[46..], b"cd");
    }
}
