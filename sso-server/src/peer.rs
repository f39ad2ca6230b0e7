//! The failover pair's transport: the peer client (mTLS, with its certificate verifier)
//! and what this node knows of its peer. The bodies (key records, the small answers) are
//! `sso_proto::wire::peer`'s; anti-entropy (the domain logic that uses them) is
//! `replication`'s; the rotation protocol is `rotation`'s. Imports `config`, `identity`,
//! `tls`, `rotation`; never `state`.
//!
//! Protocol (`/v1/peer/…`, role `peer`, over the same mTLS listener):
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/peer/keys?digest=D` | 204 when the node's key-set digest equals `D`; else 200 with every key (retired ones with material, destroyed ones without) |
//! | `POST /v1/peer/merge` (same body) | merged durably (union by key id, states forward only), then 200 `{"epoch","digest","added","advanced"}`; 409 `integrity` when a key id arrives with other material |
//!
//! Every answer of a `/v1/peer/…` route names the answering node and its epoch in the
//! headers `sso-node` and `sso-epoch` (`sso_proto::wire::peer::NODE_HEADER`), which is
//! how a node whose pair is in sync (every pull a bodiless 204) learns who its peer is.
//!
//! Body: see `sso_proto::wire::peer` (`records_json`, `parse_records`).
//!
//! Rotation is add → distribute → promote across the pair (see `api::rotate`). Each node
//! also pulls the other's key set every `sync_interval_ms` (and so at once after a restart
//! or a healed partition), so both converge to the union of keys and, the primary being
//! derived from the key set, to the same primary (`replication`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keystore::KeyRecord;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sso_transport::Transport;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::config::{PeerConfig, TlsConfig};
use crate::identity::Pattern;
use crate::rotation::{LinkError, PeerLink, Promoted};
use crate::tls::{self, TlsError};

/// Checks the peer's server certificate as webpki does, then that it names the configured
/// peer identity: a certificate for another server of the same CA is not the peer.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: Pattern,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let identity = certs::identity_from_der(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if !self.expected.matches(&identity) {
            return Err(rustls::Error::General(format!(
                "the peer presented {}, not the configured peer identity",
                identity.label()
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What this node knows about its peer, for health, status and metrics.
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    /// The peer's node name, once it answered.
    pub node: Option<String>,
    /// Whether the last contact attempt succeeded.
    pub up: bool,
    /// When the peer last answered.
    pub last_contact: Option<OffsetDateTime>,
    /// The peer's keyring epoch at last contact.
    pub peer_epoch: Option<u64>,
    /// Our epoch when the two key sets were last seen equal.
    pub synced_local_epoch: Option<u64>,
    /// The last replication error.
    pub last_error: Option<String>,
    /// An integrity alarm raised by the last sync, if any.
    pub alarm: Option<String>,
}

/// The other node.
#[derive(Debug)]
pub struct Peer {
    /// The client to it; replaced whole by [`Peer::install`] after a SIGHUP (new
    /// certificate, key, CA or CRLs). Requests in flight finish on the old one.
    transport: arc_swap::ArcSwap<Transport>,
    /// Its URL, for messages.
    pub url: String,
    /// How long one request to it may take.
    pub(crate) timeout: Duration,
    /// Anti-entropy period.
    pub interval: Duration,
    status: Mutex<PeerStatus>,
    last_attempt: Mutex<Option<Instant>>,
}

/// The peer's key set, as pulled (the wire type).
pub use sso_proto::wire::PeerKeys;

impl Peer {
    /// Builds the peer client: our certificate as client identity, the peer's server
    /// certificate checked against the CA, the CRLs of `[tls]` and the configured identity.
    pub fn new(
        config: &PeerConfig,
        tls_config: &TlsConfig,
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<Self, TlsError> {
        let transport = Self::client(config, tls_config, crls)?;
        let timeout = Duration::from_millis(config.timeout_ms);
        Ok(Self {
            transport: arc_swap::ArcSwap::from_pointee(transport),
            url: config.url.clone(),
            timeout,
            interval: Duration::from_millis(config.sync_interval_ms),
            status: Mutex::new(PeerStatus::default()),
            last_attempt: Mutex::new(None),
        })
    }

    /// Loads and checks the files of a peer client (the SIGHUP reload calls this first and
    /// installs the result only if the whole reload succeeds).
    pub fn client(
        config: &PeerConfig,
        tls_config: &TlsConfig,
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<Transport, TlsError> {
        let provider = tls::provider();
        let ca_path = config.ca.as_ref().unwrap_or(&tls_config.client_ca);
        let mut roots = rustls::RootCertStore::empty();
        for ca in tls::load_certs(ca_path)? {
            roots
                .add(ca)
                .map_err(|e| tls::tls_err(ca_path.display().to_string(), e))?;
        }
        let mut verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls.iter().cloned());
        if tls_config.revocation == crate::config::Revocation::EndEntity {
            verifier = verifier.only_check_end_entity_revocation();
        }
        // The CRLs were checked against tls.client_ca; a separate peer CA may have none.
        if tls_config.allow_unknown_revocation || config.ca.is_some() {
            verifier = verifier.allow_unknown_revocation_status();
        }
        let inner = verifier.build().map_err(|e| tls::tls_err("peer verifier", e))?;
        let expected = config.identity.clone();
        let chain = tls::load_certs(config.cert.as_ref().unwrap_or(&tls_config.cert))?;
        let key = tls::load_key(config.key.as_ref().unwrap_or(&tls_config.key))?;
        let client = sso_tls::ClientTls::verified_by(Arc::new(PeerVerifier { inner, expected }))
            .identity(chain, key)
            .alpn(&[b"h2"])
            .build()
            .map_err(|e| match e {
                sso_tls::TlsError::Identity(e) => tls::tls_err("peer client certificate", e),
                other => tls::tls_err("peer tls", other),
            })?;
        let timeout = Duration::from_millis(config.timeout_ms);
        Transport::new(
            std::slice::from_ref(&config.url),
            Arc::new(client),
            timeout.min(Duration::from_secs(1)),
        )
        .map_err(|e| tls::tls_err("peer.url", e))
    }

    /// Uses `transport` (from [`Peer::client`]) for every request from now on; the old
    /// one's connections close when its last request ends.
    pub fn install(&self, transport: Transport) {
        self.transport.store(Arc::new(transport));
    }

    /// A copy of what we know about the peer.
    pub fn status(&self) -> PeerStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut PeerStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Records an answer from the peer: it is up, and, when known, its name and epoch
    /// (`None` keeps what an earlier answer said).
    fn contact(&self, node: Option<&str>, epoch: Option<u64>) {
        self.update(|s| {
            s.up = true;
            if let Some(node) = node {
                s.node = Some(node.to_owned());
            }
            if epoch.is_some() {
                s.peer_epoch = epoch;
            }
            s.last_contact = Some(OffsetDateTime::now_utc());
            s.last_error = None;
        });
    }

    /// Records an answer whose body names nobody (a `204`, a rotation step): who answered
    /// is in its headers (a peer that predates them leaves what we knew).
    fn contact_from(&self, reply: &sso_transport::Reply) {
        let header = |name: &str| reply.headers.get(name).map(|v| v.as_bytes());
        let who = sso_proto::wire::peer::parse_contact(
            header(sso_proto::wire::peer::NODE_HEADER),
            header(sso_proto::wire::peer::EPOCH_HEADER),
        );
        self.contact(who.as_ref().map(|c| c.node.as_str()), who.as_ref().map(|c| c.epoch));
    }

    fn failed(&self, error: &str) {
        self.update(|s| {
            s.up = false;
            s.last_error = Some(error.to_owned());
        });
    }

    /// Records that the key sets were equal at our epoch `epoch`.
    pub fn synced(&self, epoch: u64) {
        self.update(|s| {
            s.synced_local_epoch = Some(epoch);
            s.alarm = None;
        });
    }

    /// Records an integrity alarm from a sync.
    pub fn alarm(&self, problem: &str) {
        self.update(|s| s.alarm = Some(problem.to_owned()));
    }

    /// Sends `records` to the peer, which merges them durably before answering.
    pub async fn push(&self, node: &str, epoch: u64, records: &[KeyRecord]) -> Result<MergeAnswer, PeerError> {
        let body = sso_proto::wire::records_json(node, epoch, "", records);
        let reply = self
            .transport
            .load_full()
            .request_on(
                0,
                hyper::Method::POST,
                "/v1/peer/merge",
                Bytes::from_owner(body),
                self.timeout,
            )
            .await
            .map_err(|e| {
                self.failed(&e);
                PeerError::Unreachable(e)
            })?;
        match reply.status {
            200 => {
                let answer: MergeAnswer =
                    serde_json::from_slice(&reply.body).map_err(|e| PeerError::Protocol(e.to_string()))?;
                self.contact_from(&reply);
                self.contact(None, Some(answer.epoch));
                Ok(answer)
            }
            409 => Err(PeerError::Conflict(String::from_utf8_lossy(&reply.body).into_owned())),
            other => {
                let e = format!("the peer answered {other}: {}", String::from_utf8_lossy(&reply.body));
                self.failed(&e);
                Err(PeerError::Unreachable(e))
            }
        }
    }

    /// Pulls the peer's key set, unless its digest equals `local_digest` (then `None`).
    pub async fn pull(&self, local_digest: &str) -> Result<Option<PeerKeys>, PeerError> {
        *self.last_attempt.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let reply = self
            .transport
            .load_full()
            .get_on(0, &format!("/v1/peer/keys?digest={local_digest}"), self.timeout)
            .await
            .map_err(|e| {
                self.failed(&e);
                PeerError::Unreachable(e)
            })?;
        match reply.status {
            204 => {
                self.contact_from(&reply);
                Ok(None)
            }
            200 => {
                let keys = sso_proto::wire::parse_records(&reply.body).map_err(PeerError::Protocol)?;
                self.contact(Some(&keys.node), Some(keys.epoch));
                Ok(Some(keys))
            }
            other => {
                let e = format!("the peer answered {other}: {}", String::from_utf8_lossy(&reply.body));
                self.failed(&e);
                Err(PeerError::Unreachable(e))
            }
        }
    }
}

pub use sso_proto::wire::{Coverage, MergeAnswer};

impl Peer {
    /// The peer's backup coverage; `None` when it does not answer (or predates the
    /// endpoint), within the peer timeout.
    pub async fn coverage(&self) -> Option<Coverage> {
        let reply = self
            .transport
            .load_full()
            .get_on(0, "/v1/peer/coverage", self.timeout)
            .await
            .ok()?;
        if reply.status != 200 {
            return None;
        }
        sso_proto::wire::parse_coverage(&reply.body)
    }

    /// POSTs `body` to `path`; the status and body, or `Unreachable`.
    async fn post(&self, path: &str, body: Bytes) -> Result<(u16, Zeroizing<Vec<u8>>), LinkError> {
        let reply = self
            .transport
            .load_full()
            .request_on(0, hyper::Method::POST, path, body, self.timeout)
            .await
            .map_err(|e| {
                self.failed(&e);
                LinkError::Unreachable(e)
            })?;
        if reply.status == 200 {
            self.contact_from(&reply);
        }
        Ok((reply.status, reply.body))
    }
}

/// A refusal from a rotation endpoint of the peer.
fn refusal(status: u16, body: &[u8]) -> LinkError {
    let e: sso_proto::wire::ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    match (status, e.error.as_str()) {
        (409, "busy") => LinkError::Busy,
        (409, "lease_lost") => LinkError::LeaseLost,
        // A stale refusal says the number in its message only.
        (409, "stale") => LinkError::Stale(0),
        (409, "integrity") => LinkError::Conflict(e.message),
        (404 | 405, _) => LinkError::Protocol(format!(
            "the peer answered {status}: it does not know the rotation protocol (upgrade it first)"
        )),
        _ => LinkError::Unreachable(format!("the peer answered {status}: {}", e.message)),
    }
}

impl PeerLink for Peer {
    async fn lease(&self, node: &str, token: u128, ttl: Duration) -> Result<u64, LinkError> {
        let request = sso_proto::wire::peer::LeaseRequest {
            node: node.to_owned(),
            token: format!("{token:032x}"),
            ttl_ms: ttl.as_millis() as u64,
        };
        let body = serde_json::to_vec(&request).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let (status, body) = self.post("/v1/peer/lease", Bytes::from(body)).await?;
        if status != 200 {
            return Err(refusal(status, &body));
        }
        let answer: sso_proto::wire::peer::LeaseAnswer = serde_json::from_slice(&body)
            .map_err(|e| LinkError::Protocol(format!("lease answer: {}", sso_proto::json::describe_error(&e))))?;
        Ok(answer.max_generation)
    }

    async fn stage(&self, node: &str, token: u128, record: &KeyRecord) -> Result<(), LinkError> {
        let body = sso_proto::wire::records_json(node, 0, "", std::slice::from_ref(record));
        let (status, body) = self
            .post(&format!("/v1/peer/stage?lease={token:032x}"), Bytes::from_owner(body))
            .await?;
        if status != 200 {
            return Err(refusal(status, &body));
        }
        Ok(())
    }

    async fn promote(&self, node: &str, token: u128, records: &[KeyRecord]) -> Result<Promoted, LinkError> {
        let body = sso_proto::wire::records_json(node, 0, "", records);
        let (status, body) = self
            .post(&format!("/v1/peer/promote?lease={token:032x}"), Bytes::from_owner(body))
            .await?;
        if status != 200 {
            return Err(refusal(status, &body));
        }
        promoted_answer(&body).map_err(LinkError::Protocol)
    }
}

/// A replication request failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer did not answer (down, partitioned, refused us).
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The peer holds different material for a key id: an integrity alarm.
    #[error("integrity alarm from the peer: {0}")]
    Conflict(String),
    /// The peer answered something unexpected.
    #[error("unexpected answer from the peer: {0}")]
    Protocol(String),
}

/// This node's answer to `POST /v1/peer/promote`, as the wire type the peer reads back
/// with [`promoted_answer`] (one type for the writer and the reader).
impl From<&Promoted> for sso_proto::wire::PromoteAnswer {
    fn from(promoted: &Promoted) -> Self {
        Self {
            kept: promoted.kept.clone(),
            primary: promoted.primary,
        }
    }
}

impl From<sso_proto::wire::PromoteAnswer> for Promoted {
    fn from(answer: sso_proto::wire::PromoteAnswer) -> Self {
        Self {
            primary: answer.primary,
            kept: answer.kept,
        }
    }
}

/// Reads the peer's answer to `POST /v1/peer/promote` (outside input: fuzzed by
/// `peer_records`).
pub fn promoted_answer(body: &[u8]) -> Result<Promoted, String> {
    sso_proto::wire::peer::parse_promote_answer(body).map(Promoted::from)
}
