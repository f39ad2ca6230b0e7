//! [`SealedStore`]: the SQLite file that holds a node's master-secret history.
//!
//! Durability: WAL with `synchronous=FULL`, so a transition that returned `Ok` survives a
//! crash or power loss. Every transition is one `BEGIN IMMEDIATE` transaction that also
//! advances the keyring epoch and rewrites the [`Manifest`] ([`seal_change`]), so readers
//! never see half a change.
//!
//! Integrity on disk, checked on open (and before every change and keyring read):
//! - the KDF header (unseal kind, argon2 cost, salt, store id) against its SHA-256 digest
//!   in `meta.kdf_header_sha256`, before the KDF runs ([`Error::TamperedHeader`]);
//! - the KEK check (`meta.kek_check`): the store id sealed under the KEK with the header
//!   digest in the AAD ([`Error::WrongUnsealKey`]);
//! - the manifest (`meta.manifest`, HMAC under a key derived from the KEK) against the
//!   epoch and every row: a deleted row is [`Error::MissingKey`], naming the key; an
//!   added, edited or rolled-back row, an edited epoch or manifest is
//!   [`Error::Integrity`];
//! - each row's wrapped material against the row (`wrap`), when it is read.
//!
//! A store written before the manifest existed (v1 KEK check, no digest, no manifest) is
//! upgraded on open once every row authenticates.
//!
//! The primary is never stored: it is the promoted key with the highest
//! `(generation, key_id)`, computed on every read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params};
use sso_proto::{KeyId, KeyMeta, KeyState};
use time::OffsetDateTime;

use crate::manifest::Manifest;
use crate::model::Lifecycle;
pub use crate::model::{KeyRecord, MergeReport};
use crate::sealing::{
    self, KEK_CHECK_AAD_V1, KdfHeader, NewKey, Row, RowWriter, SALT_LEN, derive_kek, derive_primary, kek_check_aad,
    parse_key_id, parse_store_id,
};
use crate::unseal::{KdfParams, UnsealKey, UnsealKind};
use crate::wrap::Kek;
use crate::{Error, Result, fsutil};

/// Schema migrations; `PRAGMA user_version` counts how many have run. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE meta (
         name  TEXT PRIMARY KEY NOT NULL,
         value ANY NOT NULL
     ) STRICT;
     CREATE TABLE keys (
         key_id     TEXT PRIMARY KEY NOT NULL CHECK (length(key_id) = 32),
         generation INTEGER NOT NULL CHECK (generation >= 1),
         created_at INTEGER NOT NULL,
         origin     TEXT NOT NULL,
         lifecycle  INTEGER NOT NULL CHECK (lifecycle BETWEEN 0 AND 3),
         material   BLOB,
         backed_up  INTEGER NOT NULL DEFAULT 0
     ) STRICT;",
];

/// What `create` needs besides the path and the unseal secret.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// This node's name; recorded as the origin of keys it generates.
    pub node: String,
    /// argon2id cost for passphrase stores (ignored for key-file stores).
    pub kdf: KdfParams,
}

impl CreateOptions {
    /// Default KDF cost for `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            kdf: KdfParams::default(),
        }
    }
}

/// The keys clients are served: every staged, primary and active key with its material.
#[derive(Debug)]
pub struct Keyring {
    /// Grows on every change to this store's key set.
    pub epoch: u64,
    /// The derived primary, if any key has been promoted.
    pub primary: Option<KeyId>,
    /// Served keys, oldest generation first; each has `secret: Some`.
    pub keys: Vec<KeyRecord>,
}

/// A summary for operators: no material.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    /// This node's name.
    pub node: String,
    /// Random id of this store file, fixed at creation.
    pub store_id: String,
    /// Current keyring epoch.
    pub epoch: u64,
    /// The derived primary.
    pub primary: Option<KeyId>,
    /// Every key's metadata, oldest generation first.
    pub keys: Vec<KeyMeta>,
    /// Keys with material that no backup written from this store covers yet.
    pub not_backed_up: Vec<KeyId>,
    /// Keys that a backup written from (or restored into) this store covers.
    pub backed_up: Vec<KeyId>,
    /// When a backup was last written from this store.
    pub last_backup_at: Option<OffsetDateTime>,
    /// How the store is unsealed.
    pub unseal_kind: UnsealKind,
    /// The PostgreSQL database this node shares with the other nodes of a cluster, as
    /// messages show it (`postgresql://USER@HOST:PORT/DB`, never a password); `None` for a
    /// node's own SQLite file.
    pub shared_database: Option<String>,
}

