//! `sso-config`: the server's TOML configuration, validated before any port is bound.
//!
//! Relative paths are resolved against the directory of the config file, so a config and
//! its certificates can move together.
//!
//! Its own crate so that the server and `ssoctl doctor` read a config with one parser
//! without ssoctl linking the server (the server re-exports it as `sso_server::config`).
//! It also owns the identity [`Pattern`]s the config names (roles, the peer), which breaks
//! the old `config` ↔ `identity` import circle of the server.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::PeerIdentity;
use serde::{Deserialize, Serialize};
pub use sso_tls::MinVersion;

/// A configuration problem, naming the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("config {field}: {problem}")]
pub struct ConfigError {
    /// The dotted path of the field, such as `tls.client_ca`.
    pub field: String,
    /// What is wrong and, where possible, how to fix it.
    pub problem: String,
}

fn err(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name: in audit entries, health answers and as the origin of its keys.
    pub node: String,
    /// HTTPS listen address.
    pub listen: SocketAddr,
    /// Plain-HTTP Prometheus metrics address; loopback by default. Secrets never appear.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Certificates and TLS policy.
    pub tls: TlsConfig,
    /// The keystore and how to unseal it.
    pub store: StoreConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// Which certificate identities hold which role.
    pub roles: RolesConfig,
    /// Connection and request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The other node of the failover pair; absent for a standalone server.
    #[serde(default)]
    pub peer: Option<PeerConfig>,
    /// How key material is handed out (docs/key-delivery.md).
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Rotation timing.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// The file this was loaded from: SIGHUP re-reads its `[tls]` section.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The other node of the pair.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its HTTPS address, `https://host:port`.
    pub url: String,
    /// The identity its server certificate must show (`cn:…`, `dns:…`, `uri:…`); its
    /// client certificate must also hold the `peer` role through `roles.peer`.
    pub identity: Pattern,
    /// Anti-entropy period: how often each node pulls the other's key set.
    #[serde(default = "default_sync_interval_ms")]
    pub sync_interval_ms: u64,
    /// Timeout of one replication request.
    #[serde(default = "default_peer_timeout_ms")]
    pub timeout_ms: u64,
    /// Client certificate presented to the peer (default: `tls.cert`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its key (default: `tls.key`).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// CA for the peer's server certificate (default: `tls.client_ca`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl PeerConfig {
    /// A peer at `url` whose server certificate shows `identity`, with the default
    /// intervals and our own certificate, key and CA.
    pub fn new(url: impl Into<String>, identity: Pattern) -> Self {
        Self {
            url: url.into(),
            identity,
            sync_interval_ms: default_sync_interval_ms(),
            timeout_ms: default_peer_timeout_ms(),
            cert: None,
            key: None,
            ca: None,
        }
    }
}

fn default_sync_interval_ms() -> u64 {
    500
}
fn default_peer_timeout_ms() -> u64 {
    2_000
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9443))
}

/// TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to, PEM.
    pub client_ca: PathBuf,
    /// Certificate revocation lists, PEM or DER.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Lowest TLS version accepted: "1.3" (default) or "1.2".
    #[serde(default, with = "min_version")]
    pub min_version: MinVersion,
    /// Bound on the whole TLS handshake; rustls has no timeout of its own.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Issuing (intermediate) CA certificates, PEM, whose CRLs `crls` lists although they
    /// are not in `client_ca`: each must be signed by a CA in `client_ca`. Used only to
    /// check CRL signatures; they are not trust anchors.
    #[serde(default)]
    pub crl_issuers: Option<PathBuf>,
    /// Which certificates of a client's chain are checked against the CRLs:
    /// `"end_entity"` (default) or `"full_chain"`.
    #[serde(default)]
    pub revocation: Revocation,
    /// Accept a certificate whose issuer has no CRL in `crls` (by default, once any CRL is
    /// configured, such a certificate is refused).
    #[serde(default)]
    pub allow_unknown_revocation: bool,
}

