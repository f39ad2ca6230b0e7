//! No Debug or Display output of a public type, and no error text, contains a test key's
//! bytes (as hex, base64 or a Debug byte list) or the passphrase.

use base64::Engine;
use keystore::backup;
use keystore::{CreateOptions, Error, KdfParams, SealedStore, Store, UnsealKey};
use secrecy::SecretString;
use sso_proto::{EnvelopeKey, KeyId};

const PASSPHRASE: &str = "redaction-test-passphrase-7d1f";
const BACKUP_PASSWORD: &str = "backup-password-c0ffee";

/// Every way a secret's bytes could be spelled in text.
fn spellings(secret: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut out = vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        b64.encode(secret),
        b64url.encode(secret),
        format!("{secret:?}"),
        format!("{:?}", &secret[..8]),
    ];
    // Shorter windows, so a partial dump is caught too.
    out.push(hex::encode(&secret[..12]));
    out.push(b64.encode(&secret[..12]));
    out
}

fn assert_clean(texts: &[String], secrets: &[Vec<u8>]) {
    let mut forbidden: Vec<String> = secrets.iter().flat_map(|s| spellings(s)).collect();
    forbidden.push(PASSPHRASE.into());
    forbidden.push(BACKUP_PASSWORD.into());
    for text in texts {
        for bad in &forbidden {
            assert!(!text.contains(bad.as_str()), "secret leaked into text: {text}");
        }
    }
}

#[test]
fn debug_display_and_errors_never_show_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let unseal = UnsealKey::passphrase(SecretString::from(PASSPHRASE)).unwrap();
    let options = CreateOptions {
        node: "n".into(),
        kdf: KdfParams::insecure_for_tests(),
    };
    let mut store = SealedStore::create(&path, &unseal, &options).unwrap();
    let k1 = store.rotate().unwrap();
    store.stage_new().unwrap();

    let keyring = store.keyring().unwrap();
    let secrets: Vec<Vec<u8>> = keyring
        .keys
        .iter()
        .map(|r| r.secret.as_ref().unwrap().expose_secret().to_vec())
        .collect();
    let envelope_key = EnvelopeKey::new(k1.key_id, keyring.keys[0].secret.as_ref().unwrap());
    let password = SecretString::from(BACKUP_PASSWORD);
    let pending = store
        .create_backup(&password, "hint", KdfParams::insecure_for_tests())
        .unwrap();

    let keyfile_path = dir.path().join("k.key");
    let keyfile = UnsealKey::generate_key_file(&keyfile_path).unwrap();
    let keyfile_bytes = std::fs::read(&keyfile_path).unwrap();

    let mut texts = vec![
        format!("{store:?}"),
        format!("{keyring:?}"),
        format!("{:?}", store.export().unwrap()),
        format!("{:?}", store.status().unwrap()),
        format!("{:?}", store.list().unwrap()),
        format!("{pending:?}"),
        format!("{:?}", backup::read_info(&pending.bytes).unwrap()),
        format!("{unseal:?}"),
        format!("{keyfile:?}"),
        format!("{envelope_key:?}"),
        format!("{:?}", sso_proto::envelope::seal(&envelope_key, b"", b"x").map(|_| ())),
    ];

    // Provoke every error path that has a secret nearby and collect its texts.
    let mut errors: Vec<Error> = Vec::new();
    drop(store);
    errors.push(SealedStore::open(&path, &UnsealKey::passphrase(SecretString::from("wrong")).unwrap()).unwrap_err());
    errors.push(SealedStore::open(&path, &keyfile).unwrap_err());
    let mut store = SealedStore::open(&path, &unseal).unwrap();
    errors.push(
        store
            .restore_backup(&pending.bytes, &SecretString::from("nope"))
            .unwrap_err(),
    );
    let mut tampered = pending.bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    errors.push(store.restore_backup(&tampered, &password).unwrap_err());
    errors.push(store.restore_backup(&pending.bytes[..40], &password).unwrap_err());
    errors.push(
        store
            .create_backup(&password, BACKUP_PASSWORD, KdfParams::insecure_for_tests())
            .unwrap_err(),
    );
    errors.push(store.retire(k1.key_id).unwrap_err());
    errors.push(store.destroy(k1.key_id).unwrap_err());
    errors.push(store.retire(KeyId::from_bytes([9; 16])).unwrap_err());
    let forged = keystore::KeyRecord {
        meta: store.key_meta(k1.key_id).unwrap(),
        secret: Some(sso_proto::MasterSecret::copy_from_slice(&[0xAB; 32]).unwrap()),
    };
    errors.push(store.merge(&[forged]).unwrap_err());
    std::fs::write(dir.path().join("bad.key"), b"short").unwrap();
    std::fs::set_permissions(
        dir.path().join("bad.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    errors.push(UnsealKey::key_file(&dir.path().join("bad.key")).unwrap_err());
    for e in &errors {
        texts.push(e.to_string());
        texts.push(format!("{e:?}"));
    }
    assert_clean(&texts, &[secrets.clone(), vec![keyfile_bytes]].concat());

    // Self-check: the scan does catch a leak when there is one.
    let leaked = format!("oops {}", hex::encode(&secrets[0]));
    let caught = std::panic::catch_unwind(|| assert_clean(&[leaked], &secrets));
    assert!(caught.is_err(), "the scanner missed a deliberate leak");
}
