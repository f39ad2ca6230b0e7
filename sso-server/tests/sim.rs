//! A deterministic simulation of the pair (issue 12 §8; docs/pair.md "Simulation").
//!
//! Two nodes and an operator run as `turmoil` hosts on one thread, over turmoil's simulated
//! TCP and clock, driven by one seed. What is real and what is simulated:
//!
//! - **Real**: rotation (`sso_server::rotation::{rotate, grant, accept_stage,
//!   accept_promote}`: leases, generation choice, stage → promote, the answers), the
//!   anti-entropy round (`sso_server::replication::anti_entropy_round`) and its server side
//!   (`replication::keys_answer`), the key wire encoding (`sso_proto::wire::records_json`/`parse_records`),
//!   and the store: each node is a real `keystore::SealedStore` (SQLite, WAL) in a
//!   temporary directory, dropped when the node crashes and reopened from disk on restart.
//! - **Simulated**: the network (turmoil TCP with per-seed latency, a lossy link that
//!   breaks connections, partitions, held-then-released messages; duplicated requests are
//!   injected by this harness: a second copy of a peer request sent later on another
//!   connection), the clock (turmoil's, so lease lapses and timeouts are exercised without
//!   waiting), and the HTTP/mTLS layer: a small length-prefixed framing replaces hyper and
//!   rustls, and the handlers call the same domain functions `api.rs` calls. A crash drops
//!   the node between two store calls (each store call runs to completion on the
//!   simulation thread); torn writes inside SQLite are the chaos test's business
//!   (`tests/tests/chaos.rs`, real processes killed with SIGKILL).
//!
//! After every simulation step the checker asserts: no two keys share a generation (except
//! two keys of which one was created without the peer's lease, i.e. degraded: docs/pair.md
//! G); every `replicated` answer names a key that is primary, or below a newer primary, on
//! both nodes from then on (R); states only move forward and no key a node held vanishes
//! from it, across crashes (F, L); one key id never carries two materials. After the chaos
//! phase everything is healed and restarted, the operator stops, and both nodes must hold
//! identical key sets and the same primary within a bounded time (C).
//!
//! `cargo test -p sso-server --test sim` runs a few seeds; `SSO_SIM_SEEDS=N` runs N,
//! `SSO_SIM_SEED=S` replays one (a failure prints its seed). `SSO_SIM_MUTANT=…` injects a
//! bug (see [`Mutant`]); `the_simulation_catches_injected_bugs` shows each is caught.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystore::{CreateOptions, SealedStore, Store, UnsealKey};
use secrecy::SecretBox;
use sso_proto::{KeyId, KeyMeta, KeyState, MasterSecret};
use sso_server::peer::{self, PeerError, PeerKeys};
use sso_server::replication::{self, KeySource};
use sso_server::rotation::{self, LinkError, LocalNode, PeerLink, Replication, RotateError, Rotations};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpListener, TcpStream};
use zeroize::Zeroizing;

const PORT: u16 = 7100;
const NAMES: [&str; 2] = ["a", "b"];
/// Simulated time per step.
const TICK: Duration = Duration::from_millis(10);
/// Peer request timeout (the server's `peer.timeout_ms`).
const PEER_TIMEOUT: Duration = Duration::from_millis(1000);
/// Anti-entropy period (`peer.sync_interval_ms`).
const SYNC_INTERVAL: Duration = Duration::from_millis(500);
/// Pause between stage and promote (`distribute_wait`).
const DISTRIBUTE_WAIT: Duration = Duration::from_millis(250);
/// How long the operator rotates while faults are injected.
const CHAOS: Duration = Duration::from_secs(40);
/// After the heal, the operator's last answer and the restart of every node, both nodes
/// must hold the same key set within this much simulated time: two sync intervals plus a
/// peer timeout (a pull in flight on a connection broken before the heal), and slack.
const CONVERGE_WITHIN: Duration = Duration::from_secs(3);

/// A bug injected on purpose, to show the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutant {
    /// The peer's promote handler acknowledges the promotion (answers the new key as its
    /// primary) without writing it: an acknowledgement before a durable write.
    AckBeforeWrite,
    /// The peer side of rotation trusts the coordinator: the lease handler answers without
    /// taking the lease, the stage handler merges without the lease and generation checks.
    PeerUnguarded,
    /// Anti-entropy never runs.
    NoAntiEntropy,
}

impl Mutant {
    fn from_env() -> Option<Self> {
        match std::env::var("SSO_SIM_MUTANT").ok()?.as_str() {
            "ack-before-write" => Some(Self::AckBeforeWrite),
            "peer-unguarded" => Some(Self::PeerUnguarded),
            "no-anti-entropy" => Some(Self::NoAntiEntropy),
            other => panic!("SSO_SIM_MUTANT={other}: expected ack-before-write, peer-unguarded or no-anti-entropy"),
        }
    }
}

/// SplitMix64: small, seedable, the same on every platform.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        let mut r = Self(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// The hardships of one seed, drawn from it.
#[derive(Debug, Clone)]
struct Params {
    /// Probability that a rotation request allows a degraded rotation (0 for some seeds:
    /// then invariant G holds without exception).
    degraded: f64,
    /// Probability that a peer request is sent twice (the copy later).
    duplicate: f64,
    /// Probability per message on the a–b link that its connection breaks.
    fail_rate: f64,
    /// Maximum one-way latency.
    latency_ms: u64,
    /// Per-step probabilities of a crash, a partition toggle, a hold.
    crash: f64,
    partition: f64,
    hold: f64,
    /// Probability that a rotation request comes as a burst of concurrent requests.
    burst: f64,
    /// Probability that a store call stalls (a slow disk, a starved blocking pool) for up
    /// to 8 s first: long enough for a rotation lease (6.25 s) to lapse mid-rotation.
    stall: f64,
}

