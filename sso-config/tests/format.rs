//! The file format: existing config files load unchanged, a config written through the
//! type reads back as the same config, and invalid values are refused when the file is
//! read, naming the field and the remedy.

use std::path::{Path, PathBuf};

use sso_config::{Config, LogFormat, MinVersion, Pattern, UnsealSource};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(workspace().join(relative)).unwrap()
}

/// The server config of docs/configuration.md: its first two TOML blocks (the second
/// continues the first with `[log]`, `[delivery]` and `[peer]`).
fn documented_config() -> String {
    let doc = read("docs/configuration.md");
    doc.split("```toml\n")
        .skip(1)
        .take(2)
        .map(|block| block.split("```").next().unwrap())
        .collect()
}

/// The config files we ship or document, by name.
fn shipped() -> Vec<(&'static str, String)> {
    vec![
        ("deploy/config/server.toml", read("deploy/config/server.toml")),
        ("examples/pair/node-a.toml", read("examples/pair/node-a.toml")),
        ("examples/pair/node-b.toml", read("examples/pair/node-b.toml")),
        ("docs/configuration.md", documented_config()),
    ]
}

#[test]
fn shipped_and_documented_configs_parse_unchanged() {
    for (name, text) in shipped() {
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!config.roles.admin.is_empty(), "{name}");
    }
    let deploy = Config::parse(&read("deploy/config/server.toml")).unwrap();
    assert_eq!(deploy.store.unseal, UnsealSource::KeyFile("/etc/sso/unseal.key".into()));
    assert_eq!(deploy.roles.client, vec![Pattern::AnyCn]);
    assert_eq!(deploy.peer.unwrap().identity, Pattern::Cn("node-b".into()));
    let documented = Config::parse(&documented_config()).unwrap();
    assert_eq!(documented.tls.min_version, MinVersion::Tls13);
    assert_eq!(documented.log.format, LogFormat::Text);
    assert_eq!(documented.staging_pause(), std::time::Duration::from_millis(250));
}

#[test]
fn a_config_written_through_the_type_reads_back_the_same() {
    for (name, text) in shipped() {
        let config = Config::parse(&text).unwrap();
        let written = config.to_toml();
        let again = Config::parse(&written).unwrap_or_else(|e| panic!("{name}: {e}\n{written}"));
        assert_eq!(again, config, "{name}:\n{written}");
    }
    // Every variant of every typed field, and the optional fields set.
    let mut config = Config::parse(&documented_config()).unwrap();
    config.tls.min_version = MinVersion::Tls12;
    config.log.format = LogFormat::Json;
    config.limits.first_request_timeout_ms = Some(1234);
    config.rotation.staging_pause_ms = 1500;
    config.roles.client = vec![
        Pattern::AnyCn,
        Pattern::Cn("a:b".into()),
        Pattern::Dns("app.example.com".into()),
        Pattern::Uri("spiffe://example.com/x".into()),
    ];
    for unseal in [
        UnsealSource::KeyFile("k".into()),
        UnsealSource::KeyEnv("K".into()),
        UnsealSource::PassphraseFile("p".into()),
        UnsealSource::PassphraseEnv("P".into()),
        UnsealSource::Prompt,
    ] {
        config.store.unseal = unseal;
        let written = config.to_toml();
        assert_eq!(Config::parse(&written).unwrap(), config, "{written}");
    }
}

/// `text` with the line starting `key =` replaced by `line`.
fn with_line(text: &str, key: &str, line: &str) -> String {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) && !found {
                found = true;
                line.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(found, "no {key} line");
    out.join("\n")
}

