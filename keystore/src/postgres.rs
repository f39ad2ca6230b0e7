//! [`PgStore`]: the PostgreSQL engine (issue 14), and [`ChangeFeed`], the cluster's
//! change feed beside the [`Store`] trait.
//!
//! Many nodes share one database; each opens it with the URL and the unseal secret.
//!
//! - **The database never sees a key.** Rows hold material wrapped under the KEK exactly
//!   as in SQLite (the same per-row wrap and AAD binding, the same authenticated manifest
//!   of the key set rewritten in every change, the same KDF header digest and KEK check):
//!   `keystore::sealing` is shared by both engines.
//! - **Every change is one `SERIALIZABLE` transaction** that reads the rows, checks the
//!   manifest, asks [`crate::model`] what to do, writes, bumps the cluster-wide epoch,
//!   rewrites the manifest and sends `NOTIFY sso_keystore, '<epoch>'` (delivered only on
//!   commit). A serialisation failure or deadlock (SQLSTATE 40001, 40P01) retries the
//!   whole transaction, a bounded number of times, with jittered backoff; the generation
//!   of a new key is chosen inside it, so concurrent writers on any number of nodes never
//!   share one.
//! - **Schema migrations are versioned** (`sso_schema`, one row per migration applied,
//!   under an advisory lock so nodes starting together migrate once); a database with a
//!   newer schema is refused ([`Error::UnsupportedSchema`]). The unseal secret is checked
//!   before any migration runs, so a wrong secret changes nothing.
//! - **Failure is bounded and reported.** Connects and statements time out
//!   ([`PgOptions`]: a few seconds), so a dead database never hangs a caller; failures
//!   are [`Error::Storage`] with a remedy and a [`crate::StoreFault`] (the server's health
//!   then shows the store down and writes answer 503 `store_unavailable`, as for a full
//!   disk under SQLite). The connection is dropped on failure and the next call
//!   reconnects by itself.
//! - **TLS to the database** when the URL asks for it (`sslmode=verify-full` or `require`,
//!   or `prefer` with a CA): rustls with the ring provider, trusting the CA in
//!   `sslrootcert=PATH` (a PEM file; this engine reads the parameter itself, libpq-style)
//!   and checking the host name, so `require` verifies as libpq's `verify-full` does;
//!   `verify-ca` is refused.
//!
//! The engine is synchronous like the trait: it owns a small current-thread tokio runtime
//! and blocks on it. Call it from a plain thread or a blocking-pool thread
//! (`spawn_blocking`, as the server does), never from inside an async task.
//!
//! Audit stays local to each node: the audit anchor is kept per node name.
//!
//! Why here and not a crate of its own: the engine is built from the crate-private sealing
//! (`keystore::sealing`, the KEK, the wrap), which must not become public API, and every
//! crate that links keystore also needs the engine (the server serves from it, ssoctl
//! initialises it; sso-config links keystore only for the node-name rule and is itself
//! linked only by those two).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use sso_proto::{KeyId, KeyMeta};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, IsolationLevel, NoTls, Transaction};

use crate::audit::{AuditAnchor, AuditKey};
use crate::manifest::Manifest;
use crate::model::{KeyRecord, Lifecycle};
use crate::sealing::{self, KdfHeader, NewKey, Row, RowWriter, SALT_LEN, derive_kek, derive_primary, kek_check_aad};
use crate::store::{CreateOptions, Keyring, MergeReport, StoreStatus};
use crate::unseal::{UnsealKey, UnsealKind};
use crate::wrap::Kek;
use crate::{Error, Result, StorageError, Store, StoreFault};

/// Whether `store` names a PostgreSQL database (`postgresql://` or `postgres://`) rather
/// than a SQLite file: how the config and ssoctl tell the two engines apart.
pub fn is_database_url(store: &str) -> bool {
    store.starts_with("postgresql://") || store.starts_with("postgres://")
}

/// The channel every write transaction notifies with its new epoch.
pub const CHANNEL: &str = "sso_keystore";

/// Schema migrations; `sso_schema` holds one row per migration applied. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE sso_store (
         singleton         BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
         store_id          TEXT NOT NULL,
         created_at        BIGINT NOT NULL,
         unseal_kind       TEXT NOT NULL,
         kdf_memory_kib    BIGINT NOT NULL,
         kdf_passes        BIGINT NOT NULL,
         kdf_lanes         BIGINT NOT NULL,
         kdf_salt          BYTEA NOT NULL,
         kdf_header_sha256 BYTEA NOT NULL,
         kek_check         BYTEA NOT NULL,
         epoch             BIGINT NOT NULL,
         manifest          BYTEA NOT NULL,
         last_backup_at    BIGINT
     );
     CREATE TABLE sso_keys (
         key_id     TEXT PRIMARY KEY CHECK (length(key_id) = 32),
         generation BIGINT NOT NULL CHECK (generation >= 1),
         created_at BIGINT NOT NULL,
         origin     TEXT NOT NULL,
         lifecycle  SMALLINT NOT NULL CHECK (lifecycle BETWEEN 0 AND 3),
         material   BYTEA,
         backed_up  BOOLEAN NOT NULL DEFAULT FALSE
     );
     CREATE TABLE sso_audit_anchor (
         node  TEXT PRIMARY KEY,
         count BIGINT NOT NULL CHECK (count >= 0),
         head  TEXT NOT NULL
     );
     CREATE TABLE sso_write_check (
         node TEXT PRIMARY KEY,
         at   BIGINT NOT NULL
     );",
];

/// Serialises migrations across nodes (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x5350_4b53_0001;

const REMEDY: &str = "check that the PostgreSQL server is running and reachable from this node (the URL, the network, TLS, credentials); the store reconnects by itself on the next call";

/// Time limits and retries. The defaults bound a call on a dead database to a few
/// seconds.
#[derive(Debug, Clone, Copy)]
pub struct PgOptions {
    /// How long a connection may take to establish.
    pub connect_timeout: Duration,
    /// The server-side `statement_timeout`, and (with a margin) the client-side bound on
    /// one transaction.
    pub statement_timeout: Duration,
    /// How many times a transaction that hit a serialisation failure is tried in all.
    pub attempts: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(5),
            attempts: 16,
        }
    }
}

/// Where the database is and how to reach it: the parsed URL (never printed with its
/// password) and the TLS connector it asks for.
#[derive(Clone)]
struct Target {
    config: Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    shown: String,
}

