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

use std::sync::atomic::{AtomicU64, Ordering};

use graviola::aead::AesGcm;
use ring::rand::SecureRandom;

use crate::{Error, KeyId, MasterSecret};

/// The only envelope version this build writes and reads.
pub const VERSION: u8 = 0x01;
/// Bytes before the ciphertext: version, key id, nonce.
pub const HEADER_LEN: usize = 1 + KeyId::LEN + NONCE_LEN;
/// Length of the random nonce.
pub const NONCE_LEN: usize = crate::nonce::NONCE_LEN;
/// Length of the GCM tag at the end.
pub const TAG_LEN: usize = 16;
/// The shortest well-formed envelope: an empty plaintext.
pub const MIN_LEN: usize = HEADER_LEN + TAG_LEN;
/// Largest plaintext accepted, well under GCM's limit of 2^36 - 32 bytes.
pub const MAX_PLAINTEXT_LEN: usize = 1 << 32;
/// Seals one [`EnvelopeKey`] performs before it refuses with [`Error::SealLimit`]: with
/// 96-bit random nonces, 2^32 messages under one key keep the chance of any nonce
/// repeating below 2^-32 (NIST SP 800-38D §8.3). Counted per key object, that is per
/// process: the fleet-wide bound is rotation (docs/envelope.md).
pub const SEAL_LIMIT: u64 = 1 << 32;

/// A master secret ready to seal and open envelopes: its id and the expanded AES key
/// schedule with its GHASH table. Both are key material: they live in one heap block that
/// graviola wipes when the key is dropped, and are never moved once boxed (the
/// memory-scan test, `tests/tests/client_memory.rs`, looks for the raw key and the
/// round keys that follow it after a key is dropped).
pub struct EnvelopeKey {
    key_id: KeyId,
    cipher: Cipher,
    seals: AtomicU64,
}

/// The AES-256-GCM behind a key. graviola needs an x86_64 CPU with AES-NI, PCLMULQDQ,
/// AVX2, BMI1 and ADX (Intel Broadwell, AMD Zen and later) or aarch64, and panics on
/// anything less; there RustCrypto `aes-gcm` (its schedule also zeroized on drop) takes
/// over, at about twice ring's cost (docs/benchmarks.md).
enum Cipher {
    Graviola(Box<AesGcm>),
    RustCrypto(Box<aes_gcm::Aes256Gcm>),
}

impl Cipher {
    fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        inout: &mut [u8],
        tag: &mut [u8; TAG_LEN],
    ) -> Result<(), Error> {
        match self {
            Cipher::Graviola(c) => c.encrypt(nonce, aad, inout, tag),
            Cipher::RustCrypto(c) => {
                use aes_gcm::aead::AeadInOut;
                let t = c
                    .encrypt_inout_detached(nonce.into(), aad, inout.into())
                    .map_err(|_| Error::PlaintextTooLong)?;
                tag.copy_from_slice(&t);
            }
        }
        Ok(())
    }

    fn decrypt(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], inout: &mut [u8], tag: &[u8]) -> Result<(), ()> {
        match self {
            Cipher::Graviola(c) => c.decrypt(nonce, aad, inout, tag).map_err(|_| ()),
            Cipher::RustCrypto(c) => {
                use aes_gcm::aead::AeadInOut;
                let tag = aes_gcm::Tag::try_from(tag).map_err(|_| ())?;
                c.decrypt_inout_detached(nonce.into(), aad, inout.into(), &tag)
                    .map_err(|_| ())
            }
        }
    }
}

impl EnvelopeKey {
    /// Expands `secret` for envelope use under `key_id`.
    pub fn new(key_id: KeyId, secret: &MasterSecret) -> Self {
        Self::with_graviola(key_id, secret, graviola::util::is_cpu_supported())
    }

    fn with_graviola(key_id: KeyId, secret: &MasterSecret, graviola: bool) -> Self {
        let cipher = expand(secret, graviola);
        // The expansion ran in frames below this one and left temporaries there (the
        // cipher before it was boxed, graviola's GHASH key); overwrite them.
        scrub_stack();
        Self {
            key_id,
            cipher,
            seals: AtomicU64::new(0),
        }
    }

    /// The id written into every envelope this key seals.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Envelopes sealed with this key object so far (see [`SEAL_LIMIT`]).
    pub fn seals(&self) -> u64 {
        self.seals.load(Ordering::Relaxed)
    }
}

