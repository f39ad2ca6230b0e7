//! `examples/cluster/start.sh` run as a user runs it (issue 14): three nodes and a
//! PostgreSQL in one command (a throwaway one, or a new database on a running one), then
//! Ctrl-C. The script takes the debug binaries
//! the harness builds (`SSO_BIN_DIR`), not a release build, and free ports
//! (`SSO_CLUSTER_PORTS`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use pg_throwaway::PgCluster;
use tests::cluster_example::{ClusterExample, alive, group_members};
use tests::{Client, bin, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_example_serves_on_three_nodes_shares_a_rotation_and_ctrl_c_leaves_nothing_behind() {
    let bin_dir = bin("sso-server").parent().unwrap().to_path_buf();
    let ports = [free_port(), free_port(), free_port()];
    let mut example = ClusterExample::start(&bin_dir, ports, Duration::from_secs(120));
    // PGHOST names an empty directory: the probe finds no running server, says so in one
    // line and falls back to a throwaway one.
    assert!(example.database.is_none(), "{:?}", example.pg_lines);
    assert!(
        example
            .pg_lines
            .iter()
            .any(|l| l.contains("no running local PostgreSQL answers") && l.contains("throwaway")),
        "the script did not say why it uses a throwaway PostgreSQL: {:?}",
        example.pg_lines
    );
    assert!(
        example.pg_dir.is_dir() && example.work.is_dir(),
        "{:?} {:?}",
        example.pg_dir,
        example.work
    );
    assert!(
        alive(example.pg_pid),
        "PostgreSQL (pid {}) is not running",
        example.pg_pid
    );

    let client = |i: usize, name: &str| Client::new(example.https[i], &example.ca(), Some(&example.cert(name)));
    let clients: Vec<Client> = (0..3).map(|i| client(i, "client")).collect();
    let mut primaries = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let reply = c.get("/v1/keyring").await.unwrap();
        assert_eq!(reply.status, 200, "node-{}: {:?}", i + 1, reply.body);
        let ring = reply.json();
        assert_eq!(ring["keys"].as_array().unwrap().len(), 1, "node-{}: {ring}", i + 1);
        primaries.push(ring["primary"].clone());
    }
    assert!(
        primaries.iter().all(|p| *p == primaries[0]),
        "the nodes disagree: {primaries:?}"
    );

    let rotated = client(0, "admin").rotate().await;
    let key_id = rotated["key_id"].as_str().unwrap().to_owned();
    let reached = tests::eventually(Duration::from_secs(5), || async {
        clients[2].get("/v1/keyring").await.unwrap().json()["primary"] == key_id.as_str()
    })
    .await;
    assert!(
        reached,
        "node 1's rotation ({key_id}) did not reach node 3 within 5 s: {}",
        clients[2].get("/v1/keyring").await.unwrap().json()
    );

    // Ctrl-C: SIGINT to the script's whole process group, as a terminal sends it.
    let (status, stderr) = example.interrupt(Duration::from_secs(60));
    let stopped = example.until("cluster stopped", Duration::from_secs(5));
    assert!(!status.success(), "an interrupted script exits non-zero: {status:?}");
    assert!(
        !example.work.exists(),
        "{} left behind ({stopped})",
        example.work.display()
    );
    assert!(
        !example.pg_dir.exists(),
        "{} left behind ({stopped})",
        example.pg_dir.display()
    );
    for pid in example.node_pids.iter().chain([&example.pg_pid]) {
        assert!(!alive(*pid), "pid {pid} still runs after Ctrl-C; stderr: {stderr}");
    }
    let left = group_members(example.pgid());
    assert!(left.is_empty(), "processes of the script's group still run: {left:?}");
}

fn databases(pg: &PgCluster) -> BTreeSet<String> {
    pg.psql("postgres", "SELECT datname FROM pg_database")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A PostgreSQL already running (found through PGHOST, PGPORT and PGUSER, on its Unix
/// socket) is used in a NEW database that the script creates, names on stdout and drops
/// at exit; the databases that were there before are untouched. Fails on the script
/// before issue 14's probe: it started a throwaway server whatever ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_example_uses_a_running_postgresql_in_a_new_database_and_drops_it_at_exit() {
    let pg = PgCluster::start();
    let before = databases(&pg);
    let bin_dir = bin("sso-server").parent().unwrap().to_path_buf();
    let ports = [free_port(), free_port(), free_port()];
    let socket = pg.socket_dir().to_string_lossy().into_owned();
    let port = pg.port().to_string();
    let mut example = ClusterExample::start_with_env(
        &bin_dir,
        ports,
        Duration::from_secs(120),
        &[("PGHOST", &socket), ("PGPORT", &port), ("PGUSER", "postgres")],
    );
    let db = example
        .database
        .clone()
        .unwrap_or_else(|| panic!("the script did not use the running PostgreSQL: {:?}", example.pg_lines));
    let banner = example.pg_lines.last().cloned().unwrap_or_default();
    assert!(
        banner.contains(&socket) && banner.contains("role postgres") && db.starts_with("sso_cluster_"),
        "the banner names the server, the role and the database: {banner}"
    );
    assert_eq!(example.pg_dir, PathBuf::new(), "a throwaway PostgreSQL was started too");
    assert!(!before.contains(&db), "{db} existed before the script ran");

    let during = databases(&pg);
    assert!(during.contains(&db), "{db} not on the server: {during:?}");
    assert!(
        before.is_subset(&during),
        "a database went away: {before:?} -> {during:?}"
    );
    // The nodes' store is in that new database, and the three nodes are connected to it.
    let tables = pg.psql(&db, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'sso%'");
    assert_ne!(tables.trim(), "0", "no store tables in {db}");
    for old in &before {
        if old == "template0" {
            continue; // no connections allowed
        }
        let theirs = pg.psql(old, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'sso%'");
        assert_eq!(
            theirs.trim(),
            "0",
            "store tables written into the existing database {old}"
        );
    }
    let reply = Client::new(example.https[2], &example.ca(), Some(&example.cert("client")))
        .get("/v1/keyring")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "node-3: {:?}", reply.body);
    let connected = pg.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"),
    );
    assert!(
        connected.trim().parse::<u32>().unwrap_or(0) >= 3,
        "the nodes are not connected to {db}: {connected}"
    );

    let (status, stderr) = example.interrupt(Duration::from_secs(60));
    assert!(!status.success(), "an interrupted script exits non-zero: {status:?}");
    let dropped = example.until("dropped database", Duration::from_secs(5));
    assert!(dropped.contains(&db), "{dropped}; stderr: {stderr}");
    assert_eq!(
        databases(&pg),
        before,
        "the script left its database (or took another); stderr: {stderr}"
    );
    assert!(!example.work.exists(), "{} left behind", example.work.display());
    let left = group_members(example.pgid());
    assert!(left.is_empty(), "processes of the script's group still run: {left:?}");
}
