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
use keystore::Store;
use keystore::postgres::{ChangeFeed, NAME_RELEASE, NameClaim};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::api;
use crate::audit::{Audit, AuditError, AuditEvent, CertRef};
use crate::config::Config;
use crate::connections::{self, Registry};
use crate::identity::{Caller, RoleMap};
use crate::limits::{AGGREGATE_INTERVAL, Activity, Limiter, REFUSED_CONNECTION_TIME};
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
    /// A socket or signal operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Another process holds this node's name in the shared database, and kept it for
    /// `NAME_RELEASE`: the node stopped rather than serve beside it.
    #[error("{0}")]
    NameTaken(String),
}

/// Serves `https` (mTLS API) and `metrics` (plain HTTP) until `shutdown` completes, then
/// drains connections for at most `limits.shutdown_grace_ms`.
pub async fn run(
    config: Config,
    store: impl Store + 'static,
    https: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with_feed(config, store, None, https, metrics_listener, shutdown, || {}).await
}

/// [`run`] for a node of a cluster (a store shared with other nodes): `feed` tells it when
/// another node changed the store, and it rebuilds its snapshot and wakes its watchers
/// ([`follow_changes`]; issue 14). `ready` is called once everything that can fail at start
/// (the TLS files, the audit log, the first snapshot) has been set up and the server is
/// about to serve: the binary announces readiness there, never before
/// (sso-server/tests/hostile_input.rs
/// `an_audit_log_that_cannot_be_opened_stops_the_start_before_listening`).
pub async fn run_with_feed(
    config: Config,
    store: impl Store + 'static,
    feed: Option<ChangeFeed>,
    https: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(),
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::default());
    let loaded = tls::build(&config.tls)?;
    metrics
        .cert_not_after_unix
        .store(loaded.server_cert_not_after.unwrap_or(0), Relaxed);
    connections::publish_crls(&metrics, &loaded.crls);
    let tls_config = Arc::new(ArcSwap::new(loaded.config));
    let audit = Audit::open(
        &config.audit.path,
        &crate::audit::AuditOptions {
            node: config.node.clone(),
            queue: config.audit.queue,
            rotate_bytes: config.audit.rotate_bytes,
        },
        store.audit_key(),
        store.audit_anchor()?,
        metrics.clone(),
    )?;
    let (epoch_tx, _) = watch::channel(0);
    let peer = match &config.peer {
        Some(p) => Some(Arc::new(crate::peer::Peer::new(p, &config.tls, &loaded.crl_ders)?)),
        None => None,
    };
    let state = Arc::new(AppState {
        node: config.node.clone(),
        store: std::sync::Mutex::new(Box::new(store)),
        snapshot: ArcSwap::new(Arc::new(Snapshot::default())),
        epoch_tx,
        stopping: watch::channel(false).0,
        roles: RoleMap::new(&config.roles),
        audit,
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        allow_plain: config.delivery.allow_plain,
        limiter: Limiter::new(&config.limits, metrics.clone()),
        distribute_wait: config.staging_pause(),
        rotations: crate::rotation::Rotations::new(
            config
                .peer
                .as_ref()
                .map_or(Duration::from_secs(1), |p| Duration::from_millis(p.timeout_ms)),
            config.staging_pause(),
        ),
        peer,
        idempotency: crate::idempotency::Idempotency::default(),
        idempotency_secret: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .map_err(|_| ServerError::Io(std::io::Error::other("the random number generator failed")))?,
    });
    {
        let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
        state.refresh(&**store)?;
    }

    {
        // Every new audit head is anchored in the store's meta table.
        let weak = Arc::downgrade(&state);
        state.audit.anchor_to(Box::new(move |anchor| {
            let Some(state) = weak.upgrade() else { return Ok(true) };
            // Never wait for the store (a backup may hold it for its KDF): try later.
            let mut store = match state.store.try_lock() {
                Ok(s) => s,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            };
            // A success here does not prove the store writable (an unchanged anchor may
            // commit without a new page): only the write check clears a store failure.
            match store.set_audit_anchor(anchor) {
                Ok(()) => Ok(true),
                Err(e) => {
                    if let Some(fault) = e.store_fault() {
                        state.metrics.health.store_failed(fault.to_string());
                    }
                    Err(e.to_string())
                }
            }
        }));
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let audit = state.audit.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                audit.reopen();
            }
        });
    }
    let metrics_task = tokio::spawn(serve_metrics(metrics_listener, metrics.clone()));
    let sync_task = tokio::spawn(crate::replication::sync_loop(state.clone()));
    let store_check_task = tokio::spawn(store_write_check_loop(Arc::downgrade(&state)));
    // Set by `follow_changes` when another process has held this node's name for
    // NAME_RELEASE: the node then stops as on a signal, and `run_with_feed` says why.
    let (name_lost_tx, name_lost) = watch::channel::<Option<String>>(None);
    let feed_task =
        feed.map(|feed| tokio::spawn(follow_changes(Arc::downgrade(&state), feed, EPOCH_CHECK, name_lost_tx)));
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

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
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
    let flush_task = tokio::spawn(flush_aggregated_audit(state.clone()));

    let shutdown = {
        let mut name_lost = name_lost.clone();
        async move {
            let lost = async move {
                // Without a feed the sender is gone at once: nothing to wait for.
                if name_lost.wait_for(Option::is_some).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = shutdown => {}
                () = lost => {}
            }
        }
    };
    ready();
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
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            state.metrics.connections_open.fetch_add(1, Relaxed);
            let _open = OpenGuard(state.metrics.clone());
            let pending = state.limiter.begin_handshake();
            let stream = tokio::select! {
                r = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => match r {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return handshake_failed(&state, peer, tls::failure_reason(&e), Some(e.to_string())),
                    Err(_) => return handshake_failed(&state, peer, "timeout", None),
                },
                () = pending.evicted() => return handshake_failed(&state, peer, "evicted", None),
                () = stopped(&mut stop) => return,
            };
            drop(pending);
            let Some(caller) = caller_of(&stream, &state) else {
                return handshake_failed(&state, peer, "no_certificate", None);
            };
            let ticket = registry.register(stream.get_ref().1, &caller, peer, &state);
            serve_connection(stream, caller, peer, state, &builder, stop, ticket).await;
        });
    }
    drop(https);
    tracing::info!("shutting down: no longer accepting, draining connections");
    state.stop();
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_millis(config.limits.shutdown_grace_ms);
    // Every connection holds a permit until it is closed: all permits back means drained.
    let all = u32::try_from(config.limits.max_connections).unwrap_or(u32::MAX);
    match tokio::time::timeout(grace, connections.acquire_many(all)).await {
        Ok(_) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!("grace period over; closing remaining connections"),
    }
    flush_task.abort();
    state.limiter.failures.flush(&state.audit, AGGREGATE_INTERVAL);
    // Every entry of the served requests written and synced, and the last head anchored
    // in the store, before the process exits (the writer thread would die with it).
    let audit = state.audit.clone();
    let closed = tokio::task::spawn_blocking(move || audit.close(AUDIT_CLOSE))
        .await
        .unwrap_or(false);
    if !closed {
        tracing::warn!("the audit writer did not finish within {AUDIT_CLOSE:?}; its last entries may be missing");
    }
    metrics_task.abort();
    reload_task.abort();
    sync_task.abort();
    store_check_task.abort();
    if let Some(task) = feed_task {
        task.abort();
    }
    match name_lost.borrow().clone() {
        Some(why) => Err(ServerError::NameTaken(why)),
        None => Ok(()),
    }
}

