//! Wrapped key delivery: key material sealed to a client's ephemeral X25519 key, inside
//! TLS, so the TLS and HTTP buffers of both ends only ever hold ciphertext.
//!
//! One implementation for both ends; `docs/key-delivery.md` is the specification.
//!
//! ```text
//! client                                      server
//! Recipient::generate()  (sk_c, pk_c)
//! GET /v1/keyring
//!   Sso-Key-Wrap: v1 base64(pk_c)   ───────►  RecipientKey::parse(header)
//!                                             Sealer::new(pk_c, context): (sk_s, enc = pk_s)
//!                                             per key i: sealed_i = AES-256-GCM(k, n ^ i, aad_i, key_i)
//!                  ◄─── {"wrap":{"v":1,"enc":base64(enc)}, "keys":[{…,"sealed":base64(sealed_i)}]}
//! Recipient::opener(enc, context)  (sk_c consumed, its heap slot overwritten)
//! Opener::open(i, meta, sealed_i) → MasterSecret
//! ```
//!
//! Key schedule (HPKE-like, RFC 9180 base mode in spirit): `dh = X25519(sk, pk)`;
//! `prk = HKDF-Extract(salt = LABEL, dh)`; `k || n = HKDF-Expand(prk, LABEL || enc || pk_c, 44)`.
//! Nonce of the `i`-th key in an answer: `n XOR i` (big-endian in the last 8 bytes). The
//! AAD of each key binds the request context (its path) and the key's metadata, so a
//! sealed key cannot be moved to another request, another key id, generation or state.
//!
//! What ring does not wipe (its X25519 scalar and shared secret, its HKDF state) is kept
//! off the heap where this module can: the client's private key sits in a boxed slot
//! that is overwritten with an unused key once consumed, and the stack below the
//! derivation is scrubbed after it.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::SystemRandom;
use zeroize::{Zeroize, Zeroizing};

use crate::{Error, KeyId, KeyState, MasterSecret, SECRET_LEN};

/// The request header that carries the client's public key (lowercase, as HTTP/2 sends it).
pub const HEADER: &str = "sso-key-wrap";
/// The only delivery version this build speaks.
pub const VERSION: u8 = 1;
/// Length of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of one sealed key: the 32-byte secret and the 16-byte GCM tag.
pub const SEALED_LEN: usize = SECRET_LEN + TAG_LEN;
/// Length of a sealed key in standard base64 (48 bytes → 64 characters).
pub const SEALED_B64_LEN: usize = 64;
/// Length of a public key in standard base64 (32 bytes → 44 characters).
pub const PUBLIC_KEY_B64_LEN: usize = 44;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// Domain-separation label: HKDF salt, the start of HKDF info and of every AAD.
const LABEL: &[u8] = b"sso key delivery v1";
/// `Sso-Key-Wrap` header prefix.
const HEADER_PREFIX: &str = "v1 ";
/// Bytes of stack scrubbed after an X25519 agreement: more than ring's agreement, HKDF
/// and key generation use together.
const SCRUB_BYTES: usize = 16 * 1024;

/// The metadata a sealed key is bound to (besides the request context).
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    /// The key's id.
    pub key_id: KeyId,
    /// Its generation.
    pub generation: u64,
    /// Its state in this answer.
    pub state: KeyState,
}

/// The client's ephemeral X25519 key pair for one request.
///
/// The private key lives in a heap slot of its own. Using it ([`Recipient::opener`]) or
/// dropping the recipient overwrites that slot with a fresh, never used key, because ring
/// does not wipe its private keys and a move leaves the old bytes behind.
pub struct Recipient {
    slot: Box<Option<EphemeralPrivateKey>>,
    public: [u8; PUBLIC_KEY_LEN],
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipient")
            .field("public", &STANDARD.encode(self.public))
            .field("private", &"[redacted]")
            .finish()
    }
}

