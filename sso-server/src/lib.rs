//! `sso-server`: the master-secret server. Holds the keystore and hands keys out over
//! mutual TLS to identities the config grants roles to.
//!
//! # Layout
//! - [`config`]: the TOML file, validated before anything binds.
//! - [`tls`]: rustls server configuration (mTLS, CRLs, no resumption) and handshake
//!   failure names.
//! - [`identity`]: certificate identity → roles.
//! - [`state`]: the open store and the published, pre-serialised keyring snapshot.
//! - [`api`]: the endpoints of SPEC §5.
//! - [`audit`]: the MAC-chained (key from the KEK), anchored, group-committed audit log.
//! - [`metrics`]: Prometheus counters on their own listener.
//! - [`limits`]: pending-handshake, per-identity connection and watch caps, deadlines
//!   after the handshake, aggregated audit of handshake floods.
//! - [`server`]: accept loop, hyper, graceful shutdown.
//! - [`connections`]: live connections over time: SIGHUP reload (all or nothing) and the
//!   re-check of live connections, certificate expiry, maximum connection age.
//! - [`peer`]: the failover pair's transport: the peer client, its TLS verifier, peer
//!   status (the bodies are `sso_proto::wire::peer`'s).
//! - [`replication`]: anti-entropy as domain logic (the round, its server side, the
//!   periodic and on-demand rounds with their metrics and alarms).
//! - [`rotation`]: rotation serialised across the pair (domain logic, no HTTP).
//! - [`backup`]: backup and restore (domain logic, no HTTP).
//! - [`lifecycle`]: an operator's retire, forced retire and destroy of a key (domain
//!   logic, no HTTP).
//! - [`status`]: what the admin status says of the node and the pair: an anti-entropy
//!   round first, the store's status, the pair's backup coverage (domain logic, no HTTP).
//! - [`dev`]: `--dev`, the embedded default.
//!
//! A request flows: TCP accept (connection cap) → TLS handshake (timeout, client
//! certificate verified against the CA and CRLs) → [`identity::Caller`] → [`api::handle`]
//! (route, role check, handler reading the [`state::Snapshot`] or writing through the
//! store) → response, with an [`audit::AuditEvent`] queued on the way out.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod config;
pub mod connections;
pub mod dev;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod idempotency;
pub mod identity;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod peer;
pub mod replication;
pub mod rotation;
pub mod server;
pub mod state;
pub mod status;
pub mod tls;

pub use config::Config;
pub use server::{ServerError, run, run_with_feed};
