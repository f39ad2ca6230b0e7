//! Key model, wire types and the ciphertext envelope shared by the master-secret server,
//! its clients and the operator CLI, so each format is parsed, tested and fuzzed once.
//!
//! # Layout
//! - [`key`]: [`KeyId`], [`KeyState`], [`KeyMeta`] and [`MasterSecret`], the zeroizing
//!   box every 256-bit key lives in.
//! - [`envelope`]: sealing and opening client data under a master secret
//!   ([`EnvelopeKey`]); the format is specified in `docs/envelope.md`.
//! - [`delivery`]: key material sealed to a client's ephemeral X25519 key for the trip
//!   through TLS ([`delivery::Sealer`] on the server, [`delivery::Recipient`] and
//!   [`delivery::Opener`] on the client); the format is specified in
//!   `docs/key-delivery.md`.
//! - [`wire`]: every body on the wire (keyring, key, peer records, admin answers,
//!   errors): serde readers, and the one exact-size zeroizing writer for bodies that carry
//!   key material.
//! - [`json`]: messages for refused JSON bodies that never quote a value (it may be a
//!   password or a plaintext).
//! - [`fuzzing`] (feature `fuzzing`): entry points for the targets in `fuzz/`.
//!
//! Data flows one way: a server hands out `KeyMeta` + `MasterSecret`, a client turns each
//! secret into an [`EnvelopeKey`] and seals or opens with it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod delivery;
pub mod envelope;
pub mod json;
pub mod key;
pub mod nonce;
pub mod wire;

pub use envelope::{EnvelopeKey, EnvelopeRef};
pub use key::{KeyId, KeyMeta, KeyRecord, KeyState, MasterSecret, SECRET_LEN};

/// Everything that can go wrong in this crate. Messages never contain key bytes, plaintext
/// or raw input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The envelope's first byte is not a version this build understands.
    #[error("unknown envelope version {0:#04x}: sealed by a newer release? upgrade this client")]
    UnknownVersion(u8),
    /// Fewer bytes than the smallest well-formed envelope.
    #[error("envelope is truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// The minimum for a well-formed envelope.
        min: usize,
    },
    /// The envelope names a key that the caller does not hold.
    #[error("envelope was sealed under key {0}, which is not available here")]
    UnknownKey(KeyId),
    /// Tag check failed: wrong key, wrong associated data, or the bytes were changed.
    #[error("envelope failed authentication: wrong associated data, or the envelope was modified")]
    AuthenticationFailed,
    /// The plaintext exceeds [`envelope::MAX_PLAINTEXT_LEN`].
    #[error("plaintext is too long to seal in one envelope")]
    PlaintextTooLong,
    /// This key object sealed [`envelope::SEAL_LIMIT`] envelopes (2^32), the most that
    /// 96-bit random nonces allow under one key; rotate.
    #[error("this key sealed 2^32 envelopes, the limit for random 96-bit nonces: rotate to a new primary key")]
    SealLimit,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
    /// Text that should be a key id is not 32 lowercase hex characters.
    #[error("invalid key id: expected 32 lowercase hex characters")]
    InvalidKeyId,
    /// Bytes that should be a master secret have the wrong length.
    #[error("invalid key material: expected exactly 32 bytes")]
    InvalidSecretLength,
    /// A `Sso-Key-Wrap` header or a wrapped answer's field does not have the shape of
    /// `docs/key-delivery.md`; the text says which part.
    #[error("malformed wrapped key delivery: {0}")]
    MalformedWrap(&'static str),
    /// The `Sso-Key-Wrap` header names a delivery version this build does not speak.
    #[error(
        "unsupported key wrap version: this build speaks `v1` (header `Sso-Key-Wrap: v1 <base64 X25519 public key>`)"
    )]
    UnsupportedWrapVersion,
    /// The client's X25519 public key cannot be agreed with (a low-order point).
    #[error("the Sso-Key-Wrap public key was refused: not a usable X25519 public key")]
    BadRecipientKey,
    /// A wrapped key failed authentication: sealed to another client or for another
    /// request, moved within the answer, or modified.
    #[error("wrapped key material failed authentication: sealed for another request or client, or modified")]
    UnwrapFailed,
}

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
