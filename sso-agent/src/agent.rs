//! `sso-agent`: one [`Client`] per machine, serving local processes over a Unix socket
//! with HTTP/JSON, so `curl --unix-socket` works. Key material never leaves the agent:
//! callers send plaintext and get envelopes, and the reverse.
//!
//! Access control is twofold: the socket file's mode, and the connecting process's uid
//! (from `SO_PEERCRED`) checked against an allowlist before any request is read.
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /v1/seal` | `{"plaintext": B64, "aad"?: B64}` | `{"envelope": B64, "key_id"}` |
//! | `POST /v1/open` | `{"envelope": B64, "aad"?: B64}` | `{"plaintext": B64, "key_id"}` |
//! | `GET /v1/status` | | freshness, primary, keys, epoch, endpoint, last error |
//!
//! Errors are `{"error": CODE, "message": …}`: 400 `bad_request`, 403 `forbidden`,
//! 404 `not_found`, 410 `key_retired`, 422 `bad_envelope`, 503 `unavailable`.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
// `answer`: a wire type (`sso_proto::wire::agent`) with its keys sorted, as the agent's
// `json!` bodies always were (`the_agent_answers_are_the_bytes_it_wrote_before` pins them).
use sso_daemon::json::{JsonError as Refusal, reply_answer as answer};
use tokio::net::UnixListener;
use zeroize::Zeroizing;

use sso_client::{Client, ClientBuilder, Error, Freshness};
use sso_proto::wire::agent::{AgentStatus, OpenRequest, SealAnswer, SealRequest};

const MAX_BODY: usize = 8 << 20;

/// The agent's TOML configuration. `Serialize`, so that the tests (and any tool) write it
/// through this type ([`AgentConfig::new`], [`AgentConfig::to_toml`]) and
/// [`AgentConfig::load`] reads back what was written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Servers, `https://host:port`, tried in order.
    pub endpoints: Vec<String>,
    /// CA for server certificates.
    pub ca: PathBuf,
    /// The agent's client certificate and key.
    pub cert: PathBuf,
    /// The agent's client key.
    pub key: PathBuf,
    /// Where to listen.
    pub socket: PathBuf,
    /// Socket file mode, octal as a string (default "0660").
    #[serde(default = "default_mode")]
    pub socket_mode: String,
    /// Uids allowed to connect; empty means only the agent's own uid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_uids: Vec<u32>,
    /// Backup poll interval in seconds (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_secs: Option<u64>,
    /// Refuse to serve once no server was reached for this long (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stale_secs: Option<u64>,
    /// Connections one allowed uid may hold open at once (default 64); past it, new ones
    /// are answered 503 and closed.
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Kubernetes KMS v2 on its own socket (`[kms]`, see [`crate::kms`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<KmsConfig>,
}

fn default_max_connections_per_uid() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_UID
}

/// Default of [`AgentConfig::max_connections_per_uid`].
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 64;
/// Refused connections per uid that are kept for a moment to be answered 403; past it,
/// a refused connection is closed at once without an answer.
pub(crate) const REFUSALS_ANSWERED_PER_UID: usize = 4;
/// The socket's listen queue.
const LISTEN_BACKLOG: u32 = 128;
/// How long a refused connection is kept to answer 403 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

fn default_mode() -> String {
    "0660".into()
}

