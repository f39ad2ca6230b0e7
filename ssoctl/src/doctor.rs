//! `ssoctl doctor`: a checklist of what an operator must act on, one line per check:
//! `ok|warn|fail  CHECK  DETAIL; REMEDY`, or one JSON document with `--json`.
//!
//! What it checks, in order (docs/operations.md §10 has the thresholds and fields):
//! - `config`: the connection settings ssoctl uses (`--dev DIR` or `--server/--ca/--cert/
//!   --key`) and, on the server host, the server's own config (`--config FILE`, or
//!   `DIR/server.toml` with `--dev`), loaded and validated as the server does;
//! - `file_mode`: the client key and, when the server config is readable, the store, its
//!   unseal key or passphrase file and the TLS keys: 0600 or stricter;
//! - `cert_expiry` / `crl_expiry`: local certificates, each server's presented certificate
//!   and the server config's CRLs;
//! - `server`, `health`, `peer`: each node answers its admin status, is not degraded, and
//!   sees its peer; a peer named in a status that was not given is asked too;
//! - `backup`: pair-wide coverage from the status;
//! - `clock_skew`: the nodes' status `time`s, each corrected by the request's round trip;
//! - `disk_space`: the store's filesystem, when the store is local.
//!
//! Exit codes: 0 when nothing needs action, [`crate::EX_DOCTOR_WARN`] for warnings only,
//! [`crate::EX_DOCTOR_FAIL`] when any check failed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use sso_proto::wire::answers::StatusAnswer;

use crate::cli::Global;
use crate::online::Online;
use crate::{EX_DOCTOR_FAIL, EX_DOCTOR_WARN, EX_SOFTWARE, Failure};

/// A certificate closer to its end than this is a warning.
pub(crate) const CERT_WARN_DAYS: i64 = 30;
/// A CRL whose `nextUpdate` is closer than this is a warning. Shorter than the
/// certificates' 30 days: CRLs are commonly reissued weekly, so 30 days would always warn.
pub(crate) const CRL_WARN_DAYS: i64 = 3;
/// Clock difference between the pair's nodes above which doctor warns, in seconds.
pub(crate) const SKEW_WARN_SECS: f64 = 5.0;
/// Free space on the store's filesystem below which doctor warns: under 1 GiB *and*
/// under 10 % of the filesystem (either alone is no concern: 1 GiB is 0.1 % of a large
/// disk; 10 % of a small one can be plenty for a store of kilobytes).
pub(crate) const DISK_WARN_BYTES: u64 = 1 << 30;
/// The share of the filesystem, in percent, that goes with [`DISK_WARN_BYTES`].
pub(crate) const DISK_WARN_PERCENT: u64 = 10;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Level {
    /// Nothing to do.
    Ok,
    /// Act soon.
    Warn,
    /// Act now.
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Check {
    /// ok, warn or fail.
    pub(crate) status: Level,
    /// The check's stable name (`config`, `file_mode`, …).
    pub(crate) check: &'static str,
    /// What was found, naming the file, node or URL.
    pub(crate) detail: String,
    /// What to do; empty when nothing.
    pub(crate) remedy: String,
}

fn check(status: Level, check: &'static str, detail: impl Into<String>, remedy: impl Into<String>) -> Check {
    Check {
        status,
        check,
        detail: detail.into(),
        remedy: remedy.into(),
    }
}

/// What one node said.
struct NodeStatus {
    url: String,
    status: StatusAnswer,
    /// The node's clock minus ours, in seconds (ours taken mid-request).
    offset: f64,
    /// The request's round trip, in seconds: the offset's uncertainty is half of it.
    round_trip: f64,
}

/// Runs every check, prints the checklist and returns the exit status as a failure when
/// something needs action.
pub(crate) fn doctor(g: &Global, config: Option<&Path>, out: &mut dyn Write) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(EX_SOFTWARE, e, ""))?;
    let checks = runtime.block_on(run_checks(g, config));
    let worst = checks.iter().map(|c| c.status).max().unwrap_or(Level::Ok);
    let text = if g.json {
        serde_json::to_string_pretty(&serde_json::json!({"status": worst, "checks": checks})).unwrap_or_default()
    } else {
        checks.iter().map(line).collect::<Vec<_>>().join("\n")
    };
    writeln!(out, "{text}").map_err(|e| Failure::new(EX_SOFTWARE, e, ""))?;
    let count = |l: Level| checks.iter().filter(|c| c.status == l).count();
    match worst {
        Level::Ok => Ok(()),
        Level::Warn => Err(Failure::new(
            EX_DOCTOR_WARN,
            format!("doctor: {} warning(s), nothing failed", count(Level::Warn)),
            "act on the lines marked warn before they become failures",
        )),
        Level::Fail => Err(Failure::new(
            EX_DOCTOR_FAIL,
            format!(
                "doctor: {} check(s) failed, {} warning(s)",
                count(Level::Fail),
                count(Level::Warn)
            ),
            "act on the lines marked fail first",
        )),
    }
}

