//! Prometheus metrics, rendered by hand from atomics: no secrets, no locks on the request
//! path, served on their own plain-HTTP listener.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// The endpoints requests are counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Endpoint {
    Health,
    Keyring,
    Key,
    Watch,
    Rotate,
    Retire,
    Destroy,
    Status,
    Backup,
    Restore,
    Peer,
    Unknown,
}

impl Endpoint {
    const ALL: [Endpoint; 12] = [
        Self::Health,
        Self::Keyring,
        Self::Key,
        Self::Watch,
        Self::Rotate,
        Self::Retire,
        Self::Destroy,
        Self::Status,
        Self::Backup,
        Self::Restore,
        Self::Peer,
        Self::Unknown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Keyring => "keyring",
            Self::Key => "key",
            Self::Watch => "watch",
            Self::Rotate => "rotate",
            Self::Retire => "retire",
            Self::Destroy => "destroy",
            Self::Status => "status",
            Self::Backup => "backup",
            Self::Restore => "restore",
            Self::Peer => "peer",
            Self::Unknown => "unknown",
        }
    }
}

const STATUSES: [u16; 16] = [
    200, 204, 400, 403, 404, 405, 406, 408, 409, 410, 413, 422, 429, 500, 503, 0,
];

fn status_slot(status: u16) -> usize {
    STATUSES.iter().position(|&s| s == status).unwrap_or(STATUSES.len() - 1)
}

/// The counters of connection and watch limits, with their help text. Reasons:
/// `sso_connections_closed_total`: `first_request_timeout`, `idle_timeout`,
/// `handshake_evicted`, and from [`crate::connections`] `revoked`, `expired`, `max_age`; `sso_connection_refusals_total`: `identity`, `no_role`;
/// `sso_watch_refusals_total`: `identity`, `total`.
pub const LIMIT_METRICS: [(&str, &str); 3] = [
    (
        "sso_connections_closed_total",
        "Connections the server closed, by reason: a deadline, to make room, or the trust boundary (revoked, expired, max_age).",
    ),
    (
        "sso_connection_refusals_total",
        "Connections refused (429) because their identity held too many, by reason.",
    ),
    (
        "sso_watch_refusals_total",
        "Watch long-polls refused: 429 for one identity's cap, 503 for the total cap.",
    ),
];

/// Every counter and gauge the server exports.
#[derive(Debug)]
pub struct Metrics {
    requests: [[AtomicU64; STATUSES.len()]; Endpoint::ALL.len()],
    /// Keys handed out (keyring fetches count every key in the answer).
    pub key_fetches: AtomicU64,
    /// Key answers sent with plain base64 material (no `Sso-Key-Wrap` header): what an
    /// operator watches before setting `[delivery] allow_plain = false`.
    pub plain_key_deliveries: AtomicU64,
    /// Requests refused for lack of a role.
    pub denials: AtomicU64,
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Connections open now.
    pub connections_open: AtomicI64,
    /// TLS handshakes in progress now.
    pub handshakes_pending: AtomicI64,
    /// Watch long-polls open now.
    pub watches_open: AtomicI64,
    /// Connection and watch limits at work, by (metric, reason): see [`LIMIT_METRICS`].
    limit_events: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// The keyring epoch.
    pub keyring_epoch: AtomicU64,
    /// Unix time of the last backup; 0 when none was ever written.
    pub last_backup_unix: AtomicI64,
    /// Unix time the server certificate expires.
    pub cert_not_after_unix: AtomicI64,
    /// Audit entries written.
    pub audit_written: AtomicU64,
    /// Audit entries dropped because the writer's queue was full.
    pub audit_dropped: AtomicU64,
    /// Audit entries lost to write failures.
    pub audit_failures: AtomicU64,
    /// The audit chain's entry count (the head's sequence number, as anchored).
    pub audit_entries: AtomicU64,
    /// Whether the store and the audit log can be written (health, status, metrics).
    pub health: Health,
    /// Integrity alarms (conflicting key material, failed row authentication, a key set
    /// that does not match the store manifest).
    pub integrity_alarms: AtomicU64,
    /// 1 when the peer answered the last attempt, 0 when not, -1 when there is no peer.
    pub peer_up: AtomicI64,
    /// Our epochs since the two key sets were last seen equal.
    pub peer_lag_epochs: AtomicU64,
    /// Unix time of the peer's last answer (0: never).
    pub peer_last_contact_unix: AtomicI64,
    /// Replication requests that failed.
    pub replication_failures: AtomicU64,
    /// TLS reloads (SIGHUP) and live-connection checks: see [`TlsMetrics`].
    pub tls: TlsMetrics,
}

