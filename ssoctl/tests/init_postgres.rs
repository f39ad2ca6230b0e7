//! `ssoctl init --store postgresql://...` against a real throwaway PostgreSQL: the schema,
//! the first key and the mandatory first backup; a second node needs only the URL and the
//! unseal secret; init never overwrites; `--join` is for a pair's SQLite store.

use std::process::Command;

use keystore::postgres::PgStore;
use keystore::{Store, UnsealKey};
use pg_throwaway::PgCluster;

const SSOCTL: &str = env!("CARGO_BIN_EXE_ssoctl");

fn ssoctl(args: &[&str]) -> (i32, String, String) {
    ssoctl_with_env(args, &[])
}

fn ssoctl_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(SSOCTL)
        .args(args)
        .env_remove("SSOCTL_STORE")
        .env_remove("SSOCTL_SERVER")
        .env_remove("SSOCTL_DEV")
        .env_remove("SSOCTL_BACKUP_PASSWORD")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn init_with_a_postgresql_url_creates_the_schema_the_first_key_and_the_first_backup() {
    let cluster = PgCluster::start();
    let url = cluster.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key_file = d.join("unseal.key").display().to_string();
    let pw = d.join("backup.pw");
    std::fs::write(&pw, "first backup password").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let pw = pw.display().to_string();
    let backup = d.join("first.ssob").display().to_string();

    // The URL, password included, from SSOCTL_STORE: a password on the command line is
    // visible to every user of the machine (ps). This server trusts loopback, so the
    // password is never asked for; it must not be shown either.
    let with_password = url.replacen("postgres@", "postgres:s3cret-db-pw@", 1);
    let (code, stdout, stderr) = ssoctl_with_env(
        &[
            "init",
            "--node",
            "node-1",
            "--key-file",
            &key_file,
            "--backup-out",
            &backup,
            "--password-file",
            &pw,
        ],
        &[("SSOCTL_STORE", &with_password)],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("postgresql://"), "{stdout}");
    assert!(
        !format!("{stdout}{stderr}").contains("s3cret-db-pw"),
        "{stdout}{stderr}"
    );
    assert!(d.join("first.ssob").is_file(), "no first backup");

    // Another node: the URL and the unseal secret, nothing else.
    let key = UnsealKey::key_file(&d.join("unseal.key")).unwrap();
    let store = PgStore::open(&url, &key, "node-2").unwrap();
    let keyring = store.keyring().unwrap();
    assert_eq!(keyring.keys.len(), 1);
    assert_eq!(keyring.keys[0].meta.origin, "node-1");
    assert!(
        store.status().unwrap().not_backed_up.is_empty(),
        "the first backup was not recorded"
    );

    // init never overwrites a store.
    let (code, _, stderr) = ssoctl(&[
        "init",
        "--store",
        &url,
        "--node",
        "node-1",
        "--key-file",
        &key_file,
        "--backup-out",
        &d.join("second.ssob").display().to_string(),
        "--password-file",
        &pw,
    ]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");

    // --join is the pair's second SQLite store; a cluster's nodes share the database.
    let (code, _, stderr) = ssoctl(&[
        "init",
        "--store",
        &cluster.fresh_database(),
        "--node",
        "node-2",
        "--key-file",
        &key_file,
        "--join",
    ]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
}

/// A database that is down is unavailable (69, EX_UNAVAILABLE: SPEC 8's "unavailable";
/// retrying once it is up helps), not an internal error (70, before) nor a disk to fix (74).
#[test]
fn init_against_a_database_that_is_down_exits_unavailable_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://postgres@127.0.0.1:{port}/sso");
    let pw = d.join("backup.pw");
    std::fs::write(&pw, "first backup password").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, _, stderr) = ssoctl(&[
        "init",
        "--store",
        &url,
        "--node",
        "node-1",
        "--key-file",
        &d.join("unseal.key").display().to_string(),
        "--backup-out",
        &d.join("first.ssob").display().to_string(),
        "--password-file",
        &pw.display().to_string(),
    ]);
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("error: ") && stderr.contains("PostgreSQL"), "{stderr}");
    assert!(
        stderr.contains("hint: ") && stderr.contains("database"),
        "the hint does not say what to do about the database: {stderr}"
    );
    assert!(!d.join("first.ssob").exists(), "a backup was written");
}

#[test]
fn doctor_does_not_check_a_postgresql_store_as_a_local_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = tests::Pki::new(&d.join("pki"));
    let setup = tests::ServerSetup::standard(&d.join("node"), &pki, "node-1");
    let key_file = d.join("unseal.key");
    UnsealKey::generate_key_file(&key_file).unwrap();
    let url = "postgresql://sso@127.0.0.1:9/sso";
    setup.use_store(std::path::Path::new(url), &key_file);
    let (_, stdout, stderr) = ssoctl(&["doctor", "--config", &setup.config.display().to_string()]);
    let text = format!("{stdout}{stderr}");
    assert!(text.contains("loads and validates"), "{text}");
    for line in text.lines().filter(|l| l.contains("postgresql://")) {
        assert!(
            !line.starts_with("fail") && !line.starts_with("warn"),
            "doctor checked the database URL as a file: {line}"
        );
    }
}
