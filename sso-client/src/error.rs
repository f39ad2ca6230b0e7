//! The client's one error type.

use std::time::SystemTime;

use sso_proto::KeyId;

/// Everything the client can fail with. No variant carries key material or plaintext.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No server answered and the cache cannot serve the request (a fresh process, or a
    /// key never seen). Retried in the background; the next call may succeed.
    #[error("key service unavailable: {0}; the client retries in the background")]
    Unavailable(String),
    /// The cache is older than the configured `max_stale`.
    #[error("cached keys are stale: no server reached since {since:?}, beyond max_stale")]
    Stale {
        /// Last successful contact with a server.
        since: SystemTime,
    },
    /// The envelope names a key that no server asked knows: every endpoint that answered
    /// said 404 (endpoints that could not be reached are named too).
    #[error("unknown key {key_id}: no server knows it (asked {})", asked.join(", "))]
    UnknownKey {
        /// The key id in the envelope.
        key_id: KeyId,
        /// Each endpoint asked and what it said.
        asked: Vec<String>,
    },
    /// The envelope names a key that was retired or destroyed.
    #[error("key {0} was retired or destroyed; data sealed under it can no longer be opened here")]
    KeyRetired(KeyId),
    /// The envelope is malformed, from a newer version, or fails authentication.
    #[error(transparent)]
    Envelope(#[from] sso_proto::Error),
    /// The client configuration is invalid (certificates, endpoints).
    #[error("client configuration: {0}")]
    Config(String),
    /// A server answered with something this client does not understand.
    #[error("unexpected answer from {endpoint}: {problem}")]
    Protocol {
        /// Which server.
        endpoint: String,
        /// What was wrong.
        problem: String,
    },
}

impl From<sso_tls::TlsError> for Error {
    fn from(e: sso_tls::TlsError) -> Self {
        Self::Config(e.to_string())
    }
}

impl From<sso_transport::ConfigError> for Error {
    fn from(e: sso_transport::ConfigError) -> Self {
        Self::Config(e.0)
    }
}
