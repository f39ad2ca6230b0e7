//! `sso-cluster-bench`: the cluster (issue 14) measured through the real client, on the
//! one-command example (`examples/cluster/start.sh`: three nodes on a throwaway
//! PostgreSQL, this binary's own sso-server and ssoctl).
//!
//! 1. Keyring fetch throughput (`sso_client::Client::refresh`, a full keyring fetch over
//!    mTLS, wrapped to the client as always) with 1, 2 and 3 nodes in each client's
//!    endpoint list, as a ratio to 1 node. Each configuration has its own clients; the
//!    configurations run in turn, interleaved over rounds (the order rotates every round),
//!    and each ratio is the median of per-round ratios to the 1-node run of the same
//!    round. Two ways to list the nodes: every client in the same order (the list is a
//!    failover list, so all of them use node 1), and each client's list rotated by its
//!    index (how a deployment spreads hosts over the nodes). The nodes' own request
//!    counters say where the fetches went.
//! 2. Rotation to watchers: W clients with a watch each, client k on node k mod 3 only;
//!    an admin rotates on node 1, and one loop checks every client each millisecond, from
//!    the moment the rotate is sent, for when it first holds the new key and when the new
//!    key became its primary. Printed
//!    from the rotate's answer (the target: p99 < 1 s) and from its request (which
//!    includes the 250 ms staging pause), per rotation and per node.
//!
//! The load average (`/proc/loadavg`) is printed before and after: the nodes, the
//! database and this load generator share the machine's cores.
//!
//! Run with release binaries (built once):
//! `CARGO_TARGET_DIR=target/test-bins cargo build --release --workspace --bins`, then
//! `target/test-bins/release/sso-cluster-bench` (or `bash bench/cluster.sh`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use sso_client::{Client, KeyId};
use tests::cluster_example::ClusterExample;

