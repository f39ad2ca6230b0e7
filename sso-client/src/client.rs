//! [`Client`]: seal and open against the cache, and the background work that keeps the
//! cache fresh (watch long-poll, periodic poll, on-demand fetch of unknown keys).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use sso_proto::delivery::Recipient;
use sso_proto::{EnvelopeRef, KeyId, envelope};
use tokio::sync::OnceCell;

use crate::Error;
use crate::cache::{self, Cache, CachedKey, KeyHandle};
use sso_transport::{Header, Transport};

/// How long a watch long-poll may stay open; the server answers 204 well before.
const WATCH_TIMEOUT: Duration = Duration::from_secs(40);
/// Timeout of ordinary fetches (keyring, one key).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a key id is not found, ask again no sooner than this.
const MISS_TTL: Duration = Duration::from_secs(1);
/// An on-demand fetch asks the next endpoint when the one asked has not answered within
/// this (a hung server accepts connections and never answers).
const HEDGE_DELAY: Duration = Duration::from_millis(250);
/// With nothing cached, retry at least this often.
const COLD_RETRY_MAX: Duration = Duration::from_secs(1);
/// How often down endpoints are probed, and how long a probe waits for an answer.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Configures a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    poll_interval: Duration,
    max_stale: Option<Duration>,
    connect_timeout: Duration,
    watch: bool,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            poll_interval: Duration::from_secs(30),
            max_stale: None,
            connect_timeout: Duration::from_millis(500),
            watch: true,
        }
    }
}

impl ClientBuilder {
    /// Adds a server, `https://host:port`. Servers are tried in the order added; the last
    /// one that answered is tried first.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// The CA that server certificates chain to (PEM).
    pub fn ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    /// This client's certificate and private key (PEM).
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// Backup poll interval (default 30 s; each wait is jittered by up to ±20 %).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Refuse to seal or open once no server has been reached for this long. Unset by
    /// default: the cache serves for as long as the process lives.
    pub fn max_stale(mut self, bound: Duration) -> Self {
        self.max_stale = Some(bound);
        self
    }

    /// Bound on TCP connect plus TLS and HTTP/2 handshakes per endpoint (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Whether to hold a watch long-poll open (default yes). Without it, rotations arrive
    /// with the periodic poll or on demand.
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    fn tls(&self) -> Result<rustls::ClientConfig, Error> {
        let need =
            |p: &Option<PathBuf>, what: &str| p.clone().ok_or_else(|| Error::Config(format!("{what} is not set")));
        let (ca, cert, key) = (
            need(&self.ca, "ca")?,
            need(&self.cert, "client certificate")?,
            need(&self.key, "client key")?,
        );
        let config = sso_tls::ClientTls::trusting(sso_tls::load_roots(&ca)?)
            .identity_files(&cert, &key)?
            .alpn(&[b"h2"])
            .build()?;
        Ok(config)
    }

    /// Builds the client and starts its background work on the current tokio runtime.
    /// Nothing is fetched synchronously: with every server down this still succeeds, and
    /// calls fail with [`Error::Unavailable`] until a server answers.
    pub fn build(self) -> Result<Client, Error> {
        // Buffered envelope nonces: one atomic load per seal to notice a fork, instead of a
        // getpid() system call (sso_proto::nonce).
        sso_os::hardening::install_fork_hook();
        let transport = Transport::new(&self.endpoints, Arc::new(self.tls()?), self.connect_timeout)?;
        let inner = Arc::new(Inner {
            transport,
            cache: ArcSwap::from_pointee(Cache::default()),
            last_contact_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            max_stale: self.max_stale,
            poll_interval: self.poll_interval,
            refresh: tokio::sync::Mutex::new(()),
            inflight: tokio::sync::Mutex::new(HashMap::new()),
            misses: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        });
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("build() must run inside a tokio runtime; use BlockingClient otherwise".into())
        })?;
        let mut tasks = vec![
            runtime.spawn(poll_loop(inner.clone())),
            runtime.spawn(probe_loop(inner.clone())),
        ];
        if self.watch {
            tasks.push(runtime.spawn(watch_loop(inner.clone())));
        }
        Ok(Client {
            inner,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }
}

