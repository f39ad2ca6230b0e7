//! `sso-os`: the one OS-facing module of the workspace, and its only `unsafe` code.
//!
//! It is its own crate, the lowest one that needs it, because both audiences need it: the
//! client library (`sso-client` installs the fork hook that keeps buffered envelope
//! nonces from repeating in a forked child) and the two daemons (`sso-server`,
//! `sso-agent` harden their process at start). Putting it in either would make the other
//! link what it does not need.
//!
//! # Layout
//! - [`hardening`]: no core dumps, non-dumpable, locked memory, the `pthread_atfork`
//!   hook; each `unsafe` block is one libc call with its `// SAFETY:` note.
//! - `wipe_probe` (feature `wipe-probe`, tests only): a scanning global allocator that
//!   shows a secret was wiped before its memory was freed.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod hardening;
#[cfg(feature = "wipe-probe")]
pub mod wipe_probe;
