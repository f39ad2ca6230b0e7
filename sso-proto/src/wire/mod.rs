//! Every body that crosses the wire, defined once: what the server writes, and what the
//! client library, the agent, ssoctl and the peer read (SPEC §5, docs/pair.md,
//! docs/key-delivery.md).
//!
//! # Layout
//! - [`answers`]: errors and the admin answers (no key material), serde types.
//! - [`exact`]: the one zeroizing writer for bodies that carry key material: a writer runs
//!   twice, counting, then into a buffer of exactly that size that never reallocates.
//! - [`keyring`]: `GET /v1/keyring`, the watch and `GET /v1/keys/{id}`, plain and wrapped,
//!   and their reader.
//! - [`peer`]: the pair protocol: key records and the merge, lease, stage, promote and
//!   coverage answers.
//!
//! Bodies with key material are written by hand through [`exact::Sink`] (serde would
//! leave unwiped copies); every other body is a serde type here, written by the server
//! with `serde_json` and read by its clients with the same type.

pub mod agent;
pub mod answers;
pub mod exact;
pub mod keyring;
pub mod peer;

pub use answers::ErrorBody;
pub use exact::{Count, Sink, WipingBuf, exact};
pub use keyring::{Key, Keyring, Wrap, key_json, keyring_json, opener, parse_key, parse_keyring};
pub use peer::{Coverage, MergeAnswer, PeerKeys, PromoteAnswer, parse_coverage, parse_records, records_json};

#[cfg(test)]
mod tests;
