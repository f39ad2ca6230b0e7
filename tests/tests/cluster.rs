//! Issue 14: three real sso-server processes on one throwaway PostgreSQL (no mocks). A
//! rotation made on one node reaches the watchers of another through the change feed.

use std::path::Path;
use std::time::{Duration, Instant};

use keystore::postgres::PgStore;
use keystore::{CreateOptions, UnsealKey};
use pg_throwaway::PgCluster;
use tests::{Client, Pki, ServerSetup, TestServer, bin};

/// Three nodes sharing one database (`node-1`..`node-3`), and their clients.
struct Cluster {
    // Declared first: the servers stop before the database and the directory go.
    nodes: Vec<TestServer>,
    admins: Vec<Client>,
    clients: Vec<Client>,
    #[allow(dead_code)]
    pki: Pki,
    _dir: tempfile::TempDir,
}

async fn three_nodes(pg: &PgCluster) -> Cluster {
    let url = pg.fresh_database();
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
    let (mut admins, mut clients) = (Vec::new(), Vec::new());
    for i in 1..=3 {
        let name = format!("node-{i}");
        let setup = ServerSetup::standard(&root.join(&name), &pki, &name);
        setup.use_store(Path::new(&url), &key_file);
        let server = TestServer::start(&bin("sso-server"), &setup.config, &root.join(format!("{name}.log")));
        admins.push(Client::new(server.https, &pki.ca_file, Some(&pki.client("admin"))));
        clients.push(Client::new(server.https, &pki.ca_file, Some(&pki.client("client"))));
        nodes.push(server);
    }
    Cluster {
        nodes,
        admins,
        clients,
        pki,
        _dir: dir,
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
        let client = Client::new(
            cluster.nodes[2].https,
            &cluster.pki.ca_file,
            Some(&cluster.pki.client("client")),
        );
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
