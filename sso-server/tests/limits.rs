//! Nobody can hold every connection slot (issue 10 §2), against the real binary: silent
//! and idle connections are closed on every protocol, an identity with no role keeps a
//! handful of connections, watches are capped per identity and in total, and a client is
//! served quickly while thousands of idle connections are held.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tests::{CertFiles, Client, OneServer, Pki, TestServer};
use tokio::io::AsyncReadExt;

const BIN: &str = env!("CARGO_BIN_EXE_sso-server");

fn start(edit: impl FnOnce(&mut sso_server::Config)) -> OneServer {
    tests::one_server_with(Path::new(BIN), edit)
}

fn tls_config(pki: &Pki, cert: &CertFiles, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut config = tests::tls_config(&pki.ca_file, Some(cert));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection with the handshake done and nothing sent, or `None` if the server did
/// not complete the handshake within `within`.
async fn connect_tls(
    addr: std::net::SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    within: Duration,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .ok()
    };
    tokio::time::timeout(within, connect).await.ok().flatten()
}

/// Waits for the server to close `tls`; `Some(elapsed)` if it did within `within`.
async fn closed_within(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within.saturating_sub(start.elapsed()), tls.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            // HTTP/2 sends its SETTINGS (and a GOAWAY) before closing.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_connection_is_closed_after_the_header_deadline_on_every_protocol() {
    // Only the existing header timeout is set: the deadline after the handshake follows it.
    let f = start(|c| c.limits.header_read_timeout_ms = 1000);
    let cert = f.pki.client("client");
    for (label, alpn) in [
        ("http/1.1", &[b"http/1.1".as_slice()][..]),
        ("h2", &[b"h2".as_slice()][..]),
        ("no ALPN (protocol detection)", &[][..]),
    ] {
        let config = tls_config(&f.pki, &cert, alpn);
        let mut tls = connect_tls(f.server.https, &config, Duration::from_secs(5))
            .await
            .expect("handshake");
        let closed = closed_within(&mut tls, Duration::from_secs(6)).await;
        let elapsed = closed.unwrap_or_else(|| panic!("{label}: a silent connection was still open after 6 s"));
        assert!(
            elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(4),
            "{label}: closed after {elapsed:?}, want about 1 s"
        );
    }
    assert!(
        f.server
            .metric("sso_connections_closed_total{reason=\"first_request_timeout\"}")
            >= 2.0,
        "{}",
        f.server.metrics_text()
    );
    // The server still serves.
    let client = Client::new(f.server.https, &f.pki.ca_file, Some(&cert));
    assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_with_goaway_after_the_idle_limit() {
    let f = start(|c| c.limits.idle_timeout_ms = 1000);
    let config = tls_config(&f.pki, &f.pki.client("client"), &[b"h2"]);
    let tls = connect_tls(f.server.https, &config, Duration::from_secs(5))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get("https://localhost/v1/keyring")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    // The server sends GOAWAY and closes; the client's connection task ends cleanly.
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "idle HTTP/2 connection not closed gracefully: {ended:?}; {}",
        f.server.metrics_text()
    );
    let elapsed = idle_from.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}"
    );
    assert!(f.server.metric("sso_connections_closed_total{reason=\"idle_timeout\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_with_no_role_cannot_hold_the_connection_slots() {
    // A small connection cap, so the attack is quick; the cap for role-less identities is
    // the default (4).
    let f = start(|c| c.limits.max_connections = 256);
    let addr = f.server.https;
    let stranger = tls_config(&f.pki, &f.pki.client("stranger"), &[b"http/1.1"]);
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Some(tls) = connect_tls(addr, &stranger, Duration::from_millis(500)).await {
            held.push(tls);
        }
    }
    assert!(held.len() >= 250, "only {} attack connections completed", held.len());

    // A legitimate client is served at once.
    let client = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client")));
    let start = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(3), client.get("/v1/keyring")).await;
    assert!(
        matches!(&reply, Ok(Ok(r)) if r.status == 200),
        "legitimate client locked out: {reply:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());

    // The server keeps at most a handful of the stranger's connections (refused ones get
    // half a second to ask and be answered 429).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut still_open = 0;
    for tls in &mut held {
        if closed_within(tls, Duration::from_millis(20)).await.is_none() {
            still_open += 1;
        }
    }
    assert!(
        still_open <= 4,
        "{still_open} connections of a role-less identity still open"
    );
    let refused = f.server.metric("sso_connection_refusals_total{reason=\"no_role\"}");
    assert!(refused >= 246.0, "refusals counted: {refused}");

    // A refused connection that asks gets a quick 429, not silence.
    let refused_client = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("stranger")));
    let start = Instant::now();
    let r = refused_client.get("/v1/health").await.unwrap();
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.json()["error"], "too_many_connections");
    assert!(start.elapsed() < Duration::from_secs(1));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pending_handshake_cap_new_connections_push_out_the_oldest() {
    let f = start(|c| {
        c.tls.handshake_timeout_ms = 60000;
        c.limits.max_pending_handshakes = 50;
    });
    let addr = f.server.https;
    let mut silent = Vec::new();
    for _ in 0..500 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tests::assert_eventually!(
        Duration::from_secs(10),
        f.server
            .metric("sso_connections_closed_total{reason=\"handshake_evicted\"}")
            >= 450.0,
        "oldest pending handshakes not evicted: {}",
        f.server.metrics_text()
    );
    assert!(f.server.metric("sso_handshakes_pending") <= 50.0);
    let client = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client")));
    let start = Instant::now();
    assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_with_a_role_is_capped_too_and_others_are_unaffected() {
    let f = start(|c| c.limits.max_connections_per_identity = 3);
    let addr = f.server.https;
    let config = tls_config(&f.pki, &f.pki.client("client"), &[b"http/1.1"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_tls(addr, &config, Duration::from_secs(5)).await.unwrap());
    }
    // The fourth connection of the same identity is answered 429 at once.
    let same = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client")));
    let r = same.get("/v1/keyring").await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "too_many_connections");
    assert!(f.server.metric("sso_connection_refusals_total{reason=\"identity\"}") >= 1.0);
    // Another identity is served; and once one connection closes, so is the first.
    let other = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client2")));
    assert_eq!(other.get("/v1/keyring").await.unwrap().status, 200);
    drop(held.pop());
    tests::assert_eventually!(
        Duration::from_secs(5),
        f.server.metric("sso_connections_open") <= 2.0,
        "closed connection still counted"
    );
    assert_eq!(same.get("/v1/keyring").await.unwrap().status, 200);
    tests::assert_eventually!(
        Duration::from_secs(5),
        std::fs::read_to_string(&f.setup.audit)
            .unwrap_or_default()
            .contains("\"op\":\"connection.limit\""),
        "refusal not audited"
    );
}

