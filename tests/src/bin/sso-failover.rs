//! `sso-failover`: clients under load against a pair; the node they use fails: SIGKILL
//! (`--fault kill`) or SIGSTOP (`--fault hang`: it accepts connections and never answers).
//! Reports failed operations, the client-observed latency (cached seal+open, and keyring
//! fetches that must cross the network), the longest stall of a fetch, how long a
//! watching client takes to see a rotation made on the other node, a cold client's time
//! to its first key from the survivor, and draws the timeline as an SVG. Run through
//! `bash bench/failover.sh`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use sso_client::Client;
use tests::pair::Pair;

#[derive(Parser, Debug)]
struct Args {
    /// Where to write the timeline picture.
    #[arg(long, default_value = "docs/failover-timeline.svg")]
    out: std::path::PathBuf,
    /// Seconds before the kill.
    #[arg(long, default_value_t = 3)]
    before: u64,
    /// Seconds after the kill.
    #[arg(long, default_value_t = 5)]
    after: u64,
    /// Concurrent sealing clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// How node A fails: `kill` (SIGKILL) or `hang` (SIGSTOP).
    #[arg(long, default_value = "kill", value_parser = ["kill", "hang"])]
    fault: String,
}

const BUCKET: Duration = Duration::from_millis(100);

#[derive(Default, Clone)]
struct Bucket {
    ops: u64,
    failed: u64,
    op_lat_us: Vec<u32>,
    fetch_lat_us: Vec<u32>,
    fetch_failed: u64,
}

