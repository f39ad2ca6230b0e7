//! Backup files: every non-destroyed key with its metadata, sealed under a backup
//! password, with a plaintext hint that can be read without it.
//!
//! The byte layout is specified in `docs/backup-format.md`; in short, an authenticated
//! plaintext header (magic, version, hint, origin, argon2id parameters, salt, password
//! verifier, nonce, payload length) followed by one AES-256-GCM payload whose associated
//! data is the whole header. A wrong password is told apart from a damaged file by the
//! verifier; truncation by the declared length.

use std::path::Path;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};
use sso_proto::{KeyId, KeyMeta, MasterSecret, SECRET_LEN};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::model::{KeyRecord, Lifecycle};
use crate::unseal::KdfParams;
use crate::{Error, Result};

/// First eight bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"SSOBKUP\0";
/// The format version this build writes (and the only one it reads).
pub const FORMAT_VERSION: u8 = 1;
/// Longest hint accepted, in bytes.
pub const MAX_HINT_LEN: usize = 1024;
/// Most keys one backup may hold; bounds what a crafted file can make a restore allocate.
pub const MAX_KEYS: u32 = 1 << 20;

const SALT_LEN: usize = 16;
const VERIFIER_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What can be read from a backup without its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Format version.
    pub version: u8,
    /// The operator's password hint, in plaintext.
    pub hint: String,
    /// When the backup was written.
    pub created_at: OffsetDateTime,
    /// The node it was written from.
    pub node: String,
    /// argon2id cost used for the password.
    pub kdf: KdfParams,
}

/// A backup made but not yet confirmed as safely stored. Call
/// [`crate::Store::confirm_backup`] once the bytes are durable, so status stops reporting
/// its keys as uncovered.
#[derive(Debug)]
pub struct PendingBackup {
    /// The sealed file contents (no plaintext secrets).
    pub bytes: Vec<u8>,
    /// What the header says.
    pub info: BackupInfo,
    pub(crate) key_ids: Vec<KeyId>,
}

/// The parsed, not yet authenticated, parts of a backup file.
#[derive(Debug)]
struct Parsed<'a> {
    info: BackupInfo,
    salt: &'a [u8],
    verifier: &'a [u8],
    nonce: &'a [u8],
    header: &'a [u8],
    payload: &'a [u8],
}

/// A cursor over untrusted bytes that reports running out as truncation.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(Error::BackupTruncated {
                expected: (self.pos as u64).saturating_add(n as u64),
                actual: self.bytes.len() as u64,
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.array()?))
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>> {
    // Check the magic and version before anything else, so a file from a newer release is
    // reported as such rather than as truncated or malformed.
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        if MAGIC.starts_with(bytes) && !bytes.is_empty() {
            return Err(Error::BackupTruncated {
                expected: MAGIC.len() as u64 + 1,
                actual: bytes.len() as u64,
            });
        }
        return Err(Error::NotABackup);
    }
    let mut r = Reader {
        bytes,
        pos: MAGIC.len(),
    };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedBackupVersion(version));
    }
    let hint_len = usize::from(r.u16()?);
    if hint_len > MAX_HINT_LEN {
        return Err(Error::BackupMalformed("hint longer than 1024 bytes"));
    }
    let hint = std::str::from_utf8(r.take(hint_len)?).map_err(|_| Error::BackupMalformed("hint is not UTF-8"))?;
    let created_at = OffsetDateTime::from_unix_timestamp(r.i64()?)
        .map_err(|_| Error::BackupMalformed("creation time out of range"))?;
    let node_len = usize::from(r.u8()?);
    let node = std::str::from_utf8(r.take(node_len)?).map_err(|_| Error::BackupMalformed("node name is not UTF-8"))?;
    let kdf = KdfParams {
        memory_kib: r.u32()?,
        passes: r.u32()?,
        lanes: r.u32()?,
    };
    let kdf = kdf.validate_for_file().map_err(Error::BackupMalformed)?;
    let salt = r.take(SALT_LEN)?;
    let verifier = r.take(VERIFIER_LEN)?;
    let nonce = r.take(NONCE_LEN)?;
    let payload_len = r.u32()? as usize;
    let header = &bytes[..r.pos];
    if payload_len < TAG_LEN {
        return Err(Error::BackupMalformed("payload shorter than its authentication tag"));
    }
    let expected = (r.pos as u64) + payload_len as u64;
    if (bytes.len() as u64) < expected {
        return Err(Error::BackupTruncated {
            expected,
            actual: bytes.len() as u64,
        });
    }
    if (bytes.len() as u64) > expected {
        return Err(Error::BackupMalformed("trailing bytes after the payload"));
    }
    let payload = r.take(payload_len)?;
    Ok(Parsed {
        info: BackupInfo {
            version,
            hint: hint.to_owned(),
            created_at,
            node: node.to_owned(),
            kdf,
        },
        salt,
        verifier,
        nonce,
        header,
        payload,
    })
}

