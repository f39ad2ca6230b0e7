//! sso-agent: curl over the Unix socket seals and opens; uids outside the allowlist are
//! refused; a fresh agent started while the server is down answers `unavailable`, then
//! works once the server is back, without a restart.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use sso_proto::wire::ErrorBody;
use sso_proto::wire::agent::{AgentStatus, OpenAnswer, SealAnswer};
use tests::{Pki, ServerSetup, TestAgent, TestServer, bin, wire};

/// The status code and the body's text; read it with `wire::<T>` as the agent's
/// `sso_proto::wire::agent` type (or `ErrorBody`).
fn curl(socket: &Path, args: &[&str], uid: Option<u32>) -> (u16, String) {
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
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn agent_config(dir: &Path, pki: &Pki, port: u16, uids: &[u32]) -> std::path::PathBuf {
    let mut config = pki.agent_config("client", format!("https://localhost:{port}"), dir.join("agent.sock"));
    config.socket_mode = "0666".into();
    config.allowed_uids = uids.to_vec();
    let path = dir.join("agent.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
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
    let setup = ServerSetup::standard(&dir.path().join("a"), &pki, "node-a");
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
    assert_eq!(wire::<ErrorBody>(&body).error, "unavailable");
    let (_, status) = curl(&agent.socket, &["http://agent/v1/status"], None);
    assert_eq!(wire::<AgentStatus>(&status).status, "empty");

    // The server comes up: the same agent process starts working.
    let _server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let sealed = loop {
        let (code, body) = curl(&agent.socket, &seal, None);
        if code == 200 {
            break wire::<SealAnswer>(&body);
        }
        assert!(Instant::now() < deadline, "agent never recovered: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let envelope = &sealed.envelope;
    assert_eq!(sealed.key_id.len(), 32);
    let open_body = format!(r#"{{"envelope":"{envelope}","aad":"dGFibGU9dXNlcnM="}}"#);
    let (code, opened) = curl(
        &agent.socket,
        &["-X", "POST", "http://agent/v1/open", "-d", &open_body],
        None,
    );
    assert_eq!(code, 200, "{opened}");
    assert_eq!(
        wire::<OpenAnswer>(&opened).plaintext.expose_secret(),
        "aGVsbG8gd29ybGQ="
    );
    // Wrong AAD: refused as a bad envelope.
    let wrong = format!(r#"{{"envelope":"{envelope}","aad":"b3RoZXI="}}"#);
    let (code, err) = curl(
        &agent.socket,
        &["-X", "POST", "http://agent/v1/open", "-d", &wrong],
        None,
    );
    assert_eq!((code, wire::<ErrorBody>(&err).error.as_str()), (422, "bad_envelope"));
    let (code, _) = curl(
        &agent.socket,
        &["-X", "POST", "http://agent/v1/seal", "-d", "{not json"],
        None,
    );
    assert_eq!(code, 400);
    // A plaintext that is not a string is refused without being repeated (issue 10 §8).
    let (code, err) = curl(
        &agent.socket,
        &[
            "-X",
            "POST",
            "http://agent/v1/seal",
            "-d",
            r#"{"plaintext":987654321012}"#,
        ],
        None,
    );
    assert_eq!(code, 400, "{err}");
    // Deliberately the raw bytes: no field of the answer, however named, may repeat it.
    assert!(!err.contains("987654321012"), "{err}");

    // Another uid: refused by the allowlist (needs root to switch uid).
    if own_uid() == 0 {
        let (code, body) = curl(&agent.socket, &seal, Some(65534));
        assert_eq!(code, 403, "{body}");
        assert_eq!(wire::<ErrorBody>(&body).error, "forbidden");
    } else {
        eprintln!("not root: the other-uid case needs root to run curl as uid 65534");
    }
    let (_, status) = curl(&agent.socket, &["http://agent/v1/status"], None);
    assert_eq!(wire::<AgentStatus>(&status).status, "fresh");
    // The agent's socket has the configured mode.
    let mode = std::fs::metadata(&agent.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o666);
}

/// One seal over the agent's socket, by hand (no curl process in the timing): status and
/// the time from connect to the end of the answer.
fn timed_seal(socket: &Path) -> (u16, Duration) {
    use std::io::{Read, Write};
    let start = Instant::now();
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return (0, start.elapsed());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = r#"{"plaintext":"aGVsbG8gd29ybGQ="}"#;
    let request = format!(
        "POST /v1/seal HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(request.as_bytes()).is_err() {
        return (0, start.elapsed());
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let status = std::str::from_utf8(&answer)
        .ok()
        .and_then(|t| t.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, start.elapsed())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_local_flood_cannot_exhaust_the_agent_and_allowed_seals_stay_fast() {
    if own_uid() != 0 {
        eprintln!("not root: the flood needs root to run as other uids; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("a"), &pki, "node-a");
    let port = setup.pin_ports();
    let _server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
    // Root (this test) and uid 65533 may use the agent; 65534 may not.
    let config = agent_config(dir.path(), &pki, port, &[own_uid(), 65533]);
    let agent = TestAgent::start(&config, &dir.path().join("agent.log"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while timed_seal(&agent.socket).0 != 200 {
        assert!(Instant::now() < deadline, "agent never served a seal");
        std::thread::sleep(Duration::from_millis(200));
    }
    let fds_before = open_fds(agent.child.id());

    // The flooders: 2 x 10,000 connections from a refused uid, 1,000 from an allowed one.
    let flood = dir.path().join("sso-flood");
    std::fs::copy(bin("sso-flood"), &flood).unwrap();
    let mut flooders = Vec::new();
    for (uid, count) in [(65534, 10_000), (65534, 10_000), (65533, 1_000)] {
        let child = Command::new(&flood)
            .arg(&agent.socket)
            .arg(count.to_string())
            .arg("30")
            .uid(uid)
            .gid(uid)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        flooders.push((uid, child));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for (uid, child) in &mut flooders {
        let (uid, out, tx) = (*uid, child.stdout.take().unwrap(), tx.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let opened: usize = line
                    .strip_prefix("opened ")
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let _ = tx.send((uid, opened));
            }
        });
    }

    // Seal while the flood runs, then while its connections are held.
    let mut times = Vec::new();
    let mut reports = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reports.len() < flooders.len() {
        assert!(
            Instant::now() < deadline,
            "flooders did not finish opening: {reports:?}"
        );
        let (status, took) = timed_seal(&agent.socket);
        assert_eq!(
            status,
            200,
            "an allowed seal failed during the flood ({} so far)",
            times.len()
        );
        times.push(took);
        while let Ok(r) = rx.try_recv() {
            reports.push(r);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let during = times.len();
    let mut opening = times.clone();
    opening.sort();
    let fds_flooded = open_fds(agent.child.id());
    for _ in 0..10 {
        let (status, took) = timed_seal(&agent.socket);
        assert_eq!(
            status, 200,
            "an allowed seal failed while the flood's connections were held"
        );
        times.push(took);
    }
    for (_, child) in &mut flooders {
        let _ = child.kill();
        let _ = child.wait();
    }
    let refused_opened: usize = reports.iter().filter(|(u, _)| *u == 65534).map(|(_, n)| n).sum();
    let allowed_opened: usize = reports.iter().filter(|(u, _)| *u == 65533).map(|(_, n)| n).sum();
    times.sort();
    let (median, p90) = (times[times.len() / 2], times[times.len() * 9 / 10]);
    eprintln!(
        "flood: {refused_opened} connections from a refused uid, {allowed_opened} from an allowed one; \
         agent fds {fds_before} before, {fds_flooded} while held; {} seals, median {median:?}, p90 {p90:?}; \
         the {during} during the opening burst: median {:?}, max {:?}",
        times.len(),
        opening[opening.len() / 2],
        opening[opening.len() - 1],
    );
    assert!(refused_opened >= 19_000, "the flood did not happen: {reports:?}");
    assert!(
        allowed_opened >= 900,
        "the allowed uid's flood did not happen: {reports:?}"
    );
    assert!(
        fds_flooded < fds_before + 200,
        "the agent holds {fds_flooded} descriptors during the flood ({fds_before} before)"
    );
    assert!(median < Duration::from_millis(100), "median {median:?}: {times:?}");
    let opening_median = opening[opening.len() / 2];
    assert!(
        opening_median < Duration::from_millis(100),
        "median {opening_median:?} while the flood was opening its connections: {opening:?}"
    );
}

/// Issue 15: the agent's log on a full disk. tracing's writer reports a failed write with
/// `eprintln!`, which panics when stderr itself cannot be written: the agent died at its
/// first log line (the server had the same bug). With stderr on /dev/full (every write
/// fails with ENOSPC) and every log level on, the agent starts, seals and opens, and is
/// still running afterwards.
#[test]
fn the_agent_keeps_serving_when_its_log_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("a"), &pki, "node-a");
    let port = setup.pin_ports();
    let _server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
    let config = agent_config(dir.path(), &pki, port, &[own_uid()]);
    let mut agent = TestAgent::start_with_env(&config, Path::new("/dev/full"), &[("RUST_LOG", "trace")]);
    let seal = [
        "-X",
        "POST",
        "http://agent/v1/seal",
        "-d",
        r#"{"plaintext":"aGVsbG8="}"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    let sealed = loop {
        let (code, body) = curl(&agent.socket, &seal, None);
        if code == 200 {
            break wire::<SealAnswer>(&body);
        }
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the agent died: {code} {body}"
        );
        assert!(Instant::now() < deadline, "agent never sealed: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let open_body = format!(r#"{{"envelope":"{}"}}"#, sealed.envelope);
    for _ in 0..3 {
        let (code, opened) = curl(
            &agent.socket,
            &["-X", "POST", "http://agent/v1/open", "-d", &open_body],
            None,
        );
        assert_eq!(code, 200, "{opened}");
        assert_eq!(wire::<OpenAnswer>(&opened).plaintext.expose_secret(), "aGVsbG8=");
    }
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited");
}
