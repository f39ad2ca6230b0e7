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

/// docs/architecture.md's table of crates names, for each crate, every crate of ours it
/// depends on (its Cargo.toml `[dependencies]`) in its "may import" column, and has a row
/// for every member of the workspace.
#[test]
fn docs_architecture_names_every_crate_each_crate_depends_on() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let start = doc.find("## Crates").unwrap();
    let section = &doc[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let rows: Vec<(String, &str)> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim().trim_matches('|').split('|').collect();
            (
                cells[0].trim().split('`').nth(1).unwrap().to_owned(),
                cells[cells.len() - 1],
            )
        })
        .collect();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members: Vec<String> = manifest[manifest.find("members = [").unwrap()..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with(']'))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .collect();
    let mut problems = Vec::new();
    for member in &members {
        let Some((_, may)) = rows.iter().find(|(name, _)| name == member) else {
            if member != "pg-throwaway" {
                problems.push(format!("{member} has no row"));
            }
            continue;
        };
        let cargo = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        let deps = cargo.split("\n[dependencies]\n").nth(1).unwrap_or("");
        let deps = &deps[..deps.find("\n[").unwrap_or(deps.len())];
        let names = |text: &str, name: &str| {
            text.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
                .any(|w| w == name)
        };
        for dep in members.iter().filter(|d| *d != member) {
            let linked = deps
                .lines()
                .any(|l| l.split(['.', ' ', '=']).next() == Some(dep.as_str()));
            if linked && !(may.contains("everything") || names(may, dep)) {
                problems.push(format!("{member} depends on {dep}; its row does not say so"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/architecture.md's table of crates is out of date:\n{}",
        problems.join("\n")
    );
}

/// The picture at the top of docs/architecture.md puts each crate on a row and says "each
/// row links only rows below it": every workspace crate a pictured crate depends on stands
/// on a lower row.
#[test]
fn docs_architecture_picture_has_every_dependency_pointing_down() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let start = doc.find("```text\n").unwrap() + "```text\n".len();
    let picture = &doc[start..start + doc[start..].find("```").unwrap()];
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members: Vec<String> = manifest[manifest.find("members = [").unwrap()..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with(']'))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .collect();
    // Row 0 is the top; a line that names no crate (arrows) is no row.
    let mut row_of = std::collections::BTreeMap::new();
    let mut row = 0;
    for line in picture.lines() {
        let words: Vec<&str> = line
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| members.iter().any(|m| m == w))
            .collect();
        if words.is_empty() {
            continue;
        }
        for word in words {
            row_of.insert(word.to_owned(), row);
        }
        row += 1;
    }
    assert!(row_of.len() >= 10, "the picture names too few crates: {row_of:?}");
    let mut problems = Vec::new();
    for (krate, &at) in &row_of {
        let cargo = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
        let deps = cargo.split("\n[dependencies]\n").nth(1).unwrap_or("");
        let deps = &deps[..deps.find("\n[").unwrap_or(deps.len())];
        for line in deps.lines() {
            let Some(dep) = line.split(['.', ' ', '=']).next() else {
                continue;
            };
            if let Some(&below) = row_of.get(dep)
                && below <= at
            {
                problems.push(format!("{krate} (row {at}) depends on {dep} (row {below})"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/architecture.md's picture has arrows that do not point down:\n{}",
        problems.join("\n")
    );
}

/// `unsafe` code lives only in sso-os (docs/architecture.md, SECURITY.md): no `unsafe`
/// block, fn, impl or trait in any other Rust file of the workspace, tests, benches and
/// fuzz targets included (generated code and build output excepted). Failed when the
/// wipe test of sso-daemon carried its own scanning allocator
/// (`sso-daemon/tests/body_wipe.rs`, now `sso_os::wipe_probe`).
#[test]
fn unsafe_code_is_only_in_sso_os() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = Vec::new();
    let mut dirs = vec![workspace.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') && path != workspace.join("sso-os") {
                    dirs.push(path);
                }
                continue;
            }
            if !name.ends_with(".rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                // The line's code: no comment, no string literal, `{` a word of its own.
                let mut code = String::new();
                let mut in_string = false;
                let mut last = ' ';
                for c in line.split("//").next().unwrap_or("").chars() {
                    if c == '"' && last != '\\' {
                        in_string = !in_string;
                    } else if !in_string && c == '{' {
                        code.push_str(" { ");
                    } else if !in_string {
                        code.push(c);
                    }
                    last = c;
                }
                let words: Vec<&str> = code
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '{'))
                    .filter(|w| !w.is_empty())
                    .collect();
                let unsafe_code = words
                    .windows(2)
                    .any(|w| w[0] == "unsafe" && matches!(w[1], "{" | "fn" | "impl" | "trait" | "extern"));
                if unsafe_code {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "unsafe code outside sso-os (move it into sso-os, the one crate allowed it):\n{}",
        found.join("\n")
    );
}
