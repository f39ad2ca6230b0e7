//! sso-client against the real server: outages, rotation propagation, failover, and
//! redaction of every client type.

use std::path::Path;
use std::time::{Duration, Instant};

use sso_client::{Client, Error, Freshness};
use tests::{Pki, ServerSetup, TestServer, bin};

struct Env {
    /// First, so the server stops (and its logs are checked for key material) before
    /// the directory goes.
    server: TestServer,
    pki: Pki,
    setup: ServerSetup,
    port: u16,
    _dir: tempfile::TempDir,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::builder(&dir.path().join("a"), &pki, "node-a")
        .limits(|l| l.watch_max_wait_ms = 2000)
        .build();
    let port = setup.pin_ports();
    let server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
    Env {
        _dir: dir,
        pki,
        setup,
        server,
        port,
    }
}

impl Env {
    fn client(&self, name: &str, endpoints: &[String]) -> Client {
        let cert = self.pki.client(name);
        let mut b = Client::builder()
            .ca(&self.pki.ca_file)
            .identity(&cert.cert, &cert.key)
            .poll_interval(Duration::from_secs(30));
        for e in endpoints {
            b = b.endpoint(e);
        }
        b.build().unwrap()
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn admin(&self) -> tests::Client {
        tests::Client::new(self.server.https, &self.pki.ca_file, Some(&self.pki.client("admin")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_client_outlives_the_server_and_a_fresh_one_waits_for_it() {
    let mut e = env();
    let warm = e.client("client", &[e.url()]);
    warm.refresh().await.unwrap();
    let sealed_before = warm.seal(b"aad", b"sealed while the server was up").await.unwrap();

    e.server.kill(); // SIGKILL
    let mut ok = 0;
    for i in 0..5_000u32 {
        let msg = i.to_le_bytes();
        let env = warm.seal(b"aad", &msg).await.expect("seal with the server down");
        assert_eq!(warm.open(b"aad", &env).await.expect("open with the server down"), msg);
        ok += 1;
    }
    assert_eq!(ok, 5_000);
    assert_eq!(
        warm.open(b"aad", &sealed_before).await.unwrap(),
        b"sealed while the server was up"
    );
    assert_ne!(warm.status().freshness, Freshness::Empty);

    // A fresh client (an empty cache, as after a restart) cannot work: Unavailable.
    let fresh = e.client("client", &[e.url()]);
    let started = Instant::now();
    match fresh.seal(b"aad", b"x").await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains("localhost"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "Unavailable took {:?}",
        started.elapsed()
    );
    assert_eq!(fresh.status().freshness, Freshness::Empty);
    assert!(fresh.status().last_error.is_some());

    // The server comes back on the same address: the same fresh client starts working.
    tests::restart(&mut e.server, &e.setup.config);
    let deadline = Instant::now() + Duration::from_secs(15);
    let sealed = loop {
        match fresh.seal(b"aad", b"after the return").await {
            Ok(s) => break s,
            Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(other) => panic!("fresh client did not recover: {other:?}"),
        }
    };
    assert_eq!(warm.open(b"aad", &sealed).await.unwrap(), b"after the return");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reaches_watching_clients_within_a_second() {
    let e = env();
    let a = e.client("client", &[e.url()]);
    let b = e.client("client2", &[e.url()]);
    a.refresh().await.unwrap();
    b.refresh().await.unwrap();
    let old = a.status().primary.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // both watches parked

    let key_fetches_before = e.server.metric("sso_requests_total{endpoint=\"key\",status=\"200\"}");
    let started = Instant::now();
    let rotated = e
        .admin()
        .post("/v1/admin/rotate", &serde_json::json!({}))
        .await
        .unwrap()
        .json();
    let new: sso_client::KeyId = rotated["key_id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new, old);
    for c in [&a, &b] {
        while c.status().primary != Some(new) {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "a watching client did not learn of the rotation within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let elapsed = started.elapsed();
    // b seals under the new primary; a opens it from its cache: the staged key had been
    // distributed before the promotion, so no on-demand fetch happens.
    let sealed = b.seal(b"", b"under the fresh key").await.unwrap();
    assert_eq!(sso_proto::EnvelopeRef::parse(&sealed).unwrap().key_id, new);
    assert!(a.try_open_cached(b"", &sealed).is_some(), "a did not hold the new key");
    assert_eq!(a.open(b"", &sealed).await.unwrap(), b"under the fresh key");
    assert_eq!(
        e.server.metric("sso_requests_total{endpoint=\"key\",status=\"200\"}"),
        key_fetches_before
    );
    eprintln!("rotation visible to both clients after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_fetched_on_demand_once() {
    let e = env();
    // A client that does not watch and polls rarely: it only learns of a new key on demand.
    let cert = e.pki.client("client2");
    let lazy = Client::builder()
        .endpoint(e.url())
        .ca(&e.pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .watch(false)
        .build()
        .unwrap();
    lazy.refresh().await.unwrap();
    let other = e.client("client", &[e.url()]);
    e.admin()
        .post("/v1/admin/rotate", &serde_json::json!({}))
        .await
        .unwrap();
    other.refresh().await.unwrap();
    let sealed = other.seal(b"", b"new").await.unwrap();
    let before = e.server.metric("sso_requests_total{endpoint=\"key\",status=\"200\"}");
    // Twenty concurrent opens of an envelope under a key the client does not hold.
    let opens: Vec<_> = (0..20)
        .map(|_| {
            let (lazy, sealed) = (lazy.clone(), sealed.clone());
            tokio::spawn(async move { lazy.open(b"", &sealed).await })
        })
        .collect();
    for r in opens {
        assert_eq!(r.await.unwrap().unwrap(), b"new");
    }
    // The server counts a request once its answer is written, which can trail the
    // client's read on a loaded machine: wait (bounded) for the count to settle.
    let mut after = before;
    for _ in 0..40 {
        after = e.server.metric("sso_requests_total{endpoint=\"key\",status=\"200\"}");
        if after > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let after = after.max(e.server.metric("sso_requests_total{endpoint=\"key\",status=\"200\"}"));
    assert_eq!(after - before, 1.0, "concurrent misses were not deduplicated");

    // A bogus key id: UnknownKey, and asked about at most once a second.
    let mut bogus = sealed.clone();
    bogus[1..17].copy_from_slice(&[0xAB; 16]);
    for _ in 0..10 {
        assert!(matches!(lazy.open(b"", &bogus).await, Err(Error::UnknownKey { .. })));
    }
    let misses = e.server.metric("sso_requests_total{endpoint=\"key\",status=\"404\"}");
    assert_eq!(misses, 1.0, "misses were not rate-limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_key_comes_from_the_second_endpoint_when_the_first_is_dead() {
    let e = env();
    // Refused: nothing listens there.
    let refused = format!("https://localhost:{}", tests::free_port());
    // Blackholed: a listener that never accepts; the kernel completes TCP, nobody answers TLS.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blackholed = format!("https://localhost:{}", hole.local_addr().unwrap().port());
    for dead in [refused, blackholed] {
        let started = Instant::now();
        let client = e.client("client", &[dead.clone(), e.url()]);
        let sealed = client.seal(b"", b"x").await.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "first key via {dead} took {took:?}");
        assert!(!sealed.is_empty());
        assert_eq!(client.status().endpoint.as_deref(), Some(e.url().as_str()));
    }
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_of_client_types_shows_no_key() {
    use base64::Engine;
    let e = env();
    let client = e.client("client", &[e.url()]);
    client.refresh().await.unwrap();
    let handle = client.primary_key().await.unwrap();
    let raw = handle.expose_secret().to_vec();
    let blocking_builder = {
        let cert = e.pki.client("client2");
        Client::builder()
            .endpoint(e.url())
            .ca(&e.pki.ca_file)
            .identity(&cert.cert, &cert.key)
    };
    let texts = vec![
        format!("{client:?}"),
        format!("{handle:?}"),
        format!("{:?}", client.status()),
        format!("{blocking_builder:?}"),
        format!(
            "{:?}",
            client
                .open(b"", b"\x01garbage-garbage-garbage-garbage-garbage-garbage")
                .await
        ),
        format!("{:?}", Error::Unavailable("x".into())),
    ];
    for t in &texts {
        for bad in [
            hex::encode(&raw),
            base64::engine::general_purpose::STANDARD.encode(&raw),
            format!("{:?}", &raw[..8]),
        ] {
            assert!(!t.contains(&bad), "key bytes in {t}");
        }
    }
    let _ = Path::new("");
}