/// Which certificates of a client's chain are checked against the CRLs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// Only the client's own certificate: listing the issuing CA's CRL is enough.
    #[default]
    EndEntity,
    /// Every certificate below the trust anchor: each CA in the chain needs its CRL.
    FullChain,
}

/// `tls.min_version` as its two spellings, `"1.3"` and `"1.2"` (sso-tls owns the policy).
mod min_version {
    use serde::{Deserializer, Serializer};
    use sso_tls::MinVersion;

    pub(super) fn serialize<S: Serializer>(v: &MinVersion, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MinVersion, D::Error> {
        d.deserialize_str(Version)
    }

    /// Reads the version as a string, and names the two spellings (quoted: TOML reads an
    /// unquoted `1.2` as a number) whatever else the file holds.
    struct Version;

    impl serde::de::Visitor<'_> for Version {
        type Value = MinVersion;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("\"1.3\" or \"1.2\", quoted")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<MinVersion, E> {
            MinVersion::parse(text).ok_or_else(|| E::custom(format!("{text:?}: must be \"1.3\" or \"1.2\"")))
        }
    }
}
impl TlsConfig {
    /// A server certificate and key and the client CA, with the default policy (TLS 1.3,
    /// no CRLs).
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, client_ca: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: client_ca.into(),
            crls: Vec::new(),
            min_version: MinVersion::default(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            crl_issuers: None,
            revocation: Revocation::default(),
            allow_unknown_revocation: false,
        }
    }
}

fn default_handshake_timeout_ms() -> u64 {
    5_000
}

/// Where the keystore is and how it is unsealed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite store file, or a PostgreSQL database (`postgresql://USER@HOST/DB`,
    /// optionally `?sslmode=require&sslrootcert=CA.pem`) that a cluster of nodes shares.
    pub path: PathBuf,
    /// The unseal secret's source.
    pub unseal: UnsealSource,
}

impl StoreConfig {
    /// The PostgreSQL URL, when the store is a database rather than a file.
    pub fn database_url(&self) -> Option<&str> {
        self.path.to_str().filter(|p| keystore::postgres::is_database_url(p))
    }
}

/// Where the unseal secret comes from: exactly one source. In the file it is a table with
/// one key, such as `unseal = { key_file = "unseal.key" }` or `unseal = { prompt = true }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "UnsealFields", into = "UnsealFields")]
pub enum UnsealSource {
    /// A 32-byte key file (mode 0600).
    KeyFile(PathBuf),
    /// Environment variable holding the key as 64 hex characters.
    KeyEnv(String),
    /// A file holding the passphrase (mode 0600).
    PassphraseFile(PathBuf),
    /// Environment variable holding the passphrase.
    PassphraseEnv(String),
    /// Ask for the passphrase on the terminal at start.
    Prompt,
}

impl UnsealSource {
    /// The file this source reads, if it reads one (both must be private).
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::KeyFile(p) | Self::PassphraseFile(p) => Some(p),
            Self::KeyEnv(_) | Self::PassphraseEnv(_) | Self::Prompt => None,
        }
    }
}

/// The unseal table as the file spells it: five optional keys, of which exactly one is set.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table with exactly one of key_file, key_env, passphrase_file, passphrase_env, prompt = true, such as { key_file = \"unseal.key\" }"
)]
struct UnsealFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    passphrase_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    passphrase_env: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    prompt: bool,
}

/// The message for an unseal table that does not name exactly one source.
const UNSEAL_REMEDY: &str = "set exactly one of key_file, key_env, passphrase_file, passphrase_env, prompt = true";

impl TryFrom<UnsealFields> for UnsealSource {
    type Error = &'static str;