/// How long shutdown waits for the audit writer to write, sync and anchor what is queued.
const AUDIT_CLOSE: Duration = Duration::from_secs(5);

/// How often a cluster node reads the store's epoch whatever its change feed says:
/// notifications sent while the feed was reconnecting, or lost in a database restart,
/// are caught by this.
pub const EPOCH_CHECK: Duration = Duration::from_secs(2);

/// Keeps a cluster node's snapshot current: on a feed state with an epoch above the
/// snapshot's, on a resync (the feed reconnected and may have missed notifications), and
/// every `every` in any case, re-reads the store's epoch on the blocking pool and, when it
/// moved, rebuilds the snapshot through [`AppState::refresh`] (which wakes the watchers).
/// While the store cannot be read the last snapshot stays served and health says the store
/// is down (`store_write_check_loop` clears that once the store can be written again).
///
/// A node whose name another process has held for [`NAME_RELEASE`] sends the reason on
/// `name_lost` (the server then stops): two processes serving as one node would each keep
/// their own audit chain under one anchor and stamp keys with one origin. Shorter spells
/// are a dead connection of its own that PostgreSQL has not yet dropped, or a database
/// failover; the feed takes the name back by itself
/// (tests/tests/cluster_attack.rs `a_node_whose_name_stays_taken_stops_instead_of_serving_beside_the_other`).
async fn follow_changes(
    state: std::sync::Weak<AppState>,
    mut feed: ChangeFeed,
    every: Duration,
    name_lost: watch::Sender<Option<String>>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resyncs = 0;
    let mut held_elsewhere_since: Option<tokio::time::Instant> = None;
    loop {
        if let Some(since) = held_elsewhere_since
            && since.elapsed() >= NAME_RELEASE
            && name_lost.borrow().is_none()
        {
            let Some(st) = state.upgrade() else { return };
            let why = format!(
                "another process holds node name {:?} in the shared database and has for {} s: this node stops rather than serve beside it",
                st.node,
                NAME_RELEASE.as_secs()
            );
            tracing::error!("{why}");
            name_lost.send_replace(Some(why));
        }
        let due = tokio::select! {
            s = feed.next() => match s {
                None => return,
                Some(s) => {
                    let Some(st) = state.upgrade() else { return };
                    match s.name {
                        NameClaim::Held => {
                            held_elsewhere_since = None;
                            st.metrics.health.name_held();
                        }
                        NameClaim::HeldElsewhere => {
                            held_elsewhere_since.get_or_insert_with(tokio::time::Instant::now);
                            st.metrics.health.name_held_elsewhere(format!(
                                "another process holds node name {:?} in the shared database; give every node its own name, or stop the other process (this node stops if the other keeps the name {} s)",
                                st.node,
                                NAME_RELEASE.as_secs()
                            ));
                        }
                        NameClaim::Unknown => {}
                    }
                    let resynced = s.resyncs != resyncs;
                    resyncs = s.resyncs;
                    // A lost connection is worth a look at once: health then says the
                    // store is down without waiting for a write to fail.
                    resynced || !s.connected || s.epoch > st.snapshot.load().epoch
                }
            },
            _ = tick.tick() => true,
        };
        if !due {
            continue;
        }
        let Some(st) = state.upgrade() else { return };
        let _ = tokio::task::spawn_blocking(move || refresh_if_moved(&st)).await;
    }
}