/// An open, unsealed store. Holds the KEK for as long as it lives.
pub struct SealedStore {
    conn: Connection,
    kek: Kek,
    rng: SystemRandom,
    path: PathBuf,
    node: String,
    /// Random id of this store file, bound into the KEK check and the manifest's tag.
    store_id: [u8; 16],
}

impl std::fmt::Debug for SealedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedStore")
            .field("path", &self.path)
            .field("node", &self.node)
            .field("kek", &"[redacted]")
            .finish()
    }
}

impl SealedStore {
    /// Creates a new, empty store at `path` (mode 0600) sealed by `key`.
    pub fn create(path: &Path, key: &UnsealKey, options: &CreateOptions) -> Result<Self> {
        if path.exists() {
            return Err(Error::StoreExists(path.to_path_buf()));
        }
        let kdf = options.kdf.validate().map_err(|e| Error::Kdf(e.into()))?;
        // Create the file ourselves so it is 0600 from the first byte; SQLite gives its
        // -wal and -shm files the same mode as the database.
        drop(fsutil::create_private(path)?);
        let result = Self::initialise(path, key, options, kdf);
        if result.is_err() {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        result
    }

    fn initialise(path: &Path, key: &UnsealKey, options: &CreateOptions, kdf: KdfParams) -> Result<Self> {
        let mut conn = connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        migrate(&mut conn)?;
        let rng = SystemRandom::new();
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt).map_err(|_| Error::Randomness)?;
        let mut store_id = [0u8; 16];
        rng.fill(&mut store_id).map_err(|_| Error::Randomness)?;
        let kek = derive_kek(key, kdf, &salt)?;
        let kind = key.kind();
        let header = KdfHeader {
            kind: kind.as_str().to_owned(),
            memory_kib: i64::from(kdf.memory_kib),
            passes: i64::from(kdf.passes),
            lanes: i64::from(kdf.lanes),
            salt: salt.to_vec(),
            store_id: hex::encode(store_id),
        };
        let digest = header.digest();
        let check = kek.seal(&rng, &kek_check_aad(&digest), &store_id)?;
        let manifest = Manifest::new(0, Vec::new()).seal(kek.manifest_key(), &store_id);

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let meta: [(&str, rusqlite::types::Value); 12] = [
            ("store_id", header.store_id.into()),
            ("node", options.node.clone().into()),
            ("created_at", OffsetDateTime::now_utc().unix_timestamp().into()),
            ("unseal_kind", header.kind.into()),
            ("kdf_memory_kib", header.memory_kib.into()),
            ("kdf_passes", header.passes.into()),
            ("kdf_lanes", header.lanes.into()),
            ("kdf_salt", header.salt.into()),
            ("kdf_header_sha256", digest.to_vec().into()),
            ("kek_check", check.into()),
            ("epoch", 0i64.into()),
            ("manifest", manifest.into()),
        ];
        for (name, value) in meta {
            tx.execute("INSERT INTO meta (name, value) VALUES (?1, ?2)", params![name, value])
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(Self {
            conn,
            kek,
            rng,
            path: path.to_path_buf(),
            node: options.node.clone(),
            store_id,
        })
    }

    /// Opens the store at `path` and unseals it with `key`.
    ///
    /// The unseal secret is checked before anything is written (including schema
    /// migrations), so a wrong passphrase or key file changes nothing. Then the manifest
    /// is checked against the epoch and every row (see the module doc); a store without
    /// one is upgraded once all its rows authenticate.
    pub fn open(path: &Path, key: &UnsealKey) -> Result<Self> {
        if !path.exists() {
            return Err(Error::StoreNotFound(path.to_path_buf()));
        }
        fsutil::check_private(path)?;
        let mut conn = connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        let supported = MIGRATIONS.len() as u32;
        if version > supported {
            return Err(Error::UnsupportedSchema {
                found: version,
                supported,
            });
        }
        if version == 0 {
            return Err(Error::NotAStore("the file has no store schema".into()));
        }

        // The header is checked against its digest before anything is derived from it,
        // so an edited salt or cost is reported as such, not as a wrong passphrase.
        let recorded = meta_bytes(&conn, "kdf_header_sha256")?;
        let header = match read_kdf_header(&conn) {
            Ok(h) => h,
            // A header field deleted or retyped in a store that has a digest was edited.
            Err(Error::NotAStore(_) | Error::Storage(_)) if recorded.is_some() => {
                return Err(Error::TamperedHeader);
            }
            Err(e) => return Err(e),
        };
        let digest = header.digest();
        if let Some(recorded) = &recorded
            && !bool::from(subtle::ConstantTimeEq::ct_eq(recorded.as_slice(), digest.as_slice()))
        {
            return Err(Error::TamperedHeader);
        }
        let kind = UnsealKind::parse(&header.kind)
            .ok_or_else(|| Error::NotAStore(format!("unknown unseal kind {:?}", header.kind)))?;
        if kind != key.kind() {
            return Err(Error::UnsealKindMismatch {
                expected: kind,
                given: key.kind(),
            });
        }
        let kdf = header.kdf()?.validate().map_err(|e| Error::NotAStore(e.into()))?;
        let store_id = parse_store_id(&header.store_id)?;
        let check: Vec<u8> = meta_value(&conn, "kek_check")?;
        let kek = derive_kek(key, kdf, &header.salt)?;
        let current = kek.open(&kek_check_aad(&digest), &check);
        let legacy = recorded.is_none();
        let opened = if legacy {
            match kek.open(KEK_CHECK_AAD_V1, &check) {
                Some(id) => Some(id),
                // A current check without its digest: the digest was deleted to pass the
                // store off as one written before the manifest.
                None if current.is_some() => {
                    return Err(Error::Integrity {
                        key_id: None,
                        detail: "the store's header digest was deleted".into(),
                    });
                }
                None => None,
            }
        } else {
            current
        };
        match opened {
            Some(id) if id.as_slice() == store_id.as_slice() => {}
            Some(_) => {
                return Err(Error::Integrity {
                    key_id: None,
                    detail: "the store id does not match its unseal check".into(),
                });
            }
            None => return Err(Error::WrongUnsealKey(kind)),
        }

        migrate(&mut conn)?;
        let node: String = meta_value(&conn, "node")?;
        let mut store = Self {
            conn,
            kek,
            rng: SystemRandom::new(),
            path: path.to_path_buf(),
            node,
            store_id,
        };
        if legacy {
            store.upgrade_legacy(&digest)?;
        } else {
            let rows = load_rows(&store.conn)?;
            check_manifest(&store.conn, &store.kek, &store.store_id, &rows)?;
        }
        Ok(store)
    }

    /// Writes the header digest, the current KEK check and the manifest into a store
    /// written before the manifest existed, in one transaction, after every row has
    /// authenticated: the manifest vouches only for rows the KEK vouched for first.
    fn upgrade_legacy(&mut self, digest: &[u8; 32]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        if meta_opt::<rusqlite::types::Value>(&tx, "manifest")?.is_some() {
            return Err(Error::Integrity {
                key_id: None,
                detail: "the store has a manifest but no header digest: the digest was deleted".into(),
            });
        }
        let rows = load_rows(&tx)?;
        sealing::authenticate_all(&self.kek, &rows)?;
        let check = self.kek.seal(&self.rng, &kek_check_aad(digest), &self.store_id)?;
        set_meta(&tx, "kdf_header_sha256", digest.to_vec().into())?;
        set_meta(&tx, "kek_check", check.into())?;
        let epoch = read_epoch(&tx)?;
        write_manifest(&tx, &self.kek, &self.store_id, epoch, &rows)?;
        tx.commit().map_err(sql)?;
        tracing::warn!(
            keys = rows.len(),
            epoch,
            "store upgraded: every row authenticated; a key manifest now records the key set"
        );
        Ok(())
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The node name recorded at creation; the origin of keys generated here.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The current keyring epoch.
    pub fn epoch(&self) -> Result<u64> {
        read_epoch(&self.conn)
    }

    /// Metadata of every key, oldest generation first, with the primary derived.
    pub fn list(&self) -> Result<Vec<KeyMeta>> {
        let rows = load_rows(&self.conn)?;
        let primary = derive_primary(&rows);
        Ok(rows.iter().map(|r| r.meta(primary)).collect())
    }

    /// The derived primary's metadata.
    pub fn primary(&self) -> Result<Option<KeyMeta>> {
        Ok(self.list()?.into_iter().find(|k| k.state == KeyState::Primary))
    }

    /// Metadata of one key.
    pub fn key_meta(&self, key_id: KeyId) -> Result<KeyMeta> {
        self.list()?
            .into_iter()
            .find(|k| k.key_id == key_id)
            .ok_or(Error::KeyNotFound(key_id))
    }

    /// Every served key (staged, primary, active) with its material, unwrapped and
    /// checked. Any row that fails its integrity check fails the whole call.
    pub fn keyring(&self) -> Result<Keyring> {
        let (epoch, rows) = self.read_checked()?;
        Ok(Keyring {
            epoch,
            primary: derive_primary(&rows),
            keys: sealing::served(&self.kek, &rows)?,
        })
    }

    /// Every key, including retired ones with their material and destroyed ones without:
    /// what replication and backups carry.
    pub fn export(&self) -> Result<Vec<KeyRecord>> {
        let (_, rows) = self.read_checked()?;
        sealing::exported(&self.kek, &rows)
    }

    /// The epoch and every row, read in one transaction and checked against the manifest.
    fn read_checked(&self) -> Result<(u64, Vec<Row>)> {
        // One read transaction, unless the caller already holds one.
        let tx = if self.conn.is_autocommit() {
            Some(self.conn.unchecked_transaction().map_err(sql)?)
        } else {
            None
        };
        let rows = load_rows(&self.conn)?;
        let manifest = check_manifest(&self.conn, &self.kek, &self.store_id, &rows)?;
        drop(tx);
        Ok((manifest.epoch, rows))
    }

    /// Checks the manifest and reads and authenticates every row; the first failure is
    /// returned.
    pub fn verify(&self) -> Result<usize> {
        Ok(self.export()?.len())
    }

    /// Generates a new key and stores it `staged`: distributed, not yet used to encrypt.
    pub fn stage_new(&mut self) -> Result<KeyMeta> {
        self.insert_new(Lifecycle::Staged, 0)
    }

    /// Generates a new key and stores it `staged`, with a generation above every stored
    /// key and above `floor` (the peer's highest generation, learned under its rotation
    /// lease). The generation is chosen inside the write transaction, so two writers on
    /// this store can never choose the same one.
    pub fn stage_new_above(&mut self, floor: u64) -> Result<KeyMeta> {
        self.insert_new(Lifecycle::Staged, floor)
    }

    /// Generates a new key and promotes it at once (a standalone rotation, where there is
    /// nobody to distribute to first).
    pub fn rotate(&mut self) -> Result<KeyMeta> {
        self.insert_new(Lifecycle::Promoted, 0)
    }

    /// The highest generation stored (0 for an empty store).
    pub fn max_generation(&self) -> Result<u64> {
        let max: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(generation), 0) FROM keys", [], |r| r.get(0))
            .map_err(sql)?;
        Ok(u64::try_from(max).unwrap_or(0))
    }

    /// Stores a key the peer staged for a rotation it coordinates. A key id already stored
    /// merges as usual (a repeated stage changes nothing); a new key must have a generation
    /// above every stored key, checked inside the write transaction, else
    /// [`Error::StaleGeneration`] and nothing is written.
    pub fn accept_staged(&mut self, record: &KeyRecord) -> Result<MergeReport> {
        self.merge_checked(std::slice::from_ref(record), true, None)
    }

    /// The staged keys made by this node (its origin) with a generation below `below`:
    /// orphans of this node's rotations that were interrupted before this node promoted
    /// them. Candidates only: a coordinator killed between the peer's promote and its own
    /// leaves a key staged here that is the peer's primary, so an orphan is retired only
    /// once the peer confirms it never promoted it (see [`Self::retire_orphans`] and
    /// docs/pair.md, invariant O). A staged key of the other node is never a candidate: in
    /// a partition it may be that node's primary.
    pub fn orphans_below(&self, below: u64) -> Result<Vec<KeyId>> {
        Ok(load_rows(&self.conn)?
            .iter()
            .filter(|r| r.lifecycle == Lifecycle::Staged && r.generation < below && r.origin == self.node)
            .map(|r| r.key_id)
            .collect())
    }

    /// Retires those of `ids` that are still staged here and were made by this node: the
    /// orphans the peer confirmed it never promoted (or every candidate, on a node without
    /// a peer). A key promoted meanwhile (anti-entropy brought the peer's promotion) is
    /// left alone. Returns how many were retired.
    pub fn retire_orphans(&mut self, ids: &[KeyId]) -> Result<usize> {
        let orphans: Vec<KeyId> = load_rows(&self.conn)?
            .iter()
            .filter(|r| r.lifecycle == Lifecycle::Staged && r.origin == self.node && ids.contains(&r.key_id))
            .map(|r| r.key_id)
            .collect();
        for id in &orphans {
            self.transition(*id, Lifecycle::Retired)?;
        }
        Ok(orphans.len())
    }

    /// One key's record with its material (none once destroyed), for replication.
    pub fn export_key(&self, key_id: KeyId) -> Result<KeyRecord> {
        self.export()?
            .into_iter()
            .find(|r| r.meta.key_id == key_id)
            .ok_or(Error::KeyNotFound(key_id))
    }

    /// A digest of the key set: ids, generations, stored states and, per key that has
    /// material, its [`model::material_tag`] (a keyed hash, never the material). Two stores with
    /// equal digests hold the same keys in the same states with the same material; two
    /// nodes holding different material under one key id have different digests, so
    /// anti-entropy pulls and the merge reports the conflict.
    pub fn digest(&self) -> Result<String> {
        sealing::digest(&self.kek, &load_rows(&self.conn)?)
    }

    fn insert_new(&mut self, lifecycle: Lifecycle, floor: u64) -> Result<KeyMeta> {
        let key = NewKey::generate(&self.rng, &self.node)?;
        let (tx, before) = begin_change(&mut self.conn, &self.kek, &self.store_id)?;
        // The generation is chosen here, from the rows read inside this write
        // transaction: a concurrent writer waits for the lock and then sees this key.
        let row = sealing::insert_new(
            &self.kek,
            &self.rng,
            &key,
            lifecycle,
            floor,
            &before,
            &mut SqlWrites(&tx),
        )?;
        let (_, rows) = seal_change(&tx, &self.kek, &self.store_id)?;
        tx.commit().map_err(sql)?;
        Ok(row.meta(derive_primary(&rows)))
    }

    /// Promotes a staged key. Promoting an already promoted key changes nothing.
    pub fn promote(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        self.transition(key_id, Lifecycle::Promoted)
    }

    /// Retires a key: no longer served, still stored. The primary cannot be retired.
    pub fn retire(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        self.transition(key_id, Lifecycle::Retired)
    }

    /// Retires a key even if it is the primary: the operator's override for a primary of
    /// unknown origin (one a compromised peer planted, say). The next promoted key by
    /// `(generation, key_id)` becomes the primary; refused when there is none, because
    /// clients would have nothing to seal under (rotate instead). Audit the call.
    pub fn force_retire(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        self.transition_with(key_id, Lifecycle::Retired, true)
    }

    /// Destroys a retired key: its wrapped material is wiped from the file, its metadata
    /// kept.
    pub fn destroy(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        let meta = self.transition(key_id, Lifecycle::Destroyed)?;
        // secure_delete zeroes freed pages in the database; the WAL still holds the old
        // page until a checkpoint, so fold it in and truncate it now.
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(sql)?;
        Ok(meta)
    }

    fn transition(&mut self, key_id: KeyId, to: Lifecycle) -> Result<KeyMeta> {
        self.transition_with(key_id, to, false)
    }

    fn transition_with(&mut self, key_id: KeyId, to: Lifecycle, force_primary: bool) -> Result<KeyMeta> {
        let (tx, rows) = begin_change(&mut self.conn, &self.kek, &self.store_id)?;
        if !sealing::transition(
            &self.kek,
            &self.rng,
            &rows,
            key_id,
            to,
            force_primary,
            &mut SqlWrites(&tx),
        )? {
            let row = rows
                .iter()
                .find(|r| r.key_id == key_id)
                .ok_or(Error::KeyNotFound(key_id))?;
            return Ok(row.meta(derive_primary(&rows)));
        }
        let (_, rows) = seal_change(&tx, &self.kek, &self.store_id)?;
        tx.commit().map_err(sql)?;
        let meta = rows
            .iter()
            .find(|r| r.key_id == key_id)
            .map(|r| r.meta(derive_primary(&rows)))
            .ok_or(Error::KeyNotFound(key_id))?;
        Ok(meta)
    }

    /// Merges keys from a peer or a backup: a union by key id, each key's state the later
    /// of the two. A key id that arrives with different material or generation than
    /// stored is an integrity alarm: the whole merge is refused and nothing is written.
    pub fn merge(&mut self, incoming: &[KeyRecord]) -> Result<MergeReport> {
        self.merge_checked(incoming, false, None)
    }

    /// [`SealedStore::merge`] for anti-entropy: a key whose id is stored here with another
    /// generation or other material is left out (and returned), every other key merges.
    /// One conflicting key must not stop the pair from converging on all the others.
    pub fn merge_skipping_conflicts(&mut self, incoming: &[KeyRecord]) -> Result<(MergeReport, Vec<KeyId>)> {
        let mut conflicts = Vec::new();
        let report = self.merge_checked(incoming, false, Some(&mut conflicts))?;
        Ok((report, conflicts))
    }

    /// [`SealedStore::merge`]; with `above_all`, a key not stored yet must also have a
    /// generation above every stored key (checked in the same transaction).
    fn merge_checked(
        &mut self,
        incoming: &[KeyRecord],
        above_all: bool,
        conflicts: Option<&mut Vec<KeyId>>,
    ) -> Result<MergeReport> {
        let (tx, rows) = begin_change(&mut self.conn, &self.kek, &self.store_id)?;
        let (mut report, wiped) = sealing::merge(
            &self.kek,
            &self.rng,
            &rows,
            incoming,
            above_all,
            conflicts,
            &mut SqlWrites(&tx),
        )?;
        report.epoch = if report.changed() {
            seal_change(&tx, &self.kek, &self.store_id)?.0
        } else {
            read_epoch(&tx)?
        };
        tx.commit().map_err(sql)?;
        if wiped {
            // A destroy that arrived by replication wipes exactly like a local one: fold
            // the WAL (which still holds the page with the wrapped material) in and
            // truncate it.
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(sql)?;
        }
        Ok(report)
    }

    /// The ids of the keys that match `condition` (an SQL condition on `keys`, never outside
    /// input), by generation.
    fn key_ids_where(&self, condition: &str) -> Result<Vec<KeyId>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT key_id FROM keys WHERE {condition} ORDER BY generation"
            ))
            .map_err(sql)?;
        stmt.query_map([], |r| r.get::<_, String>(0))
            .map_err(sql)?
            .map(|id| parse_key_id(&id.map_err(sql)?))
            .collect()
    }

    /// A summary for operators and status endpoints.
    pub fn status(&self) -> Result<StoreStatus> {
        let rows = load_rows(&self.conn)?;
        let primary = derive_primary(&rows);
        let not_backed_up = self.key_ids_where("backed_up = 0 AND material IS NOT NULL")?;
        let backed_up = self.key_ids_where("backed_up = 1")?;
        let last_backup_at =
            meta_opt::<i64>(&self.conn, "last_backup_at")?.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
        let kind_text: String = meta_value(&self.conn, "unseal_kind")?;
        Ok(StoreStatus {
            node: self.node.clone(),
            store_id: meta_value(&self.conn, "store_id")?,
            epoch: read_epoch(&self.conn)?,
            primary,
            keys: rows.iter().map(|r| r.meta(primary)).collect(),
            not_backed_up,
            backed_up,
            last_backup_at,
            unseal_kind: UnsealKind::parse(&kind_text).unwrap_or(UnsealKind::Passphrase),
            shared_database: None,
        })
    }

    /// The audit chain's HMAC key, derived from the KEK (see [`crate::audit`]).
    pub fn audit_key(&self) -> crate::audit::AuditKey {
        self.kek.audit_key().clone()
    }

    /// Writes (and syncs) one small row, so a caller learns whether the store can be
    /// written now: before a rotation contacts the peer, and to notice that a full or
    /// failing disk has recovered. Changes nothing any reader sees (no key, no epoch).
    pub fn check_writable(&mut self) -> Result<()> {
        // A value that differs every call, so the commit really writes a page.
        let now = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('write_check', ?1)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            params![now],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(())
    }

    /// The audit log's anchor (entry count and head mac) as last recorded, if any.
    pub fn audit_anchor(&self) -> Result<Option<crate::audit::AuditAnchor>> {
        let count = meta_opt::<i64>(&self.conn, "audit_count")?;
        let head = meta_opt::<String>(&self.conn, "audit_head")?;
        match (count, head) {
            (None, None) => Ok(None),
            (Some(count), Some(head)) if count >= 0 && head.len() == 64 => Ok(Some(crate::audit::AuditAnchor {
                count: count as u64,
                head,
            })),
            _ => Err(Error::Integrity {
                key_id: None,
                detail: "the audit anchor in the store is incomplete or malformed".into(),
            }),
        }
    }

    /// Records the audit log's anchor (both values in one transaction).
    pub fn set_audit_anchor(&mut self, anchor: &crate::audit::AuditAnchor) -> Result<()> {
        let count = i64::try_from(anchor.count).map_err(|_| Error::Integrity {
            key_id: None,
            detail: "audit entry count out of range".into(),
        })?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        for (name, value) in [
            ("audit_count", rusqlite::types::Value::from(count)),
            ("audit_head", anchor.head.clone().into()),
        ] {
            tx.execute(
                "INSERT INTO meta (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                params![name, value],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(())
    }

    /// Records that a backup holding `key_ids` has been safely written.
    pub(crate) fn mark_backed_up(&mut self, key_ids: &[KeyId], at: OffsetDateTime) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        for id in key_ids {
            tx.execute(
                "UPDATE keys SET backed_up = 1 WHERE key_id = ?1",
                params![id.to_string()],
            )
            .map_err(sql)?;
        }
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('last_backup_at', ?1)
             ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
            params![at.unix_timestamp()],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(())
    }
}