    fn try_from(f: UnsealFields) -> Result<Self, Self::Error> {
        let mut sources = [
            f.key_file.map(Self::KeyFile),
            f.key_env.map(Self::KeyEnv),
            f.passphrase_file.map(Self::PassphraseFile),
            f.passphrase_env.map(Self::PassphraseEnv),
            f.prompt.then_some(Self::Prompt),
        ]
        .into_iter()
        .flatten();
        match (sources.next(), sources.next()) {
            (Some(one), None) => Ok(one),
            _ => Err(UNSEAL_REMEDY),
        }
    }
}

impl From<UnsealSource> for UnsealFields {
    fn from(source: UnsealSource) -> Self {
        let mut f = Self::default();
        match source {
            UnsealSource::KeyFile(p) => f.key_file = Some(p),
            UnsealSource::KeyEnv(v) => f.key_env = Some(v),
            UnsealSource::PassphraseFile(p) => f.passphrase_file = Some(p),
            UnsealSource::PassphraseEnv(v) => f.passphrase_env = Some(v),
            UnsealSource::Prompt => f.prompt = true,
        }
        f
    }
}

/// The audit log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Append-only JSON-lines file, chained with a keyed MAC.
    pub path: PathBuf,
    /// Entries waiting for the writer before new ones are dropped (and counted).
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// Rotate the file when it reaches this many bytes (0: never; SIGHUP always reopens).
    #[serde(default)]
    pub rotate_bytes: u64,
}

impl AuditConfig {
    /// An audit log at `path` with the default queue and no size rotation.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            queue: default_audit_queue(),
            rotate_bytes: 0,
        }
    }
}

fn default_audit_queue() -> usize {
    65_536
}

/// Identity patterns per role. A pattern is `cn:NAME`, `dns:NAME`, `uri:URI`, or
/// `cn:*` (any certificate the client CA issued).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RolesConfig {
    /// May fetch keys and watch the keyring.
    #[serde(default)]
    pub client: Vec<Pattern>,
    /// May do everything a client may, plus rotate, retire, destroy, status, backup and
    /// restore.
    #[serde(default)]
    pub admin: Vec<Pattern>,
    /// The other node of the pair: replication endpoints only.
    #[serde(default)]
    pub peer: Vec<Pattern>,
}

/// How key material is handed out (docs/key-delivery.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Answer key requests without a `Sso-Key-Wrap` header with the keys in plain base64
    /// (what `curl` gets). `false`: such requests get 406 `wrapped_delivery_required`, and
    /// key material only ever leaves sealed to the asking client's ephemeral key.
    pub allow_plain: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self { allow_plain: true }
    }
}

