//! A child process rotates in a loop and reports each rotation once `rotate` returned;
//! the parent SIGKILLs it at random moments. After every kill the store must open and
//! hold every reported rotation with its material intact.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keystore::{CreateOptions, SealedStore, UnsealKey};
use ring::rand::{SecureRandom, SystemRandom};

const CHILD_ENV: &str = "KEYSTORE_CRASH_CHILD_DIR";

/// Fingerprint of a key's material: lets the parent check the bytes survived without the
/// child printing them.
fn fingerprint(secret: &sso_proto::MasterSecret) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.expose_secret());
    hex::encode(&digest.as_ref()[..8])
}

/// In the child: rotate forever, printing `key_id fingerprint` after each durable rotation.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let dir = Path::new(&dir);
    let key = UnsealKey::key_file(&dir.join("unseal.key")).unwrap();
    let mut store = SealedStore::open(&dir.join("store.db"), &key).unwrap();
    loop {
        let meta = store.rotate().unwrap();
        let ring = store.keyring().unwrap();
        let record = ring.keys.iter().find(|r| r.meta.key_id == meta.key_id).unwrap();
        println!(
            "rotated {} {}",
            meta.key_id,
            fingerprint(record.secret.as_ref().unwrap())
        );
        // Sometimes retire an old key too, so kills land inside re-wrap transactions.
        if meta.generation.is_multiple_of(3)
            && let Some(old) = ring.keys.iter().find(|r| r.meta.key_id != meta.key_id)
        {
            store.retire(old.meta.key_id).unwrap();
        }
    }
}

#[test]
fn sigkill_during_rotations_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let key = UnsealKey::generate_key_file(&dir.path().join("unseal.key")).unwrap();
    drop(SealedStore::create(&dir.path().join("store.db"), &key, &CreateOptions::new("crash")).unwrap());

    let rng = SystemRandom::new();
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let kills = 25;
    for round in 0..kills {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut delay = [0u8; 2];
        rng.fill(&mut delay).unwrap();
        let budget = Duration::from_millis(20 + u64::from(u16::from_le_bytes(delay)) % 180);
        let started = Instant::now();
        let stdout = child.stdout.take().unwrap();
        // Read acknowledgements on a thread so the kill lands at a random moment, not
        // only between lines.
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("rotated ") {
                    let mut parts = rest.split(' ');
                    if let (Some(id), Some(fp)) = (parts.next(), parts.next())
                        && fp.len() == 16
                    {
                        lines.push((id.to_owned(), fp.to_owned()));
                    }
                }
            }
            lines
        });
        while started.elapsed() < budget {
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        acknowledged.extend(reader.join().unwrap());

        let store = SealedStore::open(&dir.path().join("store.db"), &key)
            .unwrap_or_else(|e| panic!("round {round}: store does not open after SIGKILL: {e}"));
        let all = store
            .export()
            .unwrap_or_else(|e| panic!("round {round}: integrity failure after SIGKILL: {e}"));
        for (id, fp) in &acknowledged {
            let record = all
                .iter()
                .find(|r| r.meta.key_id.to_string() == *id)
                .unwrap_or_else(|| panic!("round {round}: acknowledged rotation {id} lost"));
            let secret = record.secret.as_ref().expect("rotated keys are never destroyed here");
            assert_eq!(&fingerprint(secret), fp, "round {round}: material of {id} changed");
        }
    }
    assert!(
        acknowledged.len() >= kills,
        "too few rotations observed ({}) for the test to mean anything",
        acknowledged.len()
    );
    eprintln!(
        "{kills} SIGKILLs, {} acknowledged rotations, all present",
        acknowledged.len()
    );
}