impl Params {
    fn draw(seed: u64) -> Self {
        let mut r = Rng::new(seed, 1);
        Self {
            degraded: [0.0, 0.3, 0.7][r.below(3) as usize],
            duplicate: [0.0, 0.1, 0.3][r.below(3) as usize],
            fail_rate: [0.0, 0.005, 0.02][r.below(3) as usize],
            latency_ms: 1 + r.below(60),
            crash: [0.001, 0.003][r.below(2) as usize],
            partition: [0.002, 0.006][r.below(2) as usize],
            hold: [0.0, 0.003][r.below(2) as usize],
            burst: [0.2, 0.5][r.below(2) as usize],
            stall: [0.0, 0.005, 0.02][r.below(3) as usize],
        }
    }
}

/// A node's store contents as last written (= what is on its disk: every store call is a
/// committed transaction).
#[derive(Default)]
struct View {
    metas: BTreeMap<KeyId, KeyMeta>,
    secrets: BTreeMap<KeyId, MasterSecret>,
    primary: Option<(u64, KeyId)>,
}

struct NodeShared {
    name: &'static str,
    dir: PathBuf,
    view: Mutex<View>,
    boots: AtomicU64,
}

/// How a key came to be.
#[derive(Debug, Clone, Copy)]
struct Created {
    node: usize,
    /// The creating rotation held the peer's lease (false: degraded, or standalone).
    with_peer_lease: bool,
}

#[derive(Debug, Clone)]
struct Ack {
    key: KeyId,
    generation: u64,
    replication: Replication,
    node: usize,
    step: u64,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    replicated: u64,
    degraded: u64,
    busy: u64,
    superseded: u64,
    /// Superseded because a later rotation retired the key as an orphan.
    superseded_orphan: u64,
    unavailable: u64,
    refused: u64,
    store_errors: u64,
    unanswered: u64,
    timed_out: u64,
    duplicates: u64,
    stalls: u64,
    /// Peer refusals seen by coordinators: busy lease, lapsed lease, stale generation.
    peer_busy: u64,
    peer_lease_lost: u64,
    peer_stale: u64,
    crashes: u64,
    partitions: u64,
    holds: u64,
    concurrent: u64,
    sync_rounds_merged: u64,
    /// What `rotation::rotate` counted on the nodes (`LocalNode::count`): one replication
    /// failure per degraded, unavailable or refused answer, checked in `record_answer`.
    counted_replication_failures: u64,
    counted_integrity_alarms: u64,
}

#[derive(Default)]
struct Log {
    created: HashMap<KeyId, Created>,
    acks: Vec<Ack>,
    counts: Counts,
    /// Events in order, to compare two runs of one seed.
    trace: Vec<String>,
    /// Something the harness itself saw go wrong (checked after every step).
    problems: Vec<String>,
    in_flight: usize,
}

struct World {
    seed: u64,
    params: Params,
    mutant: Option<Mutant>,
    nodes: [NodeShared; 2],
    log: Mutex<Log>,
    /// Bumped on every change the checker must look at.
    version: AtomicU64,
    step: AtomicU64,
}

impl World {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
    }
}

fn unseal_key(idx: usize) -> UnsealKey {
    UnsealKey::KeyFile(SecretBox::new(Box::new([0x5A ^ idx as u8; 32])))
}

/// One boot of one node: its open store, its (in-memory) rotation lease, its randomness.
struct Node {
    idx: usize,
    world: Arc<World>,
    store: Mutex<SealedStore>,
    rotations: Rotations,
    rng: Mutex<Rng>,
    /// Whether this node's last lease request to its peer succeeded.
    lease_ok: AtomicBool,
}

impl Node {
    fn boot(world: Arc<World>, idx: usize) -> Result<Self, keystore::Error> {
        let shared = &world.nodes[idx];
        let boot = shared.boots.fetch_add(1, Ordering::SeqCst);
        let path = shared.dir.join("store.db");
        let store = if path.exists() {
            SealedStore::open(&path, &unseal_key(idx))?
        } else {
            SealedStore::create(&path, &unseal_key(idx), &CreateOptions::new(shared.name))?
        };
        let node = Self {
            idx,
            rng: Mutex::new(Rng::new(world.seed, 100 + idx as u64 * 1000 + boot)),
            world,
            store: Mutex::new(store),
            rotations: Rotations::new(PEER_TIMEOUT, DISTRIBUTE_WAIT),
            lease_ok: AtomicBool::new(false),
        };
        node.publish(&node.store.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(node)
    }

    fn shared(&self) -> &NodeShared {
        &self.world.nodes[self.idx]
    }

    fn chance(&self, p: f64) -> bool {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).chance(p)
    }

