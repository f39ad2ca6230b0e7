//! Live connections and the trust boundary over time. A handshake checks a certificate
//! once; these rules keep checking it for as long as the connection lives:
//!
//! - **Reload** (SIGHUP): re-read the config's `[tls]` and `[peer]` sections, load and
//!   check every file ([`crate::tls::build`], and [`crate::peer::Peer::client`] for the
//!   identity, CA and CRLs of the client to the peer), and swap both in only if all of it is good;
//!   otherwise keep the old one, log an error and count the failure. After a good reload,
//!   every live connection's client certificate chain is verified again with the new
//!   verifier; the connections it refuses (revoked, CA removed) are closed at once, open
//!   watches with them.
//! - **Expiry**: a connection ends when its client certificate's `notAfter` passes.
//! - **Maximum age**: a connection older than `limits.max_connection_age_ms` is ended
//!   gracefully (HTTP/2 GOAWAY: requests in flight finish, clients open a new connection
//!   for the next one), so every client goes through the current CA, CRLs and roles again.
//!
//! Revoked and expired certificates are cut hard, not drained: a graceful end would let a
//! watch in flight receive one more keyring.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;

use crate::audit::{Audit, AuditEvent, CertRef};
use crate::config::Config;
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::tls::{self, CrlSummary};

/// The connections that completed a handshake and are being served.
#[derive(Debug)]
pub struct Registry {
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
    max_age: Duration,
    /// Bound on a graceful end (maximum age): requests in flight get this long to finish,
    /// a watch long-poll included.
    drain: Duration,
}

#[derive(Debug)]
struct Live {
    chain: Arc<[CertificateDer<'static>]>,
    /// Set to the reason when a reload refuses the certificate.
    cut: watch::Sender<Option<&'static str>>,
}

/// One registered connection; dropping it unregisters the connection.
#[derive(Debug)]
pub struct Ticket {
    /// Unregisters the connection when the ticket is dropped.
    _guard: Guard,
    cut: watch::Receiver<Option<&'static str>>,
    age_at: tokio::time::Instant,
    expires_at: Option<tokio::time::Instant>,
    drain: Duration,
    who: Who,
}

/// What the audit entry of a cut connection names.
#[derive(Debug)]
struct Who {
    label: Arc<str>,
    cert: Arc<CertRef>,
    role: &'static str,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
    audit: Audit,
}

#[derive(Debug)]
struct Guard {
    id: u64,
    registry: Arc<Registry>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.registry
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// How a connection must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// At once, without a graceful close: the certificate was revoked or expired.
    Cut,
    /// Gracefully (HTTP/2 GOAWAY), letting requests in flight finish within the bound.
    Graceful(Duration),
}

impl Registry {
    /// A registry ending connections at `max_age`, draining them for at most `drain`.
    pub fn new(max_age: Duration, drain: Duration) -> Arc<Self> {
        Arc::new(Self {
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            max_age,
            drain,
        })
    }

