//! The key model's rules, with no storage in them: the stored lifecycle and its allowed
//! moves, the rules a local transition and a merge follow, the derivation of the primary,
//! the choice of the next generation and the key-set digest.
//!
//! Every storage engine (SQLite today, see [`crate::storage`]) reads its rows, asks this
//! module what to do, and writes the answer in the same transaction; no rule is written
//! in SQL. Nothing here touches a database, a file or the KEK.
//!
//! The lifecycle's storage encoding ([`Lifecycle::code`]) is not its order: which moves
//! are allowed is the explicit table in [`Lifecycle::advances_to`], so a new state can be
//! given any free code without changing what "forward" means.

use sso_proto::{KeyId, KeyState, MasterSecret};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// Where a key stands, as stored. `Primary` vs `Active` is derived ([`derive_primary`]),
/// never stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    /// Distributed, not yet used to encrypt.
    Staged,
    /// Promoted: the primary or an active key.
    Promoted,
    /// No longer served; material kept for backups.
    Retired,
    /// Material wiped; metadata kept.
    Destroyed,
}

impl Lifecycle {
    /// Every lifecycle, in no particular order that matters.
    pub const ALL: [Self; 4] = [Self::Staged, Self::Promoted, Self::Retired, Self::Destroyed];

    /// The storage encoding: the value in the SQLite column, the manifest record, the
    /// wrap's AAD and a backup payload's state byte (docs/backup-format.md). Fixed forever
    /// (stored data depends on it); it is not an order.
    pub fn code(self) -> u8 {
        match self {
            Self::Staged => 0,
            Self::Promoted => 1,
            Self::Retired => 2,
            Self::Destroyed => 3,
        }
    }

    /// The lifecycle stored as `code`, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.code() == code)
    }

    /// The stored lifecycle of a key in `state`.
    pub fn from_state(state: KeyState) -> Self {
        match state {
            KeyState::Staged => Self::Staged,
            KeyState::Primary | KeyState::Active => Self::Promoted,
            KeyState::Retired => Self::Retired,
            KeyState::Destroyed => Self::Destroyed,
        }
    }

    /// The state shown to clients and operators; `is_primary` for the derived primary.
    pub fn state(self, is_primary: bool) -> KeyState {
        match self {
            Self::Staged => KeyState::Staged,
            Self::Promoted if is_primary => KeyState::Primary,
            Self::Promoted => KeyState::Active,
            Self::Retired => KeyState::Retired,
            Self::Destroyed => KeyState::Destroyed,
        }
    }

    /// Whether clients are handed keys in this lifecycle.
    pub fn is_served(self) -> bool {
        matches!(self, Self::Staged | Self::Promoted)
    }

    /// Whether a key in this lifecycle keeps its (wrapped) material.
    pub fn keeps_material(self) -> bool {
        self != Self::Destroyed
    }

    /// Whether a key may move from `self` to `to`: states only move forward,
    /// `staged → promoted → retired → destroyed`, and a move may skip steps (a merge
    /// brings a key this node last saw staged straight to the peer's `destroyed`). The
    /// table is explicit; the storage codes play no part in it.
    pub fn advances_to(self, to: Self) -> bool {
        use Lifecycle::{Destroyed, Promoted, Retired, Staged};
        matches!(
            (self, to),
            (Staged, Promoted | Retired | Destroyed) | (Promoted, Retired | Destroyed) | (Retired, Destroyed)
        )
    }
}

/// A key with its material, as it moves between stores, peers and backups (defined in
/// sso-proto with the wire writers that carry it).
pub use sso_proto::KeyRecord;

/// What the rules need to know of one stored key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFacts {
    /// The key.
    pub key_id: KeyId,
    /// Its generation.
    pub generation: u64,
    /// Its stored lifecycle.
    pub lifecycle: Lifecycle,
}

/// The primary among `keys`: the promoted key with the highest `(generation, key_id)`,
/// so two nodes holding the same key set always agree on it.
pub fn derive_primary(keys: impl IntoIterator<Item = KeyFacts>) -> Option<KeyId> {
    keys.into_iter()
        .filter(|k| k.lifecycle == Lifecycle::Promoted)
        .max_by_key(|k| (k.generation, k.key_id))
        .map(|k| k.key_id)
}