/// Starts a watch long-poll on its own connection.
fn watch(client: &Client, after: u64) -> tokio::task::JoinHandle<Result<tests::Reply, String>> {
    let client = client.clone();
    tokio::spawn(async move { client.get(&format!("/v1/keyring/watch?after={after}")).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_capped_per_identity_and_in_total() {
    let f = start(|c| {
        c.limits.max_watches_per_identity = 4;
        c.limits.max_watches = 6;
        c.limits.watch_max_wait_ms = 20000;
    });
    let addr = f.server.https;
    let client = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client")));
    let client2 = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client2")));
    let epoch = client.get("/v1/keyring").await.unwrap().json()["epoch"]
        .as_u64()
        .unwrap();

    let mut waiting: Vec<_> = (0..4).map(|_| watch(&client, epoch)).collect();
    tests::assert_eventually!(
        Duration::from_secs(5),
        f.server.metric("sso_watches_open") >= 4.0,
        "four watches never opened"
    );
    let r = client.get(&format!("/v1/keyring/watch?after={epoch}")).await.unwrap();
    assert_eq!(r.status, 429, "fifth watch of one identity");
    assert_eq!(r.json()["error"], "too_many_watches");

    waiting.extend((0..2).map(|_| watch(&client2, epoch)));
    tests::assert_eventually!(
        Duration::from_secs(5),
        f.server.metric("sso_watches_open") >= 6.0,
        "six watches never opened"
    );
    let r = client2.get(&format!("/v1/keyring/watch?after={epoch}")).await.unwrap();
    assert_eq!(r.status, 503, "a watch beyond the server's total");
    assert_eq!(r.json()["error"], "watch_capacity");
    assert!(f.server.metric("sso_watch_refusals_total{reason=\"identity\"}") >= 1.0);
    assert!(f.server.metric("sso_watch_refusals_total{reason=\"total\"}") >= 1.0);
    // Plain fetches are not watches: still served.
    assert_eq!(client2.get("/v1/keyring").await.unwrap().status, 200);

    // A rotation answers every held watch, and their slots come back.
    let admin = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("admin")));
    admin.rotate().await;
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status, 200);
    }
    tests::assert_eventually!(
        Duration::from_secs(5),
        f.server.metric("sso_watches_open") == 0.0,
        "watch slots not given back"
    );
    let epoch = client.get("/v1/keyring").await.unwrap().json()["epoch"]
        .as_u64()
        .unwrap();
    let again = watch(&client, epoch);
    tests::assert_eventually!(
        Duration::from_secs(5),
        f.server.metric("sso_watches_open") >= 1.0,
        "a watch after the slots came back"
    );
    again.abort();
    let audit = std::fs::read_to_string(&f.setup.audit).unwrap();
    assert!(
        audit.contains("\"outcome\":\"too_many_watches\""),
        "refusal not audited"
    );
}

