//! What every engine does the same way, with no SQL in it: the stored row and its wrap
//! identity, the KDF header and its digest, the KEK and its check, the manifest sealed over
//! the rows and checked against them, and the body of every change (a new key, a
//! lifecycle move, a merge) written through [`RowWriter`], which each engine implements
//! over its own transaction. So SQLite ([`crate::SealedStore`]) and PostgreSQL
//! (`crate::postgres`) seal exactly alike, and the database never sees a key.

use ring::rand::SystemRandom;
use secrecy::ExposeSecret;
use sso_proto::{KeyId, KeyMeta, KeyState, MasterSecret};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::manifest::{MAX_KEYS, Manifest, ManifestEntry};
use crate::model::MergeReport;
use crate::model::{self, KeyFacts, KeyRecord, Lifecycle, MergeAction, Move};
use crate::unseal::{KEK_LEN, KdfParams, UnsealKey};
use crate::wrap::{self, Kek, RowIdentity};
use crate::{Error, Result, validate};

pub(crate) const SALT_LEN: usize = 16;
/// AAD of the KEK check in stores written before the manifest (no header digest).
pub(crate) const KEK_CHECK_AAD_V1: &[u8] = b"sso-keystore/kek-check/v1";
/// AAD prefix of the KEK check since the manifest; the header digest follows.
const KEK_CHECK_AAD_V2: &[u8] = b"sso-keystore/kek-check/v2";
const KDF_HEADER_CONTEXT: &[u8] = b"sso-keystore/kdf-header/v1";

/// One stored key, material still wrapped.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) key_id: KeyId,
    pub(crate) generation: u64,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) origin: String,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) material: Option<Vec<u8>>,
}

impl Row {
    pub(crate) fn identity(&self) -> RowIdentity<'_> {
        self.identity_as(self.lifecycle)
    }

    pub(crate) fn identity_as(&self, lifecycle: Lifecycle) -> RowIdentity<'_> {
        RowIdentity {
            key_id: self.key_id,
            generation: self.generation,
            lifecycle: lifecycle.code(),
            created_at: self.created_at,
            origin: &self.origin,
        }
    }

    pub(crate) fn facts(&self) -> KeyFacts {
        KeyFacts {
            key_id: self.key_id,
            generation: self.generation,
            lifecycle: self.lifecycle,
        }
    }

    pub(crate) fn manifest_entry(&self) -> ManifestEntry {
        ManifestEntry {
            key_id: self.key_id,
            generation: self.generation,
            lifecycle: self.lifecycle.code(),
            created_at: self.created_at.unix_timestamp(),
        }
    }

    pub(crate) fn meta(&self, primary: Option<KeyId>) -> KeyMeta {
        KeyMeta {
            key_id: self.key_id,
            generation: self.generation,
            created_at: self.created_at,
            origin: self.origin.clone(),
            state: self.lifecycle.state(primary == Some(self.key_id)),
        }
    }
}

/// The primary among `rows` ([`model::derive_primary`]).
pub(crate) fn derive_primary(rows: &[Row]) -> Option<KeyId> {
    model::derive_primary(rows.iter().map(Row::facts))
}

/// The row's material, authenticated against the row.
pub(crate) fn unwrap_row(kek: &Kek, row: &Row) -> Result<MasterSecret> {
    let blob = row.material.as_deref().ok_or_else(|| Error::Integrity {
        key_id: Some(row.key_id),
        detail: "a key that is not destroyed has no material".into(),
    })?;
    wrap::unwrap(kek, &row.identity(), blob)
}

/// Every row's metadata with the primary derived.
pub(crate) fn metas(rows: &[Row]) -> Vec<KeyMeta> {
    let primary = derive_primary(rows);
    rows.iter().map(|r| r.meta(primary)).collect()
}

/// The served keys (staged, primary, active) with their material, unwrapped.
pub(crate) fn served(kek: &Kek, rows: &[Row]) -> Result<Vec<KeyRecord>> {
    let primary = derive_primary(rows);
    rows.iter()
        .filter(|r| r.lifecycle.is_served())
        .map(|row| {
            Ok(KeyRecord {
                meta: row.meta(primary),
                secret: Some(unwrap_row(kek, row)?),
            })
        })
        .collect()
}

/// Every key, retired ones with material, destroyed ones without.
pub(crate) fn exported(kek: &Kek, rows: &[Row]) -> Result<Vec<KeyRecord>> {
    let primary = derive_primary(rows);
    rows.iter()
        .map(|row| {
            let secret = match row.lifecycle {
                Lifecycle::Destroyed => None,
                _ => Some(unwrap_row(kek, row)?),
            };
            Ok(KeyRecord {
                meta: row.meta(primary),
                secret,
            })
        })
        .collect()
}