    fn below(&self, n: u64) -> u64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).below(n)
    }

    /// Publishes the store's contents for the checker, and notes the keys this call created.
    fn publish(&self, store: &SealedStore) {
        let read = || -> keystore::Result<View> {
            let metas = store.list()?.into_iter().map(|m| (m.key_id, m)).collect();
            let secrets = store
                .export()?
                .into_iter()
                .filter_map(|r| Some((r.meta.key_id, r.secret?)))
                .collect();
            let primary = store.primary()?.map(|m| (m.generation, m.key_id));
            Ok(View {
                metas,
                secrets,
                primary,
            })
        };
        let view = match read() {
            Ok(v) => v,
            Err(e) => {
                self.world
                    .log()
                    .problems
                    .push(format!("node {} unreadable: {e}", self.shared().name));
                self.world.bump();
                return;
            }
        };
        {
            let mut log = self.world.log();
            for meta in view.metas.values() {
                if log.created.contains_key(&meta.key_id) {
                    continue;
                }
                if meta.origin != self.shared().name {
                    log.problems.push(format!(
                        "key {} of origin {} appeared on {} before its creator stored it",
                        meta.key_id,
                        meta.origin,
                        self.shared().name
                    ));
                }
                let created = Created {
                    node: self.idx,
                    with_peer_lease: self.lease_ok.load(Ordering::SeqCst),
                };
                log.created.insert(meta.key_id, created);
            }
        }
        *self.shared().view.lock().unwrap_or_else(|p| p.into_inner()) = view;
        self.world.bump();
    }
}

impl LocalNode for Node {
    fn node(&self) -> &str {
        self.shared().name
    }

    fn rotations(&self) -> &Rotations {
        &self.rotations
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> keystore::Result<T> + Send + 'static,
    ) -> keystore::Result<T> {
        // Stalls are a hardship of the chaos phase; after the heal the disk is well again,
        // so a stall still in progress then ends there (else one drawn just before the
        // heal outlasts the convergence bound: seed 10130).
        let step = self.world.step.load(Ordering::SeqCst);
        if step < chaos_steps() && self.chance(self.world.params.stall) {
            self.world.log().counts.stalls += 1;
            let until_heal = TICK * u32::try_from(chaos_steps() - step).unwrap_or(u32::MAX);
            let stall = Duration::from_millis(500 + self.below(7500));
            tokio::time::sleep(stall.min(until_heal)).await;
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut *store);
        self.publish(&store);
        out
    }

    fn distribute_wait(&self) -> Duration {
        DISTRIBUTE_WAIT
    }

    fn count(&self, counted: rotation::Counted) {
        let mut log = self.world.log();
        log.counts.counted_replication_failures += u64::from(counted.replication_failure);
        log.counts.counted_integrity_alarms += u64::from(counted.integrity_alarm);
    }

    fn token(&self) -> u128 {
        let mut r = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        (u128::from(r.next()) << 64) | u128::from(r.next())
    }
}

// ---------------------------------------------------------------------------------------
// Framing: [u32 length][JSON head][u32 length][body], each way. Stands in for HTTP.

async fn write_frame(s: &mut TcpStream, head: &serde_json::Value, body: &[u8]) -> std::io::Result<()> {
    let head = head.to_string();
    let mut out = Zeroizing::new(Vec::with_capacity(8 + head.len() + body.len()));
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    s.write_all(&out).await?;
    s.flush().await
}

async fn read_part(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let len = s.read_u32().await? as usize;
    if len > 16 << 20 {
        return Err(std::io::Error::other("frame too long"));
    }
    let mut buf = Zeroizing::new(vec![0u8; len]);
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<(serde_json::Value, Zeroizing<Vec<u8>>)> {
    let head = read_part(s).await?;
    let body = read_part(s).await?;
    let head = serde_json::from_slice(&head).map_err(std::io::Error::other)?;
    Ok((head, body))
}

fn link_error(head: &serde_json::Value) -> LinkError {
    let msg = head["msg"].as_str().unwrap_or("").to_owned();
    match head["err"].as_str().unwrap_or("") {
        "busy" => LinkError::Busy,
        "lease_lost" => LinkError::LeaseLost,
        "stale" => LinkError::Stale(head["max"].as_u64().unwrap_or(0)),
        "conflict" => LinkError::Conflict(msg),
        "unreachable" => LinkError::Unreachable(msg),
        _ => LinkError::Protocol(msg),
    }
}

fn error_head(e: &LinkError) -> serde_json::Value {
    let (err, max) = match e {
        LinkError::Busy => ("busy", 0),
        LinkError::LeaseLost => ("lease_lost", 0),
        LinkError::Stale(m) => ("stale", *m),
        LinkError::Conflict(_) => ("conflict", 0),
        LinkError::Unreachable(_) => ("unreachable", 0),
        LinkError::Protocol(_) => ("protocol", 0),
    };
    serde_json::json!({"ok": false, "err": err, "max": max, "msg": e.to_string()})
}

// ---------------------------------------------------------------------------------------
// The peer link: PeerLink (rotation) and KeySource (anti-entropy) over simulated TCP.

struct Link {
    node: Arc<Node>,
}

impl Link {
    fn peer(&self) -> &'static str {
        NAMES[1 - self.node.idx]
    }

    async fn exchange(
        peer: &'static str,
        frame: (serde_json::Value, Zeroizing<Vec<u8>>),
    ) -> Result<(serde_json::Value, Zeroizing<Vec<u8>>), LinkError> {
        let unreachable = |e: std::io::Error| LinkError::Unreachable(e.to_string());
        let talk = async {
            let mut s = TcpStream::connect((peer, PORT)).await.map_err(unreachable)?;
            write_frame(&mut s, &frame.0, &frame.1).await.map_err(unreachable)?;
            read_frame(&mut s).await.map_err(unreachable)
        };
        tokio::time::timeout(PEER_TIMEOUT, talk)
            .await
            .map_err(|_| LinkError::Unreachable("timed out".into()))?
    }

    /// Sends a request; sometimes also a second copy, later, on another connection (its
    /// answer ignored): a duplicated, reordered message.
    async fn call(
        &self,
        head: serde_json::Value,
        body: Zeroizing<Vec<u8>>,
    ) -> Result<(serde_json::Value, Zeroizing<Vec<u8>>), LinkError> {
        let world = &self.node.world;
        if self.node.chance(world.params.duplicate) {
            world.log().counts.duplicates += 1;
            let delay = Duration::from_millis(self.node.below(2000));
            let copy = (head.clone(), Zeroizing::new(body.to_vec()));
            let peer = self.peer();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(delay).await;
                let _ = Self::exchange(peer, copy).await;
            });
        }
        let (head, body) = Self::exchange(self.peer(), (head, body)).await?;
        if head["ok"].as_bool() == Some(true) {
            return Ok((head, body));
        }
        let e = link_error(&head);
        match e {
            LinkError::Busy => world.log().counts.peer_busy += 1,
            LinkError::LeaseLost => world.log().counts.peer_lease_lost += 1,
            LinkError::Stale(_) => world.log().counts.peer_stale += 1,
            _ => {}
        }
        Err(e)
    }
}

