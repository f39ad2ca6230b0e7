//! The HTTPS API of SPEC §5: routing, role checks, handlers, JSON errors, audit.
//!
//! Every answer that is not a plain success (and every key fetch and admin action) is
//! audited. Error bodies are `{"error": CODE, "message": …}` and never mention key
//! material; internal details go to the log only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use sso_proto::KeyId;
use sso_proto::delivery::{RecipientKey, Sealer};
use sso_proto::wire::answers::{BackupRequest, RestoreRequest, RetireRequest, RotateRequest};
use zeroize::Zeroizing;

use crate::audit::AuditEvent;
use crate::identity::{Caller, Role};
use crate::lifecycle::{Change, LifecycleError};
use crate::metrics::Endpoint;
use crate::state::AppState;

/// The response body type for every answer.
pub type Body = Full<Bytes>;

/// A refused or failed request, as the client sees it: the daemons' shared
/// [`sso_daemon::json::JsonError`], wrapped so the store's errors convert into it with `?`.
#[derive(Debug)]
pub struct ApiError(sso_daemon::json::JsonError);

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(sso_daemon::json::JsonError::new(status, code, message))
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self(sso_daemon::json::JsonError::bad_request(message))
    }

    fn internal() -> Self {
        Self(sso_daemon::json::JsonError::internal())
    }

    fn outcome(&self) -> &'static str {
        self.0.code
    }
}

impl From<keystore::Error> for ApiError {
    fn from(e: keystore::Error) -> Self {
        use keystore::Error as E;
        if let Some(fault) = e.store_fault() {
            // The file system refused: say what and what to do (SQLite's words carry no
            // key material), and that retrying after the remedy helps.
            return Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", fault.to_string());
        }
        match &e {
            E::KeyNotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            E::RetirePrimary(_)
            | E::DestroyUnretired(_)
            | E::InvalidTransition { .. }
            | E::RefusedTransition { .. }
            | E::GenerationExhausted => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            E::ConflictingKey(_) => Self::new(StatusCode::CONFLICT, "integrity", e.to_string()),
            E::MalformedRecord { .. } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_record", e.to_string()),
            E::Integrity { .. } | E::MissingKey { .. } | E::TamperedHeader => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "integrity", e.to_string())
            }
            E::WrongBackupPassword => Self::new(StatusCode::FORBIDDEN, "wrong_password", e.to_string()),
            E::NotABackup
            | E::UnsupportedBackupVersion(_)
            | E::BackupTruncated { .. }
            | E::BackupMalformed(_)
            | E::BackupTampered
            | E::EmptyPassphrase => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_backup", e.to_string()),
            _ => {
                tracing::error!(error = %e, "store operation failed");
                Self::internal()
            }
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    sso_daemon::json::reply(status, body)
}

/// A JSON answer from its wire type (`sso_proto::wire`), keys sorted: the daemons' shared
/// [`sso_daemon::json::reply_answer`].
fn json_answer<T: serde::Serialize>(status: StatusCode, answer: &T) -> Response<Body> {
    sso_daemon::json::reply_answer(status, answer)
}

fn error_response(e: &ApiError) -> Response<Body> {
    e.0.response()
}

impl From<crate::state::ReadError> for ApiError {
    fn from(e: crate::state::ReadError) -> Self {
        match e {
            crate::state::ReadError::Store(e) => e.into(),
            crate::state::ReadError::Panicked => Self::internal(),
        }
    }
}

impl From<sso_daemon::json::JsonError> for ApiError {
    fn from(e: sso_daemon::json::JsonError) -> Self {
        Self(e)
    }
}

/// What the router decided a request is.
#[derive(Debug)]
struct Route {
    endpoint: Endpoint,
    needs: Option<Role>,
    op: &'static str,
    key_id: Option<KeyId>,
}

fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let key = |s: &str| {
        s.parse::<KeyId>()
            .map_err(|_| ApiError::bad_request("the key id must be 32 lowercase hex characters"))
    };
    let r = |endpoint, needs, op, key_id| {
        Ok(Route {
            endpoint,
            needs,
            op,
            key_id,
        })
    };
    let allowed = match segments.as_slice() {
        ["v1", "health"] => ("GET", r(Endpoint::Health, None, "health", None)),
        ["v1", "keyring"] => ("GET", r(Endpoint::Keyring, Some(Role::Client), "keyring.fetch", None)),
        ["v1", "keyring", "watch"] => ("GET", r(Endpoint::Watch, Some(Role::Client), WATCH_OP, None)),
        ["v1", "keys", id] => ("GET", r(Endpoint::Key, Some(Role::Client), "key.fetch", Some(key(id)?))),
        ["v1", "admin", "rotate"] => ("POST", r(Endpoint::Rotate, Some(Role::Admin), "admin.rotate", None)),
        ["v1", "admin", "keys", id, "retire"] => (
            "POST",
            r(Endpoint::Retire, Some(Role::Admin), "admin.retire", Some(key(id)?)),
        ),
        ["v1", "admin", "keys", id, "destroy"] => (
            "POST",
            r(Endpoint::Destroy, Some(Role::Admin), "admin.destroy", Some(key(id)?)),
        ),
        ["v1", "admin", "status"] => ("GET", r(Endpoint::Status, Some(Role::Admin), "admin.status", None)),
        ["v1", "admin", "audit", "verify"] => (
            "GET",
            r(Endpoint::Status, Some(Role::Admin), "admin.audit_verify", None),
        ),
        ["v1", "admin", "backup"] => ("POST", r(Endpoint::Backup, Some(Role::Admin), "admin.backup", None)),
        ["v1", "admin", "restore"] => ("POST", r(Endpoint::Restore, Some(Role::Admin), "admin.restore", None)),
        ["v1", "peer", "keys"] => ("GET", r(Endpoint::Peer, Some(Role::Peer), "peer.keys", None)),
        ["v1", "peer", "coverage"] => ("GET", r(Endpoint::Peer, Some(Role::Peer), "peer.coverage", None)),
        ["v1", "peer", "merge"] => ("POST", r(Endpoint::Peer, Some(Role::Peer), "peer.merge", None)),
        ["v1", "peer", "lease"] => ("POST", r(Endpoint::Peer, Some(Role::Peer), "peer.lease", None)),
        ["v1", "peer", "stage"] => ("POST", r(Endpoint::Peer, Some(Role::Peer), "peer.stage", None)),
        ["v1", "peer", "promote"] => ("POST", r(Endpoint::Peer, Some(Role::Peer), "peer.promote", None)),
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")),
    };
    let (want, route) = allowed;
    if method.as_str() != want {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("use {want}"),
        ));
    }
    route
}

