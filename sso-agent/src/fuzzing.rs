//! Entry points for `fuzz/`: each takes arbitrary bytes and must never panic.

/// A request body sent to the agent.
pub fn agent_body(data: &[u8]) {
    crate::agent::fuzz_bodies(data);
}
