//! A failover pair on loopback, each node reaching the other through a [`Relay`] the test
//! can cut and heal.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sso_server::config::{Pattern, PeerConfig};

use crate::{Pki, ServerSetup, TestServer, bin};

/// A TCP relay to `target`. `cut` drops every open connection and every new one until
/// `heal`: a network partition between the nodes. `stall` holds every byte in both
/// directions and keeps the connections open: a hung link (or, seen from the client, a
/// hung node) until `unstall`. `hold_replies_after_request_of` holds only the target's
/// bytes once a request of a given size has passed: that request arrives and is acted on,
/// its answer (and every later one) waits until `release_replies`.
#[derive(Debug)]
pub struct Relay {
    pub port: u16,
    cut: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    replies_held: Arc<AtomicBool>,
    /// Size in bytes of the request read that sets `replies_held`; 0: none armed.
    hold_trigger: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let replies_held = Arc::new(AtomicBool::new(false));
        let hold_trigger = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, s, k, h) = (cut.clone(), stop.clone(), conns.clone(), stalled.clone());
        let (r, t) = (replies_held.clone(), hold_trigger.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(target) else {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                };
                {
                    let mut list = k.lock().unwrap();
                    list.retain(|s| s.peer_addr().is_ok());
                    list.push(inbound.try_clone().unwrap());
                    list.push(outbound.try_clone().unwrap());
                }
                // Requests are never held by `replies_held`; they may set it.
                let (never, no_trigger) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
                for (mut from, mut to, held, trigger) in [
                    (
                        inbound.try_clone().unwrap(),
                        outbound.try_clone().unwrap(),
                        never,
                        t.clone(),
                    ),
                    (outbound, inbound, r.clone(), no_trigger),
                ] {
                    let (h, s, r) = (h.clone(), s.clone(), r.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        let mut records = TlsRecords::default();
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    let min = trigger.load(Ordering::SeqCst);
                                    let mut big = false;
                                    records.feed(&buf[..n], |len| big |= min > 0 && len >= min);
                                    if big && trigger.swap(0, Ordering::SeqCst) > 0 {
                                        r.store(true, Ordering::SeqCst);
                                    }
                                    // Stalled: hold the bytes (bounded by the relay's life).
                                    while (h.load(Ordering::SeqCst) || held.load(Ordering::SeqCst))
                                        && !s.load(Ordering::SeqCst)
                                    {
                                        std::thread::sleep(std::time::Duration::from_millis(5));
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self {
            port,
            cut,
            stalled,
            replies_held,
            hold_trigger,
            conns,
            stop,
        }
    }

    /// Hang: hold every byte from now on, in both directions, keeping connections open.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Pass the held bytes on and relay again.
    pub fn unstall(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// Once a request TLS record (application data) of at least `min_bytes` has passed (on
    /// any connection), hold the target's answers until `release_replies`. Lets a test stop
    /// a peer protocol between two steps without decrypting what it relays: the record
    /// size tells the steps apart. Records, not reads: under load TCP coalesces small
    /// records into one read (a lease and a pull made one 255-byte read), records it never
    /// merges.
    pub fn hold_replies_after_request_of(&self, min_bytes: usize) {
        assert!(min_bytes > 0);
        self.hold_trigger.store(min_bytes, Ordering::SeqCst);
    }

    /// Pass the held answers on.
    pub fn release_replies(&self) {
        self.hold_trigger.store(0, Ordering::SeqCst);
        self.replies_held.store(false, Ordering::SeqCst);
    }

    /// Partition: close every connection through the relay and refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Heal the partition.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Splits a TLS byte stream into records: each starts with a plaintext 5-byte header
/// (content type, version, length), so their sizes can be read without decrypting.
#[derive(Default)]
struct TlsRecords {
    header: Vec<u8>,
    /// Bytes of the current record's body not yet seen.
    left: usize,
}

impl TlsRecords {
    /// Feeds the next bytes of the stream; calls `on_record` with the whole size (header
    /// included) of each application-data record whose header completes in them.
    fn feed(&mut self, mut bytes: &[u8], mut on_record: impl FnMut(usize)) {
        const APPLICATION_DATA: u8 = 23;
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                self.left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                if self.header[0] == APPLICATION_DATA {
                    on_record(self.left + 5);
                }
                self.header.clear();
            }
        }
    }
}

/// One node of a pair: its files, its pinned port, and the process when running.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub setup: ServerSetup,
    pub port: u16,
    pub log: PathBuf,
    pub server: Option<TestServer>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn start(&mut self) {
        self.server = Some(TestServer::start(&bin("sso-server"), &self.setup.config, &self.log));
    }

    /// Sets the node's periodic anti-entropy interval (it applies from its next start).
    /// Tests that must know where a node learned something slow it to 30-60 s, so no
    /// periodic round can run in between.
    pub fn set_sync_interval_ms(&self, ms: u64) {
        self.setup.edit(|c| {
            c.peer
                .as_mut()
                .expect("a pair node's config has a peer")
                .sync_interval_ms = ms;
        });
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    pub fn server(&self) -> &TestServer {
        self.server.as_ref().expect("node is not running")
    }

    /// Replaces the store with a new, empty one (new unseal key): a node whose disk died.
    pub fn wipe(&mut self) {
        self.kill();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.setup.store.display()));
        }
        std::fs::remove_file(&self.setup.unseal_key).unwrap();
        let key = keystore::UnsealKey::generate_key_file(&self.setup.unseal_key).unwrap();
        keystore::SealedStore::create(&self.setup.store, &key, &keystore::CreateOptions::new(&self.name)).unwrap();
    }
}

