//! Entry points for `fuzz/`: each takes arbitrary bytes and must never panic.

/// A keyring answer from a server, parsed and applied to an empty cache: a wrapped one
/// (with a `wrap` object) opened by a fresh client key, a plain one as is.
pub fn keyring(data: &[u8]) {
    let Ok(wire) = sso_proto::wire::parse_keyring(data) else {
        return;
    };
    let empty = crate::cache::Cache::default();
    if wire.wrap.is_none() {
        let _ = crate::cache::apply(&empty, wire, 0, None);
        return;
    }
    let Ok(recipient) = sso_proto::delivery::Recipient::generate(&ring::rand::SystemRandom::new()) else {
        return;
    };
    if let Ok(opener) = sso_proto::wire::opener(wire.wrap.as_ref(), recipient, "/v1/keyring") {
        let _ = crate::cache::apply(&empty, wire, 0, Some(&opener));
    }
}
