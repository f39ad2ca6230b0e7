//! The PostgreSQL engine against a real throwaway PostgreSQL (pg-throwaway; no mocks):
//! concurrent writers, no key material in the database, an outage and the reconnect, the
//! change feed, migrations and the unseal check. The tests that stop the database have a
//! cluster of their own; the others share one (a fresh database each).

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use keystore::postgres::{ChangeFeed, PgOptions, PgStore};
use keystore::{CreateOptions, Error, Store, UnsealKey};
use pg_throwaway::PgCluster;
use sso_proto::KeyState;

fn shared() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(PgCluster::start)
}

fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// A fresh database with an initialised store (schema + first key) and its key file.
fn initialised(cluster: &PgCluster, dir: &tempfile::TempDir) -> (String, UnsealKey, PgStore) {
    let url = cluster.fresh_database();
    let key = UnsealKey::generate_key_file(&dir.path().join(format!("{}.key", database_name(&url)))).unwrap();
    let (store, first) = PgStore::init(&url, &key, &CreateOptions::new("node-1")).unwrap();
    assert_eq!((first.state, first.generation), (KeyState::Primary, 1));
    (url, key, store)
}

#[test]
fn concurrent_rotations_on_many_handles_never_share_a_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (url, key, _) = initialised(shared(), &dir);
    const HANDLES: usize = 4;
    const ROTATIONS: usize = 6;
    let acknowledged: Vec<Vec<(sso_proto::KeyId, u64)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..HANDLES)
            .map(|n| {
                let (url, key) = (&url, &key);
                s.spawn(move || {
                    let mut store = PgStore::open(url, key, &format!("node-{n}")).unwrap();
                    (0..ROTATIONS)
                        .map(|i| {
                            // Both kinds of new key: a rotation and a stage above a floor.
                            let meta = if i % 2 == 0 {
                                store.rotate().unwrap()
                            } else {
                                store.stage_new_above(0).unwrap()
                            };
                            (meta.key_id, meta.generation)
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let all: Vec<(sso_proto::KeyId, u64)> = acknowledged.into_iter().flatten().collect();
    let generations: BTreeSet<u64> = all.iter().map(|(_, g)| *g).collect();
    assert_eq!(
        generations.len(),
        HANDLES * ROTATIONS,
        "two writers shared a generation: {all:?}"
    );
    assert!(!generations.contains(&1), "a writer reused the first key's generation");

    // Every acknowledged change is visible to every handle afterwards.
    for n in 0..HANDLES {
        let store = PgStore::open(&url, &key, &format!("reader-{n}")).unwrap();
        let listed: BTreeSet<_> = store.list().unwrap().iter().map(|k| (k.key_id, k.generation)).collect();
        for k in &all {
            assert!(listed.contains(k), "handle {n} does not see the acknowledged key {k:?}");
        }
        assert_eq!(
            store.epoch().unwrap(),
            1 + (HANDLES * ROTATIONS) as u64,
            "one epoch per change"
        );
        assert_eq!(store.verify().unwrap(), 1 + HANDLES * ROTATIONS);
    }
}

/// Two nodes' handles: node-1 stages a key, node-2 rotates above it meanwhile (a staging
/// pause overtaken), and node-1's promotion is refused as `Overtaken`, naming node-2's key,
/// with nothing written. (It was `InvalidTransition` before, which the server worded as
/// "key ... was promoted but ...".)
#[test]
fn a_staged_key_overtaken_by_another_nodes_promotion_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (url, key, mut one) = initialised(shared(), &dir);
    let mut two = PgStore::open(&url, &key, "node-2").unwrap();
    let staged = one.stage_new_above(0).unwrap();
    let newer = two.rotate().unwrap();
    assert!(newer.generation > staged.generation);
    let epoch = one.epoch().unwrap();
    let refused = one.promote(staged.key_id).unwrap_err();
    match &refused {
        Error::Overtaken {
            key_id,
            generation,
            by,
            by_generation,
        } => assert_eq!(
            (*key_id, *generation, *by, *by_generation),
            (staged.key_id, staged.generation, newer.key_id, newer.generation)
        ),
        other => panic!("expected Overtaken, got {other:?}"),
    }
    let text = refused.to_string();
    assert!(
        text.contains("was not promoted") && text.contains(&newer.key_id.to_string()),
        "{text}"
    );
    assert_eq!(one.epoch().unwrap(), epoch, "the refused promotion wrote something");
    assert_eq!(one.primary().unwrap().map(|m| m.key_id), Some(newer.key_id));
    let records = one.export().unwrap();
    let mine = records.iter().find(|r| r.meta.key_id == staged.key_id).unwrap();
    assert_eq!(mine.meta.state, KeyState::Staged);
}

#[test]
fn the_database_holds_no_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, _, mut store) = initialised(cluster, &dir);
    let second = store.rotate().unwrap();
    let staged = store.stage_new_above(0).unwrap();
    let old = store.list().unwrap()[0].key_id;
    store.retire(old).unwrap();
    let mut secrets = Vec::new();
    for record in store.export().unwrap() {
        secrets.push(record.secret.as_ref().unwrap().expose_secret().to_vec());
    }
    store.destroy(old).unwrap();
    assert_eq!(secrets.len(), 3);
    assert!(
        store
            .keyring()
            .unwrap()
            .keys
            .iter()
            .any(|k| k.meta.key_id == second.key_id)
    );
    assert!(
        store
            .keyring()
            .unwrap()
            .keys
            .iter()
            .any(|k| k.meta.key_id == staged.key_id)
    );

    let dump = cluster.dump(database_name(&url));
    let text = String::from_utf8_lossy(&dump).to_lowercase();
    assert!(text.contains("sso_keys"), "the dump does not hold the keys table");
    for secret in &secrets {
        let forms = [
            hex::encode(secret),
            base64::engine::general_purpose::STANDARD.encode(secret).to_lowercase(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(secret)
                .to_lowercase(),
        ];
        for form in &forms {
            assert!(!text.contains(form.as_str()), "a key's bytes are in the database dump");
        }
        assert!(
            !dump.windows(secret.len()).any(|w| w == secret.as_slice()),
            "a key's raw bytes are in the database dump"
        );
    }
}

#[test]
fn an_outage_fails_fast_with_a_remedy_and_the_next_call_after_it_reconnects() {
    let cluster = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, key, mut store) = initialised(&cluster, &dir);
    let before = store.list().unwrap();

    cluster.stop();
    let started = Instant::now();
    let err = store.rotate().unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a call on a stopped database took {:?}",
        started.elapsed()
    );
    let Error::Storage(storage) = &err else {
        panic!("not a storage error: {err}");
    };
    assert!(storage.remedy().contains("PostgreSQL"), "no remedy: {err}");
    assert!(err.store_fault().is_some(), "no fault for the server's health: {err}");
    assert!(store.keyring().is_err(), "a read on a stopped database succeeded");
    assert!(PgStore::open(&url, &key, "node-2").is_err());

    cluster.start_again();
    // The same handle, not reopened: the next call reconnects by itself.
    assert_eq!(
        store.list().unwrap().len(),
        before.len(),
        "the failed rotation changed something"
    );
    let rotated = store.rotate().unwrap();
    assert_eq!(store.primary().unwrap().unwrap().key_id, rotated.key_id);
    assert_eq!(store.epoch().unwrap(), 2);
}

#[test]
fn a_statement_that_hangs_is_cut_by_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, key, _) = initialised(cluster, &dir);
    let options = PgOptions {
        statement_timeout: Duration::from_secs(1),
        ..PgOptions::default()
    };
    let mut store = PgStore::open_with(&url, &key, "node-2", options).unwrap();
    // Another session holds the store's row locked: a write waits for it until the
    // statement timeout cuts it.
    let db = database_name(&url).to_owned();
    let locker = std::thread::spawn(move || {
        shared().psql(
            &db,
            "BEGIN; SELECT * FROM sso_store FOR UPDATE; SELECT pg_sleep(4); COMMIT;",
        );
    });
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let err = store.rotate().unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the write waited {:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::Storage(_)), "{err}");
    locker.join().unwrap();
    store.rotate().unwrap();
}

