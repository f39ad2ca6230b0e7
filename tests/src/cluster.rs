//! Three sso-server nodes on one PostgreSQL database (issue 14), for the fault tests: each
//! node's ports are pinned, so a node SIGKILLed and started again comes back at the URL
//! its clients hold.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keystore::postgres::PgStore;
use keystore::{CreateOptions, UnsealKey};

use crate::{Client, Pki, ServerSetup, TestServer, bin};

/// One node: its setup (config with pinned ports), its process when running, its log.
#[derive(Debug)]
pub struct PgNode {
    /// `node-1`, `node-2`, ...
    pub name: String,
    /// Declared before the setup: the process stops before anything else goes.
    pub server: Option<TestServer>,
    pub setup: ServerSetup,
    /// The pinned HTTPS port.
    pub port: u16,
    pub log: PathBuf,
}

impl PgNode {
    /// `https://localhost:PORT`, for sso-client.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The running process (panics when the node is down).
    pub fn server(&self) -> &TestServer {
        self.server
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    /// Starts the node on its config (no-op when running).
    pub fn start(&mut self) {
        if self.server.is_none() {
            self.server = Some(TestServer::start(&bin("sso-server"), &self.setup.config, &self.log));
        }
    }

    /// SIGKILLs the node and reaps it; returns its pid (gone once this returns).
    pub fn kill(&mut self) -> Option<u32> {
        let mut server = self.server.take()?;
        let pid = server.pid();
        server.kill();
        Some(pid)
    }
}

/// Nodes sharing one database made by `PgStore::init`, with the key file they all unseal
/// with, and one PKI (`admin` and `client` certificates).
#[derive(Debug)]
pub struct PgNodes {
    /// Declared first: the servers stop before the directory goes.
    pub nodes: Vec<PgNode>,
    pub pki: Pki,
    /// The database's URL.
    pub url: String,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl PgNodes {
    /// Initialises the empty database at `url` (as `node-1`) and starts `pauses.len()`
    /// nodes on it with those staging pauses (ms). The URL comes from the caller's
    /// throwaway PostgreSQL (`pg_throwaway`, a dev-dependency: no binary of this crate
    /// links it).
    pub async fn start(url: String, pauses: &[u64]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let key_file = root.join("unseal.key");
        let (u, k) = (url.clone(), key_file.clone());
        tokio::task::spawn_blocking(move || {
            let key = UnsealKey::generate_key_file(&k).unwrap();
            PgStore::init(&u, &key, &CreateOptions::new("node-1")).unwrap();
        })
        .await
        .unwrap();
        let pki = Pki::new(&root.join("pki"));
        let mut nodes = Vec::new();
        for (i, pause) in pauses.iter().enumerate() {
            let name = format!("node-{}", i + 1);
            let setup = ServerSetup::standard(&root.join(&name), &pki, &name);
            setup.use_store(Path::new(&url), &key_file);
            let pause = *pause;
            setup.edit(|c| c.rotation.staging_pause_ms = pause);
            let port = setup.pin_ports();
            let mut node = PgNode {
                log: root.join(format!("{name}.log")),
                name,
                server: None,
                setup,
                port,
            };
            node.start();
            nodes.push(node);
        }
        Self {
            nodes,
            pki,
            url,
            root,
            _dir: dir,
        }
    }

    /// A one-shot HTTPS client of node `i` presenting the certificate with CN `cn`.
    pub fn client_as(&self, i: usize, cn: &str) -> Client {
        Client::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.nodes[i].port)),
            &self.pki.ca_file,
            Some(&self.pki.client(cn)),
        )
    }

    /// [`Self::client_as`] with the admin certificate.
    pub fn admin(&self, i: usize) -> Client {
        self.client_as(i, "admin")
    }

    /// [`Self::client_as`] with the client certificate.
    pub fn client(&self, i: usize) -> Client {
        self.client_as(i, "client")
    }

    /// Node `i`'s keyring as a client sees it, or `None` when it does not answer 200.
    pub async fn keyring(&self, i: usize) -> Option<serde_json::Value> {
        let reply = self.client(i).get("/v1/keyring").await.ok()?;
        (reply.status == 200).then(|| reply.json())
    }

    /// Polls every running node's keyring until its primary is `key_id`, for at most
    /// `limit`; `Err` names the first node that did not get there, with its keyring.
    pub async fn primary_everywhere(&self, key_id: &str, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.server.is_none() {
                continue;
            }
            loop {
                let ring = self.keyring(i).await;
                if ring.as_ref().is_some_and(|r| r["primary"] == key_id) {
                    break;
                }
                if started.elapsed() > limit {
                    return Err(format!(
                        "{}'s primary is not {key_id} {:?} after the acknowledgment: {ring:?}",
                        node.name,
                        started.elapsed()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(started.elapsed())
    }
}

/// Whether anything accepts a TCP connection on 127.0.0.1:`port` (a stopped PostgreSQL
/// must refuse).
pub fn accepts_connections(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .is_ok()
}

/// Whether a process with `pid` exists (`kill -0`); a reaped SIGKILLed node must not.
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
