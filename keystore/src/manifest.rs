//! The store's manifest: an authenticated list of every key the store holds, so that a
//! row deleted (or added, or put back from an older copy) by someone who can write the
//! file but does not hold the KEK is found, and named, when the store is opened.
//!
//! Each wrapped key already binds its own row (see `wrap`); what a row cannot show is
//! that another row is *missing*. The manifest is kept in the `meta` table and rewritten
//! in the same transaction as every change to the key set.
//!
//! Encoding (all integers big-endian):
//!
//! ```text
//! 0    1   format version (0x01)
//! 1    8   epoch (u64): the keyring epoch of the store when it was written
//! 9    4   key count N (u32)
//! 13   N × 33 records, sorted by key id, strictly ascending:
//!          key id (16) || generation (u64) || lifecycle (u8, 0..=3) ||
//!          created_at (unix seconds, i64)
//! end  32  HMAC-SHA256 tag
//! ```
//!
//! The tag is HMAC-SHA256 under the [`ManifestKey`] (HKDF-SHA256 from the KEK) over
//! `"sso-keystore/manifest/v1" || body length (u64) || store id (16) || body`, where
//! `body` is everything before the tag. Binding the store id means a manifest copied from
//! another store under the same KEK does not verify.
//!
//! What the manifest cannot see: a copy of the *whole* file (rows, manifest and epoch
//! together) from an earlier day is consistent and verifies. SECURITY.md says so.

use ring::hmac;
use sso_proto::KeyId;
use zeroize::Zeroizing;

/// Version byte of the encoding this build writes and reads.
pub const MANIFEST_VERSION: u8 = 1;
const MAC_CONTEXT: &[u8] = b"sso-keystore/manifest/v1";
const HEADER_LEN: usize = 1 + 8 + 4;
/// Length of one key's record.
pub const RECORD_LEN: usize = 16 + 8 + 1 + 8;
const TAG_LEN: usize = 32;
/// Most keys a manifest may list. Far above any real store (a key a day for 270 years);
/// with the exact-length check, decoding never allocates more than the input's size.
pub const MAX_KEYS: usize = 100_000;

/// The HMAC key that authenticates a store's manifest, derived from the KEK. The raw
/// bytes are wiped on drop; ring's HMAC state is built per use.
pub(crate) struct ManifestKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for ManifestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManifestKey([redacted])")
    }
}

impl ManifestKey {
    /// HKDF-SHA256 from the KEK, with a salt and info naming this use only.
    pub(crate) fn derive(kek: &[u8; 32]) -> Self {
        struct Len;
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, MAC_CONTEXT);
        let prk = salt.extract(kek);
        // expand/fill only fail for lengths above 255 * 32 bytes.
        if let Ok(okm) = prk.expand(&[b"sso keystore manifest hmac key"], Len) {
            let _ = okm.fill(raw.as_mut());
        }
        Self(raw)
    }

    /// A key from raw bytes (fuzzing and tests).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Zeroizing::new(*bytes))
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.0.as_ref())
    }
}

/// One key as the manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The key's id.
    pub key_id: KeyId,
    /// Its generation.
    pub generation: u64,
    /// Its stored lifecycle's code ([`crate::model::Lifecycle::code`]).
    pub lifecycle: u8,
    /// Its creation time, unix seconds.
    pub created_at: i64,
}

/// The key set of a store at one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The keyring epoch the manifest was written at.
    pub epoch: u64,
    /// Every key, sorted by key id.
    pub entries: Vec<ManifestEntry>,
}

/// Why manifest bytes were refused. Every variant means the manifest was edited,
/// truncated or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestProblem {
    /// Shorter than a header and a tag.
    TooShort(usize),
    /// A version byte this build does not know.
    Version(u8),
    /// More keys than [`MAX_KEYS`].
    TooManyKeys(u32),
    /// The length does not match the declared key count.
    Length {
        /// Length the count implies.
        expected: usize,
        /// Length found.
        actual: usize,
    },
    /// A lifecycle value outside 0..=3, at record `index`.
    Lifecycle {
        /// Index of the record.
        index: usize,
    },
    /// Records not in strictly ascending key id order (a duplicate, say), at `index`.
    Order {
        /// Index of the record.
        index: usize,
    },
    /// The tag does not verify: edited, or written under another KEK or for another store.
    Tag,
}

impl std::fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooShort(n) => write!(f, "the manifest is {n} bytes, too short"),
            Self::Version(v) => write!(f, "the manifest has unknown format version {v}"),
            Self::TooManyKeys(n) => write!(f, "the manifest declares {n} keys, more than {MAX_KEYS}"),
            Self::Length { expected, actual } => {
                write!(f, "the manifest is {actual} bytes, its key count implies {expected}")
            }
            Self::Lifecycle { index } => write!(f, "manifest record {index} has an unknown lifecycle"),
            Self::Order { index } => write!(f, "manifest record {index} is out of order or repeated"),
            Self::Tag => f.write_str("the manifest's tag does not verify"),
        }
    }
}

impl Manifest {
    /// A manifest for `entries` (sorted here) at `epoch`.
    pub(crate) fn new(epoch: u64, mut entries: Vec<ManifestEntry>) -> Self {
        entries.sort_unstable_by_key(|e| e.key_id);
        Self { epoch, entries }
    }

