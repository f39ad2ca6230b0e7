//! docs/operations.md has one table of every exit code and every JSON error code; this
//! test reads the sources for them and fails when one is missing from the table, so the
//! table cannot drift from the code.
//!
//! What it reads:
//! - JSON error codes: every string literal next to an HTTP status in the server's, the
//!   agent's and the shared JSON helper's (sso-daemon) sources (`ApiError::new(StatusCode::X, "code", …)`, `("code", StatusCode::X)`);
//! - exit codes: the `EX_…: u8 = N` constants of sso-server and ssoctl, and the literal
//!   codes sso-agent passes to its `fail(N, …)`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A `"snake_case"` literal at the start of `s` (after whitespace and one optional comma).
fn literal_after(s: &str) -> Option<String> {
    let s = s.trim_start();
    let s = s.strip_prefix(',').unwrap_or(s).trim_start();
    let rest = s.strip_prefix('"')?;
    let end = rest.find('"')?;
    let word = &rest[..end];
    (!word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then(|| word.to_owned())
}

/// The literal that ends just before `s[..at]` (`"code", ` before a `StatusCode::`).
fn literal_before(s: &str, at: usize) -> Option<String> {
    let head = s[..at].trim_end();
    let head = head.strip_suffix(',')?.trim_end();
    let head = head.strip_suffix('"')?;
    let start = head.rfind('"')?;
    let word = &head[start + 1..];
    (!word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then(|| word.to_owned())
}

fn error_codes(text: &str) -> BTreeSet<String> {
    let mut codes = BTreeSet::new();
    for (at, _) in text.match_indices("StatusCode::") {
        let after = &text[at + "StatusCode::".len()..];
        let name_len = after
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .count();
        if name_len == 0 || &after[..name_len] == "OK" || &after[..name_len] == "NO_CONTENT" {
            continue;
        }
        codes.extend(literal_after(&after[name_len..]));
        codes.extend(literal_before(text, at));
    }
    codes
}

fn exit_codes(text: &str) -> BTreeSet<u8> {
    let mut codes = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("const EX_")
            && let Some((_, value)) = line.split_once(": u8 =")
        {
            codes.insert(value.trim().trim_end_matches(';').parse().unwrap());
        }
        for (at, _) in line.match_indices("fail(") {
            let digits: String = line[at + 5..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                codes.insert(n);
            }
        }
    }
    codes
}

#[test]
fn every_exit_code_and_json_error_code_is_in_the_operations_table() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in ["sso-server/src", "sso-agent/src", "sso-daemon/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut errors = BTreeSet::new();
    for file in &files {
        // The KMS service answers gRPC statuses, not JSON errors.
        if file.ends_with("sso-agent/src/kms.rs") || file.ends_with("sso-agent/src/kms/v2.rs") {
            continue;
        }
        errors.extend(error_codes(&std::fs::read_to_string(file).unwrap()));
    }
    let mut exits = BTreeSet::new();
    for file in [
        "sso-server/src/main.rs",
        "ssoctl/src/lib.rs",
        "sso-agent/src/bin/sso-agent.rs",
    ] {
        exits.extend(exit_codes(&std::fs::read_to_string(root.join(file)).unwrap()));
    }
    // The scanner must find what is known to be there, or it proves nothing.
    for known in [
        "store_unavailable",
        "peer_unavailable",
        "forbidden",
        "unavailable",
        "bad_envelope",
        "busy",
    ] {
        assert!(errors.contains(known), "the scanner missed {known}: {errors:?}");
    }
    for known in [64, 65, 66, 69, 70, 74, 77] {
        assert!(
            exits.contains(&known),
            "the scanner missed exit code {known}: {exits:?}"
        );
    }

    let doc = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with('|')).collect();
    let missing_errors: Vec<&String> = errors
        .iter()
        .filter(|c| !rows.iter().any(|r| r.starts_with(&format!("| error | `{c}` |"))))
        .collect();
    let missing_exits: Vec<&u8> = exits
        .iter()
        .filter(|c| !rows.iter().any(|r| r.starts_with(&format!("| exit | {c} |"))))
        .collect();
    assert!(
        missing_errors.is_empty() && missing_exits.is_empty(),
        "docs/operations.md's error table lacks rows for error codes {missing_errors:?} and exit codes {missing_exits:?} \
         (rows look like \"| error | `code` | …\" and \"| exit | 64 | …\")"
    );
}