/// Keyring fetch throughput with 1, 2 and 3 nodes listed, and rotation-to-watcher latency
/// over three nodes.
#[derive(Parser, Debug)]
struct Args {
    /// Concurrent fetching clients per configuration.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds each configuration runs per round.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Watching clients, spread over the three nodes.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Rotations to time.
    #[arg(long, default_value_t = 5)]
    rotations: usize,
    /// Skip the throughput part.
    #[arg(long)]
    no_throughput: bool,
    /// Skip the latency part.
    #[arg(long)]
    no_latency: bool,
    /// Directory with sso-server and ssoctl (default: this binary's own directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Successful keyring fetches each node has answered so far (`sso_requests_total`).
fn keyring_counts(example: &ClusterExample) -> Vec<u64> {
    use std::io::{Read, Write};
    example
        .metrics
        .iter()
        .map(|addr| {
            let mut s = std::net::TcpStream::connect(addr).expect("metrics");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("metrics");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("metrics");
            out.lines()
                .find_map(|l| l.strip_prefix("sso_requests_total{endpoint=\"keyring\",status=\"200\"} "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn main() {
    let args = Args::parse();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("current exe")
            .parent()
            .expect("its directory")
            .to_path_buf()
    });
    for b in ["sso-server", "ssoctl"] {
        assert!(
            bin_dir.join(b).is_file(),
            "no {b} in {}: build the workspace's binaries first",
            bin_dir.display()
        );
    }
    let ports = [tests::free_port(), tests::free_port(), tests::free_port()];
    let example = ClusterExample::start(&bin_dir, ports, Duration::from_secs(120));
    println!(
        "cluster example: 3 nodes ({}), PostgreSQL in {}; binaries {}",
        example
            .https
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        example.pg_dir.display(),
        bin_dir.display()
    );
    println!(
        "cores: {}; load average before: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let urls: Vec<String> = example
        .https
        .iter()
        .map(|a| format!("https://localhost:{}", a.port()))
        .collect();
    let (ca, cert) = (example.ca(), example.cert("client"));
    let build = |endpoints: &[usize], watch: bool| {
        let mut b = Client::builder()
            .ca(&ca)
            .identity(&cert.cert, &cert.key)
            .watch(watch)
            .poll_interval(Duration::from_secs(3600));
        for &i in endpoints {
            b = b.endpoint(urls[i].clone());
        }
        b.build().expect("client")
    };

    if !args.no_throughput {
        throughput(&args, &runtime, &example, &build);
    }
    if !args.no_latency {
        latency(&args, &runtime, &example, &build);
    }
    println!("load average after: {}", loadavg());
    drop(runtime);
    let mut example = example;
    let (status, _) = example.interrupt(Duration::from_secs(60));
    println!("cluster example stopped ({status})");
}

fn throughput(
    args: &Args,
    runtime: &tokio::runtime::Runtime,
    example: &ClusterExample,
    build: &dyn Fn(&[usize], bool) -> Client,
) {
    // (label, nodes listed, each client's list rotated by its index)
    let configs: [(&str, usize, bool); 5] = [
        ("1 node", 1, false),
        ("2 nodes, same order", 2, false),
        ("3 nodes, same order", 3, false),
        ("2 nodes, rotated per client", 2, true),
        ("3 nodes, rotated per client", 3, true),
    ];
    let sets: Vec<Vec<Client>> = runtime.block_on(async {
        let mut sets = Vec::new();
        for &(_, n, rotated) in &configs {
            let mut set = Vec::new();
            for k in 0..args.clients {
                let shift = if rotated { k % n } else { 0 };
                let order: Vec<usize> = (0..n).map(|i| (i + shift) % n).collect();
                let c = build(&order, false);
                c.refresh().await.expect("first fetch");
                set.push(c);
            }
            sets.push(set);
        }
        sets
    });
    let mut rates = vec![Vec::new(); configs.len()];
    let mut ratios = vec![Vec::new(); configs.len()];
    let mut shares: Vec<Vec<u64>> = vec![Vec::new(); configs.len()];
    let mut errors = vec![0u64; configs.len()];
    for round in 0..args.rounds {
        let mut this_round = vec![0.0; configs.len()];
        for step in 0..configs.len() {
            let c = (step + round) % configs.len();
            let before = keyring_counts(example);
            let (ok, failed, elapsed) = runtime.block_on(async {
                let started = Instant::now();
                let until = started + Duration::from_secs_f64(args.seconds);
                let mut tasks = Vec::new();
                for client in &sets[c] {
                    let client = client.clone();
                    tasks.push(tokio::spawn(async move {
                        let (mut ok, mut failed) = (0u64, 0u64);
                        while Instant::now() < until {
                            match client.refresh().await {
                                Ok(()) => ok += 1,
                                Err(_) => failed += 1,
                            }
                        }
                        (ok, failed)
                    }));
                }
                let (mut ok, mut failed) = (0, 0);
                for t in tasks {
                    let (o, f) = t.await.expect("task");
                    ok += o;
                    failed += f;
                }
                (ok, failed, started.elapsed())
            });
            let after = keyring_counts(example);
            shares[c] = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            errors[c] += failed;
            this_round[c] = ok as f64 / elapsed.as_secs_f64();
        }
        for c in 0..configs.len() {
            rates[c].push(this_round[c]);
            ratios[c].push(this_round[c] / this_round[0]);
        }
    }
    println!(
        "\nkeyring fetch throughput through sso_client (Client::refresh), {} clients per configuration, {} s each, median of {} interleaved rounds",
        args.clients, args.seconds, args.rounds
    );
    println!(
        "{:<30} {:>10} {:>8} {:>7}   fetches answered by node 1 / 2 / 3 (last round)",
        "endpoints listed", "fetches/s", "ratio", "errors"
    );
    for (c, (label, _, _)) in configs.iter().enumerate() {
        let total: u64 = shares[c].iter().sum::<u64>().max(1);
        let share: Vec<String> = shares[c]
            .iter()
            .map(|n| format!("{:.0}%", *n as f64 * 100.0 / total as f64))
            .collect();
        println!(
            "{:<30} {:>10.0} {:>7.2}x {:>7}   {}",
            label,
            median(&mut rates[c]),
            median(&mut ratios[c]),
            errors[c],
            share.join(" / ")
        );
    }
    drop(sets);
}

fn latency(
    args: &Args,
    runtime: &tokio::runtime::Runtime,
    example: &ClusterExample,
    build: &dyn Fn(&[usize], bool) -> Client,
) {
    let n = args.watchers;
    let watchers: Vec<Client> = runtime.block_on(async {
        let watchers: Vec<Client> = (0..n).map(|k| build(&[k % 3], true)).collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while watchers.iter().any(|c| c.status().primary.is_none()) {
            assert!(Instant::now() < deadline, "watchers did not warm up in 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let every watch park.
        tokio::time::sleep(Duration::from_secs(2)).await;
        watchers
    });
    let admin = tests::Client::new(example.https[0], &example.ca(), Some(&example.cert("admin")));
    println!(
        "\nrotation on node 1 -> {n} watching clients (client k watches node k mod 3 only; sso_client, watch long-poll), {} rotations; load average {}",
        args.rotations,
        loadavg()
    );
    let (mut all_held, mut all_primary, mut all_sent) = (Vec::new(), Vec::new(), Vec::new());
    let mut per_node: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut missing_total = 0;
    for r in 0..args.rotations {
        // The rotate runs on the runtime while this thread polls the watchers from the
        // moment it is sent: a watcher may hold (and even switch to) the new key before
        // the rotate's answer arrives.
        let sent = Instant::now();
        let rotate = {
            let admin = admin.clone();
            runtime.spawn(async move {
                let reply = admin.rotate().await;
                let id: KeyId = reply["key_id"].as_str().expect("key id").parse().expect("key id");
                (Instant::now(), id)
            })
        };
        let mut held_at: Vec<Option<Instant>> = vec![None; n];
        let mut ids_at: Vec<Option<(KeyId, Instant)>> = vec![None; n];
        let before: Vec<(Option<KeyId>, usize)> = watchers
            .iter()
            .map(|c| {
                let s = c.status();
                (s.primary, s.keys)
            })
            .collect();
        // Until the answer names the new key: note when each watcher's primary first moves.
        while !rotate.is_finished() {
            let now = Instant::now();
            for (i, c) in watchers.iter().enumerate() {
                let s = c.status();
                if ids_at[i].is_none()
                    && let Some(p) = s.primary
                    && Some(p) != before[i].0
                {
                    ids_at[i] = Some((p, now));
                }
                if held_at[i].is_none() && s.keys > before[i].1 {
                    held_at[i] = Some(now);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (acked, new) = runtime.block_on(rotate).expect("rotate task");
        let mut primary: Vec<Option<Instant>> = ids_at
            .iter()
            .map(|x| x.and_then(|(p, t)| (p == new).then_some(t)))
            .collect();
        let mut held = held_at;
        let deadline = Instant::now() + Duration::from_secs(30);
        while primary.iter().any(Option::is_none) && Instant::now() < deadline {
            let now = Instant::now();
            for (i, c) in watchers.iter().enumerate() {
                if primary[i].is_some() {
                    continue;
                }
                if held[i].is_none() && c.is_cached(&new) {
                    held[i] = Some(now);
                }
                if c.status().primary == Some(new) {
                    primary[i] = Some(now);
                    held[i].get_or_insert(now);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let missing = primary.iter().filter(|t| t.is_none()).count();
        missing_total += missing;
        let ms = |t: &Instant, from: Instant| t.saturating_duration_since(from).as_secs_f64() * 1e3;
        let mut from_ack: Vec<f64> = primary.iter().flatten().map(|t| ms(t, acked)).collect();
        let mut from_sent: Vec<f64> = primary.iter().flatten().map(|t| ms(t, sent)).collect();
        let mut held_sent: Vec<f64> = held.iter().flatten().map(|t| ms(t, sent)).collect();
        for (i, t) in primary.iter().enumerate() {
            if let Some(t) = t {
                per_node[i % 3].push(ms(t, acked));
            }
        }
        from_ack.sort_by(f64::total_cmp);
        from_sent.sort_by(f64::total_cmp);
        held_sent.sort_by(f64::total_cmp);
        println!(
            "  rotation {}: rotate answered in {:.0} ms; primary from the answer p50 {:.1} p99 {:.1} max {:.1} ms; from the request p50 {:.1} p99 {:.1} max {:.1} ms; key held from the request p99 {:.1} ms; {missing} never switched",
            r + 1,
            acked.duration_since(sent).as_secs_f64() * 1e3,
            pct(&from_ack, 0.5),
            pct(&from_ack, 0.99),
            from_ack.last().copied().unwrap_or(f64::NAN),
            pct(&from_sent, 0.5),
            pct(&from_sent, 0.99),
            from_sent.last().copied().unwrap_or(f64::NAN),
            pct(&held_sent, 0.99),
        );
        all_primary.extend(from_ack);
        all_sent.extend(from_sent);
        all_held.extend(held_sent);
        std::thread::sleep(Duration::from_secs(2));
    }
    for v in [&mut all_primary, &mut all_sent, &mut all_held] {
        v.sort_by(f64::total_cmp);
    }
    for v in &mut per_node {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "  all {} rotations x {n} watchers ({missing_total} never switched):",
        args.rotations
    );
    println!(
        "    new key primary, from the rotate's answer (target p99 < 1000 ms): p50 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms",
        pct(&all_primary, 0.5),
        pct(&all_primary, 0.99),
        all_primary.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "    new key primary, from the rotate's request:                       p50 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms",
        pct(&all_sent, 0.5),
        pct(&all_sent, 0.99),
        all_sent.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "    new key held (staged), from the rotate's request:                 p50 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms",
        pct(&all_held, 0.5),
        pct(&all_held, 0.99),
        all_held.last().copied().unwrap_or(f64::NAN)
    );
    for (node, v) in per_node.iter().enumerate() {
        println!(
            "    watchers on node {} ({:>4} samples), primary from the answer:       p50 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms",
            node + 1,
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    drop(watchers);
}
