//! `sso-daemon`: what the two daemons of the master-secret service (`sso-server` and
//! `sso-agent`) share at their edges, so that each is written once.
//!
//! # Layout
//! - [`json`]: the JSON side of their HTTP services: the error body
//!   `{"error": CODE, "message": …}`, replies, request parsing that never echoes a value,
//!   and bounded body reading into a buffer that is wiped, with every intermediate copy.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod json;
