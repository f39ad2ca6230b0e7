//! `sso-server`: parse arguments, load and validate the config, unseal, bind, serve.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use sso_daemon::process::{fail, shutdown_signal};

use clap::Parser;
use keystore::postgres::{ChangeFeed, NAME_RELEASE, NameClaim, PgStore};
use keystore::{SealedStore, Store, UnsealKey};
use sso_server::Config;
use sso_server::cli::Args;
use sso_server::config::{LogFormat, UnsealSource};

/// Exit codes (sysexits): configuration or usage 64, unseal or store 65, cannot serve 69.
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    // ring is the only provider; install it before anything asks for a default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();

    let config_path = match (&args.config, &args.dev) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => match sso_server::dev::prepare(dir) {
            Ok(path) => path,
            Err(e) => {
                return fail(
                    EX_DATAERR,
                    &e,
                    "check the directory's permissions, or pick another with --dev DIR",
                );
            }
        },
        (None, None) => return fail(EX_USAGE, &"no configuration", "pass --config FILE or --dev"),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => return fail(EX_USAGE, &e, "fix the field named above; see docs/configuration.md"),
    };
    init_logging(&config);
    // Preflight: every certificate, key, CA and CRL is loaded and checked before a port is
    // bound or readiness announced, so a bad file is a clean refusal, not a crash after
    // "listening".
    if let Err(e) = sso_server::tls::build(&config.tls) {
        return fail(
            EX_USAGE,
            &e,
            "fix the [tls] file named above (docs/configuration.md, docs/operations.md)",
        );
    }
    let hardening = sso_os::hardening::harden_process();
    tracing::info!(?hardening, "process hardening");

    let key = match unseal_key(&config.store.unseal) {
        Ok(k) => k,
        Err(e) => return fail(EX_DATAERR, &e, "check store.unseal in the config"),
    };
    if let Some(url) = config.store.database_url() {
        // A PostgreSQL store, shared by a cluster: this node's name comes from the config
        // (keys made here carry it as their origin).
        let store = match PgStore::open(url, &key, &config.node) {
            Ok(s) => s,
            // The database down or unreachable: starting again once it is back helps
            // (tests/tests/cluster_attack.rs
            // `a_node_started_while_the_database_is_down_exits_unavailable`).
            Err(e) if e.store_fault().is_some() => return fail(EX_UNAVAILABLE, &e, ""),
            Err(e) => return fail(EX_DATAERR, &e, ""),
        };
        drop(key);
        if let Err(e) = store.verify() {
            return fail(EX_DATAERR, &e, "");
        }
        let cluster = Cluster {
            url: url.to_owned(),
            shown: store.database().to_owned(),
        };
        return serve(&args, config, store, Some(cluster));
    }
    let store = match SealedStore::open(&config.store.path, &key) {
        Ok(s) => s,
        Err(e) => return fail(EX_DATAERR, &e, ""),
    };
    drop(key);
    // Authenticate every row (retired ones too) before a port is bound: a row whose
    // wrapped material was swapped or edited is a refusal to start (exit 65), not a
    // crash after "listening" or a retired key silently lost until the next backup.
    if let Err(e) = store.verify() {
        return fail(EX_DATAERR, &e, "");
    }
    // Keys made here carry the store's node name as their origin, audit entries and health
    // the config's: two names for one node would split its history.
    if store.node() != config.node {
        return fail(
            EX_USAGE,
            &format!(
                "the store {} was made for node {:?}, but the config says node = {:?}",
                config.store.path.display(),
                store.node(),
                config.node
            ),
            &format!(
                "set node = {:?} in the config, or point store.path at this node's own store",
                store.node()
            ),
        );
    }
    serve(&args, config, store, None)
}

/// The database a cluster node shares with the others.
struct Cluster {
    /// The store's URL, as configured (it may hold a password: never shown).
    url: String,
    /// The database, without a password, for messages.
    shown: String,
}

