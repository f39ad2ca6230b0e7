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
                "a second node-1 started and served next to the first on one database: {}\n{}\nnode-1's log:\n{}\nPostgreSQL's log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                nodes.nodes[0].server().log_text(),
                pg.server_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = twin_server.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{stderr}\nnode-1's log:\n{}\nPostgreSQL's log:\n{}",
        nodes.nodes[0].server().log_text(),
        pg.server_log()
    );
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
    let taker = take_the_name_of_node_1(&pg, &database, 6);
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

/// Cuts node-1's change-feed connection (`pg_terminate_backend`, as a database failover or
/// an administrator would) while a psql session waits for the lock on its name, so that
/// session takes the name before the feed reconnects, and holds it for `hold_secs`. Returns
/// the psql thread; asserts the termination happened.
fn take_the_name_of_node_1(
    pg: &std::sync::Arc<PgCluster>,
    database: &str,
    hold_secs: u64,
) -> std::thread::JoinHandle<String> {
    // The one session advisory lock held: node-1's name, on its feed's connection.
    let held = "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted";
    let key = pg.psql(database, held).trim().to_owned();
    assert!(
        !key.is_empty() && !key.contains('\n'),
        "one advisory lock expected: {key:?}"
    );
    let taker = {
        let (pg, database) = (pg.clone(), database.to_owned());
        std::thread::spawn(move || {
            pg.psql(
                &database,
                &format!("SELECT pg_advisory_lock({key}); SELECT pg_sleep({hold_secs})"),
            )
        })
    };
    let queued = Instant::now();
    while pg
        .psql(
            database,
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
        database,
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    );
    assert_eq!(terminated.trim(), "t", "node-1's feed connection was not terminated");
    taker
}

/// Found by attack14c: cutting a running node's feed connection while a second process
/// with its name waits lets the second take the name, and both then served and
/// acknowledged rotations as one node (each with its own audit chain) for as long as both
/// ran. A node whose name stays held elsewhere for `NAME_RELEASE` (longer than PostgreSQL
/// takes to drop a dead connection of its own) stops, exit 64, naming the conflict. Failed
/// before: node-1 kept serving, degraded, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_name_stays_taken_stops_instead_of_serving_beside_the_other() {
    let pg = std::sync::Arc::new(PgCluster::start());
    let mut nodes = PgNodes::start(pg.fresh_database(), &[250]).await;
    let database = nodes.url.rsplit('/').next().unwrap().to_owned();
    let release = keystore::postgres::NAME_RELEASE;
    let taker = take_the_name_of_node_1(&pg, &database, release.as_secs() + 8);
    let cut = Instant::now();
    let server = nodes.nodes[0].server.as_mut().unwrap();
    let status = loop {
        if let Some(status) = server.exit_status() {
            break status;
        }
        assert!(
            cut.elapsed() < release + Duration::from_secs(10),
            "node-1 still serves {:?} after another process took its name: {}",
            cut.elapsed(),
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stopped_after = cut.elapsed();
    let log = server.log_text();
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(
        stopped_after >= release,
        "node-1 stopped after {stopped_after:?}, before a dead connection of its own could have been let go: {log}"
    );
    assert!(log.contains("another process holds node name \"node-1\""), "{log}");
    nodes.nodes[0].server = None;
    taker.join().unwrap();
}

/// Every process test's leak check (`TestServer`'s drop) covers nodes on PostgreSQL too: a
/// key's bytes planted in a node's log are found. Before, the check opened only SQLite
/// stores and silently passed every cluster node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leak_check_covers_nodes_on_postgresql() {
    use keystore::Store as _;
    let pg = PgCluster::start();
    let mut nodes = PgNodes::start(pg.fresh_database(), &[250]).await;
    let mut server = nodes.nodes[0].server.take().unwrap();
    server.kill();
    assert_eq!(
        server.key_material_in_logs(),
        None,
        "a leak before anything was planted"
    );
    let key = keystore::UnsealKey::key_file(&nodes.root.join("unseal.key")).unwrap();
    let url = nodes.url.clone();
    let (primary, record) = tokio::task::spawn_blocking(move || {
        let store = keystore::postgres::PgStore::open(&url, &key, "node-1").unwrap();
        let primary = store.primary().unwrap().unwrap().key_id;
        (primary, store.export_key(primary).unwrap())
    })
    .await
    .unwrap();
    let secret = record.secret.as_ref().unwrap();
    let planted = format!("\nplanted {}\n", hex::encode(secret.expose_secret()));
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&nodes.nodes[0].log)
        .unwrap();
    std::io::Write::write_all(&mut log, planted.as_bytes()).unwrap();
    let found = server.key_material_in_logs();
    // Disarm the drop's own check: the plant is this test's doing.
    std::fs::write(&nodes.nodes[0].log, "").unwrap();
    drop(server);
    assert!(
        found.as_deref().is_some_and(|f| f.contains(&primary.to_string())),
        "the planted key was not found: {found:?}"
    );
}

