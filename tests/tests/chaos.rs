//! A bounded chaos run of the pair (about 60 s; `SSO_CHAOS_SECS` sets it): random SIGKILLs
//! and restarts, partitions and heals, degraded rotations, bursts of concurrent rotations
//! on both nodes, and three clients sealing and opening throughout: one preferring each
//! node, and one reaching the nodes through relays that are cut in turn, so that it is cut
//! off from one node for a while. Every client also opens envelopes the others sealed
//! through the other node. The run starts with a short script (a partition with a degraded
//! rotation, a concurrent burst, a SIGKILL, a client cut-off) so that every fault happens
//! in any run, then goes random.
//!
//! Checked during the run: every `replicated` answer names a key that is, right after the
//! answer, the primary on both nodes or below a newer primary there (docs/pair.md R); no
//! two replicated keys share a generation (G). At the end: every acknowledged key is held
//! by both nodes and no replicated key is above the final primary; the pair converges
//! within 2 s of the last heal; every sampled envelope opens by a fresh client; clients
//! never failed to open their own envelopes nor, once healed, each other's; and every kind
//! of fault really happened (counts above zero). It prints its figures.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use sso_client::Client;
use tests::pair::{Node, Pair, Relay};

async fn view(pair: &Pair, node: &Node) -> Option<tests::pair::View> {
    pair.view(node).await
}

/// A node's keys with generations, and its primary, from its admin status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Detail {
    /// key id → (generation, state)
    keys: BTreeMap<String, (u64, String)>,
    primary: Option<(u64, String)>,
}

async fn detail(pair: &Pair, node: &Node) -> Option<Detail> {
    node.server.as_ref()?;
    let v = pair.admin(node).get("/v1/admin/status").await.ok()?.json();
    let keys: BTreeMap<String, (u64, String)> = v["keys"]
        .as_array()?
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap_or("").to_owned(),
                (
                    k["generation"].as_u64().unwrap_or(0),
                    k["state"].as_str().unwrap_or("").to_owned(),
                ),
            )
        })
        .collect();
    let primary = v["primary"]
        .as_str()
        .map(|p| (keys.get(p).map_or(0, |k| k.0), p.to_owned()));
    Some(Detail { keys, primary })
}

/// A node's detail, retried for a moment (a node may be starting).
async fn detail_retry(pair: &Pair, node: &Node) -> Option<Detail> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(d) = detail(pair, node).await {
            return Some(d);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Rng(SystemRandom);

impl Rng {
    fn below(&self, n: u64) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b).unwrap();
        u64::from_le_bytes(b) % n.max(1)
    }
}

type Sample = (Vec<u8>, Vec<u8>, Vec<u8>);

#[derive(Default)]
struct Sealed {
    /// (aad, plaintext, envelope) samples.
    samples: Vec<Sample>,
    ok: u64,
    failures: Vec<String>,
    /// Envelopes of another client opened during the run.
    cross_ok: u64,
    /// Envelopes of another client that did not open during the run (its key not on
    /// this client's node yet: a degraded rotation across a partition); retried at the end.
    cross_deferred: Vec<Sample>,
}

/// Recent envelopes of every client, for the others to open.
type Board = Arc<Mutex<Vec<VecDeque<Sample>>>>;

