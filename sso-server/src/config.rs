//! The server's TOML configuration: the `sso-config` crate, shared with `ssoctl doctor`
//! (docs/architecture.md).

pub use sso_config::*;
