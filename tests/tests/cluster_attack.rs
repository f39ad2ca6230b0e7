//! Issue 14, attacked from outside (attack14): real sso-server nodes on a throwaway
//! PostgreSQL, no mocks. A database that hangs (its processes SIGSTOPped, the way a
//! stalled disk or a frozen VM looks) must not hang reads, and writes must still answer;
//! two nodes configured with the same node name on one database must not both run (the
//! audit anchor in the database is kept per node name).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pg_throwaway::PgCluster;
use tests::cluster::PgNodes;
use tests::{TestServer, bin};

/// The postmaster of `pg` and every process it forked (backends, checkpointer, ...).
fn postgres_pids(pg: &PgCluster) -> Vec<u32> {
    let dir = pg.psql("postgres", "SHOW data_directory");
    let pidfile = std::fs::read_to_string(Path::new(dir.trim()).join("postmaster.pid")).unwrap();
    let postmaster: u32 = pidfile.lines().next().unwrap().trim().parse().unwrap();
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

fn signal_all(pids: &[u32], signal: &str) {
    for pid in pids {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }
}

/// Resumes the stopped database even when an assertion fails first.
struct Resume(Vec<u32>);

impl Drop for Resume {
    fn drop(&mut self) {
        signal_all(&self.0, "CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_does_not_hang_reads_and_writes_answer_503_in_bounded_time() {
    let pg = PgCluster::start();
    let nodes = PgNodes::start(pg.fresh_database(), &[250, 250]).await;
    eprintln!("attack: nodes up");
    let rotated = nodes
        .admin(0)
        .post("/v1/admin/rotate", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);

    let pids = postgres_pids(&pg);
    assert!(pids.len() > 2, "found only {pids:?}");
    eprintln!("attack: stopping {pids:?}");
    signal_all(&pids, "STOP");
    let resume = Resume(pids);

    // Reads come from memory on every node, at once, even while a write waits.
    let admin = nodes.admin(0);
    let write = tokio::spawn(async move {
        let started = Instant::now();
        let reply = admin.post("/v1/admin/rotate", &serde_json::json!({})).await;
        (reply, started.elapsed())
    });
    for round in 0..3 {
        for i in 0..2 {
            let started = Instant::now();
            let ring = tokio::time::timeout(Duration::from_secs(5), nodes.client(i).get("/v1/keyring")).await;
            let ring = ring
                .unwrap_or_else(|_| panic!("round {round}: node {i}'s keyring hung with the database stopped"))
                .unwrap();
            assert_eq!(ring.status, 200, "{:?}", ring.body);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "round {round}: node {i}'s keyring took {:?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // The write answers 503 store_unavailable in bounded time (docs/cluster.md: within the
    // engine's limits, 3 s to connect and 5 s a statement, plus a margin).
    let (reply, took) = tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("a rotation with the database hung did not answer in 30 s")
        .unwrap();
    let reply = reply.unwrap();
    assert_eq!(reply.status, 503, "after {took:?}: {:?}", reply.body);
    assert_eq!(reply.json()["error"], "store_unavailable", "{:?}", reply.body);
    assert!(took < Duration::from_secs(15), "the 503 took {took:?}");
    // Health says so on the node that did not write too, once its epoch check (every
    // 2 s, bounded by the statement limit) has failed.
    let asked = Instant::now();
    loop {
        let health = nodes.admin(1).get("/v1/health").await.unwrap().json();
        if health["status"] == "degraded" {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "node-2's health with the database hung for {:?}: {health}",
            took + asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The database resumes: writes work again on the same processes.
    eprintln!("attack: write answered after {took:?}; resuming");
    drop(resume);
    let back = Instant::now();
    loop {
        let reply = nodes
            .admin(1)
            .post("/v1/admin/rotate", &serde_json::json!({}))
            .await
            .unwrap();
        if reply.status == 200 {
            let key = reply.json()["key_id"].as_str().unwrap().to_owned();
            nodes.primary_everywhere(&key, Duration::from_secs(5)).await.unwrap();
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "no rotation within 15 s of the database resuming: {:?}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// FAILS on today's code (attack14, 2026-11-29): the second `node-1` starts and serves
/// ("sso-server listening ...") next to the first; both then overwrite one audit anchor
/// row. Ignored because the fix (a session advisory lock on the node name, held while
/// the server runs; /work/wt/attack14-node-claim.patch) could not be built and verified
/// before the landing deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fails on today's code: two nodes with one name both run (attack14); fix not landed"]
async fn a_second_node_with_a_running_nodes_name_is_refused() {
    let pg = PgCluster::start();
    let nodes = PgNodes::start(pg.fresh_database(), &[250]).await;
    // A copy of node-1's config (same name, same database) with its own ports and audit
    // log, as a copied config file on a second host would be.
    let twin = nodes.root.join("twin");
    let setup = tests::ServerSetup::standard(&twin, &nodes.pki, "node-1");
    setup.use_store(Path::new(&nodes.url), &nodes.root.join("unseal.key"));
    let mut twin_server = Command::new(bin("sso-server"))
        .arg("--config")
        .arg(&setup.config)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while twin_server.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = twin_server.kill();
            let out = twin_server.wait_with_output().unwrap();
            panic!(
                "a second node-1 started and served next to the first on one database: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = twin_server.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("node-1"), "{stderr}");
    // The first node-1 is unaffected.
    assert_eq!(nodes.client(0).get("/v1/keyring").await.unwrap().status, 200);
    // Once the first has stopped, the name is free again (a restart is not refused).
    let mut nodes = nodes;
    nodes.nodes[0].kill();
    let again = TestServer::start(&bin("sso-server"), &setup.config, &twin.join("server.log"));
    drop(again);
}
