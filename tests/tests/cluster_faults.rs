//! Issue 14's faults on a cluster: three real sso-server nodes on one throwaway PostgreSQL
//! (no mocks). The database stopped and started again; a node SIGKILLed under a client
//! holding all three endpoints.
//!
//! One PostgreSQL serves the whole binary (each test takes a fresh database); the tests
//! run one at a time (`SERIAL`), because the outage test stops that PostgreSQL.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pg_throwaway::PgCluster;
use tests::cluster::{PgNodes, accepts_connections, process_exists};

/// The binary's one PostgreSQL (stopped by its watchdog when the test process ends).
fn pg() -> &'static PgCluster {
    static PG: OnceLock<PgCluster> = OnceLock::new();
    PG.get_or_init(PgCluster::start)
}

/// Held by each test for its whole run.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the database again when dropped, so a failing outage test does not leave the
/// next test without one.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        pg().start_again();
    }
}

/// A rotation on node `i`: the raw answer.
async fn rotate(nodes: &PgNodes, i: usize) -> tests::Reply {
    nodes
        .admin(i)
        .post("/v1/admin/rotate", &serde_json::json!({}))
        .await
        .unwrap()
}

/// Asserts `reply` is 503 `store_unavailable` with the PostgreSQL remedy in its message.
fn assert_store_unavailable(reply: &tests::Reply, what: &str) {
    assert_eq!(reply.status, 503, "{what}: {:?}", reply.body);
    let body = reply.json();
    assert_eq!(body["error"], "store_unavailable", "{what}: {body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("PostgreSQL") && message.contains("check that"),
        "{what}: the message has no remedy: {body}"
    );
}

