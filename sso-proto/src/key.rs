//! The key model of SPEC §3: identifiers, states, metadata and the secret itself.

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretBox};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::Error;

/// Length in bytes of a master secret.
pub const SECRET_LEN: usize = 32;

/// A 128-bit random key identifier, shown as 32 lowercase hex characters.
///
/// Key ids are not secret: they travel in envelope headers, logs and audit entries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 16]);

impl KeyId {
    /// Length of a key id in bytes.
    pub const LEN: usize = 16;

    /// Draws a fresh key id from the operating system's randomness.
    pub fn generate(rng: &SystemRandom) -> Result<Self, Error> {
        let mut id = [0u8; 16];
        rng.fill(&mut id).map_err(|_| Error::Randomness)?;
        Ok(Self(id))
    }

    /// The raw 16 bytes, as carried in envelope headers.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Builds a key id from its raw 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = Error;

    /// Parses exactly 32 lowercase hex characters; anything else is `InvalidKeyId`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !lower {
            return Err(Error::InvalidKeyId);
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).map_err(|_| Error::InvalidKeyId)?;
        Ok(Self(id))
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a key stands in its life. Transitions only move forward:
/// `staged → primary/active → retired → destroyed`.
///
/// `Primary` is never stored: it is derived as the promoted key with the highest
/// `(generation, key_id)`, so two nodes that hold the same key set always agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Distributed to nodes and clients, not yet used to encrypt.
    Staged,
    /// The key new envelopes are sealed under.
    Primary,
    /// Promoted earlier; opens old envelopes, no longer seals.
    Active,
    /// No longer served to clients; still stored so a backup can bring it back.
    Retired,
    /// Material wiped; only the metadata remains.
    Destroyed,
}

impl KeyState {
    /// Whether clients are handed this key (staged, primary and active keys).
    pub fn is_served(self) -> bool {
        matches!(self, Self::Staged | Self::Primary | Self::Active)
    }

    /// Every state, in lifecycle order.
    pub const ALL: [Self; 5] = [
        Self::Staged,
        Self::Primary,
        Self::Active,
        Self::Retired,
        Self::Destroyed,
    ];

    /// The state a name stands for (the inverse of [`KeyState::as_str`]); `None` for any
    /// other text.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The lowercase name used on the wire and in the CLI: the one place a state is
    /// spelled (serde, the hand-written writers of `wire` and the peer format use it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staged => "staged",
            Self::Primary => "primary",
            Self::Active => "active",
            Self::Retired => "retired",
            Self::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for KeyState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for KeyState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        // The message names the accepted spellings, never the text received.
        Self::from_name(&s).ok_or_else(|| {
            serde::de::Error::custom("unknown key state: expected staged, primary, active, retired or destroyed")
        })
    }
}

/// Everything about a key except its material. Safe to log and to show operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMeta {
    /// Random identifier, unique across the pair.
    pub key_id: KeyId,
    /// One more than the highest generation the creating node knew of.
    pub generation: u64,
    /// When the key was generated.
    pub created_at: OffsetDateTime,
    /// Name of the node that generated the key.
    pub origin: String,
    /// Current state, with `Primary` already derived.
    pub state: KeyState,
}

/// A 256-bit master secret.
///
/// Zeroized on drop; deliberately has no `Debug`, `Display`, `Clone` or `Serialize`.
/// Copying is explicit ([`MasterSecret::clone_secret`]) and reading the bytes says so
/// ([`MasterSecret::expose_secret`]).
#[expect(missing_debug_implementations, reason = "a secret has no Debug by design")]
pub struct MasterSecret(SecretBox<[u8; SECRET_LEN]>);

impl MasterSecret {
    /// Generates a fresh secret straight into its zeroizing box, so the bytes never sit on
    /// the stack.
    pub fn generate(rng: &SystemRandom) -> Result<Self, Error> {
        let mut failed = false;
        let secret = SecretBox::init_with_mut(|bytes: &mut [u8; SECRET_LEN]| {
            failed = rng.fill(bytes).is_err();
        });
        if failed {
            return Err(Error::Randomness);
        }
        Ok(Self(secret))
    }

    /// Moves bytes into a secret, wiping the source.
    pub fn take_from(source: &mut [u8; SECRET_LEN]) -> Self {
        let secret = SecretBox::init_with_mut(|bytes: &mut [u8; SECRET_LEN]| {
            bytes.copy_from_slice(source);
        });
        zeroize::Zeroize::zeroize(source);
        Self(secret)
    }

