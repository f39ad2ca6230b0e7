//! The key cache: an immutable snapshot of the keyring, swapped whole on every change, so
//! the hot path is one atomic load and a hash lookup, with no lock.
//!
//! Keys live only here, in zeroizing types: the [`MasterSecret`] box and the expanded AES
//! key schedule, both wiped when the last snapshot (and [`KeyHandle`]) holding them goes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sso_proto::delivery::{Binding, Opener, Recipient};
use sso_proto::{EnvelopeKey, KeyId, KeyMeta, KeyState, MasterSecret};

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

/// `GET /v1/keyring` and the watch answer.
#[derive(Deserialize)]
pub(crate) struct WireKeyring {
    pub primary: Option<KeyId>,
    pub epoch: u64,
    pub keys: Vec<WireKey>,
    /// Retired and destroyed key ids (an extension of SPEC §5; absent from older servers).
    #[serde(default)]
    pub gone: Vec<KeyId>,
    /// Present when the keys are sealed to this client (docs/key-delivery.md).
    #[serde(default)]
    pub wrap: Option<WireWrap>,
}

/// The `wrap` object of a wrapped answer.
#[derive(Deserialize)]
pub(crate) struct WireWrap {
    pub v: u64,
    /// The server's ephemeral X25519 public key, standard base64.
    pub enc: String,
}

/// One key on the wire: `key` (plain, a `SecretString`, so the base64 text is wiped on
/// drop) or `sealed` (wrapped delivery, ciphertext); a one-key answer carries its `wrap`.
#[derive(Deserialize)]
pub(crate) struct WireKey {
    pub key_id: KeyId,
    pub generation: u64,
    pub state: KeyState,
    pub created_at: String,
    #[serde(default)]
    pub key: Option<SecretString>,
    #[serde(default)]
    pub sealed: Option<String>,
    #[serde(default)]
    pub wrap: Option<WireWrap>,
}

/// The opener for a wrapped answer, from its `wrap` object and the request's key pair.
/// An answer without `wrap` to a request that asked for it is refused: this client never
/// accepts key material that crossed TLS in the clear.
pub(crate) fn opener(wrap: Option<&WireWrap>, recipient: Recipient, context: &str) -> Result<Opener, String> {
    let wrap = wrap.ok_or(
        "the answer carries key material in plain base64 although this client asked for wrapped \
         delivery (docs/key-delivery.md); upgrade the server",
    )?;
    if wrap.v != u64::from(sso_proto::delivery::VERSION) {
        return Err(format!(
            "wrapped delivery version {} is not supported by this client (it speaks {}); upgrade it",
            wrap.v,
            sso_proto::delivery::VERSION
        ));
    }
    recipient.opener(&wrap.enc, context).map_err(|e| e.to_string())
}

impl WireKey {
    /// The cached key. With an `opener` the material must be `sealed` (the `seq`-th key of
    /// the answer); without one (only reachable from fuzzing) it must be plain.
    pub(crate) fn into_cached(self, opener: Option<&Opener>, seq: u64) -> Result<CachedKey, String> {
        let secret = match (opener, &self.sealed, &self.key) {
            (Some(opener), Some(sealed), None) => {
                let binding = Binding {
                    key_id: self.key_id,
                    generation: self.generation,
                    state: self.state,
                };
                opener
                    .open(seq, &binding, sealed)
                    .map_err(|e| format!("key {}: {e}", self.key_id))?
            }
            (None, None, Some(key)) => MasterSecret::from_base64(key.expose_secret().as_bytes())
                .map_err(|_| format!("key {}: material is not 32 bytes of base64", self.key_id))?,
            (Some(_), _, Some(_)) => {
                return Err(format!(
                    "key {}: sent in plain base64 although this client asked for wrapped delivery \
                     (docs/key-delivery.md); upgrade the server",
                    self.key_id
                ));
            }
            _ => return Err(format!("key {}: no usable key material in the answer", self.key_id)),
        };
        let created_at = time::OffsetDateTime::parse(&self.created_at, &time::format_description::well_known::Rfc3339)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let envelope = EnvelopeKey::new(self.key_id, &secret);
        Ok(CachedKey {
            meta: KeyMeta {
                key_id: self.key_id,
                generation: self.generation,
                created_at,
                origin: String::new(),
                state: self.state,
            },
            secret,
            envelope,
        })
    }
}

/// Parses a keyring body. Errors name the problem, never the content.
pub(crate) fn parse_keyring(body: &[u8]) -> Result<WireKeyring, String> {
    serde_json::from_slice(body).map_err(|e| format!("malformed keyring (line {}, column {})", e.line(), e.column()))
}

/// The next snapshot: the union of what the cache holds and what the server sent, minus
/// the keys the server says are gone; the server's primary. A key id that arrives with
/// different material than cached is an integrity alarm: the cached key is kept.
pub(crate) fn apply(
    current: &Cache,
    wire: WireKeyring,
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
        let fresh = wk.into_cached(opener, seq as u64)?;
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
