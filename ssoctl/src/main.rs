//! `ssoctl`: the operator CLI. Arrives with the server issue.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("ssoctl is not built yet: it arrives with the CLI milestone (see README.md)");
    std::process::exit(69);
}
