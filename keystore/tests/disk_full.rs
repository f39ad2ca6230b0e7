//! A full disk during rotation: the rotation fails with a clear error, and the store still
//! opens with every earlier key intact. The disk is "filled" with a file-size limit
//! (`ulimit -f`, SIGXFSZ ignored) on a child process that rotates until a write fails.

use std::path::Path;
use std::process::Command;

use keystore::{CreateOptions, SealedStore, UnsealKey};

const CHILD_ENV: &str = "KEYSTORE_DISK_FULL_CHILD_DIR";

fn fingerprint(secret: &sso_proto::MasterSecret) -> String {
    hex::encode(&ring::digest::digest(&ring::digest::SHA256, secret.expose_secret()).as_ref()[..8])
}

/// Rotates once; the new key's id and material fingerprint.
fn rotate(store: &mut SealedStore) -> keystore::Result<(String, String)> {
    let meta = store.rotate()?;
    let ring = store.keyring()?;
    let secret = ring
        .keys
        .iter()
        .find(|r| r.meta.key_id == meta.key_id)
        .and_then(|r| r.secret.as_ref())
        .expect("a fresh key is served");
    Ok((meta.key_id.to_string(), fingerprint(secret)))
}

/// In the child: rotate until it fails, reporting each success and the failure.
#[test]
fn disk_full_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let dir = Path::new(&dir);
    let key = UnsealKey::key_file(&dir.join("unseal.key")).unwrap();
    let mut store = SealedStore::open(&dir.join("store.db"), &key).unwrap();
    for _ in 0..100_000 {
        match rotate(&mut store) {
            Ok((id, fp)) => println!("rotated {id} {fp}"),
            Err(e) => {
                println!("failed {e}");
                return;
            }
        }
    }
    println!("never failed");
}

#[test]
fn a_full_disk_fails_the_rotation_and_keeps_every_earlier_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = UnsealKey::generate_key_file(&dir.path().join("unseal.key")).unwrap();
    let path = dir.path().join("store.db");
    let mut store = SealedStore::create(&path, &key, &CreateOptions::new("full")).unwrap();
    let mut expected = Vec::new();
    for _ in 0..3 {
        expected.push(rotate(&mut store).unwrap());
    }
    drop(store);
    let largest = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .max()
        .unwrap();
    // Room for a few more pages, then EFBIG: what a full disk looks like to SQLite.
    let blocks = largest / 1024 + 24;
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" --exact disk_full_child --nocapture --test-threads=1"
        ))
        .arg(std::env::current_exe().unwrap())
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child died instead of failing cleanly: {:?}\n{stdout}",
        out.status
    );
    let failure = stdout
        .lines()
        .find_map(|l| l.strip_prefix("failed "))
        .unwrap_or_else(|| panic!("no rotation failed:\n{stdout}"));
    assert!(
        failure.contains("store database error") && failure.contains("check the disk"),
        "unclear error: {failure}"
    );
    for line in stdout.lines().filter_map(|l| l.strip_prefix("rotated ")) {
        let (id, fp) = line.split_once(' ').unwrap();
        expected.push((id.to_owned(), fp.to_owned()));
    }
    eprintln!("{} rotations fitted, then: {failure}", expected.len() - 3);

    // Room again: the store opens, verifies, and holds every acknowledged key intact.
    let store = SealedStore::open(&path, &key).unwrap();
    store.verify().unwrap();
    let all = store.export().unwrap();
    for (id, fp) in &expected {
        let record = all
            .iter()
            .find(|r| r.meta.key_id.to_string() == *id)
            .unwrap_or_else(|| panic!("key {id} lost"));
        assert_eq!(
            &fingerprint(record.secret.as_ref().unwrap()),
            fp,
            "material of {id} changed"
        );
    }
    // And it still works.
    drop(store);
    let mut store = SealedStore::open(&path, &key).unwrap();
    store.rotate().unwrap();
}