impl Target {
    fn parse(url: &str, options: &PgOptions) -> Result<Self> {
        let (url, rootcert) = take_param(url, "sslrootcert");
        let url = libpq_sslmode(url)?;
        let mut config: Config = url.parse().map_err(|e| {
            Error::Storage(StorageError::new(
                format!("not a PostgreSQL URL: {e}"),
                "write the store as postgresql://USER@HOST:PORT/DATABASE (optionally ?sslmode=require&sslrootcert=/path/ca.pem)",
                None,
            ))
        })?;
        let shown = show(&config);
        config.connect_timeout(options.connect_timeout);
        config.options(format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            options.statement_timeout.as_millis(),
            options.statement_timeout.as_millis() * 2
        ));
        config.application_name("sso-keystore");
        let mode = config.get_ssl_mode();
        let tls = match (mode, rootcert) {
            (tokio_postgres::config::SslMode::Disable, _) => None,
            (tokio_postgres::config::SslMode::Prefer, None) => None,
            (_, Some(path)) => Some(tls_connector(&path)?),
            (_, None) => {
                return Err(Error::Storage(StorageError::new(
                    format!("{shown}: sslmode=require needs the database's CA"),
                    "add sslrootcert=/path/to/ca.pem to the URL (the CA that signed the database server's certificate)",
                    None,
                )));
            }
        };
        Ok(Self { config, tls, shown })
    }

    /// Connects and spawns the connection's driver on the current runtime.
    async fn connect(&self) -> std::result::Result<Client, tokio_postgres::Error> {
        match &self.tls {
            None => {
                let (client, conn) = self.config.connect(NoTls).await?;
                tokio::spawn(conn);
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await?;
                tokio::spawn(conn);
                Ok(client)
            }
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("database", &self.shown)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Accepts libpq's `sslmode=verify-full`, which tokio-postgres does not know, as
/// `require`: with a CA (`sslrootcert`) this engine always verifies the server's chain and
/// host name (rustls), which is what `verify-full` means. `verify-ca` (chain only) is
/// refused rather than silently made stricter.
fn libpq_sslmode(url: String) -> Result<String> {
    let (rest, mode) = take_param(&url, "sslmode");
    let mode = match mode.as_deref() {
        None => return Ok(url),
        Some("verify-full") => "require",
        Some("verify-ca") => {
            return Err(Error::Storage(StorageError::new(
                "sslmode=verify-ca: this engine always checks the database server's host name as well as its certificate chain",
                "write sslmode=verify-full (or require, which verifies the same here) with sslrootcert, and give the database a certificate for the host in the URL",
                None,
            )));
        }
        Some(other) => other,
    };
    let joint = if rest.contains('?') { '&' } else { '?' };
    Ok(format!("{rest}{joint}sslmode={mode}"))
}

/// `url` without its `name=value` query parameter, and the value.
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_owned());
                false
            }
            _ => true,
        })
        .collect();
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, value)
}

/// The database as operators name it, without a password.
fn show(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// TLS to the database through the one policy (`sso_tls`): the server's chain and host name
/// verified against `sslrootcert`, no client certificate, and TLS 1.3 or 1.2, since the
/// database is not ours and PostgreSQL may speak only 1.2 (`sso_tls::ClientTls::third_party`).
fn tls_connector(path: &str) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(path)?))
}

fn tls_config(path: &str) -> Result<rustls::ClientConfig> {
    let bad = |detail: String| {
        Error::Storage(StorageError::new(
            detail,
            "point sslrootcert at a readable PEM file holding the CA of the database server's certificate",
            None,
        ))
    };
    // `TlsError` names the file: "sslrootcert PATH: why".
    let roots = sso_tls::load_roots(Path::new(path)).map_err(|e| bad(format!("sslrootcert {e}")))?;
    if roots.is_empty() {
        return Err(bad(format!("sslrootcert {path} holds no certificate")));
    }
    sso_tls::ClientTls::trusting(roots)
        .third_party()
        .build()
        .map_err(|e| bad(format!("TLS: {e}")))
}

/// Why one attempt failed: the database, a time limit, or the store's own rules.
enum Fail {
    Db(tokio_postgres::Error),
    Timeout(&'static str),
    Store(Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Self::Store(e)
    }
}

impl Fail {
    /// The connection went away under the call (closed, or the server's "terminating
    /// connection due to administrator command"), as opposed to a refusal or a timeout.
    fn connection_lost(&self) -> bool {
        matches!(self, Self::Db(e) if e.is_closed() || e.code() == Some(&SqlState::ADMIN_SHUTDOWN))
    }

    fn retryable(&self) -> bool {
        matches!(self, Self::Db(e) if matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED))
    }

    fn into_error(self, shown: &str) -> Error {
        match self {
            Self::Store(e) => e,
            Self::Timeout(what) => storage(
                format!("{shown}: {what} timed out"),
                Some(StoreFault {
                    what: "database unreachable",
                    detail: format!("{what} timed out"),
                    remedy: REMEDY,
                }),
            ),
            Self::Db(e) => pg_error(&e, shown),
        }
    }
}

fn storage(detail: String, fault: Option<StoreFault>) -> Error {
    Error::Storage(StorageError::new(detail, REMEDY, fault))
}

/// The remedy for a role that lacks a privilege (SQLSTATE 42501): no reconnection cures it.
const PRIVILEGE_REMEDY: &str = "GRANT the node's role SELECT, INSERT, UPDATE and DELETE on the sso_* tables (docs/cluster.md, \"Privileges\"); `ssoctl init` and schema upgrades need a role that may CREATE in the schema";

/// PostgreSQL's error as the public [`Error::Storage`]: its words (the server's message,
/// never a parameter), the remedy, and a fault unless it is a mistake in a statement or
/// in the data (classes 22, 23, 42), which no waiting cures.
fn pg_error(e: &tokio_postgres::Error, shown: &str) -> Error {
    let detail = match e.as_db_error() {
        Some(db) => format!("{shown}: {} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => format!("{shown}: {e}"),
    };
    if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        return Error::Storage(StorageError::new(detail, PRIVILEGE_REMEDY, None));
    }
    let class = e.code().map(|c| &c.code()[..2]);
    let fault = match class {
        Some("22" | "23" | "42") => None,
        _ => Some(StoreFault {
            what: if e.code().is_some() {
                "database refused"
            } else {
                "database unreachable"
            },
            detail: detail.clone(),
            remedy: REMEDY,
        }),
    };
    storage(detail, fault)
}

/// A change's writes, collected by the engine-independent code and then sent inside the
/// transaction.
#[derive(Default)]
struct Pending(Vec<Write>);

enum Write {
    Insert {
        key_id: String,
        generation: i64,
        created_at: i64,
        origin: String,
        lifecycle: i16,
        material: Option<Vec<u8>>,
    },
    Lifecycle {
        key_id: String,
        lifecycle: i16,
        material: Option<Vec<u8>>,
    },
}

impl RowWriter for Pending {
    fn insert(&mut self, row: &Row, blob: Option<&[u8]>) -> Result<()> {
        let generation = i64::try_from(row.generation).map_err(|_| Error::MalformedRecord {
            key_id: row.key_id,
            detail: "generation out of range",
        })?;
        self.0.push(Write::Insert {
            key_id: row.key_id.to_string(),
            generation,
            created_at: row.created_at.unix_timestamp(),
            origin: row.origin.clone(),
            lifecycle: i16::from(row.lifecycle.code()),
            material: blob.map(<[u8]>::to_vec),
        });
        Ok(())
    }

    fn set_lifecycle(&mut self, key_id: KeyId, to: Lifecycle, blob: Option<&[u8]>) -> Result<()> {
        self.0.push(Write::Lifecycle {
            key_id: key_id.to_string(),
            lifecycle: i16::from(to.code()),
            material: blob.map(<[u8]>::to_vec),
        });
        Ok(())
    }
}

