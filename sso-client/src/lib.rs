//! `sso-client`: the client of the master-secret service. It keeps the whole keyring in a
//! zeroized in-memory cache, so host processes keep sealing and opening while every server
//! is down; a restart clears the cache, and the process then needs a server again.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sso_client::Error> {
//! // Against `cargo run -p sso-server -- --dev` (see examples/seal_open.rs).
//! let client = sso_client::Client::builder()
//!     .endpoint("https://localhost:7443")
//!     .ca("sso-dev/ca.pem")
//!     .identity("sso-dev/client.pem", "sso-dev/client-key.pem")
//!     .build()?;
//! let envelope = client.seal(b"table=users", b"secret data").await?;
//! assert_eq!(client.open(b"table=users", &envelope).await?, b"secret data");
//! println!("{:?}", client.status());
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`client`]: [`Client`] (async), [`BlockingClient`], [`ClientBuilder`], [`Status`];
//!   the background watch long-poll, periodic poll and on-demand key fetches.
//! - `cache`: the immutable keyring snapshot swapped through an `ArcSwap` (lock-free
//!   reads), and [`KeyHandle`] for raw key bytes.
//! - the transport (HTTP/2 over mTLS per endpoint, bounded connects, failover) is the
//!   `sso-transport` crate, shared with the server's peer link and ssoctl.
//!
//! This is the library a host process links: no command line, config file, logging
//! subscriber or daemon plumbing (the `sso-agent` daemon is its own crate, built on this
//! one; `tests/tests/layering.rs` keeps it so). The fork hook that keeps buffered
//! envelope nonces from repeating in a forked child comes from `sso-os`.
//!
//! Keys flow one way: server JSON → zeroizing base64 buffer → [`sso_proto::MasterSecret`]
//! and its expanded AES key in the cache → envelopes. Nothing is ever written to disk.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cache;
pub mod client;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;

pub use cache::KeyHandle;
pub use client::{BlockingClient, Client, ClientBuilder, Freshness, Status};
pub use error::Error;
/// Re-exported so callers use the same `secrecy` as this crate.
pub use secrecy;
pub use sso_proto::{KeyId, KeyState};