/// Re-reads the store's epoch and rebuilds the snapshot if it differs from the served one.
fn refresh_if_moved(state: &AppState) {
    let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
    let read = store.epoch().and_then(|epoch| {
        if epoch == state.snapshot.load().epoch {
            Ok(())
        } else {
            state.refresh(&**store)
        }
    });
    if let Err(e) = read {
        if let Some(fault) = e.store_fault() {
            state.metrics.health.store_failed(fault.to_string());
        }
        tracing::warn!(error = %e, "cannot re-read the shared store; serving the last snapshot");
    }
}

/// Time an idle connection gets to finish its graceful close (HTTP/2 GOAWAY) before it
/// is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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

/// Serves one authenticated connection: admits it under its identity's cap (or answers
/// every request 429 for a moment), closes it when it stays idle past the deadlines of
/// [`crate::limits`], and shuts it down gracefully when the server stops.
async fn serve_connection(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    caller: Caller,
    peer: std::net::SocketAddr,
    state: Arc<AppState>,
    builder: &auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
    mut ticket: connections::Ticket,
) {
    let slot = state.limiter.admit(&caller);
    let (first, idle) = match &slot {
        Ok(_) => state.limiter.deadlines(),
        Err(reason) => {
            tracing::debug!(%peer, identity = %caller.label, reason, "connection refused: identity holds too many");
            state.limiter.failures.record(
                &state.audit,
                AuditEvent {
                    time: std::time::SystemTime::now(),
                    identity: caller.label.clone(),
                    cert: Some(caller.cert.clone()),
                    role: caller.roles.label(),
                    op: "connection.limit",
                    key_id: None,
                    outcome: "too_many_connections",
                    detail: Some(format!("{reason}: this identity holds too many connections")),
                    peer: Some(peer),
                },
                reason,
            );
            (REFUSED_CONNECTION_TIME, REFUSED_CONNECTION_TIME)
        }
    };
    let refused = slot.as_ref().err().copied();
    let limiter = state.limiter.clone();
    let activity = Activity::new();
    let context = Arc::new(api::Conn {
        caller,
        peer,
        state,
        activity: activity.clone(),
        refused,
    });
    // The request is boxed: the future holds it until it first runs, and an open watch
    // holds the future for its whole wait (see `api::handle`).
    let service = service_fn(move |req| api::handle(Box::new(req), context.clone()));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        reason = activity.idle(first, idle) => {
            if refused.is_none() {
                limiter.closed(reason);
            }
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
        }
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
        // Revoked or expired: dropped at once. Maximum age: GOAWAY, bounded drain.
        end = ticket.ended() => match end {
            connections::End::Cut => Ok(()),
            connections::End::Graceful(drain) => {
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(drain, conn.as_mut()).await.unwrap_or(Ok(()))
            }
        },
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    drop(slot);
}

/// Completes once the server is shutting down.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Flushes the aggregated audit counts every [`AGGREGATE_INTERVAL`].
async fn flush_aggregated_audit(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(AGGREGATE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        state.limiter.failures.flush(&state.audit, AGGREGATE_INTERVAL);
    }
}

/// Failed handshakes come from sources with no verified identity: the first per source
/// and reason is audited at once, a flood only as a count per interval.
fn handshake_failed(state: &AppState, peer: std::net::SocketAddr, reason: &'static str, detail: Option<String>) {
    state.metrics.handshake_failure(reason);
    tracing::debug!(%peer, reason, "TLS handshake failed");
    state.limiter.failures.record(
        &state.audit,
        AuditEvent {
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
        },
        reason,
    );
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

/// While the store is failing (a write failed: disk full, read-only, I/O error), tries a
/// small write every second, so health returns to `ok` as soon as the operator has fixed
/// the disk, without waiting for the next admin write. Nothing is written while healthy:
/// a full disk is noticed by the next write (every audited request anchors the audit
/// head in the store).
async fn store_write_check_loop(state: std::sync::Weak<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(st) = state.upgrade() else { return };
        if !st.metrics.health.store_failing() {
            continue;
        }
        let _ = tokio::task::spawn_blocking(move || {
            let mut store = st.store.lock().unwrap_or_else(|p| p.into_inner());
            match store.check_writable() {
                Ok(()) => st.metrics.health.store_ok(),
                Err(e) => {
                    if let Some(fault) = e.store_fault() {
                        st.metrics.health.store_failed(fault.to_string());
                    }
                }
            }
        })
        .await;
    }
}