/// What every request on one connection shares: who asks, from where, of which server,
/// the connection's activity (for its idle deadline), and, when the identity already holds
/// too many connections, the cap it hit (every request is then answered 429).
#[derive(Debug)]
pub struct Conn {
    /// The authenticated caller.
    pub caller: Caller,
    /// The client's address.
    pub peer: SocketAddr,
    /// The server.
    pub state: Arc<AppState>,
    /// Requests in flight on the connection.
    pub activity: Arc<crate::limits::Activity>,
    /// The per-identity connection cap this connection is over, if any.
    pub refused: Option<&'static str>,
}

/// Answers one request on an authenticated connection (hyper's service: it never fails).
///
/// Every open watch is one of these futures, inside hyper's task for its stream, so its
/// size is most of the server's memory per watch (docs/benchmarks.md, "Memory per open
/// watch"; the tests in `future_size`). Hence: the request comes boxed and the connection's
/// context behind one `Arc`; [`start`] answers the hot path (health, keyring, key,
/// refusals) without waiting and drops the request; a watch with nothing new waits here
/// holding only a [`Parked`]; the rare endpoints (admin, peer, status), whose futures are
/// large, run boxed.
pub async fn handle(req: Box<Request<Incoming>>, conn: Arc<Conn>) -> Result<Response<Body>, std::convert::Infallible> {
    let _busy = conn.activity.request();
    if let Some(cap) = conn.refused {
        return Ok(too_many_connections(cap));
    }
    // Bound in a `let` of its own, so the `Handling` is not kept beside the watch's wait.
    let mut parked = match start(*req, &conn) {
        Handling::Ready(response) => return Ok(response),
        Handling::Rare(answer) => return Ok(answer.await),
        Handling::Watch(parked) => parked,
    };
    let result = parked.until_news(&conn.state).await;
    // The watch route names no key; the answer's audit entry names the primary.
    let response = finish(Endpoint::Watch, WATCH_OP, None, result, &conn);
    drop(parked);
    Ok(response)
}

/// The answer to every request on a connection whose identity is over its connection cap.
fn too_many_connections(cap: &'static str) -> Response<Body> {
    let refusal = sso_daemon::json::JsonError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
        format!("this certificate identity holds too many connections ({cap} cap); close some and retry"),
    );
    // Not `refusal.response()`: this answer has always gone without `Cache-Control`.
    let mut resp = Response::new(Full::new(refusal.body()));
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    headers.insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    resp
}

/// Where a request stands after [`start`].
enum Handling {
    /// Answered at once.
    Ready(Response<Body>),
    /// A watch waiting for a new epoch, the server's stop or its longest wait.
    Watch(Parked),
    /// An admin, peer or status request: its future is large, so it is boxed.
    Rare(std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>),
}

/// Routes the request, checks the caller's role, and answers it if that needs no wait.
fn start(req: Request<Incoming>, conn: &Arc<Conn>) -> Handling {
    let (caller, state) = (&conn.caller, &conn.state);
    tracing::debug!(method = %req.method(), path = %req.uri().path(), identity = %caller.label, peer = %conn.peer, "request");
    let route = match route(req.method(), req.uri().path()) {
        Ok(route) => route,
        Err(e) => return Handling::Ready(finish(Endpoint::Unknown, "request", None, Err(e), conn)),
    };
    let (endpoint, op, key_id) = (route.endpoint, route.op, route.key_id);
    let result = match route.needs {
        Some(role) if !caller.roles.allows(role) => {
            state.metrics.denials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this certificate does not hold the {} role", role.as_str()),
            ))
        }
        _ => match endpoint {
            Endpoint::Health => Ok(quiet(health(state))),
            Endpoint::Keyring => delivery(&req, state).and_then(|d| keyring(state, &d, KEYRING_CONTEXT)),
            Endpoint::Key => delivery(&req, state).and_then(|d| key(key_id, state, &d)),
            Endpoint::Watch => match delivery(&req, state).and_then(|d| watch(req.uri().query(), caller, state, d)) {
                Ok(Watching::Now(answer)) => Ok(answer),
                // The request (its head, its body handle) is dropped here, not held for
                // the whole wait.
                Ok(Watching::Parked(parked)) => return Handling::Watch(parked),
                Err(e) => Err(e),
            },
            _ => {
                let conn = conn.clone();
                return Handling::Rare(Box::pin(async move {
                    let result = dispatch_rare(&route, req, &conn.caller, &conn.state).await;
                    let mut response = finish(route.endpoint, route.op, route.key_id, result, &conn);
                    if route.endpoint == Endpoint::Peer {
                        name_this_node(&mut response, &conn.state);
                    }
                    response
                }));
            }
        },
    };
    Handling::Ready(finish(endpoint, op, key_id, result, conn))
}