impl Pending {
    async fn send(&self, tx: &Transaction<'_>) -> std::result::Result<(), tokio_postgres::Error> {
        for write in &self.0 {
            match write {
                Write::Insert {
                    key_id,
                    generation,
                    created_at,
                    origin,
                    lifecycle,
                    material,
                } => {
                    tx.execute(
                        "INSERT INTO sso_keys (key_id, generation, created_at, origin, lifecycle, material) VALUES ($1, $2, $3, $4, $5, $6)",
                        &[key_id, generation, created_at, origin, lifecycle, material],
                    )
                    .await?;
                }
                Write::Lifecycle {
                    key_id,
                    lifecycle,
                    material,
                } => {
                    tx.execute(
                        "UPDATE sso_keys SET lifecycle = $1, material = $2 WHERE key_id = $3",
                        &[lifecycle, material, key_id],
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
}

/// What a read transaction sees: the epoch, the manifest and every row.
struct Snapshot {
    epoch: u64,
    manifest: Vec<u8>,
    rows: Vec<Row>,
}

async fn load_rows(tx: &Transaction<'_>) -> std::result::Result<Vec<Row>, Fail> {
    let raw = tx
        .query(
            "SELECT key_id, generation, created_at, origin, lifecycle, material FROM sso_keys ORDER BY generation, key_id",
            &[],
        )
        .await?;
    let mut rows = Vec::with_capacity(raw.len());
    for r in raw {
        rows.push(sealing::row_from_columns(
            r.try_get::<_, &str>(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            i64::from(r.try_get::<_, i16>(4)?),
            r.try_get(5)?,
        )?);
    }
    Ok(rows)
}

async fn load_snapshot(tx: &Transaction<'_>) -> std::result::Result<Snapshot, Fail> {
    let store = tx
        .query_opt("SELECT epoch, manifest FROM sso_store", &[])
        .await?
        .ok_or_else(|| Error::NotAStore("the database has the store's schema but no store: run init".into()))?;
    let epoch: i64 = store.try_get(0)?;
    Ok(Snapshot {
        epoch: u64::try_from(epoch).map_err(|_| Error::NotAStore("negative epoch".into()))?,
        manifest: store.try_get(1)?,
        rows: load_rows(tx).await?,
    })
}

/// Brings the schema to the current version, under an advisory lock; refuses a newer one.
///
/// Creates nothing when nothing is pending: the nodes' role may hold row privileges only
/// (docs/cluster.md, "Privileges"), and PostgreSQL refuses even `CREATE TABLE IF NOT
/// EXISTS` on an existing table to a role without `CREATE` on the schema.
async fn migrate(client: &mut Client) -> std::result::Result<(), Fail> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('sso_schema') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        tx.batch_execute(
            "CREATE TABLE sso_schema (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
    }
    let version = schema_version(&tx).await?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(step).await?;
        let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("INSERT INTO sso_schema (version) VALUES ($1)", &[&v])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The schema version recorded, refusing one newer than this build knows.
async fn schema_version(tx: &Transaction<'_>) -> std::result::Result<u32, Fail> {
    let found: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM sso_schema", &[])
        .await?
        .try_get(0)?;
    let found = u32::try_from(found).unwrap_or(0);
    let supported = MIGRATIONS.len() as u32;
    if found > supported {
        return Err(Error::UnsupportedSchema { found, supported }.into());
    }
    Ok(found)
}

/// The KDF header and the KEK check as stored.
struct Header {
    header: KdfHeader,
    recorded_digest: Vec<u8>,
    kek_check: Vec<u8>,
}

async fn read_header(tx: &Transaction<'_>) -> std::result::Result<Option<Header>, Fail> {
    let Some(r) = tx
        .query_opt(
            "SELECT unseal_kind, kdf_memory_kib, kdf_passes, kdf_lanes, kdf_salt, store_id, kdf_header_sha256, kek_check FROM sso_store",
            &[],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Header {
        header: KdfHeader {
            kind: r.try_get(0)?,
            memory_kib: r.try_get(1)?,
            passes: r.try_get(2)?,
            lanes: r.try_get(3)?,
            salt: r.try_get(4)?,
            store_id: r.try_get(5)?,
        },
        recorded_digest: r.try_get(6)?,
        kek_check: r.try_get(7)?,
    }))
}

/// An open, unsealed store in a PostgreSQL database. Holds the KEK for as long as it
/// lives. See the module documentation.
pub struct PgStore {
    /// `None` only while dropping (shut down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    target: Target,
    options: PgOptions,
    /// The connection, `None` after a failure until the next call reconnects.
    client: Mutex<Option<Client>>,
    /// How many times a call connected afresh: a read that lost a connection it did not
    /// open itself retries once on a new one (see [`PgStore::simple`]).
    connects: AtomicU64,
    kek: Kek,
    rng: SystemRandom,
    node: String,
    store_id: [u8; 16],
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.target.shown)
            .field("node", &self.node)
            .field("kek", &"[redacted]")
            .finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The connection's task lives on this runtime; dropping a runtime blocks, which
        // an async caller must not do, so shut it down in the background.
        drop(self.client.get_mut().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| storage(format!("cannot start the PostgreSQL engine's runtime: {e}"), None))
}

/// Connects on `runtime`, within the connect timeout.
fn connect_on(runtime: &tokio::runtime::Runtime, target: &Target, options: &PgOptions) -> Result<Client> {
    runtime
        .block_on(async {
            match tokio::time::timeout(options.connect_timeout + Duration::from_secs(1), target.connect()).await {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(e)) => Err(Fail::Db(e)),
                Err(_) => Err(Fail::Timeout("connecting")),
            }
        })
        .map_err(|f| f.into_error(&target.shown))
}

impl PgStore {
    /// Creates the schema and an empty store in the database at `url`, sealed by `key`.
    /// Refused when the database already holds a store.
    pub fn create(url: &str, key: &UnsealKey, options: &CreateOptions) -> Result<Self> {
        Self::create_with(url, key, options, PgOptions::default())
    }

    /// [`PgStore::create`] with explicit time limits.
    pub fn create_with(url: &str, key: &UnsealKey, create: &CreateOptions, options: PgOptions) -> Result<Self> {
        let kdf = create.kdf.validate().map_err(|e| Error::Kdf(e.into()))?;
        let target = Target::parse(url, &options)?;
        let runtime = runtime()?;
        let mut client = connect_on(&runtime, &target, &options)?;
        let rng = SystemRandom::new();
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt).map_err(|_| Error::Randomness)?;
        let mut store_id = [0u8; 16];
        rng.fill(&mut store_id).map_err(|_| Error::Randomness)?;
        let kek = derive_kek(key, kdf, &salt)?;
        let header = KdfHeader {
            kind: key.kind().as_str().to_owned(),
            memory_kib: i64::from(kdf.memory_kib),
            passes: i64::from(kdf.passes),
            lanes: i64::from(kdf.lanes),
            salt: salt.to_vec(),
            store_id: hex::encode(store_id),
        };
        let digest = header.digest();
        let check = kek.seal(&rng, &kek_check_aad(&digest), &store_id)?;
        let manifest = Manifest::new(0, Vec::new()).seal(kek.manifest_key(), &store_id);
        let shown = target.shown.clone();
        runtime
            .block_on(async {
                let work = async {
                    migrate(&mut client).await?;
                    let tx = client
                        .build_transaction()
                        .isolation_level(IsolationLevel::Serializable)
                        .start()
                        .await?;
                    if tx.query_opt("SELECT 1 FROM sso_store", &[]).await?.is_some() {
                        return Err(Fail::Store(Error::StoreExists(PathBuf::from(&shown))));
                    }
                    let now = OffsetDateTime::now_utc().unix_timestamp();
                    tx.execute(
                        "INSERT INTO sso_store (store_id, created_at, unseal_kind, kdf_memory_kib, kdf_passes, kdf_lanes,
                             kdf_salt, kdf_header_sha256, kek_check, epoch, manifest)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10)",
                        &[
                            &header.store_id,
                            &now,
                            &header.kind,
                            &header.memory_kib,
                            &header.passes,
                            &header.lanes,
                            &header.salt,
                            &digest.as_slice(),
                            &check,
                            &manifest,
                        ],
                    )
                    .await?;
                    tx.commit().await?;
                    Ok(())
                };
                match tokio::time::timeout(options.statement_timeout * 2, work).await {
                    Ok(r) => r,
                    Err(_) => Err(Fail::Timeout("creating the store")),
                }
            })
            .map_err(|f| f.into_error(&shown))?;
        Ok(Self {
            runtime: Some(runtime),
            target,
            options,
            client: Mutex::new(Some(client)),
            connects: AtomicU64::new(0),
            kek,
            rng,
            node: create.node.clone(),
            store_id,
        })
    }

