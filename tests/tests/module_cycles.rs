//! No import circles between the modules of any crate (issue 11): for every crate of the
//! workspace, each top-level module's source (with its submodule files) is read, every
//! path in code (comments and doc comments left out) that names another top-level module
//! is an edge, and the graph must have no cycle. A circle is reported as `a -> b -> a` with
//! the lines that make each edge.
//!
//! A path names a module as `crate::b…`, as `crate::Item` where the crate root re-exports
//! `Item` from `b` (`pub use b::{Item, …};`), inside a `use crate::{…}` group (over as many
//! lines as it takes), or as `super::b…` / `super::super::b…` climbing to the crate root from
//! a module's file. Test code (an item under `#[cfg(test)]`, such as `mod tests { … }`, and
//! the file of a `#[cfg(test)] mod tests;`) is a leaf of its own: nothing imports it, so it
//! closes no circle, and its imports are not the module's.
//! `a_circle_is_found_however_the_path_is_spelled` shows each spelling found.

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

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The code of a file that is not test code: `(line number, code)` for each line kept, and
/// the names of the submodules it declares under `#[cfg(test)]` (`mod tests;`), whose files
/// are test code too. The item after a `#[cfg(test)]` runs to its `;` or to the `}` that
/// closes its first `{`.
fn non_test_code(text: &str) -> (Vec<(usize, String)>, Vec<String>) {
    let mut kept = Vec::new();
    let mut test_files = Vec::new();
    let mut lines = text.lines().enumerate().map(|(n, l)| (n + 1, code(l)));
    while let Some((n, line)) = lines.next() {
        let Some(same_line) = line.trim().strip_prefix("#[cfg(test)]") else {
            kept.push((n, line.to_owned()));
            continue;
        };
        let mut depth = 0usize;
        let mut opened = false;
        let first = Some((n, same_line)).filter(|(_, rest)| !rest.trim().is_empty());
        for (_, item) in first.into_iter().chain(lines.by_ref()) {
            let item = item.trim();
            if !opened
                && item.ends_with(';')
                && !item.contains('{')
                && let Some((_, name)) = item.trim_end_matches(';').rsplit_once("mod ")
            {
                test_files.push(name.trim().to_owned());
            }
            for c in item.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            if (opened && depth == 0) || (!opened && item.ends_with(';')) {
                break;
            }
        }
    }
    (kept, test_files)
}

/// The first segments of each `use` group element or path after `prefix` (`crate::` or a
/// chain of `super::`) in `code`, with their byte offsets: `{a, b::c}` groups expanded, at
/// any depth of lines.
fn paths_after(code: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = code[at..].find(prefix) {
        let start = at + i;
        at = start + prefix.len();
        // `foo_crate::` is another crate's path; `super::super::` is found once, whole.
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let rest = &code[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut at_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                if is_ident(c) {
                    if at_start && depth == 0 {
                        ident.push(c);
                    }
                    continue;
                }
                if !ident.is_empty() {
                    out.push((start, std::mem::take(&mut ident)));
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
                out.push((start, ident));
            }
        } else {
            let ident: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            if !ident.is_empty() && ident != "super" {
                out.push((start, ident));
            }
        }
    }
    out
}

/// The first path segments after each `crate::` in `code`, `{a, b::c}` groups expanded.
fn crate_paths(code: &str) -> Vec<String> {
    paths_after(code, "crate::").into_iter().map(|(_, p)| p).collect()
}

/// What the crate root re-exports from its modules: item name -> module
/// (`pub use store::{SealedStore, Store as S};`, `pub(crate) use model::KeyRecord;`).
fn reexports(src: &Path, modules: &BTreeMap<String, Vec<PathBuf>>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for root in ["lib.rs", "main.rs"] {
        let Ok(text) = std::fs::read_to_string(src.join(root)) else {
            continue;
        };
        let (kept, _) = non_test_code(&text);
        let code: String = kept.iter().map(|(_, l)| format!("{l}\n")).collect();
        for statement in code.split(';') {
            let statement = statement.trim();
            let Some(path) = ["pub use ", "pub(crate) use "]
                .iter()
                .find_map(|p| statement.rsplit_once(p).map(|(_, path)| path))
            else {
                continue;
            };
            let path = path.trim_start_matches("crate::").trim_start_matches("self::");
            let Some((module, items)) = path.split_once("::") else {
                continue;
            };
            if !modules.contains_key(module.trim()) {
                continue;
            }
            // Each element's name as re-exported: its last segment, or its `as` alias.
            let items = items.rsplit_once('{').map_or(items, |(_, group)| group);
            for element in items.trim_end_matches('}').split(',') {
                let name = element
                    .rsplit(" as ")
                    .next()
                    .unwrap_or("")
                    .rsplit("::")
                    .next()
                    .unwrap_or("")
                    .trim();
                if !name.is_empty() && name.chars().all(is_ident) {
                    out.insert(name.to_owned(), module.trim().to_owned());
                }
            }
        }
    }
    out
}