impl PeerLink for Link {
    async fn lease(&self, node: &str, token: u128, ttl: Duration) -> Result<u64, LinkError> {
        self.node.lease_ok.store(false, Ordering::SeqCst);
        let head = serde_json::json!({"op": "lease", "node": node, "token": format!("{token:032x}"), "ttl_ms": ttl.as_millis() as u64});
        let (head, _) = self.call(head, Zeroizing::new(Vec::new())).await?;
        let max = head["max"]
            .as_u64()
            .ok_or_else(|| LinkError::Protocol("lease answer without max".into()))?;
        self.node.lease_ok.store(true, Ordering::SeqCst);
        Ok(max)
    }

    async fn stage(&self, node: &str, token: u128, record: &keystore::KeyRecord) -> Result<(), LinkError> {
        let body = sso_proto::wire::records_json(node, 0, "", std::slice::from_ref(record));
        let head = serde_json::json!({"op": "stage", "token": format!("{token:032x}")});
        self.call(head, body).await.map(|_| ())
    }

    async fn promote(
        &self,
        node: &str,
        token: u128,
        records: &[keystore::KeyRecord],
    ) -> Result<rotation::Promoted, LinkError> {
        let body = sso_proto::wire::records_json(node, 0, "", records);
        let head = serde_json::json!({"op": "promote", "token": format!("{token:032x}")});
        let (head, _) = self.call(head, body).await?;
        peer::promoted_answer(head.to_string().as_bytes()).map_err(LinkError::Protocol)
    }
}

impl KeySource for Link {
    async fn pull_keys(&self, local_digest: &str) -> Result<Option<PeerKeys>, PeerError> {
        let head = serde_json::json!({"op": "keys", "digest": local_digest});
        let (head, body) = self
            .call(head, Zeroizing::new(Vec::new()))
            .await
            .map_err(|e| PeerError::Unreachable(e.to_string()))?;
        if head["same"].as_bool() == Some(true) {
            return Ok(None);
        }
        sso_proto::wire::parse_records(&body)
            .map(Some)
            .map_err(PeerError::Protocol)
    }
}

// ---------------------------------------------------------------------------------------
// The node's server: the peer endpoints and the operator's rotate, calling what api.rs calls.

fn parse_token(head: &serde_json::Value) -> Result<u128, LinkError> {
    u128::from_str_radix(head["token"].as_str().unwrap_or(""), 16).map_err(|_| LinkError::Protocol("bad token".into()))
}

async fn handle(node: Arc<Node>, link: Arc<Link>, mut s: TcpStream) -> std::io::Result<()> {
    let (head, body) = read_frame(&mut s).await?;
    let ok = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"ok": true});
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        v
    };
    let mutant = node.world.mutant;
    let (answer, out_body): (serde_json::Value, Zeroizing<Vec<u8>>) = match head["op"].as_str().unwrap_or("") {
        "lease" => {
            let res = match parse_token(&head) {
                Ok(_) if mutant == Some(Mutant::PeerUnguarded) => node
                    .with_store(|s| s.max_generation())
                    .await
                    .map_err(|e| LinkError::Protocol(e.to_string())),
                Ok(token) => {
                    let ttl = Duration::from_millis(head["ttl_ms"].as_u64().unwrap_or(0).min(120_000));
                    rotation::grant(&*node, token, ttl).await
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(max) => (ok(serde_json::json!({"max": max})), Zeroizing::new(Vec::new())),
                Err(e) => (error_head(&e), Zeroizing::new(Vec::new())),
            }
        }
        op @ ("stage" | "promote") => {
            let res = async {
                let token = parse_token(&head)?;
                let incoming = sso_proto::wire::parse_records(&body).map_err(LinkError::Protocol)?;
                if op == "stage" {
                    let mut records = incoming.records;
                    let (Some(record), true) = (records.pop(), records.is_empty()) else {
                        return Err(LinkError::Protocol("a stage carries exactly one key".into()));
                    };
                    if mutant == Some(Mutant::PeerUnguarded) {
                        node.with_store(move |s| s.merge(std::slice::from_ref(&record)))
                            .await
                            .map_err(|e| LinkError::Protocol(e.to_string()))?;
                        return Ok(serde_json::json!({}));
                    }
                    rotation::accept_stage(&*node, token, record).await?;
                    Ok(serde_json::json!({}))
                } else if mutant == Some(Mutant::AckBeforeWrite) {
                    let first = incoming.records.first().map(|r| r.meta.key_id.to_string());
                    node.rotations.lease.release(token);
                    Ok(serde_json::json!({"primary": first}))
                } else {
                    let promoted = rotation::accept_promote(&*node, token, incoming.records).await?;
                    // The server's own answer type, read back by `peer::promoted_answer`.
                    serde_json::to_value(sso_proto::wire::PromoteAnswer::from(&promoted))
                        .map_err(|e| LinkError::Protocol(e.to_string()))
                }
            }
            .await;
            match res {
                Ok(extra) => (ok(extra), Zeroizing::new(Vec::new())),
                Err(e) => (error_head(&e), Zeroizing::new(Vec::new())),
            }
        }
        "keys" => {
            let theirs = head["digest"].as_str().unwrap_or("").to_owned();
            let name = node.shared().name;
            match node
                .with_store(move |s| replication::keys_answer(s, name, &theirs))
                .await
            {
                Ok(None) => (ok(serde_json::json!({"same": true})), Zeroizing::new(Vec::new())),
                Ok(Some(body)) => (ok(serde_json::json!({"same": false})), body),
                Err(e) => (
                    error_head(&LinkError::Protocol(e.to_string())),
                    Zeroizing::new(Vec::new()),
                ),
            }
        }
        "rotate" => {
            let allow_degraded = head["allow_degraded"].as_bool().unwrap_or(false);
            let outcome = rotation::rotate(&*node, Some(&*link), allow_degraded).await;
            let answer = record_answer(&node, &outcome);
            (answer, Zeroizing::new(Vec::new()))
        }
        other => (
            error_head(&LinkError::Protocol(format!("unknown op {other}"))),
            Zeroizing::new(Vec::new()),
        ),
    };
    write_frame(&mut s, &answer, &out_body).await
}