/// Binds, announces readiness and serves `store` until a signal; with `cluster` (a store
/// shared by a cluster), first claims the node's name in the database and then follows the
/// database's change feed.
fn serve(args: &Args, config: Config, store: impl Store + 'static, cluster: Option<Cluster>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(EX_UNAVAILABLE, &e, ""),
    };
    runtime.block_on(async move {
        // The feed connects by itself (and keeps trying while the database is down). On a
        // cluster, one process per node name: its feed's connection holds the name, and
        // nothing is bound or announced until it does.
        let feed = match cluster {
            None => None,
            Some(cluster) => match claim_node_name(&cluster, &config.node).await {
                Ok(feed) => Some(feed),
                Err(code) => return code,
            },
        };
        let https = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                return fail(
                    EX_UNAVAILABLE,
                    &format!("cannot listen on {}: {e}", config.listen),
                    "is another server running?",
                );
            }
        };
        let metrics = match tokio::net::TcpListener::bind(config.metrics_listen).await {
            Ok(l) => l,
            Err(e) => {
                return fail(
                    EX_UNAVAILABLE,
                    &format!("cannot listen on {} (metrics_listen): {e}", config.metrics_listen),
                    "",
                );
            }
        };
        // Install the signal handlers before announcing readiness, so a SIGTERM sent the
        // moment the listening line appears is handled gracefully, not fatally.
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => return fail(EX_UNAVAILABLE, &format!("cannot install signal handlers: {e}"), ""),
        };
        let (https_addr, metrics_addr) = (https.local_addr().ok(), metrics.local_addr().ok());
        let node = config.node.clone();
        // Announced by the server once it is set up (TLS loaded, audit log open, snapshot
        // read), so a failure there is a refusal to start, never a crash after readiness.
        let announce = move || {
            tracing::info!(https = ?https_addr, metrics = ?metrics_addr, node = %node, "listening");
            // A stable line on stdout for scripts and tests that bind port 0.
            let mut out = std::io::stdout().lock();
            if let (Some(h), Some(m)) = (https_addr, metrics_addr) {
                let _ = writeln!(out, "sso-server listening https={h} metrics={m}");
                if let Some(dir) = &args.dev {
                    let _ = writeln!(out, "{}", sso_server::dev::banner(dir, h, m));
                }
            }
            let _ = out.flush();
            drop(out);
            sso_daemon::process::notify_ready();
        };
        match sso_server::run_with_feed(config, store, feed, https, metrics, shutdown, announce).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ sso_server::ServerError::NameTaken(_)) => fail(
                EX_USAGE,
                &e,
                "give every node of the cluster its own `node` name in its config, or stop the other process",
            ),
            Err(e) => fail(EX_UNAVAILABLE, &e, ""),
        }
    })
}

/// Starts the change feed of node `node` and waits for it to hold the node's name (see
/// `keystore::postgres::NameClaim`); the exit code of the refusal otherwise.
async fn claim_node_name(cluster: &Cluster, node: &str) -> Result<ChangeFeed, ExitCode> {
    let feed = ChangeFeed::start_for_node(&cluster.url, node).map_err(|e| fail(EX_DATAERR, &e, ""))?;
    // Usually at once; a node that just died may hold the name for up to NAME_RELEASE.
    if feed.claimed(Duration::from_secs(2)).await == NameClaim::Held {
        return Ok(feed);
    }
    tracing::warn!(
        node,
        "another connection holds this node's name in the database; waiting up to {} s for it to be released (a node that just stopped)",
        NAME_RELEASE.as_secs()
    );
    match feed.claimed(NAME_RELEASE).await {
        NameClaim::Held => Ok(feed),
        NameClaim::HeldElsewhere => Err(fail(
            EX_USAGE,
            &format!(
                "another process runs as node {node:?} on {}: the audit anchor and the keys' origin are kept per node name",
                cluster.shown
            ),
            "give every node of the cluster its own `node` name in its config, or stop the other process first",
        )),
        NameClaim::Unknown => Err(fail(
            EX_UNAVAILABLE,
            &format!("cannot reach {} to claim the node name {node:?}", cluster.shown),
            "check that the PostgreSQL server is running and reachable from this node, then start again",
        )),
    }
}

fn unseal_key(source: &UnsealSource) -> keystore::Result<UnsealKey> {
    match source {
        UnsealSource::KeyFile(path) => UnsealKey::key_file(path),
        UnsealSource::KeyEnv(var) => UnsealKey::key_from_env(var),
        UnsealSource::PassphraseFile(path) => UnsealKey::passphrase_from_file(path),
        UnsealSource::PassphraseEnv(var) => UnsealKey::passphrase_from_env(var),
        UnsealSource::Prompt => UnsealKey::passphrase_from_prompt("store passphrase: "),
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person at a terminal, never into files and journals.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (the log's disk is full) is lost, never a
        // panic: by default tracing reports it with `eprintln!`, which panics when stderr
        // fails, and took down the request that logged (issue 15).
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
