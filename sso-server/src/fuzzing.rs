//! Entry points for `fuzz/`: each takes arbitrary bytes and must never panic.

/// A peer replication body (`/v1/peer/merge`, `/v1/peer/keys`), then the validation every
/// merge runs before it writes, against an empty store and against one with a primary.
/// The same bytes as a peer's answer to a promotion (`/v1/peer/promote`).
pub fn peer_records(data: &[u8]) {
    let _ = crate::peer::promoted_answer(data);
    let Ok(keys) = sso_proto::wire::parse_records(data) else {
        return;
    };
    let _ = keystore::validate::check_incoming(&[], &keys.records);
    let stored: Vec<sso_proto::KeyMeta> = keys
        .records
        .iter()
        .take(1)
        .map(|r| sso_proto::KeyMeta {
            state: sso_proto::KeyState::Primary,
            ..r.meta.clone()
        })
        .collect();
    let _ = keystore::validate::check_incoming(&stored, &keys.records);
}

/// A peer's backup coverage answer (`GET /v1/peer/coverage`), through the reader status
/// uses, then what status does with it (`status::merge_coverage`): the backup time as a
/// date, and the keys it covers taken out of a list of this node's keys.
pub fn peer_coverage(data: &[u8]) {
    let Some(coverage) = sso_proto::wire::parse_coverage(data) else {
        return;
    };
    let mut ours = keystore::StoreStatus {
        node: "fuzz".into(),
        store_id: String::new(),
        epoch: 0,
        primary: None,
        keys: Vec::new(),
        not_backed_up: coverage.backed_up.iter().rev().copied().collect(),
        backed_up: Vec::new(),
        last_backup_at: None,
        unseal_kind: keystore::UnsealKind::KeyFile,
        shared_database: None,
    };
    crate::status::merge_coverage(&mut ours, &coverage);
}

/// A configuration file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(config) = crate::config::Config::parse(text)
    {
        let _ = config.validate();
    }
}

/// A request line: method and path through the router, and the admin JSON bodies.
pub fn request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (method, rest) = text.split_once(' ').unwrap_or(("GET", &text));
    if let Ok(method) = hyper::Method::from_bytes(method.as_bytes()) {
        let _ = crate::api::fuzz_route(&method, rest);
    }
    crate::api::fuzz_bodies(data);
}

/// Audit log lines, through the verifier `ssoctl audit verify` uses.
pub fn audit_line(data: &[u8]) {
    keystore::fuzzing::audit_log(data);
}

/// A CRL file (PEM or DER) through the loader's parse and signature check.
pub fn crl_file(data: &[u8]) {
    crate::tls::fuzz_crl(data);
}