/// Aborts the background tasks when the last [`Client`] clone goes, so the tasks' share of
/// the state (and with it every key) is dropped and wiped.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// One shared result per key id being fetched.
type Inflight = HashMap<KeyId, Arc<OnceCell<Result<KeyHandle, Error>>>>;

pub(crate) struct Inner {
    transport: Transport,
    cache: ArcSwap<Cache>,
    /// Unix milliseconds of the last answer from any server (0: never).
    last_contact_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    max_stale: Option<Duration>,
    poll_interval: Duration,
    /// Serialises full keyring fetches so a cold start by many callers costs one.
    refresh: tokio::sync::Mutex<()>,
    /// On-demand fetches in flight, so concurrent misses on one key id share one request.
    inflight: tokio::sync::Mutex<Inflight>,
    /// Key ids recently not found, to rate-limit lookups of garbage ids.
    misses: Mutex<HashMap<KeyId, (Instant, Error)>>,
    /// Fired when a down endpoint answers a probe, so the watch and the poll stop waiting
    /// out their backoff.
    wake: tokio::sync::Notify,
}

/// A client of the key service. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cache = self.inner.cache.load();
        f.debug_struct("Client")
            .field("keys", &cache.keys.len())
            .field("primary", &cache.primary.as_ref().map(|k| k.meta.key_id))
            .field("epoch", &cache.epoch)
            .finish_non_exhaustive()
    }
}

/// How current the cache is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// A server answered within the poll interval, and not every endpoint is down.
    Fresh,
    /// Serving from cache: keys are cached but no server has answered since this time
    /// (longer ago than the poll interval, or every endpoint failed since).
    Stale {
        /// Last answer from a server.
        since: SystemTime,
    },
    /// Nothing cached: the client cannot work until a server answers.
    Empty,
}

/// What [`Client::status`] reports.
#[derive(Debug, Clone)]
pub struct Status {
    /// Fresh, stale since, or empty.
    pub freshness: Freshness,
    /// The key new envelopes are sealed under.
    pub primary: Option<KeyId>,
    /// Keys cached.
    pub keys: usize,
    /// Epoch of the last keyring applied (kept while serving from cache).
    pub epoch: u64,
    /// The endpoint the last keyring came from (kept while serving from cache).
    pub endpoint: Option<String>,
    /// The last error talking to the servers, if the last attempt failed.
    pub last_error: Option<String>,
}