/// The key-set digest anti-entropy compares ([`model::KeySetDigest`]).
pub(crate) fn digest(kek: &Kek, rows: &[Row]) -> Result<String> {
    let mut digest = model::KeySetDigest::new();
    for row in rows {
        let tag = match row.material {
            Some(_) => Some(model::material_tag(row.key_id, &unwrap_row(kek, row)?)),
            None => None,
        };
        digest.add(row.facts(), tag);
    }
    Ok(digest.finish())
}

/// The fields the KEK is derived from, as stored, and the store id. Read raw (before any
/// validation) so that the digest covers exactly what is stored.
pub(crate) struct KdfHeader {
    pub(crate) kind: String,
    pub(crate) memory_kib: i64,
    pub(crate) passes: i64,
    pub(crate) lanes: i64,
    pub(crate) salt: Vec<u8>,
    pub(crate) store_id: String,
}

impl KdfHeader {
    /// SHA-256 over a context string and every field, each variable one length-prefixed.
    pub(crate) fn digest(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(KDF_HEADER_CONTEXT);
        for field in [self.kind.as_bytes(), &self.salt, self.store_id.as_bytes()] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field);
        }
        for n in [self.memory_kib, self.passes, self.lanes] {
            ctx.update(&n.to_be_bytes());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    pub(crate) fn kdf(&self) -> Result<KdfParams> {
        let u = |v: i64, name: &str| {
            u32::try_from(v).map_err(|_| Error::NotAStore(format!("metadata entry {name:?} is out of range")))
        };
        Ok(KdfParams {
            memory_kib: u(self.memory_kib, "kdf_memory_kib")?,
            passes: u(self.passes, "kdf_passes")?,
            lanes: u(self.lanes, "kdf_lanes")?,
        })
    }
}

pub(crate) fn kek_check_aad(header_digest: &[u8; 32]) -> Vec<u8> {
    [KEK_CHECK_AAD_V2, header_digest].concat()
}

pub(crate) fn parse_store_id(text: &str) -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(text, &mut id)
        .map_err(|_| Error::NotAStore("the store id is not 32 hex characters".into()))?;
    Ok(id)
}

pub(crate) fn derive_kek(key: &UnsealKey, kdf: KdfParams, salt: &[u8]) -> Result<Kek> {
    match key {
        UnsealKey::KeyFile(bytes) => Ok(Kek::new(bytes.expose_secret())),
        UnsealKey::Passphrase(passphrase) => {
            let mut out = Zeroizing::new([0u8; KEK_LEN]);
            kdf.derive(passphrase.expose_secret().as_bytes(), salt, out.as_mut())?;
            Ok(Kek::new(&out))
        }
    }
}

/// The manifest of `rows` at `epoch`, sealed under the KEK's manifest key.
pub(crate) fn seal_manifest(kek: &Kek, store_id: &[u8; 16], epoch: u64, rows: &[Row]) -> Result<Vec<u8>> {
    if rows.len() > MAX_KEYS {
        return Err(Error::Integrity {
            key_id: None,
            detail: format!("the store would hold more than {MAX_KEYS} keys; nothing was written"),
        });
    }
    let entries = rows.iter().map(Row::manifest_entry).collect();
    Ok(Manifest::new(epoch, entries).seal(kek.manifest_key(), store_id))
}

/// Verifies the manifest's tag (`bytes`, `None` when it is gone) and compares it with
/// `rows` and then the stored epoch (read by `epoch` only once the rows are accounted
/// for), all read in one transaction. Missing keys are reported first (naming the
/// newest), then added rows, then edited rows, then the epoch.
pub(crate) fn check_manifest(
    bytes: Option<&[u8]>,
    epoch: impl FnOnce() -> Result<u64>,
    kek: &Kek,
    store_id: &[u8; 16],
    rows: &[Row],
) -> Result<Manifest> {
    let integrity = |key_id: Option<KeyId>, detail: String| Error::Integrity { key_id, detail };
    let Some(bytes) = bytes else {
        return Err(integrity(
            None,
            "the key manifest is missing from the store: it was deleted".into(),
        ));
    };
    let manifest = Manifest::open(bytes, kek.manifest_key(), store_id).map_err(|p| {
        integrity(
            None,
            format!("the key manifest does not verify ({p}): it was edited or replaced"),
        )
    })?;

    let by_id = |id: KeyId| rows.iter().find(|r| r.key_id == id);
    let mut missing: Vec<&ManifestEntry> = manifest.entries.iter().filter(|e| by_id(e.key_id).is_none()).collect();
    if let Some(newest) = missing.iter().max_by_key(|e| (e.generation, e.key_id)).copied() {
        let primary = model::derive_primary(manifest.entries.iter().filter_map(|e| {
            Some(KeyFacts {
                key_id: e.key_id,
                generation: e.generation,
                lifecycle: Lifecycle::from_code(e.lifecycle)?,
            })
        }));
        let state = Lifecycle::from_code(newest.lifecycle)
            .map(|l| l.state(primary == Some(newest.key_id)))
            .unwrap_or(KeyState::Destroyed);
        missing.retain(|e| e.key_id != newest.key_id);
        return Err(Error::MissingKey {
            key_id: newest.key_id,
            generation: newest.generation,
            state,
            more: missing.len(),
        });
    }
    for row in rows {
        match manifest.entries.binary_search_by_key(&row.key_id, |e| e.key_id) {
            Err(_) => {
                return Err(integrity(
                    Some(row.key_id),
                    "the key is in the store but not in its manifest: the row was added outside the service".into(),
                ));
            }
            Ok(i) if manifest.entries[i] != row.manifest_entry() => {
                return Err(integrity(
                    Some(row.key_id),
                    "its row does not match the manifest: its generation, state or creation time was edited, or an older copy of the row was put back".into(),
                ));
            }
            Ok(_) => {}
        }
    }
    let epoch = epoch()?;
    if manifest.epoch != epoch {
        return Err(integrity(
            None,
            format!(
                "the store's epoch ({epoch}) does not match its manifest ({}): the epoch was edited",
                manifest.epoch
            ),
        ));
    }
    Ok(manifest)
}

