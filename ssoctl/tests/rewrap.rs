//! `ssoctl rewrap` over a tree of envelopes sealed under three generations: everything
//! ends under the primary and still opens; a SIGKILL midway leaves every file old or new.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sso_client::Client;
use tests::OneServer;

const SSOCTL: &str = env!("CARGO_BIN_EXE_ssoctl");
const AAD: &[u8] = b"files/v1";

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).unwrap() {
        let sub = sub.unwrap().path();
        for f in std::fs::read_dir(&sub).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Every file opens to its expected plaintext; returns how many are under each key.
async fn check(client: &Client, dir: &Path, expected: &BTreeMap<PathBuf, Vec<u8>>) -> BTreeMap<String, usize> {
    let mut per_key = BTreeMap::new();
    for (path, plaintext) in expected {
        let bytes = std::fs::read(path).unwrap();
        let key = sso_proto::EnvelopeRef::parse(&bytes)
            .unwrap_or_else(|e| panic!("{} is broken: {e}", path.display()))
            .key_id;
        assert_eq!(
            &client.open(AAD, &bytes).await.unwrap(),
            plaintext,
            "{} opens to something else",
            path.display()
        );
        *per_key.entry(key.to_string()).or_insert(0) += 1;
    }
    let _ = dir;
    per_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_a_tree_to_the_primary_and_survives_sigkill() {
    let OneServer {
        dir: _dir,
        root,
        pki,
        server,
        ..
    } = tests::one_server();
    let d = root.as_path();
    let url = format!("https://localhost:{}", server.https.port());
    let cert = pki.client("client");
    let client = Client::builder()
        .endpoint(&url)
        .ca(&pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .build()
        .unwrap();
    let admin = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));

    // Three generations, 400 files each, in three directories.
    let tree = d.join("tree");
    let mut expected = BTreeMap::new();
    for generation in 0..3 {
        if generation > 0 {
            admin.rotate().await;
        }
        client.refresh().await.unwrap();
        let sub = tree.join(format!("gen{generation}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..400 {
            let path = sub.join(format!("{i:04}.env"));
            let plaintext = format!("file {generation}/{i}").into_bytes();
            std::fs::write(&path, client.seal(AAD, &plaintext).await.unwrap()).unwrap();
            expected.insert(path, plaintext);
        }
    }
    std::fs::write(tree.join("gen0/README.txt"), "not an envelope").unwrap();
    let before = check(&client, &tree, &expected).await;
    assert_eq!(before.len(), 3, "three generations expected: {before:?}");
    let primary = client.status().primary.unwrap().to_string();

    let admin_cert = pki.client("admin");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "--server".to_owned(),
            url.clone(),
            "--ca".into(),
            pki.ca_file.display().to_string(),
            "--cert".into(),
            admin_cert.cert.display().to_string(),
            "--key".into(),
            admin_cert.key.display().to_string(),
            "rewrap".into(),
            "--aad".into(),
            String::from_utf8_lossy(AAD).into_owned(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v.push(tree.display().to_string());
        v
    };

    // Kill it midway, several times: as soon as some (not all) files are rewrapped. After
    // each kill every file is old or new, never broken.
    let under_primary = || {
        files(&tree)
            .iter()
            .filter(|p| {
                std::fs::read(p)
                    .ok()
                    .and_then(|b| sso_proto::EnvelopeRef::parse(&b).ok().map(|e| e.key_id.to_string()))
                    == Some(primary.clone())
            })
            .count()
    };
    let mut kills = 0;
    for round in 1..=3 {
        let start_count = under_primary();
        let mut child = Command::new(SSOCTL)
            .args(args(&[]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while under_primary() < start_count + 40 && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        let counts = check(&client, &tree, &expected).await;
        assert!(
            counts.keys().all(|k| before.contains_key(k)),
            "a file is under an unexpected key: {counts:?}"
        );
        eprintln!("round {round}: {counts:?}");
    }
    assert!(
        kills >= 1,
        "rewrap finished before any kill landed: the test did not test anything"
    );
    let midway = check(&client, &tree, &expected).await;
    eprintln!("after {kills} SIGKILLs: {midway:?}");

    // A full run resumes and finishes; leftovers of killed runs are cleaned up.
    let started = Instant::now();
    let out = Command::new(SSOCTL).args(args(&["--json"])).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["not_envelopes"], 1);
    assert_eq!(report["failed"].as_array().unwrap().len(), 0);
    let after = check(&client, &tree, &expected).await;
    assert_eq!(
        after,
        BTreeMap::from([(primary.clone(), 1200)]),
        "not everything is under the primary"
    );
    assert!(
        files(&tree)
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".rewrap-tmp")),
        "temporary files left behind"
    );
    eprintln!("final run: {report} in {:?}", started.elapsed());

    // Nothing left to do on a second run.
    let out = Command::new(SSOCTL).args(args(&["--json"])).output().unwrap();
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (again["rewrapped"].as_u64(), again["already_current"].as_u64()),
        (Some(0), Some(1200))
    );
}
