//! Entry points for `fuzz/`: each takes arbitrary bytes and must never panic.

/// A request body sent to the agent.
pub fn agent_body(data: &[u8]) {
    crate::agent::fuzz_bodies(data);
}

/// The agent's config file (`--config FILE`, the `[kms]` table included), parsed and
/// checked as the agent loads it ([`crate::agent::AgentConfig::parse`]), then the client
/// settings taken from it. A config that parses must write back through `to_toml` (the
/// way the tests write theirs) to text that parses to the same config.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = std::path::Path::new("/etc/sso");
    let Ok(config) = crate::agent::AgentConfig::parse(text, base) else {
        return;
    };
    let _ = config.client_builder();
    let written = config.to_toml();
    let read = crate::agent::AgentConfig::parse(&written, base);
    assert_eq!(read.as_ref(), Ok(&config), "written as:\n{written}");
}