/// Records a rotation's answer the moment it is decided (before it is sent: a crash after
/// this point loses the answer, not the obligation).
fn record_answer(node: &Node, outcome: &Result<rotation::Rotated, RotateError>) -> serde_json::Value {
    let world = &node.world;
    let step = world.step.load(Ordering::SeqCst);
    let mut log = world.log();
    let name = node.shared().name;
    let answer = match outcome {
        Ok(done) => {
            match done.replication {
                Replication::Replicated => log.counts.replicated += 1,
                Replication::Degraded => log.counts.degraded += 1,
                Replication::Standalone => log.problems.push("a paired node rotated standalone".into()),
            }
            log.acks.push(Ack {
                key: done.meta.key_id,
                generation: done.meta.generation,
                replication: done.replication,
                node: node.idx,
                step,
            });
            let line = format!("{name} {} g{}", done.replication.as_str(), done.meta.generation);
            log.trace.push(line);
            serde_json::json!({"ok": true, "replication": done.replication.as_str(), "generation": done.meta.generation})
        }
        Err(e) => {
            let kind = match e {
                RotateError::Busy(_) => {
                    log.counts.busy += 1;
                    "busy"
                }
                RotateError::Superseded { where_, .. } => {
                    log.counts.superseded += 1;
                    if where_.contains("retired it as an orphan") {
                        log.counts.superseded_orphan += 1;
                    }
                    "superseded"
                }
                RotateError::PeerUnavailable { .. } => {
                    log.counts.unavailable += 1;
                    "unavailable"
                }
                RotateError::Refused { .. } => {
                    log.counts.refused += 1;
                    "refused"
                }
                RotateError::Overtaken { .. } => {
                    // Only a store shared by several nodes refuses so; a pair never does.
                    log.problems
                        .push(format!("a rotation on {name} of a pair was overtaken: {e}"));
                    "overtaken"
                }
                RotateError::Store(e) => {
                    log.counts.store_errors += 1;
                    log.problems
                        .push(format!("a rotation on {name} answered a store error: {e}"));
                    "store"
                }
            };
            log.trace.push(format!("{name} {kind}"));
            serde_json::json!({"ok": false, "err": kind, "msg": e.to_string()})
        }
    };
    // The rotation counted itself just before it answered (no await in between, so no
    // crash either): its replication failures are exactly the answers that name one.
    let c = &log.counts;
    if c.counted_replication_failures != c.degraded + c.unavailable + c.refused {
        let problem = format!(
            "{} replication failures counted for {} degraded, {} unavailable and {} refused rotations",
            c.counted_replication_failures, c.degraded, c.unavailable, c.refused
        );
        log.problems.push(problem);
    }
    drop(log);
    world.bump();
    answer
}

async fn node_main(world: Arc<World>, idx: usize) -> turmoil::Result {
    let node = Arc::new(Node::boot(world.clone(), idx)?);
    let link = Arc::new(Link { node: node.clone() });
    if world.mutant != Some(Mutant::NoAntiEntropy) {
        let (node, link) = (node.clone(), link.clone());
        tokio::task::spawn_local(async move {
            loop {
                if let Ok(round) = replication::anti_entropy_round(&*node, &*link).await
                    && round.added + round.advanced > 0
                {
                    node.world.log().counts.sync_rounds_merged += 1;
                }
                tokio::time::sleep(SYNC_INTERVAL).await;
            }
        });
    }
    let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (s, _) = listener.accept().await?;
        let (node, link) = (node.clone(), link.clone());
        tokio::task::spawn_local(async move {
            let _ = handle(node, link, s).await;
        });
    }
}

