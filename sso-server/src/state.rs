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
use sso_proto::delivery::{Binding, Sealer};
use sso_proto::{KeyId, KeyState};
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;
use zeroize::Zeroizing;

pub use crate::exact::{Count, Sink, WipingBuf, exact};

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

impl crate::rotation::LocalNode for Arc<AppState> {
    fn node(&self) -> &str {
        &self.node
    }

    fn rotations(&self) -> &crate::rotation::Rotations {
        &self.rotations
    }

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
        .filter(|(_, s)| matches!(s, KeyState::Retired | KeyState::Destroyed))
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

/// `{"key_id":…,"generation":…,"state":…,"created_at":…,` — every key field but the
/// material.
fn write_key_head(out: &mut dyn Sink, record: &KeyRecord) {
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
    out.put(b"\",");
}

fn write_key_json(out: &mut dyn Sink, record: &KeyRecord) {
    write_key_head(out, record);
    out.put(b"\"key\":\"");
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

/// A sink for wrapped answers, which hold no key material: ciphertext goes in with `put`.
struct Sealed(Vec<u8>);

impl Sink for Sealed {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// Never called by the wrapped writers; writes nothing, so no plain key can end up in
    /// a wrapped answer.
    fn put_secret(&mut self, _: &sso_proto::MasterSecret) {}
}

/// Writes `"sealed":"…"}` for one key: its material sealed by `sealer` (the next in the
/// answer's order).
fn write_sealed_tail(out: &mut dyn Sink, record: &KeyRecord, sealer: &mut Sealer) -> Result<(), sso_proto::Error> {
    out.put(b"\"sealed\":\"");
    if let Some(secret) = &record.secret {
        let binding = Binding {
            key_id: record.meta.key_id,
            generation: record.meta.generation,
            state: record.meta.state,
        };
        out.put(sealer.seal(&binding, secret)?.as_bytes());
    }
    out.put(b"\"}");
    Ok(())
}

fn write_wrap(out: &mut dyn Sink, sealer: &Sealer) {
    out.put(b"\"wrap\":{\"v\":");
    out.put(sso_proto::delivery::VERSION.to_string().as_bytes());
    out.put(b",\"enc\":\"");
    out.put(sealer.enc().as_bytes());
    out.put(b"\"}");
}

/// The wrapped `GET /v1/keyring` (and watch) body: the plain body's fields, a `wrap`
/// object, and each key's material sealed to the client (docs/key-delivery.md).
pub fn wrapped_keyring_json(snap: &Snapshot, sealer: &mut Sealer) -> Result<Vec<u8>, sso_proto::Error> {
    let mut out = Sealed(Vec::with_capacity(
        160 + snap.records.len() * 200 + snap.gone.len() * 35,
    ));
    out.put(b"{\"primary\":");
    match snap.primary {
        Some(id) => {
            out.put(b"\"");
            out.put(id.to_string().as_bytes());
            out.put(b"\"");
        }
        None => out.put(b"null"),
    }
    out.put(b",\"epoch\":");
    out.put(snap.epoch.to_string().as_bytes());
    out.put(b",");
    write_wrap(&mut out, sealer);
    out.put(b",\"keys\":[");
    for (i, record) in snap.records.iter().enumerate() {
        if i > 0 {
            out.put(b",");
        }
        write_key_head(&mut out, record);
        write_sealed_tail(&mut out, record, sealer)?;
    }
    out.put(b"],\"gone\":[");
    for (i, id) in snap.gone.iter().enumerate() {
        if i > 0 {
            out.put(b",");
        }
        out.put(b"\"");
        out.put(id.to_string().as_bytes());
        out.put(b"\"");
    }
    out.put(b"]}");
    Ok(out.0)
}

/// The wrapped `GET /v1/keys/{id}` body: the key's fields, `wrap`, and `sealed`.
pub fn wrapped_key_json(record: &KeyRecord, sealer: &mut Sealer) -> Result<Vec<u8>, sso_proto::Error> {
    let mut out = Sealed(Vec::with_capacity(300));
    write_key_head(&mut out, record);
    write_wrap(&mut out, sealer);
    out.put(b",");
    write_sealed_tail(&mut out, record, sealer)?;
    Ok(out.0)
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
    /// The wrapped bodies parse as JSON, carry the same metadata as the plain ones, no
    /// spelling of any key, and open (in order) for the client they were sealed to.
    #[test]
    fn wrapped_bodies_open_for_their_client_and_hold_no_plain_key() {
        use sso_proto::delivery::{Recipient, RecipientKey};
        let rng = ring::rand::SystemRandom::new();
        let keys: Vec<KeyRecord> = (1..=3).map(|g| record(&rng, g, "a", KeyState::Active)).collect();
        let gone = vec![KeyId::generate(&rng).unwrap()];
        let plain: serde_json::Value =
            serde_json::from_slice(&keyring_json(9, Some(keys[2].meta.key_id), &keys, &gone)).unwrap();
        let positions = keys.iter().enumerate().map(|(i, r)| (r.meta.key_id, i)).collect();
        let snap = Snapshot {
            epoch: 9,
            primary: Some(keys[2].meta.key_id),
            records: keys,
            positions,
            gone,
            ..Snapshot::default()
        };
        let recipient = Recipient::generate(&rng).unwrap();
        let to = RecipientKey::parse(recipient.header_value().as_bytes()).unwrap();
        let mut sealer = Sealer::new(&to, "/v1/keyring", &rng).unwrap();
        let body = wrapped_keyring_json(&snap, &mut sealer).unwrap();
        let text = String::from_utf8(body.clone()).unwrap();
        for r in &snap.records {
            let secret = r.secret.as_ref().unwrap().expose_secret();
            assert!(!text.contains(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(secret)));
            assert!(!text.contains(&hex::encode(secret)));
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["epoch"], plain["epoch"]);
        assert_eq!(v["primary"], plain["primary"]);
        assert_eq!(v["gone"], plain["gone"]);
        assert_eq!(v["wrap"]["v"], 1);
        let opener = recipient
            .opener(v["wrap"]["enc"].as_str().unwrap(), "/v1/keyring")
            .unwrap();
        for (i, (k, r)) in v["keys"].as_array().unwrap().iter().zip(&snap.records).enumerate() {
            assert_eq!(k["key_id"], plain["keys"][i]["key_id"]);
            assert_eq!(k["created_at"], plain["keys"][i]["created_at"]);
            assert!(k.get("key").is_none());
            let binding = Binding {
                key_id: r.meta.key_id,
                generation: r.meta.generation,
                state: r.meta.state,
            };
            let opened = opener.open(i as u64, &binding, k["sealed"].as_str().unwrap()).unwrap();
            assert!(opened.ct_eq(r.secret.as_ref().unwrap()));
        }

        let recipient = Recipient::generate(&rng).unwrap();
        let to = RecipientKey::parse(recipient.header_value().as_bytes()).unwrap();
        let context = format!("/v1/keys/{}", snap.records[1].meta.key_id);
        let mut sealer = Sealer::new(&to, &context, &rng).unwrap();
        let one: serde_json::Value =
            serde_json::from_slice(&wrapped_key_json(&snap.records[1], &mut sealer).unwrap()).unwrap();
        let opener = recipient
            .opener(one["wrap"]["enc"].as_str().unwrap(), &context)
            .unwrap();
        let r = &snap.records[1];
        let binding = Binding {
            key_id: r.meta.key_id,
            generation: r.meta.generation,
            state: r.meta.state,
        };
        assert!(
            opener
                .open(0, &binding, one["sealed"].as_str().unwrap())
                .unwrap()
                .ct_eq(r.secret.as_ref().unwrap())
        );
    }
}
