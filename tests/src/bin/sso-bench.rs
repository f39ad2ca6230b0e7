//! `sso-bench`: an mTLS HTTP load generator, so the server and a baseline (nginx) are
//! measured with the same client.
//!
//! Modes: `keepalive` (each connection sends requests back to back) and `handshake` (a new
//! TCP connection and full TLS 1.3 handshake per request; resumption is off). Reports
//! requests/s, p50 and p99 latency and errors, as text and as one JSON line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    Keepalive,
    Handshake,
}

/// mTLS HTTP/1.1 load generator.
#[derive(Parser, Debug)]
struct Args {
    /// Target, e.g. https://127.0.0.1:7443/v1/keyring
    url: String,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Concurrent connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    /// Seconds to run.
    #[arg(long, short = 'd', default_value_t = 10)]
    duration: u64,
    #[arg(long, value_enum, default_value_t = Mode::Keepalive)]
    mode: Mode,
    /// Label for the JSON line.
    #[arg(long, default_value = "run")]
    label: String,
    /// Client threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Target {
    addr: String,
    path: String,
    host: String,
}

fn parse_url(url: &str) -> Target {
    let rest = url.strip_prefix("https://").expect("only https:// URLs");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
        .to_owned();
    Target {
        addr: authority.to_owned(),
        path: path.to_owned(),
        host,
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let mut config = sso_tls::ClientTls::trusting(sso_tls::load_roots(&args.ca).expect("ca file"))
        .identity_files(&args.cert, &args.key)
        .expect("client certificate and key")
        .alpn(&[b"http/1.1"])
        .build()
        .expect("client config");
    // Every handshake in `handshake` mode is a full one.
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    let target = Arc::new(parse_url(&args.url));
    let deadline = Instant::now() + Duration::from_secs(args.duration);

    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (config, target) = (config.clone(), target.clone());
        let mode = args.mode;
        tasks.push(tokio::spawn(
            async move { worker(config, target, mode, deadline).await },
        ));
    }
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0u64;
    let started = Instant::now();
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        f64::from(latencies[i]) / 1000.0
    };
    let rps = latencies.len() as f64 / elapsed;
    println!(
        "{}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} ok, {} errors ({:?}, {} connections, {:.1} s)",
        args.label,
        rps,
        pct(0.5),
        pct(0.99),
        latencies.len(),
        errors,
        args.mode,
        args.connections,
        elapsed
    );
    println!(
        "{{\"label\":\"{}\",\"rps\":{rps:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"ok\":{},\"errors\":{errors}}}",
        args.label,
        pct(0.5),
        pct(0.99),
        latencies.len()
    );
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(config: &Arc<rustls::ClientConfig>, target: &Target) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(&target.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(target.host.clone()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

async fn request(send: &mut Sender, target: &Target) -> Result<(), String> {
    let req = hyper::Request::get(&target.path)
        .header("host", &target.host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await.map_err(|e| e.to_string())?;
    if ok { Ok(()) } else { Err("non-2xx".into()) }
}

async fn worker(
    config: Arc<rustls::ClientConfig>,
    target: Arc<Target>,
    mode: Mode,
    deadline: Instant,
) -> (Vec<u32>, u64) {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    let mut conn: Option<Sender> = None;
    while Instant::now() < deadline {
        let start = Instant::now();
        let result = async {
            if mode == Mode::Handshake || conn.is_none() {
                conn = Some(connect(&config, &target).await?);
            }
            let send = conn.as_mut().ok_or("no connection")?;
            request(send, &target).await
        }
        .await;
        match result {
            Ok(()) => latencies.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
            Err(_) => {
                errors += 1;
                conn = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if mode == Mode::Handshake {
            conn = None;
        }
    }
    (latencies, errors)
}
