//! sso-agent: curl over the Unix socket seals and opens; uids outside the allowlist are
//! refused; a fresh agent started while the server is down answers `unavailable`, then
//! works once the server is back, without a restart.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{Pki, ServerSetup, TestAgent, TestServer, bin};

fn curl(socket: &Path, args: &[&str], uid: Option<u32>) -> (u16, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args(args);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn agent_config(dir: &Path, pki: &Pki, port: u16, uids: &[u32]) -> std::path::PathBuf {
    let cert = pki.client("client");
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "endpoints = [\"https://localhost:{port}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nsocket = \"{}\"\nsocket_mode = \"0666\"\nallowed_uids = {:?}\n",
            pki.ca_file.display(),
            cert.cert.display(),
            cert.key.display(),
            dir.join("agent.sock").display(),
            uids
        ),
    )
    .unwrap();
    path
}

fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[test]
fn curl_seals_and_opens_through_the_agent_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The socket's directory must be reachable by the other uid, so that it is the
    // allowlist, not the file system, that refuses it.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::new(&dir.path().join("a"), &pki, "node-a", "", "");
    let port = setup.pin_ports();

    // Fresh agent, server down: unavailable.
    let config = agent_config(dir.path(), &pki, port, &[own_uid()]);
    let agent = TestAgent::start(&config, &dir.path().join("agent.log"));
    let seal = [
        "-X",
        "POST",
        "http://agent/v1/seal",
        "-d",
        r#"{"plaintext":"aGVsbG8gd29ybGQ=","aad":"dGFibGU9dXNlcnM="}"#,
    ];
    let (code, body) = curl(&agent.socket, &seal, None);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"], "unavailable");
    let (_, status) = curl(&agent.socket, &["http://agent/v1/status"], None);
    assert_eq!(status["status"], "empty");

    // The server comes up: the same agent process starts working.
    let _server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let sealed = loop {
        let (code, body) = curl(&agent.socket, &seal, None);
        if code == 200 {
            break body;
        }
        assert!(Instant::now() < deadline, "agent never recovered: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let envelope = sealed["envelope"].as_str().unwrap();
    assert_eq!(sealed["key_id"].as_str().unwrap().len(), 32);
    let open_body = format!(r#"{{"envelope":"{envelope}","aad":"dGFibGU9dXNlcnM="}}"#);
    let (code, opened) = curl(
        &agent.socket,
        &["-X", "POST", "http://agent/v1/open", "-d", &open_body],
        None,
    );
    assert_eq!(code, 200, "{opened}");
    assert_eq!(opened["plaintext"], "aGVsbG8gd29ybGQ=");
    // Wrong AAD: refused as a bad envelope.
    let wrong = format!(r#"{{"envelope":"{envelope}","aad":"b3RoZXI="}}"#);
    let (code, err) = curl(
        &agent.socket,
        &["-X", "POST", "http://agent/v1/open", "-d", &wrong],
        None,
    );
    assert_eq!((code, err["error"].as_str()), (422, Some("bad_envelope")));
    let (code, _) = curl(
        &agent.socket,
        &["-X", "POST", "http://agent/v1/seal", "-d", "{not json"],
        None,
    );
    assert_eq!(code, 400);

    // Another uid: refused by the allowlist (needs root to switch uid).
    if own_uid() == 0 {
        let (code, body) = curl(&agent.socket, &seal, Some(65534));
        assert_eq!(code, 403, "{body}");
        assert_eq!(body["error"], "forbidden");
    } else {
        eprintln!("not root: the other-uid case needs root to run curl as uid 65534");
    }
    let (_, status) = curl(&agent.socket, &["http://agent/v1/status"], None);
    assert_eq!(status["status"], "fresh");
    // The agent's socket has the configured mode.
    let mode = std::fs::metadata(&agent.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o666);
}