/// Two nodes, each configured with the other as peer through a relay.
#[derive(Debug)]
pub struct Pair {
    pub pki: Pki,
    pub a: Node,
    pub b: Node,
    /// A → B.
    pub relay_ab: Relay,
    /// B → A.
    pub relay_ba: Relay,
}

impl Pair {
    /// Sets up (does not start) a pair in `dir`. Only node A starts with a key; B gets
    /// it by replication.
    pub fn new(dir: &Path) -> Self {
        let pki = Pki::new(&dir.join("pki"));
        let mut nodes = Vec::new();
        for name in ["node-a", "node-b"] {
            let setup = ServerSetup::standard(&dir.join(name), &pki, name);
            let port = setup.pin_ports();
            nodes.push((name, setup, port));
        }
        let relay_ab = Relay::start(SocketAddr::from(([127, 0, 0, 1], nodes[1].2)));
        let relay_ba = Relay::start(SocketAddr::from(([127, 0, 0, 1], nodes[0].2)));
        let mut built = Vec::new();
        for (i, (name, setup, port)) in nodes.into_iter().enumerate() {
            let (other, relay) = if i == 0 {
                ("node-b", &relay_ab)
            } else {
                ("node-a", &relay_ba)
            };
            setup.edit(|c| {
                let identity = Pattern::Cn(format!("{other}-server"));
                c.roles.peer = vec![identity.clone()];
                let mut peer = PeerConfig::new(format!("https://localhost:{}", relay.port), identity);
                peer.sync_interval_ms = 200;
                peer.timeout_ms = 1000;
                c.peer = Some(peer);
            });
            let log = setup.dir.join("server.log");
            built.push(Node {
                name: name.to_owned(),
                setup,
                port,
                log,
                server: None,
            });
        }
        let b = built.pop().unwrap();
        let mut a = built.pop().unwrap();
        // B starts empty: it must get everything from A.
        let mut b = b;
        b.wipe();
        a.server = None;
        Self {
            pki,
            a,
            b,
            relay_ab,
            relay_ba,
        }
    }
}

/// What a node reports: every key's (id, state), and the primary.
pub type View = (std::collections::BTreeSet<(String, String)>, Option<String>);

impl Pair {
    /// An mTLS client with the admin certificate, to `node`.
    pub fn admin(&self, node: &Node) -> crate::Client {
        crate::Client::new(node.server().https, &self.pki.ca_file, Some(&self.pki.client("admin")))
    }

    /// The node's keys and primary from its admin status; `None` when it does not answer.
    pub async fn view(&self, node: &Node) -> Option<View> {
        let v = self.admin(node).get("/v1/admin/status").await.ok()?.json();
        let keys = v["keys"]
            .as_array()?
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().unwrap_or("").to_owned(),
                    k["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        Some((keys, v["primary"].as_str().map(str::to_owned)))
    }
}

#[cfg(test)]
mod record_tests {
    use super::TlsRecords;

    fn record(kind: u8, body: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&u16::try_from(body).unwrap().to_be_bytes());
        r.extend(std::iter::repeat_n(0xAB, body));
        r
    }

    #[test]
    fn records_are_sized_whatever_the_reads() {
        // A handshake record (not counted), then application data of 52, 105 and 264
        // bytes in all, the last two coalesced into one read and the stream cut mid-header.
        let stream: Vec<u8> = [record(22, 232), record(23, 47), record(23, 100), record(23, 259)].concat();
        for cut in [1, 3, 7, 240, 300, stream.len() - 2] {
            let mut records = TlsRecords::default();
            let mut seen = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                records.feed(part, |len| seen.push(len));
            }
            assert_eq!(seen, [52, 105, 264], "cut at {cut}");
        }
    }
}
