//! `sso-server`: the master-secret server daemon; it arrives with the server milestone.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("sso-server is not built yet: it arrives with the server milestone (see README.md)");
    std::process::exit(69);
}
