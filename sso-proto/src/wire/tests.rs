//! The wire writers and readers: byte-for-byte what the server wrote before they moved
//! here (fixtures taken from the old `sso-server` writers), exact sizing, round trips.

use base64::Engine;
use ring::rand::SystemRandom;
use time::OffsetDateTime;

use super::*;
use crate::delivery::{Binding, Recipient, RecipientKey, Sealer};
use crate::{KeyId, KeyMeta, KeyRecord, KeyState, MasterSecret};

/// `NAME=body` lines written by the old `sso-server` writers (`state::keyring_json`,
/// `state::key_json`, `peer::records_json`) for [`fixture_records`].
const OLD: &str = include_str!("../../tests/fixtures/old_writers.txt");

fn old(name: &str) -> Vec<&str> {
    OLD.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .collect()
}

/// Five keys, one per state, with fixed ids, material, times (whole and fractional
/// seconds) and origins that need escaping.
fn fixture_records() -> Vec<KeyRecord> {
    let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    let origins = ["a", "nœud \"b\"\\\u{1}", "c", "d", "e"];
    KeyState::ALL
        .iter()
        .enumerate()
        .map(|(i, &state)| KeyRecord {
            meta: KeyMeta {
                key_id: KeyId::from_bytes([i as u8 + 1; 16]),
                generation: i as u64 + 1,
                created_at: t + time::Duration::nanoseconds(i as i64 * 123_456_789),
                origin: origins[i].into(),
                state,
            },
            secret: (state != KeyState::Destroyed)
                .then(|| MasterSecret::copy_from_slice(&[i as u8 * 37 + 5; 32]).unwrap()),
        })
        .collect()
}

fn text(body: &[u8]) -> &str {
    std::str::from_utf8(body).unwrap()
}

#[test]
fn the_writers_write_what_the_server_wrote_before_they_moved() {
    let recs = fixture_records();
    let gone = [recs[3].meta.key_id, recs[4].meta.key_id];
    let keyring = keyring_json(u64::MAX, Some(recs[1].meta.key_id), &recs[..3], &gone);
    assert_eq!(text(&keyring), old("KEYRING")[0]);
    assert_eq!(text(&keyring_json(0, None, &[], &[])), old("KEYRING_EMPTY")[0]);
    let keys = old("KEY");
    assert_eq!(keys.len(), recs.len());
    for (r, want) in recs.iter().zip(keys) {
        assert_eq!(text(&key_json(r)), want);
    }
    assert_eq!(text(&records_json("nœud \"a\"", 7, "abc", &recs)), old("RECORDS")[0]);
    assert_eq!(text(&records_json("a", 0, "", &[])), old("RECORDS_EMPTY")[0]);
}

fn record(rng: &SystemRandom, generation: u64, origin: &str, state: KeyState) -> KeyRecord {
    KeyRecord {
        meta: KeyMeta {
            key_id: KeyId::generate(rng).unwrap(),
            generation,
            created_at: OffsetDateTime::now_utc(),
            origin: origin.into(),
            state,
        },
        secret: Some(MasterSecret::generate(rng).unwrap()),
    }
}

#[test]
fn keyring_json_is_valid_and_reads_back() {
    let rng = SystemRandom::new();
    let keys: Vec<KeyRecord> = (1..=5)
        .map(|g| record(&rng, g, "node-with-a-long-name", KeyState::Active))
        .collect();
    let body = keyring_json(42, Some(keys[4].meta.key_id), &keys, &[keys[0].meta.key_id]);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["epoch"], 42);
    let b64 = v["keys"][0]["key"].as_str().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    assert_eq!(decoded, keys[0].secret.as_ref().unwrap().expose_secret());
    // The client's reader takes back what the writer wrote.
    let back = parse_keyring(&body).unwrap();
    assert_eq!((back.epoch, back.primary), (42, Some(keys[4].meta.key_id)));
    assert_eq!(back.gone, vec![keys[0].meta.key_id]);
    assert!(back.wrap.is_none());
    for (i, (k, r)) in back.keys.into_iter().zip(&keys).enumerate() {
        let (meta, secret) = k.open(None, i as u64).unwrap();
        assert_eq!(
            (meta.key_id, meta.generation, meta.state),
            (r.meta.key_id, r.meta.generation, r.meta.state)
        );
        assert_eq!(meta.created_at, r.meta.created_at);
        assert!(secret.ct_eq(r.secret.as_ref().unwrap()));
    }
    let one = parse_key(&key_json(&keys[2])).unwrap();
    assert!(one.open(None, 0).unwrap().1.ct_eq(keys[2].secret.as_ref().unwrap()));
}

