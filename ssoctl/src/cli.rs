//! The command line: global connection flags (accepted before or after the subcommand)
//! and the subcommands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Operate the master-secret service: initialise, rotate, inspect, back up and restore.
#[derive(Parser, Debug)]
#[command(name = "ssoctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Connection and output flags.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Server URL, https://host:port; repeat for a pair (tried in order).
    #[arg(long = "server", global = true, env = "SSOCTL_SERVER", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// CA certificate that server certificates chain to.
    #[arg(long, global = true, env = "SSOCTL_CA")]
    pub ca: Option<PathBuf>,
    /// Client (admin) certificate.
    #[arg(long, global = true, env = "SSOCTL_CERT")]
    pub cert: Option<PathBuf>,
    /// Client (admin) key.
    #[arg(long, global = true, env = "SSOCTL_KEY")]
    pub key: Option<PathBuf>,
    /// Use the dev setup in DIR (as made by `sso-server --dev`): its CA, admin
    /// certificate, and the port its server.toml names (7443 by default).
    #[arg(long, global = true, env = "SSOCTL_DEV", value_name = "DIR")]
    pub dev: Option<PathBuf>,
    /// Read passwords from this file (mode 0600) instead of the environment
    /// (SSOCTL_PASSPHRASE for a store, SSOCTL_BACKUP_PASSWORD for a backup) or a prompt.
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Idempotency key for rotate, retire, destroy and restore (1-128 visible ASCII
    /// characters). ssoctl makes a random one when none is given and prints it when a
    /// node does not answer; repeat the command with it to get that node's first answer.
    #[arg(long, global = true, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a store offline, with its first key and a mandatory first backup.
    Init(Init),
    /// Create, distribute and promote a new key.
    Rotate {
        /// With the peer unreachable, rotate on this node alone (acknowledged "degraded").
        #[arg(long)]
        allow_degraded: bool,
    },
    /// Node, peer, keys, backup coverage and audit head.
    Status,
    /// List, retire or destroy keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Write a backup of every key to a file.
    Backup {
        /// Where to write it (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// A hint stored in plaintext beside the sealed keys.
        #[arg(long, default_value = "")]
        hint: String,
    },
    /// Merge a backup into the server's store, after showing what it would bring back.
    ///
    /// Lists, with the backup's age, the keys in it that the pair has destroyed since
    /// (they stay destroyed) and the keys the pair does not know (restored only with
    /// --force).
    Restore {
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// Restore keys the running pair does not know (a disaster recovery into empty
        /// nodes, or a backup of keys lost since), or restore although the node cannot
        /// reach its peer to learn what the pair destroyed.
        #[arg(long)]
        force: bool,
    },
    /// Re-seal envelope files (or every file under directories) to the primary key.
    /// Atomic per file; rerunning after an interruption resumes (current files are
    /// skipped).
    Rewrap {
        /// Files and directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The associated data the envelopes were sealed with (UTF-8).
        #[arg(long, default_value = "")]
        aad: String,
    },
    /// Show what a backup says about itself, without its password.
    BackupHint {
        /// The backup file.
        file: PathBuf,
    },
    /// Make or extend a PKI for the service.
    #[command(subcommand)]
    Certs(Certs),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(Audit),
    /// Check the setup and print a checklist: config, file modes, certificate and CRL
    /// expiry, each node and its peer, backup coverage, clock skew, disk space.
    ///
    /// One line per check, `ok|warn|fail  CHECK  DETAIL; REMEDY` (or --json). Exits 0
    /// when nothing needs action, 1 for warnings only, 2 when a check failed. Run on the
    /// server host with --config (or --dev DIR) to check its files too.
    Doctor {
        /// The server's config file (default with --dev: DIR/server.toml), for the checks
        /// of the store, key files, CRLs and disk space on this host.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `ssoctl init`.
#[derive(Args, Debug)]
pub struct Init {
    /// The new store file, or a PostgreSQL database (postgresql://USER@HOST/DB, optionally
    /// ?sslmode=require&sslrootcert=CA.pem) that every node of a cluster then shares. A
    /// URL with a password belongs in SSOCTL_STORE, not on the command line, where every
    /// user of the machine can read it (ps).
    #[arg(long, env = "SSOCTL_STORE", hide_env_values = true)]
    pub store: PathBuf,
    /// This node's name.
    #[arg(long)]
    pub node: String,
    /// Unseal with this key file; created (32 random bytes, mode 0600) if it does not
    /// exist. Without it, the store is sealed by a passphrase (SSOCTL_PASSPHRASE or a
    /// prompt).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Where to write the mandatory first backup.
    #[arg(long, required_unless_present = "join")]
    pub backup_out: Option<PathBuf>,
    /// Create an empty store for the second node of a pair: no first key (it arrives
    /// from the peer by replication), so no first backup either.
    #[arg(long, conflicts_with_all = ["backup_out", "hint"])]
    pub join: bool,
    /// Hint stored with the backup.
    #[arg(long, default_value = "")]
    pub hint: String,
}

/// `ssoctl keys …`.
#[derive(Subcommand, Debug)]
pub enum Keys {
    /// Every key with its state and age.
    List,
    /// Stop serving a key (it stays stored; backups keep it).
    Retire {
        /// The key id (32 hex characters).
        key_id: String,
        /// Retire it even if it is the primary: an override for a primary of unknown
        /// origin (one a compromised peer planted, say). The next promoted key becomes the
        /// primary; the server audits the override. Run it against each node of a pair.
        #[arg(long)]
        force_retire_primary: bool,
    },
    /// Wipe a retired key's material for good.
    Destroy {
        /// The key id (32 hex characters).
        key_id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// `ssoctl certs …`.
#[derive(Subcommand, Debug)]
pub enum Certs {
    /// Create a dev PKI in DIR: CA, server, admin and client certificates.
    Init {
        /// Directory to create (must not exist or be empty).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate from the CA in DIR.
    Issue {
        /// Directory with ca.pem and ca-key.pem.
        #[arg(long, default_value = "sso-dev")]
        dir: PathBuf,
        /// client, admin, peer or server.
        #[arg(long)]
        role: String,
        /// Common name (and file name).
        #[arg(long)]
        name: String,
    },
}

/// `ssoctl audit …`.
#[derive(Subcommand, Debug)]
pub enum Audit {
    /// Check an audit log's keyed chain end to end, and that it reaches its anchor.
    ///
    /// Without FILES the server checks its own log with its key (--server/--dev; admin
    /// certificate; no unseal secret needed). With FILES (oldest first: rotated files,
    /// then the current one) ssoctl checks them itself and needs the store and its
    /// unseal secret (--store, --key-file or the passphrase), because the chain is keyed
    /// from the store's KEK.
    Verify(AuditVerify),
}

/// `ssoctl audit verify`.
#[derive(Args, Debug)]
pub struct AuditVerify {
    /// Log files in order, oldest first.
    pub files: Vec<PathBuf>,
    /// The store whose key chains the log (offline check of FILES).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The store's unseal key file; without it the passphrase is read (SSOCTL_PASSPHRASE,
    /// --password-file or a prompt).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The head (mac of the newest entry) recorded elsewhere; with --count.
    #[arg(long, value_name = "HEX", requires = "count")]
    pub head: Option<String>,
    /// The entry count that goes with --head.
    #[arg(long, value_name = "N", requires = "head")]
    pub count: Option<u64>,
    /// The first file may start after entry 1 (earlier files were archived).
    #[arg(long)]
    pub partial: bool,
}