impl AgentConfig {
    /// A config with the required settings and every other one at its default (as a file
    /// that names only these reads): change the public fields, then write it with
    /// [`AgentConfig::to_toml`].
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        socket: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            socket: socket.into(),
            socket_mode: default_mode(),
            allowed_uids: Vec::new(),
            poll_interval_secs: None,
            max_stale_secs: None,
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            kms: None,
        }
    }

    /// The config as a TOML file that [`AgentConfig::load`] reads back (relative paths
    /// stay relative: to the file's directory once loaded). Panics only on a path that is
    /// not UTF-8, which TOML cannot hold.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an agent config with UTF-8 paths always serialises")
    }

    /// Reads a config file ([`AgentConfig::parse`] of its text); relative paths are
    /// relative to its directory. Every error names the file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &base).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a config file's text, with no file I/O: relative paths become
    /// relative to `base` (the file's directory), the socket modes and limits are checked.
    /// What [`AgentConfig::load`] does with a file, and what the `agent_config` fuzz target
    /// feeds arbitrary bytes.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let mut config: Self = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let kms = config.kms.as_mut().map(|k| &mut k.socket);
        for p in [&mut config.ca, &mut config.cert, &mut config.key, &mut config.socket]
            .into_iter()
            .chain(kms)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.mode()?;
        if let Some(kms) = &config.kms {
            kms.mode()?;
        }
        if config.max_connections_per_uid == 0 {
            return Err("max_connections_per_uid: must be at least 1".into());
        }
        if config.endpoints.is_empty() {
            return Err("endpoints: at least one server is needed".into());
        }
        Ok(config)
    }

    /// The config `sso-agent --dev DIR` uses: the dev server at the address its
    /// `DIR/server.toml` names ([`sso_devdir::dev_endpoint`]), the dev client certificate,
    /// `DIR/agent.sock` with mode 0600 for this uid only.
    pub fn dev(dir: &Path) -> Result<Self, String> {
        let mut config = Self::new(
            [sso_devdir::dev_endpoint(dir)?],
            dir.join(sso_devdir::CA_CERT),
            dir.join(sso_devdir::CLIENT_CERT),
            dir.join(sso_devdir::CLIENT_KEY),
            dir.join(sso_devdir::AGENT_SOCKET),
        );
        config.socket_mode = "0600".into();
        config.kms = Some(KmsConfig::dev(dir));
        Ok(config)
    }

    /// The socket mode as a number.
    pub fn mode(&self) -> Result<u32, String> {
        parse_mode(&self.socket_mode, "socket_mode")
    }

    /// A client builder for this config.
    pub fn client_builder(&self) -> ClientBuilder {
        let mut b = Client::builder().ca(&self.ca).identity(&self.cert, &self.key);
        for e in &self.endpoints {
            b = b.endpoint(e);
        }
        if let Some(s) = self.poll_interval_secs {
            b = b.poll_interval(Duration::from_secs(s));
        }
        if let Some(s) = self.max_stale_secs {
            b = b.max_stale(Duration::from_secs(s));
        }
        b
    }
}

/// `[kms]` in the agent's config (served by [`crate::kms`]; kept here with the rest of
/// the config so the agent does not import the service).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmsConfig {
    /// Where to serve KMS v2 (kube-apiserver's `endpoint: unix://…`).
    pub socket: PathBuf,
    /// Socket file mode, octal as a string (default "0600").
    #[serde(default = "default_kms_mode")]
    pub socket_mode: String,
    /// Uids allowed to connect; unset means the agent's top-level `allowed_uids`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_uids: Option<Vec<u32>>,
}

fn default_kms_mode() -> String {
    "0600".into()
}

impl KmsConfig {
    /// `[kms]` serving on `socket`, every other setting at its default (mode 0600, the
    /// agent's `allowed_uids`).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            socket_mode: default_kms_mode(),
            allowed_uids: None,
        }
    }

    /// The config `sso-agent --dev DIR` uses: `DIR/kms.sock`, mode 0600, this uid only.
    pub fn dev(dir: &std::path::Path) -> Self {
        Self::new(dir.join(sso_devdir::KMS_SOCKET))
    }

    /// The socket mode as a number.
    pub fn mode(&self) -> Result<u32, String> {
        parse_mode(&self.socket_mode, "kms.socket_mode")
    }
}

/// Parses an octal socket mode like "0660" (`field` names it in the error).
pub(crate) fn parse_mode(mode: &str, field: &str) -> Result<u32, String> {
    u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{field}: {mode:?} is not an octal mode like \"0660\""))
}

/// Which peer uids may use a socket: the configured list, or only the agent's own uid when
/// it is empty. Shared by the HTTP socket and the KMS socket.
#[derive(Debug, Clone)]
pub struct UidAllowlist(Vec<u32>);

impl UidAllowlist {
    /// `configured` as given, or the agent's own uid when empty.
    pub fn new(configured: Vec<u32>) -> Self {
        if configured.is_empty() {
            Self(vec![current_uid()])
        } else {
            Self(configured)
        }
    }

    /// Whether a peer with this uid (`None`: unknown) may connect.
    pub fn permits(&self, uid: Option<u32>) -> bool {
        uid.is_some_and(|u| self.0.contains(&u))
    }
}