/// Every key a node serves, as `(key_id, state)`, sorted; and the primary.
fn key_set(ring: &serde_json::Value) -> (Vec<(String, String)>, String) {
    let mut keys: Vec<(String, String)> = ring["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys in {ring}"))
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_owned(),
                k["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    keys.sort();
    (keys, ring["primary"].as_str().unwrap_or("").to_owned())
}

/// Waits until every node serves the same key set with `primary`, for at most `limit`.
async fn converged(
    nodes: &PgNodes,
    primary: &str,
    limit: Duration,
) -> Result<(Vec<(String, String)>, Duration), String> {
    let started = Instant::now();
    loop {
        let mut sets = Vec::new();
        for i in 0..nodes.nodes.len() {
            sets.push(nodes.keyring(i).await.map(|r| key_set(&r)));
        }
        if let Some(Some(first)) = sets.first()
            && first.1 == primary
            && sets.iter().all(|s| s.as_ref() == Some(first))
        {
            return Ok((first.0.clone(), started.elapsed()));
        }
        if started.elapsed() > limit {
            return Err(format!("not converged on {primary} after {limit:?}: {sets:#?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin writes of `reply`, which must never be a 500 or an unexplained answer.
fn never_a_500(what: &str, reply: &tests::Reply) {
    assert!(
        matches!(reply.status, 200 | 409 | 503),
        "{what}: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
}

/// The generation and key id of a rotation's answer.
fn generation_and_id(rotated: &serde_json::Value) -> (u64, String) {
    (
        rotated["generation"].as_u64().unwrap(),
        rotated["key_id"].as_str().unwrap().to_owned(),
    )
}

/// `secret` must not appear in `dump` raw, as hex (either case) or as base64.
fn assert_absent(dump: &[u8], secret: &[u8], what: &str) {
    use base64::Engine;
    let find = |needle: &[u8]| dump.windows(needle.len()).any(|w| w == needle);
    assert!(!find(secret), "{what} appears raw in the database dump");
    assert!(
        !find(hex::encode(secret).as_bytes()),
        "{what} appears as hex in the dump"
    );
    assert!(
        !find(hex::encode_upper(secret).as_bytes()),
        "{what} appears as upper-case hex in the dump"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    assert!(!find(b64.as_bytes()), "{what} appears as base64 in the dump");
}

/// Issue 14 point 1 and 4 (attack14b): retire, destroy and restore race rotations on other
/// nodes. Retire an active key on node 1 while node 2 rotates; destroy that retired key on
/// nodes 2 and 3 at once; restore a backup (taken before all this, on node 2) on node 2
/// while node 1 rotates. Nothing answers 500, both destroys answer 200 (the second finds
/// it done), no acknowledged key is lost, the destroyed key stays destroyed through the
/// restore, every node converges on one key set with the last acknowledged primary, and a
/// watcher on node 3 opened before is woken. Then the database (`pg_dump`) holds none of
/// the key bytes an sso-client got, nor the destroyed key's, nor the unseal key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_destroy_and_restore_racing_rotations_on_other_nodes_converge_and_the_dump_holds_no_key() {
    use base64::Engine;
    let pg = PgCluster::start();
    let nodes = PgNodes::start(pg.fresh_database(), &[150, 150, 150]).await;
    let database = nodes.url.rsplit('/').next().unwrap().to_owned();
    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 0..2 {
        acked.push(generation_and_id(&nodes.admin(i).rotate().await));
    }
    // The key bytes as clients got them, before any destroy: the plain keyring, and an
    // sso-client's own fetch of the primary.
    let ring = nodes.keyring(0).await.unwrap();
    let mut secrets: Vec<(String, Vec<u8>)> = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_owned(),
                base64::engine::general_purpose::STANDARD
                    .decode(k["key"].as_str().unwrap())
                    .unwrap(),
            )
        })
        .collect();
    assert!(secrets.len() >= 3, "{ring}");
    let cert = nodes.pki.client("client");
    let sso = sso_client::Client::builder()
        .endpoint(nodes.nodes[2].url())
        .ca(&nodes.pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .build()
        .unwrap();
    sso.refresh().await.unwrap();
    let primary_secret = sso.primary_key().await.unwrap().expose_secret().to_vec();
    assert_eq!(
        secrets.iter().find(|(id, _)| *id == acked[1].1).unwrap().1,
        primary_secret,
        "the sso-client and the keyring disagree on the primary's bytes"
    );
    // The victim: the first rotation's key, active (not the primary) now.
    let victim = acked[0].1.clone();
    let backup = nodes
        .admin(1)
        .post(
            "/v1/admin/backup",
            &serde_json::json!({"password": "correct horse battery"}),
        )
        .await
        .unwrap();
    assert_eq!(backup.status, 200, "{:?}", backup.body);
    let backup = base64::engine::general_purpose::STANDARD.encode(&backup.body);

    // A watcher on node 3, open before any of the races.
    let epoch = ring["epoch"].as_u64().unwrap();
    let watcher = {
        let client = nodes.client(2);
        tokio::spawn(async move { client.get(&format!("/v1/keyring/watch?after={epoch}")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    // 1. Retire on node 1 while node 2 rotates.
    let admins: Vec<tests::Client> = (0..3).map(|i| nodes.admin(i)).collect();
    let empty = serde_json::json!({});
    let retire = format!("/v1/admin/keys/{victim}/retire");
    let (retired, rotated) = tokio::join!(
        admins[0].post(&retire, &empty),
        admins[1].post("/v1/admin/rotate", &empty),
    );
    let (retired, rotated) = (retired.unwrap(), rotated.unwrap());
    eprintln!("retire {} / rotate {}", retired.status, rotated.status);
    assert_eq!(retired.status, 200, "{:?}", retired.body);
    assert_eq!(retired.json()["state"], "retired");
    never_a_500("rotate during a retire", &rotated);
    if rotated.status == 200 {
        acked.push(generation_and_id(&rotated.json()));
    }
    // 2. Destroy the retired key on nodes 2 and 3 at once (and rotate on node 1 meanwhile).
    let path = format!("/v1/admin/keys/{victim}/destroy");
    let (d2, d3, rotated) = tokio::join!(
        admins[1].post(&path, &empty),
        admins[2].post(&path, &empty),
        admins[0].post("/v1/admin/rotate", &empty),
    );
    let (d2, d3, rotated) = (d2.unwrap(), d3.unwrap(), rotated.unwrap());
    eprintln!("destroy {} and {} / rotate {}", d2.status, d3.status, rotated.status);
    for d in [&d2, &d3] {
        assert_eq!(d.status, 200, "{:?}", String::from_utf8_lossy(&d.body));
        assert_eq!(d.json()["state"], "destroyed");
    }
    never_a_500("rotate during two destroys", &rotated);
    if rotated.status == 200 {
        acked.push(generation_and_id(&rotated.json()));
    }
    // 3. Restore the older backup (it holds the victim active) on node 2 while node 1
    //    rotates.
    let restore = serde_json::json!({"password": "correct horse battery", "backup": backup});
    let (restored, rotated) = tokio::join!(
        admins[1].post("/v1/admin/restore", &restore),
        admins[0].post("/v1/admin/rotate", &empty),
    );
    let (restored, rotated) = (restored.unwrap(), rotated.unwrap());
    eprintln!(
        "restore {} {} / rotate {}",
        restored.status,
        String::from_utf8_lossy(&restored.body),
        rotated.status
    );
    assert_eq!(restored.status, 200, "{:?}", String::from_utf8_lossy(&restored.body));
    assert_eq!(restored.json()["added"], 0, "{:?}", restored.body);
    never_a_500("rotate during a restore", &rotated);
    if rotated.status == 200 {
        acked.push(generation_and_id(&rotated.json()));
    }

    // Acknowledged generations are distinct; the highest is the primary everywhere, every
    // node serves the same set, every acknowledged key is in it, the victim is not.
    let mut gens: Vec<u64> = acked.iter().map(|a| a.0).collect();
    gens.sort_unstable();
    gens.dedup();
    assert_eq!(gens.len(), acked.len(), "{acked:?}");
    let highest = acked.iter().max_by_key(|a| a.0).unwrap().1.clone();
    let (set, took) = converged(&nodes, &highest, Duration::from_secs(3)).await.unwrap();
    eprintln!("converged in {took:?} on {set:?}");
    for (_, id) in acked.iter().filter(|(_, id)| *id != victim) {
        let state = set.iter().find(|(k, _)| k == id).map(|(_, s)| s.as_str());
        assert!(
            matches!(state, Some("primary" | "active")),
            "acknowledged key {id} is {state:?}: {set:?}"
        );
    }
    assert!(
        !set.iter().any(|(k, _)| *k == victim),
        "the destroyed key is served again after the restore: {set:?}"
    );
    let woke = tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .expect("node 3's watcher was never woken")
        .unwrap()
        .unwrap();
    assert_eq!(woke.status, 200, "{:?}", woke.body);
    assert!(woke.json()["epoch"].as_u64().unwrap() > epoch);

    // Point 4: the database holds no key an sso-client got, not even the destroyed one,
    // and not the unseal key.
    sso.refresh().await.unwrap();
    let now_primary = sso.primary_key().await.unwrap().expose_secret().to_vec();
    secrets.push(("primary now".into(), now_primary));
    secrets.push(("the first primary, via sso-client".into(), primary_secret));
    let dump = pg.dump(&database);
    assert!(dump.len() > 1000, "{}", String::from_utf8_lossy(&dump));
    assert!(
        String::from_utf8_lossy(&dump).contains(&victim),
        "the dump does not even name the keys: a wrong database?"
    );
    for (id, secret) in &secrets {
        assert_eq!(secret.len(), 32);
        assert_absent(&dump, secret, &format!("key {id}"));
    }
    let unseal = std::fs::read(nodes.root.join("unseal.key")).unwrap();
    assert_absent(&dump, &unseal, "the unseal key");
}

/// Issue 14 point 2 (attack14b): an administrator (or a failover, or a pooler) cuts every
/// node's connections, the change feed's (LISTEN, holding the node name) and the store's,
/// with `pg_terminate_backend` every 300 ms while one rotation after another runs on the
/// three nodes in turn. Each node must reconnect and re-claim its name by itself; a
/// rotation may fail while its connection is cut (503, or 409 when overtaken) but never
/// 500, and every acknowledged rotation must become the primary on all three nodes (the
/// feed's resync or the epoch check), checked before the next rotation starts. After the
/// storm: every node `ok`, its name held, and a rotation reaches every node in < 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_reconnect_and_every_acknowledged_rotation_is_primary_everywhere() {
    let pg = std::sync::Arc::new(PgCluster::start());
    let nodes = PgNodes::start(pg.fresh_database(), &[100, 100, 100]).await;
    let database = nodes.url.rsplit('/').next().unwrap().to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // (feed connections, other connections) terminated.
    let killer = {
        let (pg, database, stop) = (pg.clone(), database.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut feeds, mut others) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // The lock column is computed before the termination in each row.
                let out = pg.psql(
                    &database,
                    "SELECT coalesce(sum(CASE WHEN feed THEN 1 ELSE 0 END), 0) || ' ' || coalesce(sum(CASE WHEN feed THEN 0 ELSE 1 END), 0)
                     FROM (SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted) AS feed,
                                  pg_terminate_backend(a.pid) AS killed
                           FROM pg_stat_activity a
                           WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
                             AND a.backend_type = 'client backend') s WHERE killed",
                );
                let mut it = out.split_whitespace().map(|n| n.parse::<u64>().unwrap());
                feeds += it.next().unwrap();
                others += it.next().unwrap();
                std::thread::sleep(Duration::from_millis(300));
            }
            (feeds, others)
        })
    };
    let started = Instant::now();
    let (mut acks, mut refused, mut unavailable) = (0, 0, 0);
    let mut slowest = Duration::ZERO;
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let node = round % 3;
        round += 1;
        let reply = nodes
            .admin(node)
            .post("/v1/admin/rotate", &serde_json::json!({}))
            .await
            .unwrap();
        match reply.status {
            200 => {
                acks += 1;
                let key = reply.json()["key_id"].as_str().unwrap().to_owned();
                let took = nodes
                    .primary_everywhere(&key, Duration::from_secs(4))
                    .await
                    .unwrap_or_else(|e| {
                        let mut seen = String::new();
                        for n in &nodes.nodes {
                            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                            let tail: Vec<&str> = log.lines().rev().take(8).collect();
                            seen += &format!(
                                "\n{} (pid {}, alive {}): {:#?}",
                                n.name,
                                n.server().pid(),
                                tests::cluster::process_exists(n.server().pid()),
                                tail
                            );
                        }
                        panic!("round {round} (node {}): {e}{seen}", node + 1)
                    });
                slowest = slowest.max(took);
            }
            409 => refused += 1,
            503 => {
                unavailable += 1;
                assert_eq!(reply.json()["error"], "store_unavailable", "{:?}", reply.body);
            }
            other => panic!(
                "round {round}: rotate on node {} answered {other}: {}",
                node + 1,
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (feeds, others) = killer.join().unwrap();
    eprintln!(
        "{round} rotations: {acks} acknowledged, {refused} 409, {unavailable} 503; terminated {feeds} feed and {others} other connections; slowest acknowledged-to-everywhere {slowest:?}"
    );
    assert!(
        feeds > 0 && others > 0,
        "terminated {feeds} feed and {others} other connections"
    );
    assert!(acks >= 3, "only {acks} of {round} rotations acknowledged");
    // Every node heals: health ok, its name held again.
    for i in 0..3 {
        let ok = tests::eventually(Duration::from_secs(6), || async {
            nodes.admin(i).get("/v1/health").await.unwrap().json()["status"] == "ok"
                && nodes.nodes[i]
                    .server()
                    .metrics_text()
                    .contains("sso_node_name_held_elsewhere 0")
        })
        .await;
        let health = nodes.admin(i).get("/v1/health").await.unwrap().json();
        assert!(ok, "node-{} did not heal: {health}", i + 1);
    }
    let held = pg.psql(
        &database,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    );
    assert_eq!(held.trim(), "3", "each node's feed holds its name again");
    let last = nodes.admin(2).rotate().await;
    let took = nodes
        .primary_everywhere(last["key_id"].as_str().unwrap(), Duration::from_secs(1))
        .await
        .unwrap();
    eprintln!("after the storm: a rotation everywhere in {took:?}");
}

/// Issue 14 point 3 (attack14b): a backup taken on node 1 (`ssoctl backup` through node
/// 1's URL), then a rotation on node 2 and a retire and destroy of the backup's primary,
/// then the backup restored on node 3 (`ssoctl restore` through node 3's URL). The restore
/// is a merge into the shared database: it brings nothing back that was destroyed, loses
/// nothing added after the backup, and leaves every node's snapshot on the current key set
/// (a watcher on nodes 1 and 2 wakes only if the database's epoch moved, and then on the
/// same key set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_on_node_1_restored_on_node_3_keeps_every_nodes_key_set() {
    let pg = PgCluster::start();
    let nodes = PgNodes::start(pg.fresh_database(), &[100, 100, 100]).await;
    let first = nodes.admin(0).rotate().await;
    let first = first["key_id"].as_str().unwrap().to_owned();
    let dir = nodes.root.join("ssoctl");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.ssob");
    let password = dir.join("password");
    std::fs::write(&password, "correct horse battery\n").unwrap();
    std::fs::set_permissions(&password, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ssoctl = |node: usize, args: &[&str]| {
        let out = nodes
            .pki
            .ssoctl("admin", &[nodes.nodes[node].url()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let pw = password.to_str().unwrap();
    let (code, out) = ssoctl(0, &["backup", "--out", file.to_str().unwrap(), "--password-file", pw]);
    assert_eq!(code, Some(0), "ssoctl backup on node 1: {out}");
    let second = nodes.admin(1).rotate().await;
    let second = second["key_id"].as_str().unwrap().to_owned();
    for step in ["retire", "destroy"] {
        let r = nodes
            .admin(1)
            .post(&format!("/v1/admin/keys/{first}/{step}"), &serde_json::json!({}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{step}: {:?}", r.body);
    }
    let (before, _) = converged(&nodes, &second, Duration::from_secs(2)).await.unwrap();
    let epoch = nodes.keyring(0).await.unwrap()["epoch"].as_u64().unwrap();
    let watchers: Vec<_> = (0..2)
        .map(|i| {
            let client = nodes.client(i);
            tokio::spawn(async move { client.get(&format!("/v1/keyring/watch?after={epoch}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, out) = ssoctl(2, &["restore", "--in", file.to_str().unwrap(), "--password-file", pw]);
    eprintln!("ssoctl restore on node 3: {code:?} {out}");
    assert_eq!(code, Some(0), "ssoctl restore on node 3: {out}");
    let (after, took) = converged(&nodes, &second, Duration::from_secs(3)).await.unwrap();
    assert_eq!(after, before, "the restore changed the served key set");
    assert!(!after.iter().any(|(k, _)| *k == first), "{after:?}");
    let epoch_now = nodes.keyring(2).await.unwrap()["epoch"].as_u64().unwrap();
    eprintln!("after the restore: epoch {epoch} -> {epoch_now}, converged in {took:?}");
    for (i, w) in watchers.into_iter().enumerate() {
        if epoch_now > epoch {
            let woke = tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .unwrap_or_else(|_| panic!("node {}'s watcher not woken by epoch {epoch_now}", i + 1))
                .unwrap()
                .unwrap();
            assert_eq!(key_set(&woke.json()).0, before);
        } else {
            w.abort();
        }
    }
}

/// A node started while its database cannot be reached exits 69 (unavailable: starting it
/// again once the database is back helps), not 65 (damaged data), as it did before.
#[test]
fn a_node_started_while_the_database_is_down_exits_unavailable() {
    let root = tempfile::tempdir().unwrap();
    let pki = tests::Pki::new(&root.path().join("pki"));
    let setup = tests::ServerSetup::standard(&root.path().join("node"), &pki, "node-1");
    // Nothing listens on a port just bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key = root.path().join("unseal.key");
    keystore::UnsealKey::generate_key_file(&key).unwrap();
    setup.use_store(Path::new(&format!("postgresql://postgres@127.0.0.1:{port}/sso")), &key);
    let out = Command::new(bin("sso-server"))
        .arg("--config")
        .arg(&setup.config)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("database"), "{stderr}");
}
