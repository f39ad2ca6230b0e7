//! Entry points for `fuzz/`: each takes arbitrary bytes and must never panic.

use secrecy::SecretString;

/// A backup file's header and, with a fixed password, its verifier and payload path.
/// The argon2 cost in the input is clamped so each run stays fast.
pub fn backup_file(data: &[u8]) {
    let Ok(info) = crate::backup::read_info(data) else {
        return;
    };
    if info.kdf.memory_kib <= 64
        && info.kdf.passes <= 2
        && let Ok(records) = crate::backup::open(data, &SecretString::from("fuzz"))
    {
        // What a restore checks before it writes.
        let _ = crate::validate::check_incoming(&[], &records);
    }
}

/// The decrypted payload of a backup file.
pub fn backup_payload(data: &[u8]) {
    let _ = crate::backup::decode_payload(data);
}

/// A stored row's wrapped-material blob.
pub fn stored_blob(data: &[u8]) {
    let _ = crate::decode_blob(data);
}

/// A store's manifest: the structure parser, then the tag check under a fixed key (a
/// seed sealed under that key reaches the comparison paths).
pub fn store_manifest(data: &[u8]) {
    if let Ok(manifest) = crate::manifest::Manifest::decode(data) {
        // Whatever decodes re-encodes to the same body.
        let key = crate::manifest::ManifestKey::from_bytes(&[5u8; 32]);
        let again = manifest.seal(&key, &[6u8; 16]);
        assert_eq!(
            again.len(),
            data.len(),
            "a decoded manifest re-encodes to another length"
        );
        assert_eq!(again[..again.len() - 32], data[..data.len() - 32]);
        let _ = crate::manifest::Manifest::open(data, &key, &[6u8; 16]);
    }
}

/// An audit log (one or more lines) through the verifier, keyed with a fixed key, with
/// the first line's count as an anchor when it parses.
pub fn audit_log(data: &[u8]) {
    let key = crate::audit::AuditKey::from_bytes(&[7u8; 32]);
    let files = [std::path::PathBuf::from("fuzz")];
    let open = |_: &std::path::Path| Ok(std::io::Cursor::new(data));
    let anchor = std::str::from_utf8(data)
        .ok()
        .and_then(|t| t.lines().next())
        .and_then(|l| crate::audit::parse_line(l).ok())
        .map(|l| crate::audit::AuditAnchor {
            count: l.seq,
            head: l.mac.to_owned(),
        });
    for start in [crate::audit::Start::Genesis, crate::audit::Start::Any] {
        let _ = crate::audit::verify_with(&files, open, &key, start, anchor.as_ref());
    }
}

/// Valid inputs for each target above, to seed the corpora: `(target, bytes)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use sso_proto::{KeyId, KeyMeta, KeyState, MasterSecret};
    let record = |state| crate::KeyRecord {
        meta: KeyMeta {
            key_id: KeyId::from_bytes([0x11; 16]),
            generation: 7,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            origin: "node-a".into(),
            state,
        },
        secret: Some(MasterSecret::take_from(&mut [0x22; 32])),
    };
    let records = [record(KeyState::Active), record(KeyState::Retired)];
    let mut out = Vec::new();
    let cheap = crate::KdfParams {
        memory_kib: 64,
        passes: 1,
        lanes: 1,
    };
    if let Ok((file, _)) = crate::backup::seal(&records, &SecretString::from("fuzz"), "a hint", "node-a", cheap) {
        out.push(("backup_file", file));
    }
    let refs: Vec<&crate::KeyRecord> = records.iter().collect();
    if let Ok(payload) = crate::backup::encode_payload(&refs) {
        out.push(("backup_payload", payload.to_vec()));
    }
    let mut blob = vec![crate::wrap::WRAP_VERSION];
    blob.extend_from_slice(&[0x33; crate::WRAPPED_LEN - 1]);
    out.push(("stored_blob", blob));
    let manifest = crate::manifest::Manifest::new(
        3,
        records
            .iter()
            .enumerate()
            .map(|(i, r)| crate::manifest::ManifestEntry {
                key_id: KeyId::from_bytes([0x11 + i as u8; 16]),
                generation: r.meta.generation + i as u64,
                lifecycle: i as u8 + 1,
                created_at: r.meta.created_at.unix_timestamp(),
            })
            .collect(),
    );
    let key = crate::manifest::ManifestKey::from_bytes(&[5u8; 32]);
    out.push(("store_manifest", manifest.seal(&key, &[6u8; 16])));
    out
}