/// Reads what a backup says about itself without the password: the hint first of all.
pub fn read_info(bytes: &[u8]) -> Result<BackupInfo> {
    Ok(parse(bytes)?.info)
}

/// Reads a backup file's header from disk.
pub fn read_info_file(path: &Path) -> Result<BackupInfo> {
    let bytes = std::fs::read(path).map_err(|source| Error::io(path, source))?;
    read_info(&bytes)
}

/// Derives the payload key and the password verifier: argon2id gives 64 bytes, the first
/// half seals the payload, the second half is stored so a wrong password can be told from
/// a damaged file. The halves are independent outputs of one Blake2b-512 call, so the
/// stored half reveals nothing about the key half.
fn derive(password: &SecretString, kdf: KdfParams, salt: &[u8]) -> Result<(Aes256Gcm, Zeroizing<[u8; VERIFIER_LEN]>)> {
    let mut out = Zeroizing::new([0u8; 32 + VERIFIER_LEN]);
    kdf.derive(password.expose_secret().as_bytes(), salt, out.as_mut())?;
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&out[..32]);
    let mut verifier = Zeroizing::new([0u8; VERIFIER_LEN]);
    verifier.copy_from_slice(&out[32..]);
    Ok((Aes256Gcm::new((&*key).into()), verifier))
}

/// Opens a backup with its password and decodes its keys.
pub fn open(bytes: &[u8], password: &SecretString) -> Result<Vec<KeyRecord>> {
    let parsed = parse(bytes)?;
    let (cipher, verifier) = derive(password, parsed.info.kdf, parsed.salt)?;
    if !bool::from(verifier.as_slice().ct_eq(parsed.verifier)) {
        return Err(Error::WrongBackupPassword);
    }
    let (ciphertext, tag) = parsed.payload.split_at(parsed.payload.len() - TAG_LEN);
    let nonce = Nonce::try_from(parsed.nonce).map_err(|_| Error::BackupTampered)?;
    let tag = Tag::try_from(tag).map_err(|_| Error::BackupTampered)?;
    let mut plaintext = Zeroizing::new(ciphertext.to_vec());
    cipher
        .decrypt_inout_detached(&nonce, parsed.header, plaintext.as_mut_slice().into(), &tag)
        .map_err(|_| Error::BackupTampered)?;
    // An authenticated payload that does not decode was written by a broken or hostile
    // writer that knew the password; report it as damage all the same.
    decode_payload(&plaintext).map_err(|_| Error::BackupTampered)
}

/// Decodes a decrypted payload. Exposed to the fuzz target through `fuzzing`.
pub(crate) fn decode_payload(bytes: &[u8]) -> Result<Vec<KeyRecord>> {
    let malformed = Error::BackupMalformed;
    let mut r = Reader { bytes, pos: 0 };
    let count = r.u32()?;
    if count > MAX_KEYS {
        return Err(malformed("too many keys"));
    }
    let mut records = Vec::with_capacity((count as usize).min(bytes.len() / 70 + 1));
    for _ in 0..count {
        let key_id = KeyId::from_bytes(r.array()?);
        let generation = r.u64()?;
        let created_at =
            OffsetDateTime::from_unix_timestamp(r.i64()?).map_err(|_| malformed("creation time out of range"))?;
        // The stored lifecycle's code (docs/backup-format.md); a backup holds material, so
        // never a destroyed key.
        let state = match Lifecycle::from_code(r.u8()?) {
            Some(lifecycle) if lifecycle.keeps_material() => lifecycle.state(false),
            _ => return Err(malformed("unknown key state")),
        };
        let origin_len = usize::from(r.u8()?);
        let origin = std::str::from_utf8(r.take(origin_len)?)
            .map_err(|_| malformed("origin is not UTF-8"))?
            .to_owned();
        let secret = MasterSecret::copy_from_slice(r.take(SECRET_LEN)?).map_err(|_| malformed("bad key length"))?;
        records.push(KeyRecord {
            meta: KeyMeta {
                key_id,
                generation,
                created_at,
                origin,
                state,
            },
            secret: Some(secret),
        });
    }
    if r.pos != bytes.len() {
        return Err(malformed("trailing bytes after the last key"));
    }
    Ok(records)
}

