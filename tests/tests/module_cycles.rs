//! No import circles between the modules of any crate (issue 11): for every crate of the
//! workspace, each top-level module's source (with its submodule files) is read, every
//! `crate::NAME` in code (comments and doc comments left out, `use crate::{a, b::c}`
//! groups expanded) that names another top-level module is an edge, and the graph must
//! have no cycle. A circle is reported as `a -> b -> a` with the lines that make each edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's members, read from its Cargo.toml (`members = [ "a", # comment ... ]`),
/// so a crate added later is checked too.
fn members(root: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let start = manifest.find("members = [").unwrap();
    let list = &manifest[start..start + manifest[start..].find(']').unwrap()];
    list.lines()
        .filter_map(|l| code_toml(l).split('"').nth(1))
        .map(str::to_owned)
        .collect()
}

fn code_toml(line: &str) -> &str {
    line.find('#').map_or(line, |i| &line[..i])
}

/// Every top-level module of the crate rooted at `src`: its name and its files.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            // `src/bin` holds binaries (their own crates); `src/x/` holds module x's files.
            if stem != "bin" {
                out.entry(stem).or_default().extend(rust_files(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs") && !["lib", "main"].contains(&stem.as_str()) {
            out.entry(stem).or_default().push(path);
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The code of a line: without its `//` comment (doc comments included). Good enough for
/// this workspace's style (no `//` inside the string literals that mention `crate::`).
fn code(line: &str) -> &str {
    line.find("//").map_or(line, |i| &line[..i])
}

/// The first path segments after each `crate::` in `code`, `{a, b::c}` groups expanded.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `foo_crate::` is another crate's path.
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut at_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                if c.is_alphanumeric() || c == '_' {
                    if at_start && depth == 0 {
                        ident.push(c);
                    }
                    continue;
                }
                if !ident.is_empty() {
                    out.push(std::mem::take(&mut ident));
                    at_start = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    _ => {}
                }
            }
            if !ident.is_empty() {
                out.push(ident);
            }
        } else {
            let ident: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(ident);
        }
    }
    out
}

/// module -> module it uses -> the lines that use it.
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let names: BTreeSet<&String> = modules.keys().collect();
    let mut graph = Graph::new();
    for (module, files) in &modules {
        let edges = graph.entry(module.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in text.lines().enumerate() {
                for target in crate_paths(code(line)) {
                    if &target != module && names.contains(&target) {
                        edges
                            .entry(target)
                            .or_default()
                            .push(format!("{}:{}", file.display(), n + 1));
                    }
                }
            }
        }
    }
    graph
}

/// One cycle, if the graph has any: the modules in order, the first repeated at the end.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_parser_reads_paths_groups_and_skips_comments() {
    assert_eq!(crate_paths("use crate::config::RolesConfig;"), ["config"]);
    assert_eq!(
        crate_paths("use crate::{Error, Result, fsutil, model::{self, Lifecycle}, validate};"),
        ["Error", "Result", "fsutil", "model", "validate"]
    );
    assert_eq!(
        crate_paths("let x: Arc<crate::state::AppState> = crate::peer::f();"),
        ["state", "peer"]
    );
    assert_eq!(crate_paths("use foo_crate::bar;"), Vec::<String>::new());
    assert_eq!(code("/// see [`crate::peer::Peer`]"), "");
    assert_eq!(code("x(); // crate::peer"), "x(); ");
    let mut g = Graph::new();
    g.entry("a".into()).or_default().entry("b".into()).or_default();
    g.entry("b".into()).or_default().entry("c".into()).or_default();
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().entry("a".into()).or_default();
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn no_crate_has_an_import_circle() {
    // SSO_LAYERING_ROOT checks another checkout (to show what the test finds there).
    let root = std::env::var_os("SSO_LAYERING_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf());
    let root = root.as_path();
    let mut failures = Vec::new();
    let crates = members(root);
    assert!(
        crates.len() >= 8 && crates.iter().any(|c| c == "sso-server"),
        "members: {crates:?}"
    );
    for krate in &crates {
        let graph = graph(&root.join(krate).join("src"));
        // A crate of one file (lib.rs only) has no modules to check.
        let src = root.join(krate).join("src");
        assert!(
            src.join("lib.rs").exists() || src.join("main.rs").exists(),
            "{krate}: no lib.rs or main.rs under {}",
            src.display()
        );
        if let Some(cycle) = find_cycle(&graph) {
            let mut text = format!("{krate}: {}", cycle.join(" -> "));
            for pair in cycle.windows(2) {
                let lines = &graph[&pair[0]][&pair[1]];
                text.push_str(&format!("\n  {} -> {}: {}", pair[0], pair[1], lines.join(", ")));
            }
            failures.push(text);
        }
    }
    assert!(failures.is_empty(), "import circles:\n{}", failures.join("\n"));
}