/// Certificate reloads, CRL freshness and connections ended by the trust boundary.
#[derive(Debug, Default)]
pub struct TlsMetrics {
    /// Reloads applied.
    pub reloads: AtomicU64,
    /// Reloads refused (the previous configuration stayed in force).
    pub reload_failures: AtomicU64,
    /// Earliest `nextUpdate` of the CRLs in force, unix seconds; 0 without CRLs.
    pub crl_next_update_unix: AtomicI64,
    /// Oldest `thisUpdate` of the CRLs in force, unix seconds; 0 without CRLs.
    pub crl_this_update_unix: AtomicI64,
}

impl TlsMetrics {
    fn render(&self, out: &mut String, now: i64) {
        let _ = writeln!(
            out,
            "# HELP sso_tls_reloads_total Certificate and CRL reloads applied.\n# TYPE sso_tls_reloads_total counter\nsso_tls_reloads_total {}",
            self.reloads.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sso_tls_reload_failures_total Reloads refused; the previous certificates and CRLs stayed in force.\n# TYPE sso_tls_reload_failures_total counter\nsso_tls_reload_failures_total {}",
            self.reload_failures.load(Relaxed)
        );
        let next = self.crl_next_update_unix.load(Relaxed);
        if next != 0 {
            let _ = writeln!(
                out,
                "# HELP sso_crl_next_update_seconds Seconds until the earliest CRL nextUpdate; negative once a CRL is stale.\n# TYPE sso_crl_next_update_seconds gauge\nsso_crl_next_update_seconds {}",
                next - now
            );
        }
        let this = self.crl_this_update_unix.load(Relaxed);
        if this != 0 {
            let _ = writeln!(
                out,
                "# HELP sso_crl_age_seconds Seconds since the oldest CRL in force was issued (thisUpdate).\n# TYPE sso_crl_age_seconds gauge\nsso_crl_age_seconds {}",
                now - this
            );
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            key_fetches: AtomicU64::new(0),
            plain_key_deliveries: AtomicU64::new(0),
            denials: AtomicU64::new(0),
            handshake_failures: Mutex::new(BTreeMap::new()),
            connections_open: AtomicI64::new(0),
            handshakes_pending: AtomicI64::new(0),
            watches_open: AtomicI64::new(0),
            limit_events: Mutex::new(BTreeMap::new()),
            keyring_epoch: AtomicU64::new(0),
            last_backup_unix: AtomicI64::new(0),
            cert_not_after_unix: AtomicI64::new(0),
            audit_written: AtomicU64::new(0),
            audit_dropped: AtomicU64::new(0),
            audit_failures: AtomicU64::new(0),
            audit_entries: AtomicU64::new(0),
            health: Health::default(),
            integrity_alarms: AtomicU64::new(0),
            peer_up: AtomicI64::new(-1),
            peer_lag_epochs: AtomicU64::new(0),
            peer_last_contact_unix: AtomicI64::new(0),
            replication_failures: AtomicU64::new(0),
            tls: TlsMetrics::default(),
        }
    }
}

impl Metrics {
    /// Counts an integrity alarm when a store call failed on one (an edited row, a
    /// conflicting key); other failures are not alarms.
    pub fn count_if_integrity(&self, error: &keystore::Error) {
        if error.is_integrity() {
            self.integrity_alarms.fetch_add(1, Relaxed);
        }
    }

    /// Counts one answered request.
    pub fn request(&self, endpoint: Endpoint, status: u16) {
        let e = Endpoint::ALL
            .iter()
            .position(|x| *x == endpoint)
            .unwrap_or(Endpoint::ALL.len() - 1);
        self.requests[e][status_slot(status)].fetch_add(1, Relaxed);
    }

    /// Counts one failed TLS handshake.
    pub fn handshake_failure(&self, reason: &'static str) {
        let mut map = self.handshake_failures.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(reason).or_default() += 1;
    }

    /// Counts one limit at work: `metric` is one of [`LIMIT_METRICS`], `reason` its label.
    pub fn limit_event(&self, metric: &'static str, reason: &'static str) {
        let mut map = self.limit_events.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((metric, reason)).or_default() += 1;
    }