    /// `ssoctl init --store postgresql://...`: the schema, the store and its first key
    /// (promoted). Returns the store and the key's metadata.
    pub fn init(url: &str, key: &UnsealKey, options: &CreateOptions) -> Result<(Self, KeyMeta)> {
        let mut store = Self::create(url, key, options)?;
        let first = store.rotate()?;
        Ok((store, first))
    }

    /// Opens the store in the database at `url` as node `node`, unsealed with `key`.
    pub fn open(url: &str, key: &UnsealKey, node: &str) -> Result<Self> {
        Self::open_with(url, key, node, PgOptions::default())
    }

    /// [`PgStore::open`] with explicit time limits.
    ///
    /// The unseal secret is checked before anything is written (migrations included), so
    /// a wrong passphrase or key file changes nothing; then the manifest is checked
    /// against the epoch and every row.
    pub fn open_with(url: &str, key: &UnsealKey, node: &str, options: PgOptions) -> Result<Self> {
        let target = Target::parse(url, &options)?;
        let runtime = runtime()?;
        let mut client = connect_on(&runtime, &target, &options)?;
        let shown = target.shown.clone();
        let header = runtime
            .block_on(async {
                let work = async {
                    let tx = client
                        .build_transaction()
                        .isolation_level(IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()
                        .await?;
                    let exists: bool = tx
                        .query_one("SELECT to_regclass('sso_schema') IS NOT NULL", &[])
                        .await?
                        .try_get(0)?;
                    if !exists {
                        return Err(Fail::Store(Error::StoreNotFound(PathBuf::from(&shown))));
                    }
                    if schema_version(&tx).await? == 0 {
                        return Err(Fail::Store(Error::NotAStore("the database has no store schema".into())));
                    }
                    let header = read_header(&tx).await?;
                    tx.commit().await?;
                    header.ok_or(Fail::Store(Error::StoreNotFound(PathBuf::from(&shown))))
                };
                match tokio::time::timeout(options.statement_timeout * 2, work).await {
                    Ok(r) => r,
                    Err(_) => Err(Fail::Timeout("opening the store")),
                }
            })
            .map_err(|f| f.into_error(&shown))?;

        // The header is checked against its digest before anything is derived from it.
        let digest = header.header.digest();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            header.recorded_digest.as_slice(),
            digest.as_slice(),
        )) {
            return Err(Error::TamperedHeader);
        }
        let kind = UnsealKind::parse(&header.header.kind)
            .ok_or_else(|| Error::NotAStore(format!("unknown unseal kind {:?}", header.header.kind)))?;
        if kind != key.kind() {
            return Err(Error::UnsealKindMismatch {
                expected: kind,
                given: key.kind(),
            });
        }
        let kdf = header
            .header
            .kdf()?
            .validate()
            .map_err(|e| Error::NotAStore(e.into()))?;
        let store_id = sealing::parse_store_id(&header.header.store_id)?;
        let kek = derive_kek(key, kdf, &header.header.salt)?;
        match kek.open(&kek_check_aad(&digest), &header.kek_check) {
            Some(id) if id.as_slice() == store_id.as_slice() => {}
            Some(_) => {
                return Err(Error::Integrity {
                    key_id: None,
                    detail: "the store id does not match its unseal check".into(),
                });
            }
            None => return Err(Error::WrongUnsealKey(kind)),
        }
        runtime
            .block_on(async {
                match tokio::time::timeout(options.statement_timeout * 2, migrate(&mut client)).await {
                    Ok(r) => r,
                    Err(_) => Err(Fail::Timeout("migrating the schema")),
                }
            })
            .map_err(|f| f.into_error(&shown))?;
        let store = Self {
            runtime: Some(runtime),
            target,
            options,
            client: Mutex::new(Some(client)),
            connects: AtomicU64::new(0),
            kek,
            rng: SystemRandom::new(),
            node: node.to_owned(),
            store_id,
        };
        store.read_checked()?;
        Ok(store)
    }

    /// The database this store lives in, without a password.
    pub fn database(&self) -> &str {
        &self.target.shown
    }

    /// Opens the change feed of the database this store lives in (see [`ChangeFeed`]).
    /// Must be called inside a tokio runtime with time and I/O enabled.
    pub fn change_feed(&self) -> Result<ChangeFeed> {
        ChangeFeed::start_target(self.target.clone(), self.options, None)
    }

    /// Runs one attempt of `op` on the connection (reconnecting first when there is
    /// none), bounded by the statement timeout and a margin. A failure that leaves the
    /// connection in doubt drops it.
    ///
    /// Called from async code (a runtime worker must not block on another runtime), the
    /// call runs on a thread of its own, which may: the server calls a few methods
    /// directly while it starts.
    fn attempt<T: Send>(
        &self,
        op: impl AsyncFnOnce(&mut Client) -> std::result::Result<T, Fail> + Send,
    ) -> std::result::Result<T, Fail> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return std::thread::scope(|s| {
                s.spawn(|| self.attempt_here(op))
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            });
        }
        self.attempt_here(op)
    }

    fn attempt_here<T>(
        &self,
        op: impl AsyncFnOnce(&mut Client) -> std::result::Result<T, Fail>,
    ) -> std::result::Result<T, Fail> {
        let runtime = self.runtime.as_ref().ok_or(Fail::Timeout("a store being dropped"))?;
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let limit = self.options.statement_timeout + Duration::from_secs(2);
        runtime.block_on(async {
            // Let the connection's driver run first: a connection the server closed while
            // it was idle (a restart, an idle timeout) is noticed here, not by failing the
            // call.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = None;
                let client = match tokio::time::timeout(
                    self.options.connect_timeout + Duration::from_secs(1),
                    self.target.connect(),
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return Err(Fail::Db(e)),
                    Err(_) => return Err(Fail::Timeout("connecting")),
                };
                self.connects.fetch_add(1, Ordering::Relaxed);
                *slot = Some(client);
            }
            let Some(client) = slot.as_mut() else {
                return Err(Fail::Timeout("connecting"));
            };
            let result = match tokio::time::timeout(limit, op(client)).await {
                Ok(r) => r,
                Err(_) => Err(Fail::Timeout("a statement")),
            };
            match &result {
                Err(Fail::Timeout(_)) => *slot = None,
                Err(Fail::Db(e)) if e.is_closed() || client_closed(&slot) || e.code().is_none() => *slot = None,
                Err(_) => {
                    // The failed transaction's ROLLBACK was queued when it was dropped;
                    // send it now (and wait), so the session does not sit idle in an
                    // aborted transaction until the next call.
                    let rolled_back = match slot.as_ref() {
                        Some(c) => tokio::time::timeout(limit, c.batch_execute("ROLLBACK")).await,
                        None => Ok(Ok(())),
                    };
                    if !matches!(rolled_back, Ok(Ok(()))) {
                        *slot = None;
                    }
                }
                Ok(_) => {}
            }
            result
        })
    }

    /// One read-only, repeatable-read transaction over the epoch and every row, checked
    /// against the manifest.
    fn read_checked(&self) -> Result<(u64, Vec<Row>)> {
        let (epoch, rows, ()) = self.read_checked_with(async |_: &Transaction<'_>| Ok(()))?;
        Ok((epoch, rows))
    }

    /// [`PgStore::read_checked`], and whatever `more` reads in the same snapshot (the
    /// bookkeeping `status` reports beside the key set).
    fn read_checked_with<T: Send>(
        &self,
        more: impl AsyncFn(&Transaction<'_>) -> std::result::Result<T, Fail> + Send + Sync,
    ) -> Result<(u64, Vec<Row>, T)> {
        let (kek, store_id) = (&self.kek, &self.store_id);
        self.simple(async |client: &mut Client| {
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let snap = load_snapshot(&tx).await?;
            let manifest = sealing::check_manifest(Some(&snap.manifest), || Ok(snap.epoch), kek, store_id, &snap.rows)?;
            let extra = more(&tx).await?;
            tx.commit().await?;
            Ok((manifest.epoch, snap.rows, extra))
        })
    }

    /// One statement outside a change (reads and bookkeeping that are not the key set, all
    /// safe to repeat). A connection the database closed while it sat idle (an
    /// administrator's `pg_terminate_backend`, a pooler's or a failover's cut) is often
    /// found only by the statement sent on it: then `op` runs once more on a new
    /// connection, so a healthy database does not fail a read, a node's start or its
    /// health. Not when this call had connected afresh (the database is really down: fail
    /// at once) and never for a change, whose commit may have been sent (attack14b:
    /// tests/tests/cluster_attack.rs
    /// `terminated_connections_reconnect_and_every_acknowledged_rotation_is_primary_everywhere`).
    fn simple<T: Send>(
        &self,
        op: impl AsyncFn(&mut Client) -> std::result::Result<T, Fail> + Send + Sync,
    ) -> Result<T> {
        let connects = self.connects.load(Ordering::Relaxed);
        match self.attempt(&op) {
            Err(f) if f.connection_lost() && self.connects.load(Ordering::Relaxed) == connects => {
                tracing::debug!(database = %self.target.shown, "the database closed an idle connection; reconnecting");
                self.attempt(&op)
            }
            r => r,
        }
        .map_err(|f| f.into_error(&self.target.shown))
    }

    /// A change to the key set: one serialisable transaction that reads and checks the
    /// rows, lets `plan` decide and collect its writes, and (when it wrote anything)
    /// bumps the epoch, rewrites the manifest and notifies [`CHANNEL`], all committed
    /// together. Retried on a serialisation failure or deadlock. Returns `plan`'s answer,
    /// the epoch and the rows after the change.
    fn change<T: Send>(
        &self,
        mut plan: impl FnMut(&[Row], &mut Pending) -> Result<T> + Send,
    ) -> Result<(T, u64, Vec<Row>)> {
        let attempts = self.options.attempts.max(1);
        for attempt in 1..=attempts {
            let (kek, store_id) = (&self.kek, &self.store_id);
            let plan = &mut plan;
            let result = self.attempt(async |client: &mut Client| {
                let tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .start()
                    .await?;
                let snap = load_snapshot(&tx).await?;
                sealing::check_manifest(Some(&snap.manifest), || Ok(snap.epoch), kek, store_id, &snap.rows)?;
                let mut pending = Pending::default();
                let out = plan(&snap.rows, &mut pending)?;
                if pending.0.is_empty() {
                    tx.commit().await?;
                    return Ok((out, snap.epoch, snap.rows));
                }
                pending.send(&tx).await?;
                let epoch: i64 = tx
                    .query_one("UPDATE sso_store SET epoch = epoch + 1 RETURNING epoch", &[])
                    .await?
                    .try_get(0)?;
                let epoch = u64::try_from(epoch).map_err(|_| Error::NotAStore("negative epoch".into()))?;
                let rows = load_rows(&tx).await?;
                let manifest = sealing::seal_manifest(kek, store_id, epoch, &rows)?;
                tx.execute("UPDATE sso_store SET manifest = $1", &[&manifest]).await?;
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &epoch.to_string()])
                    .await?;
                tx.commit().await?;
                Ok((out, epoch, rows))
            });
            match result {
                Err(f) if f.retryable() && attempt < attempts => std::thread::sleep(self.backoff(attempt)),
                r => return r.map_err(|f| f.into_error(&self.target.shown)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// A jittered, growing pause before retrying a serialisation failure.
    fn backoff(&self, attempt: u32) -> Duration {
        let mut byte = [0u8; 1];
        let _ = self.rng.fill(&mut byte);
        let base = 2u64.saturating_pow(attempt.min(7)); // 2..128 ms
        Duration::from_millis(base + u64::from(byte[0]) % (base + 1))
    }

    fn insert_new(&mut self, lifecycle: Lifecycle, floor: u64) -> Result<KeyMeta> {
        // Generated once: a retried transaction stores the same key.
        let key = NewKey::generate(&self.rng, &self.node)?;
        let (kek, rng) = (&self.kek, &self.rng);
        let (row, _, rows) =
            self.change(|before, w| sealing::insert_new(kek, rng, &key, lifecycle, floor, before, w))?;
        Ok(row.meta(derive_primary(&rows)))
    }

    fn transition(&mut self, key_id: KeyId, to: Lifecycle, force: bool) -> Result<KeyMeta> {
        let (kek, rng) = (&self.kek, &self.rng);
        let (_, _, rows) = self.change(|rows, w| sealing::transition(kek, rng, rows, key_id, to, force, w))?;
        rows.iter()
            .find(|r| r.key_id == key_id)
            .map(|r| r.meta(derive_primary(&rows)))
            .ok_or(Error::KeyNotFound(key_id))
    }

    fn merge_checked(
        &mut self,
        incoming: &[KeyRecord],
        above_all: bool,
        mut conflicts: Option<&mut Vec<KeyId>>,
    ) -> Result<MergeReport> {
        let (kek, rng) = (&self.kek, &self.rng);
        let ((mut report, _), epoch, _) = self.change(|rows, w| {
            // A retried transaction lists its conflicts afresh.
            if let Some(list) = conflicts.as_deref_mut() {
                list.clear();
            }
            sealing::merge(kek, rng, rows, incoming, above_all, conflicts.as_deref_mut(), w)
        })?;
        report.epoch = epoch;
        Ok(report)
    }
}

fn client_closed(slot: &Option<Client>) -> bool {
    slot.as_ref().is_none_or(Client::is_closed)
}

impl Store for PgStore {
    fn node(&self) -> &str {
        &self.node
    }

    fn epoch(&self) -> Result<u64> {
        self.simple(async |c: &mut Client| {
            let v: i64 = c.query_one("SELECT epoch FROM sso_store", &[]).await?.try_get(0)?;
            Ok(u64::try_from(v).map_err(|_| Error::NotAStore("negative epoch".into()))?)
        })
    }

    fn list(&self) -> Result<Vec<KeyMeta>> {
        Ok(sealing::metas(&self.read_checked()?.1))
    }

    fn keyring(&self) -> Result<Keyring> {
        let (epoch, rows) = self.read_checked()?;
        Ok(Keyring {
            epoch,
            primary: derive_primary(&rows),
            keys: sealing::served(&self.kek, &rows)?,
        })
    }

    fn export(&self) -> Result<Vec<KeyRecord>> {
        sealing::exported(&self.kek, &self.read_checked()?.1)
    }

    fn digest(&self) -> Result<String> {
        sealing::digest(&self.kek, &self.read_checked()?.1)
    }

    fn status(&self) -> Result<StoreStatus> {
        let (epoch, rows, (store_id_text, kind, last_backup_at, backed)) =
            self.read_checked_with(async |tx: &Transaction<'_>| {
                let meta = tx
                    .query_one("SELECT store_id, unseal_kind, last_backup_at FROM sso_store", &[])
                    .await?;
                let backed: Vec<(String, bool)> = tx
                    .query(
                        "SELECT key_id, backed_up FROM sso_keys WHERE backed_up OR material IS NOT NULL ORDER BY generation, key_id",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, bool>(1)?)))
                    .collect::<std::result::Result<_, tokio_postgres::Error>>()?;
                Ok((
                    meta.try_get::<_, String>(0)?,
                    meta.try_get::<_, String>(1)?,
                    meta.try_get::<_, Option<i64>>(2)?,
                    backed,
                ))
            })?;
        let mut not_backed_up = Vec::new();
        let mut backed_up = Vec::new();
        for (id, is_backed) in backed {
            let id = sealing::parse_key_id(&id)?;
            if is_backed {
                backed_up.push(id);
            } else {
                not_backed_up.push(id);
            }
        }
        let primary = derive_primary(&rows);
        Ok(StoreStatus {
            node: self.node.clone(),
            store_id: store_id_text,
            epoch,
            primary,
            keys: rows.iter().map(|r| r.meta(primary)).collect(),
            not_backed_up,
            backed_up,
            last_backup_at: last_backup_at.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
            unseal_kind: UnsealKind::parse(&kind).unwrap_or(UnsealKind::Passphrase),
            shared_database: Some(self.target.shown.clone()),
        })
    }

    fn max_generation(&self) -> Result<u64> {
        self.simple(async |c: &mut Client| {
            let v: i64 = c
                .query_one("SELECT COALESCE(MAX(generation), 0)::BIGINT FROM sso_keys", &[])
                .await?
                .try_get(0)?;
            Ok(u64::try_from(v).unwrap_or(0))
        })
    }

    fn stage_new_above(&mut self, floor: u64) -> Result<KeyMeta> {
        self.insert_new(Lifecycle::Staged, floor)
    }

    fn rotate(&mut self) -> Result<KeyMeta> {
        self.insert_new(Lifecycle::Promoted, 0)
    }

    fn accept_staged(&mut self, record: &KeyRecord) -> Result<MergeReport> {
        self.merge_checked(std::slice::from_ref(record), true, None)
    }

    /// Refuses ([`Error::Overtaken`], in the same serialisable transaction) to promote a
    /// staged key below a promoted higher generation: another node's rotation overtook
    /// this one during its staging pause, and the key would never be the primary (issue
    /// 14: tests/tests/cluster.rs
    /// `a_rotation_is_never_acknowledged_for_a_key_promoted_under_a_higher_one`).
    fn promote(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        let (kek, rng) = (&self.kek, &self.rng);
        let (_, _, rows) = self.change(|rows, w| {
            if let Some(me) = rows.iter().find(|r| r.key_id == key_id)
                && me.lifecycle == Lifecycle::Staged
                && let Some(above) = rows
                    .iter()
                    .filter(|r| r.lifecycle == Lifecycle::Promoted && r.generation > me.generation)
                    .max_by_key(|r| (r.generation, r.key_id))
            {
                return Err(Error::Overtaken {
                    key_id,
                    generation: me.generation,
                    by: above.key_id,
                    by_generation: above.generation,
                });
            }
            sealing::transition(kek, rng, rows, key_id, Lifecycle::Promoted, false, w)
        })?;
        rows.iter()
            .find(|r| r.key_id == key_id)
            .map(|r| r.meta(derive_primary(&rows)))
            .ok_or(Error::KeyNotFound(key_id))
    }

    fn retire(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        self.transition(key_id, Lifecycle::Retired, false)
    }

    fn force_retire(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        self.transition(key_id, Lifecycle::Retired, true)
    }

    /// Destroys a retired key: its wrapped material is set to NULL in the row. The old
    /// row version stays in the table's dead tuples until vacuumed, and in WAL and base
    /// backups until they expire (SECURITY.md): sealed under the KEK, useless without it.
    fn destroy(&mut self, key_id: KeyId) -> Result<KeyMeta> {
        self.transition(key_id, Lifecycle::Destroyed, false)
    }

    fn merge(&mut self, incoming: &[KeyRecord]) -> Result<MergeReport> {
        self.merge_checked(incoming, false, None)
    }

    fn merge_skipping_conflicts(&mut self, incoming: &[KeyRecord]) -> Result<(MergeReport, Vec<KeyId>)> {
        let mut conflicts = Vec::new();
        let report = self.merge_checked(incoming, false, Some(&mut conflicts))?;
        Ok((report, conflicts))
    }

    fn orphans_below(&self, below: u64) -> Result<Vec<KeyId>> {
        Ok(self
            .read_checked()?
            .1
            .iter()
            .filter(|r| r.lifecycle == Lifecycle::Staged && r.generation < below && r.origin == self.node)
            .map(|r| r.key_id)
            .collect())
    }

    fn retire_orphans(&mut self, ids: &[KeyId]) -> Result<usize> {
        let node = self.node.clone();
        let orphans: Vec<KeyId> = self
            .read_checked()?
            .1
            .iter()
            .filter(|r| r.lifecycle == Lifecycle::Staged && r.origin == node && ids.contains(&r.key_id))
            .map(|r| r.key_id)
            .collect();
        for id in &orphans {
            self.transition(*id, Lifecycle::Retired, false)?;
        }
        Ok(orphans.len())
    }

    fn check_writable(&mut self) -> Result<()> {
        let now = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX);
        let node = self.node.clone();
        self.simple(async |c: &mut Client| {
            c.execute(
                "INSERT INTO sso_write_check (node, at) VALUES ($1, $2)
                 ON CONFLICT (node) DO UPDATE SET at = excluded.at",
                &[&node, &now],
            )
            .await?;
            Ok(())
        })
    }

    fn audit_key(&self) -> AuditKey {
        self.kek.audit_key().clone()
    }

    fn audit_anchor(&self) -> Result<Option<AuditAnchor>> {
        let node = self.node.clone();
        let row = self.simple(async |c: &mut Client| {
            let row = c
                .query_opt("SELECT count, head FROM sso_audit_anchor WHERE node = $1", &[&node])
                .await?;
            Ok(match row {
                Some(r) => Some((r.try_get::<_, i64>(0)?, r.try_get::<_, String>(1)?)),
                None => None,
            })
        })?;
        match row {
            None => Ok(None),
            Some((count, head)) if count >= 0 && head.len() == 64 => Ok(Some(AuditAnchor {
                count: count as u64,
                head,
            })),
            Some(_) => Err(Error::Integrity {
                key_id: None,
                detail: "the audit anchor in the store is incomplete or malformed".into(),
            }),
        }
    }

    fn set_audit_anchor(&mut self, anchor: &AuditAnchor) -> Result<()> {
        let count = i64::try_from(anchor.count).map_err(|_| Error::Integrity {
            key_id: None,
            detail: "audit entry count out of range".into(),
        })?;
        let (node, head) = (self.node.clone(), anchor.head.clone());
        self.simple(async |c: &mut Client| {
            c.execute(
                "INSERT INTO sso_audit_anchor (node, count, head) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET count = excluded.count, head = excluded.head",
                &[&node, &count, &head],
            )
            .await?;
            Ok(())
        })
    }

    fn record_backup(&mut self, key_ids: &[KeyId], at: OffsetDateTime) -> Result<()> {
        let ids: Vec<String> = key_ids.iter().map(ToString::to_string).collect();
        let at = at.unix_timestamp();
        let attempts = self.options.attempts.max(1);
        for attempt in 1..=attempts {
            let result = self.attempt(async |c: &mut Client| {
                let tx = c
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .start()
                    .await?;
                tx.execute("UPDATE sso_keys SET backed_up = TRUE WHERE key_id = ANY($1)", &[&ids])
                    .await?;
                tx.execute(
                    "UPDATE sso_store SET last_backup_at = GREATEST(COALESCE(last_backup_at, $1), $1)",
                    &[&at],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            });
            match result {
                Err(f) if f.retryable() && attempt < attempts => std::thread::sleep(self.backoff(attempt)),
                r => return r.map_err(|f| f.into_error(&self.target.shown)),
            }
        }
        unreachable!("the last attempt returns")
    }
}

