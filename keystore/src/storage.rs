//! [`Store`]: the storage seam. The server, rotation, replication, backups and restore
//! hold a `Store`, never an engine; [`SealedStore`] (SQLite) is the first engine,
//! [`crate::postgres::PgStore`] (PostgreSQL, shared by a cluster of nodes; issue 14) the
//! second. Both pass `keystore/tests/store_contract.rs`.
//!
//! # What an engine must do
//! - Keep material sealed under the KEK exactly as [`SealedStore`] does (the per-row wrap
//!   with its AAD, the authenticated [`crate::manifest::Manifest`] of the key set
//!   rewritten in every change), so the database never sees a key.
//! - Make every change one serialisable transaction that reads the rows, asks
//!   [`crate::model`] what to do (allowed moves, merge decisions, the primary, the next
//!   generation) and writes the answer before it commits. In particular the generation of
//!   a new key is chosen from rows read inside the write transaction
//!   ([`Store::stage_new_above`]), so concurrent writers never share one.
//! - Report its own failures as [`crate::Error::Storage`] with a remedy, never with its
//!   driver's error type.
//!
//! # Why the trait is synchronous
//! Callers in the async server run it on the blocking pool (one `spawn_blocking` per
//! call, in `sso-server`'s `with_store`), deliberately:
//! - Every call is a short transaction whose middle is CPU work under the KEK (unwrap and
//!   re-wrap with AES-GCM, the manifest's HMAC, the digest's HKDF per key): it belongs on
//!   the blocking pool whatever the engine, not on the reactor.
//! - SQLite (rusqlite) is synchronous; an async trait would put a `spawn_blocking` inside
//!   the SQLite engine anyway and buy it nothing.
//! - A synchronous trait is dyn-compatible as it stands (`Box<dyn Store>`), with no boxed
//!   futures on every method and no `async-trait` dependency.
//! - PostgreSQL fits: the `postgres` crate (tokio-postgres behind a small runtime of its
//!   own, rustls through a `MakeTlsConnect`) blocks on a blocking-pool thread, which tokio
//!   allows; the pool's size bounds how many calls wait on a slow database, and the
//!   engine's statement and connect timeouts bound how long.
//! - What is asynchronous in issue 14 is not a store call: the change feed (LISTEN/NOTIFY
//!   and the epoch poll) is a stream that wakes the server to rebuild its snapshot. It
//!   belongs beside this trait (its own small trait or a channel the engine returns), not
//!   in it, so the SQLite engine needs none.
//!
//! The cost: a call holds a blocking thread for the length of its transaction, and the
//! server serialises calls on one node behind a mutex. Reads clients make never reach the
//! store (they are served from the published snapshot), so this bounds admin writes,
//! replication and backups only.

use std::path::Path;

use secrecy::SecretString;
use sso_proto::{KeyId, KeyMeta, KeyState};
use time::OffsetDateTime;

use crate::audit::{AuditAnchor, AuditKey};
use crate::backup::{BackupInfo, OpenedBackup, PendingBackup, RestorePlan, open_file, seal_pending};
use crate::store::{KeyRecord, Keyring, MergeReport, SealedStore, StoreStatus};
use crate::unseal::KdfParams;
use crate::{Error, Result, fsutil};

/// A node's sealed key history, whatever holds it. See the module documentation for what
/// an engine must guarantee and why the trait is synchronous.
pub trait Store: Send + std::fmt::Debug {
    /// This node's name: the origin of keys generated here.
    fn node(&self) -> &str;

    /// The current keyring epoch (grows with every change to the key set).
    fn epoch(&self) -> Result<u64>;

    /// Metadata of every key, oldest generation first, with the primary derived.
    fn list(&self) -> Result<Vec<KeyMeta>>;

    /// Every served key (staged, primary, active) with its material, checked against the
    /// manifest and unwrapped; any failing row fails the call.
    fn keyring(&self) -> Result<Keyring>;

    /// Every key, retired ones with material and destroyed ones without: what
    /// replication and backups carry.
    fn export(&self) -> Result<Vec<KeyRecord>>;

    /// The key-set digest ([`crate::model::KeySetDigest`]) anti-entropy compares.
    fn digest(&self) -> Result<String>;

    /// A summary for operators and status endpoints (no material).
    fn status(&self) -> Result<StoreStatus>;

    /// The highest generation stored (0 when empty).
    fn max_generation(&self) -> Result<u64>;

