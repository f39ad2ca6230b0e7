//! Key material at rest: each master secret is sealed with AES-256-GCM under the KEK,
//! with the row's identity and metadata as associated data.
//!
//! Stored blob (61 bytes):
//!
//! ```text
//! 0    1   wrap format version (0x01)
//! 1    12  nonce, random per wrap
//! 13   32  encrypted master secret
//! 45   16  GCM tag
//! ```
//!
//! AAD: `"sso-keystore/wrap" || version || key_id (16) || generation (u64 BE) ||
//! lifecycle (u8) || created_at (unix nanoseconds, i128 BE) || origin length (u16 BE) ||
//! origin`. Copying a blob to another row, or editing any of those columns, makes
//! unwrapping fail, which the store reports as an integrity error.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ring::rand::{SecureRandom, SystemRandom};
use sso_proto::{KeyId, MasterSecret, SECRET_LEN};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::Error;

/// Version byte at the start of every wrapped blob this build writes.
pub(crate) const WRAP_VERSION: u8 = 0x01;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Exact length of a wrapped blob.
pub const WRAPPED_LEN: usize = 1 + NONCE_LEN + SECRET_LEN + TAG_LEN;

/// The key-encryption key, expanded for AES-GCM, and the keys derived from it: the audit
/// chain's and the store manifest's. Wiped on drop.
pub(crate) struct Kek(Aes256Gcm, crate::audit::AuditKey, crate::manifest::ManifestKey);

impl Kek {
    pub(crate) fn new(bytes: &[u8; 32]) -> Self {
        Self(
            Aes256Gcm::new(bytes.into()),
            crate::audit::AuditKey::derive(bytes),
            crate::manifest::ManifestKey::derive(bytes),
        )
    }

    /// The audit chain's HMAC key (HKDF from the KEK).
    pub(crate) fn audit_key(&self) -> &crate::audit::AuditKey {
        &self.1
    }

    /// The store manifest's HMAC key (HKDF from the KEK, another salt and info).
    pub(crate) fn manifest_key(&self) -> &crate::manifest::ManifestKey {
        &self.2
    }

    /// Seals `plaintext` under the KEK with `aad`; output is `nonce || ciphertext || tag`.
    pub(crate) fn seal(&self, rng: &SystemRandom, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = vec![0u8; NONCE_LEN];
        rng.fill(&mut out).map_err(|_| Error::Randomness)?;
        out.extend_from_slice(plaintext);
        let (nonce, body) = out.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_from(&*nonce).map_err(|_| Error::Randomness)?;
        let tag = self
            .0
            .encrypt_inout_detached(&nonce, aad, body.into())
            .map_err(|_| Error::Randomness)?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens `nonce || ciphertext || tag`; `None` when authentication fails.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = Nonce::try_from(nonce).ok()?;
        let tag = Tag::try_from(tag).ok()?;
        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        self.0
            .decrypt_inout_detached(&nonce, aad, plaintext.as_mut_slice().into(), &tag)
            .ok()?;
        Some(plaintext)
    }
}

/// The columns of a key row that are bound into its wrapped material.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowIdentity<'a> {
    pub key_id: KeyId,
    pub generation: u64,
    pub lifecycle: u8,
    pub created_at: OffsetDateTime,
    pub origin: &'a str,
}

impl RowIdentity<'_> {
    fn aad(&self) -> Vec<u8> {
        let origin = self.origin.as_bytes();
        let mut aad = Vec::with_capacity(64 + origin.len());
        aad.extend_from_slice(b"sso-keystore/wrap");
        aad.push(WRAP_VERSION);
        aad.extend_from_slice(self.key_id.as_bytes());
        aad.extend_from_slice(&self.generation.to_be_bytes());
        aad.push(self.lifecycle);
        aad.extend_from_slice(&self.created_at.unix_timestamp_nanos().to_be_bytes());
        // Origins are node names, far shorter than 64 KiB; saturate rather than wrap.
        let len = u16::try_from(origin.len()).unwrap_or(u16::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(origin);
        aad
    }
}

/// The parts of a stored blob, checked for shape but not yet authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrappedBlob<'a> {
    /// `nonce || ciphertext || tag`.
    pub sealed: &'a [u8],
}

/// Why a stored blob could not be decoded. Every variant is an integrity failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobProblem {
    /// Not [`WRAPPED_LEN`] bytes.
    Length(usize),
    /// A version byte this build does not know.
    Version(u8),
}

impl std::fmt::Display for BlobProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Length(len) => write!(f, "wrapped material is {len} bytes, expected {WRAPPED_LEN}"),
            Self::Version(v) => write!(f, "wrapped material has unknown format version {v}"),
        }
    }
}

/// Decodes a stored blob's framing. This is the parser the fuzz target drives.
pub fn decode_blob(blob: &[u8]) -> Result<WrappedBlob<'_>, BlobProblem> {
    if blob.len() != WRAPPED_LEN {
        return Err(BlobProblem::Length(blob.len()));
    }
    match blob[0] {
        WRAP_VERSION => Ok(WrappedBlob { sealed: &blob[1..] }),
        other => Err(BlobProblem::Version(other)),
    }
}

pub(crate) fn wrap(
    kek: &Kek,
    rng: &SystemRandom,
    row: &RowIdentity<'_>,
    secret: &MasterSecret,
) -> Result<Vec<u8>, Error> {
    let sealed = kek.seal(rng, &row.aad(), secret.expose_secret())?;
    let mut blob = Vec::with_capacity(WRAPPED_LEN);
    blob.push(WRAP_VERSION);
    blob.extend_from_slice(&sealed);
    debug_assert_eq!(blob.len(), WRAPPED_LEN);
    Ok(blob)
}

pub(crate) fn unwrap(kek: &Kek, row: &RowIdentity<'_>, blob: &[u8]) -> Result<MasterSecret, Error> {
    let integrity = |detail: String| Error::Integrity {
        key_id: Some(row.key_id),
        detail,
    };
    let decoded = decode_blob(blob).map_err(|p| integrity(p.to_string()))?;
    let plaintext = kek.open(&row.aad(), decoded.sealed).ok_or_else(|| {
        integrity("wrapped material failed authentication: the row was edited, swapped with another, or copied from another store".into())
    })?;
    MasterSecret::copy_from_slice(&plaintext).map_err(|_| integrity("wrapped material has the wrong length".into()))
}