/// The SQLite side of a change's writes, inside its transaction.
struct SqlWrites<'a, 'c>(&'a Transaction<'c>);

impl RowWriter for SqlWrites<'_, '_> {
    fn insert(&mut self, row: &Row, blob: Option<&[u8]>) -> Result<()> {
        insert_row(self.0, row, blob)
    }

    fn set_lifecycle(&mut self, key_id: KeyId, to: Lifecycle, blob: Option<&[u8]>) -> Result<()> {
        self.0
            .execute(
                "UPDATE keys SET lifecycle = ?1, material = ?2 WHERE key_id = ?3",
                params![i64::from(to.code()), blob, key_id.to_string()],
            )
            .map_err(sql)?;
        Ok(())
    }
}

/// SQLite's error as the public [`Error::Storage`]: its words, the remedy, and a
/// [`StoreFault`](crate::StoreFault) when the file system refused. rusqlite's types stay
/// inside this module.
fn sql(e: rusqlite::Error) -> Error {
    use rusqlite::ffi::ErrorCode as C;
    let fault = match &e {
        rusqlite::Error::SqliteFailure(code, detail) => {
            let (what, remedy) = match code.code {
                C::DiskFull => ("disk full", "free space on the store's filesystem"),
                C::ReadOnly => (
                    "read-only",
                    "make the store's file, its directory and filesystem writable by the server",
                ),
                C::SystemIoFailure => (
                    "I/O error",
                    "check the store's filesystem: it may be full (or over a file-size limit), read-only or failing",
                ),
                C::CannotOpen => (
                    "the file cannot be opened",
                    "check that the store's directory exists and is writable",
                ),
                _ => ("", ""),
            };
            (!what.is_empty()).then(|| crate::StoreFault {
                what,
                detail: detail.clone().unwrap_or_else(|| code.to_string()),
                remedy,
            })
        }
        _ => None,
    };
    Error::Storage(crate::StorageError::new(
        e.to_string(),
        "check the disk and the file, then retry",
        fault,
    ))
}