/// The generation of a key made here: above every stored key (`stored_max`) and above
/// `floor` (the peer's highest generation, learned under its rotation lease). Engines call
/// this inside the write transaction that inserts the key, with `stored_max` read in that
/// transaction, so two writers never choose the same generation;
/// [`Error::GenerationExhausted`] (with its remedy) when no generation is left: the stores
/// keep generations as signed 64-bit integers.
pub fn next_generation(stored_max: u64, floor: u64) -> Result<u64> {
    stored_max
        .max(floor)
        .checked_add(1)
        .filter(|&g| i64::try_from(g).is_ok())
        .ok_or(Error::GenerationExhausted)
}

/// What a local transition (promote, retire, destroy) does, decided before any write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// The key is already there: nothing to write.
    Unchanged,
    /// Write the key's new lifecycle.
    Apply,
}

/// Checks a local transition of `key_id` to `to` against the whole key set `keys`.
/// `force_primary` is the operator's override that retires the primary when another
/// promoted key can take over.
pub fn check_move(keys: &[KeyFacts], key_id: KeyId, to: Lifecycle, force_primary: bool) -> Result<Move> {
    let primary = derive_primary(keys.iter().copied());
    let key = keys
        .iter()
        .find(|k| k.key_id == key_id)
        .ok_or(Error::KeyNotFound(key_id))?;
    let from = key.lifecycle;
    if from == to {
        return Ok(Move::Unchanged);
    }
    if !from.advances_to(to) {
        return Err(Error::InvalidTransition {
            key_id,
            from: from.state(primary == Some(key_id)),
            to: to.state(false),
        });
    }
    if to == Lifecycle::Retired && primary == Some(key_id) {
        let others = keys
            .iter()
            .any(|k| k.lifecycle == Lifecycle::Promoted && k.key_id != key_id);
        if !force_primary || !others {
            return Err(Error::RetirePrimary(key_id));
        }
    }
    if to == Lifecycle::Destroyed && from != Lifecycle::Retired {
        return Err(Error::DestroyUnretired(key_id));
    }
    Ok(Move::Apply)
}

/// What a merge does with one incoming key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeAction {
    /// Not stored yet: insert it in the incoming lifecycle.
    Add,
    /// Stored in an earlier lifecycle: move it to this one.
    Advance(Lifecycle),
    /// Stored in the same or a later lifecycle: nothing to write.
    Unchanged,
    /// Stored with another generation or other material: an integrity alarm.
    Conflict,
}

/// Decides the merge of one incoming key (`generation`, lifecycle `target`) against the
/// stored one (`local`, if any). `stored_max` is the highest stored generation when a new
/// key must lie above every stored key (a key the peer staged for its rotation), `None`
/// otherwise. `same_material` is asked only when both are stored with one generation;
/// it answers `true` when either side has no material.
pub fn merge_action(
    local: Option<KeyFacts>,
    key_id: KeyId,
    generation: u64,
    target: Lifecycle,
    stored_max: Option<u64>,
    same_material: impl FnOnce() -> Result<bool>,
) -> Result<MergeAction> {
    let Some(local) = local else {
        if let Some(max) = stored_max
            && generation <= max
        {
            return Err(Error::StaleGeneration {
                key_id,
                generation,
                max,
            });
        }
        return Ok(MergeAction::Add);
    };
    if local.generation != generation || !same_material()? {
        return Ok(MergeAction::Conflict);
    }
    Ok(if local.lifecycle.advances_to(target) {
        MergeAction::Advance(target)
    } else {
        MergeAction::Unchanged
    })
}