/// What the change feed has seen: the newest epoch, how many times it has
/// (re)connected and re-read the epoch, and whether it is listening now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeedState {
    /// The newest epoch notified, or read after the last (re)connect.
    pub epoch: u64,
    /// Grows by one after every connect that re-read the epoch: notifications sent while
    /// the feed was disconnected are lost, so a consumer that sees this grow re-reads the
    /// store (and a periodic epoch check covers the rest).
    pub resyncs: u64,
    /// Whether the feed is listening now.
    pub connected: bool,
    /// Whether this feed holds its node's name (only a feed started with
    /// [`ChangeFeed::start_for_node`] claims one).
    pub name: NameClaim,
}

/// Whether a node holds its name in the database. Two processes with one node name on one
/// database would overwrite each other's audit anchor (kept per node name) and stamp their
/// keys with one origin (attack14, tests/tests/cluster_attack.rs
/// `a_second_node_with_a_running_nodes_name_is_refused`), so a node's change feed takes a
/// session advisory lock keyed by the name on every connection it opens, and the server
/// refuses to start without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameClaim {
    /// Not connected, or the feed claims no name.
    #[default]
    Unknown,
    /// The feed's connection holds the name.
    Held,
    /// Another live connection holds it: another process runs with this node name (or
    /// one that died has not yet been noticed by PostgreSQL; see [`NAME_RELEASE`]). The
    /// feed keeps listening and tries again every [`CLAIM_RETRY`].
    HeldElsewhere,
}

