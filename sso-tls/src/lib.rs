//! `sso-tls`: the one TLS policy of the master-secret service and the one builder of an
//! mTLS client configuration, used by every client: the client library (and with it
//! `sso-agent`), the server's peer link, `ssoctl`, the process tests and the benchmarks.
//!
//! # The policy
//! - The ring provider, and only ring ([`provider`]).
//! - Our clients speak TLS 1.3 only to our servers ([`CLIENT_VERSIONS`]): every server of
//!   ours accepts it, so offering 1.2 would only open a downgrade for nothing.
//! - A client of a server that is not ours, the PostgreSQL engine's database
//!   ([`ClientTls::third_party`]), offers TLS 1.3 and 1.2 ([`THIRD_PARTY_CLIENT_VERSIONS`]):
//!   we do not configure that server, and PostgreSQL may speak only 1.2
//!   (`ssl_max_protocol_version`, or an OpenSSL without 1.3). 1.3 is chosen whenever the
//!   server speaks it; a server that speaks only 1.2 gets 1.2 with rustls's cipher suites
//!   (ECDHE with AES-GCM or ChaCha20-Poly1305, nothing older).
//! - A server accepts TLS 1.3, and TLS 1.2 too only when configured
//!   (`tls.min_version = "1.2"`, SPEC §5, for third-party clients): [`MinVersion`].
//! - A client that is given an identity presents it (mutual TLS); one without an
//!   identity (tests of refusals only) presents none.
//!
//! Each decision has a unit test below (an in-memory handshake between real rustls
//! configurations).
//!
//! # Layout
//! - [`MinVersion`], [`CLIENT_VERSIONS`], [`THIRD_PARTY_CLIENT_VERSIONS`], [`provider`]:
//!   the policy.
//! - [`load_certs`], [`load_key`], [`load_roots`]: PEM files into rustls types.
//! - [`ClientTls`]: the builder.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What can go wrong building a TLS configuration. Never carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The certificate and key were read but cannot be used together (a key that belongs
    /// to another certificate, an unsupported key type).
    #[error("client certificate: {0}")]
    Identity(rustls::Error),
    /// rustls refused the policy itself (not expected with the ring provider).
    #[error("tls policy: {0}")]
    Policy(rustls::Error),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The crypto provider: ring, and only ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The versions every client of ours offers to a server of ours: TLS 1.3 only.
pub const CLIENT_VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The versions a client offers to a server that is not ours ([`ClientTls::third_party`]:
/// the PostgreSQL engine's database): TLS 1.3, and 1.2 for a database that speaks no 1.3.
pub const THIRD_PARTY_CLIENT_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The lowest TLS version a server accepts (`tls.min_version`). TLS 1.3 unless configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MinVersion {
    /// TLS 1.3 only (the default).
    #[default]
    Tls13,
    /// TLS 1.3 and 1.2, for clients that cannot speak 1.3.
    Tls12,
}

impl MinVersion {
    /// The configuration spelling: `"1.3"` or `"1.2"`; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1.3" => Some(Self::Tls13),
            "1.2" => Some(Self::Tls12),
            _ => None,
        }
    }

    /// The configuration spelling, which [`MinVersion::parse`] reads back.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls13 => "1.3",
            Self::Tls12 => "1.2",
        }
    }

    /// The versions a server with this minimum accepts.
    pub fn server_versions(self) -> &'static [&'static SupportedProtocolVersion] {
        const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
        const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            Self::Tls13 => TLS13,
            Self::Tls12 => TLS12,
        }
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificates found"));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

/// The CA certificates in a PEM file, as trust anchors.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(path).map_err(|e| file_err(path, e))? {
        roots
            .add(ca.map_err(|e| file_err(path, e))?)
            .map_err(|e| file_err(path, e))?;
    }
    Ok(roots)
}

/// How the server's certificate is checked.
#[derive(Debug)]
enum Trust {
    Roots(RootCertStore),
    Verifier(Arc<dyn ServerCertVerifier>),
}

/// The one builder of an mTLS client configuration: the policy above, a trust (CA roots
/// or a verifier of the caller's, such as the peer link's, which also checks CRLs and the
/// peer's identity), an optional client identity and the ALPN protocols.
///
/// ```no_run
/// # fn demo() -> Result<(), sso_tls::TlsError> {
/// use std::path::Path;
/// let config = sso_tls::ClientTls::trusting(sso_tls::load_roots(Path::new("ca.pem"))?)
///     .identity_files(Path::new("client.pem"), Path::new("client-key.pem"))?
///     .alpn(&[b"h2"])
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ClientTls {
    trust: Trust,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: Vec<Vec<u8>>,
    versions: &'static [&'static SupportedProtocolVersion],
}

impl ClientTls {
    /// Trusts servers whose certificate chains to `roots`.
    pub fn trusting(roots: RootCertStore) -> Self {
        Self {
            trust: Trust::Roots(roots),
            identity: None,
            alpn: Vec::new(),
            versions: CLIENT_VERSIONS,
        }
    }

    /// Trusts servers `verifier` accepts.
    pub fn verified_by(verifier: Arc<dyn ServerCertVerifier>) -> Self {
        Self {
            trust: Trust::Verifier(verifier),
            identity: None,
            alpn: Vec::new(),
            versions: CLIENT_VERSIONS,
        }
    }

    /// Presents `chain` with `key`.
    pub fn identity(mut self, chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        self.identity = Some((chain, key));
        self
    }

    /// Presents the certificate chain in `cert` with the key in `key` (PEM files).
    pub fn identity_files(self, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(self.identity(load_certs(cert)?, load_key(key)?))
    }

    /// Offers these ALPN protocols, in order of preference (none by default).
    pub fn alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    /// The server is not ours (the PostgreSQL engine's database): offer
    /// [`THIRD_PARTY_CLIENT_VERSIONS`], TLS 1.2 as well as 1.3, instead of 1.3 only.
    pub fn third_party(mut self) -> Self {
        self.versions = THIRD_PARTY_CLIENT_VERSIONS;
        self
    }

    /// The configuration.
    pub fn build(self) -> Result<ClientConfig, TlsError> {
        let versions = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(self.versions)
            .map_err(TlsError::Policy)?;
        let trusted = match self.trust {
            Trust::Roots(roots) => versions.with_root_certificates(roots),
            Trust::Verifier(verifier) => versions.dangerous().with_custom_certificate_verifier(verifier),
        };
        let mut config = match self.identity {
            Some((chain, key)) => trusted.with_client_auth_cert(chain, key).map_err(TlsError::Identity)?,
            None => trusted.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn;
        Ok(config)
    }
}

#[cfg(test)]
mod tests;
