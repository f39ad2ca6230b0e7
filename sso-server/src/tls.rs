//! TLS: building the rustls server configuration from the files the config names, and
//! naming handshake failures for metrics and audit.
//!
//! Session resumption is off (no tickets, no session cache): a resumed TLS 1.3 session
//! keeps its original client certificate without re-checking the CRL, so a revoked client
//! could come back on a ticket. Every connection does a full handshake and a full
//! certificate check instead; the handshake cost is measured in `docs/benchmarks.md`.

use std::path::Path;
use std::sync::Arc;

use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// A TLS setup problem, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("tls: {what}: {problem}")]
pub struct TlsError {
    what: String,
    problem: String,
}

pub(crate) fn tls_err(what: impl Into<String>, problem: impl ToString) -> TlsError {
    TlsError {
        what: what.into(),
        problem: problem.to_string(),
    }
}

/// The crypto provider: ring, and only ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path.display().to_string(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(tls_err(path.display().to_string(), "no certificates found"));
    }
    Ok(certs)
}

/// Loads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_err(path.display().to_string(), e))
}

fn load_crl(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| tls_err(path.display().to_string(), e))?;
    if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(path.display().to_string(), e))
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    }
}

/// What was loaded, for metrics (certificate expiry) and logs.
#[derive(Debug, Clone)]
pub struct LoadedTls {
    /// The server configuration to accept with.
    pub config: Arc<ServerConfig>,
    /// When the server certificate expires (unix seconds).
    pub server_cert_not_after: Option<i64>,
}

/// Builds the server configuration: mTLS required against `client_ca`, CRLs checked,
/// TLS 1.3 (and 1.2 if allowed), no resumption, ALPN h2 and http/1.1.
pub fn build(config: &TlsConfig) -> Result<LoadedTls, TlsError> {
    let provider = provider();
    let chain = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&config.client_ca)? {
        roots
            .add(ca)
            .map_err(|e| tls_err(config.client_ca.display().to_string(), e))?;
    }
    let mut crls = Vec::new();
    for path in &config.crls {
        crls.extend(load_crl(path)?);
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| tls_err("client verifier", e))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version.as_str() {
        "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        _ => &[&rustls::version::TLS13],
    };
    let not_after = certs::identity_from_der(&chain[0])
        .ok()
        .and_then(|id| id.not_after)
        .map(|t| t.unix_timestamp());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| tls_err("protocol versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(config.key.display().to_string(), e))?;
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(LoadedTls {
        config: Arc::new(server),
        server_cert_not_after: not_after,
    })
}

/// A handshake failure, named for the metric `handshake_failures_total{reason}`.
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(inner) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match inner {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not_yet_valid",
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::BadSignature => "bad_signature",
            _ => "invalid_certificate",
        },
        Error::PeerIncompatible(_) => "incompatible",
        Error::AlertReceived(_) => "alert_received",
        _ => "protocol",
    }
}
