//! `ssoctl`: parse, run, print `error:`/`hint:` and exit with the failure's code.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // ssoctl holds passphrases, unseal keys and backup passwords: no core dumps, not
    // attachable, and a write past the file-size limit fails as an error (cleaned up and
    // reported) instead of killing the process half-way through.
    let _ = sso_os::hardening::harden_process();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match ssoctl::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(ssoctl::EX_USAGE),
            };
        }
    };
    let json = cli.global.json;
    let mut out = ReaderMayLeave::new(std::io::stdout().lock());
    match ssoctl::run(cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            drop(out);
            let mut err = std::io::stderr().lock();
            if json {
                let v = serde_json::json!({"error": failure.kind(), "message": failure.message, "hint": failure.hint});
                let _ = writeln!(err, "{v}");
            } else {
                let _ = writeln!(err, "{failure}");
            }
            ExitCode::from(failure.code)
        }
    }
}

/// Standard output for a command whose reader may stop reading (`ssoctl status | head -2`).
/// The command has done its work by the time it prints, so a closed pipe is not its
/// failure: the rest of the output is dropped silently instead of ending in
/// "Broken pipe" (or a panic inside a library that writes for us).
struct ReaderMayLeave<W> {
    inner: W,
    gone: bool,
}

impl<W: Write> ReaderMayLeave<W> {
    fn new(inner: W) -> Self {
        Self { inner, gone: false }
    }

    fn absorb(&mut self, result: std::io::Result<usize>, len: usize) -> std::io::Result<usize> {
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.gone = true;
                Ok(len)
            }
            other => other,
        }
    }
}

impl<W: Write> Write for ReaderMayLeave<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.gone {
            return Ok(buf.len());
        }
        let result = self.inner.write(buf);
        self.absorb(result, buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.gone {
            return Ok(());
        }
        let result = self.inner.flush().map(|()| 0);
        self.absorb(result, 0).map(|_| ())
    }
}
