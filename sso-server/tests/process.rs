//! The real `sso-server` binary on loopback: fetch, rotate, watch, the negative matrix,
//! SIGHUP reload, graceful shutdown, config errors, and no key bytes in the logs.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use certs::LeafSpec;
use tests::{Client, OneServer, Pki, ServerSetup, TestServer};
use time::OffsetDateTime;

const BIN: &str = env!("CARGO_BIN_EXE_sso-server");

fn start(edit: impl FnOnce(&mut sso_server::Config)) -> OneServer {
    tests::one_server_with(Path::new(BIN), edit)
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        // The writer may be mid-line while we read: a partial last line is skipped.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_for_audit(path: &Path, what: impl Fn(&serde_json::Value) -> bool, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if audit_lines(path).iter().any(&what) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "no audit entry for {label}; log:\n{}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fetches_admin_rotates_and_watch_returns_at_once() {
    let f = start(|c| c.limits.watch_max_wait_ms = 500);
    let client = f.client("client");
    let admin = f.client("admin");

    let ring = client.get("/v1/keyring").await.unwrap();
    assert_eq!(ring.status, 200);
    let ring = ring.json();
    let epoch = ring["epoch"].as_u64().unwrap();
    assert_eq!(ring["keys"].as_array().unwrap().len(), 1);
    assert_eq!(ring["keys"][0]["state"], "primary");
    let key_b64 = ring["keys"][0]["key"].as_str().unwrap().to_owned();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&key_b64)
            .unwrap()
            .len(),
        32
    );

    // A watcher parked on the current epoch.
    let watcher = client.clone();
    let watch = tokio::spawn(async move {
        let r = watcher.get(&format!("/v1/keyring/watch?after={epoch}")).await.unwrap();
        (Instant::now(), r)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rotate_started = Instant::now();
    let rotated = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    let rotated = rotated.json();
    assert_eq!(rotated["replication"], "standalone");
    let new_id = rotated["key_id"].as_str().unwrap().to_owned();

    let (answered, watched) = watch.await.unwrap();
    assert_eq!(watched.status, 200);
    assert!(
        answered.duration_since(rotate_started) < Duration::from_secs(1),
        "watch took too long"
    );
    // The watcher learned of the new key (staged first, so before it was used).
    let watched = watched.json();
    assert!(
        watched["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key_id"] == new_id.as_str())
    );

    let ring = client.get("/v1/keyring").await.unwrap().json();
    assert_eq!(ring["primary"], new_id.as_str());
    let one = client.get(&format!("/v1/keys/{new_id}")).await.unwrap();
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["state"], "primary");

    // Retire the old key: 410 afterwards; unknown keys 404.
    let old = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] != new_id.as_str())
        .unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = admin
        .post(&format!("/v1/admin/keys/{old}/retire"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(client.get(&format!("/v1/keys/{old}")).await.unwrap().status, 410);
    assert_eq!(
        client
            .get(&format!("/v1/keys/{}", "ab".repeat(16)))
            .await
            .unwrap()
            .status,
        404
    );
    // The primary cannot be retired: 409.
    let r = admin
        .post(&format!("/v1/admin/keys/{new_id}/retire"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409);

    // A watch with nothing new answers 204 after its bounded wait (configured short).
    let ring = client.get("/v1/keyring").await.unwrap().json();
    let now = ring["epoch"].as_u64().unwrap();
    let r = client.get(&format!("/v1/keyring/watch?after={now}")).await.unwrap();
    assert_eq!(r.status, 204);

    let status = admin.get("/v1/admin/status").await.unwrap();
    assert_eq!(status.status, 200);
    let status = status.json();
    assert_eq!(status["node"], "node-a");
    assert!(status["audit"]["seq"].as_u64().unwrap() > 0);

    // Audit: fetches and the rotation are there, and the chain verifies.
    wait_for_audit(
        &f.setup.audit,
        |e| e["op"] == "admin.rotate" && e["outcome"] == "ok",
        "rotate",
    );
    wait_for_audit(
        &f.setup.audit,
        |e| e["op"] == "keyring.fetch" && e["identity"] == "client",
        "fetch",
    );
    f.setup.verify_audit();
    let v = f.client("admin").get("/v1/admin/audit/verify").await.unwrap().json();
    assert_eq!(v["intact"], true, "{v}");

    // No key byte in the debug-level log of this whole run.
    let log = f.server.log_text();
    assert!(
        log.contains("DEBUG") || log.contains("debug"),
        "the server was not logging at debug level"
    );
    let all_keys: Vec<Vec<u8>> = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k["key"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    for key in all_keys
        .iter()
        .chain([base64::engine::general_purpose::STANDARD.decode(&key_b64).unwrap()].iter())
    {
        for spelling in [
            base64::engine::general_purpose::STANDARD.encode(key),
            hex::encode(key),
            format!("{:?}", &key[..8]),
        ] {
            assert!(!log.contains(&spelling), "key bytes in the server log");
            assert!(
                !std::fs::read_to_string(&f.setup.audit).unwrap().contains(&spelling),
                "key bytes in the audit log"
            );
        }
    }
    let _ = f.root;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_matrix_is_refused_audited_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    let revoked = pki.client("client2");
    let crl = pki.crl("crl.pem", std::slice::from_ref(&revoked.serial), 1);
    let setup = ServerSetup::builder(&root.join("node"), &pki, "node-a")
        .tls(|t| {
            t.crls = vec![crl.clone()];
            t.handshake_timeout_ms = 1000;
        })
        .limits(|l| {
            l.max_body_bytes = 4096;
            l.header_read_timeout_ms = 1000;
            l.body_read_timeout_ms = 1000;
            l.watch_max_wait_ms = 500;
        })
        .build();
    let server = TestServer::start(Path::new(BIN), &setup.config, &root.join("server.log"));
    let addr = server.https;
    let good = Client::new(addr, &pki.ca_file, Some(&pki.client("client")));
    let admin_cert = pki.client("admin");

    // Handshake refusals: no certificate, another CA, expired, not yet valid, revoked.
    let other = Pki::new(&root.join("other"));
    let now = OffsetDateTime::now_utc();
    let mut expired = LeafSpec::client("client", 1);
    expired.not_before = now - time::Duration::days(10);
    expired.not_after = now - time::Duration::days(1);
    let mut future = LeafSpec::client("client", 1);
    future.not_before = now + time::Duration::days(1);
    future.not_after = now + time::Duration::days(10);
    let cases: Vec<(&str, Option<tests::CertFiles>)> = vec![
        ("no_certificate", None),
        ("unknown_issuer", Some(other.client("client"))),
        ("expired", Some(pki.issue_spec("expired", &expired))),
        ("not_yet_valid", Some(pki.issue_spec("future", &future))),
        ("revoked", Some(revoked)),
    ];
    for (reason, cert) in &cases {
        let client = Client::new(addr, &pki.ca_file, cert.as_ref());
        let result = client.get("/v1/keyring").await;
        assert!(result.is_err(), "{reason}: request went through: {result:?}");
        wait_for_audit(
            &setup.audit,
            |e| e["op"] == "tls.handshake" && e["detail"].as_str().unwrap_or("").starts_with(reason),
            reason,
        );
        assert!(
            server.metric(&format!("sso_handshake_failures_total{{reason=\"{reason}\"}}")) >= 1.0,
            "{reason} metric"
        );
        assert_eq!(
            good.get("/v1/keyring").await.unwrap().status,
            200,
            "server stopped serving after {reason}"
        );
    }

    // Request-level refusals.
    let r = good.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "forbidden");
    wait_for_audit(
        &setup.audit,
        |e| e["op"] == "admin.rotate" && e["outcome"] == "forbidden",
        "403",
    );

    let r = good.get("/v1/nope").await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    wait_for_audit(&setup.audit, |e| e["outcome"] == "not_found", "404");

    let admin = Client::new(addr, &pki.ca_file, Some(&admin_cert));
    let r = admin
        .request("POST", "/v1/admin/rotate", Some(b"{not json".to_vec()))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_request");
    wait_for_audit(
        &setup.audit,
        |e| e["op"] == "admin.rotate" && e["outcome"] == "bad_request",
        "400",
    );

    let r = admin
        .request("POST", "/v1/admin/backup", Some(vec![b'x'; 10_000]))
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    wait_for_audit(&setup.audit, |e| e["outcome"] == "payload_too_large", "413");

    // Slow loris, TLS level: connect and say nothing; the handshake timeout closes it.
    let start = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "silent connection was not closed: {n:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(4));
    wait_for_audit(&setup.audit, |e| e["detail"] == "timeout", "handshake timeout");

    // Slow loris, HTTP level: half the headers, then nothing; closed after the header
    // timeout.
    let start = Instant::now();
    let closed = slow_headers(addr, &pki.ca_file, &admin_cert).await;
    assert!(closed, "a connection trickling headers was not closed");
    assert!(start.elapsed() < Duration::from_secs(4), "took {:?}", start.elapsed());

    assert_eq!(good.get("/v1/keyring").await.unwrap().status, 200);
    assert!(server.metric("sso_denials_total") >= 1.0);
    setup.verify_audit();
}

/// Sends half a request's headers over mTLS and reports whether the server hangs up
/// within 5 s.
async fn slow_headers(addr: std::net::SocketAddr, ca: &Path, cert: &tests::CertFiles) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = Client::new(addr, ca, Some(cert)).connect_tls().await;
    tls.write_all(b"GET /v1/keyring HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 answer before closing is fine too.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_server_certificate_without_dropping_the_listener() {
    let f = start(|_| {});
    let serial_seen = |addr| {
        let ca = f.pki.ca_file.clone();
        let cert = f.pki.client("client");
        async move { peer_serial(addr, &ca, &cert).await }
    };
    let before = serial_seen(f.server.https).await;
    assert_eq!(before, hex::encode(&f.setup.server_cert.serial));

    // Keep connecting throughout the reload: none may fail.
    let client = f.client("client");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ok = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.get("/v1/health").await;
                assert_eq!(r.map(|r| r.status), Ok(200), "a connection failed during reload");
                ok += 1;
            }
            ok
        })
    };
    let fresh = f.pki.server("fresh");
    std::fs::copy(&fresh.cert, &f.setup.server_cert.cert).unwrap();
    std::fs::copy(&fresh.key, &f.setup.server_cert.key).unwrap();
    let pid = f.server.pid();
    f.server.signal("HUP");
    let mut after = String::new();
    for _ in 0..100 {
        after = serial_seen(f.server.https).await;
        if after != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes = prober.await.unwrap();
    assert_eq!(
        after,
        hex::encode(&fresh.serial),
        "new connections do not see the new certificate"
    );
    assert!(probes > 0);
    assert_eq!(f.server.pid(), pid);
}

