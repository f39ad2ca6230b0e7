//! Listeners and connections: the TLS accept loop with its handshake timeout and
//! connection cap, hyper (HTTP/1.1 and HTTP/2) on top, the metrics listener, and graceful
//! shutdown. Each served connection is driven by [`connections::drive`] (revocation,
//! expiry, maximum age); SIGHUP reloads live in [`connections`] too.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use keystore::SealedStore;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::api;
use crate::audit::{Audit, AuditError, AuditEvent, CertRef};
use crate::config::Config;
use crate::connections::{self, Registry};
use crate::identity::{Caller, RoleMap};
use crate::metrics::Metrics;
use crate::state::{AppState, Snapshot};
use crate::tls::{self, TlsError};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The audit log could not be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] keystore::Error),
    /// Roles could not be compiled.
    #[error("config roles: {0}")]
    Roles(String),
    /// A socket or signal operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves `https` (mTLS API) and `metrics` (plain HTTP) until `shutdown` completes, then
/// drains connections for at most `limits.shutdown_grace_ms`.
pub async fn run(
    config: Config,
    store: SealedStore,
    https: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::default());
    let loaded = tls::build(&config.tls)?;
    metrics
        .cert_not_after_unix
        .store(loaded.server_cert_not_after.unwrap_or(0), Relaxed);
    connections::publish_crls(&metrics, &loaded.crls);
    let tls_config = Arc::new(ArcSwap::new(loaded.config));
    let audit = Audit::open(&config.audit.path, &config.node, config.audit.queue, metrics.clone())?;
    let (epoch_tx, _) = watch::channel(0);
    let peer = match &config.peer {
        Some(p) => Some(Arc::new(crate::peer::Peer::new(p, &config.tls)?)),
        None => None,
    };
    let state = Arc::new(AppState {
        node: config.node.clone(),
        store: std::sync::Mutex::new(store),
        snapshot: ArcSwap::new(Arc::new(Snapshot::default())),
        epoch_tx,
        roles: RoleMap::new(&config.roles).map_err(ServerError::Roles)?,
        audit,
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        distribute_wait: Duration::from_millis(250),
        peer,
    });
    {
        let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
        state.refresh(&store)?;
    }

    let metrics_task = tokio::spawn(serve_metrics(metrics_listener, metrics.clone()));
    let sync_task = tokio::spawn(crate::peer::sync_loop(state.clone()));
    // Registered here, not inside the task, so a SIGHUP right after start is not fatal.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // Requests in flight at a graceful end get as long as a watch may wait, and a little.
    let drain = Duration::from_millis(config.limits.watch_max_wait_ms) + Duration::from_secs(5);
    let registry = Registry::new(Duration::from_millis(config.limits.max_connection_age_ms), drain);
    let reload_task = tokio::spawn(connections::reload_on_sighup(
        hup,
        config.clone(),
        connections::Reloadable {
            tls_config: tls_config.clone(),
            registry: registry.clone(),
        },
        state.clone(),
        loaded.crls,
    ));

    let connections = Arc::new(Semaphore::new(config.limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.limits.header_read_timeout_ms))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let handshake_timeout = config.handshake_timeout();

    tokio::pin!(shutdown);
    loop {
        // Take a connection slot before accepting: past the cap, connections wait in the
        // kernel's backlog instead of being accepted and starved.
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            r = https.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls_config.load_full());
        let state = state.clone();
        let builder = builder.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            state.metrics.connections_open.fetch_add(1, Relaxed);
            let _open = OpenGuard(state.metrics.clone());
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return handshake_failed(&state, peer, tls::failure_reason(&e), Some(e.to_string())),
                Err(_) => return handshake_failed(&state, peer, "timeout", None),
            };
            let Some(caller) = caller_of(&stream, &state) else {
                return handshake_failed(&state, peer, "no_certificate", None);
            };
            let caller = Arc::new(caller);
            let ticket = registry.register(stream.get_ref().1, caller.clone(), peer);
            let served = state.clone();
            let service = service_fn(move |req| {
                let (caller, state) = (caller.clone(), served.clone());
                async move { Ok::<_, Infallible>(api::handle(req, caller, peer, state).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
            connections::drive(conn, ticket, &state, |c| c.graceful_shutdown()).await;
        });
    }
    drop(https);
    tracing::info!("shutting down: no longer accepting, draining connections");
    state.epoch_tx.send_modify(|_| {});
    let grace = Duration::from_millis(config.limits.shutdown_grace_ms);
    registry.shutdown();
    tokio::select! {
        () = registry.drained() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
    metrics_task.abort();
    reload_task.abort();
    sync_task.abort();
    Ok(())
}

struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

fn caller_of(stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>, state: &AppState) -> Option<Caller> {
    let der = stream.get_ref().1.peer_certificates()?.first()?;
    let identity = certs::identity_from_der(der).ok()?;
    let roles = state.roles.roles(&identity);
    Some(Caller {
        label: identity.label().into(),
        cert: Arc::new(CertRef {
            serial: identity.serial.clone(),
            sha256: identity.sha256.clone(),
        }),
        identity,
        roles,
    })
}

fn handshake_failed(state: &AppState, peer: std::net::SocketAddr, reason: &'static str, detail: Option<String>) {
    state.metrics.handshake_failure(reason);
    tracing::debug!(%peer, reason, "TLS handshake failed");
    state.audit.record(AuditEvent {
        time: std::time::SystemTime::now(),
        identity: "-".into(),
        cert: None,
        role: "none",
        op: "tls.handshake",
        key_id: None,
        outcome: "denied",
        detail: Some(match detail {
            Some(d) => format!("{reason}: {d}"),
            None => reason.to_owned(),
        }),
        peer: Some(peer),
    });
}

async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (200, metrics.render())
                    } else {
                        (404, "not found: try /metrics\n".to_owned())
                    };
                    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