/// Every answer to the peer (whatever its status) says which node answered and at which
/// epoch (`sso_proto::wire::peer::NODE_HEADER`, `EPOCH_HEADER`): a `204` from
/// `/v1/peer/keys` has no body to say it in.
fn name_this_node(response: &mut Response<Body>, state: &AppState) {
    use sso_proto::wire::peer::{EPOCH_HEADER, NODE_HEADER};
    let headers = response.headers_mut();
    if let Ok(node) = header::HeaderValue::from_str(&state.node) {
        headers.insert(NODE_HEADER, node);
    }
    headers.insert(EPOCH_HEADER, header::HeaderValue::from(state.snapshot.load().epoch));
}

/// Counts the answer and audits it (unless it is a quiet success).
fn finish(
    endpoint: Endpoint,
    op: &'static str,
    key_id: Option<KeyId>,
    result: Result<Answer, ApiError>,
    conn: &Conn,
) -> Response<Body> {
    let (caller, peer, state) = (&conn.caller, conn.peer, &conn.state);
    let mut key_id = key_id;
    let (response, outcome, detail) = match result {
        Ok(Answer {
            response,
            audit,
            detail,
            key,
        }) => {
            let status = response.status().as_u16();
            state.metrics.request(endpoint, status);
            if !audit {
                return response;
            }
            key_id = key_id.or(key);
            (response, "ok", detail)
        }
        Err(e) => {
            state.metrics.request(endpoint, e.0.status.as_u16());
            if op.starts_with("admin.") && !matches!(op, "admin.status" | "admin.audit_verify") {
                // The audit entry records it too; the log is where an operator looks first.
                tracing::warn!(op, identity = %caller.label, code = e.0.code, reason = %e.0.message, "admin write refused");
            }
            (error_response(&e), e.outcome(), Some(e.0.message.clone()))
        }
    };
    state.audit.record(AuditEvent {
        time: std::time::SystemTime::now(),
        identity: caller.label.clone(),
        cert: Some(caller.cert.clone()),
        role: caller.roles.label(),
        op,
        key_id,
        outcome,
        detail,
        peer: Some(peer),
    });
    response
}

/// A successful answer, and whether it is worth an audit entry.
struct Answer {
    response: Response<Body>,
    audit: bool,
    detail: Option<String>,
    /// The key the answer concerns, when the route did not name one.
    key: Option<KeyId>,
}

fn quiet(response: Response<Body>) -> Answer {
    Answer {
        response,
        audit: false,
        detail: None,
        key: None,
    }
}

fn audited(response: Response<Body>, detail: Option<String>) -> Answer {
    Answer {
        response,
        audit: true,
        detail,
        key: None,
    }
}

async fn dispatch_rare(
    route: &Route,
    req: Request<Incoming>,
    caller: &Caller,
    state: &Arc<AppState>,
) -> Result<Answer, ApiError> {
    match route.endpoint {
        Endpoint::Status if route.op == "admin.audit_verify" => audit_verify(req.uri().query(), state).await,
        // The hot path is answered by `start`; these arms only keep the match whole.
        Endpoint::Health => Ok(quiet(health(state))),
        Endpoint::Keyring => keyring(state, &delivery(&req, state)?, KEYRING_CONTEXT),
        Endpoint::Watch => match watch(req.uri().query(), caller, state, delivery(&req, state)?)? {
            Watching::Now(answer) => Ok(answer),
            Watching::Parked(mut parked) => parked.until_news(state).await,
        },
        Endpoint::Key => key(route.key_id, state, &delivery(&req, state)?),
        Endpoint::Rotate | Endpoint::Retire | Endpoint::Destroy | Endpoint::Restore => {
            admin_write(route, req, caller, state).await
        }
        Endpoint::Unknown => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")),
        _ => Box::pin(dispatch_other(route, req, state)).await,
    }
}

/// An admin write, with its `Idempotency-Key` if it carries one (see `idempotency`).
async fn admin_write(
    route: &Route,
    req: Request<Incoming>,
    caller: &Caller,
    state: &Arc<AppState>,
) -> Result<Answer, ApiError> {
    use crate::idempotency::{Begin, Stored};
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if crate::idempotency::valid_key(k) => Some(k.to_owned()),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "the Idempotency-Key header must be 1 to {} visible ASCII characters",
                    crate::idempotency::MAX_KEY_LEN
                )));
            }
        },
    };
    let body = read_body(req, state).await?;
    let body_copy = Zeroizing::new(body.to_vec());
    let (endpoint, key_id) = (route.endpoint, route.key_id);
    let run = {
        let state = state.clone();
        move || async move { run_admin_write(endpoint, key_id, &body, &state).await }
    };
    let Some(key) = key else { return run().await };
    let target = key_id.map(|k| k.to_string()).unwrap_or_default();
    let fingerprint = crate::idempotency::fingerprint(&state.idempotency_secret, route.op, &target, &body_copy);
    drop(body_copy);
    let who = caller.label.to_string();
    match state.idempotency.begin(&who, &key, fingerprint) {
        Begin::Fresh => {}
        Begin::Replay(stored) => {
            let mut response = json_response(
                StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
                stored.body,
            );
            response
                .headers_mut()
                .insert("idempotent-replay", header::HeaderValue::from_static("true"));
            return Ok(audited(
                response,
                Some(format!("replayed the answer to Idempotency-Key {key}")),
            ));
        }
        Begin::Running => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "in_progress",
                "a request with this Idempotency-Key is still running; repeat it in a moment to get its answer",
            ));
        }
        Begin::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request; use a new key for a new request",
            ));
        }
        Begin::Full => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many admin writes are running; retry later",
            ));
        }
    }
    // Runs to its end, and records its answer, even if this client goes away (its
    // connection closed, this future dropped), so a repeat finds the answer.
    let task = {
        let (state, who, key) = (state.clone(), who.clone(), key.clone());
        tokio::spawn(async move {
            let keep = |status: StatusCode, code: &str| {
                !(status.is_server_error() || code == "rotation_busy" || code == "in_progress" || code == "busy")
            };
            match run().await {
                Ok(answer) => {
                    let (parts, body) = answer.response.into_parts();
                    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                    let stored = keep(parts.status, "").then(|| Stored {
                        status: parts.status.as_u16(),
                        body: bytes.clone(),
                    });
                    state.idempotency.finish(&who, &key, fingerprint, stored);
                    Ok(Answer {
                        response: Response::from_parts(parts, Full::new(bytes)),
                        ..answer
                    })
                }
                Err(e) => {
                    let stored = keep(e.0.status, e.0.code).then(|| Stored {
                        status: e.0.status.as_u16(),
                        body: e.0.body(),
                    });
                    state.idempotency.finish(&who, &key, fingerprint, stored);
                    Err(e)
                }
            }
        })
    };
    match task.await {
        Ok(result) => result,
        Err(_) => {
            // The write panicked: forget the key so a retry runs again.
            state.idempotency.finish(&who, &key, fingerprint, None);
            Err(ApiError::internal())
        }
    }
}