/// A keyed hash of one key's material, for the key-set digest: HMAC-SHA256 over the key
/// id under a key derived from the material (HKDF-SHA256 with a fixed label). Equal on two
/// nodes exactly when both hold the same material under that id (each node wraps under its
/// own KEK, so the tag cannot depend on it); one-way, so the digest reveals nothing usable
/// about the material.
pub fn material_tag(key_id: KeyId, secret: &MasterSecret) -> [u8; 32] {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"sso key-set digest v1").extract(secret.expose_secret());
    let mut derived = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit (255 * 32): `expand` and `fill` cannot fail.
    if let Ok(okm) = prk.expand(&[b"material tag"], Len) {
        let _ = okm.fill(&mut derived[..]);
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derived[..]);
    let tag = ring::hmac::sign(&key, key_id.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The digest of a key set: per key, in `(generation, key_id)` order, its id, generation,
/// stored lifecycle code and, when it has material, its [`material_tag`]. Two stores with
/// equal digests hold the same keys in the same states with the same material, whatever
/// engine holds them.
#[derive(Debug)]
pub struct KeySetDigest(Vec<(u64, KeyId, u8, Option<[u8; 32]>)>);

impl KeySetDigest {
    /// An empty key set.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds one key; `tag` is its [`material_tag`], `None` once destroyed.
    pub fn add(&mut self, key: KeyFacts, tag: Option<[u8; 32]>) {
        self.0.push((key.generation, key.key_id, key.lifecycle.code(), tag));
    }

    /// The digest, as lowercase hex.
    pub fn finish(mut self) -> String {
        self.0
            .sort_unstable_by_key(|&(generation, key_id, ..)| (generation, key_id));
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for (generation, key_id, code, tag) in &self.0 {
            ctx.update(key_id.as_bytes());
            ctx.update(&generation.to_be_bytes());
            ctx.update(&[*code]);
            match tag {
                Some(tag) => {
                    ctx.update(&[1]);
                    ctx.update(tag);
                }
                None => ctx.update(&[0]),
            }
        }
        hex::encode(ctx.finish())
    }
}

impl Default for KeySetDigest {
    fn default() -> Self {
        Self::new()
    }
}

/// What a merge changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Keys that were not stored before.
    pub added: usize,
    /// Keys whose state moved forward.
    pub advanced: usize,
    /// Keys already stored in the same or a later state.
    pub unchanged: usize,
    /// The epoch after the merge.
    pub epoch: u64,
}

impl MergeReport {
    /// Whether the merge changed anything.
    pub fn changed(&self) -> bool {
        self.added + self.advanced > 0
    }
}

#[cfg(test)]
mod tests {
    use super::Lifecycle::{Destroyed, Promoted, Retired, Staged};
    use super::*;

    fn id(n: u8) -> KeyId {
        KeyId::from_bytes([n; 16])
    }

    fn key(n: u8, generation: u64, lifecycle: Lifecycle) -> KeyFacts {
        KeyFacts {
            key_id: id(n),
            generation,
            lifecycle,
        }
    }

    #[test]
    fn storage_codes_are_fixed_and_round_trip() {
        // Stored rows, manifests and wrap AADs depend on these values.
        assert_eq!(Lifecycle::ALL.map(Lifecycle::code), [0, 1, 2, 3]);
        for l in Lifecycle::ALL {
            assert_eq!(Lifecycle::from_code(l.code()), Some(l));
        }
        assert_eq!(Lifecycle::from_code(4), None);
        assert_eq!(Lifecycle::from_code(255), None);
    }

