//! Issue 10 §3: peer and backup input is hostile input. Each test is an attack over the
//! network against the real `sso-server`: a certificate holding the `peer` role posting to
//! `/v1/peer/merge`, or an admin posting a crafted backup to `/v1/admin/restore`.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use tests::{OneServer, Pki, ServerSetup, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_sso-server");

/// A standalone server whose config also gives the certificate `cn:peer` the peer role,
/// as a pair's config does for the other node.
struct Fixture(OneServer);

impl std::ops::Deref for Fixture {
    type Target = OneServer;
    fn deref(&self) -> &OneServer {
        &self.0
    }
}

impl std::ops::DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut OneServer {
        &mut self.0
    }
}

fn start() -> Fixture {
    Fixture(tests::one_server_with(Path::new(BIN), |c| {
        c.roles.peer = vec![sso_server::config::Pattern::Cn("peer".into())];
    }))
}

impl Fixture {
    async fn status(&self) -> serde_json::Value {
        let r = self.client("admin").get("/v1/admin/status").await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()
    }

    /// The primary's id and generation.
    async fn primary(&self) -> (String, u64) {
        let status = self.status().await;
        let id = status["primary"].as_str().unwrap().to_owned();
        let generation = status["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == id.as_str())
            .unwrap()["generation"]
            .as_u64()
            .unwrap();
        (id, generation)
    }

    fn restart(&mut self) {
        self.server.kill();
        self.server = TestServer::start(Path::new(BIN), &self.setup.config, &self.root.join("server.log"));
    }
}

fn random_id() -> String {
    let rng = ring::rand::SystemRandom::new();
    sso_proto::KeyId::generate(&rng).unwrap().to_string()
}

/// A peer record with chosen material (the attacker's: 32 bytes of 0x41).
fn planted(id: &str, generation: u64, state: &str) -> serde_json::Value {
    let mut r = serde_json::json!({
        "key_id": id,
        "generation": generation,
        "created_at": "2026-01-01T00:00:00Z",
        "origin": "evil",
        "state": state,
    });
    if state != "destroyed" {
        r["key"] = base64::engine::general_purpose::STANDARD.encode([0x41u8; 32]).into();
    }
    r
}

fn merge_body(keys: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({"node": "evil", "epoch": 1, "keys": keys})
}

/// Attack: a key with generation `i64::MAX` and chosen material. Before the fix it became
/// the primary, rotation then failed with 500 and its retirement was refused for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_plant_a_generation_nobody_can_rotate_past() {
    let f = start();
    let peer = f.client("peer");
    let (primary, generation) = f.primary().await;
    for g in [i64::MAX as u64, u64::MAX, generation + (1 << 20) + 1] {
        let r = peer
            .post("/v1/peer/merge", &merge_body(vec![planted(&random_id(), g, "active")]))
            .await
            .unwrap();
        assert_eq!(r.status, 422, "generation {g} was accepted: {:?}", r.body);
        assert_eq!(r.json()["error"], "invalid_record");
    }
    assert_eq!(f.primary().await.0, primary, "the primary changed");
    assert_eq!(
        f.status().await["keys"].as_array().unwrap().len(),
        1,
        "something was stored"
    );
    let rotated = f
        .client("admin")
        .post("/v1/admin/rotate", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    assert_eq!(rotated.json()["generation"], generation + 1);
}

/// Attack: one message destroys the current primary. Before the fix the key's material
/// was wiped and the store fell back to an older key or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_destroy_the_primary_here() {
    let f = start();
    let peer = f.client("peer");
    let (primary, generation) = f.primary().await;

    let alone = peer
        .post(
            "/v1/peer/merge",
            &merge_body(vec![planted(&primary, generation, "destroyed")]),
        )
        .await
        .unwrap();
    assert_eq!(alone.status, 409, "{:?}", alone.body);
    assert_eq!(alone.json()["error"], "conflict");
    let retire = peer
        .post(
            "/v1/peer/merge",
            &merge_body(vec![planted(&primary, generation, "retired")]),
        )
        .await
        .unwrap();
    assert_eq!(retire.status, 409, "{:?}", retire.body);
    assert_eq!(f.primary().await.0, primary);

