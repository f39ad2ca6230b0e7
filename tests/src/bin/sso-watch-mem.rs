//! `sso-watch-mem`: memory per open watch long-poll on the real `sso-server`.
//!
//! Starts a server (own PKI and store, generous limits), then measures its resident set
//! (VmRSS from /proc) three times: idle; holding C HTTP/2 connections with no request
//! (the baseline: what the connections alone cost); and holding N watches spread over
//! the same C connections (250 streams each). Prints bytes per watch beyond the
//! connections, bytes per watch including its share of the connections, and the ratio of
//! a watch to an idle connection measured in the same run.
//! Run: `cargo run -p tests --bin sso-watch-mem -- --watches 20000`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tests::{Pki, ServerSetup, TestServer, bin};

/// Memory per open watch.
#[derive(Parser, Debug)]
struct Args {
    /// Watches to open.
    #[arg(long, default_value_t = 20_000)]
    watches: usize,
    /// Streams per HTTP/2 connection (the server allows 256).
    #[arg(long, default_value_t = 250)]
    per_connection: usize,
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// RSS after it has stopped moving (three readings 300 ms apart within 4 KiB).
async fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_bytes(pid);
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = rss_bytes(pid);
        if now.abs_diff(last) < 4096 {
            return now;
        }
        last = now;
    }
    last
}

fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let limits = format!(
        "[limits]\nwatch_max_wait_ms = 600000\nmax_watches = {n}\nmax_watches_per_identity = {n}\nidle_timeout_ms = 600000",
        n = args.watches + 10
    );
    let setup = ServerSetup::new(&dir.path().join("node"), &pki, "node-a", "", &limits);
    let mut server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("server.log"));
    let pid = server.pid();
    let mut config = tests::tls_config(&pki.ca_file, Some(&pki.client("client")));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let connections = args.watches.div_ceil(args.per_connection);

    let warm = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    let epoch = warm.get("/v1/keyring").await.unwrap().json()["epoch"].as_u64().unwrap();
    let idle = settled_rss(pid).await;

    let mut senders = Vec::new();
    for _ in 0..connections {
        let tcp = tokio::net::TcpStream::connect(server.https).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(send);
    }
    let with_connections = settled_rss(pid).await;

    let started = Instant::now();
    let mut held = Vec::with_capacity(args.watches);
    for i in 0..args.watches {
        let mut send = senders[i / args.per_connection].clone();
        held.push(tokio::spawn(async move {
            let req = hyper::Request::get(format!("https://localhost/v1/keyring/watch?after={epoch}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            send.send_request(req).await.map(|r| r.status().as_u16())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.metric("sso_watches_open") < args.watches as f64 {
        if Instant::now() > deadline {
            panic!(
                "only {} of {} watches open: {}",
                server.metric("sso_watches_open"),
                args.watches,
                server.metrics_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened_in = started.elapsed();
    let with_watches = settled_rss(pid).await;
    let still_open = server.metric("sso_watches_open");
    server.kill();
    for h in held {
        h.abort();
    }

    let n = args.watches as f64;
    let per_connection = with_connections.saturating_sub(idle) as f64 / connections as f64;
    let per_watch = with_watches.saturating_sub(with_connections) as f64 / n;
    let per_watch_all = with_watches.saturating_sub(idle) as f64 / n;
    println!(
        "sso-server RSS, {} watches over {connections} HTTP/2 connections ({} streams each):",
        args.watches, args.per_connection
    );
    println!("  idle                        {:>10.1} MiB", idle as f64 / 1048576.0);
    println!(
        "  + {connections} connections (baseline) {:>10.1} MiB  ({per_connection:.0} B per connection)",
        with_connections as f64 / 1048576.0
    );
    println!(
        "  + {} watches             {:>10.1} MiB  (opened in {opened_in:.1?}, {still_open} open when measured)",
        args.watches,
        with_watches as f64 / 1048576.0
    );
    println!("  per watch, beyond its connection:        {per_watch:>8.0} B");
    println!("  per watch, with its share of connections: {per_watch_all:>8.0} B");
    println!(
        "  one watch costs {:.2}x an idle HTTP/2 connection",
        per_watch / per_connection
    );
}