#[test]
fn the_change_feed_delivers_other_handles_changes_and_resyncs_after_a_restart() {
    let cluster = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, key, _) = initialised(&cluster, &dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut feed = ChangeFeed::start(&url).unwrap();
        let watcher = feed.subscribe();
        let until = |pred: fn(&keystore::postgres::FeedState) -> bool| {
            let mut rx = watcher.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), rx.wait_for(pred))
                    .await
                    .expect("the feed did not get there in 10 s")
                    .map(|s| *s)
                    .unwrap()
            }
        };
        let first = until(|s| s.connected).await;
        assert_eq!((first.epoch, first.resyncs), (1, 1));

        // Another handle (another connection) rotates: the feed hears the new epoch.
        let (u, k) = (url.clone(), key_path(&dir, &url));
        tokio::task::spawn_blocking(move || {
            let key = UnsealKey::key_file(&k).unwrap();
            PgStore::open(&u, &key, "node-2").unwrap().rotate().unwrap();
        })
        .await
        .unwrap();
        // From the acknowledged commit to the feed (the notification may be there already).
        let committed = Instant::now();
        let state = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let state = feed.next().await.unwrap();
                if state.epoch >= 2 {
                    return state;
                }
            }
        })
        .await
        .expect("the feed did not deliver the rotation in 5 s");
        assert_eq!(state.epoch, 2, "{state:?}");
        assert!(
            committed.elapsed() < Duration::from_secs(2),
            "the notification took {:?} after the commit",
            committed.elapsed()
        );

        // The database restarts: the feed notices, reconnects and re-reads the epoch
        // (resyncs 2), and the change made right after the restart reaches it (by the
        // re-read or by its notification, whichever comes first).
        cluster.stop();
        until(|s| !s.connected).await;
        cluster.start_again();
        let u = url.clone();
        let k = key_path(&dir, &url);
        tokio::task::spawn_blocking(move || {
            let key = UnsealKey::key_file(&k).unwrap();
            PgStore::open(&u, &key, "node-2").unwrap().rotate().unwrap();
        })
        .await
        .unwrap();
        let resynced = until(|s| s.connected && s.resyncs >= 2 && s.epoch >= 3).await;
        assert_eq!((resynced.epoch, resynced.resyncs), (3, 2), "{resynced:?}");
    });
    drop(key);
}

