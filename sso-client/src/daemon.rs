//! What the two daemons (`sso-agent` here, `sso-server` beside it) share at the process
//! edge: how a fatal error is printed, and which signals stop them.

use std::io::Write;
use std::process::ExitCode;

/// Prints `error: …` and, when given, `hint: …` to stderr, and returns `code`.
pub fn fail(code: u8, error: &dyn std::fmt::Display, hint: &str) -> ExitCode {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "error: {error}");
    if !hint.is_empty() {
        let _ = writeln!(err, "hint: {hint}");
    }
    ExitCode::from(code)
}

/// Registers SIGTERM and SIGINT now (so a signal that arrives right after start is not
/// fatal) and returns a future that completes on the first of them. Needs a tokio
/// runtime.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
