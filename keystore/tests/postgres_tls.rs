//! TLS to the database: a throwaway PostgreSQL that admits TLS connections only, its
//! certificate issued by a test CA. The engine connects when the URL asks for TLS and names
//! that CA, and fails clearly otherwise.

use std::path::PathBuf;

use keystore::postgres::PgStore;
use keystore::{CreateOptions, Error, Store, UnsealKey};
use pg_throwaway::PgCluster;

/// A throwaway PostgreSQL admitting TLS only (`start` says which versions), its
/// certificate for localhost issued by a test CA in `ca.pem`, another CA in `other.pem`,
/// an unseal key, and a fresh database's URL.
struct TlsDatabase {
    cluster: PgCluster,
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    other_file: PathBuf,
    key: UnsealKey,
    url: String,
}

fn tls_database(start: fn(&str, &str) -> PgCluster) -> TlsDatabase {
    let ca = certs::CertificateAuthority::generate("test database CA", 1).unwrap();
    let leaf = ca
        .issue(&certs::LeafSpec::server(
            "localhost",
            &["localhost"],
            &["127.0.0.1".parse().unwrap()],
            1,
        ))
        .unwrap();
    let cluster = start(&leaf.cert_pem, &leaf.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let other = certs::CertificateAuthority::generate("another CA", 1).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.cert_pem()).unwrap();
    let key = UnsealKey::generate_key_file(&dir.path().join("unseal.key")).unwrap();
    let url = cluster.fresh_database();
    TlsDatabase {
        cluster,
        _dir: dir,
        ca_file,
        other_file,
        key,
        url,
    }
}

#[test]
fn tls_when_the_url_asks_for_it_verified_against_the_named_ca() {
    let db = tls_database(PgCluster::start_with_tls);
    let (ca_file, other_file, key, url) = (&db.ca_file, &db.other_file, &db.key, &db.url);

    // The server rejects anything but TLS: a store that opens spoke TLS, verified.
    let tls = format!("{url}?sslmode=require&sslrootcert={}", ca_file.display());
    // A database that speaks TLS 1.3 is spoken to in 1.3.
    assert_eq!(db.init_over(&tls), "TLSv1.3");
    assert_eq!(PgStore::open(&tls, key, "node-2").unwrap().list().unwrap().len(), 1);

    // libpq's spelling of the same check (chain and host name) is accepted too: operators
    // write `verify-full` (docs/cluster.md); `verify-ca` (chain only) is refused, saying
    // that the host name is always checked.
    let full = format!("{url}?sslmode=verify-full&sslrootcert={}", ca_file.display());
    assert_eq!(PgStore::open(&full, key, "node-2").unwrap().list().unwrap().len(), 1);
    let wrong_full = format!("{url}?sslmode=verify-full&sslrootcert={}", other_file.display());
    assert!(matches!(
        PgStore::open(&wrong_full, key, "node-2"),
        Err(Error::Storage(_))
    ));
    let err = PgStore::open(
        &format!("{url}?sslmode=verify-ca&sslrootcert={}", ca_file.display()),
        key,
        "node-2",
    )
    .unwrap_err();
    assert!(err.to_string().contains("verify-full"), "{err}");

    // Without TLS the server refuses (hostnossl reject): a storage error with a remedy.
    let err = PgStore::open(&format!("{url}?sslmode=disable"), key, "node-2").unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "{err}");
    // A certificate from another CA fails verification.
    let wrong = format!("{url}?sslmode=require&sslrootcert={}", other_file.display());
    let err = PgStore::open(&wrong, key, "node-2").unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "{err}");
    // sslmode=require without a CA is refused before connecting, saying what to add.
    let err = PgStore::open(&format!("{url}?sslmode=require"), key, "node-2").unwrap_err();
    assert!(err.to_string().contains("sslrootcert"), "{err}");
}

impl TlsDatabase {
    /// Initialises the store at `tls` (this database's URL with TLS parameters), checks
    /// it holds its first key, and returns the TLS versions of the engine's open
    /// connections (the `application_name` it sets) as the server reports them.
    fn init_over(&self, tls: &str) -> String {
        let (store, _) = PgStore::init(tls, &self.key, &CreateOptions::new("node-1")).unwrap();
        assert_eq!(store.keyring().unwrap().keys.len(), 1);
        let database = self.url.rsplit('/').next().unwrap();
        self.cluster
            .psql(
                database,
                "SELECT string_agg(DISTINCT s.version, ',') FROM pg_stat_ssl s \
                 JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'sso-keystore'",
            )
            .trim()
            .to_owned()
    }
}

/// PostgreSQL may speak only TLS 1.2 (`ssl_max_protocol_version`, an old OpenSSL). The
/// database is not ours, so the engine's client (sso-tls's third-party policy) offers 1.2
/// as well as 1.3, still verifying the chain and the host name; our own clients, which
/// speak 1.3 only, would be refused by this server.
#[test]
fn a_database_that_speaks_only_tls12_is_reached_over_tls12() {
    let db = tls_database(PgCluster::start_with_tls12_only);
    let tls = format!("{}?sslmode=verify-full&sslrootcert={}", db.url, db.ca_file.display());
    assert_eq!(db.init_over(&tls), "TLSv1.2");
    // Still verified: a certificate from another CA is refused over 1.2 too.
    let wrong = format!("{}?sslmode=verify-full&sslrootcert={}", db.url, db.other_file.display());
    assert!(matches!(
        PgStore::open(&wrong, &db.key, "node-2"),
        Err(Error::Storage(_))
    ));
}

/// docs/cluster.md: the engine checks the database server's host name as well as its chain
/// (what libpq calls `verify-full`): a certificate from the right CA for another host name
/// is refused.
#[test]
fn a_certificate_for_another_host_name_is_refused() {
    let ca = certs::CertificateAuthority::generate("test database CA", 1).unwrap();
    let leaf = ca
        .issue(&certs::LeafSpec::server("db.example", &["db.example"], &[], 1))
        .unwrap();
    let cluster = PgCluster::start_with_tls(&leaf.cert_pem, &leaf.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let key = UnsealKey::generate_key_file(&dir.path().join("unseal.key")).unwrap();
    let url = cluster.fresh_database();
    let tls = format!("{url}?sslmode=require&sslrootcert={}", ca_file.display());
    let err = PgStore::init(&tls, &key, &CreateOptions::new("node-1")).unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "{err}");
}