/// `ok    server      DETAIL; REMEDY`.
fn line(c: &Check) -> String {
    let mut s = format!("{:<4}  {:<11}  {}", c.status.word(), c.check, c.detail);
    if !c.remedy.is_empty() {
        s.push_str("; ");
        s.push_str(&c.remedy);
    }
    s
}

async fn run_checks(g: &Global, config: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    // The server's config, when this host has it.
    let config_path = config.map(Path::to_path_buf).or_else(|| {
        g.dev
            .as_ref()
            .map(|d| d.join(sso_devdir::SERVER_CONFIG))
            .filter(|p| p.exists())
    });
    let server_config = match &config_path {
        None => None,
        Some(path) => match sso_config::Config::load(path) {
            Ok(c) => {
                checks.push(check(
                    Level::Ok,
                    "config",
                    format!("server config {} loads and validates (node {})", path.display(), c.node),
                    "",
                ));
                Some(c)
            }
            Err(e) => {
                checks.push(check(
                    Level::Fail,
                    "config",
                    format!("server config {}: {e}", path.display()),
                    "fix the field it names (docs/configuration.md); the server will not start with it",
                ));
                None
            }
        },
    };
    // The connection settings.
    let settings = crate::online::settings(g);
    let online = match &settings {
        Err(f) => {
            checks.push(check(Level::Fail, "config", f.message.clone(), f.hint.clone()));
            None
        }
        Ok((servers, ..)) => match Online::connect(g) {
            Ok(conn) => {
                checks.push(check(
                    Level::Ok,
                    "config",
                    format!("connection settings: {}", servers.join(", ")),
                    "",
                ));
                Some(conn)
            }
            Err(f) => {
                checks.push(check(Level::Fail, "config", f.message.clone(), f.hint.clone()));
                None
            }
        },
    };

    // File modes.
    let mut private: Vec<(String, PathBuf)> = Vec::new();
    if let Ok((_, _, _, key)) = &settings {
        private.push(("client key".into(), key.clone()));
    }
    let mut cert_files: Vec<(String, PathBuf)> = Vec::new();
    if let Ok((_, ca, cert, _)) = &settings {
        cert_files.push(("CA".into(), ca.clone()));
        cert_files.push(("client certificate".into(), cert.clone()));
    }
    if let Some(c) = &server_config {
        // A PostgreSQL store is a URL, not a file of this host.
        if c.store.database_url().is_none() {
            private.push(("store".into(), c.store.path.clone()));
        }
        match &c.store.unseal {
            sso_config::UnsealSource::KeyFile(p) => private.push(("unseal key file".into(), p.clone())),
            sso_config::UnsealSource::PassphraseFile(p) => private.push(("passphrase file".into(), p.clone())),
            _ => {}
        }
        private.push(("server TLS key".into(), c.tls.key.clone()));
        cert_files.push(("server certificate".into(), c.tls.cert.clone()));
        cert_files.push(("client CA".into(), c.tls.client_ca.clone()));
        if let Some(p) = c.peer.as_ref() {
            if let Some(k) = &p.key {
                private.push(("peer TLS key".into(), k.clone()));
            }
            if let Some(cert) = &p.cert {
                cert_files.push(("peer certificate".into(), cert.clone()));
            }
            if let Some(ca) = &p.ca {
                cert_files.push(("peer CA".into(), ca.clone()));
            }
        }
    }
    for (what, path) in dedup(private) {
        checks.extend(file_mode(&what, &path));
    }

    // Certificates and CRLs on this host.
    let now = OffsetDateTime::now_utc();
    for (what, path) in dedup(cert_files) {
        match read_certs(&path) {
            Ok(ders) => {
                if let Some((cn, not_after)) = ders
                    .iter()
                    .filter_map(|d| certs::identity_from_der(d).ok())
                    .filter_map(|id| Some((id.label(), id.not_after?)))
                    .min_by_key(|(_, t)| *t)
                {
                    checks.push(cert_expiry(
                        &format!("{what} {} ({cn})", path.display()),
                        not_after,
                        now,
                    ));
                }
            }
            Err(e) => checks.push(check(
                Level::Fail,
                "cert_expiry",
                format!("{what} {}: {e}", path.display()),
                "check the path and that the file is PEM",
            )),
        }
    }
    if let Some(c) = &server_config {
        for path in &c.tls.crls {
            checks.push(crl_expiry(path, now));
        }
    }

    // Each node, as it answers.
    let mut nodes: Vec<NodeStatus> = Vec::new();
    if let Some(conn) = &online {
        ask_all(conn, &mut nodes, &mut checks, "").await;
        // Peers the given servers name but that were not given: ask them too.
        let known: Vec<String> = nodes.iter().map(|n| n.status.node.clone()).collect();
        let asked: Vec<String> = conn.servers().to_vec();
        let mut extra: Vec<(String, String)> = Vec::new();
        for n in &nodes {
            let Some(peer) = &n.status.peer else {
                continue;
            };
            let (url, name) = (peer.url.as_str(), peer.node.as_deref());
            if name.is_some_and(|name| known.iter().any(|k| k == name))
                || asked.iter().any(|a| a == url)
                || extra.iter().any(|(u, _)| u == url)
            {
                continue;
            }
            extra.push((url.to_owned(), n.status.node.clone()));
        }
        for (url, of) in extra {
            let peer_global = Global {
                servers: vec![url.clone()],
                ..g.clone()
            };
            match Online::connect(&peer_global) {
                Ok(peer_conn) => ask_all(&peer_conn, &mut nodes, &mut checks, &format!(" (peer of {of})")).await,
                Err(f) => checks.push(check(
                    Level::Fail,
                    "server",
                    format!("{url} (peer of {of}): {}", f.message),
                    f.hint,
                )),
            }
        }
    }
    for n in &nodes {
        checks.push(health(n));
    }
    for n in &nodes {
        checks.push(peer(n));
    }
    if let Some(c) = backup(&nodes) {
        checks.push(c);
    }
    if let Some(c) = primaries(&nodes) {
        checks.push(c);
    }
    if let Some(c) = clock_skew(&nodes) {
        checks.push(c);
    }
    if let Some(c) = server_config.as_ref().filter(|c| c.store.database_url().is_none()) {
        checks.push(disk_space(&c.store.path));
    }
    checks
}