/// The writes a change makes, over an engine's open write transaction.
pub(crate) trait RowWriter {
    /// Inserts a new row with its wrapped material (none for a destroyed key).
    fn insert(&mut self, row: &Row, blob: Option<&[u8]>) -> Result<()>;
    /// Sets a stored key's lifecycle and its re-wrapped material (none once destroyed).
    fn set_lifecycle(&mut self, key_id: KeyId, to: Lifecycle, blob: Option<&[u8]>) -> Result<()>;
}

/// A freshly generated key, with what a new key needs besides its generation.
pub(crate) struct NewKey {
    pub(crate) origin: String,
    pub(crate) secret: MasterSecret,
    pub(crate) key_id: KeyId,
    pub(crate) created_at: OffsetDateTime,
}

impl NewKey {
    /// Generates the key and its id before the transaction starts (so a retried
    /// transaction stores the same key).
    pub(crate) fn generate(rng: &SystemRandom, origin: &str) -> Result<Self> {
        Ok(Self {
            origin: origin.to_owned(),
            secret: MasterSecret::generate(rng).map_err(|_| Error::Randomness)?,
            key_id: KeyId::generate(rng).map_err(|_| Error::Randomness)?,
            created_at: OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        })
    }
}

/// Writes `key` as a new row in `lifecycle`, with a generation above every row in
/// `before` (read inside the same write transaction) and above `floor`.
pub(crate) fn insert_new(
    kek: &Kek,
    rng: &SystemRandom,
    key: &NewKey,
    lifecycle: Lifecycle,
    floor: u64,
    before: &[Row],
    w: &mut dyn RowWriter,
) -> Result<Row> {
    let max = before.iter().map(|r| r.generation).max().unwrap_or(0);
    let generation = model::next_generation(max, floor)?;
    let row = Row {
        key_id: key.key_id,
        generation,
        created_at: key.created_at,
        origin: key.origin.clone(),
        lifecycle,
        material: None,
    };
    let blob = wrap::wrap(kek, rng, &row.identity(), &key.secret)?;
    w.insert(&row, Some(&blob))?;
    Ok(row)
}

/// Moves `row` to `to`, re-wrapping its material because the lifecycle is bound into the
/// wrap (or wiping it for `Destroyed`). The old wrap is authenticated first.
pub(crate) fn rewrite_lifecycle(
    kek: &Kek,
    rng: &SystemRandom,
    w: &mut dyn RowWriter,
    row: &Row,
    to: Lifecycle,
) -> Result<()> {
    let blob = match (to, &row.material) {
        (Lifecycle::Destroyed, _) | (_, None) => None,
        (_, Some(_)) => {
            let secret = unwrap_row(kek, row)?;
            Some(wrap::wrap(kek, rng, &row.identity_as(to), &secret)?)
        }
    };
    w.set_lifecycle(row.key_id, to, blob.as_deref())
}

/// Moves `key_id` to `to` if [`model::check_move`] allows it; `Ok(false)` when the key is
/// already there (nothing written).
pub(crate) fn transition(
    kek: &Kek,
    rng: &SystemRandom,
    rows: &[Row],
    key_id: KeyId,
    to: Lifecycle,
    force_primary: bool,
    w: &mut dyn RowWriter,
) -> Result<bool> {
    let facts: Vec<KeyFacts> = rows.iter().map(Row::facts).collect();
    let decision = model::check_move(&facts, key_id, to, force_primary)?;
    let row = rows
        .iter()
        .find(|r| r.key_id == key_id)
        .ok_or(Error::KeyNotFound(key_id))?;
    if decision == Move::Unchanged {
        return Ok(false);
    }
    rewrite_lifecycle(kek, rng, w, row, to)?;
    Ok(true)
}

