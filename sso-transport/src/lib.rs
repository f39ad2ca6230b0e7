//! Talking to the servers: one HTTP/2 connection per endpoint over mTLS, opened on demand
//! with a short bound on TCP connect plus TLS and HTTP/2 handshakes, and failover across
//! the endpoint list that starts at the last endpoint that answered.
//!
//! Its own crate because three audiences use it: the client library (`sso-client`, whose
//! `Client` applications use), the server's peer link and ssoctl; the server and ssoctl
//! need it without the client library. Client configurations come from `sso_tls`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use zeroize::Zeroizing;

/// A transport that cannot be built: no endpoint, or an endpoint that is not
/// `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client configuration: {0}")]
pub struct ConfigError(pub String);

/// Why a write on one endpoint failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    /// Whether the request may have reached the server's handler (and so may have taken
    /// effect there).
    pub reached: bool,
    /// What went wrong.
    pub message: String,
}

/// An answer: status and a body that is wiped when dropped (keyring bodies carry keys).
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The answer's headers (the pair's peer link reads who answered from them).
    pub headers: hyper::HeaderMap,
    /// The whole body.
    pub body: Zeroizing<Vec<u8>>,
}

struct Endpoint {
    url: String,
    authority: String,
    server_name: ServerName<'static>,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    /// Why the last connection ended, when it ended in an error: a TLS 1.3 server refuses
    /// a client certificate after the handshake, so the reason (an alert) surfaces in the
    /// connection task, not in the request that failed.
    conn_error: Arc<std::sync::Mutex<Option<String>>>,
    /// Set when a request or the connection failed (refused, timed out, HTTP/2 ping not
    /// answered), cleared by the next answer: down endpoints are tried after the others
    /// and probed in the background.
    down: Arc<AtomicBool>,
}

/// The endpoint list and its connections.
pub struct Transport {
    endpoints: Vec<Endpoint>,
    preferred: AtomicUsize,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    ping_interval: Duration,
    ping_timeout: Duration,
}

/// An extra request header.
pub type Header = (hyper::header::HeaderName, hyper::header::HeaderValue);

/// HTTP/2 keep-alive: a PING after this long without a frame from the server...
pub const PING_INTERVAL: Duration = Duration::from_millis(800);
/// ...and the connection fails when its answer does not come within this.
pub const PING_TIMEOUT: Duration = Duration::from_millis(800);

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("endpoints", &self.endpoints.iter().map(|e| &e.url).collect::<Vec<_>>())
            .finish()
    }
}