    /// Generates a key and stores it staged, with a generation above every stored key and
    /// above `floor`, chosen inside the write transaction.
    fn stage_new_above(&mut self, floor: u64) -> Result<KeyMeta>;

    /// Generates a key and promotes it at once (a standalone rotation).
    fn rotate(&mut self) -> Result<KeyMeta>;

    /// Stores a key the peer staged for its rotation: a new key must lie above every
    /// stored generation ([`Error::StaleGeneration`] otherwise, nothing written).
    fn accept_staged(&mut self, record: &KeyRecord) -> Result<MergeReport>;

    /// Promotes a staged key; promoting a promoted key changes nothing. An engine shared
    /// by several nodes refuses a staged key below a key another node promoted meanwhile
    /// ([`Error::Overtaken`], nothing written).
    fn promote(&mut self, key_id: KeyId) -> Result<KeyMeta>;

    /// Retires a key; the primary cannot be retired.
    fn retire(&mut self, key_id: KeyId) -> Result<KeyMeta>;

    /// Retires a key even if it is the primary, when another promoted key can take over.
    fn force_retire(&mut self, key_id: KeyId) -> Result<KeyMeta>;

    /// Destroys a retired key: its material is wiped, its metadata kept.
    fn destroy(&mut self, key_id: KeyId) -> Result<KeyMeta>;

    /// Merges keys from a peer or a backup in one transaction; a conflicting key refuses
    /// the whole merge.
    fn merge(&mut self, incoming: &[KeyRecord]) -> Result<MergeReport>;

    /// [`Store::merge`] that leaves conflicting keys out and returns them.
    fn merge_skipping_conflicts(&mut self, incoming: &[KeyRecord]) -> Result<(MergeReport, Vec<KeyId>)>;

    /// Staged keys made by this node below generation `below` (orphan candidates).
    fn orphans_below(&self, below: u64) -> Result<Vec<KeyId>>;

    /// Retires those of `ids` still staged here and made by this node; returns how many.
    fn retire_orphans(&mut self, ids: &[KeyId]) -> Result<usize>;

    /// Writes something small and durable, so a caller learns whether the store can be
    /// written now. Changes nothing readers see.
    fn check_writable(&mut self) -> Result<()>;

    /// The audit chain's HMAC key, derived from the KEK.
    fn audit_key(&self) -> AuditKey;

    /// The audit log's anchor as last recorded, if any.
    fn audit_anchor(&self) -> Result<Option<AuditAnchor>>;

    /// Records the audit log's anchor.
    fn set_audit_anchor(&mut self, anchor: &AuditAnchor) -> Result<()>;

    /// Records that a backup holding `key_ids`, written at `at`, is safely stored.
    fn record_backup(&mut self, key_ids: &[KeyId], at: OffsetDateTime) -> Result<()>;

    /// The derived primary's metadata.
    fn primary(&self) -> Result<Option<KeyMeta>> {
        Ok(self.list()?.into_iter().find(|k| k.state == KeyState::Primary))
    }

    /// Metadata of one key.
    fn key_meta(&self, key_id: KeyId) -> Result<KeyMeta> {
        self.list()?
            .into_iter()
            .find(|k| k.key_id == key_id)
            .ok_or(Error::KeyNotFound(key_id))
    }

    /// One key's record with its material (none once destroyed), for replication.
    fn export_key(&self, key_id: KeyId) -> Result<KeyRecord> {
        self.export()?
            .into_iter()
            .find(|r| r.meta.key_id == key_id)
            .ok_or(Error::KeyNotFound(key_id))
    }

    /// Checks the manifest and reads and authenticates every key; the first failure is
    /// returned, else how many keys there are.
    fn verify(&self) -> Result<usize> {
        Ok(self.export()?.len())
    }

    /// What [`Store::restore_opened`] would do with `opened`; writes nothing.
    fn restore_plan(&self, opened: &OpenedBackup) -> Result<RestorePlan> {
        let status = self.status()?;
        let mut plan = RestorePlan::default();
        for record in &opened.records {
            let id = record.meta.key_id;
            match status.keys.iter().find(|k| k.key_id == id) {
                None => plan.unknown.push(id),
                Some(k) if k.state == KeyState::Destroyed => plan.destroyed.push(id),
                Some(_) => plan.known += 1,
            }
        }
        Ok(plan)
    }

    /// Seals every non-destroyed key into a backup. The store is not changed until
    /// [`Store::confirm_backup`].
    fn create_backup(&self, password: &SecretString, hint: &str, kdf: KdfParams) -> Result<PendingBackup> {
        let records = self.export()?;
        seal_pending(&records, password, hint, self.node(), kdf)
    }

