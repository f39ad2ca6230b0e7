//! `sso-agent`: the per-machine key agent. Holds one client (the cache), serves local
//! processes over a Unix socket.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use sso_daemon::process::{fail, shutdown_signal};

use clap::Parser;
use sso_agent::agent::cli::Args;
use sso_agent::agent::{self, AgentConfig, UidAllowlist};
use sso_agent::kms::{self, KmsConfig};

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let config = match (&args.config, &args.dev) {
        (Some(path), _) => match AgentConfig::load(path) {
            Ok(c) => c,
            Err(e) => return fail(64, &e, "fix the field named above"),
        },
        (None, Some(dir)) => match AgentConfig::dev(dir) {
            Ok(c) => c,
            Err(e) => {
                let remedy = format!(
                    "fix the dev server's {}, or remove DIR and start `sso-server --dev DIR` again",
                    sso_devdir::SERVER_CONFIG
                );
                return fail(64, &e, &remedy);
            }
        },
        (None, None) => return fail(64, &"no configuration", "pass --config FILE or --dev DIR"),
    };
    let mode = match config.mode() {
        Ok(m) => m,
        Err(e) => return fail(64, &e, ""),
    };
    let kms_mode = match config.kms.as_ref().map(KmsConfig::mode).transpose() {
        Ok(m) => m,
        Err(e) => return fail(64, &e, ""),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (the log's disk is full) is lost, never a
        // panic: by default tracing reports the failure with `eprintln!`, which panics
        // when stderr itself fails; the agent died at its first line (issue 15).
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .init();
    let hardening = sso_os::hardening::harden_process();
    tracing::info!(?hardening, "process hardening");

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(69, &e, ""),
    };
    runtime.block_on(async move {
        let client = match config.client_builder().build() {
            Ok(c) => c,
            Err(e) => return fail(64, &e, "check ca, cert, key and endpoints"),
        };
        let listener = match agent::bind(&config.socket, mode) {
            Ok(l) => l,
            Err(e) => return fail(69, &format!("cannot listen on {}: {e}", config.socket.display()), ""),
        };
        let kms_listener = match (&config.kms, kms_mode) {
            (Some(kms), Some(mode)) => match agent::bind(&kms.socket, mode) {
                Ok(l) => Some(l),
                Err(e) => return fail(69, &format!("cannot listen on {}: {e}", kms.socket.display()), ""),
            },
            _ => None,
        };
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => return fail(69, &e, ""),
        };
        // One signal stops both sockets.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut out = std::io::stdout().lock();
        if let Some(kms) = &config.kms {
            let _ = writeln!(out, "sso-agent kms socket={}", kms.socket.display());
        }
        let _ = writeln!(out, "sso-agent listening socket={}", config.socket.display());
        if args.dev.is_some() {
            let s = config.socket.display();
            let _ = writeln!(
                out,
                "  curl --unix-socket {s} -X POST http://agent/v1/seal -d '{{\"plaintext\":\"aGVsbG8=\"}}'\n  curl --unix-socket {s} http://agent/v1/status"
            );
        }
        let _ = out.flush();
        drop(out);
        sso_daemon::process::notify_ready();
        let max_per_uid = config.max_connections_per_uid;
        let kms = kms_listener.map(|l| {
            let uids = config
                .kms
                .as_ref()
                .and_then(|k| k.allowed_uids.clone())
                .unwrap_or_else(|| config.allowed_uids.clone());
            tokio::spawn(kms::serve(
                l,
                client.clone(),
                UidAllowlist::new(uids),
                max_per_uid,
                stopped(),
            ))
        });
        agent::serve(listener, client, config.allowed_uids.clone(), max_per_uid, stopped()).await;
        if let Some(kms) = kms {
            let _ = kms.await;
        }
        let _ = std::fs::remove_file(&config.socket);
        if let Some(k) = &config.kms {
            let _ = std::fs::remove_file(&k.socket);
        }
        ExitCode::SUCCESS
    })
}