/// Each path once, in the order first named.
fn dedup(items: Vec<(String, PathBuf)>) -> Vec<(String, PathBuf)> {
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for (what, path) in items {
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if !seen.contains(&key) {
            seen.push(key);
            out.push((what, path));
        }
    }
    out
}

/// A file that holds a secret must not be readable by group or others. A file this user
/// cannot see (another user's directory) is not checked.
fn file_mode(what: &str, path: &Path) -> Option<Check> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    Some(if mode & 0o077 == 0 {
        check(
            Level::Ok,
            "file_mode",
            format!("{what} {} is {mode:04o}", path.display()),
            "",
        )
    } else {
        check(
            Level::Fail,
            "file_mode",
            format!(
                "{what} {} is {mode:04o}: group or others can read it (0600 or stricter expected)",
                path.display()
            ),
            format!("chmod 600 {}", path.display()),
        )
    })
}

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .map(|c| c.map(|c| c.to_vec()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// "in 12 days", "3 days ago", "in 5 hours".
fn when(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let d = t - now;
    let (n, unit) = if d.whole_days().abs() >= 2 {
        (d.whole_days().abs(), "days")
    } else if d.whole_hours().abs() >= 2 {
        (d.whole_hours().abs(), "hours")
    } else {
        (d.whole_minutes().abs(), "minutes")
    };
    if d.is_negative() {
        format!("{n} {unit} ago")
    } else {
        format!("in {n} {unit}")
    }
}

fn rfc(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn cert_expiry(what: &str, not_after: OffsetDateTime, now: OffsetDateTime) -> Check {
    if not_after <= now {
        check(
            Level::Fail,
            "cert_expiry",
            format!("{what} expired {} ({})", rfc(not_after), when(not_after, now)),
            "issue a new certificate and install it (docs/operations.md §7)",
        )
    } else if not_after - now < time::Duration::days(CERT_WARN_DAYS) {
        check(
            Level::Warn,
            "cert_expiry",
            format!(
                "{what} expires {} ({}, under {CERT_WARN_DAYS} days)",
                rfc(not_after),
                when(not_after, now)
            ),
            "issue its successor now and install it before then (docs/operations.md §7)",
        )
    } else {
        check(
            Level::Ok,
            "cert_expiry",
            format!("{what} valid until {} ({})", rfc(not_after), when(not_after, now)),
            "",
        )
    }
}

fn crl_expiry(path: &Path, now: OffsetDateTime) -> Check {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            return check(
                Level::Fail,
                "crl_expiry",
                format!("CRL {}: {e}", path.display()),
                "publish the CRL at the path tls.crls names",
            );
        }
    };
    let ders: Vec<Vec<u8>> = if bytes.trim_ascii_start().starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .filter_map(Result::ok)
            .map(|c| c.to_vec())
            .collect()
    } else {
        vec![bytes]
    };
    let next: Vec<Option<OffsetDateTime>> = match ders
        .iter()
        .map(|d| certs::crl_next_update(d))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(n) if !n.is_empty() => n,
        Ok(_) | Err(_) => {
            return check(
                Level::Fail,
                "crl_expiry",
                format!("CRL {}: not a CRL file (PEM or DER)", path.display()),
                "publish a CRL signed by the CA (docs/operations.md §1)",
            );
        }
    };
    let Some(soonest) = next.iter().flatten().min().copied() else {
        return check(
            Level::Ok,
            "crl_expiry",
            format!("CRL {} has no nextUpdate", path.display()),
            "",
        );
    };
    let what = format!("CRL {}", path.display());
    if soonest <= now {
        check(
            Level::Fail,
            "crl_expiry",
            format!(
                "{what} is stale: its nextUpdate passed {} ({})",
                rfc(soonest),
                when(soonest, now)
            ),
            "publish a fresh CRL (openssl ca -gencrl) and send the server SIGHUP",
        )
    } else if soonest - now < time::Duration::days(CRL_WARN_DAYS) {
        check(
            Level::Warn,
            "crl_expiry",
            format!(
                "{what} must be replaced by {} ({}, under {CRL_WARN_DAYS} days)",
                rfc(soonest),
                when(soonest, now)
            ),
            "publish a fresh CRL (openssl ca -gencrl) and send the server SIGHUP",
        )
    } else {
        check(
            Level::Ok,
            "crl_expiry",
            format!("{what} is current until {} ({})", rfc(soonest), when(soonest, now)),
            "",
        )
    }
}