impl Transport {
    /// Endpoints are `https://host:port`; `tls` must offer ALPN `h2`.
    pub fn new(
        urls: &[String],
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
    ) -> Result<Self, ConfigError> {
        if urls.is_empty() {
            return Err(ConfigError("no endpoints configured".into()));
        }
        let endpoints = urls
            .iter()
            .map(|url| {
                let rest = url
                    .strip_prefix("https://")
                    .ok_or_else(|| ConfigError(format!("endpoint {url:?} must start with https://")))?;
                let authority = rest.trim_end_matches('/').to_owned();
                if authority.contains('/') {
                    return Err(ConfigError(format!("endpoint {url:?} must not have a path")));
                }
                let host = match authority.rsplit_once(':') {
                    Some((h, port)) if port.parse::<u16>().is_ok() => h,
                    _ => {
                        return Err(ConfigError(format!(
                            "endpoint {url:?} needs a port, e.g. https://host:7443"
                        )));
                    }
                };
                let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
                let server_name =
                    ServerName::try_from(host).map_err(|_| ConfigError(format!("endpoint {url:?}: invalid host")))?;
                Ok(Endpoint {
                    url: url.trim_end_matches('/').to_owned(),
                    authority,
                    server_name,
                    conn: tokio::sync::Mutex::new(None),
                    conn_error: Arc::new(std::sync::Mutex::new(None)),
                    down: Arc::new(AtomicBool::new(false)),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(Self {
            endpoints,
            preferred: AtomicUsize::new(0),
            tls,
            connect_timeout,
            ping_interval: PING_INTERVAL,
            ping_timeout: PING_TIMEOUT,
        })
    }

    /// The URL of endpoint `idx`.
    pub fn url(&self, idx: usize) -> &str {
        self.endpoints.get(idx).map_or("", |e| e.url.as_str())
    }

    /// How many endpoints there are.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the list is empty (never: [`Transport::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Whether endpoint `idx` is marked down (its last request or connection failed).
    pub fn is_down(&self, idx: usize) -> bool {
        self.endpoints.get(idx).is_some_and(|e| e.down.load(Relaxed))
    }

    /// Marks endpoint `idx` down (it said it is shutting down, say).
    pub fn mark_down(&self, idx: usize) {
        if let Some(e) = self.endpoints.get(idx) {
            e.down.store(true, Relaxed);
        }
    }

    /// The order to try endpoints in: the preferred one (the last that answered) and the
    /// others in list order, endpoints that are up before endpoints marked down.
    pub fn order(&self) -> Vec<usize> {
        let n = self.endpoints.len();
        let first = self.preferred.load(Relaxed);
        let rotated = (0..n).map(|i| (first + i) % n);
        let (up, down): (Vec<usize>, Vec<usize>) = rotated.partition(|&i| !self.is_down(i));
        up.into_iter().chain(down).collect()
    }

    /// GET `path`, trying endpoints in [`Transport::order`] one after the other. The
    /// endpoint that answers becomes the preferred one.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<(usize, Reply), String> {
        self.get_with(path, &[], timeout).await
    }

    /// [`Transport::get`] with extra request headers.
    pub async fn get_with(&self, path: &str, headers: &[Header], timeout: Duration) -> Result<(usize, Reply), String> {
        let mut errors = Vec::new();
        for idx in self.order() {
            match self.get_on_with(idx, path, headers, timeout).await {
                Ok(reply) => {
                    self.preferred.store(idx, Relaxed);
                    return Ok((idx, reply));
                }
                Err(e) => errors.push(format!("{}: {e}", self.endpoints[idx].url)),
            }
        }
        Err(errors.join("; "))
    }

    /// GET `path` on endpoints in [`Transport::order`], hedged: the next endpoint is asked
    /// as soon as one fails or answers with a status `done` does not accept, and also when
    /// none has answered within `hedge` (a hung server: accepts, never answers). The first
    /// answer `done` accepts wins and its endpoint becomes the preferred one; requests
    /// still running are dropped. Without a winner: what every endpoint said, in the
    /// order asked.
    pub async fn get_hedged(
        &self,
        path: &str,
        timeout: Duration,
        hedge: Duration,
        done: impl Fn(u16) -> bool,
    ) -> Result<(usize, Reply), Vec<(usize, Result<u16, String>)>> {
        self.get_hedged_with(path, &[], timeout, hedge, done).await
    }

    /// [`Transport::get_hedged`] with extra request headers (the same on every endpoint).
    pub async fn get_hedged_with(
        &self,
        path: &str,
        headers: &[Header],
        timeout: Duration,
        hedge: Duration,
        done: impl Fn(u16) -> bool,
    ) -> Result<(usize, Reply), Vec<(usize, Result<u16, String>)>> {
        type Pending<'a> = Vec<(usize, Pin<Box<dyn Future<Output = Result<Reply, String>> + Send + 'a>>)>;
        let mut order = self.order().into_iter();
        let mut pending: Pending<'_> = Vec::new();
        let mut said = Vec::new();
        loop {
            // Every turn of the loop follows a failure, a refused answer or the hedge delay
            // (or is the first): ask the next endpoint.
            if let Some(idx) = order.next() {
                pending.push((idx, Box::pin(self.get_on_with(idx, path, headers, timeout))));
            }
            if pending.is_empty() {
                return Err(said);
            }
            let more = order.len() > 0;
            let first_answer = std::future::poll_fn(|cx| {
                for (i, (_, f)) in pending.iter_mut().enumerate() {
                    if let Poll::Ready(r) = f.as_mut().poll(cx) {
                        return Poll::Ready((i, r));
                    }
                }
                Poll::Pending
            });
            tokio::select! {
                (i, result) = first_answer => {
                    let (idx, _) = pending.swap_remove(i);
                    match result {
                        Ok(reply) if done(reply.status) => {
                            self.preferred.store(idx, Relaxed);
                            return Ok((idx, reply));
                        }
                        Ok(reply) => said.push((idx, Ok(reply.status))),
                        Err(e) => said.push((idx, Err(e))),
                    }
                }
                () = tokio::time::sleep(hedge), if more => {}
            }
        }
    }

    /// Any request, trying the preferred endpoint first and then the others in order.
    pub async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(usize, Reply), String> {
        let mut errors = Vec::new();
        for idx in self.order() {
            match self.request_on(idx, method.clone(), path, body.clone(), timeout).await {
                Ok(reply) => {
                    self.preferred.store(idx, Relaxed);
                    return Ok((idx, reply));
                }
                Err(e) => errors.push(format!("{}: {e}", self.endpoints[idx].url)),
            }
        }
        Err(errors.join("; "))
    }

    /// GET `path` on one endpoint.
    pub async fn get_on(&self, idx: usize, path: &str, timeout: Duration) -> Result<Reply, String> {
        self.get_on_with(idx, path, &[], timeout).await
    }

    /// [`Transport::get_on`] with extra request headers.
    pub async fn get_on_with(
        &self,
        idx: usize,
        path: &str,
        headers: &[Header],
        timeout: Duration,
    ) -> Result<Reply, String> {
        self.send(idx, hyper::Method::GET, path, headers, Bytes::new(), timeout)
            .await
    }

    /// Any request on one endpoint, with a body (empty for GET).
    pub async fn request_on(
        &self,
        idx: usize,
        method: hyper::Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Reply, String> {
        self.send(idx, method, path, &[], body, timeout).await
    }

    /// A write on one endpoint: like [`Transport::request_on`] with headers, but a failure
    /// says whether the request may have reached the server's handler. `reached == false`
    /// only when it certainly did not (no connection, or the server refused the stream
    /// unprocessed): only then is sending the write elsewhere safe.
    pub async fn write_on(
        &self,
        idx: usize,
        method: hyper::Method,
        path: &str,
        headers: &[Header],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Reply, WriteFailure> {
        let not_sent = |message: String| WriteFailure {
            reached: false,
            message,
        };
        let endpoint = self
            .endpoints
            .get(idx)
            .ok_or_else(|| not_sent("no such endpoint".to_owned()))?;
        // A server ending a connection gracefully (GOAWAY at its maximum connection age, a
        // restart) refuses the streams it will not process; those never reached a handler,
        // so they are retried once on a fresh connection instead of failing the call.
        let mut retried = false;
        let result = loop {
            let mut send = match self.connection(endpoint).await {
                Ok(send) => send,
                Err(e) => {
                    endpoint.down.store(true, Relaxed);
                    return Err(not_sent(e));
                }
            };
            let req = headers
                .iter()
                .fold(
                    hyper::Request::builder()
                        .method(method.clone())
                        .uri(format!("https://{}{path}", endpoint.authority))
                        .header(hyper::header::CONTENT_TYPE, "application/json"),
                    |req, (name, value)| req.header(name, value),
                )
                .body(Full::new(body.clone()))
                .map_err(|e| not_sent(e.to_string()))?;
            let result = tokio::time::timeout(timeout, async {
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| (never_processed(&e), e.to_string()))?;
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                let mut body = Zeroizing::new(Vec::new());
                let mut incoming = resp.into_body();
                while let Some(frame) = incoming.frame().await {
                    let frame = frame.map_err(|e| (false, e.to_string()))?;
                    if let Some(data) = frame.data_ref() {
                        if body.len() + data.len() > body.capacity() {
                            // Grow by hand so the old buffer is wiped, not just freed.
                            let mut bigger =
                                Zeroizing::new(Vec::with_capacity((body.len() + data.len()).max(4096) * 2));
                            bigger.extend_from_slice(&body);
                            body = bigger;
                        }
                        body.extend_from_slice(data);
                    }
                }
                Ok::<_, (bool, String)>(Reply { status, headers, body })
            })
            .await;
            match result {
                Ok(Err((true, _))) if !retried => {
                    retried = true;
                    *endpoint.conn.lock().await = None;
                }
                other => break other,
            }
        };
        match result {
            Ok(Ok(reply)) => {
                endpoint.down.store(false, Relaxed);
                Ok(reply)
            }
            Ok(Err((unprocessed, e))) => {
                endpoint.down.store(true, Relaxed);
                *endpoint.conn.lock().await = None;
                // Give the connection task a moment to record why it ended.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let message = match endpoint.conn_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e,
                };
                Err(WriteFailure {
                    reached: !unprocessed,
                    message,
                })
            }
            Err(_) => {
                endpoint.down.store(true, Relaxed);
                *endpoint.conn.lock().await = None;
                Err(WriteFailure {
                    reached: true,
                    message: format!("no answer within {timeout:?}"),
                })
            }
        }
    }

    async fn send(
        &self,
        idx: usize,
        method: hyper::Method,
        path: &str,
        headers: &[Header],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Reply, String> {
        self.write_on(idx, method, path, headers, body, timeout)
            .await
            .map_err(|f| f.message)
    }

    async fn connection(&self, endpoint: &Endpoint) -> Result<SendRequest<Full<Bytes>>, String> {
        let mut slot = endpoint.conn.lock().await;
        if let Some(send) = slot.as_ref()
            && !send.is_closed()
        {
            return Ok(send.clone());
        }
        *slot = None;
        let tls = self.tls.clone();
        let name = endpoint.server_name.clone();
        let authority = endpoint.authority.clone();
        let conn_error = endpoint.conn_error.clone();
        let down = endpoint.down.clone();
        let (ping_interval, ping_timeout) = (self.ping_interval, self.ping_timeout);
        // One bound over TCP connect, TLS and HTTP/2 handshakes: a blackholed endpoint (SYN
        // dropped, or accepted and never answered) costs at most this long.
        let send = tokio::time::timeout(self.connect_timeout, async move {
            let tcp = tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // A server that stops answering (hung, SIGSTOP, a dead host whose TCP
                // stays half-open) fails the connection, and the requests on it, within
                // interval + timeout of its last frame: an open watch moves on in time.
                .keep_alive_interval(ping_interval)
                .keep_alive_timeout(ping_timeout)
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    down.store(true, Relaxed);
                    let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                    *conn_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause);
                }
            });
            Ok::<_, String>(send)
        })
        .await
        .map_err(|_| format!("connect timed out after {:?}", self.connect_timeout))??;
        *slot = Some(send.clone());
        Ok(send)
    }
}

/// Whether a failed request is known not to have been processed by the server: hyper
/// cancelled it before sending (the connection was closing), or the server refused the
/// stream (REFUSED_STREAM, or a graceful GOAWAY whose last stream id is below it).
fn never_processed(error: &hyper::Error) -> bool {
    if error.is_canceled() {
        return true;
    }
    let Some(h2) = std::error::Error::source(error).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    match h2.reason() {
        Some(h2::Reason::REFUSED_STREAM) => true,
        Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
        _ => false,
    }
}