/// Expands the key in its own frame, so every stack temporary of the expansion lies below
/// the caller's frame, where [`scrub_stack`] reaches it.
#[inline(never)]
fn expand(secret: &MasterSecret, graviola: bool) -> Cipher {
    if graviola {
        Cipher::Graviola(Box::new(AesGcm::new(secret.expose_secret())))
    } else {
        use aes_gcm::aead::KeyInit;
        Cipher::RustCrypto(Box::new(aes_gcm::Aes256Gcm::new(secret.expose_secret().into())))
    }
}

/// Overwrites the 16 KiB of stack below the caller's frame with zeros (volatile writes the
/// compiler may not drop).
#[inline(never)]
fn scrub_stack() {
    let mut area = [0u8; 16 * 1024];
    zeroize::Zeroize::zeroize(&mut area[..]);
    std::hint::black_box(&area);
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
        let nonce: &[u8; NONCE_LEN] = self.nonce.try_into().map_err(|_| Error::AuthenticationFailed)?;
        let mut plaintext = self.ciphertext.to_vec();
        let result = with_full_aad(self.header, aad, |full_aad| {
            key.cipher.decrypt(nonce, full_aad, &mut plaintext, self.tag)
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

/// Seals `plaintext` under `key`, binding `aad`. The nonce is 96 random bits from this
/// thread's buffer of OS randomness ([`crate::nonce`]), fork-safe.
///
/// Random nonces stay safe for 2^32 envelopes per key (NIST SP 800-38D, §8.3); a key
/// object refuses to seal more than [`SEAL_LIMIT`] ([`Error::SealLimit`]), and routine
/// rotation keeps every key far below that.
pub fn seal(key: &EnvelopeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    seal_inner(key, aad, plaintext, crate::nonce::fill)
}

/// [`seal`] with a caller-provided randomness source for the nonce.
pub fn seal_with_rng(
    key: &EnvelopeKey,
    aad: &[u8],
    plaintext: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    seal_inner(key, aad, plaintext, |nonce| {
        rng.fill(nonce).map_err(|_| Error::Randomness)
    })
}

fn seal_inner(
    key: &EnvelopeKey,
    aad: &[u8],
    plaintext: &[u8],
    nonce_source: impl FnOnce(&mut [u8; NONCE_LEN]) -> Result<(), Error>,
) -> Result<Vec<u8>, Error> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(Error::PlaintextTooLong);
    }
    if key.seals.fetch_add(1, Ordering::Relaxed) >= SEAL_LIMIT {
        // Stays at the limit (a u64 does not wrap in practice: 2^64 failed calls).
        return Err(Error::SealLimit);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce_source(&mut nonce)?;
    let mut out = Vec::with_capacity(MIN_LEN + plaintext.len());
    out.push(VERSION);
    out.extend_from_slice(key.key_id.as_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let (header, body) = out.split_at_mut(HEADER_LEN);
    let mut tag = [0u8; TAG_LEN];
    with_full_aad(header, aad, |full_aad| {
        key.cipher.encrypt(&nonce, full_aad, body, &mut tag)
    })?;
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
/// sealing costs one allocation: the envelope itself. A short AAD gets a 64-byte buffer:
/// zeroing the 256-byte one was about a tenth of a 64-byte seal (docs/benchmarks.md).
fn with_full_aad<R>(header: &[u8], aad: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    const SMALL: usize = 64;
    const STACK: usize = 256;
    let len = header.len() + aad.len();
    if len <= SMALL {
        let mut buf = [0u8; SMALL];
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..len].copy_from_slice(aad);
        f(&buf[..len])
    } else if len <= STACK {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

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
    fn a_key_refuses_to_seal_past_the_nonce_limit() {
        let key = key();
        key.seals.store(SEAL_LIMIT - 1, Ordering::Relaxed);
        assert!(seal(&key, b"", b"last").is_ok());
        assert_eq!(seal(&key, b"", b"one too many"), Err(Error::SealLimit));
        assert_eq!(seal(&key, b"", b"still refused"), Err(Error::SealLimit));
        assert!(key.seals() > SEAL_LIMIT);
    }

    #[test]
    fn ring_opens_what_was_sealed_with_every_size_of_aad_buffer() {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let rng = SystemRandom::new();
        let secret = MasterSecret::generate(&rng).unwrap();
        let key = EnvelopeKey::new(KeyId::generate(&rng).unwrap(), &secret);
        let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, secret.expose_secret()).unwrap());
        // header || aad on either side of the 64- and 256-byte stack buffers and on the heap.
        for aad_len in [0usize, 1, 34, 35, 36, 100, 226, 227, 228, 229, 600] {
            let aad: Vec<u8> = (0..aad_len).map(|i| (i * 7) as u8).collect();
            let plaintext = [0x5au8; 64];
            let sealed = seal(&key, &aad, &plaintext).unwrap();
            let (header, rest) = sealed.split_at(HEADER_LEN);
            let full_aad = [header, &aad].concat();
            let nonce = Nonce::try_assume_unique_for_key(&header[1 + KeyId::LEN..]).unwrap();
            let mut buf = rest.to_vec();
            let opened = ring_key.open_in_place(nonce, Aad::from(&full_aad), &mut buf).unwrap();
            assert_eq!(opened, &plaintext[..], "aad of {aad_len} bytes");
            assert_eq!(open(&sealed, &aad, |_| Some(&key)).unwrap(), plaintext);
        }
    }

    #[test]
    fn opens_what_ring_sealed_and_ring_opens_what_it_sealed() {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let rng = SystemRandom::new();
        let secret = MasterSecret::generate(&rng).unwrap();
        let key = EnvelopeKey::new(KeyId::generate(&rng).unwrap(), &secret);
        let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, secret.expose_secret()).unwrap());
        for len in [0usize, 1, 15, 16, 17, 64, 255, 1024, 4099] {
            let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = seal(&key, b"aad", &plaintext).unwrap();
            let (header, rest) = sealed.split_at(HEADER_LEN);
            let mut full_aad = header.to_vec();
            full_aad.extend_from_slice(b"aad");
            let nonce = Nonce::try_assume_unique_for_key(&header[1 + KeyId::LEN..]).unwrap();
            let mut buf = rest.to_vec();
            let opened = ring_key.open_in_place(nonce, Aad::from(&full_aad), &mut buf).unwrap();
            assert_eq!(opened, &plaintext[..]);

            let mut by_ring = plaintext.clone();
            let tag = ring_key
                .seal_in_place_separate_tag(
                    Nonce::try_assume_unique_for_key(&header[1 + KeyId::LEN..]).unwrap(),
                    Aad::from(&full_aad),
                    &mut by_ring,
                )
                .unwrap();
            let mut envelope = header.to_vec();
            envelope.extend_from_slice(&by_ring);
            envelope.extend_from_slice(tag.as_ref());
            assert_eq!(envelope, sealed, "same key, nonce and AAD give the same bytes as ring");
            assert_eq!(open(&envelope, b"aad", |_| Some(&key)).unwrap(), plaintext);
        }
    }

    #[test]
    fn the_fallback_cipher_for_older_cpus_interoperates_with_graviola() {
        let rng = SystemRandom::new();
        let secret = MasterSecret::generate(&rng).unwrap();
        let id = KeyId::generate(&rng).unwrap();
        let fast = EnvelopeKey::with_graviola(id, &secret, true);
        let fallback = EnvelopeKey::with_graviola(id, &secret, false);
        assert!(matches!(fast.cipher, Cipher::Graviola(_)));
        assert!(matches!(fallback.cipher, Cipher::RustCrypto(_)));
        for len in [0usize, 1, 16, 64, 1000] {
            let plaintext = vec![0xa5u8; len];
            let a = seal(&fast, b"ctx", &plaintext).unwrap();
            let b = seal(&fallback, b"ctx", &plaintext).unwrap();
            assert_eq!(open(&a, b"ctx", |_| Some(&fallback)).unwrap(), plaintext);
            assert_eq!(open(&b, b"ctx", |_| Some(&fast)).unwrap(), plaintext);
            let mut bad = b.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert_eq!(
                open(&bad, b"ctx", |_| Some(&fallback)),
                Err(Error::AuthenticationFailed)
            );
        }
    }

    #[test]
    fn debug_hides_the_key_schedule() {
        let key = key();
        let text = format!("{key:?}");
        assert!(text.contains("redacted"));
        assert!(text.contains(&key.key_id().to_string()));
    }
}
