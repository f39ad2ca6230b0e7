//! Issue 14: three real sso-server processes on one throwaway PostgreSQL (no mocks). A
//! rotation made on one node reaches the watchers of another through the change feed.

use std::time::{Duration, Instant};

use pg_throwaway::PgCluster;
use tests::Client;
use tests::cluster::PgNodes;

/// Three nodes sharing one database (`node-1`..`node-3`), and a client and an admin
/// client of each.
struct Cluster {
    admins: Vec<Client>,
    clients: Vec<Client>,
    nodes: PgNodes,
}

async fn three_nodes(pg: &PgCluster) -> Cluster {
    three_nodes_with(pg, [250, 250, 250]).await
}

/// [`three_nodes`] with each node's staging pause (ms).
async fn three_nodes_with(pg: &PgCluster, pauses: [u64; 3]) -> Cluster {
    let nodes = PgNodes::start(pg.fresh_database(), &pauses).await;
    Cluster {
        admins: (0..3).map(|i| nodes.admin(i)).collect(),
        clients: (0..3).map(|i| nodes.client(i)).collect(),
        nodes,
    }
}

/// Long-polls `client`'s watch from `after` until its keyring's primary is `key_id`, or
/// `limit` passes; answers the keyring it saw last.
async fn watch_until_primary(client: &Client, mut after: u64, key_id: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = tokio::time::timeout(left, client.get(&format!("/v1/keyring/watch?after={after}"))).await;
        let Ok(reply) = reply else {
            return serde_json::Value::Null;
        };
        let reply = reply.unwrap();
        if reply.status == 200 {
            let ring = reply.json();
            if ring["primary"] == key_id {
                return ring;
            }
            after = ring["epoch"].as_u64().unwrap();
        }
        if Instant::now() >= deadline {
            return serde_json::Value::Null;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_node_3_sees_a_rotation_made_on_node_1_in_under_a_second() {
    let pg = PgCluster::start();
    let cluster = three_nodes(&pg).await;
    let before = cluster.clients[2].get("/v1/keyring").await.unwrap().json();
    let after = before["epoch"].as_u64().unwrap();
    // The watch is open on node 3 before the rotation starts on node 1.
    let watcher = {
        let client = cluster.nodes.client(2);
        tokio::spawn(async move {
            // The key id is not known yet: watch for any change, then for the primary.
            let first = client.get(&format!("/v1/keyring/watch?after={after}")).await.unwrap();
            (client, first, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rotated = cluster.admins[0].rotate().await;
    let acknowledged = Instant::now();
    let key_id = rotated["key_id"].as_str().unwrap().to_owned();
    let (client, first, _) = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("node 3's watch never answered: node 3 did not hear of node 1's rotation")
        .unwrap();
    assert_eq!(first.status, 200, "{:?}", first.body);
    let seen = first.json()["epoch"].as_u64().unwrap();
    assert!(seen > after, "node 3 answered epoch {seen}, not above {after}");
    let ring = if first.json()["primary"] == key_id.as_str() {
        first.json()
    } else {
        watch_until_primary(&client, seen, &key_id, Duration::from_secs(1)).await
    };
    let latency = acknowledged.elapsed();
    assert_eq!(
        ring["primary"], key_id,
        "node 3's keyring never made node 1's new key primary within 1 s of the acknowledgment"
    );
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    // Node 3 serves the same epoch as node 1 now.
    let on_1 = cluster.clients[0].get("/v1/keyring").await.unwrap().json();
    assert_eq!(ring["epoch"], on_1["epoch"], "node 3 {ring}\nnode 1 {on_1}");
    let on_3 = cluster.clients[2].get("/v1/keyring").await.unwrap().json();
    assert_eq!(on_3["primary"], key_id);
}

/// Six rotations, two per node, at once: every acknowledged rotation has its own
/// generation, none is left staged, and every node settles on the highest acknowledged key
/// as its primary (a rotation overtaken by another node's may answer 409 instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_on_three_nodes_never_share_a_generation_and_the_highest_acknowledged_wins() {
    let pg = PgCluster::start();
    let cluster = three_nodes(&pg).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for round in 0..2 {
        for node in 0..3 {
            let admin = cluster.nodes.admin(node);
            tasks.push(tokio::spawn(async move {
                let reply = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
                (round, node, reply, started.elapsed())
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        let (round, node, reply, at) = t.await.unwrap();
        eprintln!(
            "round {round} node {} -> {} at {at:?}: {}",
            node + 1,
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        if reply.status == 200 {
            let j = reply.json();
            acked.push((
                j["generation"].as_u64().unwrap(),
                j["key_id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(!acked.is_empty(), "no rotation was acknowledged");
    let mut gens: Vec<u64> = acked.iter().map(|a| a.0).collect();
    gens.sort_unstable();
    gens.dedup();
    assert_eq!(
        gens.len(),
        acked.len(),
        "two acknowledged rotations share a generation: {acked:?}"
    );
    let highest = acked.iter().max_by_key(|a| a.0).unwrap().1.clone();
    for (i, client) in cluster.clients.iter().enumerate() {
        let settled = tests::eventually(Duration::from_secs(5), || async {
            client.get("/v1/keyring").await.unwrap().json()["primary"] == highest.as_str()
        })
        .await;
        let ring = client.get("/v1/keyring").await.unwrap().json();
        assert!(
            settled,
            "node {}'s primary is not the highest acknowledged key {highest}: {ring}",
            i + 1
        );
        for (_, id) in &acked {
            let key = ring["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["key_id"] == id.as_str());
            let key = key.unwrap_or_else(|| panic!("acknowledged key {id} not served on node {}: {ring}", i + 1));
            assert_ne!(
                key["state"],
                "staged",
                "acknowledged key {id} left staged on node {}",
                i + 1
            );
        }
    }
}

/// A slow rotation on node 1 (1.5 s staging pause) and a fast one on node 2 started while
/// node 1's key is staged: if both are acknowledged, the lower generation must have been
/// the primary at some point, so it cannot be acknowledged after the higher one was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_is_never_acknowledged_for_a_key_promoted_under_a_higher_one() {
    let pg = PgCluster::start();
    let cluster = three_nodes_with(&pg, [1500, 50, 250]).await;
    let started = Instant::now();
    let slow = {
        let admin = cluster.nodes.admin(0);
        tokio::spawn(async move {
            let r = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fast = cluster.admins[1].rotate().await;
    let fast_at = started.elapsed();
    let (slow, slow_at) = slow.await.unwrap();
    eprintln!(
        "fast {fast} at {fast_at:?}; slow {} at {slow_at:?}: {}",
        slow.status,
        String::from_utf8_lossy(&slow.body)
    );
    if slow.status == 200 {
        let slow = slow.json();
        assert!(
            slow["generation"].as_u64().unwrap() > fast["generation"].as_u64().unwrap() || slow_at < fast_at,
            "node 1 acknowledged {slow} after node 2 had acknowledged the higher {fast}: node 1's key was promoted under it and never primary"
        );
    } else {
        // Refused: the answer says what happened. It was not promoted (the message once
        // began "key ... was promoted but ...", wrong for this case); another node promoted
        // a newer key, named, during this rotation's staging pause.
        assert_eq!(slow.status, 409, "{:?}", slow.body);
        let body = slow.json();
        assert_eq!(body["error"], "rotation_busy", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(!message.contains("was promoted but"), "{message}");
        for words in [
            "was not promoted",
            "another node promoted",
            fast["key_id"].as_str().unwrap(),
            "staging pause",
            "rotate again",
        ] {
            assert!(message.contains(words), "the refusal does not say {words:?}: {message}");
        }
    }
}

/// `ssoctl rotate` overtaken by another node's rotation (409 `rotation_busy`) exits 75
/// (EX_TEMPFAIL) with a hint to rotate again. Before, it exited 64 (usage) with the hint
/// "states only move forward", which is wrong for a refusal that running it again cures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssoctl_rotate_overtaken_by_another_node_exits_tempfail_with_a_retry_hint() {
    let pg = PgCluster::start();
    let nodes = PgNodes::start(pg.fresh_database(), &[2500, 50]).await;
    let slow = nodes
        .pki
        .ssoctl("admin", &[nodes.nodes[0].url()])
        .arg("rotate")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Node 1 has staged its key and waits 2.5 s; node 2 rotates past it meanwhile.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let fast = nodes
        .admin(1)
        .post("/v1/admin/rotate", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(fast.status, 200, "{:?}", String::from_utf8_lossy(&fast.body));
    let out = tokio::task::spawn_blocking(move || slow.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("was not promoted"), "not overtaken: {stderr}");
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("hint: nothing was acknowledged: run the rotation again"),
        "{stderr}"
    );
    assert!(!stderr.contains("only move forward"), "{stderr}");
    // `ssoctl status` on a cluster node names the shared database, not a missing peer
    // (it printed "peer none (standalone)" before).
    let out = nodes
        .pki
        .ssoctl("admin", &[nodes.nodes[1].url()])
        .arg("status")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("standalone"), "{stdout}");
    let database = nodes.url.rsplit_once('@').unwrap().1;
    assert!(
        stdout.contains("cluster node") && stdout.contains(database),
        "the status does not name the shared database {database}: {stdout}"
    );
}

/// A database put back to an earlier state (restored with PostgreSQL's own tools, or a
/// failover that lost commits) moves the epoch back. A watch whose `after` is the newer
/// epoch must get the keyring at once: before, it waited until the epoch passed its old
/// high point, so a watching client missed the rotations made after the restore (found by
/// reading the code, attack14b).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ahead_of_a_database_put_back_to_an_earlier_epoch_answers_at_once() {
    let pg = PgCluster::start();
    let nodes = PgNodes::start(pg.fresh_database(), &[50]).await;
    let db = nodes.url.rsplit('/').next().unwrap().to_owned();
    let client = nodes.client(0);
    let epoch = |ring: &serde_json::Value| ring["epoch"].as_u64().unwrap();
    let before = epoch(&client.get("/v1/keyring").await.unwrap().json());
    pg.psql(
        &db,
        "CREATE TABLE old_store AS SELECT * FROM sso_store; CREATE TABLE old_keys AS SELECT * FROM sso_keys",
    );
    for _ in 0..2 {
        let r = nodes
            .admin(0)
            .post("/v1/admin/rotate", &serde_json::json!({}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    let high = epoch(&client.get("/v1/keyring").await.unwrap().json());
    assert!(high > before, "{high} after {before}");
    // Put the rows back as they were, in one transaction (what a restore does).
    pg.psql(
        &db,
        "BEGIN; DELETE FROM sso_keys; INSERT INTO sso_keys SELECT * FROM old_keys; \
         DELETE FROM sso_store; INSERT INTO sso_store SELECT * FROM old_store; COMMIT",
    );
    // The node's epoch check (every 2 s) finds the epoch moved.
    let put_back = Instant::now();
    while epoch(&client.get("/v1/keyring").await.unwrap().json()) != before {
        assert!(
            put_back.elapsed() < Duration::from_secs(10),
            "the node never re-read the store"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(&format!("/v1/keyring/watch?after={high}")),
    )
    .await
    .expect("the watch ahead of the node's epoch waited")
    .unwrap();
    assert_eq!(reply.status, 200, "{:?}", String::from_utf8_lossy(&reply.body));
    assert_eq!(epoch(&reply.json()), before);
    assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());
}