/// The line for a server that did not answer. A TLS refusal is not a stopped server: an
/// expired certificate (the server's, which doctor sees in the handshake, or ours, which
/// the server refuses) gets its own check and remedy.
fn unanswered(url: &str, label: &str, error: &str) -> Check {
    let lower = error.to_ascii_lowercase();
    if lower.contains("invalid peer certificate") {
        let remedy = if lower.contains("expired") {
            "renew the server's certificate (ssoctl certs issue), install it and send the server SIGHUP"
        } else {
            "check that the server's certificate is issued by the CA given with --ca and names the host in the URL"
        };
        return check(
            Level::Fail,
            "cert_expiry",
            format!("{url}{label}: its certificate was refused: {error}"),
            remedy,
        );
    }
    if lower.contains("certificate")
        && (lower.contains("alert") || lower.contains("expired") || lower.contains("revoked"))
    {
        return check(
            Level::Fail,
            "server",
            format!("{url}{label} refused our client certificate: {error}"),
            "check the client certificate's dates (openssl x509 -noout -dates -in FILE), that it is not revoked, and that the server trusts its CA",
        );
    }
    check(
        Level::Fail,
        "server",
        format!("{url}{label} did not answer: {error}"),
        "start the server or check the network; `journalctl -u sso-server` says why it stopped",
    )
}

