//! TLS to the database: a throwaway PostgreSQL that admits TLS connections only, its
//! certificate issued by a test CA. The engine connects when the URL asks for TLS and names
//! that CA, and fails clearly otherwise.

use keystore::postgres::PgStore;
use keystore::{CreateOptions, Error, Store, UnsealKey};
use pg_throwaway::PgCluster;

#[test]
fn tls_when_the_url_asks_for_it_verified_against_the_named_ca() {
    let ca = certs::CertificateAuthority::generate("test database CA", 1).unwrap();
    let leaf = ca
        .issue(&certs::LeafSpec::server(
            "localhost",
            &["localhost"],
            &["127.0.0.1".parse().unwrap()],
            1,
        ))
        .unwrap();
    let cluster = PgCluster::start_with_tls(&leaf.cert_pem, &leaf.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let other = certs::CertificateAuthority::generate("another CA", 1).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.cert_pem()).unwrap();
    let key = UnsealKey::generate_key_file(&dir.path().join("unseal.key")).unwrap();
    let url = cluster.fresh_database();

    // The server rejects anything but TLS: a store that opens spoke TLS, verified.
    let tls = format!("{url}?sslmode=require&sslrootcert={}", ca_file.display());
    let (store, _) = PgStore::init(&tls, &key, &CreateOptions::new("node-1")).unwrap();
    assert_eq!(store.keyring().unwrap().keys.len(), 1);
    drop(store);
    assert_eq!(PgStore::open(&tls, &key, "node-2").unwrap().list().unwrap().len(), 1);

    // libpq's spelling of the same check (chain and host name) is accepted too: operators
    // write `verify-full` (docs/cluster.md); `verify-ca` (chain only) is refused, saying
    // that the host name is always checked.
    let full = format!("{url}?sslmode=verify-full&sslrootcert={}", ca_file.display());
    assert_eq!(PgStore::open(&full, &key, "node-2").unwrap().list().unwrap().len(), 1);
    let wrong_full = format!("{url}?sslmode=verify-full&sslrootcert={}", other_file.display());
    assert!(matches!(
        PgStore::open(&wrong_full, &key, "node-2"),
        Err(Error::Storage(_))
    ));
    let err = PgStore::open(
        &format!("{url}?sslmode=verify-ca&sslrootcert={}", ca_file.display()),
        &key,
        "node-2",
    )
    .unwrap_err();
    assert!(err.to_string().contains("verify-full"), "{err}");

    // Without TLS the server refuses (hostnossl reject): a storage error with a remedy.
    let err = PgStore::open(&format!("{url}?sslmode=disable"), &key, "node-2").unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "{err}");
    // A certificate from another CA fails verification.
    let wrong = format!("{url}?sslmode=require&sslrootcert={}", other_file.display());
    let err = PgStore::open(&wrong, &key, "node-2").unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "{err}");
    // sslmode=require without a CA is refused before connecting, saying what to add.
    let err = PgStore::open(&format!("{url}?sslmode=require"), &key, "node-2").unwrap_err();
    assert!(err.to_string().contains("sslrootcert"), "{err}");
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