fn key_path(dir: &tempfile::TempDir, url: &str) -> std::path::PathBuf {
    dir.path().join(format!("{}.key", database_name(url)))
}

#[test]
fn migrations_record_the_version_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, key, store) = initialised(cluster, &dir);
    drop(store);
    let db = database_name(&url);
    assert_eq!(cluster.psql(db, "SELECT MAX(version) FROM sso_schema").trim(), "1");

    cluster.psql(db, "INSERT INTO sso_schema (version) VALUES (2)");
    let err = PgStore::open(&url, &key, "node-1").unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedSchema { found: 2, supported: 1 }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade the software"), "{err}");
    let other = UnsealKey::generate_key_file(&dir.path().join("other.key")).unwrap();
    let err = PgStore::create(&url, &other, &CreateOptions::new("node-1")).unwrap_err();
    assert!(matches!(err, Error::UnsupportedSchema { .. }), "{err}");

    // An empty database is no store; an existing store is not created twice.
    let empty = cluster.fresh_database();
    assert!(matches!(PgStore::open(&empty, &key, "n"), Err(Error::StoreNotFound(_))));
    let (url2, key2, _) = initialised(cluster, &dir);
    assert!(matches!(
        PgStore::create(&url2, &key2, &CreateOptions::new("n")),
        Err(Error::StoreExists(_))
    ));
}

#[test]
fn a_second_node_opens_with_the_url_and_secret_and_a_wrong_secret_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, key, mut first) = initialised(cluster, &dir);
    first.rotate().unwrap();
    let db = database_name(&url);
    // pg_dump writes a random `\restrict` token on each run: compare everything else.
    let dump = || -> String {
        String::from_utf8(cluster.dump(db))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = dump();

    let wrong = UnsealKey::generate_key_file(&dir.path().join("wrong.key")).unwrap();
    let err = PgStore::open(&url, &wrong, "node-2").unwrap_err();
    assert!(matches!(err, Error::WrongUnsealKey(_)), "{err}");
    assert!(dump() == before, "a wrong secret changed the database");

    let second = PgStore::open(&url, &key, "node-2").unwrap();
    assert_eq!(second.node(), "node-2");
    assert_eq!(second.keyring().unwrap().keys.len(), 2);
    assert_eq!(second.digest().unwrap(), first.digest().unwrap());
    assert!(!format!("{second:?}").contains("key"), "{second:?}");
}

