//! Backup files: round trip across stores, and every kind of bad file refused with its
//! own error while the target store stays as it was.

use keystore::backup::{self, FORMAT_VERSION};
use keystore::{CreateOptions, Error, KdfParams, SealedStore, Store, UnsealKey};
use secrecy::SecretString;
use sso_proto::KeyState;

fn store(dir: &tempfile::TempDir, node: &str) -> SealedStore {
    let key = UnsealKey::generate_key_file(&dir.path().join(format!("{node}.key"))).unwrap();
    SealedStore::create(&dir.path().join(format!("{node}.db")), &key, &CreateOptions::new(node)).unwrap()
}

fn password() -> SecretString {
    SecretString::from("a long backup password")
}

#[test]
fn round_trip_across_two_stores() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = store(&dir, "a");
    let old = a.rotate().unwrap();
    a.rotate().unwrap();
    a.stage_new().unwrap();
    let gone = a.rotate().unwrap();
    a.rotate().unwrap();
    a.retire(old.key_id).unwrap();
    a.retire(gone.key_id).unwrap();
    a.destroy(gone.key_id).unwrap();
    assert_eq!(a.status().unwrap().not_backed_up.len(), 4);

    let path = dir.path().join("a.ssob");
    let info = a
        .write_backup_file(
            &path,
            &password(),
            "the usual, with the year",
            KdfParams::insecure_for_tests(),
        )
        .unwrap();
    assert!(a.status().unwrap().not_backed_up.is_empty());
    assert!(a.status().unwrap().last_backup_at.is_some());
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(backup::read_info(&bytes).unwrap(), info);
    assert_eq!(info.hint, "the usual, with the year");
    assert_eq!(info.node, "a");

    let mut b = store(&dir, "b");
    let report = b.restore_backup(&bytes, &password()).unwrap();
    assert_eq!(report.added, 4, "all non-destroyed keys");
    let expected: Vec<_> = a
        .list()
        .unwrap()
        .into_iter()
        .filter(|k| k.state != KeyState::Destroyed)
        .collect();
    assert_eq!(b.list().unwrap(), expected);
    let (ka, kb) = (a.export().unwrap(), b.export().unwrap());
    for rb in &kb {
        let ra = ka.iter().find(|r| r.meta.key_id == rb.meta.key_id).unwrap();
        assert!(ra.secret.as_ref().unwrap().ct_eq(rb.secret.as_ref().unwrap()));
    }
    // Restoring again is idempotent.
    assert!(!b.restore_backup(&bytes, &password()).unwrap().changed());
}

fn sample() -> (tempfile::TempDir, Vec<u8>, SealedStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut a = store(&dir, "a");
    a.rotate().unwrap();
    a.rotate().unwrap();
    let bytes = a
        .create_backup(&password(), "hint", KdfParams::insecure_for_tests())
        .unwrap()
        .bytes;
    let mut target = store(&dir, "target");
    target.rotate().unwrap();
    (dir, bytes, target)
}

fn assert_untouched(target: &SealedStore, before: &[sso_proto::KeyMeta], epoch: u64) {
    assert_eq!(target.list().unwrap(), before);
    assert_eq!(target.epoch().unwrap(), epoch);
}

#[test]
fn wrong_password_is_its_own_error() {
    let (_dir, bytes, mut target) = sample();
    let (before, epoch) = (target.list().unwrap(), target.epoch().unwrap());
    let err = target
        .restore_backup(&bytes, &SecretString::from("not it"))
        .unwrap_err();
    assert!(matches!(err, Error::WrongBackupPassword), "{err}");
    assert_untouched(&target, &before, epoch);
    // The hint is readable without the password.
    assert_eq!(backup::read_info(&bytes).unwrap().hint, "hint");
}

#[test]
fn every_truncation_is_refused() {
    let (_dir, bytes, mut target) = sample();
    let (before, epoch) = (target.list().unwrap(), target.epoch().unwrap());
    for len in 0..bytes.len() {
        let err = target.restore_backup(&bytes[..len], &password()).unwrap_err();
        match err {
            Error::BackupTruncated { .. } => {}
            Error::NotABackup if len == 0 => {}
            other => panic!("truncated to {len}: unexpected {other}"),
        }
    }
    assert_untouched(&target, &before, epoch);
}

