//! The storage trait's contract, run through `dyn Store` only, against every engine this
//! build has: SQLite, and PostgreSQL in a throwaway cluster (one per test binary; each
//! store gets a fresh database). A new engine adds its opener to `engines()` and must pass
//! the same checks.

use std::sync::OnceLock;

use keystore::postgres::PgStore;
use keystore::{CreateOptions, Error, KdfParams, SealedStore, Store, UnsealKey};
use pg_throwaway::PgCluster;
use secrecy::SecretString;
use sso_proto::KeyState;

/// An engine's name and two fresh, empty stores of it, named `node-a` and `node-b`.
type Engine = (&'static str, Box<dyn Store>, Box<dyn Store>);

fn engines(dir: &tempfile::TempDir) -> Vec<Engine> {
    let sqlite = |name: &str| -> Box<dyn Store> {
        let key = UnsealKey::generate_key_file(&dir.path().join(format!("{name}.key"))).unwrap();
        Box::new(SealedStore::create(&dir.path().join(format!("{name}.db")), &key, &CreateOptions::new(name)).unwrap())
    };
    let postgres = |name: &str| -> Box<dyn Store> {
        static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
        let url = CLUSTER.get_or_init(PgCluster::start).fresh_database();
        let key = UnsealKey::generate_key_file(&dir.path().join(format!("pg-{name}.key"))).unwrap();
        Box::new(PgStore::create(&url, &key, &CreateOptions::new(name)).unwrap())
    };
    vec![
        ("sqlite", sqlite("node-a"), sqlite("node-b")),
        ("postgresql", postgres("node-a"), postgres("node-b")),
    ]
}

#[test]
fn lifecycle_through_the_trait() {
    let dir = tempfile::tempdir().unwrap();
    for (engine, mut a, _) in engines(&dir) {
        let a: &mut dyn Store = a.as_mut();
        assert_eq!(a.node(), "node-a", "{engine}");
        assert_eq!(a.epoch().unwrap(), 0, "{engine}");
        let first = a.rotate().unwrap();
        assert_eq!((first.state, first.generation), (KeyState::Primary, 1), "{engine}");
        let staged = a.stage_new_above(5).unwrap();
        assert_eq!((staged.state, staged.generation), (KeyState::Staged, 6), "{engine}");
        assert_eq!(a.max_generation().unwrap(), 6, "{engine}");
        assert_eq!(a.keyring().unwrap().keys.len(), 2, "{engine}");
        a.promote(staged.key_id).unwrap();
        assert_eq!(a.primary().unwrap().unwrap().key_id, staged.key_id, "{engine}");
        assert!(
            matches!(a.retire(staged.key_id), Err(Error::RetirePrimary(_))),
            "{engine}"
        );
        assert!(
            matches!(a.destroy(first.key_id), Err(Error::DestroyUnretired(_))),
            "{engine}"
        );
        a.retire(first.key_id).unwrap();
        assert!(
            matches!(a.promote(first.key_id), Err(Error::InvalidTransition { .. })),
            "{engine}: a retired key came back"
        );
        a.destroy(first.key_id).unwrap();
        let exported = a.export().unwrap();
        assert_eq!(exported.len(), 2, "{engine}");
        assert!(a.export_key(first.key_id).unwrap().secret.is_none(), "{engine}");
        assert_eq!(a.key_meta(first.key_id).unwrap().state, KeyState::Destroyed, "{engine}");
        assert_eq!(a.verify().unwrap(), 2, "{engine}");
        assert_eq!(a.epoch().unwrap(), 5, "{engine}");
        a.check_writable().unwrap();
        assert_eq!(a.epoch().unwrap(), 5, "{engine}: a write check changed the key set");
    }
}

#[test]
fn replication_and_backup_through_the_trait() {
    let dir = tempfile::tempdir().unwrap();
    for (engine, mut a, mut b) in engines(&dir) {
        let (a, b): (&mut dyn Store, &mut dyn Store) = (a.as_mut(), b.as_mut());
        a.rotate().unwrap();
        let staged = a.stage_new_above(0).unwrap();
        // The peer's staged key must lie above everything stored there.
        b.rotate().unwrap();
        b.rotate().unwrap();
        let record = a.export_key(staged.key_id).unwrap();
        assert!(
            matches!(b.accept_staged(&record), Err(Error::StaleGeneration { .. })),
            "{engine}"
        );
        let floor = b.max_generation().unwrap();
        let above = a.stage_new_above(floor).unwrap();
        assert!(
            b.accept_staged(&a.export_key(above.key_id).unwrap()).unwrap().changed(),
            "{engine}"
        );

        // Merge both ways: the same key set, the same digest, the same primary.
        b.merge(&a.export().unwrap()).unwrap();
        a.merge(&b.export().unwrap()).unwrap();
        assert_eq!(a.digest().unwrap(), b.digest().unwrap(), "{engine}");
        assert_eq!(a.keyring().unwrap().primary, b.keyring().unwrap().primary, "{engine}");
        let (report, conflicts) = a.merge_skipping_conflicts(&b.export().unwrap()).unwrap();
        assert!(!report.changed() && conflicts.is_empty(), "{engine}");

        // A backup written through the trait restores through the trait.
        let password = SecretString::from("contract password");
        let pending = a.create_backup(&password, "", KdfParams::insecure_for_tests()).unwrap();
        a.confirm_backup(&pending).unwrap();
        assert!(a.status().unwrap().not_backed_up.is_empty(), "{engine}");
        let opened = keystore::backup::open_file(&pending.bytes, &password).unwrap();
        let plan = b.restore_plan(&opened).unwrap();
        assert!(plan.unknown.is_empty(), "{engine}");
        assert!(!b.restore_opened(&opened).unwrap().changed(), "{engine}");

        // The audit anchor round-trips.
        assert!(a.audit_anchor().unwrap().is_none(), "{engine}");
        let anchor = keystore::AuditAnchor {
            count: 3,
            head: "ab".repeat(32),
        };
        a.set_audit_anchor(&anchor).unwrap();
        assert_eq!(a.audit_anchor().unwrap().unwrap().count, 3, "{engine}");
    }
}
