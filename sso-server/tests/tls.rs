//! The TLS trust boundary over time, against the real `sso-server` binary: revocation and
//! expiry end live connections, connections have a maximum age that clients ride through,
//! audit entries name the certificate, and CRL/TLS files can't take the service down
//! (reloads are all or nothing, CRL signatures are checked, two-tier PKIs work, SIGHUP
//! re-reads `[tls]`, everything is checked before the port is bound, key files are private).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use certs::{CertificateAuthority, LeafSpec};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tests::{CertFiles, Client, OneServer, Pki, ServerSetup, TestServer};
use time::OffsetDateTime;

const BIN: &str = env!("CARGO_BIN_EXE_sso-server");

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_for_audit(path: &Path, what: impl Fn(&serde_json::Value) -> bool, label: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(e) = audit_lines(path).into_iter().find(&what) {
            return e;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "no audit entry for {label}; log:\n{}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

fn sha256_of(cert: &CertFiles) -> String {
    let pem = std::fs::read_to_string(&cert.cert).unwrap();
    certs::sha256_hex(&certs::pem_to_der(&pem).unwrap())
}

/// Waits for `needle` to appear in the server log `count` times in all.
fn wait_for_log(server: &TestServer, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.log_text().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged {count} times; log:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A watch long-poll held open on one keep-alive connection: a keyring fetch first (the
/// connection is live and served), then a watch on the same connection.
struct LiveWatch {
    answer: tokio::task::JoinHandle<Result<u16, String>>,
}

impl LiveWatch {
    async fn open(client: &Client, server: &TestServer) -> Self {
        let tls = client.connect_tls().await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let get = |path: String| {
            hyper::Request::get(path)
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let resp = send.send_request(get("/v1/keyring".into())).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let epoch = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["epoch"]
            .as_u64()
            .unwrap();
        // The connection must be ready for its next request (the first one fully done).
        send.ready().await.unwrap();
        let watch = send.send_request(get(format!("/v1/keyring/watch?after={epoch}")));
        let answer = tokio::spawn(async move {
            let resp = watch.await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok(status)
        });
        // Let the watch reach the server before the test acts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if answer.is_finished() {
            panic!(
                "the watch answered at once: {:?}; server log:\n{}",
                answer.await,
                server.log_text()
            );
        }
        Self { answer }
    }
}

fn write_crl(pki: &Pki, path: &Path, serials: &[Vec<u8>], number: u64) {
    std::fs::write(path, pki.ca.crl(serials, number, 7).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_loses_its_live_connection_and_watch_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let revoked = pki.client("client2");
    let good = pki.client("client");
    let crl = dir.path().join("pki/crl.pem");
    write_crl(&pki, &crl, &[], 1);
    let setup = ServerSetup::builder(&dir.path().join("node"), &pki, "node-a")
        .tls(|t| t.crls = vec![crl.clone()])
        .limits(|l| l.watch_max_wait_ms = 20000)
        .build();
    let server = TestServer::start(Path::new(BIN), &setup.config, &dir.path().join("server.log"));
    let doomed = LiveWatch::open(&Client::new(server.https, &pki.ca_file, Some(&revoked)), &server).await;
    let kept = LiveWatch::open(&Client::new(server.https, &pki.ca_file, Some(&good)), &server).await;

    write_crl(&pki, &crl, std::slice::from_ref(&revoked.serial), 2);
    let sent = Instant::now();
    server.signal("HUP");
    let ended = tokio::time::timeout(Duration::from_secs(5), doomed.answer)
        .await
        .expect("the revoked client's watch was still open 5 s after the reload")
        .unwrap();
    let took = sent.elapsed();
    assert!(ended.is_err(), "the revoked client's watch was answered: {ended:?}");
    assert!(took < Duration::from_secs(1), "closing took {took:?}");

    // The other client's watch is untouched and still delivers the next rotation.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!kept.answer.is_finished(), "a valid client's watch ended too");
    let admin = Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    let r = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let kept = tokio::time::timeout(Duration::from_secs(5), kept.answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept, Ok(200));

    let entry = wait_for_audit(
        &setup.audit,
        |e| e["op"] == "connection.closed" && e["outcome"] == "revoked",
        "connection.closed revoked",
    );
    assert_eq!(entry["cert_serial"], hex::encode(&revoked.serial));
    assert_eq!(entry["detail"], "revoked");
    assert_eq!(server.metric("sso_connections_closed_total{reason=\"revoked\"}"), 1.0);
    assert!(
        Client::new(server.https, &pki.ca_file, Some(&revoked))
            .get("/v1/keyring")
            .await
            .is_err(),
        "a new connection with the revoked certificate was served"
    );
    wait_for_log(&server, "SIGHUP: reloaded", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_while_connected_stops_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut spec = LeafSpec::client("client", 1);
    spec.not_after = now + time::Duration::seconds(4);
    let short = pki.issue_spec("short", &spec);
    let expiry = std::time::SystemTime::from(spec.not_after);
    let setup = ServerSetup::builder(&dir.path().join("node"), &pki, "node-a")
        .limits(|l| l.watch_max_wait_ms = 20000)
        .build();
    let server = TestServer::start(Path::new(BIN), &setup.config, &dir.path().join("server.log"));
    let watch = LiveWatch::open(&Client::new(server.https, &pki.ca_file, Some(&short)), &server).await;
    let ended = tokio::time::timeout(Duration::from_secs(15), watch.answer)
        .await
        .expect("the connection outlived its certificate by 10 s")
        .unwrap();
    assert!(ended.is_err(), "the watch was answered: {ended:?}");
    let now = std::time::SystemTime::now();
    // Not before the certificate expired (second granularity), and well within 60 s after.
    assert!(now + Duration::from_secs(1) >= expiry, "cut before expiry");
    assert!(
        now.duration_since(expiry).unwrap_or_default() < Duration::from_secs(5),
        "cut {:?} after expiry",
        now.duration_since(expiry)
    );
    let entry = wait_for_audit(
        &setup.audit,
        |e| e["op"] == "connection.closed" && e["outcome"] == "expired",
        "connection.closed expired",
    );
    assert_eq!(entry["cert_serial"], hex::encode(&short.serial));
    assert_eq!(server.metric("sso_connections_closed_total{reason=\"expired\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_tell_apart_certificates_with_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    let server = TestServer::start(Path::new(BIN), &setup.config, &dir.path().join("server.log"));
    let first = pki.issue_spec("first", &LeafSpec::client("client", 1));
    let second = pki.issue_spec("second", &LeafSpec::client("client", 1));
    for cert in [&first, &second] {
        let r = Client::new(server.https, &pki.ca_file, Some(cert))
            .get("/v1/keyring")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    for cert in [&first, &second] {
        let serial = hex::encode(&cert.serial);
        let entry = wait_for_audit(
            &setup.audit,
            |e| e["op"] == "keyring.fetch" && e["cert_serial"] == serial.as_str(),
            "keyring.fetch by serial",
        );
        assert_eq!(entry["identity"], "client");
        assert_eq!(entry["cert_sha256"], sha256_of(cert));
    }
    assert_ne!(sha256_of(&first), sha256_of(&second));
    drop(server);
    // The new fields are inside the keyed chain: the log still verifies.
    setup.verify_audit();
}

/// A server whose connections live one second, with watches shorter than that.
fn short_lived_connections() -> OneServer {
    tests::one_server_with(Path::new(BIN), |c| {
        c.limits.max_connection_age_ms = 1000;
        c.limits.watch_max_wait_ms = 700;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_end_gracefully_at_their_maximum_age_and_clients_never_notice() {
    let OneServer {
        dir: _dir,
        pki,
        setup,
        server,
        ..
    } = short_lived_connections();
    let cert = pki.client("client");
    let client = sso_client::Client::builder()
        .endpoint(format!("https://localhost:{}", server.https.port()))
        .ca(&pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .build()
        .unwrap();
    client.refresh().await.unwrap();
    let admin = Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    let (mut calls, mut failures) = (0u32, Vec::new());
    let started = Instant::now();
    let mut rotations = 0;
    while started.elapsed() < Duration::from_secs(6) {
        match client.refresh().await {
            Ok(()) => {}
            Err(e) => failures.push(e.to_string()),
        }
        calls += 1;
        if calls % 40 == 0 {
            // A rotation reaches the client's watch, whatever connection it is on now.
            let r = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
            assert_eq!(r.status, 200);
            rotations += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = server.metric("sso_connections_closed_total{reason=\"max_age\"}");
    assert!(ended >= 4.0, "only {ended} connections reached their maximum age");
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {failures:?}",
        failures.len()
    );
    assert!(rotations >= 2);
    // The client's requests came over several connections (distinct source ports).
    let ports: std::collections::BTreeSet<String> = audit_lines(&setup.audit)
        .iter()
        .filter(|e| e["op"] == "keyring.fetch" && e["identity"] == "client")
        .filter_map(|e| e["peer"].as_str().map(str::to_owned))
        .collect();
    assert!(ports.len() >= 4, "requests came over {} connections", ports.len());
    let status = client.status();
    assert!(status.last_error.is_none(), "{:?}", status.last_error);
}

#[test]
fn the_agent_rides_through_maximum_connection_age() {
    let OneServer { dir, pki, server, .. } = short_lived_connections();
    let config = dir.path().join("agent.toml");
    let agent_config = pki.agent_config(
        "client",
        format!("https://localhost:{}", server.https.port()),
        dir.path().join("agent.sock"),
    );
    std::fs::write(&config, agent_config.to_toml()).unwrap();
    let agent = tests::TestAgent::start(&config, &dir.path().join("agent.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent_status(&agent.socket).status != "fresh" {
        assert!(Instant::now() < deadline, "the agent never fetched the keyring");
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let admin = Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    let mut seen_primaries = std::collections::BTreeSet::new();
    let started = Instant::now();
    let mut rotations = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let status = agent_status(&agent.socket);
        assert_eq!(status.status, "fresh", "{status:?}");
        assert!(status.last_error.is_none(), "{status:?}");
        let r = runtime
            .block_on(admin.post("/v1/admin/rotate", &serde_json::json!({})))
            .unwrap();
        assert_eq!(r.status, 200);
        rotations += 1;
        let new_primary = r.json()["key_id"].as_str().unwrap().to_owned();
        // Each rotation reaches the agent by its watch, across connection ends.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let status = agent_status(&agent.socket);
            if status.primary.as_deref() == Some(new_primary.as_str()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rotation {rotations} did not reach the agent: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        seen_primaries.insert(new_primary);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(rotations >= 4);
    assert_eq!(seen_primaries.len(), rotations);
    assert!(server.metric("sso_connections_closed_total{reason=\"max_age\"}") >= 3.0);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && !l.contains("hardening"))
        .collect();
    assert!(complaints.is_empty(), "agent log:\n{log}");
}

/// The agent's `GET /v1/status`, read as its wire type.
fn agent_status(socket: &Path) -> sso_proto::wire::agent::AgentStatus {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Starts a server whose `[tls]` section lists `crl`, with a valid client and an admin.
struct CrlFixture {
    /// First, so the server stops (and its logs are checked for key material) before
    /// the directory goes.
    server: TestServer,
    root: PathBuf,
    pki: Pki,
    crl: PathBuf,
    setup: ServerSetup,
    _dir: tempfile::TempDir,
}

fn crl_fixture() -> CrlFixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::new(&root.join("pki"));
    let crl = root.join("pki/crl.pem");
    write_crl(&pki, &crl, &[], 1);
    let setup = ServerSetup::builder(&root.join("node"), &pki, "node-a")
        .tls(|t| t.crls = vec![crl.clone()])
        .build();
    let server = TestServer::start(Path::new(BIN), &setup.config, &root.join("server.log"));
    CrlFixture {
        _dir: dir,
        root,
        pki,
        crl,
        setup,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_that_does_not_verify_is_refused_whole_and_everyone_keeps_working() {
    let f = crl_fixture();
    let client = Client::new(f.server.https, &f.pki.ca_file, Some(&f.pki.client("client")));
    let admin = Client::new(f.server.https, &f.pki.ca_file, Some(&f.pki.client("admin")));
    // A live connection of the valid client must survive the refused reloads too.
    let live = LiveWatch::open(&client, &f.server).await;
    let original = std::fs::read(&f.crl).unwrap();

    let other_ca = CertificateAuthority::generate("another CA", 30).unwrap();
    // Same issuer name as the real CA, another key: a forgery by name.
    let same_name = CertificateAuthority::generate(&format!("test CA {}", f.pki.dir.display()), 30).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "another CA",
            other_ca.crl(&[], 5, 7).unwrap().into_bytes(),
            "not a CA in tls.client_ca",
        ),
        (
            "same name, another key",
            same_name.crl(&[], 5, 7).unwrap().into_bytes(),
            "signature does not verify",
        ),
        (
            "garbage",
            b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n".to_vec(),
            "CRL",
        ),
        ("truncated DER", original[..original.len() / 2].to_vec(), "crl.pem"),
    ];
    for (i, (label, bytes, says)) in cases.iter().enumerate() {
        std::fs::write(&f.crl, bytes).unwrap();
        f.server.signal("HUP");
        wait_for_log(&f.server, "SIGHUP: reload refused", i + 1);
        let log = f.server.log_text();
        let line = log.lines().rfind(|l| l.contains("reload refused")).unwrap();
        assert!(line.contains(says), "{label}: {line}");
        assert!(
            !log.contains("SIGHUP: reloaded"),
            "{label}: the log claims a reload:\n{log}"
        );
        assert_eq!(
            f.server.metric("sso_tls_reload_failures_total"),
            (i + 1) as f64,
            "{label}"
        );
        assert_eq!(f.server.metric("sso_tls_reloads_total"), 0.0);
        for (who, c) in [("client", &client), ("admin", &admin)] {
            let r = c.get("/v1/keyring").await;
            assert_eq!(r.map(|r| r.status), Ok(200), "{label}: {who} locked out");
        }
        assert!(!live.answer.is_finished(), "{label}: a live connection was dropped");
    }
    // Put the good CRL back: the next reload applies.
    std::fs::write(&f.crl, &original).unwrap();
    f.server.signal("HUP");
    wait_for_log(&f.server, "SIGHUP: reloaded", 1);
    assert_eq!(f.server.metric("sso_tls_reloads_total"), 1.0);
    let _ = (&f.root, &f.setup);
}

#[test]
fn a_bad_crl_at_start_is_refused_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let crl = dir.path().join("pki/crl.pem");
    let other_ca = CertificateAuthority::generate("another CA", 30).unwrap();
    std::fs::write(&crl, other_ca.crl(&[], 1, 7).unwrap()).unwrap();
    let setup = ServerSetup::builder(&dir.path().join("node"), &pki, "node-a")
        .tls(|t| t.crls = vec![crl.clone()])
        .build();
    let out = refused_start(&setup.config);
    assert!(out.contains("not a CA in tls.client_ca"), "{out}");
}

/// Runs the server expecting a refusal: exit 64, an `error:` and a `hint:` on stderr,
/// nothing on stdout (no listening line), no readiness. Returns stderr.
fn refused_start(config: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a server that starts anyway is killed, and the test fails.
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the server started and kept running: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "it printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(stderr.contains("error:") && stderr.contains("hint:"), "{stderr}");
    let mut buf = [0u8; 64];
    assert!(socket.recv(&mut buf).is_err(), "it sent a readiness notification");
    stderr
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    let other = pki.server("other");
    std::fs::copy(&other.key, &setup.server_cert.key).unwrap();
    let stderr = refused_start(&setup.config);
    assert!(stderr.contains("does not belong to the certificate"), "{stderr}");
}

#[test]
fn a_tls_key_readable_by_others_is_refused_with_a_chmod_hint() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&setup.server_cert.key, std::fs::Permissions::from_mode(mode)).unwrap();
        let stderr = refused_start(&setup.config);
        assert!(stderr.contains("chmod 600"), "{mode:o}: {stderr}");
        assert!(stderr.contains(&format!("{mode:03o}")), "{mode:o}: {stderr}");
    }
    std::fs::set_permissions(&setup.server_cert.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _server = TestServer::start(Path::new(BIN), &setup.config, &dir.path().join("server.log"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_tls_section_and_applies_a_new_crl() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let revoked = pki.client("client2");
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    let server = TestServer::start(Path::new(BIN), &setup.config, &dir.path().join("server.log"));
    let c2 = Client::new(server.https, &pki.ca_file, Some(&revoked));
    assert_eq!(c2.get("/v1/keyring").await.unwrap().status, 200);
    let live = LiveWatch::open(&c2, &server).await;

    // Add a CRL to the config file, as an operator would, and send SIGHUP: no restart.
    let crl = pki.crl("crl.pem", std::slice::from_ref(&revoked.serial), 1);
    setup.edit(|c| c.tls.crls = vec![crl.clone()]);
    let pid = server.pid();
    server.signal("HUP");
    wait_for_log(&server, "SIGHUP: reloaded", 1);
    assert_eq!(server.pid(), pid);
    assert!(
        c2.get("/v1/keyring").await.is_err(),
        "the newly listed CRL is not applied"
    );
    let ended = tokio::time::timeout(Duration::from_secs(2), live.answer)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
    let good = Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    assert_eq!(good.get("/v1/keyring").await.unwrap().status, 200);
    assert!(server.metric("sso_crl_next_update_seconds") > 6.0 * 86_400.0);

    // A config file that no longer parses is a refused reload, not a crash.
    std::fs::write(&setup.config, "node = [broken").unwrap();
    server.signal("HUP");
    wait_for_log(&server, "SIGHUP: reload refused", 1);
    assert_eq!(good.get("/v1/keyring").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_crl_is_reported_by_metric_and_warning() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let now = OffsetDateTime::now_utc();
    let crl = dir.path().join("pki/crl.pem");
    std::fs::write(
        &crl,
        pki.ca
            .crl_at(&[], 1, now - time::Duration::days(3), now - time::Duration::hours(2))
            .unwrap(),
    )
    .unwrap();
    let setup = ServerSetup::builder(&dir.path().join("node"), &pki, "node-a")
        .tls(|t| t.crls = vec![crl.clone()])
        .build();
    let server = TestServer::start(Path::new(BIN), &setup.config, &dir.path().join("server.log"));
    wait_for_log(&server, "CRL is past its nextUpdate", 1);
    let next = server.metric("sso_crl_next_update_seconds");
    assert!((-7300.0..-7100.0).contains(&next), "{next}");
    let age = server.metric("sso_crl_age_seconds");
    assert!((3.0 * 86_400.0 - 100.0..3.0 * 86_400.0 + 100.0).contains(&age), "{age}");
    // Stale is a warning, not a lockout.
    let good = Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    assert_eq!(good.get("/v1/keyring").await.unwrap().status, 200);
}

/// A root CA, an issuing CA under it, and clients of the issuing CA whose certificate files
/// carry the chain (leaf, then issuing CA), as clients of a two-tier PKI send it.
struct TwoTier {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
    issuing: CertificateAuthority,
    issuing_file: PathBuf,
}

impl TwoTier {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let pki = Pki::new(&root.join("pki"));
        let issuing = pki.ca.intermediate("issuing CA", 30).unwrap();
        let issuing_file = root.join("pki/issuing.pem");
        std::fs::write(&issuing_file, issuing.cert_pem()).unwrap();
        Self {
            _dir: dir,
            root,
            pki,
            issuing,
            issuing_file,
        }
    }

    fn client(&self, name: &str) -> CertFiles {
        let leaf = self.issuing.issue(&LeafSpec::client(name, 30)).unwrap();
        let cert = self.root.join(format!("pki/{name}-2tier.pem"));
        let key = self.root.join(format!("pki/{name}-2tier-key.pem"));
        std::fs::write(&cert, format!("{}{}", leaf.cert_pem, self.issuing.cert_pem())).unwrap();
        keystore::fsutil::write_private_atomic(&key, leaf.key_pem.as_bytes()).unwrap();
        CertFiles {
            cert,
            key,
            serial: leaf.serial,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_tier_pki_with_only_the_issuing_cas_crl_serves_its_clients() {
    let t = TwoTier::new();
    let good = t.client("client");
    let revoked = t.client("client2");
    let crl = t.root.join("pki/issuing-crl.pem");
    std::fs::write(
        &crl,
        t.issuing.crl(std::slice::from_ref(&revoked.serial), 1, 7).unwrap(),
    )
    .unwrap();
    let issuers = t.issuing_file.clone();
    let setup = ServerSetup::builder(&t.root.join("node"), &t.pki, "node-a")
        .tls(move |c| {
            c.crls = vec![crl];
            c.crl_issuers = Some(issuers);
        })
        .build();
    let server = TestServer::start(Path::new(BIN), &setup.config, &t.root.join("server.log"));
    let r = Client::new(server.https, &t.pki.ca_file, Some(&good))
        .get("/v1/keyring")
        .await;
    assert_eq!(
        r.map(|r| r.status),
        Ok(200),
        "end-entity checking locked out a valid client"
    );
    assert!(
        Client::new(server.https, &t.pki.ca_file, Some(&revoked))
            .get("/v1/keyring")
            .await
            .is_err(),
        "the issuing CA's CRL was not applied"
    );
    drop(server);

    // Full-chain checking, as documented: every CA below the root needs a CRL, so the
    // issuing CA's certificate has unknown status until the root's CRL is listed too.
    setup.edit(|c| c.tls.revocation = sso_server::config::Revocation::FullChain);
    let server = TestServer::start(Path::new(BIN), &setup.config, &t.root.join("server2.log"));
    let c = Client::new(server.https, &t.pki.ca_file, Some(&good));
    assert!(c.get("/v1/keyring").await.is_err(), "full chain without the root's CRL");
    let root_crl = t.pki.crl("root-crl.pem", &[], 1);
    setup.edit(|c| c.tls.crls.push(root_crl));
    server.signal("HUP");
    wait_for_log(&server, "SIGHUP: reloaded", 1);
    assert_eq!(c.get("/v1/keyring").await.map(|r| r.status), Ok(200));
    assert!(
        Client::new(server.https, &t.pki.ca_file, Some(&revoked))
            .get("/v1/keyring")
            .await
            .is_err()
    );
}

#[test]
fn an_issuing_ca_not_signed_by_a_client_ca_is_refused() {
    let t = TwoTier::new();
    let stranger = CertificateAuthority::generate("stranger root", 30)
        .unwrap()
        .intermediate("issuing CA", 30)
        .unwrap();
    let path = t.root.join("pki/stranger.pem");
    std::fs::write(&path, stranger.cert_pem()).unwrap();
    let crl = t.root.join("pki/stranger-crl.pem");
    std::fs::write(&crl, stranger.crl(&[], 1, 7).unwrap()).unwrap();
    let setup = ServerSetup::builder(&t.root.join("node"), &t.pki, "node-a")
        .tls(move |c| {
            c.crls = vec![crl];
            c.crl_issuers = Some(path);
        })
        .build();
    let stderr = refused_start(&setup.config);
    assert!(stderr.contains("not signed by a CA in tls.client_ca"), "{stderr}");
}