async fn peer_serial(addr: std::net::SocketAddr, ca: &Path, cert: &tests::CertFiles) -> String {
    let tls = Client::new(addr, ca, Some(cert)).connect_tls().await;
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    certs::identity_from_der(&der).unwrap().serial
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let f = start(|_| {});
    let mut server = f.server;
    server.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.is_running() {
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.child.wait().unwrap().success());
}

#[test]
fn a_bad_config_is_refused_before_binding_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    setup.edit(|c| c.tls.client_ca = "/nonexistent/ca.pem".into());
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls.client_ca"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(out.stdout.is_empty(), "it printed a listening line");
}

/// Issue 15: a config whose `node` differs from the name its store was made with started
/// fine, so keys generated here carried one name and audit entries another. Refused at
/// start, naming both (failed before the fix: the server started). The log written to a
/// pipe carries no ANSI colour codes (before: every line did).
#[test]
fn a_store_made_for_another_node_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    setup.edit(|c| c.node = "node-b".into());
    let out = tests::run_until_exit(Path::new(BIN), &setup.config, std::time::Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("node-a") && stderr.contains("node-b"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    // Logs into a pipe or file carry no terminal colour codes (they did before).
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escape codes in a non-terminal log: {stderr:?}"
    );
}

#[test]
fn a_wrong_unseal_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    std::fs::remove_file(&setup.unseal_key).unwrap();
    keystore::UnsealKey::generate_key_file(&setup.unseal_key).unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong key file for this store"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_are_never_resumed() {
    // A revoked certificate must not come back on a ticket: the server issues none, so a
    // client that offers resumption still gets a full handshake every time.
    let f = start(|_| {});
    // One client configuration for every connection, so its resumption cache is offered.
    let client = f.client("client");
    for _ in 0..3 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = client.connect_tls().await;
        tls.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200"));
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_through_the_admin_api() {
    let f = start(|_| {});
    let admin = f.client("admin");
    let ring = f.client("client").get("/v1/keyring").await.unwrap().json();

    let short = admin
        .post("/v1/admin/backup", &serde_json::json!({"password": "short"}))
        .await
        .unwrap();
    assert_eq!(short.status, 400);
    let backup = admin
        .post(
            "/v1/admin/backup",
            &serde_json::json!({"password": "a long backup password", "hint": "the long one"}),
        )
        .await
        .unwrap();
    assert_eq!(backup.status, 200);
    assert_eq!(keystore::backup::read_info(&backup.body).unwrap().hint, "the long one");
    let status = admin.get("/v1/admin/status").await.unwrap().json();
    assert!(status["backup"]["last_backup_at"].is_string());
    assert_eq!(status["backup"]["not_backed_up"].as_array().unwrap().len(), 0);

    // Restore into a second, fresh server: it then serves the same key.
    let dir = tempfile::tempdir().unwrap();
    let other = ServerSetup::standard(&dir.path().join("b"), &f.pki, "node-b");
    let server_b = TestServer::start(Path::new(BIN), &other.config, &dir.path().join("b.log"));
    let admin_b = Client::new(server_b.https, &f.pki.ca_file, Some(&f.pki.client("admin")));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&backup.body);
    let wrong = admin_b
        .post(
            "/v1/admin/restore",
            &serde_json::json!({"password": "not the password", "backup": b64}),
        )
        .await
        .unwrap();
    assert_eq!(wrong.status, 403);
    assert_eq!(wrong.json()["error"], "wrong_password");
    let restored = admin_b
        .post(
            "/v1/admin/restore",
            &serde_json::json!({"password": "a long backup password", "backup": b64}),
        )
        .await
        .unwrap();
    assert_eq!(restored.status, 200, "{:?}", restored.body);
    assert_eq!(restored.json()["added"], 1);
    let ring_b = Client::new(server_b.https, &f.pki.ca_file, Some(&f.pki.client("client")))
        .get("/v1/keyring")
        .await
        .unwrap()
        .json();
    let key_a = &ring["keys"][0];
    assert!(
        ring_b["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key_id"] == key_a["key_id"] && k["key"] == key_a["key"])
    );
}

#[test]
fn readiness_is_reported_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _server = TestServer::start_with_env(
        Path::new(BIN),
        &setup.config,
        &dir.path().join("server.log"),
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("no readiness notification");
    assert_eq!(&buf[..n], b"READY=1");
}
