//! Validation of key records that arrive from outside this store: a peer's
//! `/v1/peer/merge` body, a peer's key set pulled by anti-entropy, or a restored backup.
//!
//! Everything here treats the sender as hostile. [`check_incoming`] looks at every field
//! of every record against the key set stored here and either refuses the whole batch
//! (nothing is written) or returns, per record, the values the store may seal:
//!
//! - **generation**: at least 1, at most [`MAX_GENERATION`], and at most
//!   [`MAX_GENERATION_STEP`] above the highest generation stored here. A peer cannot plant
//!   a key so high that this node can no longer rotate past it.
//! - **created_at**: between 1970 and 9999, normalised to UTC whole seconds before it is
//!   bound into the wrap, because the store keeps whole seconds: whatever is accepted
//!   unwraps again.
//! - **origin**: 1 to [`MAX_ORIGIN_LEN`] bytes, no control characters (it must fit the
//!   backup format and is shown to operators).
//! - **material**: present unless destroyed; absent when destroyed.
//! - **key ids**: each at most once per batch (the id format itself is checked by the
//!   parsers: 32 lowercase hex characters on the wire, 16 bytes in a backup).
//! - **state moves**: the key that is primary here may be retired by a sender only when the
//!   same batch leaves a newer primary, and it is never destroyed by one: a destroy of the
//!   current primary is taken as a retire (the material stays; the destroy lands on a later
//!   sync, once the key is no longer primary here).
//!
//! Locally generated generations are `crate::model::next_generation`'s, checked arithmetic
//! that never wraps.

use sso_proto::{KeyId, KeyMeta, KeyState};
use time::OffsetDateTime;

use crate::model::KeyRecord;
use crate::{Error, Result};

/// Highest generation accepted from a peer or a backup: 2^53 − 1, exact in every JSON
/// implementation and far below `i64::MAX`, so a node can always rotate past any key it
/// accepted.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;
/// How far above the highest generation stored here an incoming key may be. A pair that
/// rotates every minute for two years stays below it; a fresh node restored from nothing
/// accepts any peer younger than that.
pub const MAX_GENERATION_STEP: u64 = 1 << 20;
/// Longest origin (node name) accepted, in bytes: what the backup format can carry.
pub const MAX_ORIGIN_LEN: usize = 255;
/// Most records one batch may carry.
pub const MAX_RECORDS: usize = 1 << 20;

/// What the store may write for one accepted record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The creation time, UTC, whole seconds.
    pub created_at: OffsetDateTime,
    /// The state to move to: the sender's, except that destroying this node's primary is
    /// taken as retiring it.
    pub state: KeyState,
}

fn malformed(key_id: KeyId, detail: &'static str) -> Error {
    Error::MalformedRecord { key_id, detail }
}

/// Normalises a creation time for sealing: UTC, whole seconds, 1970 to 9999.
pub fn normalise_time(key_id: KeyId, t: OffsetDateTime) -> Result<OffsetDateTime> {
    let t = t.to_offset(time::UtcOffset::UTC);
    if t.unix_timestamp() < 0 {
        return Err(malformed(key_id, "creation time before 1970"));
    }
    t.replace_nanosecond(0)
        .map_err(|_| malformed(key_id, "creation time out of range"))
}

/// The node-name rule lives in sso-proto (the peer's contact headers read node names
/// too); the server's config and `ssoctl init` ask here, so a store is never made for a
/// name the server refuses.
pub use sso_proto::key::{NODE_NAME_RULE, is_valid_node_name};

/// Checks an origin's length and characters.
pub fn check_origin(key_id: KeyId, origin: &str) -> Result<()> {
    if origin.is_empty() {
        return Err(malformed(key_id, "empty origin"));
    }
    if origin.len() > MAX_ORIGIN_LEN {
        return Err(malformed(key_id, "origin longer than 255 bytes"));
    }
    if origin.chars().any(char::is_control) {
        return Err(malformed(key_id, "origin contains control characters"));
    }
    Ok(())
}

/// Validates `incoming` against `stored` (every key here, `Primary` derived). Returns one
/// [`Checked`] per incoming record, in order, or refuses the whole batch.
pub fn check_incoming(stored: &[KeyMeta], incoming: &[KeyRecord]) -> Result<Vec<Checked>> {
    if incoming.len() > MAX_RECORDS {
        return Err(Error::BackupMalformed("too many keys in one batch"));
    }
    let highest = stored.iter().map(|k| k.generation).max().unwrap_or(0);
    let ceiling = highest.saturating_add(MAX_GENERATION_STEP).min(MAX_GENERATION);
    let mut seen = std::collections::HashSet::with_capacity(incoming.len());
    let mut out = Vec::with_capacity(incoming.len());
    for record in incoming {
        let meta = &record.meta;
        let id = meta.key_id;
        if !seen.insert(id) {
            return Err(malformed(id, "the key appears twice in one batch"));
        }
        if meta.generation == 0 {
            return Err(malformed(id, "generation 0"));
        }
        if meta.generation > MAX_GENERATION {
            return Err(malformed(id, "generation above 2^53 - 1"));
        }
        let known = stored.iter().find(|k| k.key_id == id);
        if known.is_none() && meta.generation > ceiling {
            return Err(malformed(
                id,
                "generation more than 1048576 above the highest stored here",
            ));
        }
        check_origin(id, &meta.origin)?;
        let created_at = normalise_time(id, meta.created_at)?;
        match (meta.state, &record.secret) {
            (KeyState::Destroyed, Some(_)) => return Err(malformed(id, "a destroyed key arrived with material")),
            (KeyState::Destroyed, None) => {}
            (_, None) => return Err(malformed(id, "a key that is not destroyed arrived without material")),
            (_, Some(_)) => {}
        }
        let state = match meta.state {
            KeyState::Primary => KeyState::Active,
            s => s,
        };
        out.push(Checked { created_at, state });
    }
    check_primary_kept(stored, incoming, &mut out)?;
    Ok(out)
}

