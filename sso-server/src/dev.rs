//! `--dev`: the embedded default of SPEC §9. Creates `sso-dev/` with a dev PKI, a key-file
//! store holding a first key, a first backup and its password, and a config that serves
//! on `127.0.0.1:7443`. Reuses the directory on later starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keystore::fsutil;
use keystore::{CreateOptions, KdfParams, SealedStore, Store as _, UnsealKey};
use ring::rand::SecureRandom;
use secrecy::SecretString;

use crate::config::{AuditConfig, Config, Pattern, RolesConfig, StoreConfig, TlsConfig, UnsealSource};

/// Setting up the dev directory failed.
#[derive(Debug, thiserror::Error)]
#[error("dev mode: {0}")]
pub struct DevError(String);

/// The HTTPS port of dev mode (`sso_devdir`, where sso-agent and ssoctl read it).
pub use sso_devdir::DEV_PORT;
/// The metrics port of dev mode.
pub const DEV_METRICS_PORT: u16 = 7444;

/// Makes sure `dir` holds a complete dev setup and returns its config file.
pub fn prepare(dir: &Path) -> Result<PathBuf, DevError> {
    let config = dir.join(sso_devdir::SERVER_CONFIG);
    if config.is_file() {
        return Ok(config);
    }
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(DevError(format!(
            "{} exists but has no {} (an interrupted first start?); remove it and start again",
            dir.display(),
            sso_devdir::SERVER_CONFIG
        )));
    }
    create(dir).map_err(|e| DevError(e.to_string()))?;
    Ok(config)
}

fn create(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let pki = certs::DevPki::generate()?;
    for file in pki.files() {
        let path = dir.join(file.name);
        if file.private {
            fsutil::write_private_new(&path, file.contents.as_bytes())?;
        } else {
            std::fs::write(&path, file.contents)?;
        }
    }
    fsutil::write_private_new(&dir.join("ca-key.pem"), pki.ca.key_pem().as_bytes())?;

    let key = UnsealKey::generate_key_file(&dir.join("unseal.key"))?;
    let mut store = SealedStore::create(&dir.join("store.db"), &key, &CreateOptions::new("dev"))?;
    store.rotate()?;

    let rng = ring::rand::SystemRandom::new();
    let mut raw = zeroize::Zeroizing::new([0u8; 18]);
    rng.fill(raw.as_mut())
        .map_err(|_| "the OS random number generator failed")?;
    let password = zeroize::Zeroizing::new(hex::encode(*raw));
    fsutil::write_private_new(&dir.join("backup-password"), format!("{}\n", *password).as_bytes())?;
    store.write_backup_file(
        &dir.join("backup.ssob"),
        &SecretString::from(password.as_str()),
        "in the file backup-password beside this backup",
        KdfParams::default(),
    )?;

    let toml = format!(
        "# sso-server dev configuration, written by `sso-server --dev`. Not for production:\n\
         # the CA key and the unseal key sit beside the store.\n{}",
        config().to_toml()
    );
    // Written last: its presence marks the directory complete.
    std::fs::write(dir.join(sso_devdir::SERVER_CONFIG), toml)?;
    Ok(())
}

/// The dev configuration, with paths relative to the dev directory.
fn config() -> Config {
    let cn = |name: &str| Pattern::Cn(name.into());
    let mut config = Config::new(
        "dev",
        SocketAddr::from(([127, 0, 0, 1], DEV_PORT)),
        TlsConfig::new("server.pem", "server-key.pem", sso_devdir::CA_CERT),
        StoreConfig {
            path: "store.db".into(),
            unseal: UnsealSource::KeyFile("unseal.key".into()),
        },
        AuditConfig::new("audit.log"),
        RolesConfig {
            client: vec![cn("client")],
            admin: vec![cn("admin")],
            peer: Vec::new(),
        },
    );
    config.metrics_listen = SocketAddr::from(([127, 0, 0, 1], DEV_METRICS_PORT));
    config
}

/// The commands that reach a dev server, printed at start.
pub fn banner(dir: &Path, https: std::net::SocketAddr, metrics: std::net::SocketAddr) -> String {
    use sso_devdir::{ADMIN_CERT, ADMIN_KEY, CA_CERT, CLIENT_CERT, CLIENT_KEY};
    let d = dir.display();
    let port = https.port();
    format!(
        "sso-server dev mode: serving https://localhost:{port} (metrics: http://{metrics}/metrics), files in {d}/\n\
         \n  curl --cacert {d}/{CA_CERT} --cert {d}/{CLIENT_CERT} --key {d}/{CLIENT_KEY} https://localhost:{port}/v1/keyring\
         \n  curl --cacert {d}/{CA_CERT} --cert {d}/{ADMIN_CERT} --key {d}/{ADMIN_KEY} -X POST https://localhost:{port}/v1/admin/rotate\
         \n  ssoctl --dev {d} status\
         \n  ssoctl --dev {d} rotate\n\
         \n  (no ssoctl on PATH? `cargo install --path ssoctl`, or `cargo run --release -p ssoctl -- --dev {d} status`)\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_config_reads_back_as_written() {
        let text = format!("# a comment\n{}", config().to_toml());
        assert_eq!(Config::parse(&text).unwrap(), config());
        // The settings SPEC §9 promises, spelled as before.
        for line in [
            "node = \"dev\"",
            "listen = \"127.0.0.1:7443\"",
            "metrics_listen = \"127.0.0.1:7444\"",
            "key_file = \"unseal.key\"",
            "client = [\"cn:client\"]",
            "admin = [\"cn:admin\"]",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
    }

    /// sso-agent --dev and ssoctl --dev open the dev PKI's files by sso-devdir's names:
    /// they must be the names the dev PKI is written under.
    #[test]
    fn the_dev_pki_is_written_under_the_names_the_agent_and_ssoctl_read() {
        let pki = certs::DevPki::generate().unwrap();
        let written: Vec<&str> = pki.files().iter().map(|f| f.name).collect();
        for name in [
            sso_devdir::CA_CERT,
            sso_devdir::ADMIN_CERT,
            sso_devdir::ADMIN_KEY,
            sso_devdir::CLIENT_CERT,
            sso_devdir::CLIENT_KEY,
        ] {
            assert!(written.contains(&name), "{name} is not among {written:?}");
        }
        assert_eq!(config().tls.client_ca, std::path::Path::new(sso_devdir::CA_CERT));
    }

    #[test]
    fn the_agent_and_ssoctl_find_the_dev_server_where_it_listens() {
        // sso-agent --dev and ssoctl --dev read the port from the file this writes.
        let dir = tempfile::tempdir().unwrap();
        let mut moved = config();
        moved.listen = SocketAddr::from(([127, 0, 0, 1], 9443));
        for (config, port) in [(config(), DEV_PORT), (moved, 9443)] {
            std::fs::write(dir.path().join(sso_devdir::SERVER_CONFIG), config.to_toml()).unwrap();
            assert_eq!(
                sso_devdir::dev_endpoint(dir.path()).unwrap(),
                format!("https://localhost:{port}")
            );
        }
    }
}