/// How long PostgreSQL may take to free the name of a node that died without closing its
/// connection: the feed's connection asks for TCP keepalives after 5 s idle, every 2 s, 3
/// probes (about 11 s), instead of the operating system's default of over two hours.
/// A process that exits, even by SIGKILL, closes its connections at once.
pub const NAME_RELEASE: Duration = Duration::from_secs(15);

/// How often a feed whose name is held elsewhere tries to claim it again.
pub const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// The server-side keepalive of a claiming connection (see [`NAME_RELEASE`]). These
/// settings may be changed by any role; on a Unix socket they do nothing, and need not.
const CLAIM_KEEPALIVE: &str =
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3";

/// The advisory lock key of node name `node`: the first 8 bytes of
/// SHA-256("sso-node-name\0" || name), so distinct names practically never share one (and
/// never the migration lock's small constant).
fn node_lock_key(node: &str) -> i64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"sso-node-name\0");
    ctx.update(node.as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    i64::from_be_bytes(first)
}

/// Takes the session advisory lock `key` if no other session holds it.
async fn try_claim(client: &Client, key: i64) -> std::result::Result<NameClaim, tokio_postgres::Error> {
    let held: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?
        .try_get(0)?;
    Ok(if held {
        NameClaim::Held
    } else {
        NameClaim::HeldElsewhere
    })
}

