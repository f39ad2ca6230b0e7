//! `sso-devdir`: what `sso-server --dev DIR`, `sso-agent --dev DIR` and `ssoctl --dev DIR`
//! agree on about the dev directory, written once: the dev server's port and where the
//! other two find it ([`dev_endpoint`]), and the names of the files and sockets more than
//! one of them (or their tests) reads there.
//!
//! Its own small crate (serde and toml, nothing of ours) because the three binaries that
//! read the directory may not link each other: ssoctl links neither daemon, the agent
//! does not link the server's config crate (which would bring keystore), and the daemons'
//! shared crate (`sso-daemon`) reads no config file (`tests/tests/layering.rs`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::path::Path;

use serde::Deserialize;

/// The HTTPS port `sso-server --dev` serves on unless its `server.toml` says otherwise.
pub const DEV_PORT: u16 = 7443;

/// The dev server's config file in the dev directory; written last by `sso-server --dev`,
/// so its presence marks the directory complete.
pub const SERVER_CONFIG: &str = "server.toml";

/// The CA certificate of the dev PKI (`certs::DevPki` writes it), which the agent and
/// ssoctl trust.
pub const CA_CERT: &str = "ca.pem";
/// The dev PKI's `admin` client certificate, ssoctl's identity with `--dev`.
pub const ADMIN_CERT: &str = "admin.pem";
/// Its private key.
pub const ADMIN_KEY: &str = "admin-key.pem";
/// The dev PKI's `client` client certificate, the agent's identity with `--dev`.
pub const CLIENT_CERT: &str = "client.pem";
/// Its private key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// The socket `sso-agent --dev` serves HTTP/JSON on.
pub const AGENT_SOCKET: &str = "agent.sock";
/// The socket `sso-agent --dev` serves Kubernetes KMS v2 on.
pub const KMS_SOCKET: &str = "kms.sock";

/// The URL of the dev server whose files are in `dir`: the port of `listen` in
/// `DIR/server.toml` (an operator may have moved it), or [`DEV_PORT`] before the dev
/// server has written that file. Used by `sso-agent --dev` and `ssoctl --dev`; the host is
/// `localhost`, the name the dev server certificate carries.
pub fn dev_endpoint(dir: &Path) -> Result<String, String> {
    let path = dir.join(SERVER_CONFIG);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(format!("https://localhost:{DEV_PORT}")),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    endpoint_from_config(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The dev server's URL from the text of its `server.toml` (what [`dev_endpoint`] reads):
/// the port of `listen`, on `localhost`. Pure, for the fuzz target
/// (`fuzz/fuzz_targets/dev_endpoint.rs`): the file is outside input to the agent and ssoctl.
pub fn endpoint_from_config(text: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Listen {
        listen: String,
    }
    let listen: Listen = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    let port = listen
        .listen
        .parse::<std::net::SocketAddr>()
        .map_err(|e| format!("listen = {:?}: {e}", listen.listen))?
        .port();
    // The dev server certificate names localhost, not the address.
    Ok(format!("https://localhost:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_the_server_wrote_its_config_the_endpoint_is_the_default_port() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(dev_endpoint(dir.path()).unwrap(), "https://localhost:7443");
    }

    #[test]
    fn the_endpoint_follows_the_port_server_toml_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(SERVER_CONFIG),
            "node = \"dev\"\nlisten = \"127.0.0.1:9443\"\n[tls]\ncert = \"server.pem\"\n",
        )
        .unwrap();
        assert_eq!(dev_endpoint(dir.path()).unwrap(), "https://localhost:9443");
    }

    /// The pure parser the fuzz target runs gives what the file reader gives, without the
    /// file's name.
    #[test]
    fn the_text_alone_gives_the_endpoint_or_an_error() {
        assert_eq!(
            endpoint_from_config("listen = \"[::1]:9443\"\n").unwrap(),
            "https://localhost:9443"
        );
        let e = endpoint_from_config("listen = \"nowhere\"\n").unwrap_err();
        assert!(e.starts_with("listen = \"nowhere\""), "{e}");
        assert!(endpoint_from_config("node = \"dev\"\n").is_err());
        assert!(endpoint_from_config("\u{0}").is_err());
    }

    #[test]
    fn a_broken_server_toml_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SERVER_CONFIG);
        for text in ["listen = \"nowhere\"\n", "node = \"dev\"\n", "listen = \n"] {
            std::fs::write(&path, text).unwrap();
            let e = dev_endpoint(dir.path()).unwrap_err();
            assert!(e.starts_with(&path.display().to_string()), "{text:?}: {e}");
        }
        // A directory where the file should be: not "not found", so not the default.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(dev_endpoint(dir.path()).is_err());
    }
}