/// Binds the socket: removes a stale socket file (never anything else), then sets the mode.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to replace it", path.display()),
            ));
        }
    }
    // A short listen queue (ssh-agent's 128, not the system's 4096): under a connection
    // flood the queue stays full, and an allowed caller waits behind everything in it.
    let socket = tokio::net::UnixSocket::new_stream()?;
    socket.bind(path)?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serves until `shutdown` completes. A connection from a uid outside `allowed_uids` is
/// answered 403 and closed without reading a request (a few per uid are kept for a
/// moment so the caller can read the answer; a flood is closed at once), and an allowed
/// uid holds at most `max_per_uid` connections, so no local user can exhaust the agent's
/// file descriptors.
pub async fn serve(
    listener: UnixListener,
    client: Client,
    allowed_uids: Vec<u32>,
    max_per_uid: usize,
    shutdown: impl Future<Output = ()>,
) {
    let allowed = UidAllowlist::new(allowed_uids);
    let serving = UidCounts::default();
    let refusing = UidCounts::default();
    tokio::pin!(shutdown);
    while let Some((stream, uid)) = accept_next(&listener, shutdown.as_mut(), "agent").await {
        if !allowed.permits(uid) {
            refuse(stream, uid, &refusing, FORBIDDEN);
            continue;
        }
        let uid = uid.unwrap_or(u32::MAX); // checked just above: the uid is on the allowlist
        let Some(slot) = serving.take(uid, max_per_uid) else {
            refuse(stream, Some(uid), &refusing, TOO_MANY);
            continue;
        };
        let client = client.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let client = client.clone();
                async move { Ok::<_, Infallible>(handle(req, &client).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The next connection on `listener` with its peer's uid (`None` when the kernel does
/// not say), or `None` once `shutdown` completes. A failed accept (out of file
/// descriptors, say) is logged and retried after a pause instead of spinning.
pub(crate) async fn accept_next<F: Future<Output = ()>>(
    listener: &UnixListener,
    mut shutdown: std::pin::Pin<&mut F>,
    socket: &'static str,
) -> Option<(tokio::net::UnixStream, Option<u32>)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let uid = stream.peer_cred().ok().map(|c| c.uid());
                    return Some((stream, uid));
                }
                Err(e) => {
                    tracing::warn!(error = %e, socket, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.as_mut() => return None,
        }
    }
}

const FORBIDDEN: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 66\r\n\r\n{\"error\":\"forbidden\",\"message\":\"this user may not use the agent\"}\n";
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 95\r\n\r\n{\"error\":\"too_many_connections\",\"message\":\"this user holds too many connections to the agent\"}\n";

/// Answers `response` without reading the request, then closes. Only
/// [`REFUSALS_ANSWERED_PER_UID`] refusals per uid linger (so a caller sees the answer
/// rather than a broken pipe); the rest are closed at once.
fn refuse(stream: tokio::net::UnixStream, uid: Option<u32>, refusing: &UidCounts, response: &'static [u8]) {
    let key = uid.unwrap_or(u32::MAX);
    let n = refusing.refused(key);
    if n.is_power_of_two() {
        tracing::warn!(
            ?uid,
            refused = n,
            "refused connections from a uid outside the allowlist or over its cap"
        );
    }
    // The answer fits the socket buffer of a fresh connection; if not, nothing is lost.
    let _ = stream.try_write(response);
    let Some(slot) = refusing.take(key, REFUSALS_ANSWERED_PER_UID) else {
        return; // dropped: closed at once
    };
    tokio::spawn(async move {
        let _slot = slot;
        let mut stream = stream;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        // Read and discard what the caller sends until it hangs up or the time is over.
        let drain = async {
            let mut buf = [0u8; 1024];
            loop {
                let _ = stream.readable().await;
                match stream.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
    });
}

/// Connections per uid, and how many were refused.
#[derive(Debug, Default, Clone)]
pub(crate) struct UidCounts(std::sync::Arc<std::sync::Mutex<PerUid>>);

/// Connections open per uid, and refusals counted per uid.
type PerUid = (
    std::collections::HashMap<u32, usize>,
    std::collections::HashMap<u32, u64>,
);

impl UidCounts {
    pub(crate) fn take(&self, uid: u32, cap: usize) -> Option<UidSlot> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = guard.0.entry(uid).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(UidSlot(self.clone(), uid))
    }

    /// Counts one refusal; returns how many so far, for log lines at powers of two.
    pub(crate) fn refused(&self, uid: u32) -> u64 {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = guard.1.entry(uid).or_default();
        *n += 1;
        *n
    }
}

/// One counted connection; gives its count back on drop.
#[derive(Debug)]
pub(crate) struct UidSlot(UidCounts, u32);

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut guard = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = guard.0.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                guard.0.remove(&self.1);
            }
        }
    }
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The uid that owns our own /proc entry is our uid; no libc call needed.
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// The refusal a client error becomes.
fn refusal(e: Error) -> Refusal {
    match &e {
        Error::Unavailable(_) | Error::Stale { .. } => {
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
        }
        Error::UnknownKey { .. } => Refusal::new(StatusCode::NOT_FOUND, "unknown_key", e.to_string()),
        Error::KeyRetired(_) => Refusal::new(StatusCode::GONE, "key_retired", e.to_string()),
        // The primary key sealed 2^32 envelopes (docs/envelope.md): not the caller's
        // fault, and over as soon as a newer primary arrives.
        Error::Envelope(sso_proto::Error::SealLimit) => {
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
        }
        Error::Envelope(_) => Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_envelope", e.to_string()),
        _ => Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

fn b64(s: &str, field: &str) -> Result<Vec<u8>, Refusal> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_bytes())
        .map_err(|_| Refusal::bad_request(format!("{field} must be standard base64")))
}

fn aad(field: Option<&str>) -> Result<Vec<u8>, Refusal> {
    field.map(|a| b64(a, "aad")).transpose().map(Option::unwrap_or_default)
}

fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn handle(req: Request<Incoming>, client: &Client) -> Response<Full<Bytes>> {
    match route(req, client).await {
        Ok(resp) => resp,
        Err(refusal) => refusal.response(),
    }
}

async fn route(req: Request<Incoming>, client: &Client) -> Result<Response<Full<Bytes>>, Refusal> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/status") => Ok(status(client)),
        (Method::POST, "/v1/seal") => {
            let body = read_body(req).await?;
            let request: SealRequest = sso_daemon::json::parse(&body)?;
            let plaintext = Zeroizing::new(b64(request.plaintext_base64(), "plaintext")?);
            let aad = aad(request.aad.as_deref())?;
            let envelope = client.seal(&aad, &plaintext).await.map_err(refusal)?;
            let key_id = sso_proto::EnvelopeRef::parse(&envelope)
                .map(|e| e.key_id.to_string())
                .unwrap_or_default();
            Ok(answer(
                StatusCode::OK,
                &SealAnswer {
                    envelope: b64_encode(&envelope),
                    key_id,
                },
            ))
        }
        (Method::POST, "/v1/open") => {
            let body = read_body(req).await?;
            let request: OpenRequest = sso_daemon::json::parse(&body)?;
            let envelope = b64(&request.envelope, "envelope")?;
            let aad = aad(request.aad.as_deref())?;
            let plaintext = Zeroizing::new(client.open(&aad, &envelope).await.map_err(refusal)?);
            let key_id = sso_proto::EnvelopeRef::parse(&envelope)
                .map(|e| e.key_id.to_string())
                .unwrap_or_default();
            Ok(sso_daemon::json::reply(
                StatusCode::OK,
                Bytes::from_owner(sso_proto::wire::agent::opened_json(&key_id, &plaintext)),
            ))
        }
        (_, "/v1/status" | "/v1/seal" | "/v1/open") => Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method",
        )),
        _ => Err(Refusal::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")),
    }
}