    // With a newer primary in the same message (what a legitimate peer sends after a
    // rotation, a retire and a destroy this node missed) the key is retired, never
    // destroyed in one step: its material stays.
    let newer = random_id();
    let both = peer
        .post(
            "/v1/peer/merge",
            &merge_body(vec![
                planted(&primary, generation, "destroyed"),
                planted(&newer, generation + 1, "active"),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(both.status, 200, "{:?}", both.body);
    let status = f.status().await;
    let old = status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == primary.as_str())
        .unwrap()
        .clone();
    assert_eq!(old["state"], "retired");
    let key = keystore::UnsealKey::key_file(&f.setup.unseal_key).unwrap();
    let store = keystore::SealedStore::open(&f.setup.store, &key).unwrap();
    let exported = store.export().unwrap();
    let kept = exported.iter().find(|r| r.meta.key_id.to_string() == primary).unwrap();
    assert!(kept.secret.is_some(), "the primary's material was wiped");
}

/// Attack: fractional seconds in `created_at`. Before the fix the wrap bound nanoseconds
/// while the row kept whole seconds: backup, rotate and restart all failed for good,
/// blaming disk tampering. Now the time is normalised before sealing and every later
/// operation works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractional_seconds_from_a_peer_round_trip() {
    let mut f = start();
    let peer = f.client("peer");
    let (_, generation) = f.primary().await;
    let id = random_id();
    let mut record = planted(&id, generation + 1, "staged");
    record["created_at"] = "2026-03-04T05:06:07.123456789+02:00".into();
    let r = peer.post("/v1/peer/merge", &merge_body(vec![record])).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);

    let admin = f.client("admin");
    let backup = admin
        .post(
            "/v1/admin/backup",
            &serde_json::json!({"password": "a long backup password"}),
        )
        .await
        .unwrap();
    assert_eq!(backup.status, 200, "backup failed: {:?}", backup.body);
    let rotated = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    assert_eq!(rotated.status, 200, "rotate failed: {:?}", rotated.body);
    f.restart();
    let status = f.status().await;
    let key = status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(key["created_at"], "2026-03-04T03:06:07Z");
}

/// Attack: an origin longer than the backup format carries (255 bytes). Before the fix it
/// was stored and every later backup failed. Control characters are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_origin_is_refused_and_backups_keep_working() {
    let f = start();
    let peer = f.client("peer");
    let (_, generation) = f.primary().await;
    for origin in ["o".repeat(256), "evil\n{\"forged\":1}".to_owned(), String::new()] {
        let mut record = planted(&random_id(), generation + 1, "staged");
        record["origin"] = origin.into();
        let r = peer.post("/v1/peer/merge", &merge_body(vec![record])).await.unwrap();
        assert_eq!(r.status, 422, "{:?}", r.body);
    }
    // A batch with one bad record writes nothing, not even its good records.
    let good = random_id();
    let mut bad = planted(&random_id(), generation + 1, "staged");
    bad["origin"] = "o".repeat(300).into();
    let r = peer
        .post(
            "/v1/peer/merge",
            &merge_body(vec![planted(&good, generation + 1, "staged"), bad]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 422);
    assert_eq!(f.status().await["keys"].as_array().unwrap().len(), 1);
    let backup = f
        .client("admin")
        .post(
            "/v1/admin/backup",
            &serde_json::json!({"password": "a long backup password"}),
        )
        .await
        .unwrap();
    assert_eq!(backup.status, 200, "{:?}", backup.body);
}