/// Issue 12: the old bound (160 bytes a key) was short of the real size, so a debug build
/// panicked past a few dozen keys and a release build reallocated, leaving unwiped copies.
/// Exact sizing means capacity == length, for any key count, node name, generation and
/// state: a buffer that grew has spare capacity and fails here.
#[test]
fn bodies_with_key_material_are_sized_exactly_for_any_key_set() {
    let rng = SystemRandom::new();
    let origins = ["a", "node-with-a-long-name", "nœud-é\"\\\u{1}", &"x".repeat(300)];
    for count in [0usize, 1, 2, 7, 40, 41, 64, 200, 301] {
        let keys: Vec<KeyRecord> = (0..count)
            .map(|i| {
                let generation = if i % 5 == 4 { u64::MAX - i as u64 } else { i as u64 + 1 };
                let mut r = record(&rng, generation, origins[i % origins.len()], KeyState::ALL[i % 5]);
                if r.meta.state == KeyState::Destroyed {
                    r.secret = None;
                }
                r
            })
            .collect();
        let gone: Vec<KeyId> = keys.iter().take(count / 3).map(|k| k.meta.key_id).collect();
        let primary = keys.last().map(|k| k.meta.key_id);
        let body = keyring_json(u64::MAX, primary, &keys, &gone);
        assert_eq!(
            body.len(),
            body.capacity(),
            "{count} keys: the keyring was not sized exactly"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["keys"].as_array().unwrap().len(), count);
        for k in &keys {
            let one = key_json(k);
            assert_eq!(one.len(), one.capacity());
        }
        let records = records_json(origins[count % origins.len()], u64::MAX, "d", &keys);
        assert_eq!(records.len(), records.capacity(), "{count} records: not sized exactly");
        assert_eq!(parse_records(&records).unwrap().records.len(), count);
    }
}

#[test]
fn a_wiping_buffer_that_must_grow_keeps_its_contents() {
    let rng = SystemRandom::new();
    let secret = MasterSecret::generate(&rng).unwrap();
    let mut buf = WipingBuf::with_capacity(3);
    buf.put(b"ab");
    buf.put_secret(&secret);
    buf.put(b"cd");
    assert!(buf.grew() > 0);
    let out = buf.into_inner();
    assert_eq!(out.len(), 2 + 44 + 2);
    assert_eq!(&out[..2], b"ab");
    assert_eq!(&out[46..], b"cd");
}

/// The wrapped bodies parse as JSON, carry the same metadata as the plain ones, no
/// spelling of any key, and open (in order) for the client they were sealed to, through
/// the client's reader.
#[test]
fn wrapped_bodies_open_for_their_client_and_hold_no_plain_key() {
    let rng = SystemRandom::new();
    let keys: Vec<KeyRecord> = (1..=3).map(|g| record(&rng, g, "a", KeyState::Active)).collect();
    let gone = vec![KeyId::generate(&rng).unwrap()];
    let primary = Some(keys[2].meta.key_id);
    let plain: serde_json::Value = serde_json::from_slice(&keyring_json(9, primary, &keys, &gone)).unwrap();
    let recipient = Recipient::generate(&rng).unwrap();
    let to = RecipientKey::parse(recipient.header_value().as_bytes()).unwrap();
    let mut sealer = Sealer::new(&to, "/v1/keyring", &rng).unwrap();
    let body = keyring::wrapped_keyring_json(9, primary, &keys, &gone, &mut sealer).unwrap();
    let text = String::from_utf8(body.clone()).unwrap();
    for r in &keys {
        let secret = r.secret.as_ref().unwrap().expose_secret();
        assert!(!text.contains(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(secret)));
        assert!(!text.contains(&hex::encode(secret)));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["epoch"], plain["epoch"]);
    assert_eq!(v["primary"], plain["primary"]);
    assert_eq!(v["gone"], plain["gone"]);
    assert_eq!(v["wrap"]["v"], 1);
    for (i, k) in v["keys"].as_array().unwrap().iter().enumerate() {
        assert_eq!(k["key_id"], plain["keys"][i]["key_id"]);
        assert_eq!(k["created_at"], plain["keys"][i]["created_at"]);
        assert!(k.get("key").is_none());
    }
    let wire = parse_keyring(&body).unwrap();
    let opener = opener(wire.wrap.as_ref(), recipient, "/v1/keyring").unwrap();
    for (i, (k, r)) in wire.keys.into_iter().zip(&keys).enumerate() {
        let (meta, secret) = k.open(Some(&opener), i as u64).unwrap();
        assert_eq!(meta.key_id, r.meta.key_id);
        assert!(secret.ct_eq(r.secret.as_ref().unwrap()));
    }

    let recipient = Recipient::generate(&rng).unwrap();
    let to = RecipientKey::parse(recipient.header_value().as_bytes()).unwrap();
    let context = format!("/v1/keys/{}", keys[1].meta.key_id);
    let mut sealer = Sealer::new(&to, &context, &rng).unwrap();
    let one = parse_key(&keyring::wrapped_key_json(&keys[1], &mut sealer).unwrap()).unwrap();
    let opener = super::opener(one.wrap.as_ref(), recipient, &context).unwrap();
    let r = &keys[1];
    let binding = Binding {
        key_id: r.meta.key_id,
        generation: r.meta.generation,
        state: r.meta.state,
    };
    assert_eq!(binding.key_id, one.key_id);
    assert!(one.open(Some(&opener), 0).unwrap().1.ct_eq(r.secret.as_ref().unwrap()));
}

