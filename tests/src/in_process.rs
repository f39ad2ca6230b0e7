//! The real server code in this process, under a clock the test moves.
//!
//! [`InProcessServer::start`] opens the setup's real store (a temp dir) and runs
//! [`sso_server::run`] as a task of the test's own runtime, on loopback listeners, with real
//! TLS. Meant for `#[tokio::test(start_paused = true)]`: every timer of the server (the
//! staging pause, a watch's deadline, timeouts) then runs on tokio's paused clock, which
//! moves only when the test calls `tokio::time::advance`.
//!
//! Why the requests run on a blocking thread: with the clock paused, tokio jumps it to the
//! next timer whenever the runtime has nothing to run, which includes every wait for a
//! socket. A request in flight would let a 250 ms staging pause or a 25 s watch deadline
//! pass between two packets. Tokio does not auto-advance while a `spawn_blocking` task
//! runs (see `tokio::time::pause`), so each request here is made by the process tests'
//! own [`Client`] on a blocking thread (with a small runtime of its own, on real time), and
//! the server's clock stands still until the test advances it. A request the server holds
//! (a watch, a rotation in its pause) keeps the clock still too, so the test can look at
//! the server at any instant of the wait.
//!
//! Real-time bounds ([`InProcessServer::settle`]) only ever limit how long a test waits
//! for something that must happen; no assertion depends on how fast the machine is.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::{CertFiles, Client, Pki, Reply, ServerSetup};

/// How long (real time) a test waits for an answer the server owes it.
pub const ANSWER_BOUND: Duration = Duration::from_secs(30);

/// `sso_server::run` on a task of the calling (paused-clock) runtime.
#[derive(Debug)]
pub struct InProcessServer {
    /// The HTTPS (mTLS) listener's address.
    pub https: SocketAddr,
    /// The metrics listener's address.
    pub metrics: SocketAddr,
    ca: std::path::PathBuf,
    task: JoinHandle<Result<(), sso_server::ServerError>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcessServer {
    /// Loads `setup`'s config (as `sso-server --config` would), opens its store and runs
    /// the server on loopback. Call from inside a tokio runtime (current-thread, so the
    /// clock can be paused).
    pub async fn start(setup: &ServerSetup, pki: &Pki) -> Self {
        let config = sso_server::Config::load(&setup.config).unwrap_or_else(|e| panic!("{e}"));
        let key = keystore::UnsealKey::key_file(&setup.unseal_key).unwrap();
        let store = keystore::SealedStore::open(&config.store.path, &key).unwrap();
        let https = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (https_addr, metrics_addr) = (https.local_addr().unwrap(), metrics.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sso_server::run(config, store, https, metrics, async move {
            let _ = stopped.await;
        }));
        Self {
            https: https_addr,
            metrics: metrics_addr,
            ca: pki.ca_file.clone(),
            task,
            stop: Some(stop),
        }
    }

    /// Starts one request as `who` on a blocking thread (the clock stands still while it is
    /// in flight); await the handle for its answer.
    pub fn request(&self, who: &CertFiles, method: &str, path: &str, body: Option<&serde_json::Value>) -> Request {
        let client = Client::new(self.https, &self.ca, Some(who));
        let (method, path) = (method.to_owned(), path.to_owned());
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        Request(tokio::task::spawn_blocking(move || {
            on_real_time(async move { client.request(&method, &path, body).await })
        }))
    }

    /// One request as `who`, answered (within [`ANSWER_BOUND`] of real time).
    pub async fn call(&self, who: &CertFiles, method: &str, path: &str, body: Option<&serde_json::Value>) -> Reply {
        self.request(who, method, path, body).answer().await
    }

    /// The metrics page, read on a blocking thread.
    pub async fn metrics_text(&self) -> String {
        let addr = self.metrics;
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(ANSWER_BOUND)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap()
    }

    /// The value of one metric series (exact name with labels), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (real time, clock still) until `cond` holds on the metrics page, e.g. until a
    /// watch is parked. Panics after [`ANSWER_BOUND`].
    pub async fn settle(&self, what: &str, cond: impl Fn(&str) -> bool) {
        let started = std::time::Instant::now();
        loop {
            if cond(&self.metrics_text().await) {
                return;
            }
            assert!(started.elapsed() < ANSWER_BOUND, "never settled: {what}");
            // Real time, on a blocking thread: the paused clock does not move.
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(10)))
                .await
                .unwrap();
        }
    }

    /// Stops the server (its shutdown future completes) and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The drain is bounded by limits.shutdown_grace_ms on the paused clock: auto-advance
        // carries it through once nothing is in flight.
        (&mut self.task).await.unwrap().unwrap();
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request in flight on a blocking thread.
#[derive(Debug)]
pub struct Request(JoinHandle<Result<Reply, String>>);

impl Request {
    /// Whether the answer has arrived.
    pub fn is_answered(&self) -> bool {
        self.0.is_finished()
    }

    /// The answer; panics on a transport error or after [`ANSWER_BOUND`] (real time; the
    /// client's own runtime bounds it, so the paused clock cannot hide a hang).
    pub async fn answer(self) -> Reply {
        self.0.await.unwrap().unwrap_or_else(|e| panic!("request failed: {e}"))
    }
}

/// Runs `f` to completion on a fresh current-thread runtime of its own, on real time,
/// bounded by [`ANSWER_BOUND`].
fn on_real_time<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            tokio::time::timeout(ANSWER_BOUND, f)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {ANSWER_BOUND:?}")))
        })
}
