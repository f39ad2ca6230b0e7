//! `examples/cluster/start.sh` run as a user runs it (issue 14): three nodes and a
//! throwaway PostgreSQL in one command, then Ctrl-C. The script takes the debug binaries
//! the harness builds (`SSO_BIN_DIR`), not a release build, and free ports
//! (`SSO_CLUSTER_PORTS`).

use std::time::Duration;

use tests::cluster_example::{ClusterExample, alive, group_members};
use tests::{Client, bin, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_example_serves_on_three_nodes_shares_a_rotation_and_ctrl_c_leaves_nothing_behind() {
    let bin_dir = bin("sso-server").parent().unwrap().to_path_buf();
    let ports = [free_port(), free_port(), free_port()];
    let mut example = ClusterExample::start(&bin_dir, ports, Duration::from_secs(120));
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