impl Client {
    /// Starts configuring a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Seals `plaintext` under the primary key, binding `aad`. Served from the cache
    /// while servers are down; a cold cache fetches the keyring first.
    pub async fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        if let Some(result) = self.try_seal_cached(aad, plaintext) {
            return result;
        }
        self.inner.refresh_keyring().await?;
        self.try_seal_cached(aad, plaintext)
            .unwrap_or_else(|| Err(Error::Unavailable("the keyring has no primary key yet".into())))
    }

    /// Opens an envelope. A key id not in the cache is fetched on demand.
    pub async fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Error> {
        let parsed = EnvelopeRef::parse(sealed)?;
        self.inner.check_stale()?;
        if let Some(key) = self.inner.cache.load().keys.get(&parsed.key_id) {
            return Ok(parsed.open(&key.envelope, aad)?);
        }
        let key = self.inner.fetch_key(parsed.key_id).await?;
        Ok(parsed.open(&key.0.envelope, aad)?)
    }

    /// The seal fast path: no await, no lock. `None` when nothing is cached yet.
    pub fn try_seal_cached(&self, aad: &[u8], plaintext: &[u8]) -> Option<Result<Vec<u8>, Error>> {
        let cache = self.inner.cache.load();
        let key = cache.primary.as_ref()?;
        Some(
            self.inner
                .check_stale()
                .and_then(|()| Ok(envelope::seal(&key.envelope, aad, plaintext)?)),
        )
    }

    /// The open fast path: `None` when the envelope's key is not cached.
    pub fn try_open_cached(&self, aad: &[u8], sealed: &[u8]) -> Option<Result<Vec<u8>, Error>> {
        let parsed = match EnvelopeRef::parse(sealed) {
            Ok(p) => p,
            Err(e) => return Some(Err(e.into())),
        };
        let cache = self.inner.cache.load();
        let key = cache.keys.get(&parsed.key_id)?;
        Some(
            self.inner
                .check_stale()
                .and_then(|()| Ok(parsed.open(&key.envelope, aad)?)),
        )
    }

    /// A handle to the primary key's raw bytes.
    pub async fn primary_key(&self) -> Result<KeyHandle, Error> {
        if let Some(k) = self.inner.cache.load().primary.clone() {
            return Ok(KeyHandle(k));
        }
        self.inner.refresh_keyring().await?;
        self.inner
            .cache
            .load()
            .primary
            .clone()
            .map(KeyHandle)
            .ok_or_else(|| Error::Unavailable("no primary key yet".into()))
    }

    /// A handle to one key's raw bytes, fetched on demand if needed.
    pub async fn key(&self, key_id: KeyId) -> Result<KeyHandle, Error> {
        if let Some(k) = self.inner.cache.load().keys.get(&key_id) {
            return Ok(KeyHandle(k.clone()));
        }
        self.inner.fetch_key(key_id).await
    }

    /// A cached key by id, without network (the lookup the open path does).
    pub fn cached_key(&self, key_id: &KeyId) -> Option<KeyHandle> {
        self.inner.cache.load().keys.get(key_id).cloned().map(KeyHandle)
    }

    /// Whether `key_id` is cached (no network).
    pub fn is_cached(&self, key_id: &KeyId) -> bool {
        self.inner.cache.load().keys.contains_key(key_id)
    }

    /// How often the keyring is polled when no watch answers.
    pub fn poll_interval(&self) -> Duration {
        self.inner.poll_interval
    }

    /// Fresh / stale since / empty, the primary, the last error.
    pub fn status(&self) -> Status {
        let cache = self.inner.cache.load();
        let last = self.inner.last_contact();
        let all_down = (0..self.inner.transport.len()).all(|i| self.inner.transport.is_down(i));
        let freshness = match (cache.keys.is_empty(), last) {
            (true, _) => Freshness::Empty,
            (false, Some(t)) if !all_down && t.elapsed().unwrap_or_default() <= self.inner.poll_interval => {
                Freshness::Fresh
            }
            (false, t) => Freshness::Stale {
                since: t.unwrap_or(UNIX_EPOCH),
            },
        };
        Status {
            freshness,
            primary: cache.primary.as_ref().map(|k| k.meta.key_id),
            keys: cache.keys.len(),
            epoch: cache.epoch,
            endpoint: cache.endpoint.map(|i| self.inner.transport.url(i).to_owned()),
            last_error: self.inner.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Fetches the whole keyring now (for example to warm the cache at start).
    pub async fn refresh(&self) -> Result<(), Error> {
        self.inner.refresh_keyring().await
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Inner {
    fn last_contact(&self) -> Option<SystemTime> {
        match self.last_contact_ms.load(Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    fn contact_ok(&self) {
        self.last_contact_ms.store(now_ms(), Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn contact_failed(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_owned());
    }

    fn check_stale(&self) -> Result<(), Error> {
        let Some(bound) = self.max_stale else { return Ok(()) };
        let last = self.last_contact_ms.load(Relaxed);
        if now_ms().saturating_sub(last) > bound.as_millis() as u64 {
            return Err(Error::Stale {
                since: UNIX_EPOCH + Duration::from_millis(last),
            });
        }
        Ok(())
    }

    /// Applies a wrapped keyring body from endpoint `idx`, the answer to the request at
    /// `context` that carried `recipient`'s public key.
    fn apply(&self, idx: usize, body: &[u8], recipient: Recipient, context: &str) -> Result<(), Error> {
        let wire = sso_proto::wire::parse_keyring(body).map_err(|problem| self.protocol(idx, problem))?;
        let opener = sso_proto::wire::opener(wire.wrap.as_ref(), recipient, context)
            .map_err(|problem| self.protocol(idx, problem))?;
        let current = self.cache.load();
        let next = cache::apply(&current, wire, idx, Some(&opener));
        // The keys were built by value in the frames below this one: wipe what they left.
        sso_proto::delivery::scrub_stack_after_install();
        let next = next.map_err(|problem| self.protocol(idx, problem))?;
        drop(opener);
        let changed = next.epoch != current.epoch
            || next.endpoint != current.endpoint
            || next.keys.len() != current.keys.len()
            || next.primary.as_ref().map(|k| k.meta.key_id) != current.primary.as_ref().map(|k| k.meta.key_id);
        drop(current);
        self.cache.store(Arc::new(next));
        if changed {
            tracing::debug!(endpoint = self.transport.url(idx), "keyring updated");
        }
        Ok(())
    }

    fn protocol(&self, idx: usize, problem: String) -> Error {
        Error::Protocol {
            endpoint: self.transport.url(idx).to_owned(),
            problem,
        }
    }

    /// Fetches and applies the whole keyring; concurrent callers share one fetch.
    async fn refresh_keyring(&self) -> Result<(), Error> {
        let seen = self.last_contact_ms.load(Relaxed);
        let _guard = self.refresh.lock().await;
        if self.last_contact_ms.load(Relaxed) != seen && self.cache.load().primary.is_some() {
            return Ok(()); // someone else refreshed while we waited
        }
        let (recipient, header) = wrap_request()?;
        match self
            .transport
            .get_hedged_with("/v1/keyring", &header, FETCH_TIMEOUT, HEDGE_DELAY, |s| s == 200)
            .await
        {
            Ok((idx, reply)) => {
                self.contact_ok();
                self.apply(idx, &reply.body, recipient, "/v1/keyring")
            }
            Err(said) => {
                let e = said
                    .iter()
                    .map(|(idx, r)| match r {
                        Ok(status) => format!("{} answered {status}", self.transport.url(*idx)),
                        Err(e) => format!("{}: {e}", self.transport.url(*idx)),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                self.contact_failed(&e);
                Err(Error::Unavailable(e))
            }
        }
    }

    /// Fetches one key by id: deduplicated per id, and a miss is remembered briefly so a
    /// stream of envelopes under a bogus id costs one request per second, not one each.
    async fn fetch_key(&self, key_id: KeyId) -> Result<KeyHandle, Error> {
        if let Some((at, e)) = self.misses.lock().unwrap_or_else(|p| p.into_inner()).get(&key_id)
            && at.elapsed() < MISS_TTL
        {
            return Err(e.clone());
        }
        let cell = {
            let mut inflight = self.inflight.lock().await;
            inflight
                .entry(key_id)
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let result = cell.get_or_init(|| self.fetch_key_now(key_id)).await.clone();
        self.inflight.lock().await.remove(&key_id);
        if let Err(e @ (Error::UnknownKey { .. } | Error::KeyRetired(_))) = &result {
            let mut misses = self.misses.lock().unwrap_or_else(|p| p.into_inner());
            misses.retain(|_, (at, _)| at.elapsed() < MISS_TTL);
            misses.insert(key_id, (Instant::now(), e.clone()));
        }
        result
    }

    async fn fetch_key_now(&self, key_id: KeyId) -> Result<KeyHandle, Error> {
        if let Some(k) = self.cache.load().keys.get(&key_id) {
            return Ok(KeyHandle(k.clone()));
        }
        // Every endpoint is asked before the key is called unknown: during a partition a
        // key rotated on one node is unknown to the other. Hedged, so a hung endpoint
        // costs HEDGE_DELAY, not FETCH_TIMEOUT.
        let path = format!("/v1/keys/{key_id}");
        let (recipient, header) = wrap_request()?;
        let said = match self
            .transport
            .get_hedged_with(&path, &header, FETCH_TIMEOUT, HEDGE_DELAY, |s| s == 200 || s == 410)
            .await
        {
            Ok((idx, reply)) => {
                self.contact_ok();
                if reply.status == 410 {
                    return Err(Error::KeyRetired(key_id));
                }
                let wire = sso_proto::wire::parse_key(&reply.body).map_err(|p| self.protocol(idx, p))?;
                if wire.key_id != key_id {
                    return Err(self.protocol(idx, format!("asked for key {key_id}, got {}", wire.key_id)));
                }
                let opener =
                    sso_proto::wire::opener(wire.wrap.as_ref(), recipient, &path).map_err(|p| self.protocol(idx, p))?;
                let key = build_key(wire, &opener);
                // The key was built by value below this frame: wipe what it left there.
                sso_proto::delivery::scrub_stack_after_install();
                let key: Arc<CachedKey> = key.map_err(|p| self.protocol(idx, p))?;
                drop(opener);
                let current = self.cache.load();
                self.cache.store(Arc::new(cache::with_key(&current, key.clone())));
                return Ok(KeyHandle(key));
            }
            Err(said) => said,
        };
        let asked: Vec<String> = said
            .iter()
            .map(|(idx, r)| match r {
                Ok(status) => format!("{} answered {status}", self.transport.url(*idx)),
                Err(e) => format!("{}: {e}", self.transport.url(*idx)),
            })
            .collect();
        if said.iter().any(|(_, r)| r.is_ok()) {
            self.contact_ok();
        } else {
            self.contact_failed(&asked.join("; "));
        }
        if said.iter().any(|(_, r)| matches!(r, Ok(404))) {
            return Err(Error::UnknownKey { key_id, asked });
        }
        if let Some((idx, Ok(other))) = said.iter().find(|(_, r)| r.is_ok()) {
            return Err(self.protocol(*idx, format!("status {other} for a key fetch")));
        }
        Err(Error::Unavailable(asked.join("; ")))
    }
}

/// Opens a one-key answer into its final place (an `Arc`), in a frame of its own so the
/// caller can scrub the by-value copies made on the way.
#[inline(never)]
fn build_key(wire: sso_proto::wire::Key, opener: &sso_proto::delivery::Opener) -> Result<Arc<CachedKey>, String> {
    cache::cached(wire, Some(opener), 0).map(Arc::new)
}

/// A fresh key pair for one key request, and the `Sso-Key-Wrap` header that carries its
/// public half: every keyring, watch and key request asks for wrapped delivery.
fn wrap_request() -> Result<(Recipient, [Header; 1]), Error> {
    let recipient = Recipient::generate(&ring::rand::SystemRandom::new())?;
    let value = hyper::header::HeaderValue::from_str(&recipient.header_value())
        .map_err(|_| Error::Config("the key-wrap header is not a valid header value".into()))?;
    let name = hyper::header::HeaderName::from_static(sso_proto::delivery::HEADER);
    Ok((recipient, [(name, value)]))
}

fn jittered(base: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    let unit = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..1
    base.mul_f64(0.8 + 0.4 * unit)
}

/// The wait before the next periodic poll: about 62 to 94 % of the interval, so a client whose
/// server answers every poll never goes longer than the interval without an answer (the
/// bound [`Freshness::Fresh`] uses).
fn poll_wait(interval: Duration) -> Duration {
    jittered(interval.mul_f64(0.78))
}

/// Sleeps for `wait`, or until a down endpoint answers a probe.
async fn nap(inner: &Inner, wait: Duration) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = inner.wake.notified() => {}
    }
}

/// Holds a watch long-poll open; applies each answer; backs off exponentially on errors.
async fn watch_loop(inner: Arc<Inner>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let cache = inner.cache.load();
        let (after, idx) = (cache.epoch, cache.endpoint);
        drop(cache);
        // Epochs are per node: ask the node the cache came from for changes after its
        // epoch; when that node is down, any other node for its whole keyring (the cache
        // keeps its epoch and endpoint until another node's keyring is applied).
        let (recipient, header) = match wrap_request() {
            Ok(r) => r,
            Err(e) => {
                inner.contact_failed(&e.to_string());
                nap(&inner, jittered(backoff)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let result = match idx.filter(|&i| !inner.transport.is_down(i)) {
            Some(i) => inner
                .transport
                .get_on_with(i, &format!("/v1/keyring/watch?after={after}"), &header, WATCH_TIMEOUT)
                .await
                .map(|r| (i, r))
                .map_err(|e| (Some(i), e)),
            None => inner
                .transport
                .get_with("/v1/keyring/watch?after=0", &header, WATCH_TIMEOUT)
                .await
                .map_err(|e| (None, e)),
        };
        let ok = match result {
            Ok((i, reply)) if reply.status == 200 => {
                inner.contact_ok();
                match inner.apply(i, &reply.body, recipient, "/v1/keyring/watch") {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "a watch answer was refused");
                        false
                    }
                }
            }
            Ok((_, reply)) if reply.status == 204 => {
                inner.contact_ok();
                true
            }
            Ok((i, reply)) => {
                inner.contact_failed(&format!("{} answered {}", inner.transport.url(i), reply.status));
                if reply.status == 503 {
                    // Shutting down (or out of watch slots): watch another node now.
                    inner.transport.mark_down(i);
                    if idx == Some(i) {
                        continue;
                    }
                }
                false
            }
            Err((on, e)) => {
                inner.contact_failed(&e);
                if on.is_some() {
                    // That node is gone (marked down by the failure): fail over at once.
                    continue;
                }
                false
            }
        };
        if ok {
            backoff = BACKOFF_MIN;
        } else {
            nap(&inner, jittered(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// The periodic poll: a safety net under the watch (a silently dead connection, a missed
/// answer). The first poll runs at once, to warm the cache.
async fn poll_loop(inner: Arc<Inner>) {
    let mut backoff = BACKOFF_MIN;
    let mut warm = false;
    loop {
        let ok = inner.refresh_keyring().await.is_ok();
        warm |= ok;
        let wait = if ok {
            backoff = BACKOFF_MIN;
            poll_wait(inner.poll_interval)
        } else if !warm {
            // Cold: keep trying quickly (with backoff, at most a second apart) until a
            // first answer; the probe below wakes this loop sooner.
            let w = jittered(backoff);
            backoff = (backoff * 2).min(COLD_RETRY_MAX);
            w
        } else {
            poll_wait(inner.poll_interval.min(backoff.max(BACKOFF_MIN) * 8))
        };
        nap(&inner, wait).await;
    }
}

/// Probes every endpoint marked down, about twice a second, with a health request: an
/// endpoint that answers is up again (tried in its turn, the last that answered first),
/// and the watch and poll loops are woken so a returning server is used at once.
async fn probe_loop(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(jittered(PROBE_INTERVAL)).await;
        for idx in 0..inner.transport.len() {
            if !inner.transport.is_down(idx) {
                continue;
            }
            if let Ok(reply) = inner.transport.get_on(idx, "/v1/health", PROBE_TIMEOUT).await {
                tracing::debug!(
                    endpoint = inner.transport.url(idx),
                    status = reply.status,
                    "endpoint is back"
                );
                inner.contact_ok();
                inner.wake.notify_waiters();
            }
        }
    }
}

/// A blocking wrapper for code that does not run on tokio: owns a small runtime that runs
/// the background work. Must not be used from inside a tokio runtime.
pub struct BlockingClient {
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient").field("client", &self.client).finish()
    }
}

impl BlockingClient {
    /// Builds a client on a private one-thread runtime.
    pub fn new(builder: ClientBuilder) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sso-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the client runtime: {e}")))?;
        let client = {
            let _enter = runtime.enter();
            builder.build()?
        };
        Ok(Self { client, runtime })
    }

    /// [`Client::seal`], blocking only when the cache is cold.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        match self.client.try_seal_cached(aad, plaintext) {
            Some(r) => r,
            None => self.runtime.block_on(self.client.seal(aad, plaintext)),
        }
    }

    /// [`Client::open`], blocking only when the key is not cached.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Error> {
        match self.client.try_open_cached(aad, sealed) {
            Some(r) => r,
            None => self.runtime.block_on(self.client.open(aad, sealed)),
        }
    }

    /// [`Client::status`].
    pub fn status(&self) -> Status {
        self.client.status()
    }

    /// [`Client::key`].
    pub fn key(&self, key_id: KeyId) -> Result<KeyHandle, Error> {
        self.runtime.block_on(self.client.key(key_id))
    }

    /// The async client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }
}
