//! Connection and watch limits: nobody can hold every slot.
//!
//! - **Pending handshakes** are capped apart from the connection cap; past the cap a new
//!   connection closes the oldest pending handshake, so silent TCP connections never keep
//!   an authenticated client waiting in the backlog.
//! - **Deadlines after the handshake**: a connection must start a request within
//!   `first_request_timeout_ms` and is closed after `idle_timeout_ms` with no request in
//!   flight, whatever the protocol (hyper-util's protocol detection has no timeout of its
//!   own). [`Activity`] tracks requests; the accept loop closes the connection when
//!   [`Activity::idle`] fires.
//! - **Per-identity caps** on connections (small for identities that hold no role) and on
//!   watch long-polls, plus a total watch cap. A [`Slot`] gives its count back on drop.
//! - **Aggregated audit of floods**: [`AuditAggregate`] writes the first failure of a
//!   (source, reason) at once and counts the rest, one line per source and interval.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::audit::{Audit, AuditEvent};
use crate::config::Limits;
use crate::identity::Caller;
use crate::metrics::Metrics;

/// How often aggregated audit counts are written.
pub const AGGREGATE_INTERVAL: Duration = Duration::from_secs(10);
/// Distinct (source, reason) pairs tracked per interval; beyond, one overflow bucket.
const MAX_AGGREGATE_KEYS: usize = 4096;
/// Time a refused connection is kept open to read its request and answer 429.
pub const REFUSED_CONNECTION_TIME: Duration = Duration::from_millis(500);

/// The limits shared by every connection.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    metrics: Arc<Metrics>,
    pending: Mutex<Pending>,
    connections: Arc<Counter>,
    watches: Arc<Counter>,
    /// Handshake failures and refusals, aggregated per source for the audit log.
    pub failures: AuditAggregate,
}

#[derive(Debug, Default)]
struct Pending {
    next: u64,
    waiting: BTreeMap<u64, Arc<Notify>>,
}

impl Limiter {
    /// Limits from the config, counted in `metrics`.
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits: limits.clone(),
            connections: Arc::new(Counter::new(metrics.clone(), None)),
            watches: Arc::new(Counter::new(metrics.clone(), Some(Gauge::Watches))),
            metrics,
            pending: Mutex::new(Pending::default()),
            failures: AuditAggregate::default(),
        })
    }

    /// Registers a connection whose handshake starts now. When too many are pending, the
    /// oldest is told to give up (its [`PendingHandshake::evicted`] completes).
    pub fn begin_handshake(self: &Arc<Self>) -> PendingHandshake {
        let cap = self
            .limits
            .max_pending_handshakes
            .min(self.limits.max_connections)
            .max(1);
        let evicted = Arc::new(Notify::new());
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        while pending.waiting.len() >= cap {
            let Some((_, oldest)) = pending.waiting.pop_first() else {
                break;
            };
            oldest.notify_one();
            self.metrics
                .limit_event("sso_connections_closed_total", "handshake_evicted");
        }
        let id = pending.next;
        pending.next += 1;
        pending.waiting.insert(id, evicted.clone());
        drop(pending);
        self.metrics.handshakes_pending.fetch_add(1, Relaxed);
        PendingHandshake {
            limiter: self.clone(),
            id,
            evicted,
        }
    }

    /// Takes a connection slot for an authenticated caller, or names the cap it hit
    /// (`identity` or `no_role`), counted in `sso_connection_refusals_total`.
    pub fn admit(&self, caller: &Caller) -> Result<Slot, &'static str> {
        let holds_role = caller.roles.label() != "none";
        let (cap, reason, prefix) = if holds_role {
            (self.limits.max_connections_per_identity, "identity", "role:")
        } else {
            (self.limits.max_connections_per_roleless_identity, "no_role", "none:")
        };
        let key: Arc<str> = format!("{prefix}{}", caller.label).into();
        self.connections.take(key, cap, usize::MAX).map_err(|_| {
            self.metrics.limit_event("sso_connection_refusals_total", reason);
            reason
        })
    }

    /// Takes a watch slot for `caller`, or says which cap it hit, counted in
    /// `sso_watch_refusals_total`.
    pub fn watch(&self, caller: &Caller) -> Result<Slot, WatchRefused> {
        self.watches
            .take(
                caller.label.clone(),
                self.limits.max_watches_per_identity,
                self.limits.max_watches,
            )
            .inspect_err(|which| {
                let reason = match which {
                    WatchRefused::Identity => "identity",
                    WatchRefused::Total => "total",
                };
                self.metrics.limit_event("sso_watch_refusals_total", reason);
            })
    }

    /// The first-request and idle deadlines of an admitted connection.
    pub fn deadlines(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(
                self.limits
                    .first_request_timeout_ms
                    .unwrap_or(self.limits.header_read_timeout_ms),
            ),
            Duration::from_millis(self.limits.idle_timeout_ms),
        )
    }

    /// Counts a connection the server closed for a deadline.
    pub fn closed(&self, reason: &'static str) {
        self.metrics.limit_event("sso_connections_closed_total", reason);
    }
}

