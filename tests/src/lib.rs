//! Shared helpers for process-level tests: a per-test PKI made with rcgen, a store, a
//! config, the real `sso-server` binary started on port 0 and killed with SIGKILL, and an
//! mTLS HTTP client.
//!
//! # Layout
//! - [`Pki`]: a CA per test, with helpers for the certificates the negative matrix needs
//!   (another CA, expired, not yet valid, revoked).
//! - [`ServerSetup`] / [`TestServer`]: writes a store and a config (through the config
//!   type: [`ServerSetup::builder`]), starts the binary, waits for its `listening` line,
//!   captures its log; [`one_server`] does all of it for the common one-server test.
//! - [`cluster`]: nodes on one PostgreSQL database, ports pinned so that a SIGKILLed node
//!   comes back where its clients expect it (the fault tests, `tests/cluster_faults.rs`).
//! - [`in_process`]: the server in the test's own runtime, under a clock the test moves.
//! - [`Client`]: HTTPS requests with a chosen client certificate, one connection each.
//! - [`assert_eventually!`]: poll a condition with a deadline.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::missing_panics_doc)]

pub mod cluster;
pub mod cluster_example;
pub mod in_process;
pub mod pair;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use certs::{CertificateAuthority, LeafSpec, LeafUsage};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + $timeout;
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }};
}

/// A certificate and key written to disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: Vec<u8>,
}

/// A per-test PKI in a directory.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: CertificateAuthority,
    pub ca_file: PathBuf,
    /// Client certificates issued so far, by name: see [`Pki::client`].
    clients: std::sync::Mutex<std::collections::HashMap<String, CertFiles>>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Pki {
    /// `ssoctl --server URL... --ca CA --cert C --key K` as this PKI's client `name`, with
    /// the caller's `SSOCTL_SERVER` and `SSOCTL_DEV` removed; add the command and run it.
    pub fn ssoctl<S: AsRef<std::ffi::OsStr>>(&self, name: &str, servers: &[S]) -> Command {
        let certs = self.client(name);
        let mut cmd = Command::new(bin("ssoctl"));
        for server in servers {
            cmd.arg("--server").arg(server);
        }
        cmd.arg("--ca")
            .arg(&self.ca_file)
            .arg("--cert")
            .arg(&certs.cert)
            .arg("--key")
            .arg(&certs.key)
            .env_remove("SSOCTL_SERVER")
            .env_remove("SSOCTL_DEV");
        cmd
    }

    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        // A distinct name per CA, so a certificate from another test CA is an unknown issuer
        // rather than a bad signature from a same-named one.
        let name = format!("test CA {}", dir.display());
        // A year: well beyond `ssoctl doctor`'s 30-day expiry warning, so a fresh test
        // setup is a healthy one.
        let ca = CertificateAuthority::generate(&name, 365).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        Self {
            dir: dir.to_path_buf(),
            ca,
            ca_file,
            clients: Default::default(),
        }
    }

    /// Issues `spec` and writes `NAME.pem` and `NAME-key.pem`.
    pub fn issue_spec(&self, file: &str, spec: &LeafSpec) -> CertFiles {
        let leaf = self.ca.issue(spec).unwrap();
        let cert = self.dir.join(format!("{file}.pem"));
        let key = self.dir.join(format!("{file}-key.pem"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        keystore::fsutil::write_private_atomic(&key, leaf.key_pem.as_bytes()).unwrap();
        CertFiles {
            cert,
            key,
            serial: leaf.serial,
        }
    }

    /// A client certificate with CN `name`: issued on the first call, the same files after.
    /// Re-issuing rewrote `NAME.pem` and `NAME-key.pem` while a process (or another task)
    /// was reading them, so it could load one certificate with another's key: ssoctl then
    /// refused "the client key does not belong to the client certificate" (exit 64), which
    /// a pair test polling with the admin certificate met on a loaded machine.
    pub fn client(&self, name: &str) -> CertFiles {
        let mut issued = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        issued
            .entry(name.to_owned())
            .or_insert_with(|| self.issue_spec(name, &LeafSpec::client(name, 365)))
            .clone()
    }

    /// An agent config (written through `sso_agent`'s own type, never a TOML fragment)
    /// reaching `endpoint`, trusting this CA, presenting the client certificate with CN
    /// `client` ([`Pki::client`]) and serving `socket`; every other setting at its default.
    /// Change its public fields, then write it with `AgentConfig::to_toml`.
    pub fn agent_config(
        &self,
        client: &str,
        endpoint: impl Into<String>,
        socket: impl Into<PathBuf>,
    ) -> sso_agent::agent::AgentConfig {
        let cert = self.client(client);
        sso_agent::agent::AgentConfig::new([endpoint], &self.ca_file, cert.cert, cert.key, socket)
    }

    /// A server certificate for localhost / 127.0.0.1, usable as a client too (peers).
    pub fn server(&self, file: &str) -> CertFiles {
        let mut spec = LeafSpec::server(file, &["localhost"], &[[127, 0, 0, 1].into()], 365);
        spec.usage = LeafUsage::ServerAndClient;
        self.issue_spec(file, &spec)
    }

    /// Writes a CRL revoking `serials` and returns its path.
    pub fn crl(&self, file: &str, serials: &[Vec<u8>], number: u64) -> PathBuf {
        let path = self.dir.join(file);
        std::fs::write(&path, self.ca.crl(serials, number, 7).unwrap()).unwrap();
        path
    }
}

/// Everything needed to start a server: a directory holding its store (one key), key file,
/// audit log and config file, written through the config type ([`sso_server::Config`]).
#[derive(Debug, Clone)]
pub struct ServerSetup {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub store: PathBuf,
    pub unseal_key: PathBuf,
    pub audit: PathBuf,
    pub server_cert: CertFiles,
}

/// Builds a [`ServerSetup`]: [`ServerSetup::builder`], then changes to the config, then
/// [`SetupBuilder::build`].
#[must_use]
pub struct SetupBuilder<'a> {
    dir: PathBuf,
    pki: &'a Pki,
    node: String,
    edits: Vec<ConfigEdit<'a>>,
}

