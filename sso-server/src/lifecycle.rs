//! An operator's retire, forced retire and destroy of one key, as domain logic with no
//! HTTP: the peer check before retiring a staged key (`replication`'s
//! [`ask_the_peer_before_retiring`](crate::replication::ask_the_peer_before_retiring)),
//! the change in the store with the primary it leaves ([`Change::apply`]; the rules of
//! which move is allowed are `keystore::model`'s), then the push of the key's new state to
//! the peer ([`push_key`](crate::replication::push_key)). Results are domain types
//! ([`Changed`], [`LifecycleError`]) that `api` maps to HTTP.
//!
//! Imports `state` and `replication`; nothing imports it but `api`.

use std::sync::Arc;

use sso_proto::{KeyId, KeyMeta};

use crate::replication::{Pushed, RetireCheck};
use crate::state::AppState;

/// What an operator asks of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Retire it: it opens old envelopes and seals nothing; never the primary.
    Retire,
    /// Retire it even if it is the primary (the operator's override): the next promoted
    /// key becomes the primary, or none.
    ForceRetire,
    /// Destroy its material; only a retired key.
    Destroy,
}

impl Change {
    /// The change in `store`: the key's new metadata, and the primary afterwards.
    pub fn apply(self, store: &mut dyn keystore::Store, id: KeyId) -> keystore::Result<Applied> {
        let meta = match self {
            Self::Retire => store.retire(id)?,
            Self::ForceRetire => store.force_retire(id)?,
            Self::Destroy => store.destroy(id)?,
        };
        let primary = store.primary()?.map(|p| p.key_id);
        Ok(Applied { meta, primary })
    }

    /// Whether this change retires (and so must ask the peer first about a staged key).
    fn retires(self) -> bool {
        matches!(self, Self::Retire | Self::ForceRetire)
    }
}

/// What [`Change::apply`] left in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The key's metadata afterwards.
    pub meta: KeyMeta,
    /// The primary afterwards.
    pub primary: Option<KeyId>,
}

/// A change made here and pushed to the peer (or left to anti-entropy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The store's side of it.
    pub applied: Applied,
    /// Where the key's new state stands on the peer.
    pub replication: Pushed,
}

/// Why a change was not made.
#[derive(Debug)]
pub enum LifecycleError {
    /// The store refused (no such key, not allowed by the lifecycle, a store fault).
    Store(keystore::Error),
    /// The key is staged here and the peer could not be asked whether it promoted it
    /// (its error, for the operator): nothing was changed.
    PeerUnreachable(String),
    /// A blocking task ended without an answer (it panicked).
    Internal,
}

/// Makes `change` to key `id`: for a retire of a key staged here, one anti-entropy round
/// with the peer first (it may be the peer's primary); then the change in the store
/// (republished to clients); then the key's new state pushed to the peer.
pub async fn change(state: &Arc<AppState>, id: KeyId, change: Change) -> Result<Changed, LifecycleError> {
    if change.retires() {
        crate::replication::ask_the_peer_before_retiring(state, id)
            .await
            .map_err(|e| match e {
                RetireCheck::Store(e) => LifecycleError::Store(e),
                RetireCheck::PeerUnreachable(e) => LifecycleError::PeerUnreachable(e),
            })?;
    }
    let applied = state
        .publishing(move |store| change.apply(store, id))
        .await
        .ok_or(LifecycleError::Internal)?
        .map_err(LifecycleError::Store)?;
    if change == Change::ForceRetire {
        tracing::warn!(key_id = %id, primary = ?applied.primary, "operator override: forced retirement of a primary");
    }
    let replication = crate::replication::push_key(state, id).await;
    Ok(Changed { applied, replication })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore::{CreateOptions, SealedStore, UnsealKey};
    use sso_proto::KeyState;

    fn store(dir: &std::path::Path) -> SealedStore {
        let key = UnsealKey::generate_key_file(&dir.join("unseal.key")).unwrap();
        SealedStore::create(&dir.join("store.db"), &key, &CreateOptions::new("a")).unwrap()
    }

    /// Each change is the store's move of that name, and reports the primary it leaves: a
    /// plain retire never takes the primary, the override does (and the older promoted key
    /// takes over), destroy only follows a retire.
    #[test]
    fn each_change_is_its_move_and_names_the_primary_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store(dir.path());
        let old = store.rotate().unwrap().key_id;
        let new = store.rotate().unwrap().key_id;

        let refused = Change::Retire.apply(&mut store, new).unwrap_err();
        assert!(matches!(refused, keystore::Error::RetirePrimary(_)), "{refused:?}");
        let refused = Change::Destroy.apply(&mut store, new).unwrap_err();
        assert!(matches!(refused, keystore::Error::DestroyUnretired(_)), "{refused:?}");

        let forced = Change::ForceRetire.apply(&mut store, new).unwrap();
        assert_eq!((forced.meta.key_id, forced.meta.state), (new, KeyState::Retired));
        assert_eq!(forced.primary, Some(old));

        let destroyed = Change::Destroy.apply(&mut store, new).unwrap();
        assert_eq!(destroyed.meta.state, KeyState::Destroyed);
        assert_eq!(destroyed.primary, Some(old));

        let unknown = Change::Retire
            .apply(&mut store, KeyId::from_bytes([9; 16]))
            .unwrap_err();
        assert!(matches!(unknown, keystore::Error::KeyNotFound(_)), "{unknown:?}");
        assert!(Change::Retire.retires() && Change::ForceRetire.retires() && !Change::Destroy.retires());
    }
}