/// A handshake in progress; deregistered on drop.
#[derive(Debug)]
pub struct PendingHandshake {
    limiter: Arc<Limiter>,
    id: u64,
    evicted: Arc<Notify>,
}

impl PendingHandshake {
    /// Completes when a newer connection pushed this one out.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let mut pending = self.limiter.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.waiting.remove(&self.id);
        drop(pending);
        self.limiter.metrics.handshakes_pending.fetch_sub(1, Relaxed);
    }
}

/// Which watch cap a refused watch hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchRefused {
    /// The caller's own cap: 429.
    Identity,
    /// The server's total: 503.
    Total,
}

#[derive(Debug, Clone, Copy)]
enum Gauge {
    Watches,
}

/// Counts per key with a per-key and a total cap.
#[derive(Debug)]
struct Counter {
    counts: Mutex<(HashMap<Arc<str>, usize>, usize)>,
    metrics: Arc<Metrics>,
    gauge: Option<Gauge>,
}

impl Counter {
    fn new(metrics: Arc<Metrics>, gauge: Option<Gauge>) -> Self {
        Self {
            counts: Mutex::new((HashMap::new(), 0)),
            metrics,
            gauge,
        }
    }

    fn gauge(&self) -> Option<&AtomicI64> {
        self.gauge.map(|g| match g {
            Gauge::Watches => &self.metrics.watches_open,
        })
    }

    fn take(self: &Arc<Self>, key: Arc<str>, per_key: usize, total: usize) -> Result<Slot, WatchRefused> {
        let mut guard = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (map, sum) = &mut *guard;
        if *sum >= total {
            return Err(WatchRefused::Total);
        }
        let n = map.entry(key.clone()).or_default();
        if *n >= per_key {
            return Err(WatchRefused::Identity);
        }
        *n += 1;
        *sum += 1;
        drop(guard);
        if let Some(g) = self.gauge() {
            g.fetch_add(1, Relaxed);
        }
        Ok(Slot {
            counter: self.clone(),
            key,
        })
    }
}

/// One counted connection or watch; gives its count back on drop.
#[derive(Debug)]
pub struct Slot {
    counter: Arc<Counter>,
    key: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.counter.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (map, sum) = &mut *guard;
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
        *sum = sum.saturating_sub(1);
        drop(guard);
        if let Some(g) = self.counter.gauge() {
            g.fetch_sub(1, Relaxed);
        }
    }
}

/// Requests in flight on one connection and when the last one started or ended.
#[derive(Debug)]
pub struct Activity {
    base: tokio::time::Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    served: AtomicBool,
    /// Wakes [`Activity::idle`] when the first request starts, whose deadline may be
    /// sooner than the one it sleeps towards.
    started: Notify,
}

impl Activity {
    /// A connection whose handshake just completed.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
            started: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.last_ms.store(self.now_ms(), Relaxed);
        if !self.served.swap(true, Relaxed) {
            self.started.notify_one();
        }
        InFlight(self.clone())
    }

    /// Completes, with the reason, once no request was started within `first` of the
    /// handshake, or none was in flight for `idle` since.
    pub async fn idle(&self, first: Duration, idle: Duration) -> &'static str {
        loop {
            let (limit, reason) = if self.served.load(Relaxed) {
                (idle, "idle_timeout")
            } else {
                (first, "first_request_timeout")
            };
            if self.in_flight.load(Relaxed) > 0 {
                tokio::select! {
                    () = tokio::time::sleep(limit) => {}
                    () = self.started.notified() => {}
                }
                continue;
            }
            let deadline = self
                .last_ms
                .load(Relaxed)
                .saturating_add(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
            let now = self.now_ms();
            if now >= deadline {
                return reason;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(deadline - now)) => {}
                () = self.started.notified() => {}
            }
        }
    }
}

