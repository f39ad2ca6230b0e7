//! `sso-agent`: the per-machine key agent, a daemon built on the client library. One
//! [`sso_client::Client`] per machine serves local processes over Unix sockets, so key
//! material never leaves the agent.
//!
//! # Layout
//! - [`agent`]: the HTTP/JSON socket (`curl --unix-socket`), its config file and the
//!   uid allowlist; JSON errors and body reading through `sso_daemon::json`.
//! - [`kms`]: the Kubernetes KMS v2 gRPC service on a second socket (bindings checked in
//!   as `kms/v2.rs`, compared with a regeneration by `tests/kms_proto.rs`).
//! - `bin/sso-agent.rs`: the daemon (`sso_daemon::process` for exits, signals and
//!   readiness; `sso_os::hardening` at start).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod kms;