/// A peer may still add a key above ours with chosen material (that is what replication
/// is); the operator can always rotate past it, and can retire it with an explicit,
/// audited override even while it is the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_force_retire_a_planted_primary() {
    let f = start();
    let peer = f.client("peer");
    let admin = f.client("admin");
    let (original, generation) = f.primary().await;
    let evil = random_id();
    let r = peer
        .post(
            "/v1/peer/merge",
            &merge_body(vec![planted(&evil, generation + 1, "active")]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(f.primary().await.0, evil);

    let plain = admin
        .post(&format!("/v1/admin/keys/{evil}/retire"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(plain.status, 409, "{:?}", plain.body);
    let forced = admin
        .post(
            &format!("/v1/admin/keys/{evil}/retire"),
            &serde_json::json!({"force_retire_primary": true}),
        )
        .await
        .unwrap();
    assert_eq!(forced.status, 200, "{:?}", forced.body);
    assert_eq!(forced.json()["state"], "retired");
    assert_eq!(f.primary().await.0, original);
    let audit = std::fs::read_to_string(&f.setup.audit).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("admin.retire") && l.contains(&evil) && l.contains("forced retirement of the primary")),
        "the override is not audited:\n{audit}"
    );
    // And rotating past a planted key always works.
    let evil2 = random_id();
    let (_, g) = f.primary().await;
    let r = peer
        .post("/v1/peer/merge", &merge_body(vec![planted(&evil2, g + 2, "active")]))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let rotated = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    assert_ne!(f.primary().await.0, evil2);
}

/// A backup header asking argon2 for far more memory than any backup this product
/// writes. Before the fix a restore ran it (up to 4 GiB) while holding the store lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_backup_kdf_header_is_refused_before_the_kdf_runs() {
    let f = start();
    let admin = f.client("admin");
    let backup = admin
        .post(
            "/v1/admin/backup",
            &serde_json::json!({"password": "a long backup password"}),
        )
        .await
        .unwrap();
    assert_eq!(backup.status, 200);
    let memory_at = memory_offset(&backup.body);
    let mut crafted = backup.body.to_vec();
    // 1 GiB, 64 passes: within the old bounds.
    crafted[memory_at..memory_at + 4].copy_from_slice(&(1024u32 * 1024).to_be_bytes());
    crafted[memory_at + 4..memory_at + 8].copy_from_slice(&64u32.to_be_bytes());
    let started = std::time::Instant::now();
    let r = admin
        .post(
            "/v1/admin/restore",
            &serde_json::json!({"password": "a long backup password",
                "backup": base64::engine::general_purpose::STANDARD.encode(&crafted)}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(String::from_utf8_lossy(&r.body).contains("argon2"), "{:?}", r.body);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Issue 10 §8: a password that is not a string must not come back. serde's own message
/// quotes the value ("invalid type: integer `987654321012`"), which put the digits into
/// the answer and the audit log. Every body carrying a password is tried, and the answer,
/// the server log and the audit log are searched for the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_of_the_wrong_type_is_never_echoed() {
    let f = start();
    let admin = f.client("admin");
    let secret = "987654321012";
    let number: serde_json::Value = serde_json::from_str(secret).unwrap();
    let bodies = [
        ("/v1/admin/backup", serde_json::json!({ "password": number })),
        ("/v1/admin/backup", serde_json::json!({ "password": [number] })),
        (
            "/v1/admin/restore",
            serde_json::json!({ "password": number, "backup": "AAAA" }),
        ),
        (
            "/v1/admin/restore",
            serde_json::json!({ "password": { "x": number }, "backup": "AAAA" }),
        ),
    ];
    for (path, body) in &bodies {
        let r = admin.post(path, body).await.unwrap();
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 400, "{path} {body}: {text}");
        assert!(!text.contains(secret), "{path} answered with the password: {text}");
        assert!(
            text.contains("wrong type or value at line 1"),
            "the answer should say where: {text}"
        );
    }
    // The answers are audited (asynchronously): wait for them, then search every file.
    let audit = f.setup.audit.clone();
    let mut refused = 0;
    for _ in 0..200 {
        let log = std::fs::read_to_string(&audit).unwrap_or_default();
        refused = log
            .lines()
            .filter(|l| l.contains("admin.backup") || l.contains("admin.restore"))
            .count();
        if refused >= bodies.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused >= bodies.len(), "the refusals were not audited");
    for file in [&audit, &f.server.log] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!text.contains(secret), "{} holds the password", file.display());
    }
}

/// While a restore's KDF runs (here at the largest cost a backup file may ask for, with a
/// wrong password), the store lock is free: an admin status call, which needs the lock,
/// answers before the restore does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_kdf_never_runs_under_the_store_lock() {
    let f = start();
    let admin = f.client("admin");
    let backup = admin
        .post(
            "/v1/admin/backup",
            &serde_json::json!({"password": "a long backup password"}),
        )
        .await
        .unwrap();
    assert_eq!(backup.status, 200);
    let memory_at = memory_offset(&backup.body);
    let mut costly = backup.body.to_vec();
    // The largest cost a backup file may ask for.
    let (memory, passes) = (
        keystore::KdfParams::FILE_MAX_MEMORY_KIB,
        keystore::KdfParams::FILE_MAX_PASSES,
    );
    costly[memory_at..memory_at + 4].copy_from_slice(&memory.to_be_bytes());
    costly[memory_at + 4..memory_at + 8].copy_from_slice(&passes.to_be_bytes());
    let restorer = admin.clone();
    let body = serde_json::json!({"password": "not the password",
        "backup": base64::engine::general_purpose::STANDARD.encode(&costly)});
    let started = std::time::Instant::now();
    let restore = tokio::spawn(async move { restorer.post("/v1/admin/restore", &body).await.unwrap() });
    // Status calls back to back for as long as the restore runs (bounded by 60 s). With
    // the KDF under the lock, the first call made once the KDF has started waits for all
    // of it.
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    while !restore.is_finished() && started.elapsed() < Duration::from_secs(60) {
        let t = std::time::Instant::now();
        let status = admin.get("/v1/admin/status").await.unwrap();
        assert_eq!(status.status, 200);
        slowest = slowest.max(t.elapsed());
        calls += 1;
    }
    let r = restore.await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(
        calls >= 2,
        "the restore took {took:?}, too short to overlap status calls"
    );
    assert!(
        slowest < took / 2,
        "a status call waited {slowest:?} during a {took:?} restore: the KDF ran under the store lock"
    );
}

