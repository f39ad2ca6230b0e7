//! A test run ended from outside (a `timeout`, a CI job cancelled, a shell killing the
//! whole process group) must not leave a PostgreSQL running: the watchdog has to outlive
//! a kill aimed at the test's process group, and then stop the cluster.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run in a child process: starts a cluster, says where it is, then waits to be killed.
#[test]
fn child_holding_a_cluster() {
    if std::env::var_os("PG_THROWAWAY_CHILD").is_none() {
        return;
    }
    let cluster = pg_throwaway::PgCluster::start();
    println!("CLUSTER {} {}", cluster.port(), cluster.socket_dir().display());
    std::thread::sleep(Duration::from_secs(120));
    drop(cluster);
}

#[test]
fn a_cluster_is_stopped_when_its_test_process_group_is_killed() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_a_cluster", "--nocapture", "--test-threads=1"])
        .env("PG_THROWAWAY_CHILD", "1")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pgid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (port, socket_dir) = loop {
        let line = lines
            .next()
            .expect("the child ended before starting its cluster")
            .unwrap();
        if let Some((_, rest)) = line.split_once("CLUSTER ") {
            let (port, dir) = rest.split_once(' ').unwrap();
            break (port.parse::<u16>().unwrap(), PathBuf::from(dir));
        }
    };
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the child's cluster should be accepting connections before the kill"
    );
    // SIGKILL to the whole group, as `kill -KILL -- -PGID` does.
    let killed = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(killed.success(), "the group kill itself failed");
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listening = TcpStream::connect(("127.0.0.1", port)).is_ok();
        if !listening && !socket_dir.exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "20 s after its test process group was killed, the cluster on port {port} still {} and {} still exists",
            if listening { "accepts connections" } else { "is down" },
            socket_dir.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
