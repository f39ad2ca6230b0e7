//! `sso-client`: the client library with its in-memory key cache, and the `sso-agent`
//! daemon. The cache arrives with the client milestone; today this crate holds the
//! process-hardening helper that the server uses too.
//!
//! # Layout
//! - [`hardening`]: no core dumps, non-dumpable, locked memory; the workspace's only
//!   `unsafe` code.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod hardening;
