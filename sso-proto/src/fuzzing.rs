//! Entry points for `fuzz/`: each takes arbitrary bytes and must never panic.

use crate::{EnvelopeKey, EnvelopeRef, KeyId, MasterSecret};

/// Parses and opens arbitrary bytes as an envelope under a fixed key whose id matches
/// the input's header, so the fuzzer reaches tag verification, not only the parser.
pub fn open_envelope(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let (aad, envelope) = data.split_at(usize::from(split).min(data.len()));
    let Ok(parsed) = EnvelopeRef::parse(envelope) else {
        return;
    };
    let mut bytes = [0x42u8; 32];
    let key = EnvelopeKey::new(parsed.key_id, &MasterSecret::take_from(&mut bytes));
    let _ = parsed.open(&key, aad);
    let other = EnvelopeKey::new(KeyId::from_bytes([0; 16]), &MasterSecret::take_from(&mut [1; 32]));
    let _ = crate::envelope::open(envelope, aad, |_| Some(&other));
}

/// Valid inputs for the envelope target, to seed its corpus: `(target, bytes)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut bytes = [0x42u8; 32];
    let key = EnvelopeKey::new(KeyId::from_bytes([0x11; 16]), &MasterSecret::take_from(&mut bytes));
    let mut out = Vec::new();
    for (aad, plaintext) in [(&b""[..], &b""[..]), (b"tenant=1", b"hello"), (b"", &[0u8; 300][..])] {
        if let Ok(envelope) = crate::envelope::seal(&key, aad, plaintext) {
            let mut input = vec![aad.len() as u8];
            input.extend_from_slice(aad);
            input.extend_from_slice(&envelope);
            out.push(("envelope_open", input));
        }
    }
    out
}

/// Wrapped key delivery (`docs/key-delivery.md`): the input as a `Sso-Key-Wrap` header
/// (and, when it parses, a server sealing to it); then as an answer's `wrap.enc`, one
/// `sealed` field and the request context, separated by newlines, opened by a fresh
/// client key.
pub fn key_delivery(data: &[u8]) {
    use crate::delivery::{Binding, Recipient, RecipientKey, Sealer};
    let rng = ring::rand::SystemRandom::new();
    if let Ok(key) = RecipientKey::parse(data)
        && let Ok(mut sealer) = Sealer::new(&key, "/v1/keyring", &rng)
    {
        let binding = Binding {
            key_id: KeyId::from_bytes([7; 16]),
            generation: 1,
            state: crate::KeyState::Primary,
        };
        let _ = sealer.seal(&binding, &MasterSecret::take_from(&mut [9; 32]));
    }
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (enc, sealed, context) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let Ok(recipient) = Recipient::generate(&rng) else {
        return;
    };
    if let Ok(opener) = recipient.opener(enc, context) {
        let binding = Binding {
            key_id: KeyId::from_bytes([7; 16]),
            generation: 1,
            state: crate::KeyState::Primary,
        };
        let _ = opener.open(0, &binding, sealed);
    }
}

/// The wire readers of `crate::wire` that take a server's or a peer's answer: a one-key
/// answer (opened as plain material), a keyring, peer records, the small peer answers,
/// error bodies, and the admin answers ssoctl reads through their types.
pub fn wire_answers(data: &[u8]) {
    use crate::wire;
    if let Ok(key) = wire::parse_key(data) {
        let _ = key.open(None, 0);
    }
    if let Ok(keyring) = wire::parse_keyring(data) {
        for (i, key) in keyring.keys.into_iter().enumerate() {
            let _ = key.open(None, i as u64);
        }
    }
    let _ = wire::parse_records(data);
    let _ = wire::peer::parse_promote_answer(data);
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let _ = wire::peer::parse_contact(Some(&data[..split]), data.get(split + 1..));
    let _ = wire::parse_coverage(data);
    let _ = serde_json::from_slice::<wire::MergeAnswer>(data);
    let _ = serde_json::from_slice::<wire::peer::LeaseAnswer>(data);
    let _ = serde_json::from_slice::<wire::peer::LeaseRequest>(data);
    let _ = serde_json::from_slice::<wire::ErrorBody>(data);
    if let Ok(r) = serde_json::from_slice::<wire::agent::SealRequest>(data) {
        let _ = r.plaintext_base64();
    }
    let _ = serde_json::from_slice::<wire::agent::OpenRequest>(data);
    let _ = serde_json::from_slice::<wire::agent::OpenAnswer>(data);
    let _ = serde_json::from_slice::<wire::agent::SealAnswer>(data);
    let _ = serde_json::from_slice::<wire::agent::AgentStatus>(data);
    let _ = serde_json::from_slice::<wire::answers::StatusAnswer>(data);
    let _ = serde_json::from_slice::<wire::answers::HealthAnswer>(data);
    let _ = serde_json::from_slice::<wire::answers::RotateAnswer>(data);
    let _ = serde_json::from_slice::<wire::answers::KeyChanged>(data);
    let _ = serde_json::from_slice::<wire::answers::RestoreDryRun>(data);
    let _ = serde_json::from_slice::<wire::answers::Restored>(data);
    let _ = serde_json::from_slice::<wire::answers::AuditVerifyAnswer>(data);
}