/// module -> module it uses -> the lines that use it.
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let reexported = reexports(src, &modules);
    let resolve = |name: &str| {
        if modules.contains_key(name) {
            Some(name.to_owned())
        } else {
            reexported.get(name).cloned()
        }
    };
    // Test code first: the files declared by `#[cfg(test)] mod NAME;`.
    let mut test_files = BTreeSet::new();
    let mut code = BTreeMap::new();
    for file in modules.values().flatten() {
        let text = std::fs::read_to_string(file).unwrap();
        let (kept, tests) = non_test_code(&text);
        // `a.rs`'s submodules live in `a/`, `a/mod.rs`'s beside it.
        let dir = match file.file_stem().and_then(|s| s.to_str()) {
            Some("mod") => file.parent().unwrap().to_path_buf(),
            _ => file.with_extension(""),
        };
        for name in tests {
            test_files.insert(dir.join(format!("{name}.rs")));
            test_files.insert(dir.join(&name).join("mod.rs"));
        }
        code.insert(file.clone(), kept);
    }
    let mut graph = Graph::new();
    for (module, files) in &modules {
        let edges = graph.entry(module.clone()).or_default();
        for file in files {
            if test_files.contains(file) || file.ancestors().any(|a| test_files.contains(&a.join("mod.rs"))) {
                continue;
            }
            // How deep the file's own module lies: `a.rs` and `a/mod.rs` 1, `a/b.rs` 2.
            let relative = file.strip_prefix(src).unwrap();
            let depth = relative.components().count() - usize::from(file.file_stem().is_some_and(|s| s == "mod"));
            let kept = &code[file];
            let mut text = String::new();
            let mut starts = Vec::new();
            for (n, line) in kept {
                starts.push((text.len(), *n));
                text.push_str(line);
                text.push('\n');
            }
            let line_of = |offset: usize| starts[starts.partition_point(|(s, _)| *s <= offset) - 1].1;
            let mut found = paths_after(&text, "crate::");
            // `super::` repeated `depth` times is the crate root.
            found.extend(paths_after(&text, &"super::".repeat(depth)));
            for (offset, name) in found {
                let Some(target) = resolve(&name) else { continue };
                if &target != module {
                    edges
                        .entry(target)
                        .or_default()
                        .push(format!("{}:{}", file.display(), line_of(offset)));
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

/// A crate written into a temporary directory: `files` are (path under `src/`, text).
fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = dir.path().join("src").join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

/// Each way of naming a module that `b` (which `a` uses) may take to use `a` back: each
/// is a circle the graph must see.
#[test]
fn a_circle_is_found_however_the_path_is_spelled() {
    let b = "pub struct G;\npub fn g(_: &crate::a::F) {}\n";
    let lib = "mod a;\nmod b;\npub use a::{F, f};\n";
    let cases: [(&str, &[(&str, &str)]); 5] = [
        (
            "through the crate root's re-export",
            &[
                ("lib.rs", "mod a;\nmod b;\npub use a::F;\npub use b::{G, g as h};\n"),
                ("a.rs", "pub struct F;\npub fn f(_: &crate::G) {}\n"),
                ("b.rs", "pub struct G;\npub fn g(_: &crate::F) {}\n"),
            ],
        ),
        (
            "a `use crate::{…}` group over several lines",
            &[
                ("lib.rs", lib),
                (
                    "a.rs",
                    "use crate::{\n    b::G,\n};\npub struct F;\npub fn f(_: &G) {}\n",
                ),
                ("b.rs", b),
            ],
        ),
        (
            "`super::` from a top-level module",
            &[
                ("lib.rs", lib),
                ("a.rs", "pub struct F;\npub fn f(_: &super::b::G) {}\n"),
                ("b.rs", b),
            ],
        ),
        (
            "`super::super::` from a module's own file",
            &[
                ("lib.rs", lib),
                ("a/mod.rs", "mod inner;\npub struct F;\n"),
                ("a/inner.rs", "pub fn f(_: &super::super::b::G) {}\n"),
                ("b.rs", b),
            ],
        ),
        (
            "code after a test module",
            &[
                ("lib.rs", lib),
                (
                    "a.rs",
                    "#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() {}\n}\npub struct F;\npub fn f(_: &crate::b::G) {}\n",
                ),
                ("b.rs", b),
            ],
        ),
    ];
    for (how, files) in cases {
        let dir = fixture(files);
        let graph = graph(&dir.path().join("src"));
        let cycle = find_cycle(&graph).unwrap_or_else(|| panic!("no circle found {how}: {graph:?}"));
        assert_eq!(cycle.len(), 3, "{how}: {cycle:?}");
    }
}

/// Test code is a leaf: a module's `#[cfg(test)]` items and test files may use what uses
/// the module (store's tests through the `Store` trait whose impl names the store) without
/// making a circle, and what stands after them is still the module's.
#[test]
fn test_code_closes_no_circle() {
    let b = "pub struct G;\npub fn g(_: &crate::a::F) {}\n";
    let cases: [&[(&str, &str)]; 3] = [
        &[
            ("lib.rs", "mod a;\nmod b;\n"),
            (
                "a.rs",
                "pub struct F;\n#[cfg(test)]\nmod tests {\n    use crate::b::G;\n    fn t(_: G) {}\n}\n",
            ),
            ("b.rs", b),
        ],
        &[
            ("lib.rs", "mod a;\nmod b;\n"),
            ("a.rs", "pub struct F;\n#[cfg(test)]\nmod tests;\n"),
            ("a/tests.rs", "use crate::b::G;\n"),
            ("b.rs", b),
        ],
        &[
            ("lib.rs", "mod a;\nmod b;\npub use b::G;\n"),
            (
                "a.rs",
                "pub struct F;\n#[cfg(test)] use crate::G;\n#[cfg(test)]\nfn t(_: crate::G) {\n}\n",
            ),
            ("b.rs", b),
        ],
    ];
    for files in cases {
        let dir = fixture(files);
        let graph = graph(&dir.path().join("src"));
        assert_eq!(find_cycle(&graph), None, "{files:?}: {graph:?}");
        assert!(graph["b"].contains_key("a"), "{graph:?}");
    }
}

/// The rows of the markdown table under `heading` in `doc`: (first cell, last cell).
fn table_rows<'a>(doc: &'a str, heading: &str) -> Vec<(&'a str, &'a str)> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in the document"));
    let section = &doc[start + heading.len()..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim().trim_matches('|').split('|').collect();
            (cells[0].trim(), cells[cells.len() - 1].trim())
        })
        .collect()
}

/// docs/architecture.md's table of the server's modules says what each one "may import":
/// the modules named there in backticks, and every row above it where it says "above".
/// Every module of `sso-server/src` has its row, and imports nothing its row does not
/// allow (the graph is this file's: test code left out).
#[test]
fn the_server_modules_import_only_what_docs_architecture_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let rows = table_rows(&doc, "## sso-server modules");
    let graph = graph(&root.join("sso-server/src"));
    let named: Vec<String> = rows.iter().map(|(m, _)| m.trim_matches('`').to_owned()).collect();
    let mut problems = Vec::new();
    for module in graph.keys().filter(|m| !named.contains(m)) {
        problems.push(format!("`{module}` has no row"));
    }
    for module in named.iter().filter(|m| !graph.contains_key(*m)) {
        problems.push(format!("`{module}` has a row but no source"));
    }
    for (i, (module, may)) in rows.iter().enumerate() {
        let module = module.trim_matches('`');
        let mut allowed: BTreeSet<&str> = may.split('`').skip(1).step_by(2).collect();
        if may.contains("above") {
            allowed.extend(named[..i].iter().map(String::as_str));
        }
        for (used, lines) in graph.get(module).into_iter().flatten() {
            if !allowed.contains(used.as_str()) {
                problems.push(format!("`{module}` imports `{used}` ({})", lines[0]));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/architecture.md's sso-server modules table is out of date:\n{}",
        problems.join("\n")
    );
}
