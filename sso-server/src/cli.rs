//! The command line of `sso-server`, here rather than in `main.rs` so that the packaging
//! tool (`sso-dist`) renders its man page from the same definition.

use std::path::PathBuf;

use clap::Parser;

/// The master-secret server.
#[derive(Parser, Debug)]
#[command(name = "sso-server", version, about)]
pub struct Args {
    /// Configuration file (TOML).
    #[arg(long, conflicts_with = "dev", required_unless_present = "dev")]
    pub config: Option<PathBuf>,
    /// Development mode: create (or reuse) DIR with a dev PKI, store and config, and serve
    /// on 127.0.0.1:7443.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "sso-dev")]
    pub dev: Option<PathBuf>,
}
