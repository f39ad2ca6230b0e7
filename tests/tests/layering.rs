//! The crates are split by who links them (issue 11, docs/architecture.md). This test
//! reads the real dependency graph (`cargo tree`) and fails when a crate links what its
//! audience must not get:
//! - `sso-client` is the library a host process links: no command line (clap), config
//!   file (toml), logging subscriber (tracing-subscriber), gRPC (tonic, prost) or daemon
//!   plumbing (sso-daemon), and not the agent;
//! - the daemons' shared crates (sso-daemon, sso-os, sso-tls, sso-transport) do not link
//!   the client;
//! - the server reaches its peer through sso-transport, not through the client library;
//! - ssoctl reads the server's config (sso-config) and verifies the audit log
//!   (keystore::audit) without linking the server, and finds the dev server (sso-devdir)
//!   without linking the agent.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The crate names in the normal (non-dev, non-build) dependency tree of `package`.
fn normal_dependencies(package: &str) -> BTreeSet<String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", package])
        .current_dir(workspace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(names.contains(package), "cargo tree did not list {package}: {text}");
    names
}

fn refuse(package: &str, forbidden: &[&str]) {
    let deps = normal_dependencies(package);
    let found: Vec<&&str> = forbidden.iter().filter(|f| deps.contains(**f)).collect();
    assert!(
        found.is_empty(),
        "{package} links {found:?}; see docs/architecture.md for where they belong"
    );
}

#[test]
fn the_client_library_links_no_cli_config_logging_or_daemon_crates() {
    refuse(
        "sso-client",
        &[
            "clap",
            "clap_builder",
            "toml",
            "tracing-subscriber",
            "tonic",
            "prost",
            "sso-daemon",
            "sso-agent",
            "sso-server",
            "keystore",
        ],
    );
}

#[test]
fn the_shared_low_crates_link_neither_client_nor_server() {
    for package in ["sso-daemon", "sso-os", "sso-tls", "sso-transport"] {
        refuse(
            package,
            &["sso-client", "sso-agent", "sso-server", "keystore", "clap", "toml"],
        );
    }
}

#[test]
fn the_server_links_neither_the_client_library_nor_the_agent() {
    refuse("sso-server", &["sso-client", "sso-agent"]);
}

#[test]
fn ssoctl_does_not_link_the_server() {
    refuse("ssoctl", &["sso-server"]);
    refuse("sso-config", &["sso-server", "sso-client"]);
}

#[test]
fn ssoctl_does_not_link_the_agent() {
    // `--dev DIR` reads the dev server's endpoint from sso-devdir, not from the agent, whose
    // gRPC service (tonic, prost) and daemon plumbing ssoctl has no use for.
    refuse("ssoctl", &["sso-agent", "tonic", "prost", "sso-daemon"]);
}

#[test]
fn the_dev_layout_links_nothing_of_ours() {
    // All three binaries link it, so it may not bring what one of them must not get.
    refuse(
        "sso-devdir",
        &[
            "sso-proto",
            "keystore",
            "sso-config",
            "sso-client",
            "sso-agent",
            "sso-server",
            "sso-daemon",
            "clap",
        ],
    );
}

#[test]
fn the_throwaway_postgresql_is_for_tests_only() {
    // pg-throwaway runs initdb with trust authentication: a test fixture that no shipped
    // binary may link (it is a dev-dependency of the crates that test against it).
    for package in ["keystore", "sso-server", "ssoctl", "sso-agent", "sso-config"] {
        refuse(package, &["pg-throwaway"]);
    }
}
