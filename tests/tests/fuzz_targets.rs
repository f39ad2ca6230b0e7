//! Every parser of outside input has a fuzz target (BRIEF, docs/fuzzing.md): this checks
//! the bookkeeping that promise rests on, from the files alone (no build, no fuzzing):
//! every target named in the docs exists and is registered in `fuzz/Cargo.toml`, every
//! target is in docs/fuzzing.md's table, and every entry point of a crate's `fuzzing`
//! module is run by a target. A parser given an entry point and a doc line but no target
//! (or a target file that is removed) fails here, naming it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The target files in `fuzz/fuzz_targets/`, by name.
fn target_files() -> BTreeSet<String> {
    std::fs::read_dir(root().join("fuzz/fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The markdown files that may name a target: docs/, SECURITY.md, README.md.
fn docs() -> Vec<(PathBuf, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.extend([root().join("SECURITY.md"), root().join("README.md")]);
    files.into_iter().map(|p| (p.clone(), read(&p))).collect()
}

#[test]
fn every_target_named_in_the_docs_exists_and_is_registered() {
    let files = target_files();
    let manifest = read(&root().join("fuzz/Cargo.toml"));
    let registered: BTreeSet<String> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("path = \"fuzz_targets/"))
        .filter_map(|l| l.strip_suffix(".rs\""))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        registered, files,
        "fuzz/Cargo.toml's [[bin]]s and fuzz/fuzz_targets/ differ"
    );
    let mut named = 0;
    for (path, text) in docs() {
        for (at, _) in text.match_indices("fuzz/fuzz_targets/") {
            let rest = &text[at + "fuzz/fuzz_targets/".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            if name.is_empty() || !rest[end..].starts_with(".rs") {
                continue;
            }
            named += 1;
            assert!(
                files.contains(name),
                "{} names fuzz/fuzz_targets/{name}.rs, which does not exist",
                path.display()
            );
        }
    }
    assert!(
        named >= 5,
        "the docs name only {named} target files: is the scan broken?"
    );
}

#[test]
fn every_target_is_in_the_fuzzing_docs_table() {
    let table = read(&root().join("docs/fuzzing.md"));
    for name in target_files() {
        assert!(
            table.lines().any(|l| l.starts_with(&format!("| `{name}` "))),
            "fuzz target {name} has no row in docs/fuzzing.md's table"
        );
    }
}

/// Each `pub fn NAME(data: &[u8])` of a crate's `fuzzing` module is called as
/// `CRATE::fuzzing::NAME(` by a target, or by another crate's `fuzzing` module that one
/// runs (the server's `audit_line` runs keystore's `audit_log`).
#[test]
fn every_fuzzing_entry_point_is_run_by_a_target() {
    let targets: String = target_files()
        .iter()
        .map(|n| read(&root().join(format!("fuzz/fuzz_targets/{n}.rs"))))
        .collect();
    let crates = ["keystore", "sso-proto", "sso-server", "sso-client", "sso-agent"];
    let modules: Vec<(&str, String)> = crates
        .iter()
        .map(|c| (*c, read(&root().join(c).join("src/fuzzing.rs"))))
        .collect();
    let mut entry_points = 0;
    for (krate, text) in &modules {
        for line in text.lines() {
            let Some(name) = line
                .strip_prefix("pub fn ")
                .and_then(|l| l.strip_suffix("(data: &[u8]) {"))
            else {
                continue;
            };
            entry_points += 1;
            let call = format!("{}::fuzzing::{name}(", krate.replace('-', "_"));
            let by_other = modules.iter().any(|(c, t)| c != krate && t.contains(&call));
            assert!(
                targets.contains(&call) || by_other,
                "{krate}'s fuzzing entry point {name} is run by no target in fuzz/fuzz_targets/"
            );
        }
    }
    assert!(
        entry_points >= 15,
        "only {entry_points} entry points found: is the scan broken?"
    );
}