    /// Records that `backup` is safely stored: its keys count as covered.
    fn confirm_backup(&mut self, backup: &PendingBackup) -> Result<()> {
        self.record_backup(&backup.key_ids, backup.info.created_at)
    }

    /// Writes a backup to `path` atomically (mode 0600) and confirms it.
    fn write_backup_file(
        &mut self,
        path: &Path,
        password: &SecretString,
        hint: &str,
        kdf: KdfParams,
    ) -> Result<BackupInfo> {
        let backup = self.create_backup(password, hint, kdf)?;
        fsutil::write_private_atomic(path, &backup.bytes)?;
        self.confirm_backup(&backup)?;
        Ok(backup.info)
    }

    /// Restores a backup by merging its keys into this store. Any error (wrong password,
    /// damage, a conflicting or invalid key) leaves the store untouched.
    fn restore_backup(&mut self, bytes: &[u8], password: &SecretString) -> Result<MergeReport> {
        let opened = open_file(bytes, password)?;
        self.restore_opened(&opened)
    }

    /// Merges an [`OpenedBackup`]: every record validated, then written in one
    /// transaction; its keys count as backed up.
    fn restore_opened(&mut self, opened: &OpenedBackup) -> Result<MergeReport> {
        let report = self.merge(&opened.records)?;
        let ids: Vec<KeyId> = opened.records.iter().map(|r| r.meta.key_id).collect();
        self.record_backup(&ids, opened.created_at)?;
        Ok(report)
    }
}

/// SQLite, the first engine: every method is [`SealedStore`]'s own.
impl Store for SealedStore {
    fn node(&self) -> &str {
        SealedStore::node(self)
    }
    fn epoch(&self) -> Result<u64> {
        SealedStore::epoch(self)
    }
    fn list(&self) -> Result<Vec<KeyMeta>> {
        SealedStore::list(self)
    }
    fn keyring(&self) -> Result<Keyring> {
        SealedStore::keyring(self)
    }
    fn export(&self) -> Result<Vec<KeyRecord>> {
        SealedStore::export(self)
    }
    fn digest(&self) -> Result<String> {
        SealedStore::digest(self)
    }
    fn status(&self) -> Result<StoreStatus> {
        SealedStore::status(self)
    }
    fn max_generation(&self) -> Result<u64> {
        SealedStore::max_generation(self)
    }
    fn stage_new_above(&mut self, floor: u64) -> Result<KeyMeta> {
        SealedStore::stage_new_above(self, floor)
    }
    fn rotate(&mut self) -> Result<KeyMeta> {
        SealedStore::rotate(self)
    }
    fn accept_staged(&mut self, record: &KeyRecord) -> Result<MergeReport> {
        SealedStore::accept_staged(self, record)
    }
    fn promote(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        SealedStore::promote(self, key_id)
    }
    fn retire(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        SealedStore::retire(self, key_id)
    }
    fn force_retire(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        SealedStore::force_retire(self, key_id)
    }
    fn destroy(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        SealedStore::destroy(self, key_id)
    }
    fn merge(&mut self, incoming: &[KeyRecord]) -> Result<MergeReport> {
        SealedStore::merge(self, incoming)
    }
    fn merge_skipping_conflicts(&mut self, incoming: &[KeyRecord]) -> Result<(MergeReport, Vec<KeyId>)> {
        SealedStore::merge_skipping_conflicts(self, incoming)
    }
    fn orphans_below(&self, below: u64) -> Result<Vec<KeyId>> {
        SealedStore::orphans_below(self, below)
    }
    fn retire_orphans(&mut self, ids: &[KeyId]) -> Result<usize> {
        SealedStore::retire_orphans(self, ids)
    }
    fn check_writable(&mut self) -> Result<()> {
        SealedStore::check_writable(self)
    }
    fn audit_key(&self) -> AuditKey {
        SealedStore::audit_key(self)
    }
    fn audit_anchor(&self) -> Result<Option<AuditAnchor>> {
        SealedStore::audit_anchor(self)
    }
    fn set_audit_anchor(&mut self, anchor: &AuditAnchor) -> Result<()> {
        SealedStore::set_audit_anchor(self, anchor)
    }
    fn record_backup(&mut self, key_ids: &[KeyId], at: OffsetDateTime) -> Result<()> {
        SealedStore::mark_backed_up(self, key_ids, at)
    }
}