async fn run_admin_write(
    endpoint: Endpoint,
    key_id: Option<KeyId>,
    body: &[u8],
    state: &Arc<AppState>,
) -> Result<Answer, ApiError> {
    match endpoint {
        Endpoint::Rotate => rotate(body, state).await,
        Endpoint::Restore => restore(body, state).await,
        _ => {
            let id = key_id.ok_or_else(|| ApiError::bad_request("missing key id"))?;
            let destroy = endpoint == Endpoint::Destroy;
            let request: RetireRequest = if body.iter().all(u8::is_ascii_whitespace) {
                RetireRequest::default()
            } else {
                parse_json(body)?
            };
            let change = match (destroy, request.force_retire_primary) {
                (true, true) => return Err(ApiError::bad_request("force_retire_primary applies to retire only")),
                (true, false) => Change::Destroy,
                (false, true) => Change::ForceRetire,
                (false, false) => Change::Retire,
            };
            let changed = crate::lifecycle::change(state, id, change)
                .await
                .map_err(|e| lifecycle_refusal(e, id))?;
            let replication = changed.replication.as_str();
            let answer = sso_proto::wire::answers::KeyChanged {
                key: (&changed.applied.meta).into(),
                replication: replication.into(),
            };
            let detail = if change == Change::ForceRetire {
                format!(
                    "forced retirement of the primary (override); new primary {}; replication {replication}",
                    changed
                        .applied
                        .primary
                        .map_or_else(|| "none".to_owned(), |p| p.to_string())
                )
            } else {
                format!("replication {replication}")
            };
            Ok(audited(json_answer(StatusCode::OK, &answer), Some(detail)))
        }
    }
}

/// A retire's, forced retire's or destroy's refusal, as the client sees it.
fn lifecycle_refusal(e: LifecycleError, id: KeyId) -> ApiError {
    match e {
        LifecycleError::Store(e) => e.into(),
        LifecycleError::PeerUnreachable(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "peer_unavailable",
            format!(
                "key {id} is staged here and the peer could not be asked whether it promoted it ({e}); a degraded rotation there may have made it the peer's primary; nothing was changed; retry when the peer answers"
            ),
        ),
        LifecycleError::Internal => ApiError::internal(),
    }
}

async fn dispatch_other(route: &Route, req: Request<Incoming>, state: &Arc<AppState>) -> Result<Answer, ApiError> {
    match route.endpoint {
        Endpoint::Status => status(state).await,
        Endpoint::Backup => {
            let body = read_body(req, state).await?;
            backup(&body, state).await
        }
        Endpoint::Peer if route.op == "peer.keys" => peer_keys(req.uri().query(), state).await,
        Endpoint::Peer if route.op == "peer.coverage" => peer_coverage(state).await,
        Endpoint::Peer => {
            let query = req.uri().query().unwrap_or("").to_owned();
            let body = read_body(req, state).await?;
            match route.op {
                "peer.lease" => peer_lease(&body, state).await,
                "peer.stage" | "peer.promote" => peer_rotation_step(route.op, &query, &body, state).await,
                _ => peer_merge(&body, state).await,
            }
        }
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")),
    }
}

/// `ok`, or `degraded` with `problems` while the store or the audit log cannot be
/// written. Both answer 200: a degraded node still serves every key it holds (reads come
/// from memory), so a load balancer must keep sending clients to it; the operator alerts
/// on `status` (or on `sso_store_writable` / `sso_audit_writable`).
fn health(state: &AppState) -> Response<Body> {
    let (status, problems) = state.metrics.health.report();
    let body = sso_proto::wire::answers::HealthAnswer {
        node: state.node.clone(),
        peer: peer_state(state).into(),
        problems,
        sealed: false,
        status: status.into(),
    };
    json_answer(StatusCode::OK, &body)
}

/// `up`, `down`, or `none` without a configured peer.
fn peer_state(state: &AppState) -> &'static str {
    match &state.peer {
        None => "none",
        Some(p) if p.status().up => "up",
        Some(_) => "down",
    }
}

/// How a key request wants its key material (docs/key-delivery.md).
enum Delivery {
    /// Standard base64 in the JSON (no `Sso-Key-Wrap` header; `curl`).
    Plain,
    /// Sealed to the client's ephemeral X25519 key.
    Wrapped(RecipientKey),
}

/// The request context a wrapped keyring answer is bound to: its path.
const KEYRING_CONTEXT: &str = "/v1/keyring";
/// ... and a wrapped watch answer.
const WATCH_CONTEXT: &str = "/v1/keyring/watch";
/// The audit operation of a watch.
const WATCH_OP: &str = "keyring.watch";