fn status(client: &Client) -> Response<Full<Bytes>> {
    let s = client.status();
    let (freshness, since) = match s.freshness {
        Freshness::Fresh => ("fresh", None),
        Freshness::Stale { since } => ("stale", Some(since)),
        Freshness::Empty => ("empty", None),
    };
    let since = since.map(|t| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    });
    let detail = match (&s.freshness, &since) {
        (Freshness::Fresh, _) => "a server answered within the poll interval".to_owned(),
        (Freshness::Stale { .. }, Some(t)) => format!("serving from cache since {t}"),
        _ => "nothing cached: no server has answered yet".to_owned(),
    };
    answer(
        StatusCode::OK,
        &AgentStatus {
            detail,
            endpoint: s.endpoint,
            epoch: s.epoch,
            keys: s.keys,
            last_error: s.last_error,
            primary: s.primary.map(|k| k.to_string()),
            stale_since: since,
            status: freshness.into(),
        },
    )
}

/// The request body, within the agent's limits, wiped with every intermediate copy.
async fn read_body(req: Request<Incoming>) -> Result<Zeroizing<Vec<u8>>, Refusal> {
    let limits = sso_daemon::json::BodyLimits {
        max_bytes: MAX_BODY,
        timeout: Duration::from_secs(10),
    };
    sso_daemon::json::read_body(req, limits).await
}