impl Recipient {
    /// A fresh key pair from the operating system's randomness.
    pub fn generate(rng: &SystemRandom) -> Result<Self, Error> {
        let mut slot = Box::new(None);
        let result = fill_slot(&mut slot, rng);
        scrub_stack();
        result?;
        let public = (*slot)
            .as_ref()
            .ok_or(Error::Randomness)?
            .compute_public_key()
            .map_err(|_| Error::Randomness)?;
        let mut bytes = [0u8; PUBLIC_KEY_LEN];
        bytes.copy_from_slice(public.as_ref());
        Ok(Self { slot, public: bytes })
    }

    /// The public key's raw bytes.
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public
    }

    /// The `Sso-Key-Wrap` request header's value: `v1 ` and the public key in standard
    /// base64.
    pub fn header_value(&self) -> String {
        format!("{HEADER_PREFIX}{}", STANDARD.encode(self.public))
    }

    /// Consumes the private key: agrees with the server's ephemeral key `enc` (standard
    /// base64, from the answer's `wrap.enc`) and derives the opener for the answer to the
    /// request at `context` (its path, without the query).
    pub fn opener(mut self, enc: &str, context: &str) -> Result<Opener, Error> {
        let mut server = [0u8; PUBLIC_KEY_LEN];
        decode_exact(enc.as_bytes(), &mut server)
            .map_err(|()| Error::MalformedWrap("wrap.enc is not 32 bytes of standard base64"))?;
        let result = take_and_derive(&mut self.slot, &server, &self.public);
        scrub_stack();
        result.map(|(cipher, base_nonce)| Opener {
            cipher,
            base_nonce,
            context: context.as_bytes().to_vec(),
        })
    }
}

/// Moves the private key out of its slot (overwriting the slot) and derives with it; every
/// copy ring makes lies in frames below the caller's, which the caller then scrubs.
#[inline(never)]
fn take_and_derive(
    slot: &mut Box<Option<EphemeralPrivateKey>>,
    server: &[u8; PUBLIC_KEY_LEN],
    recipient: &[u8; PUBLIC_KEY_LEN],
) -> Result<(Box<Aes256Gcm>, [u8; NONCE_LEN]), Error> {
    let private = slot.take().ok_or(Error::UnwrapFailed)?;
    let _ = fill_slot(slot, &SystemRandom::new());
    derive(private, server, server, recipient)
}

impl Drop for Recipient {
    fn drop(&mut self) {
        if self.slot.is_some() {
            let _ = fill_slot(&mut self.slot, &SystemRandom::new());
            scrub_stack();
        }
    }
}

/// Generates a private key into `slot`, overwriting whatever was there, and keeps the
/// write from being optimised away before the box is freed.
fn fill_slot(slot: &mut Box<Option<EphemeralPrivateKey>>, rng: &SystemRandom) -> Result<(), Error> {
    // Assigning writes the new key over the old one's bytes, in place.
    **slot = EphemeralPrivateKey::generate(&X25519, rng).ok();
    std::hint::black_box(&**slot);
    if slot.is_some() { Ok(()) } else { Err(Error::Randomness) }
}

/// Overwrites the stack below the caller's frame, where ring's agreement and HKDF left
/// their (unwiped) scalars, shared secrets and HMAC states.
fn scrub_stack() {
    scrub::<SCRUB_BYTES>();
}

/// Overwrites 64 KiB of stack below the caller's frame with zeros. Key material built by
/// value and then moved into its final (wiped-on-drop) place leaves copies in the frames
/// that built it (an AES-256 key schedule starts with the raw key); a client calls this
/// after installing keys so those copies do not outlive the call.
pub fn scrub_stack_after_install() {
    scrub::<{ 64 * 1024 }>();
}

#[inline(never)]
fn scrub<const N: usize>() {
    let mut scratch = [0u8; N];
    scratch.zeroize();
    std::hint::black_box(&scratch);
}