    /// Decodes the structure, without checking the tag. This is the parser the fuzz
    /// target drives: it never panics and allocates at most one entry per 33 input bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestProblem> {
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err(ManifestProblem::TooShort(bytes.len()));
        }
        let (header, rest) = bytes.split_at(HEADER_LEN);
        if header[0] != MANIFEST_VERSION {
            return Err(ManifestProblem::Version(header[0]));
        }
        let epoch = u64::from_be_bytes(be(&header[1..9]));
        let count = u32::from_be_bytes(be(&header[9..13]));
        let n = usize::try_from(count)
            .ok()
            .filter(|n| *n <= MAX_KEYS)
            .ok_or(ManifestProblem::TooManyKeys(count))?;
        let expected = HEADER_LEN + n * RECORD_LEN + TAG_LEN;
        if bytes.len() != expected {
            return Err(ManifestProblem::Length {
                expected,
                actual: bytes.len(),
            });
        }
        let records = &rest[..n * RECORD_LEN];
        let mut entries = Vec::with_capacity(n);
        for (index, r) in records.chunks_exact(RECORD_LEN).enumerate() {
            let entry = ManifestEntry {
                key_id: KeyId::from_bytes(be(&r[0..16])),
                generation: u64::from_be_bytes(be(&r[16..24])),
                lifecycle: r[24],
                created_at: i64::from_be_bytes(be(&r[25..33])),
            };
            if crate::model::Lifecycle::from_code(entry.lifecycle).is_none() {
                return Err(ManifestProblem::Lifecycle { index });
            }
            if entries.last().is_some_and(|p: &ManifestEntry| p.key_id >= entry.key_id) {
                return Err(ManifestProblem::Order { index });
            }
            entries.push(entry);
        }
        Ok(Self { epoch, entries })
    }

    /// Checks the tag in constant time (ring), then decodes.
    pub(crate) fn open(bytes: &[u8], key: &ManifestKey, store_id: &[u8; 16]) -> Result<Self, ManifestProblem> {
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err(ManifestProblem::TooShort(bytes.len()));
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        hmac::verify(&key.hmac_key(), &mac_input(store_id, body), tag).map_err(|_| ManifestProblem::Tag)?;
        Self::decode(bytes)
    }

    /// The encoding with its tag.
    pub(crate) fn seal(&self, key: &ManifestKey, store_id: &[u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.entries.len() * RECORD_LEN + TAG_LEN);
        out.push(MANIFEST_VERSION);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        // The store refuses to hold more than MAX_KEYS keys before it gets here.
        let count = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for e in &self.entries {
            out.extend_from_slice(e.key_id.as_bytes());
            out.extend_from_slice(&e.generation.to_be_bytes());
            out.push(e.lifecycle);
            out.extend_from_slice(&e.created_at.to_be_bytes());
        }
        let tag = hmac::sign(&key.hmac_key(), &mac_input(store_id, &out));
        out.extend_from_slice(tag.as_ref());
        out
    }
}

fn mac_input(store_id: &[u8; 16], body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(MAC_CONTEXT.len() + 8 + 16 + body.len());
    input.extend_from_slice(MAC_CONTEXT);
    input.extend_from_slice(&(body.len() as u64).to_be_bytes());
    input.extend_from_slice(store_id);
    input.extend_from_slice(body);
    input
}

/// A fixed-size array from a slice of exactly that length (callers slice exact ranges).
fn be<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest::new(
            7,
            vec![
                ManifestEntry {
                    key_id: KeyId::from_bytes([0x22; 16]),
                    generation: 2,
                    lifecycle: 1,
                    created_at: 1_700_000_000,
                },
                ManifestEntry {
                    key_id: KeyId::from_bytes([0x11; 16]),
                    generation: 1,
                    lifecycle: 3,
                    created_at: -5,
                },
            ],
        )
    }

    #[test]
    fn a_sealed_manifest_opens_and_any_change_fails_its_tag() {
        let key = ManifestKey::from_bytes(&[9; 32]);
        let id = [3u8; 16];
        let m = sample();
        let bytes = m.seal(&key, &id);
        assert_eq!(bytes.len(), HEADER_LEN + 2 * RECORD_LEN + TAG_LEN);
        assert_eq!(Manifest::open(&bytes, &key, &id).unwrap(), m);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(Manifest::open(&bad, &key, &id).is_err(), "byte {i}");
        }
        assert_eq!(Manifest::open(&bytes, &key, &[4u8; 16]), Err(ManifestProblem::Tag));
        let other = ManifestKey::from_bytes(&[8; 32]);
        assert_eq!(Manifest::open(&bytes, &other, &id), Err(ManifestProblem::Tag));
        assert!(Manifest::open(&bytes[..bytes.len() - 1], &key, &id).is_err());
        assert!(Manifest::open(&[], &key, &id).is_err());
    }

    #[test]
    fn decode_refuses_bad_structure_without_allocating_for_it() {
        let key = ManifestKey::from_bytes(&[9; 32]);
        let bytes = sample().seal(&key, &[0; 16]);
        let mut huge = bytes.clone();
        huge[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Manifest::decode(&huge), Err(ManifestProblem::TooManyKeys(u32::MAX)));
        let mut long = bytes.clone();
        long[9..13].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(Manifest::decode(&long), Err(ManifestProblem::Length { .. })));
        let mut state = bytes.clone();
        state[HEADER_LEN + 24] = 4;
        assert_eq!(Manifest::decode(&state), Err(ManifestProblem::Lifecycle { index: 0 }));
        let mut dup = bytes.clone();
        let first = dup[HEADER_LEN..HEADER_LEN + 16].to_vec();
        dup[HEADER_LEN + RECORD_LEN..HEADER_LEN + RECORD_LEN + 16].copy_from_slice(&first);
        assert_eq!(Manifest::decode(&dup), Err(ManifestProblem::Order { index: 1 }));
        let mut version = bytes;
        version[0] = 2;
        assert_eq!(Manifest::decode(&version), Err(ManifestProblem::Version(2)));
    }
}
