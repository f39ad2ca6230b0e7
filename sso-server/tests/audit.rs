//! The audit log against the real `sso-server` binary: the head anchored in the store and
//! reported in status, truncation found by the server's own check and recorded at the
//! next start, a full disk leaving a gap record once writing resumes, and rotation by
//! SIGHUP continuing the chain across files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keystore::audit::{Start, verify};
use tests::{Client, Pki, ServerSetup, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_sso-server");

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (bounded) until `path` holds at least `n` lines with `op`.
fn wait_for_ops(path: &Path, op: &str, n: usize) {
    for _ in 0..400 {
        if lines(path).iter().filter(|e| e["op"] == op).count() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("fewer than {n} {op} entries in {}", path.display());
}

/// Waits (bounded) until `path` has kept its size for 300 ms.
fn wait_until_quiet(path: &Path) {
    let size = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut last = size();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(300));
        let now = size();
        if now == last {
            return;
        }
        last = now;
    }
    panic!("{} kept growing for 30 s", path.display());
}

fn store_key_and_anchor(setup: &ServerSetup) -> (keystore::AuditKey, Option<keystore::AuditAnchor>) {
    let key = keystore::UnsealKey::key_file(&setup.unseal_key).unwrap();
    let store = keystore::SealedStore::open(&setup.store, &key).unwrap();
    (store.audit_key(), store.audit_anchor().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_is_found_against_the_head_and_recorded_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    let setup = ServerSetup::standard(&root.join("node"), &pki, "node-a");
    let mut server = TestServer::start(Path::new(BIN), &setup.config, &root.join("server.log"));
    let client = Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    let admin = Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    for _ in 0..150 {
        assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
    }
    wait_for_ops(&setup.audit, "keyring.fetch", 150);

    // Status and metrics report the head; the store holds the same anchor.
    let status = admin.get("/v1/admin/status").await.unwrap().json();
    let seq = status["audit"]["seq"].as_u64().unwrap();
    assert!(seq >= 150, "{status}");
    assert!(server.metric("sso_audit_entries") >= 150.0);
    let (key, anchor) = store_key_and_anchor(&setup);
    let anchor = anchor.expect("the server anchors its head in the store");
    assert!(anchor.count >= 150);
    let report = verify(std::slice::from_ref(&setup.audit), &key, Start::Genesis, Some(&anchor)).unwrap();
    assert!(report.anchored);

    // The server's own check, asked by an admin: intact.
    let v = admin.get("/v1/admin/audit/verify").await.unwrap().json();
    assert_eq!(v["intact"], true, "{v}");

    // `head -n 100` of the live file: it still chains, but not to the server's head.
    // The audit writer is asynchronous: wait until the verify call's own entry is on
    // disk and the file has stopped growing, or a late line lands after the cut.
    wait_for_ops(&setup.audit, "admin.audit_verify", 1);
    wait_until_quiet(&setup.audit);
    let text = std::fs::read_to_string(&setup.audit).unwrap();
    let head100: String = text.lines().take(100).map(|l| format!("{l}\n")).collect();
    std::fs::write(&setup.audit, &head100).unwrap();
    assert_eq!(
        verify(std::slice::from_ref(&setup.audit), &key, Start::Genesis, None)
            .unwrap()
            .entries,
        100
    );
    let v = admin.get("/v1/admin/audit/verify").await.unwrap().json();
    assert_eq!(v["intact"], false, "{v}");
    assert_eq!(v["truncated"], true, "{v}");
    assert!(v["problem"].as_str().unwrap().contains("truncated"), "{v}");

    // A restart on the cut log (the anchor in the store is ahead of it) records the cut,
    // keyed, so it cannot be hidden by restarting.
    server.kill();
    std::fs::write(&setup.audit, &head100).unwrap();
    let (_, anchor) = store_key_and_anchor(&setup);
    let anchor = anchor.unwrap();
    let server = TestServer::start(Path::new(BIN), &setup.config, &root.join("server2.log"));
    let admin = Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    let v = admin.get("/v1/admin/audit/verify").await.unwrap().json();
    assert_eq!(v["intact"], false, "{v}");
    let problem = v["problem"].as_str().unwrap();
    assert!(
        problem.contains(&format!("found {} entries missing", anchor.count - 100)),
        "{v}"
    );
    let recorded = lines(&setup.audit);
    assert_eq!(recorded[100]["op"], "audit.truncated");
    assert_eq!(recorded[100]["seq"].as_u64().unwrap(), anchor.count + 1);
}

/// A bash wrapper that starts the server with a file-size limit (SIGXFSZ ignored, so a
/// write past the limit fails with EFBIG, as on a full disk).
fn limited_server(dir: &Path, kib: u64) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("limited-sso-server");
    std::fs::write(
        &script,
        format!("#!/bin/bash\ntrap '' XFSZ\nulimit -f {kib}\nexec {BIN} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_leaves_a_gap_record_when_writing_resumes_after_sighup_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    // Quiet logging: the server's own stderr is under the same size limit.
    let setup = ServerSetup::builder(&root.join("node"), &pki, "node-a")
        .config(|c| c.log.level = "warn".into())
        .build();
    let server = TestServer::start(&limited_server(root, 128), &setup.config, &root.join("server.log"));
    let client = Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    let admin = Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));

    // Fetch until the log stops growing (128 KiB) and failures are counted, then more.
    let mut fetched = 0u64;
    for _ in 0..20 {
        for _ in 0..100 {
            assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
            fetched += 1;
        }
        if server.metric("sso_audit_failures_total") > 0.0 {
            break;
        }
    }
    assert!(server.metric("sso_audit_failures_total") > 0.0, "the disk never filled");
    for _ in 0..50 {
        assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
        fetched += 1;
    }
    let size = std::fs::metadata(&setup.audit).unwrap().len();
    assert!(size <= 128 * 1024, "the limit did not hold: {size}");

    // The operator frees space the logrotate way: move the file, SIGHUP.
    let old = root.join("node/audit.log.1");
    std::fs::rename(&setup.audit, &old).unwrap();
    server.signal("HUP");
    for _ in 0..10 {
        assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
        fetched += 1;
    }
    wait_for_ops(&setup.audit, "audit.gap", 1);
    wait_for_ops(&setup.audit, "keyring.fetch", 10);

    let status = admin.get("/v1/admin/status").await.unwrap().json();
    let head = keystore::AuditAnchor {
        count: status["audit"]["seq"].as_u64().unwrap(),
        head: status["audit"]["head"].as_str().unwrap().to_owned(),
    };
    let (key, _) = store_key_and_anchor(&setup);
    let files = [old.clone(), setup.audit.clone()];
    let report = verify(&files, &key, Start::Genesis, Some(&head)).unwrap();
    assert!(report.anchored);
    // Usually one gap record; two when a gap record itself was the last line to fit.
    assert!(!report.gaps.is_empty());
    let written = files
        .iter()
        .flat_map(|f| lines(f))
        .filter(|e| e["op"] == "keyring.fetch")
        .count() as u64;
    let lost: u64 = report.gaps.iter().map(|g| g.lost).sum();
    assert!(lost > 0);
    // Every fetch is either in the log or counted in the gap record: nothing vanishes.
    assert_eq!(written + lost, fetched, "{:?}", report.gaps);
    assert!(
        report.gaps.iter().all(|g| g.detail.contains("write failed")),
        "{:?}",
        report.gaps
    );
    // Without the rotated file the chain does not start at entry 1; with a file missing
    // in the middle it breaks.
    assert!(verify(&files[1..], &key, Start::Genesis, None).is_err());
}