fn p(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_served_quickly_while_thousands_of_idle_connections_are_held() {
    // The attacker's connections are held for the whole test: long handshake and header
    // deadlines, so that nothing but the limits protects the legitimate client.
    let f = start(|c| {
        c.tls.handshake_timeout_ms = 120000;
        c.limits.header_read_timeout_ms = 120000;
    });
    let addr = f.server.https;

    // 1,000 idle authenticated connections (an identity with the client role).
    let idle_identity = tls_config(&f.pki, &f.pki.client("client2"), &[b"http/1.1"]);
    let mut authenticated = Vec::new();
    for _ in 0..1000 {
        let tls = connect_tls(addr, &idle_identity, Duration::from_secs(10)).await;
        authenticated.push(tls.expect("an authenticated attack connection"));
    }
    // 10,000 idle TCP connections that never start a handshake.
    let mut tcp = Vec::new();
    for _ in 0..10_000 {
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => tcp.push(s),
            other => panic!("TCP connection {} failed: {other:?}", tcp.len()),
        }
    }
    // They really are open on the server.
    tests::assert_eventually!(
        Duration::from_secs(20),
        f.server.metric("sso_connections_open") >= 10_990.0 && f.server.metric("sso_handshakes_pending") >= 9_990.0,
        "the server does not hold the idle connections: {}",
        f.server.metrics_text()
    );

    let client = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client")));
    let mut times = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), client.get("/v1/keyring")).await;
        assert!(matches!(&r, Ok(Ok(r)) if r.status == 200), "not served: {r:?}");
        times.push(start.elapsed());
    }
    let (median, p90) = (p(&mut times, 0.5), p(&mut times, 0.9));
    eprintln!(
        "fresh mTLS connection + GET /v1/keyring while 11,000 idle connections are held: median {median:?}, p90 {p90:?}"
    );
    assert!(median < Duration::from_millis(100), "median {median:?}: {times:?}");
    // Still held when measured.
    assert!(f.server.metric("sso_connections_open") >= 10_990.0);
    drop((authenticated, tcp));
}

/// CPU seconds the process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name: state is field 0, utime 11, stime 12; 100 ticks a second.
    (ticks(11) + ticks(12)) / 100.0
}