/// One change to a config, applied when the setup is built.
type ConfigEdit<'a> = Box<dyn FnOnce(&mut sso_server::Config) + 'a>;

impl std::fmt::Debug for SetupBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetupBuilder")
            .field("dir", &self.dir)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl<'a> SetupBuilder<'a> {
    /// Changes the config before it is written (applied in order).
    pub fn config(mut self, edit: impl FnOnce(&mut sso_server::Config) + 'a) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// Changes `[limits]`.
    pub fn limits(self, edit: impl FnOnce(&mut sso_server::config::Limits) + 'a) -> Self {
        self.config(|c| edit(&mut c.limits))
    }

    /// Changes `[tls]`.
    pub fn tls(self, edit: impl FnOnce(&mut sso_server::config::TlsConfig) + 'a) -> Self {
        self.config(|c| edit(&mut c.tls))
    }

    /// Creates the directory, the server certificate (`NODE-server` from the PKI), a key
    /// file, a store holding one primary key, and writes the config: listening on
    /// 127.0.0.1:0 (metrics too), `cn:client` and `cn:client2` as clients, `cn:admin` as
    /// admin, debug logging for the server, then the changes asked for.
    pub fn build(self) -> ServerSetup {
        use sso_server::config::{AuditConfig, Pattern, RolesConfig, StoreConfig, TlsConfig, UnsealSource};
        let Self { dir, pki, node, edits } = self;
        std::fs::create_dir_all(&dir).unwrap();
        let server_cert = pki.server(&format!("{node}-server"));
        let unseal_key = dir.join("unseal.key");
        let key = keystore::UnsealKey::generate_key_file(&unseal_key).unwrap();
        let store = dir.join("store.db");
        let mut s = keystore::SealedStore::create(&store, &key, &keystore::CreateOptions::new(&node)).unwrap();
        s.rotate().unwrap();
        drop(s);
        let audit = dir.join("audit.log");
        let cn = |name: &str| Pattern::Cn(name.into());
        let mut config = sso_server::Config::new(
            node,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            TlsConfig::new(&server_cert.cert, &server_cert.key, &pki.ca_file),
            StoreConfig {
                path: store.clone(),
                unseal: UnsealSource::KeyFile(unseal_key.clone()),
            },
            AuditConfig::new(&audit),
            RolesConfig {
                client: vec![cn("client"), cn("client2")],
                admin: vec![cn("admin")],
                peer: Vec::new(),
            },
        );
        config.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.log.level = "sso_server=debug,info".into();
        for edit in edits {
            edit(&mut config);
        }
        let setup = ServerSetup {
            config: dir.join("server.toml"),
            dir,
            store,
            unseal_key,
            audit,
            server_cert,
        };
        setup.write(&config);
        setup
    }
}

impl ServerSetup {
    /// A setup for `node` in `dir` with certificates from `pki`: see [`SetupBuilder::build`].
    pub fn builder<'a>(dir: &Path, pki: &'a Pki, node: &str) -> SetupBuilder<'a> {
        SetupBuilder {
            dir: dir.to_path_buf(),
            pki,
            node: node.to_owned(),
            edits: Vec::new(),
        }
    }

    /// The setup with every default: `builder(dir, pki, node).build()`.
    pub fn standard(dir: &Path, pki: &Pki, node: &str) -> Self {
        Self::builder(dir, pki, node).build()
    }

    /// The config as written (paths absolute).
    pub fn read_config(&self) -> sso_server::Config {
        let text = std::fs::read_to_string(&self.config).unwrap();
        sso_server::Config::parse(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes `config` as this setup's config file, through the type.
    pub fn write(&self, config: &sso_server::Config) {
        std::fs::write(&self.config, config.to_toml()).unwrap();
    }

    /// Verifies the (stopped or running) server's audit log under its store's audit key,
    /// from the first entry to the anchor in the store, which must exist.
    pub fn verify_audit(&self) {
        let key = keystore::UnsealKey::key_file(&self.unseal_key).unwrap();
        let store = keystore::SealedStore::open(&self.store, &key).unwrap();
        let anchor = store.audit_anchor().unwrap();
        assert!(anchor.is_some(), "no audit anchor in the store");
        keystore::audit::verify(
            std::slice::from_ref(&self.audit),
            &store.audit_key(),
            keystore::audit::Start::Genesis,
            anchor.as_ref(),
        )
        .unwrap();
    }

    /// Changes the config file through the type (read, change, write).
    pub fn edit(&self, edit: impl FnOnce(&mut sso_server::Config)) {
        let mut config = self.read_config();
        edit(&mut config);
        self.write(&config);
    }
}

/// One standalone server, started from a [`ServerSetup`] in a fresh temporary directory:
/// the start most process tests share. `ROOT/pki` holds the PKI, `ROOT/node` the setup,
/// `ROOT/server.log` the server's log.
#[derive(Debug)]
pub struct OneServer {
    /// The running server. Declared first, so it is stopped (and its logs checked for
    /// key material) before the directory goes.
    pub server: TestServer,
    pub setup: ServerSetup,
    pub pki: Pki,
    pub root: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Starts `binary` (`sso-server`, or a wrapper script around it) on a default setup for
/// `node-a` changed by `edit`: see [`OneServer`].
pub fn one_server_with(binary: &Path, edit: impl FnOnce(&mut sso_server::Config)) -> OneServer {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::new(&root.join("pki"));
    let setup = ServerSetup::builder(&root.join("node"), &pki, "node-a")
        .config(edit)
        .build();
    let server = TestServer::start(binary, &setup.config, &root.join("server.log"));
    OneServer {
        server,
        setup,
        pki,
        root,
        dir,
    }
}

/// [`one_server_with`] the workspace's `sso-server` and the default config.
pub fn one_server() -> OneServer {
    one_server_with(&bin("sso-server"), |_| {})
}

impl OneServer {
    /// An mTLS client presenting the certificate with CN `name` (issued on first use).
    pub fn client(&self, name: &str) -> Client {
        Client::new(self.server.https, &self.pki.ca_file, Some(&self.pki.client(name)))
    }

    /// A client with the admin certificate.
    pub fn admin(&self) -> Client {
        self.client("admin")
    }
}

/// A running `sso-server` process.
#[derive(Debug)]
pub struct TestServer {
    pub child: Child,
    pub https: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    /// The config it was started with (for the leak check on drop).
    pub config: Option<PathBuf>,
}

impl TestServer {
    /// Starts `binary --config CONFIG`, waiting up to 30 s for its listening line.
    pub fn start(binary: &Path, config: &Path, log: &Path) -> Self {
        Self::start_with_env(binary, config, log, &[])
    }

    /// [`TestServer::start`] with extra environment variables.
    pub fn start_with_env(binary: &Path, config: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .env_remove("RUST_LOG")
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("sso-server listening ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        let field = |name: &str| -> SocketAddr {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        Self {
            https: field("https"),
            metrics: field("metrics"),
            child,
            log: log.to_path_buf(),
            config: Some(config.to_path_buf()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `TERM`, `KILL`) with the `kill` utility.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How the process ended, once it has (without waiting).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The metrics page.
    pub fn metrics_text(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The value of one metric line (exact name with labels), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        // Every process test is also a leak check: nothing the store holds may appear in
        // the server's log or audit log. Skipped while a test is already failing.
        if !std::thread::panicking()
            && let Some(found) = self.key_material_in_logs()
        {
            panic!("{found}");
        }
    }
}

impl TestServer {
    /// Opens the (stopped) server's store with its key file and looks for any key's bytes,
    /// as hex or base64, in its log and audit log. `Some(description)` when found.
    pub fn key_material_in_logs(&self) -> Option<String> {
        let config_path = self.config.as_ref()?;
        let text = std::fs::read_to_string(config_path).ok()?;
        let config = sso_server::Config::parse(&text).ok()?;
        let base = config_path.parent()?;
        let resolve = |p: &Path| if p.is_relative() { base.join(p) } else { p.to_path_buf() };
        let sso_server::config::UnsealSource::KeyFile(key_file) = &config.store.unseal else {
            return None;
        };
        let key = keystore::UnsealKey::key_file(&resolve(key_file)).ok()?;
        let records = match config.store.database_url() {
            // A cluster node's store (tests/tests/cluster_attack.rs
            // `the_leak_check_covers_nodes_on_postgresql`). PgStore blocks on a runtime of its
            // own, so it is opened on a thread outside the test's runtime.
            Some(url) => {
                let (url, node) = (url.to_owned(), config.node.clone());
                std::thread::spawn(move || {
                    keystore::postgres::PgStore::open(&url, &key, &node)
                        .and_then(|store| keystore::Store::export(&store))
                        .ok()
                })
                .join()
                .ok()??
            }
            None => keystore::SealedStore::open(&resolve(&config.store.path), &key)
                .ok()?
                .export()
                .ok()?,
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let files = [self.log.clone(), resolve(&config.audit.path)];
        for record in records {
            let Some(secret) = &record.secret else { continue };
            let raw = secret.expose_secret();
            use base64::Engine;
            for needle in [hex::encode(raw), b64.encode(raw), hex::encode(&raw[..12])] {
                for f in &files {
                    if std::fs::read_to_string(f).unwrap_or_default().contains(&needle) {
                        return Some(format!("key {} leaked into {}", record.meta.key_id, f.display()));
                    }
                }
            }
        }
        None
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A client configuration from the one builder (`sso_tls`) trusting `ca` and presenting `cert`.
pub fn tls_config(ca: &Path, cert: Option<&CertFiles>) -> rustls::ClientConfig {
    let mut builder = sso_tls::ClientTls::trusting(sso_tls::load_roots(ca).unwrap());
    if let Some(c) = cert {
        builder = builder.identity_files(&c.cert, &c.key).unwrap();
    }
    builder.build().unwrap()
}

/// An mTLS client for one identity (or none).
#[derive(Debug, Clone)]
pub struct Client {
    config: Arc<rustls::ClientConfig>,
    pub addr: SocketAddr,
}

impl Client {
    /// A client that trusts `ca` and presents `cert` (or nothing).
    pub fn new(addr: SocketAddr, ca: &Path, cert: Option<&CertFiles>) -> Self {
        Self::with_alpn(addr, ca, cert, vec![b"http/1.1".to_vec()])
    }

    pub fn with_alpn(addr: SocketAddr, ca: &Path, cert: Option<&CertFiles>, alpn: Vec<Vec<u8>>) -> Self {
        let mut config = tls_config(ca, cert);
        config.alpn_protocols = alpn;
        Self {
            config: Arc::new(config),
            addr,
        }
    }

    /// A TLS connection to the server, handshake done, nothing sent.
    pub async fn connect_tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// One request on a fresh connection. `Err` carries the transport error text (a
    /// refused handshake shows up here).
    pub async fn request(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Reply, String> {
        self.request_with(method, path, body, &[]).await
    }

    /// [`Client::request`] with extra headers.
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json");
        let req = headers
            .iter()
            .fold(req, |req, (name, value)| req.header(*name, *value))
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply { status, body })
    }

    pub async fn get(&self, path: &str) -> Result<Reply, String> {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Reply, String> {
        self.request("POST", path, Some(serde_json::to_vec(body).unwrap()))
            .await
    }
    /// `POST /v1/admin/rotate` with `{}` (as an admin), asserting it succeeded: the answer.
    pub async fn rotate(&self) -> serde_json::Value {
        let reply = self.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
        assert_eq!(reply.status, 200, "rotate: {:?}", reply.body);
        reply.json()
    }
}

/// Deadline helper for async polling.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Runs `server --config CONFIG` for a start that should be refused, and returns its
/// output once it exits. Bounded: a server that starts anyway is killed after `limit`, so
/// the caller's exit-code assertion fails instead of the test hanging.
pub fn run_until_exit(server: &Path, config: &Path, limit: Duration) -> std::process::Output {
    let mut child = Command::new(server)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().unwrap()
}

/// Path of a workspace binary (`sso-server`, `sso-agent`, `ssoctl`), freshly built.
///
/// The first call in a test process runs `cargo build --workspace --bins` into its own
/// target directory (`target/test-bins`). Building into the main one would fight the
/// outer `cargo test` over the binaries' files (their names carry no feature hash, and
/// dev-dependencies change feature unification), rebuilding them on every run.
pub fn bin(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let target = workspace.join("target").join("test-bins");
        let release = built_for_release(&std::env::current_exe().unwrap());
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--workspace", "--bins", "--quiet"])
            .current_dir(&workspace)
            .env("CARGO_TARGET_DIR", &target);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "could not build the workspace binaries");
        target.join(if release { "release" } else { "debug" })
    });
    dir.join(name)
}

/// Whether `exe` (this process's executable) is a release build: a test binary lives in
/// `target/release/deps/`, a binary of this crate run with `cargo run --release` (the
/// benchmarks: `sso-kms-bench`, `sso-failover`, `sso-watch-mem`) in `target/release/`.
/// The binaries `bin` builds follow the same profile, so a release benchmark measures
/// release servers and agents.
fn built_for_release(exe: &Path) -> bool {
    let Some(dir) = exe.parent() else { return false };
    let profile_dir = if dir.ends_with("deps") { dir.parent() } else { Some(dir) };
    profile_dir.is_some_and(|d| d.ends_with("release"))
}

/// A JSON answer read as its `sso_proto::wire` type (the agent's are in
/// `sso_proto::wire::agent`, errors are `ErrorBody`); panics naming the body when it is
/// not one.
pub fn wire<T: serde::de::DeserializeOwned>(body: &str) -> T {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not a {}: {e}: {body}", std::any::type_name::<T>()))
}

/// A running `sso-agent`.
#[derive(Debug)]
pub struct TestAgent {
    pub child: Child,
    pub socket: PathBuf,
    /// The KMS v2 socket, when the config has `[kms]`.
    pub kms_socket: Option<PathBuf>,
}

impl TestAgent {
    /// Starts `sso-agent --config CONFIG` and waits for its socket.
    pub fn start(config: &Path, log: &Path) -> Self {
        Self::start_with(&[std::ffi::OsStr::new("--config"), config.as_os_str()], log, &[])
    }

    /// [`TestAgent::start`] with extra environment variables (`RUST_LOG`).
    pub fn start_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with(&[std::ffi::OsStr::new("--config"), config.as_os_str()], log, env)
    }

    /// Starts `sso-agent --dev DIR` (beside `sso-server --dev DIR`) and waits for its socket.
    pub fn start_dev(dir: &Path, log: &Path) -> Self {
        Self::start_with(&[std::ffi::OsStr::new("--dev"), dir.as_os_str()], log, &[])
    }

    fn start_with(args: &[&std::ffi::OsStr], log: &Path, env: &[(&str, &str)]) -> Self {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = Command::new(bin("sso-agent"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut kms = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("sso-agent kms socket=") {
                    kms = Some(PathBuf::from(rest));
                }
                if let Some(rest) = line.strip_prefix("sso-agent listening socket=") {
                    let _ = tx.send((rest.to_owned(), kms.take()));
                }
            }
        });
        let (socket, kms_socket) = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            let _ = child.kill();
            // Only a regular file is read back: /dev/full as the log reads zeros forever.
            let text = if std::fs::metadata(log).is_ok_and(|m| m.is_file()) {
                std::fs::read_to_string(log).unwrap_or_default()
            } else {
                format!("(its stderr went to {})", log.display())
            };
            panic!("agent did not start: {text}")
        });
        Self {
            child,
            socket: PathBuf::from(socket),
            kms_socket,
        }
    }

    /// A gRPC client of the agent's KMS v2 socket (panics when it has none).
    pub async fn kms(&self) -> KmsClient {
        kms_client(self.kms_socket.as_deref().expect("the agent serves no KMS socket")).await
    }
}