    /// Requests counted so far for an endpoint and status (tests and status pages).
    pub fn requests_for(&self, endpoint: Endpoint, status: u16) -> u64 {
        let e = Endpoint::ALL
            .iter()
            .position(|x| *x == endpoint)
            .unwrap_or(Endpoint::ALL.len() - 1);
        self.requests[e][status_slot(status)].load(Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        out.push_str("# HELP sso_requests_total HTTPS requests answered, by endpoint and status.\n");
        out.push_str("# TYPE sso_requests_total counter\n");
        for (e, endpoint) in Endpoint::ALL.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let n = self.requests[e][s].load(Relaxed);
                if n > 0 {
                    let status = if *status == 0 {
                        "other".to_string()
                    } else {
                        status.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "sso_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                        endpoint.as_str()
                    );
                }
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "sso_key_fetches_total",
            "Keys handed out to clients.",
            self.key_fetches.load(Relaxed),
        );
        counter(
            &mut out,
            "sso_plain_key_deliveries_total",
            "Key answers sent as plain base64 (requests without a Sso-Key-Wrap header).",
            self.plain_key_deliveries.load(Relaxed),
        );
        counter(
            &mut out,
            "sso_denials_total",
            "Requests refused for lack of a role.",
            self.denials.load(Relaxed),
        );
        out.push_str("# HELP sso_handshake_failures_total Failed TLS handshakes, by reason.\n");
        out.push_str("# TYPE sso_handshake_failures_total counter\n");
        for (reason, n) in self.handshake_failures.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "sso_handshake_failures_total{{reason=\"{reason}\"}} {n}");
        }
        gauge(
            &mut out,
            "sso_connections_open",
            "TLS connections open.",
            self.connections_open.load(Relaxed) as f64,
        );
        gauge(
            &mut out,
            "sso_handshakes_pending",
            "TLS handshakes in progress (connections with no verified identity yet).",
            self.handshakes_pending.load(Relaxed) as f64,
        );
        gauge(
            &mut out,
            "sso_watches_open",
            "Watch long-polls open.",
            self.watches_open.load(Relaxed) as f64,
        );
        {
            let events = self.limit_events.lock().unwrap_or_else(|p| p.into_inner());
            for (name, help) in LIMIT_METRICS {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for ((_, reason), n) in events.range((name, "")..).take_while(|((m, _), _)| *m == name) {
                    let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
                }
            }
        }
        gauge(
            &mut out,
            "sso_keyring_epoch",
            "Keyring epoch.",
            self.keyring_epoch.load(Relaxed) as f64,
        );
        let last = self.last_backup_unix.load(Relaxed);
        let since = if last == 0 { -1 } else { now - last };
        gauge(
            &mut out,
            "sso_seconds_since_last_backup",
            "Seconds since a backup was last written; -1 when never.",
            since as f64,
        );
        let expiry = self.cert_not_after_unix.load(Relaxed);
        gauge(
            &mut out,
            "sso_server_cert_expiry_seconds",
            "Seconds until the server certificate expires.",
            (expiry - now) as f64,
        );
        counter(
            &mut out,
            "sso_audit_written_total",
            "Audit entries written.",
            self.audit_written.load(Relaxed),
        );
        counter(
            &mut out,
            "sso_audit_dropped_total",
            "Audit entries dropped: the writer's queue was full.",
            self.audit_dropped.load(Relaxed),
        );
        counter(
            &mut out,
            "sso_audit_failures_total",
            "Audit entries lost to write failures.",
            self.audit_failures.load(Relaxed),
        );
        gauge(
            &mut out,
            "sso_audit_entries",
            "Entries in the audit chain (the head's sequence number, as in admin status).",
            self.audit_entries.load(Relaxed) as f64,
        );
        counter(
            &mut out,
            "sso_integrity_alarms_total",
            "Integrity alarms.",
            self.integrity_alarms.load(Relaxed),
        );
        let (store, audit) = self.health.problems();
        gauge(
            &mut out,
            "sso_store_writable",
            "1 while the store can be written, 0 after a write failed (disk full, read-only, I/O error) until a write succeeds again.",
            if store.is_some() { 0.0 } else { 1.0 },
        );
        gauge(
            &mut out,
            "sso_audit_writable",
            "1 while the audit log can be written, 0 after a write failed until a write succeeds again.",
            if audit.is_some() { 0.0 } else { 1.0 },
        );
        gauge(
            &mut out,
            "sso_node_name_held_elsewhere",
            "1 while another process holds this cluster node's name in the database (two processes configured with one node name), 0 otherwise.",
            if self.health.name_lost() { 1.0 } else { 0.0 },
        );
        let peer_up = self.peer_up.load(Relaxed);
        // Only a node with a peer has these (-1: no round has run yet on a standalone node).
        if peer_up >= 0 {
            gauge(
                &mut out,
                "sso_peer_up",
                "1 while the peer answered its last anti-entropy round, 0 when it did not.",
                peer_up as f64,
            );
            gauge(
                &mut out,
                "sso_peer_lag_epochs",
                "This node's keyring changes since the two nodes' key sets were last seen equal (periodic rounds and status requests).",
                self.peer_lag_epochs.load(Relaxed) as f64,
            );
            let contact = self.peer_last_contact_unix.load(Relaxed);
            gauge(
                &mut out,
                "sso_peer_last_contact_seconds",
                "Seconds since the peer last answered; -1 when never.",
                if contact == 0 { -1.0 } else { (now - contact) as f64 },
            );
            counter(
                &mut out,
                "sso_replication_failures_total",
                "Replication requests to the peer that failed.",
                self.replication_failures.load(Relaxed),
            );
        }
        self.tls.render(&mut out, now);
        out
    }
}

