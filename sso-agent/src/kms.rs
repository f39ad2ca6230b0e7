//! The agent as a Kubernetes KMS v2 plugin: `v2.KeyManagementService` (`Status`,
//! `Encrypt`, `Decrypt`) over gRPC on a Unix socket, served from the same [`Client`] cache
//! as the HTTP socket, so kube-apiserver keeps encrypting and decrypting while every key
//! server is down. The operator's view is docs/kubernetes.md.
//!
//! - `Encrypt` seals the plaintext (kube-apiserver sends a 32-byte DEK seed) under the
//!   cached primary; the ciphertext is the ordinary envelope (docs/envelope.md, 77 bytes for
//!   32 bytes in) and `key_id` is the primary's 32-hex-digit id.
//! - `Decrypt` opens any envelope whose key the cache holds or can fetch. A tampered
//!   ciphertext, an unknown or retired key, or a `key_id` that contradicts the envelope's
//!   authenticated header is a gRPC error, never a plaintext.
//! - `Status` reads the cache only (no network): version `v2`, healthz `ok` while a primary
//!   is cached and a server answered within [`healthz_grace`] (twice the poll interval, at
//!   least 60 s), otherwise a short reason; `key_id` is the current primary, so a rotation
//!   shows at the next poll.
//!
//! Every envelope is sealed with [`AAD`] as its associated data, so KMS ciphertexts and
//! the HTTP socket's envelopes (whose AAD the caller chooses) are not confused by accident.
//! Access control is the HTTP socket's: the socket file's mode, and the peer's uid (from
//! `SO_PEERCRED`, taken when the connection is accepted) against an allowlist; other uids
//! get `PERMISSION_DENIED` before any handler runs. tonic serves no listener itself here
//! (that needs its axum router): each accepted connection is an HTTP/2 connection in hyper
//! whose requests go to the generated service.

use std::future::Future;
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sso_proto::EnvelopeRef;
use tokio::net::UnixListener;
use tonic::codegen::Service;
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

pub use crate::agent::KmsConfig;
use crate::agent::{REFUSALS_ANSWERED_PER_UID, UidAllowlist, UidCounts, accept_next};
use sso_client::{Client, Error, Freshness};

/// Bindings generated from the published API (`proto/kms/v2/api.proto`, package `v2`) by
/// tonic-prost-build; `tests/kms_proto.rs` regenerates them with protox and compares.
/// rustfmt leaves the file alone, so it stays byte-identical to the generator's output.
#[rustfmt::skip]
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod v2;

use v2::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};
use v2::{DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse};

/// Associated data bound into every KMS envelope.
pub const AAD: &[u8] = b"sso-agent/kms/v2";
/// The API version `Status` reports; kube-apiserver requires exactly this.
pub const API_VERSION: &str = "v2";
/// kube-apiserver refuses ciphertexts over 1 KiB, so plaintexts are bounded to fit.
pub const MAX_PLAINTEXT: usize = 1024 - sso_proto::envelope::MIN_LEN;
/// Largest gRPC message accepted or sent (annotations may reach 32 kB).
const MAX_MESSAGE: usize = 64 << 10;

/// The `v2.KeyManagementService` implementation over a [`Client`].
#[derive(Debug, Clone)]
pub struct KmsService {
    client: Client,
}

impl KmsService {
    /// A service answering from `client`'s cache.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// What `Status` answers; reads the cache only.
    pub fn status_now(&self) -> StatusResponse {
        let s = self.client.status();
        let healthz = match (&s.primary, &s.freshness) {
            (None, _) | (_, Freshness::Empty) => {
                "no primary key cached: no key server has answered since the agent started".to_owned()
            }
            (Some(_), Freshness::Fresh) => "ok".to_owned(),
            (Some(_), Freshness::Stale { since }) => {
                let silent = SystemTime::now().duration_since(*since).unwrap_or_default();
                // A short outage is what the cache is for: kube-apiserver fails /readyz on
                // a non-ok healthz, so say so only after the documented grace.
                if silent <= healthz_grace(self.client.poll_interval()) {
                    "ok".to_owned()
                } else {
                    format!(
                        "no key server answered for {} s; encrypting and decrypting from the cache",
                        silent.as_secs()
                    )
                }
            }
        };
        StatusResponse {
            version: API_VERSION.to_owned(),
            healthz,
            key_id: s.primary.map(|k| k.to_string()).unwrap_or_default(),
        }
    }
}

