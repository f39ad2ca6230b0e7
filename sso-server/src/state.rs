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
use sso_proto::{KeyId, KeyMeta, KeyState};
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

/// Upper bound of one key's JSON, so buffers are sized once and never reallocate (which
/// would leave an unwiped copy of the material behind).
fn key_json_bound(meta: &KeyMeta) -> usize {
    160 + meta.origin.len()
}

fn write_key_json(out: &mut Zeroizing<Vec<u8>>, record: &KeyRecord) {
    let meta = &record.meta;
    let created = meta.created_at.format(&Rfc3339).unwrap_or_default();
    out.extend_from_slice(b"{\"key_id\":\"");
    out.extend_from_slice(meta.key_id.to_string().as_bytes());
    out.extend_from_slice(b"\",\"generation\":");
    out.extend_from_slice(meta.generation.to_string().as_bytes());
    out.extend_from_slice(b",\"state\":\"");
    out.extend_from_slice(meta.state.as_str().as_bytes());
    out.extend_from_slice(b"\",\"created_at\":\"");
    out.extend_from_slice(created.as_bytes());
    out.extend_from_slice(b"\",\"key\":\"");
    if let Some(secret) = &record.secret {
        secret.push_base64(out);
    }
    out.extend_from_slice(b"\"}");
}

/// `{"key_id","generation","state","created_at","key"}` for one key.
pub fn key_json(record: &KeyRecord) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(key_json_bound(&record.meta)));
    write_key_json(&mut out, record);
    out
}

/// The `GET /v1/keyring` body. Beyond SPEC §5's fields it lists the ids of retired and
/// destroyed keys in `gone`, so a client can drop exactly those (a key merely missing from
/// one node's answer may be a key that node has not replicated yet).
pub fn keyring_json(epoch: u64, primary: Option<KeyId>, keys: &[KeyRecord], gone: &[KeyId]) -> Zeroizing<Vec<u8>> {
    let bound = 96 + keys.iter().map(|k| key_json_bound(&k.meta) + 1).sum::<usize>() + gone.len() * 35;
    let mut out = Zeroizing::new(Vec::with_capacity(bound));
    out.extend_from_slice(b"{\"primary\":");
    match primary {
        Some(id) => {
            out.push(b'"');
            out.extend_from_slice(id.to_string().as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"epoch\":");
    out.extend_from_slice(epoch.to_string().as_bytes());
    out.extend_from_slice(b",\"keys\":[");
    for (i, record) in keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_key_json(&mut out, record);
    }
    out.extend_from_slice(b"],\"gone\":[");
    for (i, id) in gone.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(id.to_string().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"]}");
    debug_assert!(out.len() <= bound, "keyring JSON outgrew its buffer");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use sso_proto::MasterSecret;

    #[test]
    fn keyring_json_is_valid_and_never_reallocates() {
        let rng = ring::rand::SystemRandom::new();
        let keys: Vec<KeyRecord> = (1..=5)
            .map(|g| KeyRecord {
                meta: KeyMeta {
                    key_id: KeyId::generate(&rng).unwrap(),
                    generation: g,
                    created_at: time::OffsetDateTime::now_utc(),
                    origin: "node-with-a-long-name".into(),
                    state: KeyState::Active,
                },
                secret: Some(MasterSecret::generate(&rng).unwrap()),
            })
            .collect();
        let body = keyring_json(42, Some(keys[4].meta.key_id), &keys, &[keys[0].meta.key_id]);
        let cap = body.capacity();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["epoch"], 42);
        assert_eq!(v["keys"].as_array().unwrap().len(), 5);
        let b64 = v["keys"][0]["key"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(decoded, keys[0].secret.as_ref().unwrap().expose_secret());
        assert!(body.len() <= cap);
    }
}