/// Connection and request limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections served at once, handshakes included; further ones wait in the listen
    /// backlog. The process needs a file-descriptor limit above this.
    pub max_connections: usize,
    /// TLS handshakes in progress at once (connections with no verified identity yet).
    /// Past it, each new connection closes the oldest pending handshake, so silent TCP
    /// connections cannot hold the slots that authenticated clients need. Never more than
    /// `max_connections`.
    pub max_pending_handshakes: usize,
    /// Connections one certificate identity that holds a role may keep open; past it,
    /// new connections are answered 429 and closed.
    pub max_connections_per_identity: usize,
    /// Connections a certificate identity that holds no role may keep open (it can only
    /// reach `/v1/health` anyway).
    pub max_connections_per_roleless_identity: usize,
    /// Deadline from the end of the TLS handshake to the first complete request head, on
    /// every protocol (HTTP/1.1, HTTP/2, and the protocol detection before either).
    /// Default: `header_read_timeout_ms`.
    pub first_request_timeout_ms: Option<u64>,
    /// A connection with no request in flight for this long is closed (HTTP/2 with
    /// GOAWAY). HTTP/1.1 keep-alive connections are also bounded by the header timeout.
    pub idle_timeout_ms: u64,
    /// Watch long-polls open at once, over all identities; past it, 503.
    pub max_watches: usize,
    /// Watch long-polls one identity may hold open; past it, 429.
    pub max_watches_per_identity: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Time allowed to send request headers (slow-loris bound), and the keep-alive idle
    /// limit between requests.
    pub header_read_timeout_ms: u64,
    /// Time allowed to send a request body.
    pub body_read_timeout_ms: u64,
    /// Longest a watch long-poll waits before answering 204.
    pub watch_max_wait_ms: u64,
    /// Bounded drain on shutdown.
    pub shutdown_grace_ms: u64,
    /// Longest a connection lives. Then it is ended gracefully (HTTP/2 GOAWAY, or
    /// `Connection: close` after the current HTTP/1.1 request) so clients reconnect, and
    /// with the new connection go through the current CA, CRLs and roles again.
    pub max_connection_age_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_pending_handshakes: 12_288,
            max_connections_per_identity: 1024,
            max_connections_per_roleless_identity: 4,
            first_request_timeout_ms: None,
            idle_timeout_ms: 60_000,
            max_watches: 16_384,
            max_watches_per_identity: 1024,
            max_body_bytes: 1 << 20,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            watch_max_wait_ms: 25_000,
            shutdown_grace_ms: 5_000,
            max_connection_age_ms: 3_600_000,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `"text"` or `"json"`.
    pub format: LogFormat,
    /// An env-filter directive such as "info" or "sso_server=debug".
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Rotation timing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// The pause between staging a new key and promoting it to primary, so that clients
    /// watching the keyring hold the key before anything is sealed with it
    /// (`STAGING_PAUSE_MS` bounds it).
    #[serde(deserialize_with = "pause_ms")]
    pub staging_pause_ms: u64,
}

/// `rotation.staging_pause_ms` as a whole number of milliseconds; the range is checked
/// by [`Config::validate`]. A negative, fractional or quoted value is refused saying what
/// the value must be, not which Rust type holds it.
fn pause_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Millis;

    impl serde::de::Visitor<'_> for Millis {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "a whole number of milliseconds from {} to {}, unquoted",
                STAGING_PAUSE_MS.start(),
                STAGING_PAUSE_MS.end()
            )
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
    }
    d.deserialize_u64(Millis)
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self { staging_pause_ms: 250 }
    }
}

/// The bounds of `rotation.staging_pause_ms`: up to 30 s, so a rotation (which answers
/// after its promote) stays well inside ssoctl's 60 s request timeout.
pub const STAGING_PAUSE_MS: std::ops::RangeInclusive<u64> = 0..=30_000;

impl Config {
    /// A config with the required sections and every other one at its default (metrics on
    /// 127.0.0.1:9443, no peer): what dev mode and the tests start from before writing it
    /// with [`Config::to_toml`].
    pub fn new(
        node: impl Into<String>,
        listen: SocketAddr,
        tls: TlsConfig,
        store: StoreConfig,
        audit: AuditConfig,
        roles: RolesConfig,
    ) -> Self {
        Self {
            node: node.into(),
            listen,
            metrics_listen: default_metrics_listen(),
            tls,
            store,
            audit,
            roles,
            limits: Limits::default(),
            log: LogConfig::default(),
            peer: None,
            delivery: DeliveryConfig::default(),
            rotation: RotationConfig::default(),
            source: None,
        }
    }

