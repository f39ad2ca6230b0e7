//! PKI helpers for the master-secret service: a certificate authority for development and
//! tests, leaf certificates for servers, peers and clients, CRLs, and the peer identity
//! (subject CN and SANs) that the server maps to roles.
//!
//! # Layout
//! - [`CertificateAuthority`]: generate or load a CA, issue leaves ([`LeafSpec`]) and CRLs.
//! - [`DevPki`]: the `sso-dev/` set of SPEC §9 (CA, server, admin and client), as named
//!   files for the caller to write.
//! - [`PeerIdentity`]: what a presented certificate says about who is calling.
//!
//! Writing files is left to callers, which know their permissions policy; private keys
//! come back as zeroizing strings.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// rcgen refused to build a certificate, key or CRL.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The bytes are not a parseable X.509 certificate.
    #[error("not a valid X.509 certificate: {0}")]
    Parse(String),
    /// A SAN entry could not be encoded.
    #[error("invalid subject alternative name {0:?}")]
    InvalidName(String),
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafUsage {
    /// TLS server authentication.
    Server,
    /// TLS client authentication.
    Client,
    /// Both: a node of the pair is a server to clients and a client to its peer.
    ServerAndClient,
}

/// What to put in a leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// Subject common name: the role or name the server maps to a role.
    pub common_name: String,
    /// DNS names for the SAN extension.
    pub dns_names: Vec<String>,
    /// IP addresses for the SAN extension.
    pub ip_addresses: Vec<IpAddr>,
    /// URIs for the SAN extension (for example SPIFFE ids).
    pub uris: Vec<String>,
    /// Server, client or both.
    pub usage: LeafUsage,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A client certificate for `name`, valid from an hour ago for `days` days.
    pub fn client(name: &str, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: name.into(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            usage: LeafUsage::Client,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// A server certificate for `name` with the given DNS names and addresses.
    pub fn server(name: &str, dns_names: &[&str], ip_addresses: &[IpAddr], days: i64) -> Self {
        Self {
            dns_names: dns_names.iter().map(|s| (*s).to_owned()).collect(),
            ip_addresses: ip_addresses.to_vec(),
            usage: LeafUsage::Server,
            ..Self::client(name, days)
        }
    }
}

/// A certificate and its private key, both PEM.
pub struct CertifiedKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM; wiped on drop.
    pub key_pem: Zeroizing<String>,
    /// The certificate's serial number, for CRLs.
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("serial", &hex(&self.serial))
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// A certificate authority that can issue leaves and CRLs.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new CA (ECDSA P-256) named `common_name`, valid for `days` days.
    pub fn generate(common_name: &str, days: i64) -> Result<Self, Error> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        // CrlSign is required for the CA to sign revocation lists.
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(days);
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM: what servers and clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<CertifiedKey, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name);
        for dns in &spec.dns_names {
            let ia5 = dns.clone().try_into().map_err(|_| Error::InvalidName(dns.clone()))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        for ip in &spec.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for uri in &spec.uris {
            let ia5 = uri.clone().try_into().map_err(|_| Error::InvalidName(uri.clone()))?;
            params.subject_alt_names.push(SanType::URI(ia5));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.usage {
            LeafUsage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            LeafUsage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            LeafUsage::ServerAndClient => {
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            serial: serial.to_bytes(),
        })
    }

    /// Issues a subordinate (issuing) CA named `common_name`, valid for `days` days: the
    /// middle tier of a two-tier PKI. Its [`CertificateAuthority::cert_pem`] is the
    /// intermediate certificate; leaves it issues chain to this CA's issuer.
    pub fn intermediate(&self, common_name: &str, days: i64) -> Result<Self, Error> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(days);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// Signs a CRL revoking `serials`, valid for `days` days from now.
    pub fn crl(&self, serials: &[Vec<u8>], crl_number: u64, days: i64) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        self.crl_at(
            serials,
            crl_number,
            now - Duration::minutes(5),
            now + Duration::days(days),
        )
    }

    /// Signs a CRL revoking `serials` with the given `thisUpdate` and `nextUpdate` (a
    /// stale CRL for tests and drills, or one with an operator's own schedule).
    pub fn crl_at(
        &self,
        serials: &[Vec<u8>],
        crl_number: u64,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 16 random bytes with the top bit clear, so the DER integer stays positive.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // If the OS RNG failed, key generation (same RNG) has failed already; a fixed serial
    // would still be a valid one.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// The SHA-256 fingerprint of a DER certificate, lowercase hex (what
/// `openssl x509 -noout -fingerprint -sha256` prints, without the colons).
pub fn sha256_hex(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The development PKI of SPEC §9: a CA, a server certificate for `localhost` and
/// `127.0.0.1`, and `admin` and `client` client certificates whose CN is the role.
#[derive(Debug)]
pub struct DevPki {
    /// The dev CA.
    pub ca: CertificateAuthority,
    /// Server certificate.
    pub server: CertifiedKey,
    /// Client certificate with CN `admin`.
    pub admin: CertifiedKey,
    /// Client certificate with CN `client`.
    pub client: CertifiedKey,
}

/// One file of a PKI set, for the caller to write.
#[derive(Debug)]
pub struct PkiFile<'a> {
    /// File name inside the directory.
    pub name: &'static str,
    /// Contents.
    pub contents: &'a str,
    /// Whether it is a private key (write it 0600).
    pub private: bool,
}

impl DevPki {
    /// Generates the whole set; certificates are valid for a year.
    pub fn generate() -> Result<Self, Error> {
        let ca = CertificateAuthority::generate("sso dev CA", 3650)?;
        let localhost = [IpAddr::from([127, 0, 0, 1]), IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])];
        let mut server_spec = LeafSpec::server("sso-server", &["localhost"], &localhost, 365);
        server_spec.usage = LeafUsage::ServerAndClient;
        let server = ca.issue(&server_spec)?;
        let admin = ca.issue(&LeafSpec::client("admin", 365))?;
        let client = ca.issue(&LeafSpec::client("client", 365))?;
        Ok(Self {
            ca,
            server,
            admin,
            client,
        })
    }

    /// The files of SPEC §9 (plus `ca-key.pem`, so `ssoctl certs issue` can add clients).
    pub fn files(&self) -> Vec<PkiFile<'_>> {
        vec![
            PkiFile {
                name: "ca.pem",
                contents: self.ca.cert_pem(),
                private: false,
            },
            PkiFile {
                name: "server.pem",
                contents: &self.server.cert_pem,
                private: false,
            },
            PkiFile {
                name: "server-key.pem",
                contents: &self.server.key_pem,
                private: true,
            },
            PkiFile {
                name: "admin.pem",
                contents: &self.admin.cert_pem,
                private: false,
            },
            PkiFile {
                name: "admin-key.pem",
                contents: &self.admin.key_pem,
                private: true,
            },
            PkiFile {
                name: "client.pem",
                contents: &self.client.cert_pem,
                private: false,
            },
            PkiFile {
                name: "client-key.pem",
                contents: &self.client.key_pem,
                private: true,
            },
        ]
    }
}