/// Reads the `Sso-Key-Wrap` header. Without it: plain, unless the server refuses plain.
fn delivery(req: &Request<Incoming>, state: &AppState) -> Result<Delivery, ApiError> {
    match req.headers().get(sso_proto::delivery::HEADER) {
        Some(value) => RecipientKey::parse(value.as_bytes())
            .map(Delivery::Wrapped)
            .map_err(|e| ApiError::bad_request(format!("Sso-Key-Wrap: {e}; see docs/key-delivery.md"))),
        None if state.allow_plain => Ok(Delivery::Plain),
        None => Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "wrapped_delivery_required",
            "this server hands out key material only sealed to the asking client (header Sso-Key-Wrap, \
             docs/key-delivery.md): use sso-agent, sso-client or ssoctl; an operator can allow plain \
             answers with [delivery] allow_plain = true",
        )),
    }
}

/// A fresh server key agreed with the client's, for one answer.
fn sealer(to: &RecipientKey, context: &str) -> Result<Sealer, ApiError> {
    Sealer::new(to, context, &ring::rand::SystemRandom::new()).map_err(|e| match e {
        sso_proto::Error::BadRecipientKey => ApiError::bad_request(format!("Sso-Key-Wrap: {e}")),
        _ => {
            tracing::error!(error = %e, "cannot seal a key answer");
            ApiError::internal()
        }
    })
}

fn sealing_failed(e: sso_proto::Error) -> ApiError {
    tracing::error!(error = %e, "cannot seal a key answer");
    ApiError::internal()
}

fn keyring(state: &AppState, delivery: &Delivery, context: &str) -> Result<Answer, ApiError> {
    let snap = state.snapshot.load();
    let body = match delivery {
        Delivery::Plain => {
            state
                .metrics
                .plain_key_deliveries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            snap.keyring_body.clone()
        }
        Delivery::Wrapped(to) => {
            let mut sealer = sealer(to, context)?;
            Bytes::from(crate::state::wrapped_keyring_json(&snap, &mut sealer).map_err(sealing_failed)?)
        }
    };
    state
        .metrics
        .key_fetches
        .fetch_add(snap.served as u64, std::sync::atomic::Ordering::Relaxed);
    // The audit entry names the primary; no per-request formatting on this hot path.
    let mut answer = audited(json_response(StatusCode::OK, body), None);
    answer.key = snap.primary;
    Ok(answer)
}

fn key(id: Option<KeyId>, state: &AppState, delivery: &Delivery) -> Result<Answer, ApiError> {
    let id = id.ok_or_else(|| ApiError::bad_request("missing key id"))?;
    let snap = state.snapshot.load();
    if let Some(&at) = snap.positions.get(&id) {
        let body = match delivery {
            Delivery::Plain => {
                state
                    .metrics
                    .plain_key_deliveries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                snap.key_bodies.get(&id).cloned().unwrap_or_default()
            }
            Delivery::Wrapped(to) => {
                let mut sealer = sealer(to, &format!("/v1/keys/{id}"))?;
                Bytes::from(
                    sso_proto::wire::keyring::wrapped_key_json(&snap.records[at], &mut sealer)
                        .map_err(sealing_failed)?,
                )
            }
        };
        state
            .metrics
            .key_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(audited(json_response(StatusCode::OK, body), None));
    }
    match snap.states.get(&id) {
        Some(state) if !state.is_served() => Err(ApiError::new(
            StatusCode::GONE,
            "gone",
            format!("key {id} is retired or destroyed"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no key {id}"),
        )),
    }
}

/// A watch's first look: news already, or a parked wait.
enum Watching {
    Now(Answer),
    Parked(Parked),
}

/// What a waiting watch holds: the epoch it has, the channel that brings a new one, how
/// to deliver the keyring, and its slot under the watch caps.
struct Parked {
    after: u64,
    rx: tokio::sync::watch::Receiver<u64>,
    delivery: Delivery,
    _slot: crate::limits::Slot,
}

fn watch(query: Option<&str>, caller: &Caller, state: &AppState, delivery: Delivery) -> Result<Watching, ApiError> {
    let after = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request("after must be a non-negative integer"))
        })
        .transpose()?
        .unwrap_or(0);
    // Subscribe before looking, so a change between the look and the wait is not missed.
    // Any epoch but `after` is news: one below it means this node's store went back (a
    // cluster database restored to an earlier state), and a client holding the higher
    // epoch must not wait for the epoch to climb past it (tests/tests/cluster.rs
    // `a_watch_ahead_of_a_database_put_back_to_an_earlier_epoch_answers_at_once`).
    let mut rx = state.epoch_tx.subscribe();
    if *rx.borrow_and_update() != after {
        return keyring(state, &delivery, WATCH_CONTEXT).map(Watching::Now);
    }
    // Only a watch that waits holds a slot; the caps bound the memory open watches take.
    let slot = state.limiter.watch(caller).map_err(|refused| match refused {
        crate::limits::WatchRefused::Identity => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_watches",
            format!(
                "this identity holds {} watches, the most allowed (limits.max_watches_per_identity); close some",
                state.limits.max_watches_per_identity
            ),
        ),
        crate::limits::WatchRefused::Total => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "watch_capacity",
            "the server holds as many watches as it allows (limits.max_watches); retry later",
        ),
    })?;
    Ok(Watching::Parked(Parked {
        after,
        rx,
        delivery,
        _slot: slot,
    }))
}

impl Parked {
    /// Waits for an epoch past `after` (then the keyring), the server's stop (503) or the
    /// longest wait (204). The slot is released when the `Parked` is dropped.
    async fn until_news(&mut self, state: &AppState) -> Result<Answer, ApiError> {
        let shutting_down = || {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "shutting down",
            ))
        };
        // One timer and one channel wait per watch: `AppState::stop` wakes the watches
        // through the epoch channel too. `rx` was subscribed before this look at
        // `stopping`, so a stop after it is seen as a change.
        let deadline = tokio::time::sleep(Duration::from_millis(state.limits.watch_max_wait_ms));
        tokio::pin!(deadline);
        loop {
            if *state.stopping.borrow() {
                return shutting_down();
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return shutting_down();
                    }
                    if *self.rx.borrow_and_update() != self.after && !*state.stopping.borrow() {
                        return keyring(state, &self.delivery, WATCH_CONTEXT);
                    }
                }
                () = &mut deadline => {
                    return Ok(quiet(
                        Response::builder()
                            .status(StatusCode::NO_CONTENT)
                            .body(Full::new(Bytes::new()))
                            .unwrap_or_default(),
                    ));
                }
            }
        }
    }
}

