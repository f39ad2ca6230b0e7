//! `sso-kms-bench`: Encrypt+Decrypt round trips per second over the agent's KMS v2 gRPC
//! socket, side by side with seal+open over its HTTP/JSON socket, in one run against one
//! agent, and their ratio.
//!
//! It starts a real `sso-server` and `sso-agent` (built like the tests build them) in a
//! temporary directory, warms the cache, then alternates rounds of the two protocols so
//! both see the same machine load. Each worker holds one connection and sends a 32-byte
//! plaintext (a KMS DEK seed) then opens the answer, back to back.
//!
//! `cargo run --release -p tests --bin sso-kms-bench -- --workers 8 --seconds 3 --rounds 3`
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use secrecy::ExposeSecret;
use sso_agent::kms::v2::{DecryptRequest, EncryptRequest};
use sso_proto::wire::agent::{OpenAnswer, SealAnswer};
use tests::{Pki, ServerSetup, TestAgent, TestServer, bin};

/// KMS v2 gRPC vs HTTP/JSON round trips through one sso-agent.
#[derive(Parser, Debug)]
struct Args {
    /// Concurrent connections per protocol.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds per protocol (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("a"), &pki, "node-a");
    let port = setup.pin_ports();
    let _server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
    let config = dir.path().join("agent.toml");
    let mut agent_config = pki.agent_config("client", format!("https://localhost:{port}"), "agent.sock");
    agent_config.kms = Some(sso_agent::agent::KmsConfig::new("kms.sock"));
    std::fs::write(&config, agent_config.to_toml()).unwrap();
    let agent = TestAgent::start(&config, &dir.path().join("agent.log"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args, agent.socket.clone(), agent.kms_socket.clone().unwrap()));
}

async fn run(args: Args, http: PathBuf, kms: PathBuf) {
    let round = Duration::from_secs(args.seconds);
    // Warm up both paths (first fetch of the keyring, connection setup).
    let _ = http_round(&http, 1, Duration::from_millis(500)).await;
    let _ = kms_round(&kms, 1, Duration::from_millis(500)).await;
    let (mut http_total, mut kms_total) = (0u64, 0u64);
    for r in 0..args.rounds {
        let h = http_round(&http, args.workers, round).await;
        let k = kms_round(&kms, args.workers, round).await;
        println!(
            "round {r}: http seal+open {:.0}/s, kms encrypt+decrypt {:.0}/s",
            h as f64 / round.as_secs_f64(),
            k as f64 / round.as_secs_f64()
        );
        http_total += h;
        kms_total += k;
    }
    let secs = round.as_secs_f64() * args.rounds as f64;
    let (h, k) = (http_total as f64 / secs, kms_total as f64 / secs);
    println!(
        "workers={} rounds={}x{}s: http seal+open {h:.0} round trips/s, kms encrypt+decrypt {k:.0} round trips/s, ratio kms/http {:.2}",
        args.workers,
        args.rounds,
        args.seconds,
        k / h
    );
    println!(
        "{}",
        serde_json::json!({"workers": args.workers, "http_per_s": h.round(), "kms_per_s": k.round(), "ratio_kms_over_http": (k / h * 100.0).round() / 100.0})
    );
}

async fn kms_round(socket: &Path, workers: usize, length: Duration) -> u64 {
    let end = Instant::now() + length;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let socket = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut kms = tests::kms_client(&socket).await;
            let seed = vec![w as u8; 32];
            let mut n = 0u64;
            while Instant::now() < end {
                let enc = kms
                    .encrypt(EncryptRequest {
                        plaintext: seed.clone(),
                        uid: String::new(),
                    })
                    .await
                    .expect("Encrypt")
                    .into_inner();
                let dec = kms
                    .decrypt(DecryptRequest {
                        ciphertext: enc.ciphertext,
                        uid: String::new(),
                        key_id: enc.key_id,
                        annotations: Default::default(),
                    })
                    .await
                    .expect("Decrypt")
                    .into_inner();
                assert_eq!(dec.plaintext, seed);
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One agent request; the answer read as its `sso_proto::wire::agent` type.
async fn post<T: serde::de::DeserializeOwned>(send: &mut Sender, path: &str, body: serde_json::Value) -> T {
    let req = hyper::Request::post(path)
        .header("host", "agent")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap();
    let resp = send.send_request(req).await.expect("HTTP request");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

async fn http_round(socket: &Path, workers: usize, length: Duration) -> u64 {
    let end = Instant::now() + length;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let socket = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let seed = base64::engine::general_purpose::STANDARD.encode(vec![w as u8; 32]);
            let mut n = 0u64;
            while Instant::now() < end {
                let sealed: SealAnswer = post(&mut send, "/v1/seal", serde_json::json!({"plaintext": seed})).await;
                let opened: OpenAnswer =
                    post(&mut send, "/v1/open", serde_json::json!({"envelope": sealed.envelope})).await;
                assert_eq!(opened.plaintext.expose_secret(), seed);
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}
