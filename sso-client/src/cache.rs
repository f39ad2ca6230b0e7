//! The key cache: an immutable snapshot of the keyring, swapped whole on every change, so
//! the hot path is one atomic load and a hash lookup, with no lock.
//!
//! Keys live only here, in zeroizing types: the [`MasterSecret`] box and the expanded AES
//! key schedule, both wiped when the last snapshot (and [`KeyHandle`]) holding them goes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use sso_proto::delivery::Opener;
use sso_proto::wire;
use sso_proto::{EnvelopeKey, KeyId, KeyMeta, MasterSecret};

/// Key ids are 128 random bits, so their first eight bytes already are a good hash; this
/// saves SipHash on every lookup. An attacker choosing ids in envelopes can only make
/// lookups of ids that are not cached collide, which costs nothing.
#[derive(Default)]
pub(crate) struct KeyIdHasher(u64);

impl Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

pub(crate) type KeyMap = HashMap<KeyId, Arc<CachedKey>, BuildHasherDefault<KeyIdHasher>>;

/// One cached key: metadata, the secret, and the secret expanded for AES-GCM.
pub(crate) struct CachedKey {
    pub meta: KeyMeta,
    pub secret: MasterSecret,
    pub envelope: EnvelopeKey,
}

/// A snapshot of everything the client knows.
#[derive(Default)]
pub(crate) struct Cache {
    pub keys: KeyMap,
    pub primary: Option<Arc<CachedKey>>,
    /// Epoch of the last keyring applied, and which endpoint it came from (epochs are per
    /// server node).
    pub epoch: u64,
    pub endpoint: Option<usize>,
}

/// A cached key, for callers that need the raw bytes. Holding a handle keeps the key in
/// memory even after the cache drops it; drop handles promptly.
#[derive(Clone)]
pub struct KeyHandle(pub(crate) Arc<CachedKey>);

impl KeyHandle {
    /// The key's id.
    pub fn key_id(&self) -> KeyId {
        self.0.meta.key_id
    }

    /// Its metadata (state as of the last keyring the client saw).
    pub fn meta(&self) -> &KeyMeta {
        &self.0.meta
    }

    /// The raw 32 bytes. Every call site is a place where the secret leaves the cache.
    pub fn expose_secret(&self) -> &[u8; 32] {
        self.0.secret.expose_secret()
    }
}

impl std::fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHandle")
            .field("meta", &self.0.meta)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// One key of an answer, opened into a cached key: the material through `opener` when the
/// answer is wrapped (the `seq`-th key of the answer), plain otherwise (only reachable from
/// fuzzing: every request of this client asks for wrapped delivery).
pub(crate) fn cached(wire: wire::Key, opener: Option<&Opener>, seq: u64) -> Result<CachedKey, String> {
    let (meta, secret) = wire.open(opener, seq)?;
    let envelope = EnvelopeKey::new(meta.key_id, &secret);
    Ok(CachedKey { meta, secret, envelope })
}

/// The next snapshot: the union of what the cache holds and what the server sent, minus
/// the keys the server says are gone; the server's primary. A key id that arrives with
/// different material than cached is an integrity alarm: the cached key is kept.
pub(crate) fn apply(
    current: &Cache,
    wire: wire::Keyring,
    endpoint: usize,
    opener: Option<&Opener>,
) -> Result<Cache, String> {
    let mut keys: KeyMap = current
        .keys
        .iter()
        .filter(|(id, _)| !wire.gone.contains(id))
        .map(|(id, k)| (*id, k.clone()))
        .collect();
    for (seq, wk) in wire.keys.into_iter().enumerate() {
        let fresh = cached(wk, opener, seq as u64)?;
        match keys.get(&fresh.meta.key_id) {
            Some(old) if !old.secret.ct_eq(&fresh.secret) => {
                tracing::error!(key_id = %fresh.meta.key_id, "integrity alarm: a server sent different material for a cached key; keeping the cached one");
            }
            Some(old) if old.meta.state == fresh.meta.state => {}
            _ => {
                keys.insert(fresh.meta.key_id, Arc::new(fresh));
            }
        }
    }
    let primary = wire
        .primary
        .and_then(|id| keys.get(&id).cloned())
        .or_else(|| current.primary.clone().filter(|p| keys.contains_key(&p.meta.key_id)));
    Ok(Cache {
        keys,
        primary,
        epoch: wire.epoch,
        endpoint: Some(endpoint),
    })
}

/// A snapshot with one more key (an on-demand fetch).
pub(crate) fn with_key(current: &Cache, key: Arc<CachedKey>) -> Cache {
    let mut keys = current.keys.clone();
    keys.insert(key.meta.key_id, key);
    Cache {
        keys,
        primary: current.primary.clone(),
        epoch: current.epoch,
        endpoint: current.endpoint,
    }
}