fn worker(
    client: Client,
    stop: Arc<AtomicBool>,
    tag: u8,
    board: Board,
    ops: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Sealed> {
    tokio::spawn(async move {
        let mut out = Sealed::default();
        let mut seen_keys = BTreeSet::new();
        let mut deferred_keys = BTreeSet::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let plaintext = [&[tag][..], &i.to_le_bytes()].concat();
            let aad = vec![tag];
            match client.seal(&aad, &plaintext).await {
                Ok(env) => {
                    match client.open(&aad, &env).await {
                        Ok(p) if p == plaintext => {
                            out.ok += 1;
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        other => out.failures.push(format!("client {tag}: open own envelope: {other:?}")),
                    }
                    let key = sso_proto::EnvelopeRef::parse(&env).unwrap().key_id;
                    // Keep the first envelope under every key, and a sample of the rest.
                    if seen_keys.insert(key) || i.is_multiple_of(500) {
                        out.samples.push((aad.clone(), plaintext.clone(), env.clone()));
                    }
                    if i.is_multiple_of(16) {
                        let mut b = board.lock().unwrap();
                        let mine = &mut b[usize::from(tag - 1)];
                        mine.push_back((aad, plaintext, env));
                        if mine.len() > 8 {
                            mine.pop_front();
                        }
                    }
                }
                Err(e) => out.failures.push(format!("client {tag}: seal: {e}")),
            }
            if i.is_multiple_of(16) {
                // Open another client's envelope (sealed through another node).
                let other = {
                    let b = board.lock().unwrap();
                    let n = b.len();
                    b[(usize::from(tag) + (i as usize / 16) % (n - 1)) % n].back().cloned()
                };
                if let Some((aad, plaintext, env)) = other {
                    match client.open(&aad, &env).await {
                        Ok(p) if p == plaintext => out.cross_ok += 1,
                        _ => {
                            // One per key is enough to prove the key arrives everywhere.
                            let key = sso_proto::EnvelopeRef::parse(&env).unwrap().key_id;
                            if deferred_keys.insert(key) {
                                out.cross_deferred.push((aad, plaintext, env));
                            }
                        }
                    }
                }
            }
            if i.is_multiple_of(32) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        out
    })
}

#[derive(Debug, Clone)]
struct Ack {
    key: String,
    generation: u64,
    replication: String,
    node: &'static str,
}

#[derive(Default, Debug)]
struct Figures {
    kills: u64,
    partitions: u64,
    replicated: u64,
    degraded: u64,
    refused: u64,
    bursts: u64,
    /// Answers of bursts that were replicated.
    burst_replicated: u64,
    cutoffs: u64,
    /// Operations of the cut-off client while it was cut off from one node.
    ops_while_cut: u64,
    checked_primary: u64,
}

/// One rotation request; its answer, if 200.
async fn rotate(pair: &Pair, a_side: bool, degraded: bool) -> Result<Option<Ack>, String> {
    let node = if a_side { &pair.a } else { &pair.b };
    if node.server.is_none() {
        return Ok(None);
    }
    let name = if a_side { "a" } else { "b" };
    match pair
        .admin(node)
        .post("/v1/admin/rotate", &serde_json::json!({"allow_degraded": degraded}))
        .await
    {
        Ok(r) if r.status == 200 => {
            let v = r.json();
            Ok(Some(Ack {
                key: v["key_id"].as_str().unwrap().to_owned(),
                generation: v["generation"].as_u64().unwrap(),
                replication: v["replication"].as_str().unwrap().to_owned(),
                node: name,
            }))
        }
        // Peer unavailable (503), busy or superseded (409 rotation_busy), a lease lost to a
        // restart or a slow machine (409 rotation_refused): refused, truthfully.
        Ok(r)
            if r.status == 503
                || (r.status == 409
                    && ["rotation_busy", "rotation_refused"].contains(&r.json()["error"].as_str().unwrap_or(""))) =>
        {
            Ok(None)
        }
        Ok(r) => Err(format!("rotate on {name} answered {}: {:?}", r.status, r.json())),
        Err(_) => Ok(None),
    }
}

/// R: right after a `replicated` answer, the key is the primary on both nodes, or a newer
/// key (higher `(generation, key_id)`) is.
async fn check_primary(pair: &Pair, ack: &Ack) {
    for node in [&pair.a, &pair.b] {
        let d = detail_retry(pair, node)
            .await
            .unwrap_or_else(|| panic!("{} did not answer after acknowledging {ack:?}", node.name));
        let acked = (ack.generation, ack.key.clone());
        assert!(
            d.primary.as_ref() >= Some(&acked),
            "{ack:?} answered replicated, but {}'s primary is {:?}",
            node.name,
            d.primary
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let secs: u64 = std::env::var("SSO_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let test_started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(dir.path());
    pair.a.start();
    pair.b.start();
    let rng = Rng(SystemRandom::new());
    let cert = pair.pki.client("client");
    // The third client reaches each node through its own relay, cut in turn.
    let to_a = Relay::start(SocketAddr::from(([127, 0, 0, 1], pair.a.port)));
    let to_b = Relay::start(SocketAddr::from(([127, 0, 0, 1], pair.b.port)));
    let make_client = |first: String, second: String| {
        Client::builder()
            .endpoint(first)
            .endpoint(second)
            .ca(&pair.pki.ca_file)
            .identity(&cert.cert, &cert.key)
            .build()
            .unwrap()
    };
    // Wait for B to hold A's first key, and warm the clients.
    let deadline = Instant::now() + Duration::from_secs(10);
    while view(&pair, &pair.a).await != view(&pair, &pair.b).await {
        assert!(Instant::now() < deadline, "the pair did not converge at start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c1 = make_client(pair.a.url(), pair.b.url());
    let c2 = make_client(pair.b.url(), pair.a.url());
    let c3 = make_client(
        format!("https://localhost:{}", to_a.port),
        format!("https://localhost:{}", to_b.port),
    );
    for c in [&c1, &c2, &c3] {
        c.refresh().await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let board: Board = Arc::new(Mutex::new(vec![VecDeque::new(); 3]));
    let c3_ops = Arc::new(AtomicU64::new(0));
    let workers = [
        worker(c1.clone(), stop.clone(), 1, board.clone(), Arc::new(AtomicU64::new(0))),
        worker(c2.clone(), stop.clone(), 2, board.clone(), Arc::new(AtomicU64::new(0))),
        worker(c3.clone(), stop.clone(), 3, board.clone(), c3_ops.clone()),
    ];

    let setup_took = test_started.elapsed();
    let mut acks: Vec<Ack> = Vec::new();
    let mut f = Figures::default();
    let started = Instant::now();
    let mut partitioned = false;
    // Which relay of the third client is cut (0: to A, 1: to B), and its op count then.
    let mut cut: Option<(usize, u64)> = None;
    // The opening script, then random steps.
    // A burst while all is well; a partition, a degraded rotation in it, the heal; a client
    // cut off, a SIGKILL, the client back.
    let script = [6u64, 3, 9, 4, 5, 0, 5];
    let mut step = 0usize;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        let action = script.get(step).copied().unwrap_or_else(|| rng.below(11));
        step += 1;
        match action {
            0..=2 => {
                // SIGKILL one node (never both), restart it a moment later. The cut-off
                // client keeps its way to the node that stays up.
                let a_side = rng.below(2) == 0;
                let killed = usize::from(!a_side);
                if let Some((relay, ops)) = cut
                    && relay != killed
                {
                    [&to_a, &to_b][relay].heal();
                    f.ops_while_cut += c3_ops.load(Ordering::Relaxed) - ops;
                    cut = None;
                }
                let node = if a_side { &mut pair.a } else { &mut pair.b };
                node.kill();
                f.kills += 1;
                tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
                node.start();
            }
            3..=4 => {
                if partitioned {
                    pair.relay_ab.heal();
                    pair.relay_ba.heal();
                } else {
                    pair.relay_ab.cut();
                    pair.relay_ba.cut();
                    f.partitions += 1;
                }
                partitioned = !partitioned;
            }
            5 => {
                // Cut the third client off one node (both running), or give it back.
                match cut.take() {
                    Some((relay, ops)) => {
                        [&to_a, &to_b][relay].heal();
                        f.ops_while_cut += c3_ops.load(Ordering::Relaxed) - ops;
                    }
                    None => {
                        let relay = rng.below(2) as usize;
                        [&to_a, &to_b][relay].cut();
                        f.cutoffs += 1;
                        cut = Some((relay, c3_ops.load(Ordering::Relaxed)));
                    }
                }
            }
            6 => {
                // A burst of concurrent rotations on both nodes.
                f.bursts += 1;
                let n = 2 + rng.below(3);
                let sides: Vec<(bool, bool)> = (0..n).map(|i| (i % 2 == 0, rng.below(3) == 0)).collect();
                let answers =
                    futures_join(sides.iter().map(|&(a_side, degraded)| rotate(&pair, a_side, degraded))).await;
                let mut answered = Vec::new();
                for answer in answers {
                    match answer.unwrap() {
                        Some(ack) => answered.push(ack),
                        None => f.refused += 1,
                    }
                }
                for ack in answered {
                    if ack.replication == "replicated" {
                        f.burst_replicated += 1;
                        check_primary(&pair, &ack).await;
                        f.checked_primary += 1;
                    }
                    acks.push(ack);
                }
            }
            _ => {
                let a_side = rng.below(2) == 0;
                // The script's first rotation is degraded (during its partition).
                let degraded = step == 3 || rng.below(3) != 0;
                match rotate(&pair, a_side, degraded).await.unwrap() {
                    Some(ack) => {
                        if ack.replication == "replicated" {
                            check_primary(&pair, &ack).await;
                            f.checked_primary += 1;
                        }
                        acks.push(ack);
                    }
                    None => f.refused += 1,
                }
            }
        }
    }
    if let Some((relay, ops)) = cut.take() {
        [&to_a, &to_b][relay].heal();
        f.ops_while_cut += c3_ops.load(Ordering::Relaxed) - ops;
    }
    let chaos_took = started.elapsed();
    // Heal everything; the last heal starts the 2 s convergence clock.
    pair.relay_ab.heal();
    pair.relay_ba.heal();
    let healed = Instant::now();
    let converged = loop {
        let (a, b) = (view(&pair, &pair.a).await, view(&pair, &pair.b).await);
        if a.is_some() && a == b {
            break healed.elapsed();
        }
        assert!(
            healed.elapsed() < Duration::from_secs(2),
            "no convergence within 2 s of the last heal: {a:?} vs {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let joining = Instant::now();
    let mut sealed = Vec::new();
    let (mut ops, mut failures, mut cross_ok, mut deferred) = (0, Vec::new(), 0, Vec::new());
    for w in workers {
        let s = w.await.unwrap();
        ops += s.ok;
        failures.extend(s.failures);
        sealed.extend(s.samples);
        cross_ok += s.cross_ok;
        deferred.extend(s.cross_deferred);
    }
    let join_took = joining.elapsed();

    for ack in &acks {
        f.replicated += u64::from(ack.replication == "replicated");
        f.degraded += u64::from(ack.replication == "degraded");
    }
    // No acknowledged rotation lost; no replicated key above the final primary; G.
    let (da, db) = (
        detail(&pair, &pair.a).await.unwrap(),
        detail(&pair, &pair.b).await.unwrap(),
    );
    assert_eq!(da.primary, db.primary, "converged views but different primaries");
    let mut generations: BTreeMap<u64, &Ack> = BTreeMap::new();
    for ack in &acks {
        for d in [&da, &db] {
            assert!(
                d.keys.contains_key(&ack.key),
                "rotation {} acknowledged by node {} was lost: {ack:?}",
                ack.key,
                ack.node
            );
        }
        if ack.replication == "replicated" {
            assert!(
                da.primary >= Some((ack.generation, ack.key.clone())),
                "replicated {ack:?} is above the final primary {:?}",
                da.primary
            );
            if let Some(other) = generations.insert(ack.generation, ack) {
                panic!(
                    "two replicated keys share generation {}: {other:?} and {ack:?}",
                    ack.generation
                );
            }
        }
    }
    let checks_started = Instant::now();
    // Every sampled envelope opens, by a fresh client of either node; every envelope a
    // client could not open during the run opens now.
    let fresh = make_client(pair.b.url(), pair.a.url());
    for (aad, plaintext, env) in sealed.iter().chain(&deferred) {
        assert_eq!(&fresh.open(aad, env).await.unwrap(), plaintext);
    }
    for (aad, plaintext, env) in &deferred {
        for c in [&c1, &c2, &c3] {
            assert_eq!(
                &c.open(aad, env).await.unwrap(),
                plaintext,
                "a deferred envelope does not open after the heal"
            );
        }
    }
    println!(
        "chaos: {secs} s, {} SIGKILLs, {} partitions, {} client cut-offs ({} seal+open pairs while cut off), \
         {} rotations acknowledged ({} replicated, each checked primary on both: {}; {} degraded; {} refused), \
         {} concurrent bursts ({} replicated answers in bursts), {ops} seal+open pairs, {} failures, \
         {cross_ok} envelopes of other clients opened during the run ({} only after the heal), \
         {} envelopes re-opened by a fresh client, converged {converged:?} after the last heal; \
         setup {setup_took:?}, chaos phase {chaos_took:?}, clients stopped in {join_took:?}, final opens {:?}, total {:?}",
        f.kills,
        f.partitions,
        f.cutoffs,
        f.ops_while_cut,
        acks.len(),
        f.replicated,
        f.checked_primary,
        f.degraded,
        f.refused,
        f.bursts,
        f.burst_replicated,
        failures.len(),
        deferred.len(),
        sealed.len(),
        checks_started.elapsed(),
        test_started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "client operations failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    // Every fault really happened.
    for (what, n) in [
        ("SIGKILLs", f.kills),
        ("partitions", f.partitions),
        ("replicated rotations", f.replicated),
        ("degraded rotations", f.degraded),
        ("concurrent bursts", f.bursts),
        ("replicated answers in bursts", f.burst_replicated),
        ("client cut-offs", f.cutoffs),
        ("operations while a client was cut off", f.ops_while_cut),
        ("envelopes opened across clients", cross_ok),
    ] {
        assert!(n > 0, "no {what} in this run: it proves nothing about them");
    }
    assert_eq!(f.checked_primary, f.replicated);
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for fut in futures {
        set.push(Box::pin(fut));
    }
    let mut outputs: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, out) in set.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.unwrap()).collect()
}
