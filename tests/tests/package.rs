//! The Debian package (issue 15). deploy/debian/build-deb.sh builds it with cargo-deb, here
//! from the test binaries (profile `package-check`: the same script, no release build);
//! `dpkg-deb -x` unpacks it into a scratch root, and the layout, control fields,
//! maintainer scripts, man pages, completions, example configs and units are checked;
//! `systemd-analyze verify` passes on the installed units.
//!
//! cargo-deb is provisioned here when the machine lacks it (`cargo install` into
//! target/tools, once), so `cargo test --workspace` runs this on a fresh machine rather
//! than skipping it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const CARGO_DEB_VERSION: &str = "3.8.0";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A PATH under which `cargo deb` works: the machine's, or with target/tools/bin in front
/// after installing cargo-deb there.
fn path_with_cargo_deb() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let works = |path: &str| {
        Command::new(env!("CARGO"))
            .args(["deb", "--version"])
            .env("PATH", path)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&path) {
        return path;
    }
    let tools = workspace().join("target/tools");
    let with_tools = format!("{}:{path}", tools.join("bin").display());
    if !works(&with_tools) {
        eprintln!(
            "installing cargo-deb {CARGO_DEB_VERSION} into {} (once)",
            tools.display()
        );
        let status = Command::new(env!("CARGO"))
            .args([
                "install",
                "cargo-deb",
                "--locked",
                "--quiet",
                "--version",
                CARGO_DEB_VERSION,
                "--root",
            ])
            .arg(&tools)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "could not install cargo-deb; try: cargo install cargo-deb --locked"
        );
    }
    assert!(works(&with_tools), "cargo deb does not run after installing it");
    with_tools
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{} is not in the package: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The subcommand names `ssoctl [SUB...] --help` lists under "Commands:", help excluded.
fn subcommands(ssoctl: &Path, parents: &[&str]) -> Vec<String> {
    let help = run(Command::new(ssoctl).args(parents).arg("--help"));
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// `gzip -dc` of a man page.
fn man_text(path: &Path) -> String {
    run(Command::new("gzip").arg("-dc").arg(path))
}

/// A scratch stand-in for a host's /etc/sso and /var/lib/sso, where an example config is
/// installed with its paths moved there and every file it names created (mode 0600), as
/// an operator would before starting the daemon.
struct ExampleHost {
    etc: PathBuf,
    var: PathBuf,
}

fn example_host(dir: &Path) -> ExampleHost {
    let host = ExampleHost {
        etc: dir.join("etc-sso"),
        var: dir.join("var-lib-sso"),
    };
    std::fs::create_dir_all(&host.etc).unwrap();
    std::fs::create_dir_all(&host.var).unwrap();
    host
}

impl ExampleHost {
    fn install(&self, example: &Path) -> PathBuf {
        let text = std::fs::read_to_string(example).unwrap();
        let moved = text
            .replace("/etc/sso/", &format!("{}/", self.etc.display()))
            .replace("/var/lib/sso/", &format!("{}/", self.var.display()));
        let here =
            |w: &&str| w.starts_with(&*self.etc.to_string_lossy()) || w.starts_with(&*self.var.to_string_lossy());
        for word in moved.split('"').filter(here) {
            std::fs::write(word, b"").unwrap();
            std::fs::set_permissions(word, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let installed = self.etc.join(example.file_name().unwrap());
        std::fs::write(&installed, moved).unwrap();
        installed
    }
}

#[test]
fn the_debian_package_installs_binaries_units_man_pages_completions_and_docs() {
    let workspace = workspace();
    let path = path_with_cargo_deb();
    let scratch = tempfile::tempdir().unwrap();
    let target = scratch.path().join("target");
    let profile_dir = target.join("package-check");
    std::fs::create_dir_all(&profile_dir).unwrap();
    // Copies, not links: cargo-deb strips what it packages.
    for binary in ["sso-server", "sso-agent", "ssoctl", "sso-dist"] {
        std::fs::copy(tests::bin(binary), profile_dir.join(binary)).unwrap();
    }
    run(Command::new("bash")
        .arg(workspace.join("deploy/debian/build-deb.sh"))
        .arg("--fast")
        .env("PATH", &path)
        .env("CARGO_TARGET_DIR", &target)
        .env("SSO_DEB_PROFILE", "package-check")
        .env("SSO_DEB_PREBUILT", "1"));
    let version = env!("CARGO_PKG_VERSION");
    let deb = target.join("debian").join(format!("sso_{version}-1_amd64.deb"));
    assert!(deb.exists(), "no {}", deb.display());

    // Control fields and maintainer scripts.
    let fields = run(Command::new("dpkg-deb").arg("-f").arg(&deb));
    for (field, want) in [
        ("Package: ", "sso"),
        ("Version: ", &format!("{version}-1")),
        ("Section: ", "admin"),
    ] {
        assert!(
            fields.lines().any(|l| l == format!("{field}{want}")),
            "{field}{want} not in:\n{fields}"
        );
    }
    let depends = fields.lines().find(|l| l.starts_with("Depends: ")).unwrap_or_default();
    assert!(depends.contains("adduser") && depends.contains("libc6"), "{depends}");
    let control = scratch.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    for account in [
        "adduser --system --group --home /var/lib/sso",
        "--ingroup sso-clients",
        "sso-agent",
    ] {
        assert!(
            postinst.contains(account),
            "postinst does not create {account}:\n{postinst}"
        );
    }
    let postrm = std::fs::read_to_string(control.join("postrm")).unwrap();
    assert!(
        !postrm.contains("rm "),
        "postrm removes files (the store must survive a purge):\n{postrm}"
    );
    for script in ["postinst", "postrm"] {
        assert_eq!(mode(&control.join(script)) & 0o111, 0o111, "{script} is not executable");
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }

    // The files.
    let root = scratch.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    for binary in ["sso-server", "sso-agent", "ssoctl"] {
        let installed = root.join("usr/bin").join(binary);
        assert_eq!(mode(&installed), 0o755, "{binary}");
        let said = run(Command::new(&installed).arg("--version"));
        assert_eq!(said.trim(), format!("{binary} {version}"), "{binary} --version");
    }
    assert!(
        !root.join("usr/bin/sso-dist").exists(),
        "the packaging tool is not for operators"
    );
    let units = root.join("usr/lib/systemd/system");
    let mut verified = Vec::new();
    for (unit, binary) in [("sso-server.service", "sso-server"), ("sso-agent.service", "sso-agent")] {
        let installed = std::fs::read_to_string(units.join(unit)).unwrap();
        let source = std::fs::read_to_string(workspace.join("deploy/systemd").join(unit)).unwrap();
        assert_eq!(installed, source, "{unit} differs from deploy/systemd");
        assert_eq!(mode(&units.join(unit)), 0o644);
        // Verified against the binaries the package installed, where the unit starts them.
        let here = root.join("usr/bin").join(binary);
        let local = installed.replace(&format!("/usr/bin/{binary}"), &here.display().to_string());
        assert_ne!(local, installed, "{unit} does not start /usr/bin/{binary}");
        verified.push((unit, local));
    }
    tests::systemd_verify(&verified);

    // A man page for each program and each ssoctl subcommand (nested ones too), rendered
    // from the same definitions as --help, gzipped as Debian policy wants.
    let man = root.join("usr/share/man/man8");
    let ssoctl = root.join("usr/bin/ssoctl");
    let mut pages = vec!["sso-server".to_owned(), "sso-agent".to_owned(), "ssoctl".to_owned()];
    for sub in subcommands(&ssoctl, &[]) {
        pages.push(format!("ssoctl-{sub}"));
        for nested in subcommands(&ssoctl, &[&sub]) {
            pages.push(format!("ssoctl-{sub}-{nested}"));
        }
    }
    assert!(pages.len() > 15, "{pages:?}");
    for page in &pages {
        let file = man.join(format!("{page}.8.gz"));
        assert_eq!(mode(&file), 0o644, "{page}");
        let text = man_text(&file);
        assert!(
            text.contains(&format!(".TH {page} 8")),
            "{page} is not a section 8 page:\n{text}"
        );
    }
    let rotate = man_text(&man.join("ssoctl-rotate.8.gz"));
    for flag in ["\\-\\-server", "\\-\\-idempotency\\-key", "SSOCTL_SERVER"] {
        assert!(rotate.contains(flag), "ssoctl-rotate(8) lacks {flag}:\n{rotate}");
    }
    let server = man_text(&man.join("sso-server.8.gz"));
    assert!(
        server.contains("\\-\\-config") && server.contains("\\-\\-dev"),
        "{server}"
    );

    // Completions where bash, zsh and fish look for them.
    for (file, marker) in [
        ("usr/share/bash-completion/completions/ssoctl", "complete -F _ssoctl"),
        ("usr/share/zsh/vendor-completions/_ssoctl", "#compdef ssoctl"),
        ("usr/share/fish/vendor_completions.d/ssoctl.fish", "complete -c ssoctl"),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(marker), "{file} lacks {marker}");
        assert!(text.contains("rotate"), "{file} does not complete the subcommands");
    }

    // Docs and example configs; the examples load as the daemons load their config.
    let doc = root.join("usr/share/doc/sso");
    for file in [
        "README.md",
        "SECURITY.md",
        "operations.md",
        "configuration.md",
        "kubernetes.md",
        "copyright",
    ] {
        assert!(doc.join(file).is_file(), "usr/share/doc/sso/{file} is missing");
    }
    let host = example_host(scratch.path());
    sso_server::Config::load(&host.install(&doc.join("examples/server.toml")))
        .unwrap_or_else(|e| panic!("the example server.toml does not load: {e}"));
    sso_agent::agent::AgentConfig::load(&host.install(&doc.join("examples/agent.toml")))
        .unwrap_or_else(|e| panic!("the example agent.toml does not load: {e}"));

    // Nothing secret, writable by others, or setuid ships.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for line in listing.lines() {
        let (perms, name) = (
            line.split_whitespace().next().unwrap(),
            line.split_whitespace().last().unwrap(),
        );
        assert!(!perms.contains('s') && perms.as_bytes()[8] != b'w', "{line}");
        for secret in [".pem", ".key", ".db", ".ssobak"] {
            assert!(!name.ends_with(secret), "the package ships {name}");
        }
    }
}