/// X25519 with `private`, HKDF-SHA256, and the AES-256-GCM key and base nonce.
/// `enc` is the server's ephemeral public key, `recipient` the client's.
fn derive(
    private: EphemeralPrivateKey,
    peer: &[u8; PUBLIC_KEY_LEN],
    enc: &[u8; PUBLIC_KEY_LEN],
    recipient: &[u8; PUBLIC_KEY_LEN],
) -> Result<(Box<Aes256Gcm>, [u8; NONCE_LEN]), Error> {
    let okm = agreement::agree_ephemeral(private, &UnparsedPublicKey::new(&X25519, peer), |shared| {
        let mut okm = Zeroizing::new([0u8; 32 + NONCE_LEN]);
        let filled = hkdf::Salt::new(hkdf::HKDF_SHA256, LABEL)
            .extract(shared)
            .expand(&[LABEL, enc, recipient], OkmLen)
            .and_then(|okm_ref| okm_ref.fill(okm.as_mut_slice()));
        filled.map(|()| okm)
    })
    // ring refuses a public key of the wrong length or a low-order point (all-zero
    // shared secret) here.
    .map_err(|_| Error::UnwrapFailed)?
    .map_err(|_| Error::UnwrapFailed)?;
    // Boxed: later moves move a pointer, and the one copy of the key schedule is wiped
    // in place when the box is dropped.
    let cipher = Box::new(Aes256Gcm::new_from_slice(&okm[..32]).map_err(|_| Error::UnwrapFailed)?);
    let mut base_nonce = [0u8; NONCE_LEN];
    base_nonce.copy_from_slice(&okm[32..]);
    Ok((cipher, base_nonce))
}

struct OkmLen;

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        32 + NONCE_LEN
    }
}

/// The client's public key, parsed from a request's `Sso-Key-Wrap` header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecipientKey([u8; PUBLIC_KEY_LEN]);

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecipientKey({})", STANDARD.encode(self.0))
    }
}

impl RecipientKey {
    /// Parses a header value: exactly `v1 ` and 44 characters of standard base64 that
    /// decode to 32 bytes. Anything else is [`Error::MalformedWrap`] or
    /// [`Error::UnsupportedWrapVersion`].
    pub fn parse(value: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(value).map_err(|_| Error::MalformedWrap("the header is not ASCII"))?;
        let Some(b64) = text.strip_prefix(HEADER_PREFIX) else {
            return match text.split_once(' ') {
                Some((v, _)) if v.starts_with('v') && v.len() <= 8 => Err(Error::UnsupportedWrapVersion),
                _ => Err(Error::MalformedWrap("expected `v1 ` and a base64 X25519 public key")),
            };
        };
        let mut key = [0u8; PUBLIC_KEY_LEN];
        decode_exact(b64.as_bytes(), &mut key)
            .map_err(|()| Error::MalformedWrap("the public key is not 32 bytes of standard base64"))?;
        Ok(Self(key))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }
}

