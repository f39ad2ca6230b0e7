//! The client-facing key bodies of SPEC §5: `GET /v1/keyring` (and the watch) and
//! `GET /v1/keys/{id}`, plain (standard base64 material, written by [`exact`] into a
//! zeroizing buffer of exactly the right size) or wrapped (each key's material sealed to
//! the asking client, docs/key-delivery.md), and their one reader ([`parse_keyring`],
//! [`Keyring`], [`Key`]) used by the client library.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use super::exact::{Sink, exact};
use crate::delivery::{Binding, Opener, Recipient, Sealer};
use crate::{Error, KeyId, KeyMeta, KeyRecord, KeyState, MasterSecret};

/// `{"key_id":…,"generation":…,"state":…,"created_at":…,` — every key field but the
/// material.
fn write_key_head(out: &mut dyn Sink, meta: &KeyMeta) {
    let created = meta.created_at.format(&Rfc3339).unwrap_or_default();
    out.put(b"{\"key_id\":\"");
    out.put(meta.key_id.to_string().as_bytes());
    out.put(b"\",\"generation\":");
    out.put(meta.generation.to_string().as_bytes());
    out.put(b",\"state\":\"");
    out.put(meta.state.as_str().as_bytes());
    out.put(b"\",\"created_at\":\"");
    out.put(created.as_bytes());
    out.put(b"\",");
}

fn write_key(out: &mut dyn Sink, record: &KeyRecord) {
    write_key_head(out, &record.meta);
    out.put(b"\"key\":\"");
    if let Some(secret) = &record.secret {
        out.put_secret(secret);
    }
    out.put(b"\"}");
}

fn write_primary_epoch(out: &mut dyn Sink, epoch: u64, primary: Option<KeyId>) {
    out.put(b"{\"primary\":");
    match primary {
        Some(id) => {
            out.put(b"\"");
            out.put(id.to_string().as_bytes());
            out.put(b"\"");
        }
        None => out.put(b"null"),
    }
    out.put(b",\"epoch\":");
    out.put(epoch.to_string().as_bytes());
}

fn write_gone(out: &mut dyn Sink, gone: &[KeyId]) {
    out.put(b"],\"gone\":[");
    for (i, id) in gone.iter().enumerate() {
        if i > 0 {
            out.put(b",");
        }
        out.put(b"\"");
        out.put(id.to_string().as_bytes());
        out.put(b"\"");
    }
    out.put(b"]}");
}

/// `{"key_id","generation","state","created_at","key"}` for one key (`GET /v1/keys/{id}`,
/// plain delivery).
pub fn key_json(record: &KeyRecord) -> Zeroizing<Vec<u8>> {
    exact(|out| write_key(out, record))
}

/// The plain `GET /v1/keyring` body. Beyond SPEC §5's fields it lists the ids of retired
/// and destroyed keys in `gone`, so a client can drop exactly those (a key merely missing
/// from one node's answer may be a key that node has not replicated yet). Sized exactly:
/// it never reallocates, whatever the key count.
pub fn keyring_json(epoch: u64, primary: Option<KeyId>, keys: &[KeyRecord], gone: &[KeyId]) -> Zeroizing<Vec<u8>> {
    exact(|out| {
        write_primary_epoch(out, epoch, primary);
        out.put(b",\"keys\":[");
        for (i, record) in keys.iter().enumerate() {
            if i > 0 {
                out.put(b",");
            }
            write_key(out, record);
        }
        write_gone(out, gone);
    })
}

/// A sink for wrapped answers, which hold no key material: ciphertext goes in with `put`.
struct Sealed(Vec<u8>);

impl Sink for Sealed {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// Never called by the wrapped writers; writes nothing, so no plain key can end up in
    /// a wrapped answer.
    fn put_secret(&mut self, _: &MasterSecret) {}
}

/// Writes `"sealed":"…"}` for one key: its material sealed by `sealer` (the next in the
/// answer's order).
fn write_sealed_tail(out: &mut dyn Sink, record: &KeyRecord, sealer: &mut Sealer) -> Result<(), Error> {
    out.put(b"\"sealed\":\"");
    if let Some(secret) = &record.secret {
        let binding = Binding {
            key_id: record.meta.key_id,
            generation: record.meta.generation,
            state: record.meta.state,
        };
        out.put(sealer.seal(&binding, secret)?.as_bytes());
    }
    out.put(b"\"}");
    Ok(())
}

fn write_wrap(out: &mut dyn Sink, sealer: &Sealer) {
    out.put(b"\"wrap\":{\"v\":");
    out.put(crate::delivery::VERSION.to_string().as_bytes());
    out.put(b",\"enc\":\"");
    out.put(sealer.enc().as_bytes());
    out.put(b"\"}");
}

/// The wrapped `GET /v1/keyring` (and watch) body: the plain body's fields, a `wrap`
/// object, and each key's material sealed to the client (docs/key-delivery.md), in order.
pub fn wrapped_keyring_json(
    epoch: u64,
    primary: Option<KeyId>,
    keys: &[KeyRecord],
    gone: &[KeyId],
    sealer: &mut Sealer,
) -> Result<Vec<u8>, Error> {
    let mut out = Sealed(Vec::with_capacity(160 + keys.len() * 200 + gone.len() * 35));
    write_primary_epoch(&mut out, epoch, primary);
    out.put(b",");
    write_wrap(&mut out, sealer);
    out.put(b",\"keys\":[");
    for (i, record) in keys.iter().enumerate() {
        if i > 0 {
            out.put(b",");
        }
        write_key_head(&mut out, &record.meta);
        write_sealed_tail(&mut out, record, sealer)?;
    }
    write_gone(&mut out, gone);
    Ok(out.0)
}