/// Maps a client error to the gRPC status kube-apiserver sees. Messages never carry key
/// material or plaintext (the client's errors do not).
fn grpc_status(e: &Error) -> Status {
    let code = match e {
        Error::Unavailable(_) | Error::Stale { .. } => Code::Unavailable,
        Error::UnknownKey { .. } => Code::NotFound,
        Error::KeyRetired(_) => Code::FailedPrecondition,
        Error::Envelope(sso_proto::Error::UnknownKey(_)) => Code::NotFound,
        Error::Envelope(sso_proto::Error::SealLimit) => Code::Unavailable,
        Error::Envelope(_) => Code::InvalidArgument,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.status_now()))
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let mut request = request.into_inner();
        let plaintext = Zeroizing::new(std::mem::take(&mut request.plaintext));
        if plaintext.is_empty() {
            return Err(Status::invalid_argument(
                "plaintext is empty; send the DEK (seed) to encrypt",
            ));
        }
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(Status::invalid_argument(format!(
                "plaintext is {} bytes; at most {MAX_PLAINTEXT} fit in the 1 KiB ciphertext kube-apiserver accepts",
                plaintext.len()
            )));
        }
        let ciphertext = self.client.seal(AAD, &plaintext).await.map_err(|e| {
            tracing::warn!(uid = %request.uid, error = %e, "KMS encrypt failed");
            grpc_status(&e)
        })?;
        let key_id = EnvelopeRef::parse(&ciphertext)
            .map_err(|e| Status::internal(format!("sealed an unparsable envelope: {e}")))?
            .key_id
            .to_string();
        Ok(Response::new(EncryptResponse {
            ciphertext,
            key_id,
            annotations: Default::default(),
        }))
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let request = request.into_inner();
        let parsed = EnvelopeRef::parse(&request.ciphertext).map_err(|e| grpc_status(&Error::Envelope(e)))?;
        // The envelope's key id is authenticated when it is opened; a different key_id from
        // kube-apiserver means its stored record and the ciphertext disagree.
        let key_id = parsed.key_id.to_string();
        if !request.key_id.is_empty() && request.key_id != key_id {
            return Err(Status::invalid_argument(format!(
                "key_id {:?} does not match the ciphertext's key {key_id}",
                request.key_id.chars().take(64).collect::<String>()
            )));
        }
        let plaintext = self.client.open(AAD, &request.ciphertext).await.map_err(|e| {
            tracing::warn!(uid = %request.uid, key_id, error = %e, "KMS decrypt failed");
            grpc_status(&e)
        })?;
        // Handed to tonic, which encodes and frees it; prost buffers are not wiped (see
        // SECURITY.md).
        Ok(Response::new(DecryptResponse { plaintext }))
    }
}

impl std::fmt::Debug for EncryptRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("plaintext", &format_args!("[{} bytes redacted]", self.plaintext.len()))
            .field("uid", &self.uid)
            .finish()
    }
}

impl std::fmt::Debug for DecryptResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext", &format_args!("[{} bytes redacted]", self.plaintext.len()))
            .finish()
    }
}

/// Serves KMS v2 on `listener` until `shutdown` completes, with the HTTP socket's limits:
/// an allowed uid holds at most `max_per_uid` connections (past it, new ones are closed at
/// once); a uid outside `allowed` (checked once, when its connection is accepted) gets
/// `PERMISSION_DENIED` on every call with no handler run, on at most a few connections per
/// uid, each for [`REFUSAL_LINGER`]; the rest of a flood is closed at once.
pub async fn serve(
    listener: UnixListener,
    client: Client,
    allowed: UidAllowlist,
    max_per_uid: usize,
    shutdown: impl Future<Output = ()>,
) {
    let service = KeyManagementServiceServer::new(KmsService::new(client))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let serving = UidCounts::default();
    let refusing = UidCounts::default();
    tokio::pin!(shutdown);
    while let Some((stream, uid)) = accept_next(&listener, shutdown.as_mut(), "kms").await {
        let key = uid.unwrap_or(u32::MAX);
        let permitted = allowed.permits(uid);
        let slot = if permitted {
            serving.take(key, max_per_uid)
        } else {
            refusing.take(key, REFUSALS_ANSWERED_PER_UID)
        };
        if !permitted || slot.is_none() {
            let n = refusing.refused(key);
            if n.is_power_of_two() {
                tracing::warn!(
                    ?uid,
                    refused = n,
                    "refused KMS connections from a uid outside the allowlist or over its cap"
                );
            }
        }
        let Some(slot) = slot else {
            continue; // dropped: closed at once
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let per_call = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut service = service.clone();
                async move {
                    if !permitted {
                        return Ok(
                            Status::permission_denied("this user may not use the agent's KMS socket").into_http(),
                        );
                    }
                    service.call(req).await
                }
            });
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(256)
                .keep_alive_interval(Duration::from_secs(60))
                .serve_connection(TokioIo::new(stream), per_call);
            if permitted {
                let _ = connection.await;
            } else {
                let _ = tokio::time::timeout(REFUSAL_LINGER, connection).await;
            }
        });
    }
}

/// How long a refused uid's connection is served (answering `PERMISSION_DENIED`).
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// How long healthz stays `ok` without an answer from any server (docs/kubernetes.md):
/// twice the poll interval, at least 60 s.
pub fn healthz_grace(poll_interval: std::time::Duration) -> std::time::Duration {
    (poll_interval * 2).max(std::time::Duration::from_secs(60))
}
