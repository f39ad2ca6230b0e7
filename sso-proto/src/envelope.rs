//! The ciphertext envelope: what clients seal data into and servers never see.
//!
//! ```text
//! offset  len  field
//! 0       1    version (0x01)
//! 1       16   key_id of the master secret that sealed it
//! 17      12   nonce, random per envelope
//! 29      n    AES-256-GCM ciphertext of the plaintext
//! 29+n    16   GCM tag
//! ```
//!
//! The 29-byte header is authenticated together with the caller's associated data: the
//! GCM AAD is `header || caller_aad`. The header has a fixed length, so that
//! concatenation is unambiguous. Editing any byte, including the version or key id,
//! makes the envelope fail to open. `docs/envelope.md` is the full specification.

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, KeyId, MasterSecret};

/// The only envelope version this build writes and reads.
pub const VERSION: u8 = 0x01;
/// Bytes before the ciphertext: version, key id, nonce.
pub const HEADER_LEN: usize = 1 + KeyId::LEN + NONCE_LEN;
/// Length of the random nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM tag at the end.
pub const TAG_LEN: usize = 16;
/// The shortest well-formed envelope: an empty plaintext.
pub const MIN_LEN: usize = HEADER_LEN + TAG_LEN;
/// Largest plaintext accepted, well under GCM's limit of 2^36 - 32 bytes.
pub const MAX_PLAINTEXT_LEN: usize = 1 << 32;

/// A master secret ready to seal and open envelopes: its id and the expanded AES key
/// schedule. The schedule is key material too, and is wiped on drop.
pub struct EnvelopeKey {
    key_id: KeyId,
    cipher: Aes256Gcm,
}

impl EnvelopeKey {
    /// Expands `secret` for envelope use under `key_id`.
    pub fn new(key_id: KeyId, secret: &MasterSecret) -> Self {
        let cipher = Aes256Gcm::new(secret.expose_secret().into());
        Self { key_id, cipher }
    }

    /// The id written into every envelope this key seals.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }
}

impl std::fmt::Debug for EnvelopeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeKey")
            .field("key_id", &self.key_id)
            .field("cipher", &"[redacted]")
            .finish()
    }
}

/// The parsed, not yet authenticated, parts of an envelope.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeRef<'a> {
    /// Which master secret sealed it; use it to find the key before opening.
    pub key_id: KeyId,
    header: &'a [u8],
    nonce: &'a [u8],
    ciphertext: &'a [u8],
    tag: &'a [u8],
}

impl<'a> EnvelopeRef<'a> {
    /// Splits an envelope into its parts, checking only its shape. Nothing is
    /// authenticated until [`EnvelopeRef::open`].
    pub fn parse(envelope: &'a [u8]) -> Result<Self, Error> {
        let Some(&version) = envelope.first() else {
            return Err(Error::Truncated { len: 0, min: MIN_LEN });
        };
        if version != VERSION {
            return Err(Error::UnknownVersion(version));
        }
        if envelope.len() < MIN_LEN {
            return Err(Error::Truncated {
                len: envelope.len(),
                min: MIN_LEN,
            });
        }
        let (header, rest) = envelope.split_at(HEADER_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut id = [0u8; KeyId::LEN];
        id.copy_from_slice(&header[1..1 + KeyId::LEN]);
        Ok(Self {
            key_id: KeyId::from_bytes(id),
            header,
            nonce: &header[1 + KeyId::LEN..],
            ciphertext,
            tag,
        })
    }

    /// Authenticates and decrypts with `key`, which must be the key named in the header.
    pub fn open(&self, key: &EnvelopeKey, aad: &[u8]) -> Result<Vec<u8>, Error> {
        if key.key_id != self.key_id {
            return Err(Error::UnknownKey(self.key_id));
        }
        let nonce = Nonce::try_from(self.nonce).map_err(|_| Error::AuthenticationFailed)?;
        let tag = Tag::try_from(self.tag).map_err(|_| Error::AuthenticationFailed)?;
        let mut plaintext = self.ciphertext.to_vec();
        let result = with_full_aad(self.header, aad, |full_aad| {
            key.cipher
                .decrypt_inout_detached(&nonce, full_aad, plaintext.as_mut_slice().into(), &tag)
        });
        match result {
            Ok(()) => Ok(plaintext),
            Err(_) => {
                // The buffer holds unauthenticated plaintext; wipe it before it is freed.
                zeroize::Zeroize::zeroize(&mut plaintext);
                Err(Error::AuthenticationFailed)
            }
        }
    }
}

/// Seals `plaintext` under `key`, binding `aad`. The nonce is 96 random bits from the OS.
///
/// Random nonces stay safe for about 2^32 envelopes per key (NIST SP 800-38D, §8.3);
/// routine rotation keeps every key far below that.
pub fn seal(key: &EnvelopeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    seal_with_rng(key, aad, plaintext, rng())
}

/// [`seal`] with a caller-provided randomness source.
pub fn seal_with_rng(
    key: &EnvelopeKey,
    aad: &[u8],
    plaintext: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(Error::PlaintextTooLong);
    }
    let mut out = Vec::with_capacity(MIN_LEN + plaintext.len());
    out.push(VERSION);
    out.extend_from_slice(key.key_id.as_bytes());
    out.resize(HEADER_LEN, 0);
    rng.fill(&mut out[1 + KeyId::LEN..HEADER_LEN])
        .map_err(|_| Error::Randomness)?;
    out.extend_from_slice(plaintext);
    let (header, body) = out.split_at_mut(HEADER_LEN);
    let nonce = Nonce::try_from(&header[1 + KeyId::LEN..]).map_err(|_| Error::Randomness)?;
    let tag = with_full_aad(header, aad, |full_aad| {
        key.cipher.encrypt_inout_detached(&nonce, full_aad, body.into())
    })
    .map_err(|_| Error::PlaintextTooLong)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens an envelope, asking `lookup` for the key its header names.
pub fn open<'k>(
    envelope: &[u8],
    aad: &[u8],
    lookup: impl FnOnce(&KeyId) -> Option<&'k EnvelopeKey>,
) -> Result<Vec<u8>, Error> {
    let parsed = EnvelopeRef::parse(envelope)?;
    let key = lookup(&parsed.key_id).ok_or(Error::UnknownKey(parsed.key_id))?;
    parsed.open(key, aad)
}

