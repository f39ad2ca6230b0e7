//! Issue 14: a real sso-server on a PostgreSQL store (a throwaway cluster; no mocks). It
//! serves the keyring and rotates; with the database stopped it keeps serving reads from
//! memory, writes answer 503 `store_unavailable` and health says the store is down; once
//! the database is back a rotation succeeds within 2 s, on the same server process.

use std::path::Path;
use std::time::{Duration, Instant};

use keystore::postgres::PgStore;
use keystore::{CreateOptions, UnsealKey};
use pg_throwaway::PgCluster;
use tests::{Client, Pki, ServerSetup, TestServer, bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgresql_serves_through_an_outage_and_rotates_again_after_it() {
    let cluster = PgCluster::start();
    let url = cluster.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key_file = root.join("unseal.key");
    let (u, k) = (url.clone(), key_file.clone());
    tokio::task::spawn_blocking(move || {
        let key = UnsealKey::generate_key_file(&k).unwrap();
        PgStore::init(&u, &key, &CreateOptions::new("node-a")).unwrap();
    })
    .await
    .unwrap();

    let pki = Pki::new(&root.join("pki"));
    let setup = ServerSetup::standard(&root.join("node"), &pki, "node-a");
    setup.use_store(Path::new(&url), &key_file);
    let server = TestServer::start(&bin("sso-server"), &setup.config, &root.join("server.log"));
    let admin = Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    let client = Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    let keyring = client.get("/v1/keyring").await.unwrap();
    assert_eq!(keyring.status, 200, "{:?}", keyring.body);
    assert_eq!(keyring.json()["keys"].as_array().unwrap().len(), 1);
    let rotate = || async { admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap() };
    assert_eq!(rotate().await.status, 200);

    cluster.stop();
    let started = Instant::now();
    let reply = rotate().await;
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let body = reply.json();
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert!(body["message"].as_str().unwrap().contains("PostgreSQL"), "{body}");
    // Reads are served from memory throughout.
    let keyring = client.get("/v1/keyring").await.unwrap();
    assert_eq!(keyring.status, 200);
    assert_eq!(keyring.json()["keys"].as_array().unwrap().len(), 2);
    let health = admin.get("/v1/health").await.unwrap().json();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["problems"].to_string().contains("store"), "{health}");

    cluster.start_again();
    let back = Instant::now();
    loop {
        let reply = rotate().await;
        if reply.status == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(2),
            "no rotation within 2 s of the database's return: {:?}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keyring = client.get("/v1/keyring").await.unwrap();
    assert_eq!(keyring.json()["keys"].as_array().unwrap().len(), 3);
}
