//! `ssoctl`: parse, run, print `error:`/`hint:` and exit with the failure's code.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match ssoctl::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(ssoctl::EX_USAGE),
            };
        }
    };
    let json = cli.global.json;
    let mut out = std::io::stdout().lock();
    match ssoctl::run(cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            drop(out);
            let mut err = std::io::stderr().lock();
            if json {
                let v = serde_json::json!({"error": failure.kind(), "message": failure.message, "hint": failure.hint});
                let _ = writeln!(err, "{v}");
            } else {
                let _ = writeln!(err, "{failure}");
            }
            ExitCode::from(failure.code)
        }
    }
}
