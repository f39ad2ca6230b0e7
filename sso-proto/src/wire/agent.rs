//! The agent's bodies (`sso-agent`'s Unix-socket HTTP/JSON service, docs/agent.md): the
//! requests of `POST /v1/seal` and `POST /v1/open` (outside input: fuzzed by `agent_body`),
//! and the answers of seal, open and `GET /v1/status`. Requests are generic over the
//! secret field's type, as the admin requests are: a caller writes a borrowed `&str`, the
//! agent reads a [`SecretString`] that is wiped when dropped. The open answer carries the
//! plaintext, so it is written by [`opened_json`] into an exact-size zeroizing buffer.
//!
//! Bodies (keys in alphabetical order, as the agent has always written them):
//! seal `{"aad"?,"plaintext"}` → `{"envelope","key_id"}`; open `{"aad"?,"envelope"}` →
//! `{"key_id","plaintext"}`; status →
//! `{"detail","endpoint","epoch","keys","last_error","primary","stale_since","status"}`.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::exact::exact;

/// `POST /v1/seal`: standard base64 of the plaintext, and of the additional data.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(missing_debug_implementations, reason = "holds a plaintext; no Debug by design")]
pub struct SealRequest<P = SecretString> {
    /// The plaintext, standard base64.
    pub plaintext: P,
    /// Additional authenticated data, standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aad: Option<String>,
}

impl SealRequest {
    /// The plaintext's base64 text, to decode (into a wiped buffer): the text is as secret
    /// as the plaintext.
    pub fn plaintext_base64(&self) -> &str {
        self.plaintext.expose_secret()
    }
}

/// `POST /v1/open`: standard base64 of the envelope, and of the additional data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// The envelope, standard base64.
    pub envelope: String,
    /// Additional authenticated data, standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aad: Option<String>,
}

/// The answer to `POST /v1/seal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealAnswer {
    /// The envelope, standard base64.
    pub envelope: String,
    /// The key it was sealed under (hex).
    pub key_id: String,
}

/// The answer to `POST /v1/open`, as read (write it with [`opened_json`]).
#[derive(Deserialize)]
#[expect(missing_debug_implementations, reason = "holds a plaintext; no Debug by design")]
pub struct OpenAnswer {
    /// The key that opened it (hex).
    pub key_id: String,
    /// The plaintext, standard base64.
    pub plaintext: SecretString,
}

/// Writes the answer to `POST /v1/open` into an exact-size zeroizing buffer: the base64 of
/// the plaintext is built in a wiped string and copied only into the wiped answer.
pub fn opened_json(key_id: &str, plaintext: &[u8]) -> Zeroizing<Vec<u8>> {
    use base64::Engine;
    let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(plaintext));
    // Key ids are lowercase hex (or empty), so the only JSON to escape is none; a caller's
    // odd id is still written as a JSON string.
    let key_id = serde_json::to_string(key_id).unwrap_or_else(|_| "\"\"".into());
    exact(|out| {
        out.put(b"{\"key_id\":");
        out.put(key_id.as_bytes());
        out.put(b",\"plaintext\":\"");
        out.put(text.as_bytes());
        out.put(b"\"}");
    })
}

/// The answer to `GET /v1/status`: what the agent's client library holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// A sentence for operators.
    pub detail: String,
    /// The endpoint the last keyring came from.
    pub endpoint: Option<String>,
    /// Epoch of the last keyring applied.
    pub epoch: u64,
    /// Keys cached.
    pub keys: usize,
    /// The last error talking to the servers.
    pub last_error: Option<String>,
    /// The key new envelopes are sealed under (hex).
    pub primary: Option<String>,
    /// Since when the agent serves from its cache (RFC 3339), when stale.
    pub stale_since: Option<String>,
    /// `fresh`, `stale` or `empty`.
    pub status: String,
}