/// Runs `f` with `header || aad`, on the stack when it is small (the common case), so
/// sealing costs one allocation: the envelope itself.
fn with_full_aad<R>(header: &[u8], aad: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    const STACK: usize = 256;
    let len = header.len() + aad.len();
    if len <= STACK {
        let mut buf = [0u8; STACK];
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..len].copy_from_slice(aad);
        f(&buf[..len])
    } else {
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(header);
        buf.extend_from_slice(aad);
        f(&buf)
    }
}

fn rng() -> &'static SystemRandom {
    static RNG: std::sync::OnceLock<SystemRandom> = std::sync::OnceLock::new();
    RNG.get_or_init(SystemRandom::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> EnvelopeKey {
        let rng = SystemRandom::new();
        EnvelopeKey::new(KeyId::generate(&rng).unwrap(), &MasterSecret::generate(&rng).unwrap())
    }

    proptest! {
        #[test]
        fn round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
                       aad in proptest::collection::vec(any::<u8>(), 0..600)) {
            let key = key();
            let sealed = seal(&key, &aad, &plaintext).unwrap();
            prop_assert_eq!(sealed.len(), MIN_LEN + plaintext.len());
            let opened = open(&sealed, &aad, |id| (*id == key.key_id()).then_some(&key)).unwrap();
            prop_assert_eq!(opened, plaintext);
        }

        #[test]
        fn wrong_aad_fails(plaintext in proptest::collection::vec(any::<u8>(), 0..256),
                           aad in proptest::collection::vec(any::<u8>(), 0..64),
                           other in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assume!(aad != other);
            let key = key();
            let sealed = seal(&key, &aad, &plaintext).unwrap();
            let result = open(&sealed, &other, |_| Some(&key));
            prop_assert!(matches!(result, Err(Error::AuthenticationFailed)));
        }
    }

    #[test]
    fn every_single_bit_flip_fails_to_open() {
        let key = key();
        let sealed = seal(&key, b"context", b"a short secret message").unwrap();
        for bit in 0..sealed.len() * 8 {
            let mut tampered = sealed.clone();
            tampered[bit / 8] ^= 1 << (bit % 8);
            let result = open(&tampered, b"context", |id| (*id == key.key_id()).then_some(&key));
            assert!(result.is_err(), "flip of bit {bit} still opened");
        }
    }

    #[test]
    fn distinct_errors_for_each_failure() {
        let key = key();
        let sealed = seal(&key, b"", b"x").unwrap();

        let mut versioned = sealed.clone();
        versioned[0] = 2;
        assert_eq!(open(&versioned, b"", |_| Some(&key)), Err(Error::UnknownVersion(2)));

        assert_eq!(
            open(&sealed[..MIN_LEN - 1], b"", |_| Some(&key)),
            Err(Error::Truncated {
                len: MIN_LEN - 1,
                min: MIN_LEN
            })
        );
        assert_eq!(
            open(&[], b"", |_| Some(&key)),
            Err(Error::Truncated { len: 0, min: MIN_LEN })
        );

        assert_eq!(open(&sealed, b"", |_| None), Err(Error::UnknownKey(key.key_id())));

        let other = self::key();
        assert_eq!(
            open(&sealed, b"", |_| Some(&other)),
            Err(Error::UnknownKey(key.key_id()))
        );

        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(open(&flipped, b"", |_| Some(&key)), Err(Error::AuthenticationFailed));
    }

    #[test]
    fn nonces_differ_between_seals() {
        let key = key();
        let a = seal(&key, b"", b"same").unwrap();
        let b = seal(&key, b"", b"same").unwrap();
        assert_ne!(a[17..29], b[17..29]);
        assert_ne!(a, b);
    }

    #[test]
    fn debug_hides_the_key_schedule() {
        let key = key();
        let text = format!("{key:?}");
        assert!(text.contains("redacted"));
        assert!(text.contains(&key.key_id().to_string()));
    }
}