fn p99(v: &mut [u32]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    f64::from(v[((v.len() - 1) as f64 * 0.99) as usize]) / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = Pair::new(dir.path());
    pair.a.start();
    pair.b.start();
    let cert = pair.pki.client("client");
    let make = |first: &str, second: &str| {
        Client::builder()
            .endpoint(first)
            .endpoint(second)
            .ca(&pair.pki.ca_file)
            .identity(&cert.cert, &cert.key)
            .build()
            .expect("client")
    };
    let (a_url, b_url) = (pair.a.url(), pair.b.url());
    // Wait for B to hold A's key.
    let probe = make(&b_url, &a_url);
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe.refresh().await.is_err() || probe.status().primary.is_none() {
        assert!(Instant::now() < deadline, "pair did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let total = Duration::from_secs(args.before + args.after);
    let buckets = (total.as_millis() / BUCKET.as_millis()) as usize;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let c = make(&a_url, &b_url);
        c.refresh().await.expect("warm");
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = vec![Bucket::default(); buckets];
            let mut n = 0u64;
            let mut last_fetch = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let b = ((start.elapsed().as_millis() / BUCKET.as_millis()) as usize).min(buckets - 1);
                // One client also fetches the keyring every 20 ms: the network path.
                if i == 0 && last_fetch.elapsed() >= Duration::from_millis(20) {
                    last_fetch = Instant::now();
                    let t = Instant::now();
                    match c.refresh().await {
                        Ok(()) => local[b].fetch_lat_us.push(t.elapsed().as_micros() as u32),
                        Err(_) => local[b].fetch_failed += 1,
                    }
                }
                n += 1;
                let msg = n.to_le_bytes();
                let t = Instant::now();
                let ok = match c.seal(b"", &msg).await {
                    Ok(env) => c.open(b"", &env).await.map(|p| p == msg).unwrap_or(false),
                    Err(_) => false,
                };
                local[b].op_lat_us.push(t.elapsed().as_micros() as u32);
                if ok {
                    local[b].ops += 1;
                } else {
                    local[b].failed += 1;
                }
                if n.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
            local
        }));
    }
    // A client that only watches (no requests, no poll within the run): what it learns
    // after the fault comes through its watch, which must move to B.
    let watcher = Client::builder()
        .endpoint(&a_url)
        .endpoint(&b_url)
        .ca(&pair.pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .poll_interval(Duration::from_secs(600))
        .build()
        .expect("client");
    watcher.refresh().await.expect("warm");
    tokio::time::sleep(Duration::from_secs(args.before)).await;
    let killed_at = start.elapsed();
    let hang = args.fault == "hang";
    let pid = pair.a.server().pid();
    if hang {
        // SIGSTOP the node every client prefers: it keeps its sockets, answers nothing.
        let ok = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not SIGSTOP node A");
    } else {
        pair.a.kill(); // SIGKILL the node every client prefers
    }
    let fault_at = Instant::now();
    // A rotation on B (degraded: its peer is gone) right after the fault; the watcher must
    // learn it through a watch on B.
    let admin = pair.admin(&pair.b);
    let rotated = admin
        .post("/v1/admin/rotate", &serde_json::json!({"allow_degraded": true}))
        .await
        .expect("rotate on B");
    assert_eq!(rotated.status, 200, "rotate on B: {:?}", rotated.body);
    let new_primary = rotated.json()["key_id"].as_str().expect("key_id").to_owned();
    let rotated_after = fault_at.elapsed();
    let watch_seen = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if watcher.status().primary.map(|k| k.to_string()).as_deref() == Some(new_primary.as_str()) {
                break Some(fault_at.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    // A cold client (empty cache) pointed at the dead node first, then the survivor.
    let cold_started = Instant::now();
    let cold = make(&a_url, &b_url);
    let cold_first_key = match cold.seal(b"", b"first").await {
        Ok(_) => Some(cold_started.elapsed()),
        Err(_) => None,
    };
    tokio::time::sleep(total.saturating_sub(start.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    if hang {
        // Let the stopped node go, so it can be killed and nothing is left behind.
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status();
    }
    let mut merged = vec![Bucket::default(); buckets];
    for t in tasks {
        for (m, l) in merged.iter_mut().zip(t.await.expect("task")) {
            m.ops += l.ops;
            m.failed += l.failed;
            m.op_lat_us.extend(l.op_lat_us);
            m.fetch_lat_us.extend(l.fetch_lat_us);
            m.fetch_failed += l.fetch_failed;
        }
    }

    let kill_bucket = (killed_at.as_millis() / BUCKET.as_millis()) as usize;
    let series: Vec<(f64, f64, f64)> = merged
        .iter_mut()
        .map(|b| {
            (
                b.ops as f64 / BUCKET.as_secs_f64(),
                p99(&mut b.op_lat_us),
                p99(&mut b.fetch_lat_us),
            )
        })
        .collect();
    let failed: u64 = merged.iter().map(|b| b.failed).sum();
    let ops: u64 = merged.iter().map(|b| b.ops).sum();
    let fetch_failed: u64 = merged.iter().map(|b| b.fetch_failed).sum();
    let before_p99 = series[..kill_bucket].iter().map(|s| s.2).fold(0.0, f64::max);
    let spike = series[kill_bucket..].iter().map(|s| s.2).fold(0.0, f64::max);
    let op_spike = series[kill_bucket..].iter().map(|s| s.1).fold(0.0, f64::max);
    let op_before = series[..kill_bucket].iter().map(|s| s.1).fold(0.0, f64::max);
    let longest_fetch = merged[kill_bucket..]
        .iter()
        .flat_map(|b| b.fetch_lat_us.iter().copied())
        .max()
        .unwrap_or(0);
    let fault_name = if hang { "SIGSTOP (hang)" } else { "SIGKILL" };
    println!(
        "failover: {} clients, {fault_name} of node A at {:.1} s of {} s",
        args.clients,
        killed_at.as_secs_f64(),
        total.as_secs()
    );
    println!(
        "  seal+open: {ops} ok, {failed} failed; worst 100 ms-bucket p99 {:.1} us before the fault, {:.1} us after",
        op_before * 1e3,
        op_spike * 1e3
    );
    println!(
        "  keyring fetches over the network: {fetch_failed} failed; worst p99 {before_p99:.2} ms before, {spike:.2} ms after (the failover spike)"
    );
    println!(
        "  longest keyring fetch after the fault: {:.0} ms (target < 1000 ms)",
        f64::from(longest_fetch) / 1e3
    );
    match watch_seen {
        Some(t) => println!(
            "  watching client saw the rotation made on node B {:.0} ms after the fault (target < 3000 ms); \
             B answered the degraded rotation {:.0} ms after the fault",
            t.as_secs_f64() * 1e3,
            rotated_after.as_secs_f64() * 1e3
        ),
        None => println!("  watching client: did NOT see the rotation on node B within 30 s"),
    }
    match cold_first_key {
        Some(t) => println!(
            "  cold client, dead node listed first: first key from the survivor in {:.0} ms (target < 1000 ms)",
            t.as_secs_f64() * 1e3
        ),
        None => println!("  cold client: NO key from the survivor"),
    }
    std::fs::write(&args.out, svg(&series, kill_bucket, fault_name)).expect("write svg");
    println!("  timeline written to {}", args.out.display());
}

/// Two panels: ops/s; p99 latency of cached seal+open and of keyring fetches.
fn svg(series: &[(f64, f64, f64)], kill: usize, fault: &str) -> String {
    let (w, h, pad) = (760.0, 200.0, 50.0);
    let n = series.len().max(2) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
    let line = |top: f64, max: f64, values: &mut dyn Iterator<Item = f64>, colour: &str| {
        let pts: Vec<String> = values
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), top + h - h * v / max))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            pts.join(" ")
        )
    };
    let ops_max = series.iter().map(|s| s.0).fold(0.0, f64::max).max(1.0) * 1.1;
    let lat_max = series.iter().map(|s| s.1.max(s.2)).fold(0.0, f64::max).max(0.01) * 1.1;
    let l1 = line(30.0, ops_max, &mut series.iter().map(|s| s.0), "#1f77b4");
    let l2 = line(280.0, lat_max, &mut series.iter().map(|s| s.1), "#2ca02c");
    let l3 = line(280.0, lat_max, &mut series.iter().map(|s| s.2), "#d62728");
    let kx = x(kill);
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="520" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">seal+open per second, all clients, 100 ms buckets (axis max {ops_max:.0}/s)</text>
<rect x="{pad}" y="30" width="{iw}" height="{h}" fill="none" stroke="#ccc"/>
{l1}
<text x="{pad}" y="270">p99 per bucket, ms: green cached seal+open, red keyring fetch over the network (axis max {lat_max:.2} ms)</text>
<rect x="{pad}" y="280" width="{iw}" height="{h}" fill="none" stroke="#ccc"/>
{l2}
{l3}
<line x1="{kx:.1}" y1="30" x2="{kx:.1}" y2="480" stroke="black" stroke-dasharray="4 3"/>
<text x="{kxt:.1}" y="500">{fault} of node A</text>
</svg>
"##,
        iw = w - 2.0 * pad,
        kxt = kx + 4.0,
    )
}