/// A graceful stop (SIGTERM) right after the last answer: every answered fetch has its
/// line in the log, and the store's anchor is the log's last line. Before issue 16's
/// change the process exited with the audit writer's queue and the anchor unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_every_answered_fetch_and_anchors_the_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    let setup = ServerSetup::standard(&root.join("node"), &pki, "node-a");
    for round in 0..3 {
        let mut server = TestServer::start(Path::new(BIN), &setup.config, &root.join(format!("server{round}.log")));
        let client = Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
        let before = lines(&setup.audit)
            .iter()
            .filter(|e| e["op"] == "keyring.fetch")
            .count();
        let fetches = 200;
        for _ in 0..fetches {
            assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
        }
        server.signal("TERM");
        let mut exited = false;
        for _ in 0..200 {
            if !server.is_running() {
                exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(exited, "the server did not stop within 10 s of SIGTERM");
        let recorded = lines(&setup.audit);
        let fetched = recorded.iter().filter(|e| e["op"] == "keyring.fetch").count();
        assert_eq!(
            fetched - before,
            fetches,
            "round {round}: answered fetches missing from the log"
        );
        let (key, anchor) = store_key_and_anchor(&setup);
        let anchor = anchor.expect("anchored");
        let last = recorded.last().unwrap();
        assert_eq!(anchor.count, last["seq"].as_u64().unwrap(), "round {round}");
        assert_eq!(anchor.head, last["mac"].as_str().unwrap(), "round {round}");
        let report = verify(std::slice::from_ref(&setup.audit), &key, Start::Genesis, Some(&anchor)).unwrap();
        assert!(report.anchored);
    }
}
