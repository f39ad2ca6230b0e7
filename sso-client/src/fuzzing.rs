//! Entry points for `fuzz/`: each takes arbitrary bytes and must never panic.

/// A keyring answer from a server, parsed and applied to an empty cache.
pub fn keyring(data: &[u8]) {
    if let Ok(wire) = crate::cache::parse_keyring(data) {
        let _ = crate::cache::apply(&crate::cache::Cache::default(), wire, 0);
    }
}

/// A request body sent to the agent.
pub fn agent_body(data: &[u8]) {
    crate::agent::fuzz_bodies(data);
}
