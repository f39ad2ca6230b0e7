//! A bounded chaos run of the pair (about 60 s; `SSO_CHAOS_SECS` sets it): random SIGKILLs
//! and restarts, partitions and heals, degraded rotations, and two clients (one preferring
//! each node) sealing and opening throughout.
//!
//! Invariants checked at the end: no acknowledged rotation is lost (both nodes hold every
//! acknowledged key); every envelope sealed during the run opens, by a fresh client; the
//! pair converges within 2 s of the last heal; clients never failed to open their own
//! envelopes. It prints its figures.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use sso_client::Client;
use tests::pair::{Node, Pair};

fn admin(pair: &Pair, node: &Node) -> tests::Client {
    pair.admin(node)
}

async fn view(pair: &Pair, node: &Node) -> Option<tests::pair::View> {
    pair.view(node).await
}

struct Rng(SystemRandom);

impl Rng {
    fn below(&self, n: u64) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b).unwrap();
        u64::from_le_bytes(b) % n.max(1)
    }
}

#[derive(Default)]
struct Sealed {
    /// (aad, plaintext, envelope) samples.
    samples: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    ok: u64,
    failures: Vec<String>,
}

fn worker(client: Client, stop: Arc<AtomicBool>, tag: u8) -> tokio::task::JoinHandle<Sealed> {
    tokio::spawn(async move {
        let mut out = Sealed::default();
        let mut seen_keys = BTreeSet::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let plaintext = [&[tag][..], &i.to_le_bytes()].concat();
            let aad = vec![tag];
            match client.seal(&aad, &plaintext).await {
                Ok(env) => {
                    match client.open(&aad, &env).await {
                        Ok(p) if p == plaintext => out.ok += 1,
                        other => out.failures.push(format!("open own envelope: {other:?}")),
                    }
                    let key = sso_proto::EnvelopeRef::parse(&env).unwrap().key_id;
                    // Keep the first envelope under every key, and a sample of the rest.
                    if seen_keys.insert(key) || i.is_multiple_of(500) {
                        out.samples.push((aad, plaintext, env));
                    }
                }
                Err(e) => out.failures.push(format!("seal: {e}")),
            }
            if i.is_multiple_of(32) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let secs: u64 = std::env::var("SSO_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(dir.path(), "");
    pair.a.start();
    pair.b.start();
    let rng = Rng(SystemRandom::new());
    let cert = pair.pki.client("client");
    let make_client = |first: &Node, second: &Node| {
        Client::builder()
            .endpoint(first.url())
            .endpoint(second.url())
            .ca(&pair.pki.ca_file)
            .identity(&cert.cert, &cert.key)
            .build()
            .unwrap()
    };
    // Wait for B to hold A's first key, and warm both clients.
    let deadline = Instant::now() + Duration::from_secs(10);
    while view(&pair, &pair.a).await != view(&pair, &pair.b).await {
        assert!(Instant::now() < deadline, "the pair did not converge at start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (c1, c2) = (make_client(&pair.a, &pair.b), make_client(&pair.b, &pair.a));
    c1.refresh().await.unwrap();
    c2.refresh().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = [worker(c1.clone(), stop.clone(), 1), worker(c2.clone(), stop.clone(), 2)];

    let mut acknowledged: Vec<String> = Vec::new();
    let (mut kills, mut partitions, mut rotations, mut refused) = (0, 0, 0, 0);
    let started = Instant::now();
    let mut partitioned = false;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        match rng.below(10) {
            0..=2 => {
                // SIGKILL one node (never both), restart it a moment later.
                let node = if rng.below(2) == 0 { &mut pair.a } else { &mut pair.b };
                node.kill();
                kills += 1;
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
                    partitions += 1;
                }
                partitioned = !partitioned;
            }
            _ => {
                let node = if rng.below(2) == 0 { &pair.a } else { &pair.b };
                if node.server.is_none() {
                    continue;
                }
                let degraded = rng.below(3) != 0;
                match admin(&pair, node)
                    .post("/v1/admin/rotate", &serde_json::json!({"allow_degraded": degraded}))
                    .await
                {
                    Ok(r) if r.status == 200 => {
                        rotations += 1;
                        acknowledged.push(r.json()["key_id"].as_str().unwrap().to_owned());
                    }
                    Ok(r) if r.status == 503 => refused += 1,
                    Ok(r) => panic!("rotate answered {}: {:?}", r.status, r.body),
                    Err(_) => refused += 1,
                }
            }
        }
    }
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
    let mut sealed = Vec::new();
    let (mut ops, mut failures) = (0, Vec::new());
    for w in workers {
        let s = w.await.unwrap();
        ops += s.ok;
        failures.extend(s.failures);
        sealed.extend(s.samples);
    }

    // No acknowledged rotation lost.
    let (keys, _) = view(&pair, &pair.a).await.unwrap();
    let held: BTreeSet<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
    for id in &acknowledged {
        assert!(held.contains(id.as_str()), "acknowledged rotation {id} was lost");
    }
    // Every sampled envelope opens, by a fresh client of either node.
    let fresh = make_client(&pair.b, &pair.a);
    for (aad, plaintext, env) in &sealed {
        assert_eq!(&fresh.open(aad, env).await.unwrap(), plaintext);
    }
    println!(
        "chaos: {secs} s, {kills} SIGKILLs, {partitions} partitions, {rotations} acknowledged rotations ({refused} refused), \
         {ops} seal+open pairs, {} failures, {} envelopes re-opened by a fresh client, converged {converged:?} after the last heal",
        failures.len(),
        sealed.len()
    );
    assert!(
        failures.is_empty(),
        "client operations failed: {:?}",
        &failures[..failures.len().min(5)]
    );
}