/// The cluster's change feed: a dedicated `LISTEN sso_keystore` connection, driven by a
/// task on the caller's tokio runtime, publishing a [`FeedState`] through a
/// `tokio::sync::watch` channel (so a slow consumer sees the newest state, never a
/// backlog). It reconnects by itself (bounded backoff) and bumps
/// [`FeedState::resyncs`] after every reconnect. The task ends when the feed is dropped.
#[derive(Debug)]
pub struct ChangeFeed {
    state: watch::Receiver<FeedState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChangeFeed {
    /// Starts the feed for the database at `url` (the same URL the store opens). Must be
    /// called inside a tokio runtime with time and I/O enabled.
    pub fn start(url: &str) -> Result<Self> {
        let options = PgOptions::default();
        Self::start_target(Target::parse(url, &options)?, options, None)
    }

    /// [`ChangeFeed::start`] for the node named `node`, which the feed claims on every
    /// connection it opens ([`NameClaim`], [`FeedState::name`]).
    pub fn start_for_node(url: &str, node: &str) -> Result<Self> {
        let options = PgOptions::default();
        Self::start_target(Target::parse(url, &options)?, options, Some(node_lock_key(node)))
    }

    /// Waits up to `limit` for the feed to hold its node's name, and returns the claim as
    /// it then stands: [`NameClaim::Held`], [`NameClaim::HeldElsewhere`] (another process
    /// has the name), or [`NameClaim::Unknown`] (the database could not be reached).
    pub async fn claimed(&self, limit: Duration) -> NameClaim {
        let mut state = self.state.clone();
        let _ = tokio::time::timeout(limit, state.wait_for(|s| s.name == NameClaim::Held)).await;
        self.current().name
    }

    fn start_target(mut target: Target, options: PgOptions, claim: Option<i64>) -> Result<Self> {
        // Told apart from the store's connections in pg_stat_activity and the server log.
        target.config.application_name("sso-keystore feed");
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            storage(
                "the change feed needs a tokio runtime: start it from async code".into(),
                None,
            )
        })?;
        let (tx, rx) = watch::channel(FeedState::default());
        let task = handle.spawn(feed_loop(target, options, claim, tx));
        Ok(Self { state: rx, task })
    }

    /// A receiver of the feed's state, for as many consumers as need one.
    pub fn subscribe(&self) -> watch::Receiver<FeedState> {
        self.state.clone()
    }

    /// The state now.
    pub fn current(&self) -> FeedState {
        *self.state.borrow()
    }

    /// Waits for the next change of state (a newer epoch, a resync, a disconnect) and
    /// returns it.
    pub async fn next(&mut self) -> Option<FeedState> {
        self.state.changed().await.ok()?;
        Some(*self.state.borrow_and_update())
    }
}