/// Who a certificate says its holder is: the subject CN and the SAN entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject common name, if present.
    pub common_name: Option<String>,
    /// SAN DNS names.
    pub dns_names: Vec<String>,
    /// SAN URIs.
    pub uris: Vec<String>,
    /// SAN IP addresses.
    pub ip_addresses: Vec<IpAddr>,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the whole certificate (DER), lowercase hex: tells apart two certificates
    /// with the same names, such as a revoked one and its replacement.
    pub sha256: String,
    /// End of validity.
    pub not_after: Option<OffsetDateTime>,
}

impl PeerIdentity {
    /// A short label for logs and audit entries: the CN, else the first SAN.
    pub fn label(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.uris.first().cloned())
            .or_else(|| self.dns_names.first().cloned())
            .unwrap_or_else(|| format!("serial:{}", self.serial))
    }
}

/// Extracts the identity from a DER certificate. The certificate is assumed to have been
/// verified already (by the TLS layer); this only reads it.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, Error> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| Error::Parse(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let mut id = PeerIdentity {
        common_name,
        serial: hex(cert.raw_serial()),
        sha256: sha256_hex(der),
        not_after: OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok(),
        ..PeerIdentity::default()
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => id.dns_names.push((*d).to_owned()),
                GeneralName::URI(u) => id.uris.push((*u).to_owned()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => id
                        .ip_addresses
                        .push(IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default())),
                    16 => id
                        .ip_addresses
                        .push(IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default())),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(id)
}