    /// Reads, parses and validates a config file. Relative paths become relative to the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| err("file", format!("{}: {e}", path.display())))?;
        let mut config = Self::parse(&text)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.resolve_paths(&base);
        config.validate()?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses TOML text; the error names the field serde stopped at (its dotted path
    /// where it can be told, and its line).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let Some(span) = e.span() else {
                return err("(file)", e.message().to_owned());
            };
            let line = text[..span.start].lines().count().max(1);
            let field = match field_at(text, span.start) {
                Some(path) => format!("{path} (line {line})"),
                None => format!("(line {line})"),
            };
            err(&field, e.message().to_owned())
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        self.tls.crls.iter_mut().for_each(fix);
        self.tls.crl_issuers.as_mut().map(fix);
        if self.store.database_url().is_none() {
            fix(&mut self.store.path);
        }
        fix(&mut self.audit.path);
        if let UnsealSource::KeyFile(p) | UnsealSource::PassphraseFile(p) = &mut self.store.unseal {
            fix(p);
        }
        if let Some(peer) = self.peer.as_mut() {
            peer.cert.as_mut().map(fix);
            peer.key.as_mut().map(fix);
            peer.ca.as_mut().map(fix);
        }
    }

    /// Checks everything that can be checked without binding a port or unsealing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !keystore::validate::is_valid_node_name(&self.node) {
            return Err(err("node", format!("must be {}", keystore::validate::NODE_NAME_RULE)));
        }
        // A URL that is not a PostgreSQL one (a mistyped or capitalised scheme) would be
        // taken for a file and echoed in "does not exist", password and all.
        if self.store.database_url().is_none() && self.store.path.to_string_lossy().contains("://") {
            return Err(err(
                "store.path",
                "looks like a URL but does not start with postgresql:// or postgres:// (lowercase): write the database as postgresql://USER@HOST:PORT/DATABASE, or a store file's path",
            ));
        }
        if self.store.database_url().is_some() && self.peer.is_some() {
            return Err(err(
                "peer",
                "a node on a PostgreSQL store is one of a cluster that shares the database; [peer] is for a pair of SQLite stores: remove [peer], or set store.path to this node's own store file",
            ));
        }
        if self.metrics_listen == self.listen && self.listen.port() != 0 {
            return Err(err("metrics_listen", "must differ from listen"));
        }
        for (field, path) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if !path.is_file() {
                return Err(err(
                    field,
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
        }
        for (i, crl) in self.tls.crls.iter().enumerate() {
            if !crl.is_file() {
                return Err(err(
                    &format!("tls.crls[{i}]"),
                    format!("{} does not exist", crl.display()),
                ));
            }
        }
        if let Some(p) = &self.tls.crl_issuers
            && !p.is_file()
        {
            return Err(err("tls.crl_issuers", format!("{} does not exist", p.display())));
        }
        if !(100..=120_000).contains(&self.tls.handshake_timeout_ms) {
            return Err(err("tls.handshake_timeout_ms", "must be between 100 and 120000"));
        }
        if self.store.database_url().is_none() && !self.store.path.exists() {
            return Err(err(
                "store.path",
                format!(
                    "{} does not exist: create the store first (ssoctl init)",
                    self.store.path.display()
                ),
            ));
        }
        if let Some(parent) = self.audit.path.parent()
            && !parent.as_os_str().is_empty()
            && !parent.is_dir()
        {
            return Err(err(
                "audit.path",
                format!("directory {} does not exist", parent.display()),
            ));
        }
        if self.audit.queue == 0 {
            return Err(err("audit.queue", "must be at least 1"));
        }
        if self.roles.client.is_empty() && self.roles.admin.is_empty() {
            return Err(err(
                "roles",
                "no identity may do anything: set roles.client or roles.admin",
            ));
        }
        if let Some(peer) = &self.peer {
            if !peer.url.starts_with("https://") {
                return Err(err("peer.url", "must be https://host:port"));
            }
            if self.roles.peer.is_empty() {
                return Err(err(
                    "roles.peer",
                    "a peer is configured but no identity holds the peer role",
                ));
            }
            if !(50..=60_000).contains(&peer.sync_interval_ms) {
                return Err(err("peer.sync_interval_ms", "must be between 50 and 60000"));
            }
            for (field, path) in [
                ("peer.cert", &peer.cert),
                ("peer.key", &peer.key),
                ("peer.ca", &peer.ca),
            ] {
                if let Some(p) = path
                    && !p.is_file()
                {
                    return Err(err(field, format!("{} does not exist", p.display())));
                }
            }
        }
        let l = &self.limits;
        if l.max_connections == 0 {
            return Err(err("limits.max_connections", "must be at least 1"));
        }
        if l.max_pending_handshakes == 0 {
            return Err(err("limits.max_pending_handshakes", "must be at least 1"));
        }
        if l.max_connections_per_identity == 0 || l.max_connections_per_roleless_identity == 0 {
            return Err(err(
                "limits.max_connections_per_identity",
                "per-identity connection caps must be at least 1",
            ));
        }
        if l.max_watches == 0 || l.max_watches_per_identity == 0 {
            return Err(err("limits.max_watches", "watch caps must be at least 1"));
        }
        let first = l.first_request_timeout_ms.unwrap_or(l.header_read_timeout_ms);
        if !(100..=3_600_000).contains(&first) || !(100..=3_600_000).contains(&l.idle_timeout_ms) {
            return Err(err(
                "limits.first_request_timeout_ms",
                "first_request_timeout_ms and idle_timeout_ms must be between 100 and 3600000",
            ));
        }
        if l.max_body_bytes < 1024 {
            return Err(err("limits.max_body_bytes", "must be at least 1024"));
        }
        if l.header_read_timeout_ms == 0 || l.body_read_timeout_ms == 0 {
            return Err(err("limits", "timeouts must be positive"));
        }
        if !(1_000..=604_800_000).contains(&l.max_connection_age_ms) {
            return Err(err(
                "limits.max_connection_age_ms",
                "must be between 1000 (1 s) and 604800000 (7 days)",
            ));
        }
        if !STAGING_PAUSE_MS.contains(&self.rotation.staging_pause_ms) {
            return Err(err(
                "rotation.staging_pause_ms",
                format!(
                    "must be between {} and {} (milliseconds)",
                    STAGING_PAUSE_MS.start(),
                    STAGING_PAUSE_MS.end()
                ),
            ));
        }
        Ok(())
    }

    /// The handshake timeout as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls.handshake_timeout_ms)
    }

    /// The pause between a rotation's stage and its promote (`rotation.staging_pause_ms`).
    pub fn staging_pause(&self) -> Duration {
        Duration::from_millis(self.rotation.staging_pause_ms)
    }

    /// The config as TOML, as [`Config::parse`] reads it back (paths as they are held:
    /// absolute after [`Config::load`], as written for a config built in code).
    pub fn to_toml(&self) -> String {
        // Every field is a string, number, boolean, array or table of those, with no map
        // keyed by anything but a string: serialisation cannot fail.
        toml::to_string(self).expect("a config always serialises")
    }
}