fn connect(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
    // WAL + FULL: a committed transaction is fsynced before `commit` returns.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::NotAStore(format!(
            "could not enable WAL journaling (got {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
    // Zero pages freed by deletes and updates, so wiped material does not linger.
    conn.pragma_update(None, "secure_delete", "ON").map_err(sql)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let version: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql)?;
    let version = version as usize;
    if version >= MIGRATIONS.len() {
        return Ok(());
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(step).map_err(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(sql)?;
    }
    tx.commit().map_err(sql)?;
    Ok(())
}

fn meta_opt<T: rusqlite::types::FromSql>(conn: &Connection, name: &str) -> Result<Option<T>> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", params![name], |r| r.get(0))
        .optional()
        .map_err(sql)
}

fn meta_value<T: rusqlite::types::FromSql>(conn: &Connection, name: &str) -> Result<T> {
    meta_opt(conn, name)?.ok_or_else(|| Error::NotAStore(format!("metadata entry {name:?} is missing")))
}

/// A meta value as bytes whatever its SQLite type (text and blobs as stored, anything
/// else empty), for values that are checked against a digest or a tag anyway.
fn meta_bytes(conn: &Connection, name: &str) -> Result<Option<Vec<u8>>> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", params![name], |r| {
        Ok(match r.get_ref(0)? {
            rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => b.to_vec(),
            _ => Vec::new(),
        })
    })
    .optional()
    .map_err(sql)
}