/// The agent's request body parsers, for the fuzz target.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_bodies(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<SealRequest>(data) {
        let _ = b64(r.plaintext_base64(), "plaintext");
        let _ = aad(r.aad.as_deref());
    }
    if let Ok(r) = serde_json::from_slice::<OpenRequest>(data) {
        let _ = b64(&r.envelope, "envelope");
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::{AgentConfig, KmsConfig};

    /// A config built through the type, written with `to_toml`, is read back by the
    /// agent's own loader as the same config: every field, set and unset.
    #[test]
    fn a_built_config_round_trips_through_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let minimal = AgentConfig::new(
            ["https://localhost:7443"],
            d.join("ca.pem"),
            d.join("c.pem"),
            d.join("k.pem"),
            d.join("a.sock"),
        );
        let mut full = AgentConfig::new(
            ["https://a:1", "https://b:2"],
            d.join("ca.pem"),
            d.join("c.pem"),
            d.join("k.pem"),
            d.join("a.sock"),
        );
        full.socket_mode = "0640".into();
        full.allowed_uids = vec![0, 1000];
        full.poll_interval_secs = Some(5);
        full.max_stale_secs = Some(60);
        full.max_connections_per_uid = 3;
        let mut kms = KmsConfig::new(d.join("kms.sock"));
        kms.socket_mode = "0660".into();
        kms.allowed_uids = Some(vec![1001]);
        full.kms = Some(kms);
        let dev = AgentConfig::dev(d).unwrap();
        let path = d.join("agent.toml");
        for config in [minimal, full, dev] {
            std::fs::write(&path, config.to_toml()).unwrap();
            assert_eq!(AgentConfig::load(&path).unwrap(), config, "{}", config.to_toml());
        }
        // A minimal config writes only what it sets (the defaults stay the loader's).
        let text = AgentConfig::new(["https://h:1"], "ca.pem", "c.pem", "k.pem", "a.sock").to_toml();
        for absent in ["allowed_uids", "poll_interval_secs", "max_stale_secs", "[kms]"] {
            assert!(!text.contains(absent), "{absent} in:\n{text}");
        }
        // Relative paths stay relative in the file and are read relative to it.
        let mut relative = AgentConfig::new(["https://h:1"], "ca.pem", "c.pem", "k.pem", "a.sock");
        relative.kms = Some(KmsConfig::new("kms.sock"));
        std::fs::write(&path, relative.to_toml()).unwrap();
        let loaded = AgentConfig::load(&path).unwrap();
        assert_eq!(loaded.socket, d.join("a.sock"));
        assert_eq!(loaded.kms.unwrap().socket, d.join("kms.sock"));
        assert_eq!(loaded.ca, d.join("ca.pem"));
    }

    /// The file's text is parsed without file I/O, relative to a base the caller names
    /// (the loader's is the file's directory); the loader's errors name the file, the
    /// field's checks (mode, limits, endpoints) included, not only TOML syntax.
    #[test]
    fn the_text_parses_without_the_file_and_the_loaders_errors_name_it() {
        let base = std::path::Path::new("/etc/sso");
        let mut relative = AgentConfig::new(["https://h:1"], "ca.pem", "c.pem", "k.pem", "a.sock");
        relative.kms = Some(KmsConfig::new("kms.sock"));
        let parsed = AgentConfig::parse(&relative.to_toml(), base).unwrap();
        assert_eq!(parsed.socket, base.join("a.sock"));
        assert_eq!(parsed.kms.unwrap().socket, base.join("kms.sock"));
        for (text, field) in [
            ("endpoints = [", "(TOML)"),
            ("socket_mode = \"999\"", "socket_mode"),
            ("max_connections_per_uid = 0", "max_connections_per_uid"),
            ("endpoints = []", "endpoints"),
        ] {
            let mut toml = relative.to_toml();
            toml = toml
                .lines()
                .filter(|l| !l.starts_with(text.split(' ').next().unwrap()))
                .map(|l| format!("{l}\n"))
                .collect();
            toml.insert_str(0, &format!("{text}\n"));
            let e = AgentConfig::parse(&toml, base).unwrap_err();
            if field != "(TOML)" {
                assert!(e.starts_with(field), "{text}: {e}");
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, &toml).unwrap();
            let e = AgentConfig::load(&path).unwrap_err();
            assert!(e.starts_with(&format!("{}: ", path.display())), "{text}: {e}");
        }
    }

    async fn body_of(resp: hyper::Response<http_body_util::Full<bytes::Bytes>>) -> Vec<u8> {
        resp.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    /// The answers moved to `sso_proto::wire::agent`: each must be the bytes the agent
    /// wrote before, when it built them with `json!` (the expressions below are the old
    /// code's, fixture and pin at once; the literal strings are what they wrote).
    #[tokio::test]
    async fn the_agent_answers_are_the_bytes_it_wrote_before() {
        let key_id = "0123456789abcdef0123456789abcdef".to_owned();
        let (envelope, plaintext) = ("U1NPMQ==".to_owned(), b"hello".to_vec());
        let old_seal = serde_json::json!({"envelope": envelope, "key_id": key_id});
        let new_seal = body_of(super::answer(
            hyper::StatusCode::OK,
            &sso_proto::wire::agent::SealAnswer {
                envelope: envelope.clone(),
                key_id: key_id.clone(),
            },
        ))
        .await;
        assert_eq!(new_seal, serde_json::to_vec(&old_seal).unwrap());
        assert_eq!(
            new_seal,
            br#"{"envelope":"U1NPMQ==","key_id":"0123456789abcdef0123456789abcdef"}"#
        );

        let old_open = serde_json::json!({"plaintext": super::b64_encode(&plaintext), "key_id": key_id});
        let new_open = sso_proto::wire::agent::opened_json(&key_id, &plaintext);
        assert_eq!(*new_open, serde_json::to_vec(&old_open).unwrap());
        assert_eq!(
            &new_open[..],
            br#"{"key_id":"0123456789abcdef0123456789abcdef","plaintext":"aGVsbG8="}"#
        );
        let read: sso_proto::wire::agent::OpenAnswer = serde_json::from_slice(&new_open).unwrap();
        assert_eq!(read.key_id, key_id);

        for (freshness, since, endpoint, error) in [
            ("fresh", None, Some("https://a:8443".to_owned()), None),
            (
                "stale",
                Some("2026-01-02T03:04:05Z".to_owned()),
                None,
                Some("refused".to_owned()),
            ),
        ] {
            let primary = Some(key_id.clone());
            let old_status = serde_json::json!({
                "status": freshness,
                "detail": "d",
                "stale_since": since,
                "primary": primary,
                "keys": 3usize,
                "epoch": 7u64,
                "endpoint": endpoint,
                "last_error": error,
            });
            let new_status = body_of(super::answer(
                hyper::StatusCode::OK,
                &sso_proto::wire::agent::AgentStatus {
                    detail: "d".into(),
                    endpoint: endpoint.clone(),
                    epoch: 7,
                    keys: 3,
                    last_error: error.clone(),
                    primary: primary.clone(),
                    stale_since: since.clone(),
                    status: freshness.into(),
                },
            ))
            .await;
            assert_eq!(new_status, serde_json::to_vec(&old_status).unwrap(), "{freshness}");
        }
    }

    #[test]
    fn canned_refusals_are_well_formed_http() {
        for answer in [super::FORBIDDEN, super::TOO_MANY] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len());
            serde_json::from_str::<serde_json::Value>(body).unwrap();
        }
    }
}

/// The command line of `sso-agent`, here rather than in the binary so that the packaging
/// tool (`sso-dist`) renders its man page from the same definition.
pub mod cli {
    use std::path::PathBuf;

    use clap::Parser;

    /// The per-machine key agent.
    #[derive(Parser, Debug)]
    #[command(name = "sso-agent", version, about)]
    pub struct Args {
        /// Configuration file (TOML).
        #[arg(long, conflicts_with = "dev", required_unless_present = "dev")]
        pub config: Option<PathBuf>,
        /// Pair with `sso-server --dev`: use the dev PKI in DIR and listen on DIR/agent.sock
        /// (HTTP/JSON) and DIR/kms.sock (Kubernetes KMS v2).
        #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "sso-dev")]
        pub dev: Option<PathBuf>,
    }
}