/// A plain answer to a client that asked for wrapped delivery is refused.
#[test]
fn a_plain_answer_is_refused_where_wrapped_was_asked() {
    let rng = SystemRandom::new();
    let keys = vec![record(&rng, 1, "a", KeyState::Primary)];
    let wire = parse_keyring(&keyring_json(1, None, &keys, &[])).unwrap();
    let recipient = Recipient::generate(&rng).unwrap();
    assert!(opener(wire.wrap.as_ref(), recipient, "/v1/keyring").is_err());
}

#[test]
fn records_round_trip_and_a_primary_travels_as_active() {
    let rng = SystemRandom::new();
    let records: Vec<KeyRecord> = [
        KeyState::Staged,
        KeyState::Primary,
        KeyState::Retired,
        KeyState::Destroyed,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, state)| KeyRecord {
        meta: KeyMeta {
            key_id: KeyId::generate(&rng).unwrap(),
            generation: i as u64 + 1,
            created_at: OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
            origin: "node \"a\"".into(),
            state,
        },
        secret: (state != KeyState::Destroyed).then(|| MasterSecret::generate(&rng).unwrap()),
    })
    .collect();
    let body = records_json("a", 7, "d", &records);
    let back = parse_records(&body).unwrap();
    assert_eq!((back.node.as_str(), back.epoch, back.digest.as_str()), ("a", 7, "d"));
    for (a, b) in records.iter().zip(&back.records) {
        assert_eq!(a.meta.key_id, b.meta.key_id);
        assert_eq!(a.meta.origin, b.meta.origin);
        assert_eq!(a.meta.created_at, b.meta.created_at);
        assert_eq!(a.secret.is_some(), b.secret.is_some());
        if let (Some(x), Some(y)) = (&a.secret, &b.secret) {
            assert!(x.ct_eq(y));
        }
    }
    assert_eq!(back.records[1].meta.state, KeyState::Active);
    assert!(!String::from_utf8_lossy(&body).contains("primary"));
    assert!(parse_records(b"{\"node\":1}").is_err());
    // Older peers may say `primary`: read as active.
    let id = KeyId::from_bytes([9; 16]);
    let primary = format!(
        r#"{{"node":"b","epoch":1,"keys":[{{"key_id":"{id}","generation":1,"created_at":"2023-11-14T22:13:20Z","origin":"b","state":"primary"}}]}}"#
    );
    assert_eq!(
        parse_records(primary.as_bytes()).unwrap().records[0].meta.state,
        KeyState::Active
    );
    let unknown = primary.replace("\"primary\"", "\"secret-ish\"");
    let err = parse_records(unknown.as_bytes()).unwrap_err();
    assert!(!err.contains("secret-ish"), "{err}");
}