/// Asks every server of `conn` for its admin status and its certificate.
async fn ask_all(conn: &Online, nodes: &mut Vec<NodeStatus>, checks: &mut Vec<Check>, label: &str) {
    for (idx, url) in conn.servers().iter().enumerate() {
        let sent = OffsetDateTime::now_utc();
        let reply = conn.get_on(idx, "/v1/admin/status", Duration::from_secs(10)).await;
        let received = OffsetDateTime::now_utc();
        let value = match reply {
            Err(e) => {
                checks.push(unanswered(url, label, &e.to_string()));
                continue;
            }
            Ok(r) if r.status != 200 => {
                let refusal: sso_proto::wire::ErrorBody = serde_json::from_slice(&r.body).unwrap_or_default();
                let message = refusal.message;
                let remedy = if r.status == 403 {
                    "use a certificate that holds the admin role (roles.admin in the server config)"
                } else {
                    "see the server log"
                };
                checks.push(check(
                    Level::Fail,
                    "server",
                    format!("{url}{label} answered {}: {message}", r.status),
                    remedy,
                ));
                continue;
            }
            Ok(r) => match serde_json::from_slice::<StatusAnswer>(&r.body) {
                Ok(v) => v,
                Err(e) => {
                    checks.push(check(
                        Level::Fail,
                        "server",
                        format!("{url}{label} answered with something other than a status: {e}"),
                        "are ssoctl and the server the same release?",
                    ));
                    continue;
                }
            },
        };
        // The same node reached by another URL (a peer URL through a proxy): said once.
        if nodes.iter().any(|n| n.status.node == value.node) {
            continue;
        }
        checks.push(check(
            Level::Ok,
            "server",
            format!("{url}{label} answered: node {}, epoch {}", value.node, value.epoch),
            "",
        ));
        match conn.server_certificate(idx).await {
            Ok(der) => {
                if let Ok(id) = certs::identity_from_der(&der)
                    && let Some(not_after) = id.not_after
                {
                    checks.push(cert_expiry(
                        &format!("certificate {url} presents ({})", id.label()),
                        not_after,
                        OffsetDateTime::now_utc(),
                    ));
                }
            }
            Err(e) => checks.push(check(
                Level::Warn,
                "cert_expiry",
                format!("certificate {url} presents: not read ({e})"),
                "rerun doctor; check the server's TLS setup",
            )),
        }
        let trip: time::Duration = received - sent;
        let middle: OffsetDateTime = sent + trip / 2_i32;
        let offset = OffsetDateTime::parse(&value.time, &Rfc3339)
            .ok()
            .map_or(f64::NAN, |t: OffsetDateTime| {
                let d: time::Duration = t - middle;
                d.as_seconds_f64()
            });
        nodes.push(NodeStatus {
            url: url.clone(),
            status: value,
            offset,
            round_trip: trip.as_seconds_f64(),
        });
    }
}

fn node_name(n: &NodeStatus) -> &str {
    &n.status.node
}

fn health(n: &NodeStatus) -> Check {
    let h = &n.status.health;
    match h.status.as_str() {
        "ok" => check(Level::Ok, "health", format!("{} ok", node_name(n)), ""),
        other => check(
            Level::Fail,
            "health",
            format!("{} is {other}: {}", node_name(n), h.problems.join("; ")),
            "fix the disk as the problem says (free space, remount read-write); health returns to ok by itself",
        ),
    }
}

fn peer(n: &NodeStatus) -> Check {
    let name = node_name(n);
    let Some(p) = &n.status.peer else {
        return check(
            Level::Ok,
            "peer",
            format!("{name} is standalone (no peer configured)"),
            "",
        );
    };
    let peer_node = p.node.as_deref().unwrap_or("?");
    if let Some(alarm) = &p.integrity_alarm {
        return check(
            Level::Fail,
            "peer",
            format!("{name}: integrity alarm with peer {peer_node}: {alarm}"),
            "stop rotating; compare both nodes' keys (docs/operations.md §4)",
        );
    }
    if p.state == "up" {
        return check(
            Level::Ok,
            "peer",
            format!(
                "{name} sees peer {peer_node} up ({}), lag {}",
                p.url,
                crate::answers::lag_text(p.lag_epochs)
            ),
            "",
        );
    }
    let last = p.last_contact.as_deref().unwrap_or("never");
    check(
        Level::Fail,
        "peer",
        format!(
            "{name} cannot reach its peer {peer_node} ({}): last contact {last}{}",
            p.url,
            p.last_error
                .as_deref()
                .map_or(String::new(), |e| format!(", last error: {e}"))
        ),
        "bring the peer back (start it, check the network and its certificate); meanwhile rotations need --allow-degraded",
    )
}