/// A tonic client of `v2.KeyManagementService`.
pub type KmsClient =
    sso_agent::kms::v2::key_management_service_client::KeyManagementServiceClient<tonic::transport::Channel>;

/// Connects a tonic client to a KMS v2 Unix socket (one HTTP/2 connection, reused).
pub async fn kms_client(socket: &Path) -> KmsClient {
    let path = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://kms.invalid")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
    KmsClient::new(channel)
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Restarts a killed server on the same config (new ports unless the config fixes them).
pub fn restart(server: &mut TestServer, config: &Path) {
    server.kill();
    let log = server.log.clone();
    *server = TestServer::start(&bin("sso-server"), config, &log);
}

/// A port for a test server to listen on later, unique within this process. Taken from
/// 20000..32000, below Linux's ephemeral range (32768 and up), so no outgoing connection of
/// any process can be handed it meanwhile, and checked free by a plain bind, which also
/// refuses a port that a previous test's connections still hold in TIME_WAIT. Binding port
/// 0 and releasing it did neither: CI once saw a pair node's pinned metrics port taken
/// ("Address already in use") before the node bound it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    // Test binaries run one after another: start each at its own place in the range.
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (std::process::id().wrapping_mul(7919) ^ nanos) % SPAN
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % SPAN).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 on 127.0.0.1");
}