/// docs/cluster.md, "Privileges": the nodes' role needs only SELECT, INSERT, UPDATE and
/// DELETE on the store's tables once `ssoctl init` (as the owner) has created them; it
/// opens, rotates, retires, destroys, records a backup and an audit anchor and follows the
/// change feed without any CREATE privilege.
#[test]
fn a_node_role_with_only_row_privileges_opens_writes_and_follows_the_feed() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, key, owner) = initialised(cluster, &dir);
    let first = owner.primary().unwrap().unwrap().key_id;
    drop(owner);
    let db = database_name(&url);
    let role = format!("node_{db}");
    cluster.psql(db, &format!("CREATE ROLE {role} LOGIN"));
    cluster.psql(
        db,
        &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
    );
    // PostgreSQL 15 and later grant PUBLIC no CREATE on `public`; older ones do.
    cluster.psql(db, "REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    assert_eq!(
        cluster
            .psql(
                db,
                &format!("SELECT has_schema_privilege('{role}', 'public', 'CREATE')")
            )
            .trim(),
        "f"
    );
    let node_url = url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(node_url, url);

    let mut store = PgStore::open(&node_url, &key, "node-2")
        .unwrap_or_else(|e| panic!("a node role with row privileges only cannot open the store: {e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut feed = runtime.block_on(async { store.change_feed() }).unwrap();
    let next = store.rotate().unwrap();
    store.retire(first).unwrap();
    store.destroy(first).unwrap();
    store.check_writable().unwrap();
    store
        .record_backup(&[next.key_id], time::OffsetDateTime::now_utc())
        .unwrap();
    store
        .set_audit_anchor(&keystore::audit::AuditAnchor::genesis())
        .unwrap();
    let epoch = store.epoch().unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            while feed.current().epoch < epoch {
                feed.next().await.expect("the feed ended");
            }
        })
        .await
        .expect("the node role's change feed never saw its own writes");
    });
    assert_eq!(store.primary().unwrap().unwrap().key_id, next.key_id);
}

#[test]
fn an_edited_row_is_an_integrity_error() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, key, store) = initialised(cluster, &dir);
    drop(store);
    cluster.psql(database_name(&url), "UPDATE sso_keys SET generation = 7");
    let err = PgStore::open(&url, &key, "node-1").unwrap_err();
    assert!(err.is_integrity(), "{err}");
    cluster.psql(database_name(&url), "DELETE FROM sso_keys");
    let err = PgStore::open(&url, &key, "node-1").unwrap_err();
    assert!(matches!(err, Error::MissingKey { .. }), "{err}");
}

#[test]
fn the_store_can_be_called_and_dropped_inside_async_code() {
    // The server calls a few store methods directly in async code while it starts; a
    // runtime worker must not block on the engine's own runtime (that panicked before).
    let dir = tempfile::tempdir().unwrap();
    let (_, _, mut store) = initialised(shared(), &dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        assert!(store.audit_anchor().unwrap().is_none());
        store.rotate().unwrap();
        assert_eq!(store.epoch().unwrap(), 2);
        drop(store);
    });
}

/// Attack14: two processes configured with one node name on one database overwrite each
/// other's audit anchor. A node's feed claims its name: the second feed for the name sees
/// it held elsewhere (failed before `ChangeFeed::start_for_node` existed), another name is
/// not affected, and when the first lets go the second takes the name within a retry.
#[test]
fn a_node_name_is_held_by_one_feed_at_a_time() {
    use keystore::postgres::{CLAIM_RETRY, NameClaim};
    let dir = tempfile::tempdir().unwrap();
    let (url, _, _) = initialised(shared(), &dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let limit = Duration::from_secs(10);
        let first = ChangeFeed::start_for_node(&url, "node-1").unwrap();
        assert_eq!(first.claimed(limit).await, NameClaim::Held);
        let second = ChangeFeed::start_for_node(&url, "node-1").unwrap();
        // Not held within three retries: its state says another connection has it.
        assert_eq!(second.claimed(CLAIM_RETRY * 3).await, NameClaim::HeldElsewhere);
        assert!(second.current().connected, "the second feed still listens");
        let other = ChangeFeed::start_for_node(&url, "node-2").unwrap();
        assert_eq!(other.claimed(limit).await, NameClaim::Held);
        // A feed that claims no name is not in the way.
        let plain = ChangeFeed::start(&url).unwrap();
        let mut state = plain.subscribe();
        let plain_state = *state.wait_for(|s| s.connected).await.unwrap();
        assert_eq!(plain_state.name, NameClaim::Unknown);

        drop(first);
        let freed = Instant::now();
        assert_eq!(second.claimed(limit).await, NameClaim::Held);
        assert!(
            freed.elapsed() <= CLAIM_RETRY * 3,
            "the freed name took {:?} to be claimed",
            freed.elapsed()
        );
    });
}

