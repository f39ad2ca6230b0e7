//! `sso-server --dev`: the README's first command. curl with the dev client certificate
//! gets the keyring, curl without one is refused, and a restart reuses the directory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_sso-server");

fn start(cwd: &Path) -> (Child, String) {
    if std::net::TcpStream::connect("127.0.0.1:7443").is_ok() {
        panic!("port 7443 is taken by another process: stop it (dev mode serves on 7443 by contract)");
    }
    let mut child = Command::new(BIN)
        .arg("--dev")
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut banner = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("ssoctl --dev") && line.contains("rotate") {
                let _ = tx.send(banner.clone());
            }
        }
    });
    let banner = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("dev server did not print its banner");
    (child, banner)
}

fn curl(cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "dev server exited with {status}");
}

#[test]
fn dev_mode_serves_curl_and_reuses_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (child, banner) = start(cwd);
    // The names sso-agent --dev and ssoctl --dev read are sso-devdir's.
    for file in [
        sso_devdir::CA_CERT,
        "server.pem",
        "server-key.pem",
        sso_devdir::ADMIN_CERT,
        sso_devdir::ADMIN_KEY,
        sso_devdir::CLIENT_CERT,
        sso_devdir::CLIENT_KEY,
        sso_devdir::SERVER_CONFIG,
        "store.db",
        "unseal.key",
        "backup.ssob",
        "backup-password",
    ] {
        assert!(cwd.join("sso-dev").join(file).is_file(), "sso-dev/{file} missing");
    }
    assert!(banner.contains("curl --cacert sso-dev/ca.pem --cert sso-dev/client.pem --key sso-dev/client-key.pem https://localhost:7443/v1/keyring"), "{banner}");

    let with_cert = curl(
        cwd,
        &[
            "--cacert",
            "sso-dev/ca.pem",
            "--cert",
            "sso-dev/client.pem",
            "--key",
            "sso-dev/client-key.pem",
            "https://localhost:7443/v1/keyring",
        ],
    );
    assert!(
        with_cert.status.success(),
        "{}",
        String::from_utf8_lossy(&with_cert.stderr)
    );
    let ring: serde_json::Value = serde_json::from_slice(&with_cert.stdout).unwrap();
    let primary = ring["primary"].as_str().unwrap().to_owned();
    assert_eq!(ring["keys"].as_array().unwrap().len(), 1);

    let without = curl(
        cwd,
        &["--cacert", "sso-dev/ca.pem", "https://localhost:7443/v1/keyring"],
    );
    assert!(!without.status.success(), "curl without a certificate got an answer");
    assert!(without.stdout.is_empty());
    stop(child);

    // Second start: same CA, same key.
    let ca_before = std::fs::read(cwd.join("sso-dev/ca.pem")).unwrap();
    let (child, _) = start(cwd);
    let again = curl(
        cwd,
        &[
            "--cacert",
            "sso-dev/ca.pem",
            "--cert",
            "sso-dev/client.pem",
            "--key",
            "sso-dev/client-key.pem",
            "https://localhost:7443/v1/keyring",
        ],
    );
    let ring: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(ring["primary"], primary.as_str());
    assert_eq!(std::fs::read(cwd.join("sso-dev/ca.pem")).unwrap(), ca_before);
    stop(child);
}