    /// Registers a connection whose handshake `tls` completed, for `caller`.
    pub fn register(
        self: &Arc<Self>,
        tls: &rustls::ServerConnection,
        caller: &Caller,
        peer: SocketAddr,
        state: &AppState,
    ) -> Ticket {
        let chain: Arc<[CertificateDer<'static>]> = tls
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
            .unwrap_or_default();
        let now = tokio::time::Instant::now();
        let id = self.next_id.fetch_add(1, Relaxed);
        // Up to a tenth earlier than the maximum, so connections opened together (a fleet
        // restarted at once) do not all end together.
        let spread = u32::try_from(id.wrapping_mul(2_654_435_761) % 1000).unwrap_or(0);
        let age_at = now + (self.max_age - self.max_age / 10 * spread / 1000);
        // Past the maximum age (and its drain) the expiry cannot matter.
        let expires_at = caller
            .identity
            .not_after
            .map(|t| Duration::try_from(t - time::OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO))
            .filter(|left| *left <= self.max_age + self.drain)
            .map(|left| now + left);
        let (cut_tx, cut_rx) = watch::channel(None);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Live { chain, cut: cut_tx });
        Ticket {
            _guard: Guard {
                id,
                registry: self.clone(),
            },
            cut: cut_rx,
            age_at,
            expires_at,
            drain: self.drain,
            who: Who {
                label: caller.label.clone(),
                cert: caller.cert.clone(),
                role: caller.roles.label(),
                peer,
                metrics: state.metrics.clone(),
                audit: state.audit.clone(),
            },
        }
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifies every live connection's certificate chain again with `verifier` and cuts
    /// the connections it refuses. Returns how many were cut.
    pub fn recheck(&self, verifier: &dyn ClientCertVerifier) -> usize {
        // Verify outside the lock: new connections keep registering meanwhile.
        let chains: Vec<(u64, Arc<[CertificateDer<'static>]>)> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, l)| (*id, l.chain.clone()))
            .collect();
        let now = UnixTime::now();
        let mut refused = Vec::new();
        for (id, chain) in chains {
            let Some((end_entity, intermediates)) = chain.split_first() else {
                continue;
            };
            if let Err(e) = verifier.verify_client_cert(end_entity, intermediates, now) {
                refused.push((id, tls::error_reason(&e)));
            }
        }
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        refused
            .into_iter()
            .filter(|(id, reason)| live.get(id).is_some_and(|l| l.cut.send(Some(reason)).is_ok()))
            .count()
    }
}

impl Ticket {
    /// Completes when the connection must end, and how: cut at once when a reload refuses
    /// its certificate or the certificate expires (audited and counted here), gracefully
    /// at its maximum age.
    pub async fn ended(&mut self) -> End {
        let (expires_at, age_at) = (self.expires_at, self.age_at);
        let expiry = async move {
            match expires_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.cut.changed() => {
                let reason = match changed {
                    Ok(()) => (*self.cut.borrow()).unwrap_or("refused"),
                    Err(_) => return std::future::pending().await,
                };
                self.who.metrics.limit_event("sso_connections_closed_total", "revoked");
                self.who.closed("revoked", reason);
                End::Cut
            }
            () = expiry => {
                self.who.metrics.limit_event("sso_connections_closed_total", "expired");
                self.who.closed("expired", "the client certificate expired");
                End::Cut
            }
            () = tokio::time::sleep_until(age_at) => {
                self.who.metrics.limit_event("sso_connections_closed_total", "max_age");
                tracing::debug!(peer = %self.who.peer, identity = %self.who.label, "maximum connection age: ending gracefully");
                End::Graceful(self.drain)
            }
        }
    }
}

impl Who {
    fn closed(&self, outcome: &'static str, reason: &str) {
        tracing::warn!(
            peer = %self.peer,
            identity = %self.label,
            serial = %self.cert.serial,
            reason,
            "closed a live connection: {outcome}"
        );
        self.audit.record(AuditEvent {
            time: std::time::SystemTime::now(),
            identity: self.label.clone(),
            cert: Some(self.cert.clone()),
            role: self.role,
            op: "connection.closed",
            key_id: None,
            outcome,
            detail: Some(reason.to_owned()),
            peer: Some(self.peer),
        });
    }
}

/// Publishes the CRLs' freshness as metrics.
pub fn publish_crls(metrics: &Metrics, crls: &[CrlSummary]) {
    let next = crls.iter().filter_map(|c| c.next_update).min().unwrap_or(0);
    let this = crls.iter().map(|c| c.this_update).min().unwrap_or(0);
    metrics.tls.crl_next_update_unix.store(next, Relaxed);
    metrics.tls.crl_this_update_unix.store(this, Relaxed);
}

/// Logs a warning for each CRL past its `nextUpdate` that `warned` does not hold yet.
fn warn_stale(crls: &[CrlSummary], warned: &mut Vec<(std::path::PathBuf, String, Option<i64>)>) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for crl in crls.iter().filter(|c| c.is_stale(now)) {
        let key = (crl.path.clone(), crl.issuer.clone(), crl.next_update);
        if warned.contains(&key) {
            continue;
        }
        tracing::warn!(
            path = %crl.path.display(),
            issuer = %crl.issuer,
            next_update = crl.next_update.unwrap_or(0),
            overdue_seconds = now - crl.next_update.unwrap_or(now),
            "CRL is past its nextUpdate: fetch the CA's current CRL and send SIGHUP; \
             certificates revoked since it was issued are still accepted"
        );
        warned.push(key);
    }
}

/// What the reload task swaps and re-checks.
#[derive(Debug, Clone)]
pub struct Reloadable {
    /// The server configuration new connections are accepted with.
    pub tls_config: Arc<ArcSwap<rustls::ServerConfig>>,
    /// The live connections.
    pub registry: Arc<Registry>,
}

/// Reloads on every SIGHUP (all or nothing) and re-checks CRL freshness every minute.
pub async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    config: Config,
    target: Reloadable,
    state: Arc<AppState>,
    mut crls: Vec<CrlSummary>,
) {
    let mut warned = Vec::new();
    warn_stale(&crls, &mut warned);
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            _ = tick.tick() => {
                warn_stale(&crls, &mut warned);
                continue;
            }
        }
        match reload(&config, &target, &state) {
            Ok((loaded_crls, cut, source)) => {
                crls = loaded_crls;
                tracing::info!(
                    source = %source,
                    crls = crls.len(),
                    live_connections_closed = cut,
                    "SIGHUP: reloaded certificates and CRLs; new connections use them, live ones were re-checked"
                );
                warn_stale(&crls, &mut warned);
            }
            Err(e) => {
                state.metrics.tls.reload_failures.fetch_add(1, Relaxed);
                tracing::error!(
                    error = %e,
                    "SIGHUP: reload refused, nothing changed; still serving with the previous certificates and CRLs"
                );
            }
        }
    }
}