pub(crate) fn encode_payload(records: &[&KeyRecord]) -> Result<Zeroizing<Vec<u8>>> {
    let size = 4 + records
        .iter()
        .map(|r| 16 + 8 + 8 + 1 + 1 + r.meta.origin.len() + SECRET_LEN)
        .sum::<usize>();
    // Sized up front so the buffer never reallocates and leaves copies of secrets behind.
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    let count = u32::try_from(records.len()).map_err(|_| Error::BackupMalformed("too many keys"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for record in records {
        let meta = &record.meta;
        let secret = record.secret.as_ref().ok_or(Error::MalformedRecord {
            key_id: meta.key_id,
            detail: "no material to back up",
        })?;
        out.extend_from_slice(meta.key_id.as_bytes());
        out.extend_from_slice(&meta.generation.to_be_bytes());
        out.extend_from_slice(&meta.created_at.unix_timestamp().to_be_bytes());
        let lifecycle = Lifecycle::from_state(meta.state);
        if !lifecycle.keeps_material() {
            return Err(Error::MalformedRecord {
                key_id: meta.key_id,
                detail: "destroyed keys are not backed up",
            });
        }
        out.push(lifecycle.code());
        let origin = meta.origin.as_bytes();
        let origin_len = u8::try_from(origin.len()).map_err(|_| Error::MalformedRecord {
            key_id: meta.key_id,
            detail: "origin longer than 255 bytes",
        })?;
        out.push(origin_len);
        out.extend_from_slice(origin);
        out.extend_from_slice(secret.expose_secret());
    }
    debug_assert_eq!(out.len(), size);
    Ok(out)
}

/// Seals `records` (destroyed ones are skipped) into a backup file's bytes.
pub fn seal(
    records: &[KeyRecord],
    password: &SecretString,
    hint: &str,
    node: &str,
    kdf: KdfParams,
) -> Result<(Vec<u8>, BackupInfo)> {
    check_hint(hint, password)?;
    let kdf = kdf.validate_for_file().map_err(|e| Error::Kdf(e.into()))?;
    let node_len = u8::try_from(node.len()).map_err(|_| Error::BackupMalformed("node name longer than 255 bytes"))?;
    let kept: Vec<&KeyRecord> = records
        .iter()
        .filter(|r| Lifecycle::from_state(r.meta.state).keeps_material())
        .collect();
    let payload = encode_payload(&kept)?;

    let rng = SystemRandom::new();
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut salt).map_err(|_| Error::Randomness)?;
    rng.fill(&mut nonce).map_err(|_| Error::Randomness)?;
    let (cipher, verifier) = derive(password, kdf, &salt)?;
    let created_at = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let payload_len =
        u32::try_from(payload.len() + TAG_LEN).map_err(|_| Error::BackupMalformed("payload too large"))?;

    let mut out = Vec::with_capacity(200 + hint.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&(hint.len() as u16).to_be_bytes());
    out.extend_from_slice(hint.as_bytes());
    out.extend_from_slice(&created_at.unix_timestamp().to_be_bytes());
    out.push(node_len);
    out.extend_from_slice(node.as_bytes());
    for v in [kdf.memory_kib, kdf.passes, kdf.lanes] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&salt);
    out.extend_from_slice(verifier.as_slice());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&payload_len.to_be_bytes());
    let header_len = out.len();
    out.extend_from_slice(&payload);
    let (header, body) = out.split_at_mut(header_len);
    let nonce = Nonce::try_from(&nonce[..]).map_err(|_| Error::Randomness)?;
    let tag = cipher
        .encrypt_inout_detached(&nonce, header, body.into())
        .map_err(|_| Error::BackupMalformed("payload too large"))?;
    out.extend_from_slice(&tag);
    let info = BackupInfo {
        version: FORMAT_VERSION,
        hint: hint.to_owned(),
        created_at,
        node: node.to_owned(),
        kdf,
    };
    Ok((out, info))
}

