//! TLS: building the rustls server configuration from the files the config names, and
//! naming handshake failures for metrics and audit.
//!
//! Session resumption is off (no tickets, no session cache): a resumed TLS 1.3 session
//! keeps its original client certificate without re-checking the CRL, so a revoked client
//! could come back on a ticket. Every connection does a full handshake and a full
//! certificate check instead; the handshake cost is measured in `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::config::{Revocation, TlsConfig};

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
    sso_tls::provider()
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

/// One CRL that passed the checks, summarised for metrics and the stale warning.
#[derive(Debug, Clone)]
pub struct CrlSummary {
    /// The file it came from.
    pub path: PathBuf,
    /// The issuing CA's name.
    pub issuer: String,
    /// `thisUpdate`, unix seconds.
    pub this_update: i64,
    /// `nextUpdate`, unix seconds, when present.
    pub next_update: Option<i64>,
    /// How many certificates it revokes.
    pub revoked: usize,
}

impl CrlSummary {
    /// Whether `nextUpdate` has passed: the CA should have published a newer list.
    pub fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|n| n < now)
    }
}

fn read_crl_file(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| tls_err(path.display().to_string(), e))?;
    parse_crl_bytes(&bytes).map_err(|p| tls_err(path.display().to_string(), p))
}

/// Splits a CRL file (PEM with one or more CRLs, or one DER CRL) into DER CRLs.
pub(crate) fn parse_crl_bytes(bytes: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls = if bytes.trim_ascii_start().starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM CRL file: {e}"))?
    } else {
        vec![CertificateRevocationListDer::from(bytes.to_vec())]
    };
    if crls.is_empty() {
        return Err("no CRL found in the file".into());
    }
    Ok(crls)
}

/// A CRL file through the parser and checker `build` uses, for the fuzz target.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_crl(data: &[u8]) {
    if let Ok(crls) = parse_crl_bytes(data) {
        for crl in crls {
            let _ = check_crl(&crl, &[]);
        }
    }
}

/// A CA certificate a CRL may be signed by: a trust anchor from `client_ca` or an issuing
/// CA from `crl_issuers`.
struct Signer {
    der: CertificateDer<'static>,
}

impl Signer {
    fn parsed(&self) -> Option<x509_parser::certificate::X509Certificate<'_>> {
        use x509_parser::prelude::FromDer;
        x509_parser::certificate::X509Certificate::from_der(&self.der)
            .ok()
            .map(|(_, c)| c)
    }
}

/// Checks one DER CRL: it parses, and its signature verifies against a CA whose subject is
/// the CRL's issuer. A CRL from another CA, or signed by another key under the same name,
/// is refused here, so it can never reach the verifier and lock every client out.
fn check_crl(der: &[u8], signers: &[Signer]) -> Result<(String, i64, Option<i64>, usize), String> {
    use x509_parser::prelude::FromDer;
    let (rest, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| format!("does not parse as an X.509 CRL: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the CRL".into());
    }
    let issuer = crl.issuer().to_string();
    let mut named = 0;
    let mut verified = false;
    for signer in signers {
        let Some(ca) = signer.parsed() else { continue };
        if ca.subject().as_raw() != crl.issuer().as_raw() {
            continue;
        }
        named += 1;
        if crl.verify_signature(ca.public_key()).is_ok() {
            verified = true;
            break;
        }
    }
    if named == 0 {
        return Err(format!(
            "issued by {issuer:?}, which is not a CA in tls.client_ca or tls.crl_issuers: \
             a CRL from another CA would refuse every client it cannot vouch for"
        ));
    }
    if !verified {
        return Err(format!(
            "its signature does not verify against the CA named {issuer:?}: signed by another \
             key with the same name, or corrupted"
        ));
    }
    Ok((
        issuer,
        crl.last_update().timestamp(),
        crl.next_update().map(|t| t.timestamp()),
        crl.iter_revoked_certificates().count(),
    ))
}