fn backup(nodes: &[NodeStatus]) -> Option<Check> {
    // The pair's view when one node has it, else the first node's own.
    let n = nodes
        .iter()
        .find(|n| n.status.backup.coverage == "pair")
        .or_else(|| nodes.first())?;
    let b = &n.status.backup;
    let uncovered = b.not_backed_up.len();
    let last = b.last_backup_at.as_deref().unwrap_or("never");
    let scope = match b.coverage.as_str() {
        "pair" => "backups through either node",
        "node_only_peer_unreachable" => "this node's backups only: the peer did not answer",
        _ => "this node's backups",
    };
    Some(if uncovered == 0 {
        check(
            Level::Ok,
            "backup",
            format!(
                "every key of {} is in a backup (last backup {last}; {scope})",
                node_name(n)
            ),
            "",
        )
    } else {
        check(
            Level::Warn,
            "backup",
            format!(
                "{uncovered} key(s) of {} in no backup (last backup {last}; {scope})",
                node_name(n)
            ),
            "run ssoctl backup --out FILE and store it off the host",
        )
    })
}

/// Whether the nodes that answered name the same primary. Each node's own checks cannot
/// see this: two healthy nodes with different primaries seal under different keys, and a
/// client of one cannot open what the other's clients sealed until they converge.
fn primaries(nodes: &[NodeStatus]) -> Option<Check> {
    if nodes.len() < 2 {
        return None;
    }
    let shown = |primary: Option<sso_proto::KeyId>| primary.map_or_else(|| "none".to_owned(), |k| k.to_string());
    let first = nodes[0].status.primary;
    Some(if nodes.iter().all(|n| n.status.primary == first) {
        let names: Vec<&str> = nodes.iter().map(node_name).collect();
        let id = shown(first);
        check(
            Level::Ok,
            "primary",
            format!("{} agree: primary {id}", names.join(", ")),
            "",
        )
    } else {
        let all: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} {}", node_name(n), shown(n.status.primary)))
            .collect();
        check(
            Level::Warn,
            "primary",
            format!("the nodes disagree on the primary: {}", all.join(", ")),
            "a rotation or a catch-up may be under way: run doctor again in a few seconds; if it stays, \
             mend what the peer line says (a pair converges by itself once its nodes reach each other; \
             the next rotation supersedes keys made apart, docs/pair.md)",
        )
    })
}

fn clock_skew(nodes: &[NodeStatus]) -> Option<Check> {
    let timed: Vec<&NodeStatus> = nodes.iter().filter(|n| n.offset.is_finite()).collect();
    let paired = nodes.iter().any(|n| n.status.peer.is_some());
    if timed.len() < 2 {
        return paired.then(|| {
            check(
                Level::Warn,
                "clock_skew",
                format!(
                    "not measured: only {} answered with its time",
                    timed.first().map_or("no node", |n| node_name(n))
                ),
                "rerun doctor once both nodes answer",
            )
        });
    }
    let (lo, hi) = timed.iter().fold((timed[0], timed[0]), |(lo, hi), n| {
        (
            if n.offset < lo.offset { n } else { lo },
            if n.offset > hi.offset { n } else { hi },
        )
    });
    let skew = hi.offset - lo.offset;
    let error = (hi.round_trip + lo.round_trip) / 2.0;
    let detail = format!(
        "{} ({}) and {} ({}) differ by {skew:.1} s (± {error:.1} s; threshold {SKEW_WARN_SECS:.0} s)",
        node_name(hi),
        hi.url,
        node_name(lo),
        lo.url
    );
    Some(if skew - error > SKEW_WARN_SECS {
        check(
            Level::Warn,
            "clock_skew",
            detail,
            "run NTP (chrony or systemd-timesyncd) on both nodes: certificate validity and audit times depend on the clocks",
        )
    } else {
        check(Level::Ok, "clock_skew", detail, "")
    })
}