fn handshake_failures(server: &TestServer) -> f64 {
    server
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("sso_handshake_failures_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_flood_is_audited_as_counts_while_every_request_keeps_its_line() {
    const FLOOD: Duration = Duration::from_secs(5);
    let f = start(|_| {});
    let addr = f.server.https;
    let client = Client::new(addr, &f.pki.ca_file, Some(&f.pki.client("client")));
    assert_eq!(client.get("/v1/keyring").await.unwrap().status, 200);
    tests::assert_eventually!(
        Duration::from_secs(5),
        std::fs::read_to_string(&f.setup.audit)
            .unwrap_or_default()
            .contains("keyring.fetch"),
        "first fetch not audited"
    );
    let size_before = std::fs::metadata(&f.setup.audit).unwrap().len();
    let failures_before = handshake_failures(&f.server);
    let cpu_before = cpu_seconds(f.server.pid());

    // Garbage instead of a ClientHello, as fast as this machine allows, from 4 threads
    // with blocking sockets (cheaper per connection than async ones).
    let until = Instant::now() + FLOOD;
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                use std::io::Write;
                let mut sent = 0u64;
                while Instant::now() < until {
                    if let Ok(mut tcp) = std::net::TcpStream::connect(addr) {
                        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    // Authenticated requests during the flood: each keeps its own audit line.
    let mut fetched = 0;
    while Instant::now() < until {
        if let Ok(r) = client.get("/v1/keyring").await {
            assert_eq!(r.status, 200);
            fetched += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sent = 0;
    for t in flooders {
        sent += t.join().unwrap();
    }
    let elapsed = FLOOD.as_secs_f64();
    tests::assert_eventually!(
        Duration::from_secs(10),
        handshake_failures(&f.server) - failures_before >= sent as f64 * 0.9,
        "the server did not count the flood's failed handshakes"
    );
    let failed = handshake_failures(&f.server) - failures_before;
    let rate = failed / elapsed;
    let cpu = cpu_seconds(f.server.pid()) - cpu_before;
    eprintln!(
        "garbage flood: {sent} connections sent, {failed} failed handshakes counted in {elapsed} s = {rate:.0}/s; server CPU {:.0} us per failed handshake",
        cpu * 1e6 / failed
    );
    // The rate depends on the machine's load (2 shared cores here); the bounds below
    // hold per failed handshake, so they mean something at any rate above a trickle.
    assert!(failed >= 500.0, "the flood was too small to mean anything: {failed}");

    // The aggregated counts are written once the interval ends (checked below, after the
    // size: a log without aggregation fails on its size first).
    let aggregated = || {
        std::fs::read_to_string(&f.setup.audit)
            .unwrap_or_default()
            .contains("(aggregated)")
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !aggregated() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audit = std::fs::read_to_string(&f.setup.audit).unwrap();
    let grown = std::fs::metadata(&f.setup.audit).unwrap().len() - size_before;
    let handshake_bytes: usize = audit
        .lines()
        .filter(|l| l.contains("\"op\":\"tls.handshake\""))
        .map(|l| l.len() + 1)
        .sum();
    // 1 MB per 20 s of flood, scaled to this flood's length.
    let allowed = (1_000_000.0 * elapsed / 20.0) as u64;
    eprintln!(
        "audit log grew {grown} bytes ({handshake_bytes} of them handshake failures) for {failed} failed handshakes (allowed {allowed})"
    );
    assert!(
        grown < allowed,
        "audit log grew {grown} bytes during a {elapsed} s flood"
    );
    // One line per failure is about 390 bytes: the aggregated log must stay far below.
    assert!(
        (handshake_bytes as f64) < failed * 10.0,
        "{handshake_bytes} bytes of handshake-failure lines for {failed} failed handshakes"
    );
    assert!(aggregated(), "no aggregated handshake-failure line");
    let counted: u64 = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["op"] == "tls.handshake")
        .map(|e| {
            let detail = e["detail"].as_str().unwrap_or("");
            detail
                .split_once("count=")
                .and_then(|(_, rest)| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1)
        })
        .sum();
    assert!(
        counted as f64 >= failed * 0.99,
        "the audit log accounts for {counted} of {failed} failed handshakes"
    );
    let fetch_lines = audit
        .lines()
        .filter(|l| l.contains("\"op\":\"keyring.fetch\"") && l.contains("\"identity\":\"client\""))
        .count();
    assert!(
        fetched >= 10,
        "only {fetched} authenticated requests got through the flood"
    );
    assert!(
        fetch_lines > fetched,
        "{fetch_lines} keyring.fetch lines for {fetched} fetches during the flood (+1 before)"
    );
}
