//! `sso-watch-mem`: memory per open watch long-poll on the real `sso-server`, and how
//! fast one rotation reaches all of them.
//!
//! Starts a server (own PKI and store, caps raised to hold every watch), then measures its
//! resident set (VmRSS from /proc) three times: idle; holding C HTTP/2 connections with no
//! request (the baseline: what the connections alone cost); and holding N watches spread
//! over the same C connections (250 streams each). Prints bytes per watch beyond the
//! connections, bytes per watch including its share of the connections, and the ratio of
//! a watch to an idle connection measured in the same run. Then it rotates once (an admin
//! `POST /v1/admin/rotate`) while the watches are open and prints how many answered and
//! when: from the rotate's answer (the task's definition; a watch answered while the
//! rotate was still finishing counts as 0), from the rotate's request, and from the first
//! watch's answer (the spread of the fan-out).
//!
//! Run with release binaries (`tests::bin` builds the servers in the profile of this
//! binary): `cargo run --release -p tests --bin sso-watch-mem -- --watches 100000`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tests::{Pki, ServerSetup, TestServer, bin};

/// Memory per open watch, and one rotation's fan-out to all of them.
#[derive(Parser, Debug)]
struct Args {
    /// Watches to open.
    #[arg(long, default_value_t = 100_000)]
    watches: usize,
    /// Streams per HTTP/2 connection (the server allows 256).
    #[arg(long, default_value_t = 250)]
    per_connection: usize,
    /// Only measure memory; do not rotate.
    #[arg(long)]
    no_rotate: bool,
    /// Send `Sso-Key-Wrap` as sso-client does, so every answer is sealed to the watcher
    /// (one X25519 agreement per answer); without it the answers are plain JSON.
    #[arg(long)]
    wrapped: bool,
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

/// A line of `/proc/PID/limits` ("Max open files  20000  20000  files"), squeezed.
fn limit(pid: &str, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name))
        .map(|l| l[name.len()..].split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// CPU time (user + system) a process has used, in seconds, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are the
    // 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

/// Seconds the threads of a process have spent runnable but waiting for a core (the second
/// field of each `/proc/PID/task/TID/schedstat`, in nanoseconds), summed.
fn run_queue_wait_seconds(pid: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .sum::<u64>() as f64
        / 1e9
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

/// The `q`-quantile of sorted milliseconds.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn summary(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "  {label:<34} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
        quantile(&ms, 0.5),
        quantile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

async fn run(args: Args) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let connections = args.watches.div_ceil(args.per_connection);
    // Every cap the run needs, raised through the config; the rest stay the defaults.
    let (n, c) = (args.watches + 10, (connections + 64).max(16_384));
    let setup = ServerSetup::builder(&dir.path().join("node"), &pki, "node-a")
        .limits(move |l| {
            l.watch_max_wait_ms = 600_000;
            l.max_watches = n;
            l.max_watches_per_identity = n;
            l.idle_timeout_ms = 600_000;
            l.max_connections_per_identity = c;
            l.max_connections = c;
        })
        .build();
    let server_bin = bin("sso-server");
    let mut server = TestServer::start(&server_bin, &setup.config, &dir.path().join("server.log"));
    let pid = server.pid();
    println!(
        "server {} (pid {pid}); open files: this process {}, server {}",
        server_bin.display(),
        limit("self", "Max open files"),
        limit(&pid.to_string(), "Max open files")
    );
    let mut config = tests::tls_config(&pki.ca_file, Some(&pki.client("client")));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);

    let warm = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    let admin = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
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
    // A valid X25519 public key (RFC 7748, section 6.1, Alice's), as sso-client sends its own.
    let wrap = args.wrapped.then(|| {
        use base64::Engine;
        let public = hex::decode("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a").unwrap();
        Arc::<str>::from(format!(
            "v1 {}",
            base64::engine::general_purpose::STANDARD.encode(public)
        ))
    });
    let mut held = Vec::with_capacity(args.watches);
    for i in 0..args.watches {
        let mut send = senders[i / args.per_connection].clone();
        let wrap = wrap.clone();
        held.push(tokio::spawn(async move {
            let mut req = hyper::Request::get(format!("https://localhost/v1/keyring/watch?after={epoch}"));
            if let Some(value) = wrap {
                req = req.header(sso_proto::delivery::HEADER, &*value);
            }
            let req = req.body(Empty::<Bytes>::new()).unwrap();
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let at = Instant::now();
            let status = resp.status().as_u16();
            resp.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, at))
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
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

    let n = args.watches as f64;
    let per_connection = with_connections.saturating_sub(idle) as f64 / connections as f64;
    let per_watch = with_watches.saturating_sub(with_connections) as f64 / n;
    let per_watch_all = with_watches.saturating_sub(idle) as f64 / n;
    println!(
        "sso-server RSS, {} watches ({}) over {connections} HTTP/2 connections ({} streams each):",
        args.watches,
        if args.wrapped {
            "Sso-Key-Wrap, answers sealed"
        } else {
            "plain answers"
        },
        args.per_connection
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

    if args.no_rotate {
        server.kill();
        for h in held {
            h.abort();
        }
        return;
    }
    let (server_cpu, own_cpu) = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    let server_waited = run_queue_wait_seconds(&pid.to_string());
    let asked = Instant::now();
    let rotated = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    let answered = Instant::now();
    assert_eq!(
        rotated.status,
        200,
        "rotate: {}",
        String::from_utf8_lossy(&rotated.body)
    );
    let mut times = Vec::with_capacity(args.watches);
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for h in held {
        match tokio::time::timeout_at(deadline, h).await {
            Ok(Ok(Ok((200, at)))) => times.push(at),
            Ok(Ok(Ok((status, _)))) => *failures.entry(format!("status {status}")).or_default() += 1,
            Ok(Ok(Err(e))) => *failures.entry(e).or_default() += 1,
            Ok(Err(e)) => *failures.entry(e.to_string()).or_default() += 1,
            Err(_) => *failures.entry("no answer within 60 s".into()).or_default() += 1,
        }
    }
    let server_cpu = cpu_seconds(&pid.to_string()) - server_cpu;
    let own_cpu = cpu_seconds("self") - own_cpu;
    let server_waited = run_queue_wait_seconds(&pid.to_string()) - server_waited;
    server.kill();
    let first = times.iter().min().copied().unwrap_or(answered);
    let before_answer = times.iter().filter(|t| **t < answered).count();
    let ms = |from: Instant| -> Vec<f64> {
        times
            .iter()
            .map(|t| t.saturating_duration_since(from).as_secs_f64() * 1000.0)
            .collect()
    };
    println!(
        "rotation while {} watches were open: rotate answered in {:.1} ms; {} of {} watches answered 200 \
         ({before_answer} of them before the rotate's answer){}",
        args.watches,
        (answered - asked).as_secs_f64() * 1000.0,
        times.len(),
        args.watches,
        if failures.is_empty() {
            String::new()
        } else {
            format!("; not answered: {failures:?}")
        }
    );
    let last = times.iter().max().copied().unwrap_or(answered);
    println!(
        "  CPU from the rotate's request to the last answer ({:.0} ms): sso-server {server_cpu:.2} s \
         (and {server_waited:.2} s runnable, waiting for a core, summed over its threads), \
         this load generator {own_cpu:.2} s (USER_HZ 100 assumed)",
        last.saturating_duration_since(asked).as_secs_f64() * 1000.0
    );
    summary("from the rotate's answer (target p99 < 1000 ms):", ms(answered));
    summary("from the rotate's request:", ms(asked));
    summary("from the first watch's answer:", ms(first));
}