async fn rotate(body: &[u8], state: &Arc<AppState>) -> Result<Answer, ApiError> {
    use crate::rotation::{self, RotateError};
    let request: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        parse_json(body)?
    };
    let peer = state.peer.clone();
    let outcome = rotation::rotate(state, peer.as_deref(), request.allow_degraded).await;
    let url = peer.as_ref().map_or("", |p| p.url.as_str());
    // The counts (replication failures, integrity alarms) are the domain's:
    // `rotation::rotate` took them before it answered.
    match outcome {
        Ok(done) => Ok(rotated(&done)),
        Err(RotateError::PeerUnavailable { error, changed }) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "peer_unavailable",
            format!(
                "the peer {url} did not take the rotation ({error}); {changed}. Retry when the peer is back, or rotate with allow_degraded"
            ),
        )),
        Err(RotateError::Refused {
            error: error @ rotation::LinkError::Conflict(_),
            changed,
        }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "integrity",
            format!("the peer {url} refused the rotation ({error}); {changed}"),
        )),
        Err(RotateError::Refused { error, changed }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "rotation_refused",
            format!("the peer {url} refused the rotation ({error}); {changed}; rotate again"),
        )),
        Err(e @ (RotateError::Busy(_) | RotateError::Superseded { .. } | RotateError::Overtaken { .. })) => {
            Err(ApiError::new(StatusCode::CONFLICT, "rotation_busy", e.to_string()))
        }
        Err(RotateError::Store(e)) => Err(e.into()),
    }
}

fn rotated(done: &crate::rotation::Rotated) -> Answer {
    let (promoted, replication) = (&done.meta, done.replication.as_str());
    tracing::info!(key_id = %promoted.key_id, generation = promoted.generation, replication, "rotated");
    let answer = sso_proto::wire::answers::RotateAnswer {
        generation: promoted.generation,
        key_id: promoted.key_id,
        orphans_retired: done.orphans_retired,
        replication: replication.into(),
    };
    audited(
        json_answer(StatusCode::OK, &answer),
        Some(format!(
            "new primary {} (generation {}), {replication}",
            promoted.key_id, promoted.generation
        )),
    )
}

async fn peer_keys(query: Option<&str>, state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let theirs = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("digest="))
        .unwrap_or("")
        .to_owned();
    let body = crate::replication::serve_keys(state, theirs).await?;
    match body {
        // In sync: nothing to send, nothing worth an audit entry (this runs twice a second).
        None => Ok(quiet(
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .unwrap_or_default(),
        )),
        Some(body) => Ok(audited(
            json_response(StatusCode::OK, crate::state::zeroizing_bytes(body)),
            Some("key set sent".into()),
        )),
    }
}

async fn peer_merge(body: &[u8], state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let incoming = sso_proto::wire::parse_records(body).map_err(ApiError::bad_request)?;
    let merged = crate::replication::merge_pushed(state, incoming).await?;
    let detail = format!(
        "from {}: added {}, advanced {}",
        merged.from, merged.answer.added, merged.answer.advanced
    );
    Ok(audited(json_answer(StatusCode::OK, &merged.answer), Some(detail)))
}

fn parse_token(text: &str) -> Result<u128, ApiError> {
    if text.len() != 32 {
        return Err(ApiError::bad_request("the lease token must be 32 hex characters"));
    }
    u128::from_str_radix(text, 16).map_err(|_| ApiError::bad_request("the lease token must be 32 hex characters"))
}