/// Loads `crl_issuers`: each must be a CA certificate signed by a trust anchor (or by an
/// issuing CA listed before... or after it in the same file).
fn load_crl_issuers(path: &Path, anchors: &[Signer]) -> Result<Vec<Signer>, TlsError> {
    use x509_parser::prelude::FromDer;
    let what = || path.display().to_string();
    let pending = load_certs(path)?;
    let mut accepted: Vec<Signer> = Vec::new();
    let mut left: Vec<CertificateDer<'static>> = pending;
    // Each pass accepts the certificates whose issuer is already trusted; a chain of n
    // issuing CAs takes n passes.
    while !left.is_empty() {
        let before = left.len();
        let mut still = Vec::new();
        for der in left {
            let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
                .map_err(|e| tls_err(what(), format!("not a certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(tls_err(what(), format!("{} is not a CA certificate", cert.subject())));
            }
            let vouched = anchors.iter().chain(accepted.iter()).any(|s| {
                s.parsed().is_some_and(|ca| {
                    ca.subject().as_raw() == cert.issuer().as_raw()
                        && cert.verify_signature(Some(ca.public_key())).is_ok()
                })
            });
            if vouched {
                accepted.push(Signer { der: der.clone() });
            } else {
                still.push(der);
            }
        }
        if still.len() == before {
            let names: Vec<String> = still
                .iter()
                .filter_map(|d| x509_parser::certificate::X509Certificate::from_der(d).ok())
                .map(|(_, c)| c.subject().to_string())
                .collect();
            return Err(tls_err(
                what(),
                format!("{names:?} not signed by a CA in tls.client_ca (or by another CA in this file)"),
            ));
        }
        left = still;
    }
    Ok(accepted)
}

/// What was loaded, for metrics (certificate expiry), the live-connection re-check and logs.
#[derive(Debug, Clone)]
pub struct LoadedTls {
    /// The server configuration to accept with.
    pub config: Arc<ServerConfig>,
    /// The client certificate verifier inside `config`, kept to re-check live connections
    /// after a reload.
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// When the server certificate expires (unix seconds).
    pub server_cert_not_after: Option<i64>,
    /// The CRLs in force.
    pub crls: Vec<CrlSummary>,
    /// The same CRLs, parsed and checked, for the peer client's server verifier.
    pub crl_ders: Vec<CertificateRevocationListDer<'static>>,
}

/// Refuses a private key file its group or others can read or write, with the same message
/// and hint as the unseal key.
fn check_key_file(path: &Path) -> Result<(), TlsError> {
    keystore::fsutil::check_private(path).map_err(|e| match e {
        keystore::Error::InsecurePermissions { mode, .. } => tls_err(
            path.display().to_string(),
            format!(
                "has mode {mode:03o}: a private key must not be accessible by group or others; \
                 run chmod 600 on it"
            ),
        ),
        other => tls_err(path.display().to_string(), other),
    })
}

/// Builds the server configuration: mTLS required against `client_ca`, CRLs checked
/// (signatures verified first), TLS 1.3 (and 1.2 if allowed), no resumption, ALPN h2 and
/// http/1.1. Loads and checks every file, so it doubles as the preflight before binding:
/// the key must be private, of a supported type, and match the certificate.
pub fn build(config: &TlsConfig) -> Result<LoadedTls, TlsError> {
    let provider = provider();
    check_key_file(&config.key)?;
    let chain = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| tls_err(config.key.display().to_string(), format!("unsupported key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
    certified.keys_match().map_err(|e| {
        tls_err(
            config.key.display().to_string(),
            format!("does not belong to the certificate in {}: {e}", config.cert.display()),
        )
    })?;
    let mut roots = RootCertStore::empty();
    let mut signers = Vec::new();
    for ca in load_certs(&config.client_ca)? {
        roots
            .add(ca.clone())
            .map_err(|e| tls_err(config.client_ca.display().to_string(), e))?;
        signers.push(Signer { der: ca });
    }
    if let Some(path) = &config.crl_issuers {
        let issuers = load_crl_issuers(path, &signers)?;
        signers.extend(issuers);
    }
    let mut crls = Vec::new();
    let mut summaries = Vec::new();
    for path in &config.crls {
        for (i, crl) in read_crl_file(path)?.into_iter().enumerate() {
            let (issuer, this_update, next_update, revoked) =
                check_crl(&crl, &signers).map_err(|p| tls_err(format!("{} (CRL {})", path.display(), i + 1), p))?;
            summaries.push(CrlSummary {
                path: path.clone(),
                issuer,
                this_update,
                next_update,
                revoked,
            });
            crls.push(crl);
        }
    }
    let crl_ders = crls.clone();
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).with_crls(crls);
    if config.revocation == Revocation::EndEntity {
        builder = builder.only_check_end_entity_revocation();
    }
    if config.allow_unknown_revocation {
        builder = builder.allow_unknown_revocation_status();
    }
    let verifier = builder.build().map_err(|e| tls_err("client verifier", e))?;
    let versions = config.min_version.server_versions();
    let not_after = certs::identity_from_der(&chain[0])
        .ok()
        .and_then(|id| id.not_after)
        .map(|t| t.unix_timestamp());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| tls_err("protocol versions", e))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(config.key.display().to_string(), e))?;
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(LoadedTls {
        config: Arc::new(server),
        verifier,
        server_cert_not_after: not_after,
        crls: summaries,
        crl_ders,
    })
}

/// A handshake failure, named for the metric `handshake_failures_total{reason}`.
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(inner) => error_reason(inner),
        None => match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        },
    }
}

/// A rustls error, named as in `handshake_failures_total{reason}`.
pub fn error_reason(error: &rustls::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match error {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not_yet_valid",
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownRevocationStatus => "unknown_revocation_status",
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::BadSignature => "bad_signature",
            _ => "invalid_certificate",
        },
        Error::PeerIncompatible(_) => "incompatible",
        Error::AlertReceived(_) => "alert_received",
        _ => "protocol",
    }
}
