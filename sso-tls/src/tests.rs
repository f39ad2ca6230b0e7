//! One test per policy decision: real rustls client and server configurations shake hands
//! in memory.

use std::path::PathBuf;

use rustls::server::WebPkiClientVerifier;
use rustls::{Connection, ProtocolVersion, ServerConfig};

use super::*;

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    other_key: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs::CertificateAuthority::generate("policy test ca", 1).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let server = ca
        .issue(&certs::LeafSpec::server("server", &["localhost"], &[], 1))
        .unwrap();
    let client = ca.issue(&certs::LeafSpec::client("client", 1)).unwrap();
    let other = ca.issue(&certs::LeafSpec::client("other", 1)).unwrap();
    Pki {
        ca: write("ca.pem", ca.cert_pem()),
        server: (
            write("server.pem", &server.cert_pem),
            write("server-key.pem", &server.key_pem),
        ),
        client: (
            write("client.pem", &client.cert_pem),
            write("client-key.pem", &client.key_pem),
        ),
        other_key: write("other-key.pem", &other.key_pem),
        _dir: dir,
    }
}

/// A server as sso-server builds one: mTLS against the CA, the given versions.
fn server(pki: &Pki, versions: &[&'static SupportedProtocolVersion]) -> ServerConfig {
    let roots = Arc::new(load_roots(&pki.ca).unwrap());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .unwrap();
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&pki.server.0).unwrap(), load_key(&pki.server.1).unwrap())
        .unwrap()
}

/// A server that is not ours, as a database is set up: no client certificates, the given
/// versions.
fn third_party_server(pki: &Pki, versions: &[&'static SupportedProtocolVersion]) -> ServerConfig {
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(load_certs(&pki.server.0).unwrap(), load_key(&pki.server.1).unwrap())
        .unwrap()
}

/// A client of ours, from the one builder.
fn ours(pki: &Pki) -> ClientConfig {
    ClientTls::trusting(load_roots(&pki.ca).unwrap())
        .identity_files(&pki.client.0, &pki.client.1)
        .unwrap()
        .build()
        .unwrap()
}

/// A third-party client that speaks only TLS 1.2.
fn tls12_only(pki: &Pki) -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(load_roots(&pki.ca).unwrap())
        .with_client_auth_cert(load_certs(&pki.client.0).unwrap(), load_key(&pki.client.1).unwrap())
        .unwrap()
}

fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

/// The version both ends agreed on, or the first error either end saw.
fn handshake(client: ClientConfig, server: ServerConfig) -> Result<ProtocolVersion, rustls::Error> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = Connection::Client(rustls::ClientConnection::new(Arc::new(client), name)?);
    let mut s = Connection::Server(rustls::ServerConnection::new(Arc::new(server))?);
    for _ in 0..10 {
        transfer(&mut c, &mut s)?;
        transfer(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
            // TLS 1.3: the server checks the client certificate on the client's last
            // flight; it has it now.
            return Ok(c.protocol_version().unwrap());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn our_client_speaks_tls13_even_to_a_server_that_allows_12() {
    let pki = pki();
    let v = handshake(ours(&pki), server(&pki, MinVersion::Tls12.server_versions())).unwrap();
    assert_eq!(v, ProtocolVersion::TLSv1_3);
    let v = handshake(ours(&pki), server(&pki, MinVersion::Tls13.server_versions())).unwrap();
    assert_eq!(v, ProtocolVersion::TLSv1_3);
}

#[test]
fn our_client_refuses_a_server_that_offers_only_tls12() {
    let pki = pki();
    handshake(ours(&pki), server(&pki, &[&rustls::version::TLS12])).unwrap_err();
}

#[test]
fn a_server_refuses_tls12_unless_configured() {
    let pki = pki();
    assert_eq!(MinVersion::default(), MinVersion::Tls13);
    handshake(tls12_only(&pki), server(&pki, MinVersion::Tls13.server_versions())).unwrap_err();
    let v = handshake(tls12_only(&pki), server(&pki, MinVersion::Tls12.server_versions())).unwrap();
    assert_eq!(v, ProtocolVersion::TLSv1_2);
}

#[test]
fn a_client_of_a_third_party_server_accepts_tls12_and_prefers_13() {
    // The PostgreSQL engine's database may speak only TLS 1.2; our servers never need it.
    let pki = pki();
    let database = || ClientTls::trusting(load_roots(&pki.ca).unwrap()).third_party();
    let only12 = || third_party_server(&pki, &[&rustls::version::TLS12]);
    let v = handshake(database().build().unwrap(), only12()).unwrap();
    assert_eq!(v, ProtocolVersion::TLSv1_2);
    let v = handshake(
        database().build().unwrap(),
        third_party_server(&pki, THIRD_PARTY_CLIENT_VERSIONS),
    )
    .unwrap();
    assert_eq!(v, ProtocolVersion::TLSv1_3);
    let v = handshake(database().build().unwrap(), third_party_server(&pki, CLIENT_VERSIONS)).unwrap();
    assert_eq!(v, ProtocolVersion::TLSv1_3);
    // Without `third_party`, the same client refuses that database.
    let ours = ClientTls::trusting(load_roots(&pki.ca).unwrap()).build().unwrap();
    handshake(ours, only12()).unwrap_err();
    // The server is still verified: a database certificate from another CA is refused.
    let other = certs::CertificateAuthority::generate("another ca", 1).unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(other.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let stranger = ClientTls::trusting(roots).third_party().build().unwrap();
    handshake(stranger, only12()).unwrap_err();
}

#[test]
fn a_client_without_an_identity_is_refused_by_an_mtls_server() {
    let pki = pki();
    let anonymous = ClientTls::trusting(load_roots(&pki.ca).unwrap()).build().unwrap();
    handshake(anonymous, server(&pki, MinVersion::Tls13.server_versions())).unwrap_err();
}

#[test]
fn a_key_of_another_certificate_is_an_identity_error() {
    let pki = pki();
    let e = ClientTls::trusting(load_roots(&pki.ca).unwrap())
        .identity_files(&pki.client.0, &pki.other_key)
        .unwrap()
        .build()
        .unwrap_err();
    assert!(
        matches!(e, TlsError::Identity(rustls::Error::InconsistentKeys(_))),
        "{e:?}"
    );
}

#[test]
fn a_missing_or_empty_file_names_the_file() {
    let pki = pki();
    let missing = pki.ca.with_file_name("nothing.pem");
    assert!(load_roots(&missing).unwrap_err().to_string().contains("nothing.pem"));
    let empty = pki.ca.with_file_name("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(
        load_certs(&empty)
            .unwrap_err()
            .to_string()
            .contains("no certificates found")
    );
}

#[test]
fn min_version_reads_the_two_spellings_only() {
    assert_eq!(MinVersion::parse("1.3"), Some(MinVersion::Tls13));
    assert_eq!(MinVersion::parse("1.2"), Some(MinVersion::Tls12));
    for other in ["1.1", "1.0", "", "TLS1.3", " 1.3"] {
        assert_eq!(MinVersion::parse(other), None, "{other:?}");
    }
    // The spelling written into a config file reads back as the same version.
    for v in [MinVersion::Tls13, MinVersion::Tls12] {
        assert_eq!(MinVersion::parse(v.as_str()), Some(v));
    }
}

#[test]
fn alpn_is_offered_in_the_order_given() {
    let pki = pki();
    let config = ClientTls::trusting(load_roots(&pki.ca).unwrap())
        .alpn(&[b"h2", b"http/1.1"])
        .build()
        .unwrap();
    assert_eq!(config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
}