/// What keeps this node from being healthy: a store or an audit log it cannot write.
/// Set by the write that failed, cleared by the next one that succeeds (for the store,
/// a write check runs every second while it fails; see `server`). Served by
/// `GET /v1/health` as `degraded` with these reasons, by admin status and as the
/// `sso_store_writable` and `sso_audit_writable` gauges.
#[derive(Debug, Default)]
pub struct Health {
    store: Mutex<Option<String>>,
    audit: Mutex<Option<String>>,
    name: Mutex<Option<String>>,
}

impl Health {
    /// The store could not be written: `problem` says why (no key material in it).
    pub fn store_failed(&self, problem: impl Into<String>) {
        let problem = problem.into();
        let mut slot = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(problem = %problem, "the store cannot be written: health is degraded");
        }
        *slot = Some(problem);
    }

    /// A write to the store succeeded.
    pub fn store_ok(&self) {
        if self.store.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
            tracing::info!("the store can be written again");
        }
    }

    /// The audit log could not be written.
    pub fn audit_failed(&self, problem: impl Into<String>) {
        *self.audit.lock().unwrap_or_else(|p| p.into_inner()) = Some(problem.into());
    }

    /// A write to the audit log succeeded.
    pub fn audit_ok(&self) {
        if self.audit.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
            tracing::info!("the audit log can be written again");
        }
    }

    /// A cluster node's change feed reconnected and found its node name held by another
    /// connection (another process with this name started while the database was away):
    /// `problem` says so. The feed keeps trying to take the name back.
    pub fn name_held_elsewhere(&self, problem: impl Into<String>) {
        let problem = problem.into();
        let mut slot = self.name.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(problem = %problem, "this node's name is held by another process: health is degraded");
        }
        *slot = Some(problem);
    }

    /// The node's change feed holds its name (again).
    pub fn name_held(&self) {
        if self.name.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
            tracing::info!("this node holds its name in the database again");
        }
    }

    /// Whether another process holds this node's name.
    pub fn name_lost(&self) -> bool {
        self.name.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Whether the store is failing now.
    pub fn store_failing(&self) -> bool {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The current problems: (store, audit log).
    pub fn problems(&self) -> (Option<String>, Option<String>) {
        (
            self.store.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            self.audit.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        )
    }

    /// `ok` or `degraded`, and the reasons, for health and status answers.
    pub fn report(&self) -> (&'static str, Vec<String>) {
        let (store, audit) = self.problems();
        let problems: Vec<String> = store
            .map(|p| format!("store: {p}"))
            .into_iter()
            .chain(audit.map(|p| format!("audit log: {p}")))
            .chain(
                self.name
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .map(|p| format!("node name: {p}")),
            )
            .collect();
        (if problems.is_empty() { "ok" } else { "degraded" }, problems)
    }
}