/// Polls node `i`'s health until its status is `status`, for at most `limit`; the last
/// answer.
async fn health_until(nodes: &PgNodes, i: usize, status: &str, limit: Duration) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let health = nodes.admin(i).get("/v1/health").await.unwrap().json();
        if health["status"] == status {
            return health;
        }
        assert!(
            started.elapsed() < limit,
            "node-{}'s health is not {status} after {limit:?}: {health}",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Database stopped: every node serves its last snapshot (keyring, a key, an open watch),
/// refuses writes with 503 `store_unavailable` and a remedy, and says the store is down in
/// health and metrics. Database back: a rotation succeeds on every node within 2 s of its
/// return, each rotation acknowledged afterwards is the primary on all three nodes, and
/// the watches opened before the outage deliver the new keyring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_three_nodes_serves_reads_refuses_writes_and_heals_on_every_node() {
    let _serial = SERIAL.lock().await;
    let nodes = PgNodes::start(pg().fresh_database(), &[250, 250, 250]).await;
    // An older key to retire and a primary to fetch.
    let first = nodes.keyring(0).await.unwrap()["primary"].as_str().unwrap().to_owned();
    let second = nodes.admin(0).rotate().await["key_id"].as_str().unwrap().to_owned();
    nodes.primary_everywhere(&second, Duration::from_secs(3)).await.unwrap();
    let before: Vec<serde_json::Value> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(nodes.keyring(i).await.unwrap());
        }
        v
    };
    // A watch open on every node across the outage.
    let watches: Vec<_> = (0..3)
        .map(|i| {
            let client = nodes.client(i);
            let after = before[i]["epoch"].as_u64().unwrap();
            tokio::spawn(async move {
                let reply = client.get(&format!("/v1/keyring/watch?after={after}")).await;
                (reply, Instant::now())
            })
        })
        .collect();

    let restart = Restart;
    tokio::task::spawn_blocking(|| pg().stop()).await.unwrap();
    let stopped = Instant::now();
    assert!(
        !accepts_connections(pg().port()),
        "the database still accepts connections on port {}: the outage is not real",
        pg().port()
    );

    // Health and metrics say the store is down on every node, before any write: the epoch
    // check (every 2 s) notices.
    for (i, node) in nodes.nodes.iter().enumerate() {
        let health = health_until(&nodes, i, "degraded", Duration::from_secs(8)).await;
        assert!(
            health["problems"].to_string().contains("store"),
            "{}: {health}",
            node.name
        );
        assert_eq!(
            node.server().metric("sso_store_writable"),
            0.0,
            "{}'s metrics do not say the store is down",
            node.name
        );
    }
    eprintln!("every node degraded {:?} after the stop", stopped.elapsed());

    for (i, node) in nodes.nodes.iter().enumerate() {
        // Reads: the last snapshot, unchanged.
        let ring = nodes
            .keyring(i)
            .await
            .unwrap_or_else(|| panic!("{}'s keyring refused", node.name));
        assert_eq!(
            ring, before[i],
            "{} served another keyring during the outage",
            node.name
        );
        for id in [&first, &second] {
            let key = nodes.client(i).get(&format!("/v1/keys/{id}")).await.unwrap();
            assert_eq!(key.status, 200, "{}: key {id}: {:?}", node.name, key.body);
        }
        // Writes: 503 store_unavailable with the remedy, bounded in time.
        let started = Instant::now();
        assert_store_unavailable(&rotate(&nodes, i).await, &format!("rotate on {}", node.name));
        let retire = nodes
            .admin(i)
            .post(&format!("/v1/admin/keys/{first}/retire"), &serde_json::json!({}))
            .await
            .unwrap();
        assert_store_unavailable(&retire, &format!("retire on {}", node.name));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}'s refusals took {:?}",
            node.name,
            started.elapsed()
        );
    }
    for (i, w) in watches.iter().enumerate() {
        assert!(
            !w.is_finished(),
            "node-{}'s watch answered during the outage, with nothing new",
            i + 1
        );
    }

    // The database returns: every node rotates within 2 s of it (all three at once).
    tokio::task::spawn_blocking(|| pg().start_again()).await.unwrap();
    drop(restart);
    let back = Instant::now();
    let outage = stopped.elapsed();
    let attempts: Vec<_> = (0..3)
        .map(|i| {
            let admin = nodes.admin(i);
            tokio::spawn(async move {
                loop {
                    let reply = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
                    if reply.status == 200 || back.elapsed() > Duration::from_secs(2) {
                        return (reply, back.elapsed());
                    }
                    // 503 while the node reconnects; 409 rotation_busy when another node's
                    // rotation overtook this one.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let mut acked = Vec::new();
    for (i, a) in attempts.into_iter().enumerate() {
        let (reply, at) = a.await.unwrap();
        eprintln!(
            "node-{} rotated {at:?} after the database's return: {}",
            i + 1,
            reply.status
        );
        assert_eq!(
            reply.status,
            200,
            "node-{} did not rotate within 2 s of the database's return: {:?}",
            i + 1,
            reply.body
        );
        let v = reply.json();
        acked.push((
            v["generation"].as_u64().unwrap(),
            v["key_id"].as_str().unwrap().to_owned(),
        ));
    }
    let mut generations: Vec<u64> = acked.iter().map(|a| a.0).collect();
    generations.sort_unstable();
    generations.dedup();
    assert_eq!(
        generations.len(),
        3,
        "acknowledged rotations share a generation: {acked:?}"
    );
    let highest = &acked.iter().max().unwrap().1;
    nodes.primary_everywhere(highest, Duration::from_secs(1)).await.unwrap();

    // One rotation per node, one after another: each acknowledged key is the primary on
    // all three nodes (not merely held).
    for i in 0..3 {
        let key = nodes.admin(i).rotate().await["key_id"].as_str().unwrap().to_owned();
        let took = nodes
            .primary_everywhere(&key, Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("after node-{}'s rotation: {e}", i + 1));
        eprintln!(
            "node-{}'s rotation was primary everywhere {took:?} after its answer",
            i + 1
        );
    }
    // The watches opened before the outage answered with a newer keyring.
    for (i, w) in watches.into_iter().enumerate() {
        let (reply, _) = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap_or_else(|_| panic!("node-{}'s watch never answered after the outage", i + 1))
            .unwrap();
        let reply = reply.unwrap_or_else(|e| panic!("node-{}'s watch failed: {e}", i + 1));
        assert_eq!(reply.status, 200, "node-{}'s watch: {:?}", i + 1, reply.body);
        let epoch = reply.json()["epoch"].as_u64().unwrap();
        assert!(epoch > before[i]["epoch"].as_u64().unwrap(), "node-{}: {epoch}", i + 1);
    }
    for (i, node) in nodes.nodes.iter().enumerate() {
        health_until(&nodes, i, "ok", Duration::from_secs(3)).await;
        assert_eq!(node.server().metric("sso_store_writable"), 1.0, "{}", node.name);
    }
    eprintln!("outage {outage:?}; healed in {:?}", back.elapsed());
}

/// Node 1 SIGKILLed under an sso-client holding the three endpoints (node 1 first): the
/// process is gone, the client keeps sealing and opening, moves to another endpoint, and
/// sees a rotation made on node 2 as its primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_three_endpoints_survives_a_sigkilled_node_and_sees_a_rotation_made_on_a_survivor() {
    let _serial = SERIAL.lock().await;
    let mut nodes = PgNodes::start(pg().fresh_database(), &[250, 250, 250]).await;
    let cert = nodes.pki.client("client");
    let mut builder = sso_client::Client::builder()
        .ca(&nodes.pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .watch(true);
    for node in &nodes.nodes {
        builder = builder.endpoint(node.url());
    }
    let client = builder.build().unwrap();
    client.refresh().await.unwrap();
    let on_1 = nodes.nodes[0].url();
    assert_eq!(client.status().endpoint.as_deref(), Some(on_1.as_str()));
    let before = client.seal(b"ctx", b"sealed before the kill").await.unwrap();
    let first = client.status().primary.unwrap();

    let pid = nodes.nodes[0].kill().unwrap();
    assert!(!process_exists(pid), "node-1 (pid {pid}) is still there after SIGKILL");
    assert!(
        !accepts_connections(nodes.nodes[0].port),
        "something still answers on node-1's port"
    );
    let killed = Instant::now();

    let rotated = nodes.admin(1).rotate().await;
    let acked = Instant::now();
    let new: sso_client::KeyId = rotated["key_id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new, first);
    // The client's watch moves off the dead node and brings node 2's rotation.
    while client.status().primary != Some(new) {
        assert!(
            acked.elapsed() < Duration::from_secs(5),
            "node-2's rotation did not reach the client within 5 s: {:?}",
            client.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = acked.elapsed();
    let since_kill = killed.elapsed();
    let status = client.status();
    let endpoint = status.endpoint.clone().unwrap_or_default();
    assert!(
        endpoint == nodes.nodes[1].url() || endpoint == nodes.nodes[2].url(),
        "the client's keyring came from {endpoint:?}, not from a surviving node: {status:?}"
    );
    // It keeps working: a new envelope under the new key, and the old one opens.
    let after = client.seal(b"ctx", b"sealed after the kill").await.unwrap();
    assert_eq!(sso_proto::EnvelopeRef::parse(&after).unwrap().key_id, new);
    assert_eq!(client.open(b"ctx", &after).await.unwrap(), b"sealed after the kill");
    assert_eq!(client.open(b"ctx", &before).await.unwrap(), b"sealed before the kill");
    // A fresh client with the same list (node 1 first, dead) gets keys at once.
    let mut builder = sso_client::Client::builder()
        .ca(&nodes.pki.ca_file)
        .identity(&cert.cert, &cert.key);
    for node in &nodes.nodes {
        builder = builder.endpoint(node.url());
    }
    let fresh = builder.build().unwrap();
    let started = Instant::now();
    assert_eq!(fresh.open(b"ctx", &before).await.unwrap(), b"sealed before the kill");
    assert_ne!(fresh.status().endpoint.as_deref(), Some(on_1.as_str()));
    eprintln!(
        "node-1 killed; node-2's rotation reached the client {seen:?} after its answer ({:?} after the kill) via {endpoint}; a fresh client's first open took {:?}",
        since_kill,
        started.elapsed()
    );
}