/// The dotted path (`tls.min_version`, `roles.client[1]`) of the deepest key or value of
/// `text` that covers byte `offset`, for error messages.
fn field_at(text: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    fn walk(table: &DeTable<'_>, offset: usize, path: &str) -> Option<String> {
        table.iter().find_map(|(key, value)| {
            let here = if path.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{path}.{}", key.get_ref())
            };
            let deeper = match value.get_ref() {
                DeValue::Table(t) => walk(t, offset, &here),
                DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                    let at = format!("{here}[{i}]");
                    match item.get_ref() {
                        DeValue::Table(t) => walk(t, offset, &at),
                        _ => None,
                    }
                    .or_else(|| item.span().contains(&offset).then_some(at))
                }),
                _ => None,
            };
            deeper.or_else(|| (key.span().contains(&offset) || value.span().contains(&offset)).then_some(here))
        })
    }
    let doc = DeTable::parse(text).ok()?;
    walk(doc.get_ref(), offset, "")
}

/// One identity pattern from the config, parsed when the config is read: `cn:NAME`,
/// `cn:*`, `dns:NAME` or `uri:URI` (written back the same way).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Pattern {
    /// Subject CN equals this.
    Cn(String),
    /// Any certificate (the client CA already vouched for it).
    AnyCn,
    /// A SAN DNS name equals this.
    Dns(String),
    /// A SAN URI equals this.
    Uri(String),
}