async fn feed_loop(target: Target, options: PgOptions, claim: Option<i64>, tx: watch::Sender<FeedState>) {
    let mut pause = Duration::from_millis(100);
    loop {
        if let Ok(Ok(((client, conn), notes))) =
            tokio::time::timeout(options.connect_timeout + Duration::from_secs(1), feed_connect(&target)).await
        {
            let listened = tokio::time::timeout(options.statement_timeout, async {
                let name = match claim {
                    None => NameClaim::Unknown,
                    Some(key) => {
                        client.batch_execute(CLAIM_KEEPALIVE).await?;
                        try_claim(&client, key).await?
                    }
                };
                client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                let epoch: i64 = client.query_one("SELECT epoch FROM sso_store", &[]).await?.try_get(0)?;
                Ok::<_, tokio_postgres::Error>((epoch, name))
            })
            .await;
            if let Ok(Ok((epoch, mut name))) = listened {
                pause = Duration::from_millis(100);
                tracing::info!(epoch, claim = ?name, "the change feed is listening");
                tx.send_modify(|s| {
                    s.epoch = u64::try_from(epoch).unwrap_or(0);
                    s.resyncs += 1;
                    s.connected = true;
                    s.name = name;
                });
                let mut notes = notes;
                let mut retry = tokio::time::interval(CLAIM_RETRY);
                retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                retry.reset();
                loop {
                    tokio::select! {
                        _ = retry.tick(), if name == NameClaim::HeldElsewhere => {
                            let Some(key) = claim else { continue };
                            match tokio::time::timeout(options.statement_timeout, try_claim(&client, key)).await {
                                Ok(Ok(now)) => {
                                    if now != name {
                                        tracing::info!(claim = ?now, "the change feed's node-name claim changed");
                                        name = now;
                                        tx.send_modify(|s| s.name = now);
                                    }
                                }
                                // The connection is in trouble: start again.
                                _ => break,
                            }
                        }
                        note = notes.recv() => match note {
                            Some(payload) => {
                                if let Ok(epoch) = payload.parse::<u64>() {
                                    tx.send_if_modified(|s| {
                                        let newer = epoch > s.epoch;
                                        if newer {
                                            s.epoch = epoch;
                                        }
                                        newer
                                    });
                                }
                            }
                            None => break,
                        },
                        () = tx.closed() => return,
                    }
                }
                tx.send_modify(|s| {
                    s.connected = false;
                    s.name = NameClaim::Unknown;
                });
            } else {
                match listened {
                    Ok(Err(e)) => tracing::warn!(error = %e, "the change feed could not start listening; reconnecting"),
                    _ => {
                        tracing::warn!("the change feed's LISTEN took longer than the statement timeout; reconnecting")
                    }
                }
            }
            drop(client);
            conn.abort();
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = tx.closed() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

type Notes = tokio::sync::mpsc::UnboundedReceiver<String>;

/// A connection whose driver forwards every notification's payload.
async fn feed_connect(
    target: &Target,
) -> std::result::Result<((Client, tokio::task::JoinHandle<()>), Notes), tokio_postgres::Error> {
    let (send, notes) = tokio::sync::mpsc::unbounded_channel();
    async fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, send: tokio::sync::mpsc::UnboundedSender<String>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if send.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the change feed's connection failed; reconnecting");
                    return;
                }
                None => {
                    tracing::warn!("the database closed the change feed's connection; reconnecting");
                    return;
                }
            }
        }
    }
    let (client, task) = match &target.tls {
        None => {
            let (client, conn) = target.config.connect(NoTls).await?;
            (client, tokio::spawn(drive(conn, send)))
        }
        Some(tls) => {
            let (client, conn) = target.config.connect(tls.clone()).await?;
            (client, tokio::spawn(drive(conn, send)))
        }
    };
    Ok(((client, task), notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_of_the_url_and_the_rest_kept() {
        let (url, ca) = take_param(
            "postgresql://u@h/db?sslmode=require&sslrootcert=/ca.pem&x=1",
            "sslrootcert",
        );
        assert_eq!(url, "postgresql://u@h/db?sslmode=require&x=1");
        assert_eq!(ca.as_deref(), Some("/ca.pem"));
        assert_eq!(
            take_param("postgresql://u@h/db?sslrootcert=/a", "sslrootcert").0,
            "postgresql://u@h/db"
        );
        assert_eq!(
            take_param("postgresql://u@h/db", "sslrootcert"),
            ("postgresql://u@h/db".into(), None)
        );
    }

    #[test]
    fn the_database_is_shown_without_its_password() {
        let target = Target::parse(
            "postgresql://sso:hunter2-secret@db.example:6543/keys",
            &PgOptions::default(),
        )
        .unwrap();
        assert_eq!(target.shown, "postgresql://sso@db.example:6543/keys");
        assert!(!format!("{target:?}").contains("hunter2"));
        let err = Target::parse(
            "postgresql://sso:hunter2-secret@db/keys?sslmode=require",
            &PgOptions::default(),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("sslrootcert"), "{err}");
    }

    #[test]
    fn tls_to_the_database_presents_no_certificate_and_names_a_bad_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let authority = certs::CertificateAuthority::generate("database ca", 1).unwrap();
        std::fs::write(&ca, authority.cert_pem()).unwrap();
        // (The versions themselves: keystore/tests/postgres_tls.rs, against real servers.)
        let config = tls_config(ca.to_str().unwrap()).unwrap();
        assert!(config.alpn_protocols.is_empty());
        assert!(!config.client_auth_cert_resolver.has_certs());
        // A missing or empty CA file is a storage error naming sslrootcert and the file.
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        for path in [dir.path().join("missing.pem"), empty] {
            let err = tls_config(path.to_str().unwrap()).unwrap_err();
            assert!(matches!(err, Error::Storage(_)), "{err}");
            let text = err.to_string();
            assert!(
                text.contains("sslrootcert") && text.contains(path.to_str().unwrap()),
                "{text}"
            );
        }
    }
}
