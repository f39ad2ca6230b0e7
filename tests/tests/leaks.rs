//! Leak checks over a representative run (a pair at debug log level, rotations, client
//! fetches, a backup through the API, an agent sealing and opening): no key byte in any
//! log line, in the audit logs or in the store files; processes refuse core dumps;
//! every secret-bearing file is 0600. The scanner proves itself on a deliberate leak.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use sso_client::Client;
use tests::pair::Pair;

/// Every way key bytes could be spelled in a file.
fn needles(key: &[u8]) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![
        key.to_vec(),
        hex::encode(key).into_bytes(),
        hex::encode_upper(key).into_bytes(),
        b64.encode(key).into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(key)
            .into_bytes(),
        format!("{:?}", &key[..12]).into_bytes()[..40].to_vec(),
    ]
}

/// The files among `files` in which any key appears.
fn leaks(files: &[PathBuf], keys: &[Vec<u8>]) -> Vec<String> {
    let mut found = Vec::new();
    for f in files {
        let Ok(bytes) = std::fs::read(f) else { continue };
        for k in keys {
            for n in needles(k) {
                if bytes.windows(n.len()).any(|w| w == n.as_slice()) {
                    found.push(format!("{} contains a key ({} bytes of needle)", f.display(), n.len()));
                }
            }
        }
    }
    found
}

fn core_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_in_logs_audit_or_store_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::new(dir.path());
    for node in [&pair.a, &pair.b] {
        node.setup.edit(|c| c.log.level = "debug".into());
    }
    pair.a.start();
    pair.b.start();
    let cert = pair.pki.client("client");
    let client = Client::builder()
        .endpoint(pair.a.url())
        .endpoint(pair.b.url())
        .ca(&pair.pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.refresh().await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = pair.admin(&pair.a);
    for _ in 0..3 {
        admin.rotate().await;
    }
    let backup = admin
        .post(
            "/v1/admin/backup",
            &serde_json::json!({"password": "leak test password", "hint": "h"}),
        )
        .await
        .unwrap();
    assert_eq!(backup.status, 200);
    std::fs::write(dir.path().join("backup.ssob"), &backup.body).unwrap();

    // An agent in the same run, sealing and opening.
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        pair.pki
            .agent_config("client2", pair.a.url(), dir.path().join("agent.sock"))
            .to_toml(),
    )
    .unwrap();
    let agent = tests::TestAgent::start(&agent_config, &dir.path().join("agent.log"));
    let out = std::process::Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&agent.socket)
        .args([
            "-X",
            "POST",
            "http://agent/v1/seal",
            "-d",
            r#"{"plaintext":"aGVsbG8="}"#,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tests::wire::<sso_proto::wire::agent::SealAnswer>(&String::from_utf8_lossy(&out.stdout));

    // Every key the run produced, from the client's cache.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.refresh().await.unwrap();
    let ring = tests::Client::new(pair.a.server().https, &pair.pki.ca_file, Some(&cert))
        .get("/v1/keyring")
        .await
        .unwrap()
        .json();
    let mut keys = Vec::new();
    for k in ring["keys"].as_array().unwrap() {
        let id: sso_client::KeyId = k["key_id"].as_str().unwrap().parse().unwrap();
        keys.push(client.key(id).await.unwrap().expose_secret().to_vec());
    }
    assert!(keys.len() >= 4);

    // Processes refuse core dumps.
    for pid in [pair.a.server().pid(), pair.b.server().pid(), agent.child.id()] {
        assert_eq!(core_limit(pid), "0 0", "process {pid} may dump core");
    }
    // Stop everything so logs are complete, then scan every file the run wrote.
    drop(agent);
    pair.a.kill();
    pair.b.kill();
    let mut files = Vec::new();
    all_files(dir.path(), &mut files);
    let logs: Vec<&PathBuf> = files.iter().filter(|f| f.to_string_lossy().ends_with(".log")).collect();
    assert!(logs.len() >= 5, "expected server, audit and agent logs: {logs:?}");
    let debug_lines: usize = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default().matches("DEBUG").count())
        .sum();
    assert!(debug_lines > 0, "nothing was logged at debug level");
    let found = leaks(&files, &keys);
    assert!(found.is_empty(), "{found:#?}");

    // Secret-bearing files are private.
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let secret =
            name.starts_with("store.db") || name == "unseal.key" || name == "audit.log" || name.ends_with("-key.pem");
        if secret {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", f.display());
        }
    }

    // Self-check: a key deliberately logged is found.
    let planted = dir.path().join("planted.log");
    std::fs::write(&planted, format!("DEBUG oops key={}\n", hex::encode(&keys[0]))).unwrap();
    assert!(
        !leaks(std::slice::from_ref(&planted), &keys).is_empty(),
        "the scanner missed a deliberately logged key"
    );
    std::fs::write(
        &planted,
        format!(
            "INFO key={}\n",
            base64::engine::general_purpose::STANDARD.encode(&keys[1])
        ),
    )
    .unwrap();
    // (Standard and URL-safe base64 can both match the same text: at least one must.)
    assert!(!leaks(&[planted], &keys).is_empty(), "the scanner missed a base64 key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_test_checks_its_server_log_for_keys() {
    // TestServer's drop scans the server's log and audit log for every key in its store;
    // prove it would catch a key that got logged.
    let tests::OneServer {
        dir: _dir,
        pki,
        mut server,
        ..
    } = tests::one_server();
    let ring = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("client")))
        .get("/v1/keyring")
        .await
        .unwrap()
        .json();
    server.kill();
    assert_eq!(server.key_material_in_logs(), None, "a clean run reported a leak");
    let clean = std::fs::read_to_string(&server.log).unwrap();
    std::fs::write(
        &server.log,
        format!(
            "{clean}DEBUG planted key={}\n",
            ring["keys"][0]["key"].as_str().unwrap()
        ),
    )
    .unwrap();
    let found = server.key_material_in_logs();
    assert!(
        found.is_some_and(|f| f.contains("leaked into")),
        "the drop check missed a planted key"
    );
    std::fs::write(&server.log, clean).unwrap();
}