#[test]
fn a_promote_answer_round_trips_and_an_old_one_keeps_nothing() {
    let (k, p) = (KeyId::from_bytes([1; 16]), KeyId::from_bytes([2; 16]));
    let answer = PromoteAnswer {
        primary: Some(p),
        kept: vec![k],
    };
    let body = serde_json::to_vec(&answer).unwrap();
    assert_eq!(peer::parse_promote_answer(&body).unwrap(), answer);
    let old = format!("{{\"primary\":\"{p}\"}}");
    assert_eq!(
        peer::parse_promote_answer(old.as_bytes()).unwrap().kept,
        Vec::<KeyId>::new()
    );
    let err = peer::parse_promote_answer(br#"{"primary":"secret-ish","kept":[]}"#).unwrap_err();
    assert!(!err.contains("secret-ish"), "{err}");
}

#[test]
fn small_peer_answers_round_trip() {
    let merge = MergeAnswer {
        added: 1,
        advanced: 2,
        digest: "d".into(),
        epoch: 3,
    };
    assert_eq!(
        serde_json::from_slice::<MergeAnswer>(&serde_json::to_vec(&merge).unwrap()).unwrap(),
        merge
    );
    let coverage = Coverage {
        backed_up: vec![KeyId::from_bytes([3; 16])],
        last_backup_unix: Some(5),
    };
    assert_eq!(parse_coverage(&serde_json::to_vec(&coverage).unwrap()), Some(coverage));
    assert_eq!(parse_coverage(b"[]"), None);
}

/// Each answer type serialises to what the server's `json!` bodies held before the types
/// existed (the same keys, values and sorted order: the literals below are the old
/// server's `json!` calls with fixed values), and reads back.
#[test]
fn the_answer_types_write_what_the_old_json_bodies_held() {
    use answers::*;
    use serde_json::json;
    fn same<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
        typed: &T,
        old: serde_json::Value,
    ) {
        let value = serde_json::to_value(typed).unwrap();
        assert_eq!(value.to_string(), old.to_string());
        assert_eq!(&serde_json::from_value::<T>(value).unwrap(), typed);
    }
    let recs = fixture_records();
    let (id, meta) = (recs[1].meta.key_id, &recs[1].meta);
    let old_meta = json!({
        "key_id": meta.key_id, "generation": meta.generation, "state": meta.state,
        "created_at": rfc3339(meta.created_at), "origin": meta.origin,
    });
    same(&KeyView::from(meta), old_meta.clone());
    let mut changed = old_meta.clone();
    changed["replication"] = "pending".into();
    same(
        &KeyChanged {
            key: meta.into(),
            replication: "pending".into(),
        },
        changed,
    );
    same(
        &RotateAnswer {
            generation: 4,
            key_id: id,
            orphans_retired: 1,
            replication: "degraded".into(),
        },
        json!({"key_id": id, "generation": 4, "replication": "degraded", "orphans_retired": 1}),
    );
    let peer = PeerView {
        integrity_alarm: None,
        lag_epochs: Some(2),
        last_contact: Some("t".into()),
        last_error: Some("e".into()),
        node: Some("b".into()),
        peer_epoch: None,
        state: "up".into(),
        url: "https://b".into(),
    };
    same(
        &StatusAnswer {
            audit: AuditHeadView {
                head: "h".into(),
                seq: 9,
            },
            backup: BackupView {
                coverage: "pair".into(),
                last_backup_at: None,
                not_backed_up: vec![id],
            },
            epoch: 3,
            health: HealthView {
                problems: vec!["store: x".into()],
                status: "degraded".into(),
            },
            keys: vec![meta.into()],
            node: "a".into(),
            peer: Some(peer),
            primary: Some(id),
            shared_database: None,
            time: "now".into(),
        },
        json!({
            "node": "a", "epoch": 3, "primary": id,
            "peer": {
                "url": "https://b", "node": "b", "state": "up", "last_contact": "t", "peer_epoch": null,
                "lag_epochs": 2, "last_error": "e", "integrity_alarm": null,
            },
            "keys": [old_meta],
            "backup": {"last_backup_at": null, "not_backed_up": [id], "coverage": "pair"},
            "time": "now",
            "audit": {"seq": 9, "head": "h"},
            "health": {"status": "degraded", "problems": ["store: x"]},
        }),
    );
    same(
        &HealthAnswer {
            node: "a".into(),
            peer: "none".into(),
            problems: vec![],
            sealed: false,
            status: "ok".into(),
        },
        json!({"status": "ok", "node": "a", "sealed": false, "peer": "none"}),
    );
    let plan = RestorePlanView {
        backup_created_at: "t".into(),
        destroyed: vec![id],
        known: 2,
        peer_checked: Some(false),
        unknown: vec![],
    };
    let old_plan =
        json!({"backup_created_at": "t", "peer_checked": false, "destroyed": [id], "unknown": [], "known": 2});
    same(
        &RestoreDryRun {
            dry_run: true,
            plan: plan.clone(),
        },
        json!({"dry_run": true, "plan": old_plan.clone()}),
    );
    same(
        &Restored {
            added: 1,
            advanced: 0,
            epoch: 5,
            plan,
            unchanged: 3,
        },
        json!({"added": 1, "advanced": 0, "unchanged": 3, "epoch": 5, "plan": old_plan}),
    );
    same(
        &AuditVerifyAnswer::Intact {
            anchored: None,
            entries: 3,
            first_seq: 1,
            gaps: vec![GapView {
                detail: "d".into(),
                lost: 2,
                seq: 2,
            }],
            head: "h".into(),
            intact: true,
            last_seq: 3,
        },
        json!({"intact": true, "entries": 3, "first_seq": 1, "last_seq": 3, "head": "h",
               "gaps": [{"seq": 2, "lost": 2, "detail": "d"}]}),
    );
    same(
        &AuditVerifyAnswer::Broken {
            file: "audit.log".into(),
            intact: false,
            line: 4,
            problem: "p".into(),
            truncated: true,
        },
        json!({"intact": false, "file": "audit.log", "line": 4, "problem": "p", "truncated": true}),
    );
    same(
        &ErrorBody {
            error: "busy".into(),
            message: "m".into(),
        },
        json!({"error": "busy", "message": "m"}),
    );
    same(
        &MergeAnswer {
            added: 1,
            advanced: 2,
            digest: "d".into(),
            epoch: 3,
        },
        json!({"epoch": 3, "digest": "d", "added": 1, "advanced": 2}),
    );
    same(
        &PromoteAnswer {
            kept: vec![id],
            primary: None,
        },
        json!({"primary": null, "kept": [id]}),
    );
    same(&peer::LeaseAnswer { max_generation: 7 }, json!({"max_generation": 7}));
    same(&peer::StageAnswer { staged: id }, json!({"staged": id}));
}