/// Offset of the argon2 memory field in a backup header (docs/backup-format.md).
fn memory_offset(file: &[u8]) -> usize {
    let hint_len = usize::from(u16::from_be_bytes([file[9], file[10]]));
    let node_at = 11 + hint_len + 8;
    node_at + 1 + usize::from(file[node_at])
}

/// Issue 10 §5 attack: stop the server, delete the primary's row from its store with
/// plain SQL (no KEK needed), start it again. Before the fix it started and served the
/// older key as the primary, with no alarm. Now it refuses to start (exit 65) and names
/// the missing key on stderr.
#[test]
fn a_deleted_primary_row_stops_the_server_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    let key = keystore::UnsealKey::key_file(&setup.unseal_key).unwrap();
    let mut store = keystore::SealedStore::open(&setup.store, &key).unwrap();
    let primary = store.rotate().unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(&setup.store).unwrap();
    let deleted = conn
        .execute("DELETE FROM keys WHERE key_id = ?1", [primary.key_id.to_string()])
        .unwrap();
    assert_eq!(deleted, 1);
    drop(conn);

    let out = tests::run_until_exit(Path::new(BIN), &setup.config, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("listening"),
        "the server started without its primary: {stdout}"
    );
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the key {} (generation 2, primary) is missing from the store: its row was deleted",
            primary.key_id
        )),
        "{stderr}"
    );
}

/// Issue 10 §5, found by attacking the binary: a row whose wrapped material does not
/// authenticate (material swapped between two rows, or the origin of a retired key edited,
/// with the manifest untouched) made the server print "listening", announce readiness and
/// then exit 69 when the row was served, or start and serve on for ever when the row was
/// retired (its material silently lost until the next backup). Every row is authenticated
/// before a port is bound: exit 65, the key named, and the file left as it was.
#[test]
fn a_row_whose_material_does_not_authenticate_stops_the_start_naming_the_key() {
    for (what, served) in [("primary", true), ("retired", false)] {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki"));
        let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
        let key = keystore::UnsealKey::key_file(&setup.unseal_key).unwrap();
        let mut store = keystore::SealedStore::open(&setup.store, &key).unwrap();
        let first = store.primary().unwrap().unwrap();
        let second = store.rotate().unwrap();
        let third = store.rotate().unwrap();
        store.retire(first.key_id).unwrap();
        drop(store);
        let conn = rusqlite::Connection::open(&setup.store).unwrap();
        let victim = if served {
            // The primary gets the material of another served key.
            conn.execute(
                "UPDATE keys SET material = (SELECT material FROM keys WHERE key_id = ?2) WHERE key_id = ?1",
                [third.key_id.to_string(), second.key_id.to_string()],
            )
            .unwrap();
            third.key_id
        } else {
            conn.execute(
                "UPDATE keys SET origin = 'elsewhere' WHERE key_id = ?1",
                [first.key_id.to_string()],
            )
            .unwrap();
            first.key_id
        };
        drop(conn);
        let before = std::fs::read(&setup.store).unwrap();

        let out = tests::run_until_exit(Path::new(BIN), &setup.config, Duration::from_secs(20));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stdout.contains("listening"),
            "{what}: the server bound its ports with a tampered row: {stdout} {stderr}"
        );
        assert_eq!(out.status.code(), Some(65), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "integrity error for key {victim}: wrapped material failed authentication"
            )),
            "{what}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&setup.store).unwrap(),
            before,
            "{what}: a refused start changed the store file"
        );
    }
}

/// Found through the flaky twin-name test of issue 14: everything the server set up after
/// binding (the TLS files loaded for real, the audit log opened, the first snapshot read)
/// came *after* the "listening" line and the readiness notification. A failure there was a
/// crash after announcing readiness, and TLS files replaced between the preflight check and
/// the real load were used unchecked (the twin test's second node re-issued the first's
/// certificate in that window, and the first died with "does not belong to the
/// certificate" right after saying "listening"). An audit log that cannot be opened must
/// stop the start before anything is announced. Failed before the fix: "listening" was
/// printed, then exit 69.
#[test]
fn an_audit_log_that_cannot_be_opened_stops_the_start_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::standard(&dir.path().join("node"), &pki, "node-a");
    let not_a_file = dir.path().join("audit-is-a-directory");
    std::fs::create_dir(&not_a_file).unwrap();
    setup.edit(|c| c.audit.path = not_a_file.clone());
    let out = tests::run_until_exit(Path::new(BIN), &setup.config, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("listening"),
        "the server announced readiness before its audit log was open: {stdout} {stderr}"
    );
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("audit-is-a-directory"), "{stderr}");
}