/// Merges `incoming` into `rows` (read inside the write transaction): every record
/// validated first, then each key added or advanced through `w`. With `above_all`, a key
/// not stored yet must lie above every stored generation. A conflicting key refuses the
/// whole merge, or is listed in `conflicts` and left out. Returns the report (its epoch
/// left for the caller) and whether a key was destroyed.
pub(crate) fn merge(
    kek: &Kek,
    rng: &SystemRandom,
    rows: &[Row],
    incoming: &[KeyRecord],
    above_all: bool,
    mut conflicts: Option<&mut Vec<KeyId>>,
    w: &mut dyn RowWriter,
) -> Result<(MergeReport, bool)> {
    let max = rows.iter().map(|r| r.generation).max().unwrap_or(0);
    let stored = metas(rows);
    // Every field of every record is checked before anything is written.
    let checked = validate::check_incoming(&stored, incoming)?;
    let mut report = MergeReport::default();
    let mut wiped = false;
    for (record, checked) in incoming.iter().zip(&checked) {
        let meta = &record.meta;
        let target = Lifecycle::from_state(checked.state);
        let local = rows.iter().find(|r| r.key_id == meta.key_id);
        let action = model::merge_action(
            local.map(Row::facts),
            meta.key_id,
            meta.generation,
            target,
            above_all.then_some(max),
            || match (local.and_then(|l| l.material.as_ref().map(|_| l)), &record.secret) {
                (Some(local), Some(theirs)) => Ok(unwrap_row(kek, local)?.ct_eq(theirs)),
                _ => Ok(true),
            },
        )?;
        let local = match (action, local) {
            (MergeAction::Add, _) | (_, None) => {
                let row = Row {
                    key_id: meta.key_id,
                    generation: meta.generation,
                    created_at: checked.created_at,
                    origin: meta.origin.clone(),
                    lifecycle: target,
                    material: None,
                };
                let blob = match (&record.secret, target) {
                    (Some(secret), l) if l.keeps_material() => Some(wrap::wrap(kek, rng, &row.identity(), secret)?),
                    _ => None,
                };
                w.insert(&row, blob.as_deref())?;
                report.added += 1;
                continue;
            }
            (_, Some(local)) => local,
        };
        match action {
            MergeAction::Conflict => match conflicts.as_deref_mut() {
                Some(list) => list.push(meta.key_id),
                None => return Err(Error::ConflictingKey(meta.key_id)),
            },
            MergeAction::Advance(to) => {
                rewrite_lifecycle(kek, rng, w, local, to)?;
                wiped |= to == Lifecycle::Destroyed;
                report.advanced += 1;
            }
            MergeAction::Unchanged | MergeAction::Add => report.unchanged += 1,
        }
    }
    Ok((report, wiped))
}

/// The stored rows that fail a check a row can fail on its own: a destroyed key with
/// material, or any other key whose material does not authenticate.
pub(crate) fn authenticate_all(kek: &Kek, rows: &[Row]) -> Result<()> {
    for row in rows {
        match (row.lifecycle, &row.material) {
            (Lifecycle::Destroyed, None) => {}
            (Lifecycle::Destroyed, Some(_)) => {
                return Err(Error::Integrity {
                    key_id: Some(row.key_id),
                    detail: "a destroyed key still has material".into(),
                });
            }
            _ => drop(unwrap_row(kek, row)?),
        }
    }
    Ok(())
}

/// A stored key id, parsed.
pub(crate) fn parse_key_id(text: &str) -> Result<KeyId> {
    text.parse().map_err(|_| Error::Integrity {
        key_id: None,
        detail: "a stored key id is not 32 lowercase hex characters".into(),
    })
}

/// A row from its stored columns, each checked.
pub(crate) fn row_from_columns(
    id: &str,
    generation: i64,
    created_at: i64,
    origin: String,
    lifecycle: i64,
    material: Option<Vec<u8>>,
) -> Result<Row> {
    let key_id = parse_key_id(id)?;
    let bad = |detail: &str| Error::Integrity {
        key_id: Some(key_id),
        detail: detail.into(),
    };
    Ok(Row {
        key_id,
        generation: u64::try_from(generation).map_err(|_| bad("negative generation"))?,
        created_at: OffsetDateTime::from_unix_timestamp(created_at).map_err(|_| bad("creation time out of range"))?,
        origin,
        lifecycle: u8::try_from(lifecycle)
            .ok()
            .and_then(Lifecycle::from_code)
            .ok_or_else(|| bad("unknown lifecycle value"))?,
        material,
    })
}