/// A CRL's `nextUpdate` (DER), when it has one: the time by which a fresh CRL must be
/// published. Reads only; the signature is not checked.
pub fn crl_next_update(der: &[u8]) -> Result<Option<OffsetDateTime>, Error> {
    use x509_parser::prelude::*;
    let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| Error::Parse(e.to_string()))?;
    Ok(crl
        .next_update()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.timestamp()).ok()))
}

/// Decodes the first certificate in a PEM string to DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| Error::Parse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crl_says_when_the_next_one_is_due() {
        let ca = CertificateAuthority::generate("crl test CA", 30).unwrap();
        let pem = ca.crl(&[], 1, 7).unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        let next = crl_next_update(&der).unwrap().unwrap();
        let days = (next - OffsetDateTime::now_utc()).whole_hours();
        assert!((7 * 24 - 1..=7 * 24).contains(&days), "{days} hours");
        assert!(crl_next_update(b"not a crl").is_err());
    }

    #[test]
    fn dev_pki_identities_name_their_roles() {
        let pki = DevPki::generate().unwrap();
        let server = identity_from_der(&pem_to_der(&pki.server.cert_pem).unwrap()).unwrap();
        assert_eq!(server.dns_names, vec!["localhost"]);
        assert!(server.ip_addresses.contains(&IpAddr::from([127, 0, 0, 1])));
        let admin = identity_from_der(&pem_to_der(&pki.admin.cert_pem).unwrap()).unwrap();
        assert_eq!(admin.common_name.as_deref(), Some("admin"));
        assert_eq!(admin.label(), "admin");
        let client = identity_from_der(&pem_to_der(&pki.client.cert_pem).unwrap()).unwrap();
        assert_eq!(client.common_name.as_deref(), Some("client"));
        assert_eq!(client.serial, hex(&pki.client.serial));
        assert_eq!(client.sha256.len(), 64);
        assert_ne!(client.sha256, admin.sha256);
        assert_eq!(pki.files().iter().filter(|f| f.private).count(), 3);
    }

    #[test]
    fn uri_sans_are_extracted() {
        let ca = CertificateAuthority::generate("t", 1).unwrap();
        let mut spec = LeafSpec::client("node-b", 1);
        spec.uris.push("spiffe://example.org/sso/node-b".into());
        let leaf = ca.issue(&spec).unwrap();
        let id = identity_from_der(&pem_to_der(&leaf.cert_pem).unwrap()).unwrap();
        assert_eq!(id.uris, vec!["spiffe://example.org/sso/node-b"]);
    }

    #[test]
    fn a_ca_reloaded_from_pem_issues_and_revokes() {
        let ca = CertificateAuthority::generate("t", 1).unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let leaf = again.issue(&LeafSpec::client("x", 1)).unwrap();
        let crl = again.crl(std::slice::from_ref(&leaf.serial), 1, 1).unwrap();
        assert!(crl.contains("BEGIN X509 CRL"));
    }

    #[test]
    fn garbage_is_a_parse_error() {
        assert!(matches!(identity_from_der(b"not a certificate"), Err(Error::Parse(_))));
    }

    #[test]
    fn debug_hides_private_keys() {
        let pki = DevPki::generate().unwrap();
        let text = format!("{pki:?}");
        assert!(!text.contains("PRIVATE KEY"));
        assert!(!text.contains(&pki.ca.key_pem()[40..80]));
    }
}