fn link_refusal(e: &crate::rotation::LinkError) -> ApiError {
    use crate::rotation::LinkError as L;
    let (code, status) = match e {
        L::Busy => ("busy", StatusCode::CONFLICT),
        L::LeaseLost => ("lease_lost", StatusCode::CONFLICT),
        L::Stale(_) => ("stale", StatusCode::CONFLICT),
        L::Conflict(_) => ("integrity", StatusCode::CONFLICT),
        L::Unreachable(_) | L::Protocol(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
    };
    ApiError::new(status, code, e.to_string())
}

/// `POST /v1/peer/lease`: the peer asks for this node's rotation lease.
async fn peer_lease(body: &[u8], state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let request: sso_proto::wire::peer::LeaseRequest = parse_json(body)?;
    let token = parse_token(&request.token)?;
    let ttl = Duration::from_millis(request.ttl_ms.min(120_000));
    match crate::rotation::grant(state, token, ttl).await {
        Ok(max) => Ok(audited(
            json_answer(
                StatusCode::OK,
                &sso_proto::wire::peer::LeaseAnswer { max_generation: max },
            ),
            Some(format!("rotation lease to {}", request.node)),
        )),
        Err(e) => Err(link_refusal(&e)),
    }
}

/// `POST /v1/peer/stage?lease=T` and `/v1/peer/promote?lease=T`: the steps of a rotation
/// the peer coordinates.
async fn peer_rotation_step(op: &str, query: &str, body: &[u8], state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let token = parse_token(query.split('&').find_map(|kv| kv.strip_prefix("lease=")).unwrap_or(""))?;
    let incoming = sso_proto::wire::parse_records(body).map_err(ApiError::bad_request)?;
    let from = incoming.node.clone();
    if op == "peer.stage" {
        let mut records = incoming.records;
        let (Some(record), true) = (records.pop(), records.is_empty()) else {
            return Err(ApiError::bad_request("a stage carries exactly one key"));
        };
        let id = record.meta.key_id;
        let generation = record.meta.generation;
        crate::rotation::accept_stage(state, token, record)
            .await
            .map_err(|e| match e {
                crate::rotation::LinkError::Stale(max) => ApiError::new(
                    StatusCode::CONFLICT,
                    "stale",
                    format!("generation {generation} is not above this node's {max}"),
                ),
                e => link_refusal(&e),
            })?;
        let mut answer = audited(
            json_answer(StatusCode::OK, &sso_proto::wire::peer::StageAnswer { staged: id }),
            Some(format!("staged for {from}, generation {generation}")),
        );
        answer.key = Some(id);
        return Ok(answer);
    }
    let promoted = crate::rotation::accept_promote(state, token, incoming.records)
        .await
        .map_err(|e| link_refusal(&e))?;
    let detail = match promoted.kept.as_slice() {
        [] => format!("promotion from {from}"),
        kept => format!(
            "promotion from {from}; kept promoted {} it sent as orphans",
            kept.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    Ok(audited(promote_answer(&promoted), Some(detail)))
}

/// The answer to `POST /v1/peer/promote`: the wire type the peer reads back with
/// `peer::promoted_answer`.
fn promote_answer(promoted: &crate::rotation::Promoted) -> Response<Body> {
    json_answer(StatusCode::OK, &sso_proto::wire::PromoteAnswer::from(promoted))
}

/// The peer's side of pair-wide backup coverage: which keys this node's backups cover.
async fn peer_coverage(state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let own = crate::status::own_coverage(state).await?;
    let coverage = sso_proto::wire::Coverage {
        backed_up: own.backed_up,
        last_backup_unix: own.last_backup_at.map(time::OffsetDateTime::unix_timestamp),
    };
    Ok(quiet(json_answer(StatusCode::OK, &coverage)))
}

async fn status(state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let crate::status::NodeStatus {
        store: status,
        coverage,
    } = crate::status::node_status(state).await?;
    let head = state.audit.head();
    let (health_status, problems) = state.metrics.health.report();
    let rfc = sso_proto::wire::answers::rfc3339;
    let answer = sso_proto::wire::answers::StatusAnswer {
        audit: sso_proto::wire::answers::AuditHeadView {
            head: head.hash,
            seq: head.seq,
        },
        backup: sso_proto::wire::answers::BackupView {
            coverage: coverage.as_str().into(),
            last_backup_at: status.last_backup_at.map(rfc),
            not_backed_up: status.not_backed_up,
        },
        epoch: status.epoch,
        health: sso_proto::wire::answers::HealthView {
            problems,
            status: health_status.into(),
        },
        keys: status.keys.iter().map(Into::into).collect(),
        node: status.node,
        peer: state.peer.as_ref().map(|p| {
            let ps = p.status();
            sso_proto::wire::answers::PeerView {
                integrity_alarm: ps.alarm,
                lag_epochs: ps.synced_local_epoch.map(|e| status.epoch.saturating_sub(e)),
                last_contact: ps.last_contact.map(rfc),
                last_error: ps.last_error,
                node: ps.node,
                peer_epoch: ps.peer_epoch,
                state: if ps.up { "up" } else { "down" }.into(),
                url: p.url.clone(),
            }
        }),
        primary: status.primary,
        shared_database: status.shared_database,
        time: rfc(time::OffsetDateTime::now_utc()),
    };
    Ok(audited(json_answer(StatusCode::OK, &answer), None))
}

/// The server checks its own audit log (rotated files in its directory, then the current
/// one) with its audit key, against its live head and, when given (`?head=HEX&count=N`),
/// an anchor recorded elsewhere. An operator verifies without holding the unseal secret.
async fn audit_verify(query: Option<&str>, state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let mut head = None;
    let mut count = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("head", h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                head = Some(h.to_ascii_lowercase())
            }
            Some(("count", n)) => {
                count = Some(
                    n.parse::<u64>()
                        .map_err(|_| ApiError::bad_request("count must be a whole number"))?,
                )
            }
            _ => {
                return Err(ApiError::bad_request(
                    "unknown query: use head=<64 hex> and count=<entries>",
                ));
            }
        }
    }
    let extra = match (head, count) {
        (Some(head), Some(count)) => Some(keystore::AuditAnchor { count, head }),
        (None, None) => None,
        _ => return Err(ApiError::bad_request("give head and count together")),
    };
    let audit = state.audit.clone();
    let result = tokio::task::spawn_blocking(move || audit.verify_own(extra.as_ref()))
        .await
        .map_err(|_| ApiError::internal())?;
    use sso_proto::wire::answers::{AuditVerifyAnswer, GapView};
    let answer = match result {
        Ok(r) => AuditVerifyAnswer::Intact {
            anchored: None,
            entries: r.entries,
            first_seq: r.first_seq,
            gaps: r
                .gaps
                .into_iter()
                .map(|g| GapView {
                    detail: g.detail,
                    lost: g.lost,
                    seq: g.seq,
                })
                .collect(),
            head: r.head,
            intact: true,
            last_seq: r.last_seq,
        },
        Err(e) => AuditVerifyAnswer::Broken {
            file: e.file.display().to_string(),
            intact: false,
            line: e.line,
            problem: e.problem,
            truncated: e.truncated,
        },
    };
    let detail = Some(format!("intact {}", matches!(answer, AuditVerifyAnswer::Intact { .. })));
    Ok(audited(json_answer(StatusCode::OK, &answer), detail))
}

async fn backup(body: &[u8], state: &Arc<AppState>) -> Result<Answer, ApiError> {
    let request: BackupRequest = parse_json(body)?;
    let backed_up = crate::backup::back_up(state, request.password, request.hint)
        .await
        .map_err(backup_refusal)?;
    let mut resp = Response::new(Full::new(Bytes::from(backed_up.bytes)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    Ok(audited(resp, None))
}

async fn restore(body: &[u8], state: &Arc<AppState>) -> Result<Answer, ApiError> {
    use crate::backup::{RestoreMode, Restored};
    use base64::Engine;
    let request: RestoreRequest = parse_json(body)?;
    let file = base64::engine::general_purpose::STANDARD
        .decode(request.backup.as_bytes())
        .map_err(|_| ApiError::bad_request("backup must be standard base64"))?;
    let mode = RestoreMode {
        dry_run: request.dry_run,
        force: request.force,
    };
    let plan_view = |planned: &crate::backup::Planned| sso_proto::wire::answers::RestorePlanView {
        backup_created_at: sso_proto::wire::answers::rfc3339(planned.backup_created_at),
        destroyed: planned.plan.destroyed.clone(),
        known: planned.plan.known,
        peer_checked: planned.peer_checked,
        unknown: planned.plan.unknown.clone(),
    };
    match crate::backup::restore(state, file, request.password, mode)
        .await
        .map_err(backup_refusal)?
    {
        Restored::DryRun(planned) => Ok(audited(
            json_answer(
                StatusCode::OK,
                &sso_proto::wire::answers::RestoreDryRun {
                    dry_run: true,
                    plan: plan_view(&planned),
                },
            ),
            Some("dry run".into()),
        )),
        Restored::Merged { planned, report } => {
            let answer = sso_proto::wire::answers::Restored {
                added: report.added,
                advanced: report.advanced,
                epoch: report.epoch,
                plan: plan_view(&planned),
                unchanged: report.unchanged,
            };
            Ok(audited(
                json_answer(StatusCode::OK, &answer),
                Some(format!(
                    "added {}, advanced {}, kept destroyed {}{}",
                    report.added,
                    report.advanced,
                    planned.plan.destroyed.len(),
                    if mode.force { " (forced)" } else { "" }
                )),
            ))
        }
    }
}

/// A backup's or a restore's refusal, as the client sees it.
fn backup_refusal(e: crate::backup::BackupError) -> ApiError {
    use crate::backup::BackupError as E;
    match e {
        E::ShortPassword => ApiError::bad_request(format!(
            "the backup password must be at least {} characters",
            crate::backup::MIN_PASSWORD_LEN
        )),
        E::Store(e) => e.into(),
        E::Unconfirmed { unknown } => ApiError::new(
            StatusCode::CONFLICT,
            "restore_unconfirmed",
            format!(
                "the peer could not be reached, so this node cannot know whether the pair destroyed any of the {unknown} key(s) the backup would add; nothing was restored (restore once the peer answers, or with force)"
            ),
        ),
        E::Internal => ApiError::internal(),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Never serde's own words for a refused value: it may be a password.
    Ok(sso_daemon::json::parse(body)?)
}

/// Reads the request body within the size and time limits into a buffer that is wiped
/// when dropped, with every intermediate copy (admin bodies carry passwords).
async fn read_body(req: Request<Incoming>, state: &AppState) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let limits = sso_daemon::json::BodyLimits {
        max_bytes: state.limits.max_body_bytes,
        timeout: Duration::from_millis(state.limits.body_read_timeout_ms),
    };
    Ok(sso_daemon::json::read_body(req, limits).await?)
}

/// The router, for the fuzz target.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_route(method: &Method, path: &str) -> bool {
    route(method, path).is_ok()
}

/// Every admin request body parser, for the fuzz target.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_bodies(data: &[u8]) {
    let _ = parse_json::<RotateRequest>(data);
    let _ = parse_json::<RetireRequest>(data);
    let _ = parse_json::<BackupRequest>(data);
    let _ = parse_json::<RestoreRequest>(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_right_method_and_shape() {
        assert!(route(&Method::GET, "/v1/keyring").is_ok());
        assert_eq!(
            route(&Method::POST, "/v1/keyring").unwrap_err().0.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&Method::GET, "/v2/keyring").unwrap_err().0.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&Method::GET, "/v1/keys/nothex").unwrap_err().0.status,
            StatusCode::BAD_REQUEST
        );
        let r = route(&Method::POST, &format!("/v1/admin/keys/{}/retire", "ab".repeat(16))).unwrap();
        assert_eq!(r.needs, Some(Role::Admin));
    }

    /// The promote answer this node writes is what the coordinating peer reads back: one
    /// wire type (`sso_proto::wire::PromoteAnswer`) for both, bytes pinned in sso-proto.
    #[tokio::test]
    async fn the_promote_answer_written_is_the_one_the_peer_reads() {
        let promoted = crate::rotation::Promoted {
            primary: Some(KeyId::from_bytes([2; 16])),
            kept: vec![KeyId::from_bytes([1; 16]), KeyId::from_bytes([3; 16])],
        };
        let response = promote_answer(&promoted);
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(crate::peer::promoted_answer(&body).unwrap(), promoted);
        let nothing = crate::rotation::Promoted::default();
        let body = promote_answer(&nothing).into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"kept":[],"primary":null}"#);
        assert_eq!(crate::peer::promoted_answer(&body).unwrap(), nothing);
    }
}
#[cfg(test)]
mod future_size {
    use super::*;

    /// Every request, and every open watch, is this future inside hyper's task for its
    /// stream: neither the request head, the connection's context, the watch's wait nor the
    /// admin handlers may inflate it. (It was 1,968 bytes in a release build before the
    /// watch waited in a `Parked`, 8,208 before the admin handlers were boxed; see
    /// docs/benchmarks.md, "Memory per open watch".)
    #[test]
    fn the_request_future_stays_small() {
        fn size<F>(_: impl Fn(Box<Request<Incoming>>, Arc<Conn>) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size(handle);
        eprintln!("request future: {size} bytes");
        assert!(size <= 640, "the request handler's future is {size} bytes");
    }
}