/// The primary here may only be retired by a batch that leaves a newer primary, and a
/// destroy of it is taken as a retire.
fn check_primary_kept(stored: &[KeyMeta], incoming: &[KeyRecord], checked: &mut [Checked]) -> Result<()> {
    let Some(primary) = stored.iter().find(|k| k.state == KeyState::Primary) else {
        return Ok(());
    };
    let Some(pos) = incoming.iter().position(|r| r.meta.key_id == primary.key_id) else {
        return Ok(());
    };
    if !matches!(checked[pos].state, KeyState::Retired | KeyState::Destroyed) {
        return Ok(());
    }
    // Promoted after the batch: stored promoted keys the batch does not retire, and
    // incoming active keys not retired here already.
    let incoming_state = |id: KeyId| {
        incoming
            .iter()
            .zip(checked.iter())
            .find(|(r, _)| r.meta.key_id == id)
            .map(|(_, c)| c.state)
    };
    let stored_promoted = stored
        .iter()
        .filter(|k| matches!(k.state, KeyState::Primary | KeyState::Active))
        .filter(|k| !matches!(incoming_state(k.key_id), Some(KeyState::Retired | KeyState::Destroyed)))
        .map(|k| (k.generation, k.key_id));
    let incoming_promoted = incoming
        .iter()
        .zip(checked.iter())
        .filter(|(_, c)| c.state == KeyState::Active)
        .filter(|(r, _)| {
            stored
                .iter()
                .find(|k| k.key_id == r.meta.key_id)
                .is_none_or(|k| !matches!(k.state, KeyState::Retired | KeyState::Destroyed))
        })
        .map(|(r, _)| (r.meta.generation, r.meta.key_id));
    let next = stored_promoted.chain(incoming_promoted).max();
    if next.is_none_or(|n| n <= (primary.generation, primary.key_id)) {
        return Err(Error::RefusedTransition {
            key_id: primary.key_id,
            detail: "it is the primary here and the batch brings no newer primary",
        });
    }
    checked[pos].state = KeyState::Retired;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sso_proto::MasterSecret;

    fn id(n: u8) -> KeyId {
        KeyId::from_bytes([n; 16])
    }

    fn meta(n: u8, generation: u64, state: KeyState) -> KeyMeta {
        KeyMeta {
            key_id: id(n),
            generation,
            created_at: OffsetDateTime::UNIX_EPOCH,
            origin: "node-a".into(),
            state,
        }
    }

    fn record(n: u8, generation: u64, state: KeyState) -> KeyRecord {
        KeyRecord {
            meta: meta(n, generation, state),
            secret: (state != KeyState::Destroyed).then(|| MasterSecret::take_from(&mut [n; 32])),
        }
    }

    #[test]
    fn generations_are_bounded_and_checked() {
        let stored = [meta(1, 5, KeyState::Primary)];
        assert!(check_incoming(&stored, &[record(2, 5 + MAX_GENERATION_STEP, KeyState::Active)]).is_ok());
        for g in [0, 6 + MAX_GENERATION_STEP, i64::MAX as u64, u64::MAX] {
            assert!(
                matches!(
                    check_incoming(&stored, &[record(2, g, KeyState::Active)]),
                    Err(Error::MalformedRecord { .. })
                ),
                "generation {g} accepted"
            );
        }
    }

    #[test]
    fn times_are_normalised_and_origins_bounded() {
        let mut r = record(2, 1, KeyState::Active);
        r.meta.created_at = OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds(1_500_000_123);
        let c = check_incoming(&[], std::slice::from_ref(&r)).unwrap();
        assert_eq!(c[0].created_at.unix_timestamp_nanos(), 1_000_000_000);
        r.meta.origin = "x".repeat(256);
        assert!(check_incoming(&[], std::slice::from_ref(&r)).is_err());
        r.meta.origin = "a\nb".into();
        assert!(check_incoming(&[], std::slice::from_ref(&r)).is_err());
        r.meta.origin = String::new();
        assert!(check_incoming(&[], &[r]).is_err());
    }

    #[test]
    fn the_primary_here_is_never_destroyed_by_a_sender() {
        let stored = [meta(1, 1, KeyState::Active), meta(2, 2, KeyState::Primary)];
        // Alone: refused.
        for s in [KeyState::Retired, KeyState::Destroyed] {
            assert!(matches!(
                check_incoming(&stored, &[record(2, 2, s)]),
                Err(Error::RefusedTransition { .. })
            ));
        }
        // With a newer primary: retired, not destroyed.
        let c = check_incoming(
            &stored,
            &[record(2, 2, KeyState::Destroyed), record(3, 3, KeyState::Active)],
        )
        .unwrap();
        assert_eq!(c[0].state, KeyState::Retired);
        // An older key does not count as a newer primary.
        assert!(
            check_incoming(
                &stored,
                &[record(2, 2, KeyState::Retired), record(4, 1, KeyState::Active)]
            )
            .is_err()
        );
        // Duplicates and material on destroyed keys are refused.
        assert!(check_incoming(&[], &[record(3, 1, KeyState::Active), record(3, 1, KeyState::Active)]).is_err());
        let mut d = record(3, 1, KeyState::Destroyed);
        d.secret = Some(MasterSecret::take_from(&mut [1; 32]));
        assert!(check_incoming(&[], &[d]).is_err());
    }
}