impl Pattern {
    /// Parses `cn:NAME`, `cn:*`, `dns:NAME` or `uri:URI`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, value) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not KIND:VALUE (kinds: cn, dns, uri)"))?;
        if value.is_empty() {
            return Err(format!("{text:?} has an empty value"));
        }
        match kind.to_ascii_lowercase().as_str() {
            "cn" if value == "*" => Ok(Self::AnyCn),
            "cn" => Ok(Self::Cn(value.into())),
            "dns" => Ok(Self::Dns(value.to_ascii_lowercase())),
            "uri" => Ok(Self::Uri(value.into())),
            other => Err(format!(
                "{text:?}: unknown identity kind {other:?} (kinds: cn, dns, uri)"
            )),
        }
    }

    /// Whether a certificate identity matches this pattern.
    pub fn matches(&self, id: &PeerIdentity) -> bool {
        match self {
            Self::AnyCn => true,
            Self::Cn(cn) => id.common_name.as_deref() == Some(cn.as_str()),
            Self::Dns(dns) => id.dns_names.iter().any(|d| d.eq_ignore_ascii_case(dns)),
            Self::Uri(uri) => id.uris.iter().any(|u| u == uri),
        }
    }
}

impl TryFrom<String> for Pattern {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> Self {
        p.to_string()
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AnyCn => f.write_str("cn:*"),
            Self::Cn(cn) => write!(f, "cn:{cn}"),
            Self::Dns(dns) => write!(f, "dns:{dns}"),
            Self::Uri(uri) => write!(f, "uri:{uri}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let e = Config::parse("node = 'a'\nlisten = 'nonsense'\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = Config::parse("bogus = 1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    /// `store.path` may name a PostgreSQL database (issue 14): it is not a file (never
    /// resolved against the config's directory, never checked for existence), and it is
    /// a cluster's store, so `[peer]` beside it is refused.
    #[test]
    fn a_postgresql_store_is_a_url_not_a_file_and_refuses_a_peer() {
        let pair =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/pair/node-a.toml")).unwrap();
        let mut config = Config::parse(&pair).unwrap();
        let url = "postgresql://sso@db.example/sso?sslmode=require&sslrootcert=/etc/sso/db-ca.pem";
        config.store.path = url.into();
        config.resolve_paths(Path::new("/etc/sso"));
        assert_eq!(config.store.path, PathBuf::from(url));
        assert_eq!(config.store.database_url(), Some(url));
        let e = config.validate().unwrap_err();
        assert_eq!(e.field, "peer", "{e}");
        assert!(e.to_string().contains("PostgreSQL"), "{e}");
        config.peer = None;
        // Past the peer check, whatever else fails, it is not the store's path.
        if let Err(e) = config.validate() {
            assert_ne!(e.field, "store.path", "{e}");
        }
    }
    /// A store URL whose scheme is mistyped or not lowercase is not a PostgreSQL store, so
    /// it was taken for a file and refused as one: "PATH does not exist", the password in
    /// the URL printed to stderr and the journal. It is refused as a URL, without echoing it.
    #[test]
    fn a_mistyped_database_url_is_refused_without_showing_its_password() {
        let pair =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/pair/node-a.toml")).unwrap();
        for url in [
            "postgresq://sso:hunter2-secret@db.example/sso",
            "PostgreSQL://sso:hunter2-secret@db.example/sso",
            "pgsql://sso:hunter2-secret@db.example/sso",
        ] {
            let mut config = Config::parse(&pair).unwrap();
            config.peer = None;
            config.store.path = url.into();
            config.resolve_paths(Path::new("/etc/sso"));
            assert_eq!(config.store.database_url(), None);
            let e = config.validate().unwrap_err();
            assert_eq!(e.field, "store.path", "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
            assert!(e.to_string().contains("postgresql://"), "{e}");
        }
    }
}