/// The server's half for one answer: seals each key to the client's key, in order.
pub struct Sealer {
    cipher: Box<Aes256Gcm>,
    base_nonce: [u8; NONCE_LEN],
    enc: [u8; PUBLIC_KEY_LEN],
    context: Vec<u8>,
    next: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("enc", &STANDARD.encode(self.enc))
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A fresh server key pair, agreed with `recipient`, for the answer to the request
    /// at `context` (its path, without the query).
    pub fn new(recipient: &RecipientKey, context: &str, rng: &SystemRandom) -> Result<Self, Error> {
        let private = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| Error::Randomness)?;
        let public = private.compute_public_key().map_err(|_| Error::Randomness)?;
        let mut enc = [0u8; PUBLIC_KEY_LEN];
        enc.copy_from_slice(public.as_ref());
        let (cipher, base_nonce) =
            derive(private, &recipient.0, &enc, &recipient.0).map_err(|_| Error::BadRecipientKey)?;
        Ok(Self {
            cipher,
            base_nonce,
            enc,
            context: context.as_bytes().to_vec(),
            next: 0,
        })
    }

    /// The server's ephemeral public key, standard base64 (the answer's `wrap.enc`).
    pub fn enc(&self) -> String {
        STANDARD.encode(self.enc)
    }

    /// Seals the next key of the answer; returns it in standard base64
    /// ([`SEALED_B64_LEN`] characters).
    pub fn seal(&mut self, binding: &Binding, secret: &MasterSecret) -> Result<String, Error> {
        let seq = self.next;
        self.next = self.next.checked_add(1).ok_or(Error::PlaintextTooLong)?;
        let nonce_bytes = nonce(&self.base_nonce, seq);
        let nonce = Nonce::try_from(&nonce_bytes[..]).map_err(|_| Error::Randomness)?;
        let aad = aad(&self.context, binding);
        let mut buf = Zeroizing::new([0u8; SEALED_LEN]);
        buf[..SECRET_LEN].copy_from_slice(secret.expose_secret());
        let (body, tag_out) = buf.split_at_mut(SECRET_LEN);
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce, &aad, body.into())
            .map_err(|_| Error::PlaintextTooLong)?;
        tag_out.copy_from_slice(&tag);
        Ok(STANDARD.encode(buf.as_slice()))
    }
}

/// The client's half for one answer, once the private key has been used.
pub struct Opener {
    cipher: Box<Aes256Gcm>,
    base_nonce: [u8; NONCE_LEN],
    context: Vec<u8>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

impl Opener {
    /// Opens the `seq`-th key of the answer (its index in the answer's key list; 0 for a
    /// one-key answer), bound to `binding`, from its standard base64 text. The secret goes
    /// straight from the decryption buffer into its zeroizing box; the buffer is wiped.
    pub fn open(&self, seq: u64, binding: &Binding, sealed: &str) -> Result<MasterSecret, Error> {
        let result = self.open_inner(seq, binding, sealed);
        // AES-GCM's keystream blocks (keystream XOR ciphertext = the key) may be left on
        // the stack by the decryption below this frame.
        scrub_stack();
        result
    }