fn reload(config: &Config, target: &Reloadable, state: &AppState) -> Result<(Vec<CrlSummary>, usize, String), String> {
    let metrics = &state.metrics;
    let (tls_section, peer_section, source) = match &config.source {
        Some(path) => {
            let fresh = Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
            (fresh.tls, fresh.peer, path.display().to_string())
        }
        None => (
            config.tls.clone(),
            config.peer.clone(),
            "the startup configuration".into(),
        ),
    };
    let loaded = tls::build(&tls_section).map_err(|e| e.to_string())?;
    // The identity presented to the peer (and the CA and CRLs its certificate is checked
    // against) is reloaded too, in the same all-or-nothing step: checked before anything
    // is swapped.
    let peer_client = match (&state.peer, &peer_section) {
        (Some(peer), Some(section)) => {
            if section.url != peer.url {
                return Err(format!(
                    "peer.url changed ({} to {}): a new peer address needs a restart",
                    peer.url, section.url
                ));
            }
            Some(
                crate::peer::Peer::client(section, &tls_section, &loaded.crl_ders)
                    .map_err(|e| format!("[peer]: {e}"))?,
            )
        }
        (None, None) => None,
        _ => return Err("the [peer] section was added or removed: that needs a restart".to_owned()),
    };
    target.tls_config.store(loaded.config.clone());
    if let (Some(peer), Some(client)) = (&state.peer, peer_client) {
        peer.install(client);
    }
    metrics
        .cert_not_after_unix
        .store(loaded.server_cert_not_after.unwrap_or(0), Relaxed);
    metrics.tls.reloads.fetch_add(1, Relaxed);
    publish_crls(metrics, &loaded.crls);
    let cut = target.registry.recheck(&*loaded.verifier);
    Ok((loaded.crls, cut, source))
}