    #[test]
    fn the_allowed_moves_are_exactly_forward() {
        let allowed = [
            (Staged, Promoted),
            (Staged, Retired),
            (Staged, Destroyed),
            (Promoted, Retired),
            (Promoted, Destroyed),
            (Retired, Destroyed),
        ];
        for from in Lifecycle::ALL {
            for to in Lifecycle::ALL {
                assert_eq!(
                    from.advances_to(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn states_map_to_lifecycles_and_back() {
        for state in [
            KeyState::Staged,
            KeyState::Primary,
            KeyState::Active,
            KeyState::Retired,
            KeyState::Destroyed,
        ] {
            let l = Lifecycle::from_state(state);
            assert_eq!(l.state(state == KeyState::Primary), state);
            assert_eq!(l.is_served(), state.is_served());
        }
        assert!(!Destroyed.keeps_material() && Retired.keeps_material());
    }

    #[test]
    fn the_primary_is_the_highest_promoted_key() {
        assert_eq!(derive_primary([]), None);
        assert_eq!(derive_primary([key(1, 1, Staged)]), None);
        let keys = [
            key(1, 1, Promoted),
            key(2, 3, Promoted),
            key(3, 4, Staged),
            key(4, 5, Retired),
        ];
        assert_eq!(derive_primary(keys), Some(id(2)));
        // Equal generations (two nodes rotating in a partition): the higher key id wins,
        // whatever order the keys come in.
        let tied = [key(7, 3, Promoted), key(9, 3, Promoted)];
        assert_eq!(derive_primary(tied), Some(id(9)));
        assert_eq!(derive_primary([tied[1], tied[0]]), Some(id(9)));
    }

    #[test]
    fn the_next_generation_is_above_the_store_and_the_floor() {
        assert_eq!(next_generation(0, 0).unwrap(), 1);
        assert_eq!(next_generation(5, 2).unwrap(), 6);
        assert_eq!(next_generation(5, 9).unwrap(), 10);
        // Exhausted, with the error that says what to do, not a malformed record.
        assert!(matches!(next_generation(u64::MAX, 0), Err(Error::GenerationExhausted)));
        // Stored as a signed 64-bit integer: no generation beyond i64::MAX.
        assert!(matches!(
            next_generation(i64::MAX as u64, 0),
            Err(Error::GenerationExhausted)
        ));
        assert!(matches!(
            next_generation(0, i64::MAX as u64),
            Err(Error::GenerationExhausted)
        ));
    }

    #[test]
    fn local_moves_follow_the_rules() {
        let keys = [
            key(1, 1, Promoted),
            key(2, 2, Promoted),
            key(3, 3, Staged),
            key(4, 1, Retired),
        ];
        assert_eq!(check_move(&keys, id(3), Promoted, false).unwrap(), Move::Apply);
        assert_eq!(check_move(&keys, id(3), Staged, false).unwrap(), Move::Unchanged);
        assert_eq!(check_move(&keys, id(1), Retired, false).unwrap(), Move::Apply);
        assert_eq!(check_move(&keys, id(4), Destroyed, false).unwrap(), Move::Apply);
        assert!(matches!(
            check_move(&keys, id(4), Promoted, false),
            Err(Error::InvalidTransition {
                from: KeyState::Retired,
                to: KeyState::Active,
                ..
            })
        ));
        assert!(matches!(
            check_move(&keys, id(2), Retired, false),
            Err(Error::RetirePrimary(_))
        ));
        assert_eq!(check_move(&keys, id(2), Retired, true).unwrap(), Move::Apply);
        assert!(matches!(
            check_move(&keys, id(1), Destroyed, false),
            Err(Error::DestroyUnretired(_))
        ));
        assert!(matches!(
            check_move(&keys, id(3), Destroyed, false),
            Err(Error::DestroyUnretired(_))
        ));
        assert!(matches!(
            check_move(&keys, id(9), Retired, false),
            Err(Error::KeyNotFound(_))
        ));
        // The only promoted key cannot be force-retired: clients would have nothing to seal under.
        let alone = [key(1, 1, Promoted), key(2, 2, Staged)];
        assert!(matches!(
            check_move(&alone, id(1), Retired, true),
            Err(Error::RetirePrimary(_))
        ));
    }

    #[test]
    fn merges_add_advance_keep_or_alarm() {
        let same = || Ok(true);
        let stored = key(1, 4, Promoted);
        assert_eq!(
            merge_action(None, id(1), 4, Staged, None, same).unwrap(),
            MergeAction::Add
        );
        assert_eq!(
            merge_action(Some(stored), id(1), 4, Destroyed, None, same).unwrap(),
            MergeAction::Advance(Destroyed)
        );
        assert_eq!(
            merge_action(Some(stored), id(1), 4, Staged, None, same).unwrap(),
            MergeAction::Unchanged
        );
        assert_eq!(
            merge_action(Some(stored), id(1), 4, Promoted, None, same).unwrap(),
            MergeAction::Unchanged
        );
        assert_eq!(
            merge_action(Some(stored), id(1), 5, Promoted, None, || panic!("not asked")).unwrap(),
            MergeAction::Conflict
        );
        assert_eq!(
            merge_action(Some(stored), id(1), 4, Retired, None, || Ok(false)).unwrap(),
            MergeAction::Conflict
        );
        // A peer's staged key must lie above every stored key.
        assert!(matches!(
            merge_action(None, id(2), 7, Staged, Some(7), same),
            Err(Error::StaleGeneration {
                generation: 7,
                max: 7,
                ..
            })
        ));
        assert_eq!(
            merge_action(None, id(2), 8, Staged, Some(7), same).unwrap(),
            MergeAction::Add
        );
    }

    #[test]
    fn the_digest_covers_every_field_and_ignores_order() {
        let digest = |keys: &[(KeyFacts, Option<[u8; 32]>)]| {
            let mut d = KeySetDigest::new();
            for (k, tag) in keys {
                d.add(*k, *tag);
            }
            d.finish()
        };
        let a = (key(1, 1, Promoted), Some([1; 32]));
        let b = (key(2, 2, Staged), Some([2; 32]));
        let base = digest(&[a, b]);
        assert_eq!(base, digest(&[b, a]));
        assert_ne!(base, digest(&[a]));
        assert_ne!(base, digest(&[a, (key(2, 2, Promoted), Some([2; 32]))]));
        assert_ne!(base, digest(&[a, (key(2, 3, Staged), Some([2; 32]))]));
        assert_ne!(base, digest(&[a, (key(2, 2, Staged), Some([3; 32]))]));
        assert_ne!(base, digest(&[a, (key(2, 2, Staged), None)]));
    }
}