/// A node role missing a privilege (SQLSTATE 42501) gets a remedy about privileges, not
/// "check that the PostgreSQL server is running" (what it said before: every database error
/// had the connection remedy), and nothing is changed.
#[test]
fn a_role_without_privileges_is_told_to_grant_them() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, key, owner) = initialised(cluster, &dir);
    let before = owner.keyring().unwrap().keys.len();
    drop(owner);
    let db = database_name(&url);
    let role = format!("bare_{db}");
    cluster.psql(db, &format!("CREATE ROLE {role} LOGIN"));
    let err = PgStore::open(&url.replacen("postgres@", &format!("{role}@"), 1), &key, "node-2")
        .map(|_| ())
        .expect_err("a role without privileges opened the store");
    let text = err.to_string();
    assert!(text.contains("42501"), "{text}");
    assert!(text.contains("GRANT") && text.contains("docs/cluster.md"), "{text}");
    assert!(!text.contains("is running"), "{text}");
    let owner = PgStore::open(&url, &key, "node-1").unwrap();
    assert_eq!(owner.keyring().unwrap().keys.len(), before);
}
/// SECURITY.md, "What destroyed means there" (attack14b): a destroyed key's wrapped
/// material stays in the table's file (a dead tuple) and in the WAL after the destroy;
/// `VACUUM FULL sso_keys` and `CHECKPOINT` rewrite the table without it, but the WAL
/// segments written before still hold it (recycling renames a segment; it is overwritten
/// only as new WAL fills it). Measured on a throwaway cluster of its own (its files are
/// read directly).
#[test]
fn a_destroyed_keys_wrapped_material_leaves_the_table_with_vacuum_full_but_not_the_wal_at_once() {
    let cluster = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, _, mut store) = initialised(&cluster, &dir);
    let db = database_name(&url).to_owned();
    store.rotate().unwrap();
    let old = store.list().unwrap()[0].key_id;
    store.retire(old).unwrap();
    let blob = cluster.psql(
        &db,
        &format!("SELECT encode(material, 'hex') FROM sso_keys WHERE key_id = '{old}'"),
    );
    let blob = hex::decode(blob.trim()).unwrap();
    assert!(
        blob.len() >= 32 + 16,
        "a wrapped key with its tag: {} bytes",
        blob.len()
    );
    store.destroy(old).unwrap();
    let data = std::path::PathBuf::from(cluster.psql(&db, "SHOW data_directory").trim());
    let contains = |file: &std::path::Path| {
        std::fs::read(file)
            .map(|bytes| bytes.windows(blob.len()).any(|w| w == blob.as_slice()))
            .unwrap_or(false)
    };
    let table = |cluster: &PgCluster| {
        cluster.psql(&db, "CHECKPOINT");
        data.join(cluster.psql(&db, "SELECT pg_relation_filepath('sso_keys')").trim())
    };
    let in_wal = || {
        std::fs::read_dir(data.join("pg_wal"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .any(|e| contains(&e.path()))
    };
    // The row is NULL now: nothing a node or a backup reads holds it.
    let now = cluster.psql(
        &db,
        &format!("SELECT material IS NULL FROM sso_keys WHERE key_id = '{old}'"),
    );
    assert_eq!(now.trim(), "t");
    let before = table(&cluster);
    let dead_tuple = contains(&before);
    assert!(in_wal(), "the retire's re-wrap is not in the WAL");
    cluster.psql(&db, "VACUUM FULL sso_keys");
    let after = table(&cluster);
    assert_ne!(before, after, "VACUUM FULL did not rewrite the table");
    assert!(
        !contains(&after),
        "the destroyed key's wrapped material is still in the table after VACUUM FULL"
    );
    let still_in_wal = in_wal();
    eprintln!(
        "dead tuple before VACUUM FULL: {dead_tuple}; in the WAL after VACUUM FULL and CHECKPOINT: {still_in_wal}"
    );
    assert!(
        still_in_wal,
        "the WAL no longer holds the blob: SECURITY.md's WAL sentence can be relaxed"
    );
}

/// attack14b: the database cuts a store's idle connection (`pg_terminate_backend`, as an
/// administrator, a pooler or a failover does) while the database itself stays up. The
/// next reads (the server's start, its epoch check, health) must not fail: before the fix
/// the first one answered "connection closed" or 57P01 and a node starting at that moment
/// exited after announcing "listening". A change is not repeated (its commit may have been
/// sent): it may fail once, and the next one works.
#[test]
fn reads_after_the_database_cut_an_idle_connection_reconnect_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = shared();
    let (url, _, store) = initialised(cluster, &dir);
    let db = database_name(&url).to_owned();
    let before = store.list().unwrap();
    for round in 0..5 {
        let cut = cluster.psql(
            &db,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        );
        assert_eq!(cut.trim(), "1", "round {round}: the store's one connection");
        // Terminated, not just signalled: its backend is gone.
        let started = Instant::now();
        while cluster
            .psql(
                &db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            )
            .trim()
            != "0"
        {
            assert!(started.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let read = match round % 3 {
            0 => store.list().map(|l| l.len()),
            1 => store.epoch().map(|_| before.len()),
            _ => store.audit_anchor().map(|_| before.len()),
        };
        assert_eq!(read.unwrap_or_else(|e| panic!("round {round}: {e}")), before.len());
    }
}
