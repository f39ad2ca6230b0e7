//! Talking to the servers: one HTTP/2 connection per endpoint over mTLS, opened on demand
//! with a short bound on TCP connect plus TLS and HTTP/2 handshakes, and failover across
//! the endpoint list that starts at the last endpoint that answered.
//!
//! Public because `sso-server` reaches its peer through it too; applications use
//! [`crate::Client`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use zeroize::Zeroizing;

use crate::Error;

/// An answer: status and a body that is wiped when dropped (keyring bodies carry keys).
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
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
}

/// The endpoint list and its connections.
pub struct Transport {
    endpoints: Vec<Endpoint>,
    preferred: AtomicUsize,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("endpoints", &self.endpoints.iter().map(|e| &e.url).collect::<Vec<_>>())
            .finish()
    }
}

impl Transport {
    /// Endpoints are `https://host:port`; `tls` must offer ALPN `h2`.
    pub fn new(urls: &[String], tls: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Result<Self, Error> {
        if urls.is_empty() {
            return Err(Error::Config("no endpoints configured".into()));
        }
        let endpoints = urls
            .iter()
            .map(|url| {
                let rest = url
                    .strip_prefix("https://")
                    .ok_or_else(|| Error::Config(format!("endpoint {url:?} must start with https://")))?;
                let authority = rest.trim_end_matches('/').to_owned();
                if authority.contains('/') {
                    return Err(Error::Config(format!("endpoint {url:?} must not have a path")));
                }
                let host = match authority.rsplit_once(':') {
                    Some((h, port)) if port.parse::<u16>().is_ok() => h,
                    _ => {
                        return Err(Error::Config(format!(
                            "endpoint {url:?} needs a port, e.g. https://host:7443"
                        )));
                    }
                };
                let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
                let server_name =
                    ServerName::try_from(host).map_err(|_| Error::Config(format!("endpoint {url:?}: invalid host")))?;
                Ok(Endpoint {
                    url: url.trim_end_matches('/').to_owned(),
                    authority,
                    server_name,
                    conn: tokio::sync::Mutex::new(None),
                    conn_error: Arc::new(std::sync::Mutex::new(None)),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            endpoints,
            preferred: AtomicUsize::new(0),
            tls,
            connect_timeout,
        })
    }

    /// The URL of endpoint `idx`.
    pub fn url(&self, idx: usize) -> &str {
        self.endpoints.get(idx).map_or("", |e| e.url.as_str())
    }

    /// GET `path`, trying the preferred endpoint first and then the others in order.
    /// The endpoint that answers becomes the preferred one.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<(usize, Reply), String> {
        let first = self.preferred.load(Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.endpoints.len() {
            let idx = (first + i) % self.endpoints.len();
            match self.get_on(idx, path, timeout).await {
                Ok(reply) => {
                    self.preferred.store(idx, Relaxed);
                    return Ok((idx, reply));
                }
                Err(e) => errors.push(format!("{}: {e}", self.endpoints[idx].url)),
            }
        }
        Err(errors.join("; "))
    }

    /// Any request, trying the preferred endpoint first and then the others in order.
    pub async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(usize, Reply), String> {
        let first = self.preferred.load(Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.endpoints.len() {
            let idx = (first + i) % self.endpoints.len();
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
        self.request_on(idx, hyper::Method::GET, path, Bytes::new(), timeout)
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
        let endpoint = self.endpoints.get(idx).ok_or("no such endpoint")?;
        // A server ending a connection gracefully (GOAWAY at its maximum connection age, a
        // restart) refuses the streams it will not process; those never reached a handler,
        // so they are retried once on a fresh connection instead of failing the call.
        let mut retried = false;
        let result = loop {
            let mut send = self.connection(endpoint).await?;
            let req = hyper::Request::builder()
                .method(method.clone())
                .uri(format!("https://{}{path}", endpoint.authority))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())?;
            let result = tokio::time::timeout(timeout, async {
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| (never_processed(&e), e.to_string()))?;
                let status = resp.status().as_u16();
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
                Ok::<_, (bool, String)>(Reply { status, body })
            })
            .await;
            match result {
                Ok(Err((true, _))) if !retried => {
                    retried = true;
                    *endpoint.conn.lock().await = None;
                }
                other => break other.map(|r| r.map_err(|(_, e)| e)),
            }
        };
        match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                *endpoint.conn.lock().await = None;
                // Give the connection task a moment to record why it ended.
                tokio::time::sleep(Duration::from_millis(20)).await;
                match endpoint.conn_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(cause) => Err(format!("{e}: {cause}")),
                    None => Err(e),
                }
            }
            Err(_) => {
                *endpoint.conn.lock().await = None;
                Err(format!("no answer within {timeout:?}"))
            }
        }
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
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
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