/// A request in flight.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AggregateKey {
    op: &'static str,
    identity: Arc<str>,
    source: IpAddr,
    reason: &'static str,
}

/// Audit entries of one kind from one source, counted instead of written one by one.
///
/// The first entry for a (operation, identity, source address, reason) is written at
/// once, with its detail; later ones within the interval only count, and
/// [`AuditAggregate::flush`] writes one line per key with the count
/// (`detail: "REASON: count=N in the last 10 s"`, `peer: "ADDR:0"`). A key quiet for a
/// whole interval is forgotten, so its next failure is again written at once.
#[derive(Debug, Default)]
pub struct AuditAggregate {
    counts: Mutex<HashMap<AggregateKey, u64>>,
}

impl AuditAggregate {
    /// Records `event` (whose `detail` starts with `reason`), aggregated by source.
    pub fn record(&self, audit: &Audit, event: AuditEvent, reason: &'static str) {
        let source = event.peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
        let mut key = AggregateKey {
            op: event.op,
            identity: event.identity.clone(),
            source,
            reason,
        };
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&key) {
            *n += 1;
            return;
        }
        if counts.len() >= MAX_AGGREGATE_KEYS {
            // Too many sources this interval: one bucket for the rest, counted only.
            key.source = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
            key.identity = "*".into();
            *counts.entry(key).or_default() += 1;
            return;
        }
        counts.insert(key, 0);
        drop(counts);
        audit.record(event);
    }

    /// Writes one line per key that counted anything since the last flush.
    pub fn flush(&self, audit: &Audit, interval: Duration) {
        let mut lines = Vec::new();
        {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            counts.retain(|key, n| {
                if *n == 0 {
                    return false;
                }
                lines.push((key.clone(), *n));
                *n = 0;
                true
            });
        }
        for (key, n) in lines {
            audit.record(AuditEvent {
                time: std::time::SystemTime::now(),
                identity: key.identity,
                cert: None,
                role: "none",
                op: key.op,
                key_id: None,
                outcome: "denied",
                detail: Some(format!(
                    "{}: count={n} in the last {} s (aggregated)",
                    key.reason,
                    interval.as_secs()
                )),
                peer: Some(SocketAddr::new(key.source, 0)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_after_first_then_idle_deadline() {
        let a = Activity::new();
        let t = Instant::now();
        assert_eq!(
            a.idle(Duration::from_secs(2), Duration::from_secs(5)).await,
            "first_request_timeout"
        );
        assert_eq!(t.elapsed().as_secs(), 2);

        // A request during a long first deadline switches to the shorter idle one.
        let a = Activity::new();
        let a2 = a.clone();
        let t = Instant::now();
        let idle = tokio::spawn(async move { a2.idle(Duration::from_secs(60), Duration::from_secs(1)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(a.request());
        assert_eq!(idle.await.unwrap(), "idle_timeout");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        let a = Activity::new();
        let r = a.request();
        let a2 = a.clone();
        let idle = tokio::spawn(async move { a2.idle(Duration::from_secs(2), Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!idle.is_finished(), "a request in flight is not idle");
        drop(r);
        let t = Instant::now();
        assert_eq!(idle.await.unwrap(), "idle_timeout");
        assert!(t.elapsed() <= Duration::from_secs(6), "{:?}", t.elapsed());
    }

    #[test]
    fn counters_cap_per_key_and_total_and_give_back() {
        let c = Arc::new(Counter::new(Arc::new(Metrics::default()), Some(Gauge::Watches)));
        let a1 = c.take("a".into(), 2, 3).unwrap();
        let _a2 = c.take("a".into(), 2, 3).unwrap();
        assert_eq!(c.take("a".into(), 2, 3).unwrap_err(), WatchRefused::Identity);
        let _b = c.take("b".into(), 2, 3).unwrap();
        assert_eq!(c.take("c".into(), 2, 3).unwrap_err(), WatchRefused::Total);
        drop(a1);
        let _c = c.take("c".into(), 2, 3).unwrap();
        assert_eq!(c.metrics.watches_open.load(Relaxed), 3);
    }
}
