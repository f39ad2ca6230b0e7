//! What the two daemons (`sso-server`, `sso-agent`) share at the process edge: how a
//! fatal error is printed, which signals stop them, and the readiness notification.

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

/// Tells systemd (`Type=notify`) the daemon is ready, when `NOTIFY_SOCKET` is set: one
/// `READY=1` datagram. Returns whether a notification was sent. Errors are logged, never
/// fatal: the service works the same without a supervisor.
pub fn notify_ready() -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let send = || -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket name (Linux).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(b"READY=1", &addr)?;
        } else {
            socket.send_to(b"READY=1", &target)?;
        }
        Ok(())
    };
    match send() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not notify the service manager of readiness");
            false
        }
    }
}