fn disk_space(store: &Path) -> Check {
    let dir = store
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stat = match rustix::fs::statvfs(dir) {
        Ok(s) => s,
        Err(e) => {
            return check(
                Level::Warn,
                "disk_space",
                format!("{}: not measured ({e})", dir.display()),
                "run doctor on the server host as a user who can read the store's directory",
            );
        }
    };
    let avail = stat.f_bavail.saturating_mul(stat.f_frsize);
    let total = stat.f_blocks.saturating_mul(stat.f_frsize);
    let percent = avail.saturating_mul(100).checked_div(total).unwrap_or(100);
    let detail = format!(
        "{} has {} free of {} ({percent} %)",
        dir.display(),
        bytes(avail),
        bytes(total)
    );
    if avail < DISK_WARN_BYTES && percent < DISK_WARN_PERCENT {
        check(
            Level::Warn,
            "disk_space",
            format!("{detail}: under 1 GiB and under {DISK_WARN_PERCENT} %"),
            "free space on that filesystem: with it full, rotations and backups fail with store_unavailable",
        )
    } else {
        check(Level::Ok, "disk_space", detail, "")
    }
}

fn bytes(n: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if n >= GIB {
        format!("{:.1} GiB", n as f64 / GIB as f64)
    } else {
        format!("{} MiB", n / MIB)
    }
}

#[cfg(test)]
mod tests {
    /// Found by attack: a server presenting an expired certificate was reported as a
    /// stopped server ("start the server or check the network"). The errors are rustls's
    /// own, as the transport reports them.
    #[test]
    fn a_refused_certificate_is_not_reported_as_a_stopped_server() {
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired).to_string();
        let c = unanswered("https://n1:7443", "", &format!("connect: {expired}"));
        assert!(
            matches!(c.status, Level::Fail) && c.check == "cert_expiry",
            "{expired}: {c:?}"
        );
        assert!(c.remedy.contains("renew"), "{}", c.remedy);
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer).to_string();
        let c = unanswered("https://n1:7443", "", &unknown);
        assert_eq!(c.check, "cert_expiry");
        assert!(c.remedy.contains("--ca"), "{}", c.remedy);
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired).to_string();
        let c = unanswered("https://n1:7443", "", &refused);
        assert!(
            c.detail.contains("refused our client certificate"),
            "{refused}: {}",
            c.detail
        );
        let down = unanswered("https://n1:7443", "", "connection refused (os error 111)");
        assert!(down.remedy.starts_with("start the server"), "{}", down.remedy);
    }

    use super::*;

    /// A node's status answer as the server writes it, with or without a peer.
    fn status(name: &str, paired: bool) -> StatusAnswer {
        let peer = paired.then(|| serde_json::json!({"url": "x", "state": "up"}));
        serde_json::from_value(serde_json::json!({
            "node": name, "epoch": 1, "time": "", "keys": [], "primary": null, "peer": peer,
            "audit": {"head": "", "seq": 0},
            "backup": {"coverage": "node", "last_backup_at": null, "not_backed_up": []},
            "health": {"problems": [], "status": "ok"},
        }))
        .unwrap()
    }

    fn node(name: &str, offset: f64) -> NodeStatus {
        NodeStatus {
            url: format!("https://{name}:7443"),
            status: status(name, true),
            offset,
            round_trip: 0.2,
        }
    }

    #[test]
    fn clock_skew_warns_above_five_seconds_beyond_the_round_trip() {
        let c = clock_skew(&[node("a", 0.0), node("b", 4.0)]).unwrap();
        assert_eq!(c.status, Level::Ok, "{}", c.detail);
        let c = clock_skew(&[node("a", -3.0), node("b", 4.0)]).unwrap();
        assert_eq!(c.status, Level::Warn, "{}", c.detail);
        assert!(
            c.detail.contains("differ by 7.0 s") && c.detail.contains("threshold 5 s"),
            "{}",
            c.detail
        );
        // One node of a pair: not measured is a warning; a standalone node has no line.
        assert_eq!(clock_skew(&[node("a", 0.0)]).unwrap().status, Level::Warn);
        let mut alone = node("a", 0.0);
        alone.status = status("a", false);
        assert!(clock_skew(&[alone]).is_none());
    }

    #[test]
    fn certificates_warn_within_thirty_days_and_fail_when_expired() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(cert_expiry("c", now + time::Duration::days(31), now).status, Level::Ok);
        assert_eq!(
            cert_expiry("c", now + time::Duration::days(29), now).status,
            Level::Warn
        );
        assert_eq!(
            cert_expiry("c", now - time::Duration::seconds(1), now).status,
            Level::Fail
        );
    }
}
