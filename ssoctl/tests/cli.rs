//! ssoctl against real processes, with its output pinned in golden files
//! (`tests/snapshots/*.txt`; regenerate with `SNAPSHOTS=overwrite cargo test -p ssoctl`).
//! Variable parts (paths, ports, key ids, times, hashes) are normalised first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tests::{Pki, ServerSetup, TestServer, bin};

const SSOCTL: &str = env!("CARGO_BIN_EXE_ssoctl");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ssoctl(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(SSOCTL);
    cmd.args(args)
        .env_remove("SSOCTL_SERVER")
        .env_remove("SSOCTL_DEV")
        .env_remove("SSOCTL_BACKUP_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output { status, stdout, stderr } = cmd.output().unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into(),
        stderr: String::from_utf8_lossy(&stderr).into(),
    }
}

/// Replaces what changes between runs with placeholders.
fn normalise(text: &str, dir: &Path) -> String {
    let mut out = text.replace(&dir.display().to_string(), "<DIR>");
    let mut result = String::with_capacity(out.len());
    // Hex runs of 16+ characters (key ids, hashes) → <HEX>; digits after "localhost:" → <PORT>.
    let chars: Vec<char> = out.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let run = chars[i..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if run >= 16 {
            result.push_str("<HEX>");
            i += run;
            continue;
        }
        result.push(chars[i]);
        i += 1;
    }
    out = result;
    out = mask_ports(&out);
    // RFC 3339 times and ages.
    out.lines()
        .map(|l| {
            if l.starts_with("audit ") && l.contains(" entries") {
                "audit <N> entries, head <HEX>"
            } else {
                l
            }
        })
        .map(|l| {
            let l = if let Some(i) = l.find("20") {
                if l[i..].len() >= 20 && l[i..].chars().nth(4) == Some('-') && l[i..].chars().nth(10) == Some('T') {
                    format!("{}<TIME>{}", &l[..i], &l[i + 20..])
                } else {
                    l.to_owned()
                }
            } else {
                l.to_owned()
            };
            l.split(' ')
                .filter(|w| !w.is_empty())
                .map(|w| {
                    if w.len() <= 4
                        && w.ends_with(['s', 'm', 'h', 'd'])
                        && w[..w.len() - 1].chars().all(|c| c.is_ascii_digit())
                        && w.len() > 1
                    {
                        "<AGE>"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `localhost:1234` → `localhost:<PORT>`.
fn mask_ports(s: &str) -> String {
    let mut o = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find("localhost:") {
        o.push_str(&rest[..pos + 10]);
        rest = &rest[pos + 10..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits > 0 {
            o.push_str("<PORT>");
            rest = &rest[digits..];
        }
    }
    o.push_str(rest);
    o
}

fn snapshot(name: &str, run: &Run, dir: &Path) {
    let text = format!(
        "exit: {}\n--- stdout\n{}\n--- stderr\n{}\n",
        run.code,
        normalise(run.stdout.trim_end(), dir),
        normalise(run.stderr.trim_end(), dir)
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    // Under CI a missing snapshot is a failure, not a freshly written pass: otherwise a
    // snapshot never committed would make its test vacuous on every clean clone.
    if !path.exists() && std::env::var_os("CI").is_some() {
        panic!(
            "snapshot {} is missing: run the test locally and commit the file",
            path.display()
        );
    }
    if std::env::var("SNAPSHOTS").as_deref() == Ok("overwrite") || !path.exists() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text, expected,
        "snapshot {name} differs; if intended, rerun with SNAPSHOTS=overwrite"
    );
}

fn pw_file(dir: &Path, name: &str, pw: &str) -> String {
    let p = dir.join(name);
    keystore::fsutil::write_private_new(&p, format!("{pw}\n").as_bytes()).unwrap();
    p.display().to_string()
}

#[test]
fn help_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    snapshot("help", &ssoctl(&["--help"], &[]), d);
    snapshot("keys_help", &ssoctl(&["keys", "--help"], &[]), d);
    let r = ssoctl(&["frobnicate"], &[]);
    assert_eq!(r.code, 64);
    snapshot("unknown_command", &r, d);
    let r = ssoctl(&["status"], &[]);
    assert_eq!(r.code, 64);
    snapshot("status_without_server", &r, d);
    let r = ssoctl(&["--dev", "/nonexistent", "keys", "retire", "nothex"], &[]);
    assert_eq!(r.code, 64, "{}", r.stderr);
    snapshot("bad_key_id", &r, d);
    let r = ssoctl(&["backup-hint", &d.join("missing.ssob").display().to_string()], &[]);
    assert_eq!(r.code, 66);
    snapshot("backup_hint_missing", &r, d);
    std::fs::write(d.join("junk.ssob"), b"definitely not a backup").unwrap();
    let r = ssoctl(&["backup-hint", &d.join("junk.ssob").display().to_string()], &[]);
    assert_eq!(r.code, 65);
    snapshot("backup_hint_junk", &r, d);
    let r = ssoctl(&["completions", "bash"], &[]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("ssoctl"));
}

#[test]
fn global_flags_go_before_or_after_the_subcommand() {
    let before = ssoctl(&["--dev", "/nonexistent-dev", "status"], &[]);
    let after = ssoctl(&["status", "--dev", "/nonexistent-dev"], &[]);
    assert_eq!(before.code, 66, "{}", before.stderr);
    assert_eq!((before.code, before.stderr), (after.code, after.stderr));
}

#[test]
fn init_then_server_then_rotate_list_backup_and_restore_into_a_fresh_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(&d.join("pki"));
    // init: a store with its first key and a first backup that must exist afterwards.
    let backup_pw = pw_file(d, "backup.pw", "first backup password");
    let store = d.join("node").join("store.db");
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    let r = ssoctl(
        &[
            "init",
            "--store",
            &store.display().to_string(),
            "--node",
            "node-a",
            "--key-file",
            &d.join("node/unseal.key").display().to_string(),
            "--backup-out",
            &d.join("first.ssob").display().to_string(),
            "--password-file",
            &backup_pw,
            "--hint",
            "the first one",
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    snapshot("init", &r, d);
    assert!(d.join("first.ssob").is_file());
    // init refuses to overwrite.
    let again = ssoctl(
        &[
            "init",
            "--store",
            &store.display().to_string(),
            "--node",
            "x",
            "--key-file",
            &d.join("node/unseal.key").display().to_string(),
            "--backup-out",
            &d.join("second.ssob").display().to_string(),
            "--password-file",
            &backup_pw,
        ],
        &[],
    );
    assert_eq!(again.code, 64, "{}", again.stderr);

    // A server on that store.
    let setup = ServerSetup::standard(&d.join("cfg"), &pki, "node-a");
    setup.use_store(&store, &d.join("node/unseal.key"));
    let server = TestServer::start(&bin("sso-server"), &setup.config, &d.join("a.log"));
    let admin = pki.client("admin");
    let url = format!("https://localhost:{}", server.https.port());
    let conn = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--server".into(),
            url.clone(),
            "--ca".into(),
            pki.ca_file.display().to_string(),
            "--cert".into(),
            admin.cert.display().to_string(),
            "--key".into(),
            admin.key.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let run =
        |args: Vec<String>, env: &[(&str, &str)]| ssoctl(&args.iter().map(String::as_str).collect::<Vec<_>>(), env);

    let rotated = run(conn(&["--json", "rotate"]), &[]);
    assert_eq!(rotated.code, 0, "{}", rotated.stderr);
    let new: serde_json::Value = serde_json::from_str(&rotated.stdout).unwrap();
    let new_id = new["key_id"].as_str().unwrap().to_owned();
    let list = run(conn(&["keys", "list"]), &[]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.starts_with(&new_id) && l.contains("primary")),
        "{}",
        list.stdout
    );
    snapshot("keys_list", &list, d);
    snapshot("status", &run(conn(&["status"]), &[]), d);

    let pw = pw_file(d, "b.pw", "a good backup password");
    let out = d.join("full.ssob");
    let b = run(
        conn(&[
            "--password-file",
            &pw,
            "backup",
            "--out",
            &out.display().to_string(),
            "--hint",
            "b.pw",
        ]),
        &[],
    );
    assert_eq!(b.code, 0, "{}", b.stderr);
    snapshot("backup", &b, d);
    let hint = ssoctl(&["backup-hint", &out.display().to_string()], &[]);
    snapshot("backup_hint", &hint, d);

    // Error paths, each with its own exit code and a hint.
    let wrong = pw_file(d, "wrong.pw", "not the password");
    let r = run(
        conn(&["--password-file", &wrong, "restore", "--in", &out.display().to_string()]),
        &[],
    );
    assert_eq!(r.code, 77);
    snapshot("restore_wrong_password", &r, d);
    let mut tampered = std::fs::read(&out).unwrap();
    let n = tampered.len();
    tampered[n - 5] ^= 1;
    std::fs::write(d.join("tampered.ssob"), &tampered).unwrap();
    let r = run(
        conn(&[
            "--password-file",
            &pw,
            "restore",
            "--in",
            &d.join("tampered.ssob").display().to_string(),
        ]),
        &[],
    );
    assert_eq!(r.code, 65);
    snapshot("restore_tampered", &r, d);
    let other = Pki::new(&d.join("other"));
    let stranger = other.client("admin");
    let r = ssoctl(
        &[
            "--server",
            &url,
            "--ca",
            &pki.ca_file.display().to_string(),
            "--cert",
            &stranger.cert.display().to_string(),
            "--key",
            &stranger.key.display().to_string(),
            "status",
        ],
        &[],
    );
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("hint:"));
    let client = pki.client("client");
    let r = ssoctl(
        &[
            "--server",
            &url,
            "--ca",
            &pki.ca_file.display().to_string(),
            "--cert",
            &client.cert.display().to_string(),
            "--key",
            &client.key.display().to_string(),
            "rotate",
        ],
        &[],
    );
    assert_eq!(r.code, 77);
    snapshot("rotate_not_admin", &r, d);
    let r = run(conn(&["keys", "retire", &new_id]), &[]);
    assert_eq!(r.code, 64);
    snapshot("retire_primary", &r, d);
    let r = run(conn(&["keys", "destroy", &"ab".repeat(16), "--yes"]), &[]);
    assert_eq!(r.code, 66, "{}", r.stderr);

    // Restore into a fresh store: a second node with its own first key.
    let store_b = d.join("node-b").join("store.db");
    std::fs::create_dir_all(store_b.parent().unwrap()).unwrap();
    let r = ssoctl(
        &[
            "init",
            "--store",
            &store_b.display().to_string(),
            "--node",
            "node-b",
            "--key-file",
            &d.join("node-b/unseal.key").display().to_string(),
            "--backup-out",
            &d.join("b-first.ssob").display().to_string(),
            "--password-file",
            &backup_pw,
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let setup_b = ServerSetup::standard(&d.join("cfg-b"), &pki, "node-b");
    setup_b.use_store(&store_b, &d.join("node-b/unseal.key"));
    let server_b = TestServer::start(&bin("sso-server"), &setup_b.config, &d.join("b.log"));
    let url_b = format!("https://localhost:{}", server_b.https.port());
    let r = ssoctl(
        &[
            "--server",
            &url_b,
            "--ca",
            &pki.ca_file.display().to_string(),
            "--cert",
            &admin.cert.display().to_string(),
            "--key",
            &admin.key.display().to_string(),
            "--password-file",
            &pw,
            "restore",
            "--in",
            &out.display().to_string(),
            "--force",
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The keys are new to node-b: said before they are restored (and --force needed).
    assert!(r.stdout.contains("the running pair does not know"), "{}", r.stdout);
    snapshot("restore", &r, d);
    // The restored node serves the same keys.
    let keys = |u: &str| -> std::collections::BTreeMap<String, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = ([127, 0, 0, 1], u.rsplit(':').next().unwrap().parse::<u16>().unwrap()).into();
        let c = tests::Client::new(addr, &pki.ca_file, Some(&client));
        let ring = runtime.block_on(c.get("/v1/keyring")).unwrap().json();
        ring["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().unwrap().to_owned(),
                    k["key"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let (ka, kb) = (keys(&url), keys(&url_b));
    for (id, material) in &ka {
        assert_eq!(
            kb.get(id),
            Some(material),
            "restored node lacks {id} or serves other material"
        );
    }

    // Server down: unavailable.
    drop(server);
    drop(server_b);
    let r = run(conn(&["status"]), &[]);
    assert_eq!(r.code, 69);
    snapshot("server_down", &r, d);
}

/// Every line of `text` re-chained with the unkeyed scheme from before the chain was
/// keyed (SHA-256 of the body in `hash`), keeping the lines `keep` accepts: the rewrite the
/// old verifier accepted as intact.
fn rechain_unkeyed(text: &str, keep: impl Fn(&str) -> bool) -> String {
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for (i, line) in text.lines().filter(|l| keep(l)).enumerate() {
        let body = &line[..line.rfind(",\"mac\":\"").unwrap()];
        let v: serde_json::Value = serde_json::from_str(&format!("{body}}}")).unwrap();
        let body = body
            .replacen(&format!("{{\"seq\":{},", v["seq"]), &format!("{{\"seq\":{},", i + 1), 1)
            .replacen(v["prev"].as_str().unwrap(), &prev, 1);
        let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()));
        out.push_str(&format!("{body},\"hash\":\"{hash}\"}}\n"));
        prev = hash;
    }
    out
}

#[test]
fn audit_verify_finds_tampering_truncation_and_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(&d.join("pki"));
    let setup = ServerSetup::standard(&d.join("a"), &pki, "node-a");
    let server = TestServer::start(&bin("sso-server"), &setup.config, &d.join("a.log"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("client")));
    let admin = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    for i in 0..150 {
        let path = if i % 50 == 0 { "/v1/admin/rotate" } else { "/v1/keyring" };
        let r = if i % 50 == 0 {
            runtime.block_on(admin.post(path, &serde_json::json!({})))
        } else {
            runtime.block_on(c.get(path))
        };
        assert_eq!(r.unwrap().status, 200);
    }
    let url = format!("https://localhost:{}", server.https.port());
    let admin_cert = pki.client("admin");
    let online: Vec<String> = vec![
        "--server".into(),
        url,
        "--ca".into(),
        pki.ca_file.display().to_string(),
        "--cert".into(),
        admin_cert.cert.display().to_string(),
        "--key".into(),
        admin_cert.key.display().to_string(),
    ];
    let online: Vec<&str> = online.iter().map(String::as_str).collect();
    // Wait (bounded) for the writer.
    for _ in 0..200 {
        if std::fs::read_to_string(&setup.audit).unwrap().lines().count() >= 150 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let log = setup.audit.display().to_string();
    let store = setup.store.display().to_string();
    let key = setup.unseal_key.display().to_string();
    let offline = |file: &str, extra: &[&str]| {
        let mut args = vec!["audit", "verify", file, "--store", &store, "--key-file", &key];
        args.extend_from_slice(extra);
        ssoctl(&args, &[])
    };

    // Intact: offline against the server's head, and checked by the server itself.
    let ok = offline(&log, &online);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        ok.stdout.contains("reaches the head the server reports"),
        "{}",
        ok.stdout
    );
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(&online);
    let ok = ssoctl(&args, &[]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("checked by the server"), "{}", ok.stdout);
    let text = std::fs::read_to_string(&setup.audit).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().nth(149).unwrap()).unwrap();
    let (head150, count150) = (first["mac"].as_str().unwrap().to_owned(), "150");

    // `head -n 100`: still a chain, but it does not reach the head given.
    let cut = d.join("cut.log");
    let head100: String = text.lines().take(100).map(|l| format!("{l}\n")).collect();
    std::fs::write(&cut, head100).unwrap();
    let cut = cut.display().to_string();
    let bad = offline(&cut, &["--head", &head150, "--count", count150]);
    assert_eq!(bad.code, 65, "{}", bad.stdout);
    assert!(
        bad.stderr.contains("truncated") && bad.stderr.contains("50 entries"),
        "{}",
        bad.stderr
    );
    let bad = offline(&cut, &online);
    assert_eq!(bad.code, 65, "{}", bad.stdout);
    assert!(bad.stderr.contains("truncated"), "{}", bad.stderr);

    // Every admin.rotate removed and the chain recomputed the old way.
    let rewritten = d.join("rewritten.log");
    std::fs::write(
        &rewritten,
        rechain_unkeyed(&text, |l| !l.contains("\"op\":\"admin.rotate\"")),
    )
    .unwrap();
    let rewritten = rewritten.display().to_string();
    let bad = offline(&rewritten, &[]);
    assert_eq!(bad.code, 65);
    assert!(bad.stderr.contains("line 1"), "{}", bad.stderr);

    // One field edited.
    std::fs::write(
        &setup.audit,
        text.replacen("\"outcome\":\"ok\"", "\"outcome\":\"no\"", 1),
    )
    .unwrap();
    drop(server);
    let bad = offline(&log, &[]);
    assert_eq!(bad.code, 65);
    snapshot("audit_tampered", &bad, d);

    // Files without the store: told how to do it.
    let usage = ssoctl(&["audit", "verify", &log], &[]);
    assert_eq!(usage.code, 64, "{}", usage.stderr);
    assert!(usage.stderr.contains("--store"), "{}", usage.stderr);
}

/// Issue 15: messages that sent operators the wrong way. Each case failed before its fix:
/// nothing configured named the CA, not the server; a certificate and key that do not
/// match were "not found" with a hint about `--dev`; a log file that does not exist asked
/// for `--store`; an invalid node name made a store the server then refused; help never
/// named the backup password's variable; a closed pipe printed `Broken pipe`.
#[test]
fn operator_messages_name_the_real_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(&d.join("pki"));
    let (admin, client) = (pki.client("admin"), pki.client("client"));

    // A certificate with another certificate's key.
    let r = ssoctl(
        &[
            "--server",
            "https://localhost:9",
            "--ca",
            &pki.ca_file.display().to_string(),
            "--cert",
            &admin.cert.display().to_string(),
            "--key",
            &client.key.display().to_string(),
            "status",
        ],
        &[],
    );
    assert_eq!(r.code, 64, "{}", r.stderr);
    snapshot("cert_key_mismatch", &r, d);

    // A log file that does not exist.
    let r = ssoctl(&["audit", "verify", &d.join("nosuch.log").display().to_string()], &[]);
    assert_eq!(r.code, 66, "{}", r.stderr);
    snapshot("audit_verify_missing_file", &r, d);

    // A node name the server would refuse: no store is made.
    let store = d.join("bad.db");
    let r = ssoctl(
        &[
            "init",
            "--store",
            &store.display().to_string(),
            "--node",
            "bad name!",
            "--key-file",
            &d.join("bad.key").display().to_string(),
            "--join",
        ],
        &[],
    );
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(!store.exists(), "a store was created for an invalid node name");
    snapshot("init_bad_node_name", &r, d);

    // Help names every variable a password may come from.
    let help = ssoctl(&["--help"], &[]).stdout;
    for var in ["SSOCTL_BACKUP_PASSWORD", "SSOCTL_PASSPHRASE"] {
        assert!(help.contains(var), "--help never names {var}");
    }

    // A reader that went away (`ssoctl ... | head -1`) is not an error.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(SSOCTL)
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("Broken pipe") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// A started pair (tests::pair) whose periodic anti-entropy runs only every 30 s, so what
/// status says right after a write cannot come from a round that happened to run.
fn slow_sync_pair(d: &Path) -> tests::pair::Pair {
    let mut pair = tests::pair::Pair::new(d);
    for node in [&pair.a, &pair.b] {
        node.set_sync_interval_ms(30_000);
    }
    pair.a.start();
    pair.b.start();
    pair
}

/// Waits (up to 20 s) until B, which starts empty, has pulled A's first key.
fn wait_until_b_holds_a_primary(pair: &tests::pair::Pair) {
    let b = pair.b.url();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while status_json(pair, &b)["primary"].is_null() {
        assert!(std::time::Instant::now() < deadline, "B never got A's key");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `ssoctl --server URL` with the pair's admin certificate.
fn on(pair: &tests::pair::Pair, url: &str, args: &[&str]) -> Run {
    let admin = pair.pki.client("admin");
    let mut all: Vec<String> = vec![
        "--server".into(),
        url.into(),
        "--ca".into(),
        pair.pki.ca_file.display().to_string(),
        "--cert".into(),
        admin.cert.display().to_string(),
        "--key".into(),
        admin.key.display().to_string(),
    ];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    ssoctl(&all.iter().map(String::as_str).collect::<Vec<_>>(), &[])
}

fn status_json(pair: &tests::pair::Pair, url: &str) -> serde_json::Value {
    let r = on(pair, url, &["--json", "status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

/// Issue 15: right after a `replicated` rotation both nodes hold the same key set, so
/// status says lag 0 on both (it said 2: the stage and the promote, counted until the next
/// anti-entropy round); a backup taken through A covers the keys in B's status too (B
/// nagged "2 key(s) in no backup").
#[test]
fn pair_status_shows_no_lag_after_a_rotation_and_pair_wide_backup_coverage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pair = slow_sync_pair(d);
    let (a, b) = (pair.a.url(), pair.b.url());
    // B starts empty and pulls A's first key in its first round.
    wait_until_b_holds_a_primary(&pair);
    let r = on(&pair, &a, &["rotate"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("replication replicated"), "{}", r.stdout);
    for url in [&a, &b] {
        let v = status_json(&pair, url);
        assert_eq!(v["peer"]["lag_epochs"], 0, "{url}: {v}");
    }
    let pw = pw_file(d, "b.pw", "a good backup password");
    let out = d.join("pair.ssob");
    let r = on(
        &pair,
        &a,
        &["--password-file", &pw, "backup", "--out", &out.display().to_string()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = status_json(&pair, &b);
    assert_eq!(v["backup"]["not_backed_up"], serde_json::json!([]), "{v}");
    let text = on(&pair, &b, &["status"]);
    snapshot("pair_status_b", &text, d);
    assert!(text.stdout.contains("lag 0 epochs"), "{}", text.stdout);
}

/// Issue 15: a backup older than a destruction, restored into a fresh node. Cut off from
/// its peer, the node cannot know what the pair destroyed: ssoctl lists what the backup
/// would bring back, with the backup's age, and restores nothing without --force. Once the
/// peer answers, the node learns of the destruction first: the destroyed key stays
/// destroyed (before: restored with its material and served, no warning).
#[test]
fn restoring_an_old_backup_never_brings_back_a_destroyed_key_silently() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut pair = slow_sync_pair(d);
    let (a, b) = (pair.a.url(), pair.b.url());
    wait_until_b_holds_a_primary(&pair);
    let old = status_json(&pair, &a)["primary"].as_str().unwrap().to_owned();
    assert_eq!(on(&pair, &a, &["rotate"]).code, 0);
    let pw = pw_file(d, "b.pw", "a good backup password");
    let out = d.join("old.ssob");
    let r = on(
        &pair,
        &a,
        &["--password-file", &pw, "backup", "--out", &out.display().to_string()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // After the backup: the old key is retired and destroyed on both nodes.
    let r = on(&pair, &a, &["keys", "retire", &old]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = on(&pair, &a, &["keys", "destroy", &old, "--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("replication replicated"), "{}", r.stdout);
    // B's disk dies; the new B starts cut off from A.
    pair.relay_ab.cut();
    pair.relay_ba.cut();
    pair.b.wipe();
    pair.b.start();
    let input = out.display().to_string();
    let r = on(&pair, &b, &["--password-file", &pw, "restore", "--in", &input]);
    assert_eq!(r.code, 64, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&old) || r.stderr.contains(&old),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    snapshot("restore_peer_unreachable", &r, d);
    assert!(
        status_json(&pair, &b)["keys"].as_array().unwrap().is_empty(),
        "an unconfirmed restore changed the store"
    );
    // The link back: the restore learns of the destruction before it merges.
    pair.relay_ab.heal();
    pair.relay_ba.heal();
    let r = on(&pair, &b, &["--password-file", &pw, "restore", "--in", &input]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    snapshot("restore_destroyed_stays", &r, d);
    let v = status_json(&pair, &b);
    let state = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == old.as_str())
        .map(|k| k["state"].clone());
    assert_eq!(state, Some(serde_json::json!("destroyed")), "{v}");
}

/// `ssoctl doctor`'s lines with what differs between machines masked as well: the disk's
/// sizes, and the measured clock difference.
fn doctor_text(run: &Run) -> Run {
    let mask = |text: &str| {
        text.lines()
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().take(2).collect();
                if matches!(words.get(1), Some(&("disk_space" | "clock_skew"))) {
                    format!("{} {} <MEASURED>", words[0], words[1])
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    Run {
        code: run.code,
        stdout: mask(&run.stdout),
        stderr: run.stderr.clone(),
    }
}

/// The line of `check` whose text holds `needle`, or a panic showing the checklist.
fn doctor_line<'a>(run: &'a Run, check: &str, needle: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(check) && l.contains(needle))
        .unwrap_or_else(|| panic!("no {check} line with {needle:?}:\n{}\n{}", run.stdout, run.stderr))
}

/// Issue 15: `ssoctl doctor` against a real server, with the server's config on this host.
/// Healthy (after a backup) it exits 0 with every line ok; an admin certificate that ends
/// in 10 days is a warning (exit 1); an unseal key file others can read is a failure
/// (exit 2) whose line names the file and the chmod.
#[test]
fn doctor_checks_a_server_and_exits_by_the_worst_finding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(&d.join("pki"));
    let setup = ServerSetup::standard(&d.join("node"), &pki, "node-a");
    let server = TestServer::start(&bin("sso-server"), &setup.config, &d.join("a.log"));
    let admin = pki.client("admin");
    let url = format!("https://localhost:{}", server.https.port());
    let doctor = |cert: &tests::CertFiles, extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "--server".into(),
            url.clone(),
            "--ca".into(),
            pki.ca_file.display().to_string(),
            "--cert".into(),
            cert.cert.display().to_string(),
            "--key".into(),
            cert.key.display().to_string(),
            "doctor".into(),
            "--config".into(),
            setup.config.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        ssoctl(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };

    // The store's first key is in no backup yet: a warning.
    let r = doctor(&admin, &[]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(doctor_line(&r, "backup", "1 key(s) of node-a in no backup").starts_with("warn"));

    let pw = pw_file(d, "b.pw", "a good backup password");
    let out = d.join("first.ssob");
    let args = [
        "--server",
        &url,
        "--ca",
        &pki.ca_file.display().to_string(),
        "--cert",
        &admin.cert.display().to_string(),
        "--key",
        &admin.key.display().to_string(),
        "--password-file",
        &pw,
        "backup",
        "--out",
        &out.display().to_string(),
    ];
    let b = ssoctl(&args, &[]);
    assert_eq!(b.code, 0, "{}", b.stderr);

    let r = doctor(&admin, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.lines().all(|l| l.starts_with("ok ")), "{}", r.stdout);
    for (check, needle) in [
        ("config", "loads and validates"),
        ("file_mode", "unseal key file"),
        ("file_mode", "store"),
        ("file_mode", "client key"),
        ("cert_expiry", "client certificate"),
        ("cert_expiry", "presents"),
        ("server", "answered: node node-a"),
        ("health", "node-a ok"),
        ("peer", "standalone"),
        ("backup", "every key"),
        ("disk_space", "free of"),
    ] {
        doctor_line(&r, check, needle);
    }
    let json = doctor(&admin, &["--json"]);
    assert_eq!(json.code, 0, "{}", json.stderr);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["status"], "ok");
    let first = &v["checks"][0];
    for field in ["status", "check", "detail", "remedy"] {
        assert!(first.get(field).is_some(), "{field} missing: {first}");
    }

    // An admin certificate that ends in 10 days: a warning naming it, and exit 1.
    let mut spec = certs::LeafSpec::client("admin", 10);
    spec.common_name = "admin".into();
    let short = pki.issue_spec("admin-short", &spec);
    let r = doctor(&short, &[]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let l = doctor_line(&r, "cert_expiry", "client certificate");
    assert!(
        l.starts_with("warn") && l.contains("admin-short.pem") && l.contains("under 30 days"),
        "{l}"
    );
    assert_eq!(
        r.stdout.lines().filter(|l| !l.starts_with("ok ")).count(),
        1,
        "{}",
        r.stdout
    );

    // The unseal key file readable by all: a failure, exit 2.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&setup.unseal_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = doctor(&admin, &[]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    let l = doctor_line(&r, "file_mode", "unseal key file");
    assert!(
        l.starts_with("fail")
            && l.contains("is 0644")
            && l.contains(&format!("chmod 600 {}", setup.unseal_key.display())),
        "{l}"
    );
    snapshot("doctor_key_file_readable", &doctor_text(&r), d);
}

/// Issue 15: doctor against a pair. Both nodes up and backed up: exit 0, with the clock
/// comparison. Node B SIGKILLed: doctor asked only about A fails A's peer line and B's
/// server line (doctor asks the peer A names), and exits 2.
#[test]
fn doctor_sees_a_stopped_peer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut pair = tests::pair::Pair::new(d);
    pair.a.start();
    pair.b.start();
    let (a, b) = (pair.a.url(), pair.b.url());
    wait_until_b_holds_a_primary(&pair);
    let pw = pw_file(d, "b.pw", "a good backup password");
    let out = d.join("pair.ssob");
    let r = on(
        &pair,
        &a,
        &["--password-file", &pw, "backup", "--out", &out.display().to_string()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = on(&pair, &a, &["--server", &b, "doctor"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let skew = doctor_line(&r, "clock_skew", "threshold 5 s");
    assert!(skew.contains("node-a") && skew.contains("node-b"), "{skew}");
    // (A may know B only as "peer" until its first pull names it: the server's naming.)
    doctor_line(&r, "peer", "node-a sees peer");
    doctor_line(&r, "peer", "node-b sees peer node-a up");
    assert_eq!(r.stdout.matches("health       node-b ok").count(), 1, "{}", r.stdout);

    pair.b.kill();
    let r = on(&pair, &a, &["doctor"]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    let l = doctor_line(&r, "peer", "node-a cannot reach its peer");
    assert!(l.starts_with("fail") && l.contains("--allow-degraded"), "{l}");
    let l = doctor_line(&r, "server", "(peer of node-a) did not answer");
    assert!(l.starts_with("fail"), "{l}");
    doctor_line(&r, "server", "answered: node node-a");
    assert!(
        r.stderr.contains("doctor:") && r.stderr.contains("failed"),
        "{}",
        r.stderr
    );
}

/// Whether the private key in `key` belongs to the certificate in `cert` (rustls's own
/// check, the one the server's preflight makes).
fn cert_and_key_match(cert: &Path, key: &Path) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = vec![CertificateDer::from_pem_file(cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .unwrap();
    rustls::sign::CertifiedKey::new(chain, signer).keys_match().is_ok()
}

/// `certs issue` for a name that already has a certificate renews both halves (doctor's
/// remedy for an expiring certificate says to run it), and an issue that fails half-way
/// leaves the old pair exactly as it was. Before: the second issue overwrote the
/// certificate in place, then refused the key ("exists"): a certificate and a key that do
/// not belong together, and a server that no longer starts on them.
#[test]
fn certs_issue_again_renews_both_halves_and_a_failed_issue_changes_neither() {
    let d = tempfile::tempdir().unwrap();
    let pki = d.path().join("pki");
    let dir = pki.to_str().unwrap();
    let r = ssoctl(&["certs", "init", "--dir", dir], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let issue = ["certs", "issue", "--dir", dir, "--role", "server", "--name", "node-x"];
    let r = ssoctl(&issue, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (cert, key) = (pki.join("node-x.pem"), pki.join("node-x-key.pem"));
    assert!(cert_and_key_match(&cert, &key));
    let first = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());

    let r = ssoctl(&issue, &[]);
    assert_eq!(r.code, 0, "issuing again must renew: {}", r.stderr);
    assert!(
        cert_and_key_match(&cert, &key),
        "after a renewal the certificate and key do not match"
    );
    let renewed = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    assert_ne!(renewed.0, first.0, "the certificate was not renewed");
    assert_ne!(renewed.1, first.1, "the key was not renewed");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the renewed key is {mode:o}");

    // A write that fails half-way: under a 200-byte file-size limit no PEM file fits.
    let out = Command::new("prlimit")
        .arg("--fsize=200")
        .arg(SSOCTL)
        .args(issue)
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(!out.status.success(), "the issue under a 200-byte limit succeeded");
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        renewed.0,
        "a failed issue changed the certificate"
    );
    assert_eq!(
        std::fs::read(&key).unwrap(),
        renewed.1,
        "a failed issue changed the key"
    );
    let left: Vec<_> = std::fs::read_dir(&pki)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "a failed issue left {left:?}");
}

/// `ssoctl doctor` compares the primaries of the nodes it reached: two nodes that answer
/// but name different primaries (here a degraded rotation on A while the pair is cut) are a
/// warning naming both, and once the pair has healed and converged the line is ok. Before,
/// doctor checked each node on its own and said nothing about the disagreement.
#[test]
fn doctor_warns_when_the_nodes_disagree_on_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = tests::pair::Pair::new(dir.path());
    pair.a.start();
    pair.b.start();
    let (a, b) = (pair.a.url(), pair.b.url());
    wait_until_b_holds_a_primary(&pair);
    pair.relay_ab.cut();
    pair.relay_ba.cut();
    let r = on(&pair, &a, &["rotate", "--allow-degraded"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (on_a, on_b) = (
        status_json(&pair, &a)["primary"].clone(),
        status_json(&pair, &b)["primary"].clone(),
    );
    assert_ne!(on_a, on_b, "the cut did not split the primaries");
    let r = on(&pair, &a, &["--server", &b, "doctor"]);
    let l = doctor_line(&r, "primary", "disagree");
    assert!(l.starts_with("warn"), "{l}");
    for (node, id) in [("node-a", &on_a), ("node-b", &on_b)] {
        let id = id.as_str().unwrap();
        assert!(
            l.contains(&format!("{node} {id}")),
            "{node}'s primary {id} is not named: {l}"
        );
    }

    pair.relay_ab.heal();
    pair.relay_ba.heal();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while status_json(&pair, &b)["primary"] != on_a {
        assert!(
            std::time::Instant::now() < deadline,
            "the pair never converged after the heal"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let r = on(&pair, &a, &["--server", &b, "doctor"]);
    let l = doctor_line(&r, "primary", "agree");
    assert!(l.starts_with("ok") && l.contains(on_a.as_str().unwrap()), "{l}");
}

/// A store given as a URL is never echoed with its password (issue 14): `audit verify
/// --store postgresql://USER:PASSWORD@...` took the URL for a SQLite file and answered
/// "no store at postgresql://sso:PASSWORD@...", and `init --store` with a mistyped scheme
/// tried to create a file named after the URL. Neither needs a database: both are refused
/// before anything connects.
#[test]
fn a_store_url_with_a_password_is_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("audit.log");
    std::fs::write(&log, "").unwrap();
    let key = d.join("unseal.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (log, key) = (log.to_str().unwrap(), key.to_str().unwrap());
    for store in [
        "postgresql://sso:hunter2-secret@127.0.0.1:1/sso",
        "PostgreSQL://sso:hunter2-secret@127.0.0.1:1/sso",
    ] {
        let run = ssoctl(&["audit", "verify", log, "--store", store, "--key-file", key], &[]);
        assert_eq!(run.code, 64, "{store}: {}", run.stderr);
        assert!(
            !run.stderr.contains("hunter2") && !run.stdout.contains("hunter2"),
            "{}",
            run.stderr
        );
        // The database: check through the node; the mistyped scheme: named as such.
        assert!(
            run.stderr.contains("--server") || run.stderr.contains("does not start with"),
            "{}",
            run.stderr
        );
    }
    let run = ssoctl(
        &[
            "init",
            "--store",
            "postgresq://sso:hunter2-secret@127.0.0.1:1/sso",
            "--node",
            "node-1",
            "--key-file",
            key,
            "--backup-out",
            d.join("first.ssob").to_str().unwrap(),
        ],
        &[("SSOCTL_BACKUP_PASSWORD", "backup-pass-123456789")],
    );
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(
        !run.stderr.contains("hunter2") && !run.stdout.contains("hunter2"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("postgresql://"), "{}", run.stderr);
}