fn read_epoch(conn: &Connection) -> Result<u64> {
    let v: i64 = meta_value(conn, "epoch")?;
    u64::try_from(v).map_err(|_| Error::NotAStore("negative epoch".into()))
}

fn bump_epoch(tx: &Transaction<'_>) -> Result<u64> {
    let v: i64 = tx
        .query_row(
            "UPDATE meta SET value = value + 1 WHERE name = 'epoch' RETURNING value",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    u64::try_from(v).map_err(|_| Error::NotAStore("negative epoch".into()))
}

/// The KDF header as stored, read raw so that its digest covers exactly what is in the
/// file.
fn read_kdf_header(conn: &Connection) -> Result<KdfHeader> {
    Ok(KdfHeader {
        kind: meta_value(conn, "unseal_kind")?,
        memory_kib: meta_value(conn, "kdf_memory_kib")?,
        passes: meta_value(conn, "kdf_passes")?,
        lanes: meta_value(conn, "kdf_lanes")?,
        salt: meta_value(conn, "kdf_salt")?,
        store_id: meta_value(conn, "store_id")?,
    })
}

fn set_meta(tx: &Transaction<'_>, name: &str, value: rusqlite::types::Value) -> Result<()> {
    tx.execute(
        "INSERT INTO meta (name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![name, value],
    )
    .map_err(sql)?;
    Ok(())
}

/// Ends every change to the key set, inside its transaction: advances the epoch and
/// rewrites the manifest from the rows as they now are. Returns the new epoch and rows.
/// Callers check the manifest against the rows they read at the start of the same
/// transaction ([`check_manifest`]), so a row deleted behind the store's back is never
/// written into a new manifest.
fn seal_change(tx: &Transaction<'_>, kek: &Kek, store_id: &[u8; 16]) -> Result<(u64, Vec<Row>)> {
    let epoch = bump_epoch(tx)?;
    let rows = load_rows(tx)?;
    write_manifest(tx, kek, store_id, epoch, &rows)?;
    Ok((epoch, rows))
}

fn write_manifest(tx: &Transaction<'_>, kek: &Kek, store_id: &[u8; 16], epoch: u64, rows: &[Row]) -> Result<()> {
    set_meta(
        tx,
        "manifest",
        sealing::seal_manifest(kek, store_id, epoch, rows)?.into(),
    )
}

/// Checks the manifest against the epoch and `rows` (read in the same transaction):
/// [`sealing::check_manifest`]. Any type is read as bytes: an edit that turned the blob
/// into text or a number is then refused by the tag, like any other edit.
/// How every change to the key set starts: an immediate (write-locking) transaction and
/// every row read inside it, checked against the manifest.
fn begin_change<'c>(conn: &'c mut Connection, kek: &Kek, store_id: &[u8; 16]) -> Result<(Transaction<'c>, Vec<Row>)> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let rows = load_rows(&tx)?;
    check_manifest(&tx, kek, store_id, &rows)?;
    Ok((tx, rows))
}

