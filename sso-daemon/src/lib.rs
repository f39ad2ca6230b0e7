//! `sso-daemon`: what the two daemons of the master-secret service (`sso-server` and
//! `sso-agent`) share at their edges, so that each is written once. Host processes that
//! link the client library never link this. (Process hardening, which the client library
//! needs too, is in `sso-os`.)
//!
//! # Layout
//! - [`process`]: how a fatal error is printed, which signals stop a daemon, systemd's
//!   readiness notification.
//! - [`json`]: the JSON side of their HTTP services: the error body
//!   `{"error": CODE, "message": …}`, replies, request parsing that never echoes a value,
//!   and bounded body reading into a buffer that is wiped, with every intermediate copy.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod json;
pub mod process;