/// The admin request bodies: ssoctl writes them from a borrowed password, the server reads
/// the password into a `SecretString`; unknown fields are refused.
#[test]
fn admin_requests_write_borrowed_and_read_secret() {
    use answers::{BackupRequest, RestoreRequest};
    use secrecy::ExposeSecret;
    let body = serde_json::to_vec(&RestoreRequest {
        password: "correct horse",
        backup: "QUJD".into(),
        dry_run: true,
        force: false,
    })
    .unwrap();
    let back: RestoreRequest = serde_json::from_slice(&body).unwrap();
    assert_eq!(back.password.expose_secret(), "correct horse");
    assert!((back.dry_run, back.force) == (true, false));
    let body = serde_json::to_vec(&BackupRequest {
        password: "correct horse",
        hint: "h".into(),
    })
    .unwrap();
    let back: BackupRequest = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (back.password.expose_secret(), back.hint.as_str()),
        ("correct horse", "h")
    );
    assert!(serde_json::from_slice::<BackupRequest>(br#"{"password":"x","other":1}"#).is_err());
}

#[test]
fn the_peer_contact_headers_name_a_valid_node_and_a_decimal_epoch() {
    use super::peer::{PeerContact, parse_contact};
    assert_eq!(
        parse_contact(Some(b"node-b"), Some(b"42")),
        Some(PeerContact {
            node: "node-b".into(),
            epoch: 42
        })
    );
    // A peer that predates the headers, or sends something else: nothing learned.
    for (node, epoch) in [
        (None, Some(&b"1"[..])),
        (Some(&b"node-b"[..]), None),
        (Some(b""), Some(b"1")),
        (Some(b"peer b"), Some(b"1")),
        (Some(&[b'a'; 65][..]), Some(b"1")),
        (Some(b"node-b"), Some(b"")),
        (Some(b"node-b"), Some(b"+1")),
        (Some(b"node-b"), Some(b"-1")),
        (Some(b"node-b"), Some(b"18446744073709551616")),
    ] {
        assert_eq!(parse_contact(node, epoch), None, "{node:?} {epoch:?}");
    }
}