/// The hint is stored in plaintext: refuse one that gives the password away.
fn check_hint(hint: &str, password: &SecretString) -> Result<()> {
    if hint.len() > MAX_HINT_LEN {
        return Err(Error::BackupMalformed("hint longer than 1024 bytes"));
    }
    let password = password.expose_secret();
    if password.is_empty() {
        return Err(Error::EmptyPassphrase);
    }
    if hint.to_lowercase().contains(&password.to_lowercase()) {
        return Err(Error::BackupMalformed(
            "the hint contains the password; choose a hint that only reminds you of it",
        ));
    }
    Ok(())
}

/// Seals `records` (from [`crate::Store::export`]) into a pending backup. Runs the KDF:
/// call it without holding any lock on the store, then confirm under the lock.
pub fn seal_pending(
    records: &[KeyRecord],
    password: &SecretString,
    hint: &str,
    node: &str,
    kdf: KdfParams,
) -> Result<PendingBackup> {
    let (bytes, info) = seal(records, password, hint, node, kdf)?;
    let key_ids = records
        .iter()
        .filter(|r| r.secret.is_some())
        .map(|r| r.meta.key_id)
        .collect();
    Ok(PendingBackup { bytes, info, key_ids })
}

/// A backup opened with its password, ready to merge: the KDF has run, the store has not
/// been touched. Split from [`crate::Store::restore_backup`] so a server can run the
/// (deliberately slow) KDF without holding its store lock.
#[derive(Debug)]
pub struct OpenedBackup {
    pub(crate) records: Vec<KeyRecord>,
    pub(crate) created_at: OffsetDateTime,
}

/// Opens a backup file: parses and bounds its header, runs the KDF, authenticates and
/// decodes the payload. Nothing is written anywhere.
pub fn open_file(bytes: &[u8], password: &SecretString) -> Result<OpenedBackup> {
    let info = read_info(bytes)?;
    let records = open(bytes, password)?;
    Ok(OpenedBackup {
        records,
        created_at: info.created_at,
    })
}

impl OpenedBackup {
    /// When the backup was written.
    pub fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }
}

/// What merging a backup would do to a store, worked out before anything is written.
#[derive(Debug, Clone, Default)]
pub struct RestorePlan {
    /// Keys in the backup that the store holds as destroyed: the merge keeps them
    /// destroyed (states only move forward), their material is not restored.
    pub destroyed: Vec<KeyId>,
    /// Keys in the backup that the store does not know: the merge would add them.
    pub unknown: Vec<KeyId>,
    /// Keys in the backup that the store already holds, not destroyed.
    pub known: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use sso_proto::KeyState;

    fn record(n: u8, state: KeyState) -> KeyRecord {
        KeyRecord {
            meta: KeyMeta {
                key_id: KeyId::from_bytes([n; 16]),
                generation: u64::from(n),
                created_at: OffsetDateTime::UNIX_EPOCH,
                origin: "a".into(),
                state,
            },
            secret: (state != KeyState::Destroyed).then(|| MasterSecret::take_from(&mut [n; SECRET_LEN])),
        }
    }

    /// The payload's state byte is docs/backup-format.md's: 0 staged, 1 promoted (primary
    /// or active, read back as active), 2 retired; a destroyed key is neither written nor
    /// read (3 is refused like any unknown byte).
    #[test]
    fn the_state_byte_is_the_documented_one() {
        let states = [KeyState::Staged, KeyState::Primary, KeyState::Active, KeyState::Retired];
        let records: Vec<KeyRecord> = (1..).zip(states).map(|(n, s)| record(n, s)).collect();
        let payload = encode_payload(&records.iter().collect::<Vec<_>>()).unwrap();
        // count (4), then per key: id (16), generation (8), created (8), state (1),
        // origin length (1) and origin (1), material.
        let each = 16 + 8 + 8 + 1 + 1 + 1 + SECRET_LEN;
        let bytes: Vec<u8> = (0..states.len()).map(|i| payload[4 + i * each + 32]).collect();
        assert_eq!(bytes, [0, 1, 1, 2]);
        let read: Vec<KeyState> = decode_payload(&payload).unwrap().iter().map(|r| r.meta.state).collect();
        assert_eq!(
            read,
            [KeyState::Staged, KeyState::Active, KeyState::Active, KeyState::Retired]
        );

        let mut destroyed = payload.to_vec();
        destroyed[4 + 32] = 3;
        assert!(matches!(decode_payload(&destroyed), Err(Error::BackupMalformed(_))));
        let gone = record(9, KeyState::Destroyed);
        assert!(matches!(encode_payload(&[&gone]), Err(Error::MalformedRecord { .. })));
    }
}