fn check_manifest(conn: &Connection, kek: &Kek, store_id: &[u8; 16], rows: &[Row]) -> Result<Manifest> {
    let bytes = meta_bytes(conn, "manifest")?;
    sealing::check_manifest(bytes.as_deref(), || read_epoch(conn), kek, store_id, rows)
}

fn insert_row(tx: &Transaction<'_>, row: &Row, blob: Option<&[u8]>) -> Result<()> {
    let generation = i64::try_from(row.generation).map_err(|_| Error::MalformedRecord {
        key_id: row.key_id,
        detail: "generation out of range",
    })?;
    tx.execute(
        "INSERT INTO keys (key_id, generation, created_at, origin, lifecycle, material) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![row.key_id.to_string(), generation, row.created_at.unix_timestamp(), row.origin, i64::from(row.lifecycle.code()), blob],
    ).map_err(sql)?;
    Ok(())
}

fn load_rows(conn: &Connection) -> Result<Vec<Row>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT key_id, generation, created_at, origin, lifecycle, material FROM keys ORDER BY generation, key_id",
        )
        .map_err(sql)?;
    let raw = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<Vec<u8>>>(5)?,
            ))
        })
        .map_err(sql)?;
    let mut rows = Vec::new();
    for item in raw {
        let (id, generation, created_at, origin, lifecycle, material) = item.map_err(sql)?;
        rows.push(sealing::row_from_columns(
            &id, generation, created_at, origin, lifecycle, material,
        )?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests;