#[test]
fn every_byte_flip_is_refused() {
    let (_dir, bytes, mut target) = sample();
    let (before, epoch) = (target.list().unwrap(), target.epoch().unwrap());
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        let err = target.restore_backup(&bad, &password()).unwrap_err();
        // Each flip lands on some field; all of them must be caught, by the parser, the
        // password verifier or the payload's authentication.
        assert!(
            matches!(
                err,
                Error::NotABackup
                    | Error::UnsupportedBackupVersion(_)
                    | Error::BackupTruncated { .. }
                    | Error::BackupMalformed(_)
                    | Error::WrongBackupPassword
                    | Error::BackupTampered
                    | Error::Kdf(_)
            ),
            "flip at {i}: {err}"
        );
    }
    // A flip in the payload with the right password is specifically "tampered".
    let mut bad = bytes.clone();
    let last = bad.len() - 20;
    bad[last] ^= 0x40;
    assert!(matches!(
        target.restore_backup(&bad, &password()),
        Err(Error::BackupTampered)
    ));
    // A flip in the hint too: the header is authenticated.
    let mut bad = bytes.clone();
    bad[11] ^= 0x01;
    assert!(matches!(
        target.restore_backup(&bad, &password()),
        Err(Error::BackupTampered)
    ));
    assert_untouched(&target, &before, epoch);
}

#[test]
fn unknown_version_and_foreign_files_are_named() {
    let (_dir, bytes, mut target) = sample();
    let mut newer = bytes.clone();
    newer[8] = FORMAT_VERSION + 1;
    assert!(matches!(
        target.restore_backup(&newer, &password()),
        Err(Error::UnsupportedBackupVersion(2))
    ));
    assert!(matches!(
        backup::read_info(&newer),
        Err(Error::UnsupportedBackupVersion(2))
    ));
    assert!(matches!(
        target.restore_backup(b"PK\x03\x04 a zip file", &password()),
        Err(Error::NotABackup)
    ));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        target.restore_backup(&longer, &password()),
        Err(Error::BackupMalformed(_))
    ));
}

#[test]
fn a_hint_that_gives_away_the_password_is_refused() {
    let (_dir, _bytes, target) = sample();
    let err = target
        .create_backup(
            &password(),
            "it is A LONG BACKUP PASSWORD",
            KdfParams::insecure_for_tests(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::BackupMalformed(_)));
}

#[test]
fn backup_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut a = store(&dir, "a");
    a.rotate().unwrap();
    let path = dir.path().join("b.ssob");
    a.write_backup_file(&path, &password(), "", KdfParams::insecure_for_tests())
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

/// A crafted header asking for 1 GiB and 64 passes (inside the old, store-level bounds)
/// is refused when the header is read, before any KDF runs; so is writing one.
#[test]
fn a_costly_kdf_header_is_refused_before_the_kdf_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = store(&dir, "a");
    a.rotate().unwrap();
    let pending = a
        .create_backup(&password(), "", KdfParams::insecure_for_tests())
        .unwrap();
    let mut bytes = pending.bytes.clone();
    let hint_len = usize::from(u16::from_be_bytes([bytes[9], bytes[10]]));
    let node_at = 11 + hint_len + 8;
    let kdf_at = node_at + 1 + usize::from(bytes[node_at]);
    for (offset, value) in [(0, 1024 * 1024), (4, 64), (8, 16)] {
        let mut crafted = bytes.clone();
        crafted[kdf_at + offset..kdf_at + offset + 4].copy_from_slice(&(value as u32).to_be_bytes());
        let started = std::time::Instant::now();
        assert!(
            matches!(backup::read_info(&crafted), Err(Error::BackupMalformed(m)) if m.contains("argon2")),
            "field at +{offset} = {value} accepted"
        );
        assert!(matches!(
            a.restore_backup(&crafted, &password()),
            Err(Error::BackupMalformed(_))
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    // The largest accepted header still opens (here with the right password).
    bytes[kdf_at..kdf_at + 4].copy_from_slice(&KdfParams::FILE_MAX_MEMORY_KIB.to_be_bytes());
    assert!(backup::read_info(&bytes).is_ok());
    let too_costly = KdfParams {
        memory_kib: KdfParams::FILE_MAX_MEMORY_KIB * 2,
        passes: 1,
        lanes: 1,
    };
    assert!(matches!(
        a.create_backup(&password(), "", too_costly),
        Err(Error::Kdf(_))
    ));
}
