//! `sso-dist`: renders what the Debian package ships besides the binaries, from the
//! binaries' own command-line definitions, so a man page cannot drift from `--help`.
//!
//! `sso-dist assets DIR` writes `DIR/man/*.8` (one page per program and per ssoctl
//! subcommand) and `DIR/completions/` (bash, zsh and fish for ssoctl).
//! deploy/debian/build-deb.sh runs it, then `cargo deb`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

/// Render the man pages and shell completions the Debian package ships.
#[derive(Parser, Debug)]
#[command(name = "sso-dist", version, about)]
struct Args {
    #[command(subcommand)]
    command: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Write DIR/man/*.8 and DIR/completions/* (DIR is created if missing).
    Assets {
        /// Output directory; the package takes it from target/release/dist.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let What::Assets { dir } = Args::parse().command;
    match write_assets(&dir) {
        Ok(written) => {
            println!("{written} files written under {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}\nhint: check that {} is writable", dir.display());
            ExitCode::from(73)
        }
    }
}

/// The programs the package installs, by their command-line definitions.
fn programs() -> [Command; 3] {
    [
        sso_server::cli::Args::command(),
        sso_agent::agent::cli::Args::command(),
        ssoctl::cli::Cli::command(),
    ]
}

fn write_assets(dir: &Path) -> std::io::Result<usize> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut written = 0;
    for mut program in programs() {
        // Building propagates global flags and the version into the subcommands, so each
        // subcommand's page lists the connection flags it accepts.
        program.build();
        written += write_man_pages(&man, program, None)?;
    }
    let mut ssoctl = ssoctl::cli::Cli::command();
    for (shell, file) in [
        (Shell::Bash, "ssoctl.bash"),
        (Shell::Zsh, "_ssoctl"),
        (Shell::Fish, "ssoctl.fish"),
    ] {
        let mut out = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut ssoctl, "ssoctl", &mut out);
        written += 1;
    }
    Ok(written)
}

/// Writes `cmd`'s page and, recursively, one page per subcommand, named `parent-sub.8`
/// (`ssoctl-keys-list.8`), as git and cargo do. Section 8: system administration.
fn write_man_pages(dir: &Path, cmd: Command, parent: Option<&str>) -> std::io::Result<usize> {
    let name = match parent {
        Some(p) => format!("{p}-{}", cmd.get_name()),
        None => cmd.get_name().to_owned(),
    };
    let cmd = cmd.name(name.clone()).bin_name(name.replace('-', " "));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).section("8").render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.8")), page)?;
    let mut written = 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        written += write_man_pages(dir, sub.clone(), Some(&name))?;
    }
    Ok(written)
}