impl ServerSetup {
    /// Points the config at another store and key file (one made by `ssoctl init`, say).
    pub fn use_store(&self, store: &Path, key_file: &Path) {
        self.edit(|c| {
            c.store.path = store.to_path_buf();
            c.store.unseal = sso_server::config::UnsealSource::KeyFile(key_file.to_path_buf());
        });
    }

    /// Pins the listen and metrics ports, so a restarted server comes back where clients
    /// expect it. Returns the HTTPS port.
    pub fn pin_ports(&self) -> u16 {
        let (https, metrics) = (free_port(), free_port());
        self.edit(|c| {
            c.listen.set_port(https);
            c.metrics_listen.set_port(metrics);
        });
        https
    }
}

/// Runs `systemd-analyze verify` on unit files given as (file name, text), written into a
/// scratch directory, and panics with its complaints about them (the host's own unit files
/// may warn; only lines naming these units count). Not a quiet skip: without
/// systemd-analyze the caller's test fails and says how to get it (.ci/run installs it).
pub fn systemd_verify(units: &[(&str, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    for (name, text) in units {
        std::fs::write(dir.path().join(name), text).unwrap();
        cmd.arg(dir.path().join(name));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze could not run ({e}): apt-get install systemd"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| units.iter().any(|(name, _)| l.contains(name)))
        .collect();
    assert!(
        ours.is_empty() && out.status.success(),
        "systemd-analyze verify: {stderr}"
    );
}

#[cfg(test)]
mod profile_tests {
    use super::built_for_release;
    use std::path::Path;

    #[test]
    fn release_benchmarks_and_release_tests_use_release_binaries() {
        assert!(built_for_release(Path::new("/w/target/release/sso-kms-bench")));
        assert!(built_for_release(Path::new("/w/target/release/sso-failover")));
        assert!(built_for_release(Path::new("/w/target/release/deps/kms-0123abcd")));
        assert!(!built_for_release(Path::new("/w/target/debug/sso-kms-bench")));
        assert!(!built_for_release(Path::new("/w/target/debug/deps/kms-0123abcd")));
        // A crate or directory named "release" elsewhere in the path is not the profile.
        assert!(!built_for_release(Path::new("/release/target/debug/deps/kms-0123abcd")));
    }
}
