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

/// Failed before the fix (attack14): the second `node-1` started and served next to the
/// first. Now the node's change feed holds its name (a session advisory lock,
/// `keystore::postgres::NameClaim`): the second waits `NAME_RELEASE` for it (a node that
/// just died) and exits 64 without ever listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
        if started.elapsed() > keystore::postgres::NAME_RELEASE + Duration::from_secs(25) {
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
    assert!(stderr.contains("another process runs as node"), "{stderr}");
    // It never bound or announced anything, not even while it waited for the name.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("listening"), "{stdout}");
    // The first node-1 knows of no conflict.
    let metrics = nodes.nodes[0].server().metrics_text();
    assert!(metrics.contains("sso_node_name_held_elsewhere 0"), "{metrics}");
    // Once the first has been SIGKILLed, the name is free at once (its connections closed
    // with the process): a restart under that name is not refused and does not wait.
    let mut nodes = nodes;
    let killed = nodes.nodes[0].kill();
    assert!(killed.is_some(), "node-1 was not running");
    let log = twin.join("server.log");
    let again = TestServer::start(&bin("sso-server"), &setup.config, &log);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("waiting up to"),
        "the restart waited for the name: {logged}"
    );
    drop(again);
}

/// The name while a node runs: its feed connection is cut (`pg_terminate_backend`, as a
/// database failover or an administrator would) while another session waits for the
/// name's lock, so the other takes the name before the node's feed reconnects. The node
/// must say so (health `degraded` naming the node name, `sso_node_name_held_elsewhere` 1)
/// rather than run on as if it held it, and must take the name back and say `ok` once the
/// other lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_name_is_taken_while_it_runs_says_so_and_takes_it_back() {
    let pg = std::sync::Arc::new(PgCluster::start());
    let nodes = PgNodes::start(pg.fresh_database(), &[250]).await;
    let database = nodes.url.rsplit('/').next().unwrap().to_owned();
    let health = |nodes: &PgNodes| {
        let client = nodes.admin(0);
        async move { client.get("/v1/health").await.unwrap().json() }
    };
    assert_eq!(health(&nodes).await["status"], "ok");
    // The one session advisory lock held: node-1's name, on its feed's connection.
    let held = "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted";
    let key = pg.psql(&database, held).trim().to_owned();
    assert!(
        !key.is_empty() && !key.contains('\n'),
        "one advisory lock expected: {key:?}"
    );
    // Another session queues for it and holds it for 6 s once granted.
    let taker = {
        let (pg, database, key) = (pg.clone(), database.clone(), key.clone());
        std::thread::spawn(move || {
            pg.psql(
                &database,
                &format!("SELECT pg_advisory_lock({key}); SELECT pg_sleep(6)"),
            )
        })
    };
    let queued = Instant::now();
    while pg
        .psql(
            &database,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .trim()
        != "1"
    {
        assert!(
            queued.elapsed() < Duration::from_secs(10),
            "the second session never queued"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let terminated = pg.psql(
        &database,
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    );
    assert_eq!(terminated.trim(), "t", "node-1's feed connection was not terminated");
    let cut = Instant::now();
    loop {
        let h = health(&nodes).await;
        let metrics = nodes.nodes[0].server().metrics_text();
        if h["status"] == "degraded" && metrics.contains("sso_node_name_held_elsewhere 1") {
            assert!(h["problems"].to_string().contains("node name"), "{h}");
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "node-1 does not say its name is taken: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reads still work meanwhile.
    assert_eq!(nodes.client(0).get("/v1/keyring").await.unwrap().status, 200);
    taker.join().unwrap();
    let released = Instant::now();
    loop {
        let h = health(&nodes).await;
        if h["status"] == "ok"
            && nodes.nodes[0]
                .server()
                .metrics_text()
                .contains("sso_node_name_held_elsewhere 0")
        {
            break;
        }
        assert!(
            released.elapsed() < Duration::from_secs(5),
            "node-1 did not take its name back: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