    #[inline(never)]
    fn open_inner(&self, seq: u64, binding: &Binding, sealed: &str) -> Result<MasterSecret, Error> {
        let mut buf = Zeroizing::new([0u8; SEALED_LEN]);
        decode_exact(sealed.as_bytes(), buf.as_mut_slice())
            .map_err(|()| Error::MalformedWrap("a sealed key is not 48 bytes of standard base64"))?;
        let nonce_bytes = nonce(&self.base_nonce, seq);
        let nonce = Nonce::try_from(&nonce_bytes[..]).map_err(|_| Error::UnwrapFailed)?;
        let aad = aad(&self.context, binding);
        let (body, tag) = buf.split_at_mut(SECRET_LEN);
        let tag = Tag::try_from(&tag[..]).map_err(|_| Error::UnwrapFailed)?;
        self.cipher
            .decrypt_inout_detached(&nonce, &aad, body.into(), &tag)
            .map_err(|_| Error::UnwrapFailed)?;
        MasterSecret::copy_from_slice(body)
    }
}

fn nonce(base: &[u8; NONCE_LEN], seq: u64) -> [u8; NONCE_LEN] {
    let mut n = *base;
    for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    n
}

/// `LABEL || u16 len(context) || context || key_id || generation (u64 BE) || u8 len(state) || state`.
fn aad(context: &[u8], binding: &Binding) -> Vec<u8> {
    let state = binding.state.as_str().as_bytes();
    let ctx_len = u16::try_from(context.len()).unwrap_or(u16::MAX);
    let ctx = &context[..usize::from(ctx_len)];
    let mut aad = Vec::with_capacity(LABEL.len() + 2 + ctx.len() + KeyId::LEN + 8 + 1 + state.len());
    aad.extend_from_slice(LABEL);
    aad.extend_from_slice(&ctx_len.to_be_bytes());
    aad.extend_from_slice(ctx);
    aad.extend_from_slice(binding.key_id.as_bytes());
    aad.extend_from_slice(&binding.generation.to_be_bytes());
    // State names are short ASCII words.
    aad.push(state.len() as u8);
    aad.extend_from_slice(state);
    aad
}

/// Decodes standard base64 that must fill `out` exactly.
fn decode_exact(text: &[u8], out: &mut [u8]) -> Result<(), ()> {
    // Room for any base64 of this length: decoding never writes more than 3/4 of it.
    if text.len() != out.len().div_ceil(3) * 4 {
        return Err(());
    }
    let mut scratch = Zeroizing::new([0u8; SEALED_LEN + 3]);
    let n = STANDARD.decode_slice(text, scratch.as_mut_slice()).map_err(|_| ())?;
    if n != out.len() {
        return Err(());
    }
    out.copy_from_slice(&scratch[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: &str = "/v1/keyring";

    fn binding(rng: &SystemRandom, generation: u64) -> Binding {
        Binding {
            key_id: KeyId::generate(rng).unwrap(),
            generation,
            state: KeyState::Active,
        }
    }

    /// A client key, a server answer of `n` keys to it, and the keys.
    fn answer(n: usize, context: &str) -> (Recipient, String, Vec<(Binding, MasterSecret, String)>) {
        let rng = SystemRandom::new();
        let recipient = Recipient::generate(&rng).unwrap();
        let key = RecipientKey::parse(recipient.header_value().as_bytes()).unwrap();
        assert_eq!(key.as_bytes(), recipient.public_key());
        let mut sealer = Sealer::new(&key, context, &rng).unwrap();
        let keys = (0..n)
            .map(|i| {
                let b = binding(&rng, i as u64 + 1);
                let secret = MasterSecret::generate(&rng).unwrap();
                let sealed = sealer.seal(&b, &secret).unwrap();
                assert_eq!(sealed.len(), SEALED_B64_LEN);
                (b, secret, sealed)
            })
            .collect();
        (recipient, sealer.enc(), keys)
    }

    #[test]
    fn a_sealed_keyring_round_trips() {
        let (recipient, enc, keys) = answer(5, CTX);
        let opener = recipient.opener(&enc, CTX).unwrap();
        for (i, (b, secret, sealed)) in keys.iter().enumerate() {
            let opened = opener.open(i as u64, b, sealed).unwrap();
            assert!(opened.ct_eq(secret));
            // The text on the wire is not any spelling of the key.
            assert!(!sealed.contains(&STANDARD.encode(secret.expose_secret())[..20]));
        }
    }

    #[test]
    fn every_bit_flip_of_a_sealed_key_is_refused() {
        let (recipient, enc, keys) = answer(1, CTX);
        let opener = recipient.opener(&enc, CTX).unwrap();
        let (b, _, sealed) = &keys[0];
        let raw = STANDARD.decode(sealed).unwrap();
        for bit in 0..raw.len() * 8 {
            let mut tampered = raw.clone();
            tampered[bit / 8] ^= 1 << (bit % 8);
            let result = opener.open(0, b, &STANDARD.encode(&tampered));
            assert!(matches!(result, Err(Error::UnwrapFailed)), "flip of bit {bit} opened");
        }
    }

    #[test]
    fn a_key_moved_to_another_context_position_or_binding_is_refused() {
        let (recipient, enc, keys) = answer(2, CTX);
        // Another request's context: nothing opens.
        let foreign = recipient
            .opener(&enc, "/v1/keys/00000000000000000000000000000000")
            .unwrap();
        for (i, (b, _, sealed)) in keys.iter().enumerate() {
            assert!(matches!(foreign.open(i as u64, b, sealed), Err(Error::UnwrapFailed)));
        }
        let (recipient, enc, keys) = answer(2, CTX);
        let opener = recipient.opener(&enc, CTX).unwrap();
        let [(b0, _, s0), (b1, _, s1)] = &keys[..] else {
            unreachable!()
        };
        // Swapped positions, another key's binding, another generation or state.
        assert!(matches!(opener.open(1, b0, s0), Err(Error::UnwrapFailed)));
        assert!(matches!(opener.open(0, b1, s0), Err(Error::UnwrapFailed)));
        let mut older = *b1;
        older.generation -= 1;
        assert!(matches!(opener.open(1, &older, s1), Err(Error::UnwrapFailed)));
        let mut retired = *b1;
        retired.state = KeyState::Staged;
        assert!(matches!(opener.open(1, &retired, s1), Err(Error::UnwrapFailed)));
        assert!(opener.open(1, b1, s1).is_ok());
    }

    #[test]
    fn an_answer_sealed_to_another_client_is_refused() {
        let (_, enc, keys) = answer(1, CTX);
        let stranger = Recipient::generate(&SystemRandom::new()).unwrap();
        let opener = stranger.opener(&enc, CTX).unwrap();
        assert!(matches!(
            opener.open(0, &keys[0].0, &keys[0].2),
            Err(Error::UnwrapFailed)
        ));
    }

    #[test]
    fn malformed_headers_and_fields_get_distinct_errors() {
        let rng = SystemRandom::new();
        let good = Recipient::generate(&rng).unwrap().header_value();
        assert!(RecipientKey::parse(good.as_bytes()).is_ok());
        assert_eq!(
            RecipientKey::parse(good.replacen("v1", "v2", 1).as_bytes()),
            Err(Error::UnsupportedWrapVersion)
        );
        for bad in [
            "",
            "v1",
            "v1 ",
            "x25519 AAAA",
            &good[..good.len() - 1],
            &format!("{good}A"),
            &good.replace('=', "A"),
            "v1 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=",
        ] {
            assert!(
                matches!(RecipientKey::parse(bad.as_bytes()), Err(Error::MalformedWrap(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            RecipientKey::parse(&[0xff, 0xfe]),
            Err(Error::MalformedWrap(_))
        ));
        // A low-order point (all zeros): the server refuses to seal to it.
        let zero = format!("v1 {}", STANDARD.encode([0u8; 32]));
        let key = RecipientKey::parse(zero.as_bytes()).unwrap();
        assert_eq!(Sealer::new(&key, CTX, &rng).unwrap_err(), Error::BadRecipientKey);
        // A bad `enc` or sealed field.
        let (recipient, enc, keys) = answer(1, CTX);
        assert!(matches!(
            Recipient::generate(&rng).unwrap().opener("AAAA", CTX),
            Err(Error::MalformedWrap(_))
        ));
        let zero_enc = STANDARD.encode([0u8; 32]);
        assert_eq!(
            Recipient::generate(&rng).unwrap().opener(&zero_enc, CTX).unwrap_err(),
            Error::UnwrapFailed
        );
        let opener = recipient.opener(&enc, CTX).unwrap();
        assert!(matches!(
            opener.open(0, &keys[0].0, "short"),
            Err(Error::MalformedWrap(_))
        ));
        assert!(matches!(
            opener.open(0, &keys[0].0, &keys[0].2[..SEALED_B64_LEN - 4]),
            Err(Error::MalformedWrap(_))
        ));
    }

    #[test]
    fn errors_and_debug_never_show_key_bytes() {
        let (recipient, enc, keys) = answer(1, CTX);
        let dbg = format!("{recipient:?}");
        assert!(dbg.contains("[redacted]"));
        let opener = recipient.opener(&enc, CTX).unwrap();
        let secret_b64 = STANDARD.encode(keys[0].1.expose_secret());
        let err = opener.open(1, &keys[0].0, &keys[0].2).err().unwrap().to_string();
        assert!(!err.contains(&secret_b64) && !err.contains(&keys[0].2));
        assert!(!format!("{opener:?}").contains(&secret_b64));
    }
}