/// The wrapped `GET /v1/keys/{id}` body: the key's fields, `wrap`, and `sealed`.
pub fn wrapped_key_json(record: &KeyRecord, sealer: &mut Sealer) -> Result<Vec<u8>, Error> {
    let mut out = Sealed(Vec::with_capacity(300));
    write_key_head(&mut out, &record.meta);
    write_wrap(&mut out, sealer);
    out.put(b",");
    write_sealed_tail(&mut out, record, sealer)?;
    Ok(out.0)
}

/// `GET /v1/keyring` and the watch answer, as a client reads it.
#[derive(Deserialize)]
#[expect(missing_debug_implementations, reason = "holds key material; no Debug by design")]
pub struct Keyring {
    /// The derived primary.
    pub primary: Option<KeyId>,
    /// The answering node's epoch.
    pub epoch: u64,
    /// The served keys.
    pub keys: Vec<Key>,
    /// Retired and destroyed key ids (an extension of SPEC §5; absent from older servers).
    #[serde(default)]
    pub gone: Vec<KeyId>,
    /// Present when the keys are sealed to this client (docs/key-delivery.md).
    #[serde(default)]
    pub wrap: Option<Wrap>,
}

/// The `wrap` object of a wrapped answer.
#[derive(Debug, Deserialize)]
pub struct Wrap {
    /// The delivery version.
    pub v: u64,
    /// The server's ephemeral X25519 public key, standard base64.
    pub enc: String,
}

/// One key on the wire: `key` (plain, a `SecretString`, so the base64 text is wiped on
/// drop) or `sealed` (wrapped delivery, ciphertext); a one-key answer carries its `wrap`.
#[derive(Deserialize)]
#[expect(missing_debug_implementations, reason = "holds key material; no Debug by design")]
pub struct Key {
    /// The key.
    pub key_id: KeyId,
    /// Its generation.
    pub generation: u64,
    /// Its state, with the primary derived.
    pub state: KeyState,
    /// RFC 3339.
    pub created_at: String,
    /// Plain delivery: standard base64.
    #[serde(default)]
    pub key: Option<SecretString>,
    /// Wrapped delivery: the material sealed to the client.
    #[serde(default)]
    pub sealed: Option<String>,
    /// A one-key wrapped answer's `wrap`.
    #[serde(default)]
    pub wrap: Option<Wrap>,
}

/// The opener for a wrapped answer, from its `wrap` object and the request's key pair.
/// An answer without `wrap` to a request that asked for it is refused: a client never
/// accepts key material that crossed TLS in the clear.
pub fn opener(wrap: Option<&Wrap>, recipient: Recipient, context: &str) -> Result<Opener, String> {
    let wrap = wrap.ok_or(
        "the answer carries key material in plain base64 although this client asked for wrapped \
         delivery (docs/key-delivery.md); upgrade the server",
    )?;
    if wrap.v != u64::from(crate::delivery::VERSION) {
        return Err(format!(
            "wrapped delivery version {} is not supported by this client (it speaks {}); upgrade it",
            wrap.v,
            crate::delivery::VERSION
        ));
    }
    recipient.opener(&wrap.enc, context).map_err(|e| e.to_string())
}

impl Key {
    /// The key's metadata and material. With an `opener` the material must be `sealed`
    /// (the `seq`-th key of the answer); without one it must be plain. The answer carries
    /// no origin: it is left empty.
    pub fn open(self, opener: Option<&Opener>, seq: u64) -> Result<(KeyMeta, MasterSecret), String> {
        let secret = match (opener, &self.sealed, &self.key) {
            (Some(opener), Some(sealed), None) => {
                let binding = Binding {
                    key_id: self.key_id,
                    generation: self.generation,
                    state: self.state,
                };
                opener
                    .open(seq, &binding, sealed)
                    .map_err(|e| format!("key {}: {e}", self.key_id))?
            }
            (None, None, Some(key)) => MasterSecret::from_base64(key.expose_secret().as_bytes())
                .map_err(|_| format!("key {}: material is not 32 bytes of base64", self.key_id))?,
            (Some(_), _, Some(_)) => {
                return Err(format!(
                    "key {}: sent in plain base64 although this client asked for wrapped delivery \
                     (docs/key-delivery.md); upgrade the server",
                    self.key_id
                ));
            }
            _ => return Err(format!("key {}: no usable key material in the answer", self.key_id)),
        };
        let created_at = OffsetDateTime::parse(&self.created_at, &Rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let meta = KeyMeta {
            key_id: self.key_id,
            generation: self.generation,
            created_at,
            origin: String::new(),
            state: self.state,
        };
        Ok((meta, secret))
    }
}

/// Parses a keyring (or watch) body. Errors name the problem's place, never the content.
/// Outside input: fuzzed by `fuzz/fuzz_targets/client_keyring.rs`.
pub fn parse_keyring(body: &[u8]) -> Result<Keyring, String> {
    serde_json::from_slice(body).map_err(|e| format!("malformed keyring (line {}, column {})", e.line(), e.column()))
}

/// Parses a one-key body (`GET /v1/keys/{id}`). Errors name the problem's place, never
/// the content.
pub fn parse_key(body: &[u8]) -> Result<Key, String> {
    serde_json::from_slice(body).map_err(|e| format!("malformed key answer (line {}, column {})", e.line(), e.column()))
}