    /// Copies a secret out of a slice (for example a decrypted buffer the caller will
    /// wipe). Fails unless the slice is exactly [`SECRET_LEN`] bytes.
    pub fn copy_from_slice(source: &[u8]) -> Result<Self, Error> {
        if source.len() != SECRET_LEN {
            return Err(Error::InvalidSecretLength);
        }
        Ok(Self(SecretBox::init_with_mut(|bytes: &mut [u8; SECRET_LEN]| {
            bytes.copy_from_slice(source);
        })))
    }

    /// The raw key bytes. Every call site is a place where the secret leaves its box.
    pub fn expose_secret(&self) -> &[u8; SECRET_LEN] {
        self.0.expose_secret()
    }

    /// An explicit copy into a new zeroizing box.
    pub fn clone_secret(&self) -> Self {
        Self(SecretBox::init_with_mut(|bytes: &mut [u8; SECRET_LEN]| {
            bytes.copy_from_slice(self.expose_secret());
        }))
    }

    /// Appends the secret as standard base64 (44 characters) to `out`, through a buffer that
    /// is wiped afterwards: the one way key material is written into wire JSON.
    pub fn push_base64(&self, out: &mut Vec<u8>) {
        use base64::Engine;
        let mut b64 = zeroize::Zeroizing::new([0u8; 44]);
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(self.expose_secret(), b64.as_mut_slice())
            .unwrap_or(0);
        out.extend_from_slice(&b64[..n]);
    }

    /// Decodes standard base64 into a secret, through a buffer that is wiped afterwards:
    /// the one way key material is read from wire JSON. Fails on bad base64 or a length
    /// other than 32 bytes; the error never contains the input.
    pub fn from_base64(text: &[u8]) -> Result<Self, Error> {
        use base64::Engine;
        let mut raw = zeroize::Zeroizing::new([0u8; 48]);
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(text, raw.as_mut_slice())
            .map_err(|_| Error::InvalidSecretLength)?;
        Self::copy_from_slice(&raw[..n])
    }

    /// Constant-time comparison, so a mismatch reveals nothing about where it lies.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.expose_secret().ct_eq(other.expose_secret()).into()
    }
}

/// A key with its material, as it moves between stores, peers, backups and the wire.
///
/// `secret` is `None` only for destroyed keys. No `Clone` or `Serialize`: bodies that
/// carry it are written by [`crate::wire`]'s exact-size zeroizing writers.
pub struct KeyRecord {
    /// Metadata, with the state as the sender sees it.
    pub meta: KeyMeta,
    /// The material; `None` once destroyed.
    pub secret: Option<MasterSecret>,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("meta", &self.meta)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// What a node name may be: it names keys' origin, audit entries, health answers and the
/// peer's contact headers.
pub const NODE_NAME_RULE: &str = "1-64 characters of letters, digits, '-', '_' or '.'";

/// Whether `name` is a valid node name ([`NODE_NAME_RULE`]).
pub fn is_valid_node_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trips_as_lowercase_hex() {
        let rng = SystemRandom::new();
        let id = KeyId::generate(&rng).unwrap();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<KeyId>().unwrap(), id);
    }

    #[test]
    fn key_id_rejects_other_shapes() {
        for bad in ["", "00", &"A".repeat(32), &"g".repeat(32), &"0".repeat(33)] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn states_are_spelled_once_and_round_trip() {
        for state in KeyState::ALL {
            assert_eq!(KeyState::from_name(state.as_str()), Some(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(serde_json::from_str::<KeyState>(&json).unwrap(), state);
        }
        assert_eq!(KeyState::from_name("Staged"), None);
        let err = serde_json::from_str::<KeyState>("\"secret-ish\"")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret-ish"), "{err}");
    }

    #[test]
    fn secrets_compare_by_value() {
        let rng = SystemRandom::new();
        let a = MasterSecret::generate(&rng).unwrap();
        let b = MasterSecret::generate(&rng).unwrap();
        assert!(a.ct_eq(&a.clone_secret()));
        assert!(!a.ct_eq(&b));
    }

    #[test]
    fn base64_round_trips_and_rejects_bad_input() {
        let rng = SystemRandom::new();
        let secret = MasterSecret::generate(&rng).unwrap();
        let mut text = Vec::new();
        secret.push_base64(&mut text);
        assert_eq!(text.len(), 44);
        assert!(MasterSecret::from_base64(&text).unwrap().ct_eq(&secret));
        assert!(MasterSecret::from_base64(b"not base64!").is_err());
        assert!(MasterSecret::from_base64(b"AAAA").is_err());
    }

    #[test]
    fn take_from_wipes_the_source() {
        let mut source = [7u8; SECRET_LEN];
        let secret = MasterSecret::take_from(&mut source);
        assert_eq!(source, [0u8; SECRET_LEN]);
        assert_eq!(secret.expose_secret(), &[7u8; SECRET_LEN]);
    }
}