#[test]
fn invalid_values_are_refused_when_read_naming_the_field_and_the_remedy() {
    let base = read("deploy/config/server.toml");
    let cases = [
        (
            "min_version",
            "min_version = \"1.1\"",
            "tls.min_version",
            "must be \"1.3\" or \"1.2\"",
        ),
        (
            "unseal",
            "unseal = { key_file = \"a\", key_env = \"B\" }",
            "store.unseal",
            "set exactly one of",
        ),
        ("unseal", "unseal = {}", "store.unseal", "set exactly one of"),
        (
            "unseal",
            "unseal = { prompt = false }",
            "store.unseal",
            "set exactly one of",
        ),
        ("unseal", "unseal = { key_flie = \"a\" }", "store.unseal", "key_flie"),
        // An array's element is named by its value (serde reports the array's position).
        (
            "client",
            "client = [\"cn:ok\", \"ip:1.2.3.4\"]",
            "roles.client",
            "\"ip:1.2.3.4\": unknown identity kind",
        ),
        (
            "admin",
            "admin = [\"admin\"]",
            "roles.admin",
            "\"admin\" is not KIND:VALUE",
        ),
        ("identity", "identity = \"cn:\"", "peer.identity", "empty value"),
    ];
    for (key, line, field, problem) in cases {
        let text = if key == "min_version" {
            base.replace("[tls]\n", &format!("[tls]\n{line}\n"))
        } else {
            with_line(&base, key, line)
        };
        let e = Config::parse(&text).expect_err(line);
        assert!(e.field.starts_with(field), "{line}: field {:?} in {e}", e.field);
        assert!(e.field.contains("(line "), "{line}: {e}");
        assert!(e.problem.contains(problem), "{line}: {e}");
    }
    let e = Config::parse(&format!("{base}\n[log]\nformat = \"xml\"\n")).unwrap_err();
    assert!(e.field.starts_with("log.format") && e.problem.contains("`text`"), "{e}");
    let e = Config::parse(&format!("{base}\n[rotation]\nstaging_pause_msec = 1\n")).unwrap_err();
    assert!(e.field.starts_with("rotation.staging_pause_msec"), "{e}");
}

/// A directory with the files a config names (empty: `load` checks that they exist, the
/// server checks what they hold), and a config in it with relative paths.
fn config_dir(name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("sso-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["server.pem", "server-key.pem", "ca.pem", "store.db", "passphrase"] {
        std::fs::write(dir.join(file), b"").unwrap();
    }
    let text = format!(
        "node = \"n\"\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [tls]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n\
         [store]\npath = \"store.db\"\nunseal = {{ passphrase_file = \"passphrase\" }}\n\
         [audit]\npath = \"audit.log\"\n[roles]\nadmin = [\"cn:admin\"]\n{extra}"
    );
    let path = dir.join("server.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn load_resolves_the_unseal_file_beside_the_config_and_bounds_the_staging_pause() {
    let (dir, path) = config_dir("ok", "[rotation]\nstaging_pause_ms = 30000\n");
    let config = Config::load(&path).unwrap();
    assert_eq!(
        config.store.unseal,
        UnsealSource::PassphraseFile(dir.join("passphrase"))
    );
    assert_eq!(config.store.unseal.file(), Some(dir.join("passphrase").as_path()));
    assert_eq!(config.staging_pause(), std::time::Duration::from_secs(30));
    std::fs::remove_dir_all(&dir).unwrap();

    let (dir, path) = config_dir("long", "[rotation]\nstaging_pause_ms = 30001\n");
    let e = Config::load(&path).unwrap_err();
    assert_eq!(e.field, "rotation.staging_pause_ms", "{e}");
    assert!(e.problem.contains("between 0 and 30000"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What an operator plausibly mistypes (an unseal path given as a bare string, an unquoted
/// TLS version, a negative or quoted pause) is refused naming the field and saying what
/// the value must be, in the file's own terms: no Rust type names (`UnsealFields`, `u64`).
#[test]
fn mistyped_values_are_refused_with_the_remedy_and_no_rust_type_names() {
    let base = read("deploy/config/server.toml");
    let cases = [
        (
            with_line(&base, "unseal", "unseal = \"/etc/sso/unseal.key\""),
            "store.unseal",
            "a table with exactly one of key_file",
        ),
        (
            base.replace("[tls]\n", "[tls]\nmin_version = 1.2\n"),
            "tls.min_version",
            "\"1.3\" or \"1.2\", quoted",
        ),
        (
            format!("{base}\n[rotation]\nstaging_pause_ms = -1\n"),
            "rotation.staging_pause_ms",
            "milliseconds from 0 to 30000",
        ),
        (
            format!("{base}\n[rotation]\nstaging_pause_ms = \"250\"\n"),
            "rotation.staging_pause_ms",
            "milliseconds from 0 to 30000",
        ),
    ];
    for (text, field, remedy) in cases {
        let e = Config::parse(&text).unwrap_err();
        assert!(e.field.starts_with(field), "field {:?} in {e}", e.field);
        assert!(e.problem.contains(remedy), "{e}");
        for rust in ["UnsealFields", "u64", "struct"] {
            assert!(!e.problem.contains(rust), "{rust:?} in {e}");
        }
    }
}