/// The operator: rotation requests at random times to either node, some in concurrent
/// bursts, some allowing a degraded rotation.
async fn operator(world: Arc<World>) -> turmoil::Result {
    let mut rng = Rng::new(world.seed, 2);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < CHAOS {
        tokio::time::sleep(Duration::from_millis(50 + rng.below(1500))).await;
        let n = if rng.chance(world.params.burst) {
            2 + rng.below(3)
        } else {
            1
        };
        if n > 1 {
            world.log().counts.concurrent += 1;
        }
        for _ in 0..n {
            let idx = rng.below(2) as usize;
            let allow_degraded = rng.chance(world.params.degraded);
            let world = world.clone();
            world.log().in_flight += 1;
            tasks.push(tokio::task::spawn_local(async move {
                let ask = async {
                    let mut s = TcpStream::connect((NAMES[idx], PORT)).await?;
                    write_frame(
                        &mut s,
                        &serde_json::json!({"op": "rotate", "allow_degraded": allow_degraded}),
                        &[],
                    )
                    .await?;
                    read_frame(&mut s).await
                };
                // Longer than any rotation can take (busy budget, timeouts, lease TTL).
                let answered = tokio::time::timeout(Duration::from_secs(30), ask).await;
                let mut log = world.log();
                log.in_flight -= 1;
                match answered {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        log.counts.unanswered += 1;
                        if std::env::var("SSO_SIM_DEBUG").is_ok() {
                            eprintln!("ops -> {}: {e}", NAMES[idx]);
                        }
                    }
                    Err(_) => log.counts.timed_out += 1,
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The checker.

fn rank(state: KeyState) -> u8 {
    match state {
        KeyState::Staged => 0,
        KeyState::Primary | KeyState::Active => 1,
        KeyState::Retired => 2,
        KeyState::Destroyed => 3,
    }
}

#[derive(Default)]
struct Checker {
    prev: [BTreeMap<KeyId, KeyMeta>; 2],
    seen_version: u64,
    /// Keys seen promoted (primary or active) on either node: clients may have sealed
    /// under them, so nothing in the simulation (which never retires keys the way an
    /// operator does) may retire them.
    promoted: std::collections::BTreeSet<KeyId>,
}

impl Checker {
    fn check(&mut self, world: &World) -> Result<(), String> {
        let version = world.version.load(Ordering::SeqCst);
        if version == self.seen_version {
            return Ok(());
        }
        self.seen_version = version;
        let views: Vec<_> = world
            .nodes
            .iter()
            .map(|n| n.view.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let log = world.log();
        if let Some(p) = log.problems.first() {
            return Err(p.clone());
        }
        // F and L: nothing a node stored goes backwards or vanishes, across crashes too.
        for (n, view) in views.iter().enumerate() {
            for (id, old) in &self.prev[n] {
                match view.metas.get(id) {
                    None => {
                        return Err(format!(
                            "key {id} (generation {}) vanished from node {}",
                            old.generation, NAMES[n]
                        ));
                    }
                    Some(now) if rank(now.state) < rank(old.state) => {
                        return Err(format!(
                            "key {id} went back from {:?} to {:?} on node {}",
                            old.state, now.state, NAMES[n]
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        // O: a key that was promoted on either node is never retired as an orphan (on
        // either node: a retirement reaches the other by replication).
        for view in &views {
            for m in view.metas.values() {
                if matches!(m.state, KeyState::Primary | KeyState::Active) {
                    self.promoted.insert(m.key_id);
                }
            }
        }
        for (n, view) in views.iter().enumerate() {
            for m in view.metas.values() {
                if m.state == KeyState::Retired && self.promoted.contains(&m.key_id) {
                    return Err(format!(
                        "key {} (generation {}) was promoted, so clients may have sealed under it, but node {} retired it",
                        m.key_id, m.generation, NAMES[n]
                    ));
                }
            }
        }
        // One key id, one material.
        for (id, x) in &views[0].secrets {
            if let Some(y) = views[1].secrets.get(id)
                && !x.ct_eq(y)
            {
                return Err(format!("key {id} has different material on the two nodes"));
            }
        }
        // G: no shared generation, unless one of the two keys was created without the
        // peer's lease (a degraded rotation).
        let mut by_generation: BTreeMap<u64, Vec<KeyId>> = BTreeMap::new();
        let mut all: BTreeMap<KeyId, u64> = BTreeMap::new();
        for view in &views {
            for m in view.metas.values() {
                all.insert(m.key_id, m.generation);
            }
        }
        for (id, g) in &all {
            by_generation.entry(*g).or_default().push(*id);
        }
        let replicated: BTreeMap<KeyId, &Ack> = log
            .acks
            .iter()
            .filter(|a| a.replication == Replication::Replicated)
            .map(|a| (a.key, a))
            .collect();
        for (g, ids) in &by_generation {
            for (i, x) in ids.iter().enumerate() {
                for y in &ids[i + 1..] {
                    let lease = |k: &KeyId| log.created.get(k).is_none_or(|c| c.with_peer_lease);
                    let how = |k: &KeyId| match log.created.get(k) {
                        Some(c) if c.with_peer_lease => format!("created on {} under both leases", NAMES[c.node]),
                        Some(c) => format!("created on {} without the peer's lease", NAMES[c.node]),
                        None => "of unknown origin".to_owned(),
                    };
                    if (lease(x) && lease(y)) || replicated.contains_key(x) || replicated.contains_key(y) {
                        return Err(format!(
                            "keys {x} ({}) and {y} ({}) share generation {g}",
                            how(x),
                            how(y)
                        ));
                    }
                }
            }
        }
        // R and L: an acknowledged key stays on the node(s) that acknowledged it; a
        // replicated one is the primary on both, or below a newer primary.
        for ack in &log.acks {
            let nodes: &[usize] = if ack.replication == Replication::Replicated {
                &[0, 1]
            } else {
                &[ack.node]
            };
            for &n in nodes {
                let view = &views[n];
                if !view.metas.contains_key(&ack.key) {
                    return Err(format!(
                        "acknowledged {} key {} (generation {}, step {}) is not on node {}",
                        ack.replication.as_str(),
                        ack.key,
                        ack.generation,
                        ack.step,
                        NAMES[n]
                    ));
                }
                if ack.replication == Replication::Replicated && view.primary < Some((ack.generation, ack.key)) {
                    return Err(format!(
                        "acknowledged replicated key {} (generation {}, step {}) is not primary on node {}: its primary is {:?}",
                        ack.key, ack.generation, ack.step, NAMES[n], view.primary
                    ));
                }
            }
        }
        for (n, view) in views.iter().enumerate() {
            self.prev[n] = view.metas.clone();
        }
        Ok(())
    }
}

fn converged(world: &World) -> bool {
    let a = world.nodes[0].view.lock().unwrap_or_else(|p| p.into_inner());
    let b = world.nodes[1].view.lock().unwrap_or_else(|p| p.into_inner());
    a.primary == b.primary
        && a.metas.len() == b.metas.len()
        && a.metas
            .iter()
            .zip(&b.metas)
            .all(|((x, m), (y, n))| x == y && m.state == n.state)
}

// ---------------------------------------------------------------------------------------
// One seed.

#[derive(Debug)]
struct Outcome {
    counts: Counts,
    keys: usize,
    converge_steps: u64,
    trace: Vec<String>,
}

fn store_root() -> tempfile::TempDir {
    // tmpfs when there is one: the simulation fsyncs a lot, and durability across a crash
    // is the process being dropped between store calls, not the disk.
    match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap(),
        false => tempfile::tempdir().unwrap(),
    }
}

fn chaos_steps() -> u64 {
    (CHAOS.as_millis() / TICK.as_millis()) as u64
}

fn run(seed: u64, mutant: Option<Mutant>) -> Result<Outcome, String> {
    let root = store_root();
    let params = Params::draw(seed);
    let nodes = NAMES.map(|name| {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        NodeShared {
            name,
            dir,
            view: Mutex::new(View::default()),
            boots: AtomicU64::new(0),
        }
    });
    let world = Arc::new(World {
        seed,
        params: params.clone(),
        mutant,
        nodes,
        log: Mutex::new(Log::default()),
        version: AtomicU64::new(0),
        step: AtomicU64::new(0),
    });
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(TICK)
        .simulation_duration(Duration::from_secs(3600))
        .min_message_latency(Duration::from_millis(0))
        .max_message_latency(Duration::from_millis(params.latency_ms))
        .build();
    for (idx, name) in NAMES.into_iter().enumerate() {
        let world = world.clone();
        sim.host(name, move || node_main(world.clone(), idx));
    }
    sim.client("ops", operator(world.clone()));
    sim.set_link_fail_rate("a", "b", params.fail_rate);

    let mut rng = Rng::new(seed, 3);
    let mut checker = Checker::default();
    let mut down: [Option<u64>; 2] = [None, None];
    let mut partitioned = false;
    let mut held_until: Option<u64> = None;
    let chaos_steps = chaos_steps();
    let bound = (CONVERGE_WITHIN.as_millis() / TICK.as_millis()) as u64;
    let mut healed = false;
    let mut quiet_since: Option<u64> = None;
    let fail = |step: u64, what: String| -> String {
        format!(
            "seed {seed} ({params:?}), step {step} ({:?} simulated): {what}",
            TICK * step as u32
        )
    };
    for step in 1.. {
        world.step.store(step, Ordering::SeqCst);
        let clients_done = sim.step().map_err(|e| fail(step, format!("simulation error: {e}")))?;
        checker.check(&world).map_err(|e| fail(step, e))?;
        if step < chaos_steps {
            for (idx, due) in down.iter_mut().enumerate() {
                if *due == Some(step) {
                    sim.bounce(NAMES[idx]);
                    *due = None;
                } else if due.is_none() && rng.chance(params.crash / 2.0) {
                    sim.crash(NAMES[idx]);
                    world.log().counts.crashes += 1;
                    world.log().trace.push(format!("step {step} crash {}", NAMES[idx]));
                    *due = Some(step + 5 + rng.below(300));
                }
            }
            if rng.chance(params.partition) {
                if partitioned {
                    sim.repair("a", "b");
                } else {
                    sim.partition("a", "b");
                    world.log().counts.partitions += 1;
                }
                partitioned = !partitioned;
            }
            match held_until {
                Some(until) if until <= step => {
                    sim.release("a", "b");
                    held_until = None;
                }
                None if rng.chance(params.hold) => {
                    sim.hold("a", "b");
                    world.log().counts.holds += 1;
                    held_until = Some(step + 10 + rng.below(200));
                }
                _ => {}
            }
            continue;
        }
        if !healed {
            healed = true;
            sim.repair("a", "b");
            sim.release("a", "b");
            sim.set_link_fail_rate("a", "b", 0.0);
            for (idx, due) in down.iter_mut().enumerate() {
                if due.take().is_some() {
                    sim.bounce(NAMES[idx]);
                }
            }
        }
        if clients_done && world.log().in_flight == 0 {
            let since = *quiet_since.get_or_insert(step);
            if converged(&world) {
                let log = world.log();
                return Ok(Outcome {
                    counts: log.counts.clone(),
                    keys: world.nodes[0].view.lock().unwrap().metas.len(),
                    converge_steps: step - since,
                    trace: log.trace.clone(),
                });
            }
            if step - since > bound {
                if std::env::var("SSO_SIM_DEBUG").is_ok() {
                    for n in &world.nodes {
                        let v = n.view.lock().unwrap();
                        eprintln!("node {}: primary {:?}", n.name, v.primary);
                        for m in v.metas.values() {
                            eprintln!("  {} g{} {:?} origin {}", m.key_id, m.generation, m.state, m.origin);
                        }
                    }
                }
                return Err(fail(
                    step,
                    format!("no convergence within {CONVERGE_WITHIN:?} of the heal and the operator's last answer"),
                ));
            }
        } else if step > chaos_steps + 200 * 100 {
            return Err(fail(step, "the operator's requests did not finish".into()));
        }
    }
    unreachable!()
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SSO_SIM_SEED") {
        return vec![s.parse().expect("SSO_SIM_SEED must be a number")];
    }
    let n: u64 = std::env::var("SSO_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let base: u64 = std::env::var("SSO_SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (base..base + n).collect()
}

#[test]
fn seeded_schedules_keep_the_pair_invariants() {
    let mutant = Mutant::from_env();
    let mut total = Counts::default();
    let (mut keys, mut worst) = (0, 0);
    let seeds = seeds();
    for &seed in &seeds {
        match run(seed, mutant) {
            Ok(out) => {
                let c = &out.counts;
                if std::env::var("SSO_SIM_DEBUG").is_ok() {
                    eprintln!("seed {seed}: {c:?}");
                }
                for (t, v) in [
                    (&mut total.replicated, c.replicated),
                    (&mut total.degraded, c.degraded),
                    (&mut total.busy, c.busy),
                    (&mut total.superseded, c.superseded),
                    (&mut total.unavailable, c.unavailable),
                    (&mut total.refused, c.refused),
                    (&mut total.store_errors, c.store_errors),
                    (&mut total.unanswered, c.unanswered),
                    (&mut total.timed_out, c.timed_out),
                    (&mut total.duplicates, c.duplicates),
                    (&mut total.stalls, c.stalls),
                    (&mut total.peer_busy, c.peer_busy),
                    (&mut total.peer_lease_lost, c.peer_lease_lost),
                    (&mut total.peer_stale, c.peer_stale),
                    (&mut total.crashes, c.crashes),
                    (&mut total.partitions, c.partitions),
                    (&mut total.holds, c.holds),
                    (&mut total.concurrent, c.concurrent),
                    (&mut total.sync_rounds_merged, c.sync_rounds_merged),
                ] {
                    *t += v;
                }
                keys += out.keys;
                worst = worst.max(out.converge_steps);
            }
            Err(e) => panic!("{e}\nreplay: SSO_SIM_SEED={seed} cargo test -p sso-server --test sim seeded"),
        }
    }
    println!(
        "sim: {} seeds, {keys} keys; answers: {} replicated, {} degraded, {} busy, {} superseded, {} peer unavailable, {} refused, {} store errors, {} unanswered (connection failed), {} timed out; \
         faults: {} crashes, {} partitions, {} holds, {} duplicated requests, {} store stalls, {} concurrent bursts; peer refusals: {} busy, {} lease lost, {} stale; {} anti-entropy merges; slowest convergence {:?}",
        seeds.len(),
        total.replicated,
        total.degraded,
        total.busy,
        total.superseded,
        total.unavailable,
        total.refused,
        total.store_errors,
        total.unanswered,
        total.timed_out,
        total.crashes,
        total.partitions,
        total.holds,
        total.duplicates,
        total.stalls,
        total.concurrent,
        total.peer_busy,
        total.peer_lease_lost,
        total.peer_stale,
        total.sync_rounds_merged,
        TICK * worst as u32,
    );
    if seeds.len() >= 4 {
        // The schedules really were hard: every kind of fault happened.
        for (what, n) in [
            ("replicated answers", total.replicated),
            ("degraded answers", total.degraded),
            ("crashes", total.crashes),
            ("partitions", total.partitions),
            ("duplicated requests", total.duplicates),
            ("concurrent bursts", total.concurrent),
            ("busy peer leases (contention)", total.peer_busy),
            (
                "refused or failed rotations",
                total.busy + total.superseded + total.unavailable + total.refused,
            ),
        ] {
            assert!(
                n > 0,
                "no {what} in {} seeds: the schedules are too gentle",
                seeds.len()
            );
        }
    }
    assert_eq!(total.store_errors, 0, "store errors during the simulation");
}

#[test]
fn the_simulation_catches_injected_bugs() {
    for mutant in [Mutant::AckBeforeWrite, Mutant::PeerUnguarded, Mutant::NoAntiEntropy] {
        let caught = (1000..1008).find_map(|seed| run(seed, Some(mutant)).err());
        let Some(failure) = caught else {
            panic!("{mutant:?} was not caught in 8 seeds");
        };
        println!("{mutant:?} caught: {failure}");
    }
}

/// Found by the simulation (seed 20000 then; 20050 since stalls stop at the heal): a
/// rotation stalled past its lease; a later rotation on the other node retired its staged
/// key as an orphan on both nodes; the stalled rotation then failed to promote it locally
/// and answered a store error ("key … is retired; it cannot become active") instead of
/// saying that it was superseded (fixed in `rotation::promote_locally`). Since a node
/// retires only the orphans it made itself (found by attack: the other node's staged key
/// may be that node's primary), the case cannot arise: the seed that reached it now runs
/// without a key retired under a rotation.
#[test]
fn a_rotation_whose_key_was_retired_as_an_orphan_answers_superseded() {
    let out = run(20050, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.counts.superseded_orphan, 0,
        "a node retired the other node's staged key as an orphan: {:?}",
        out.counts
    );
}

#[test]
fn a_seed_replays_the_same_schedule() {
    let first = run(7, None).unwrap();
    let second = run(7, None).unwrap();
    assert_eq!(first.trace, second.trace, "seed 7 did not replay");
    assert!(!first.trace.is_empty());
}
