//! Idempotent admin writes (SPEC §10): `POST /v1/admin/{rotate, keys/ID/retire,
//! keys/ID/destroy, restore}` accept an `Idempotency-Key` header. The first request with a
//! key runs to its end (even if its client goes away); a repeat from the same identity with
//! the same key and the same request gets the first answer back, byte for byte, and changes
//! nothing.
//!
//! Kept in memory: at most [`MAX_ENTRIES`] answers, each for [`TTL`]. An answer that says
//! nothing changed and a retry may help (5xx, `rotation_busy`) is not kept, so a retry with
//! the same key runs again. A restart forgets every key (documented in docs/operations.md).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long an answer is kept.
pub const TTL: Duration = Duration::from_secs(3600);
/// How many answers are kept at most.
pub const MAX_ENTRIES: usize = 4096;
/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 128;

/// A stored answer.
#[derive(Debug, Clone)]
pub struct Stored {
    /// HTTP status.
    pub status: u16,
    /// Body, as first sent.
    pub body: Bytes,
}

#[derive(Debug)]
enum Entry {
    Running {
        fingerprint: [u8; 32],
        since: Instant,
    },
    Done {
        fingerprint: [u8; 32],
        at: Instant,
        answer: Stored,
    },
}

/// What to do with a request that carries a key.
#[derive(Debug)]
pub enum Begin {
    /// First time: run it, then call [`Idempotency::finish`].
    Fresh,
    /// Seen: send this answer again.
    Replay(Stored),
    /// The first request with this key is still running.
    Running,
    /// The key was used for a different request.
    Mismatch,
    /// The table is full of running requests.
    Full,
}

/// The table of recent answers, keyed by (caller identity, idempotency key).
#[derive(Debug, Default)]
pub struct Idempotency {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

/// Checks a header value: 1 to 128 visible ASCII characters.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic())
}

/// A fingerprint of the request (operation, target, body) under a per-process random key,
/// so a reused key with another request is caught and the table holds no body or password.
pub fn fingerprint(secret: &ring::hmac::Key, op: &str, target: &str, body: &[u8]) -> [u8; 32] {
    let mut ctx = ring::hmac::Context::with_key(secret);
    for part in [op.as_bytes(), target.as_bytes(), body] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

impl Idempotency {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks the key up; when fresh, marks it running.
    pub fn begin(&self, who: &str, key: &str, fingerprint: [u8; 32]) -> Begin {
        let now = Instant::now();
        let mut entries = self.lock();
        let slot = (who.to_owned(), key.to_owned());
        match entries.get(&slot) {
            Some(Entry::Done {
                fingerprint: f,
                at,
                answer,
            }) if now.duration_since(*at) < TTL => {
                return if *f == fingerprint {
                    Begin::Replay(answer.clone())
                } else {
                    Begin::Mismatch
                };
            }
            Some(Entry::Running { fingerprint: f, .. }) => {
                return if *f == fingerprint {
                    Begin::Running
                } else {
                    Begin::Mismatch
                };
            }
            _ => {}
        }
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| match e {
                Entry::Done { at, .. } => now.duration_since(*at) < TTL,
                Entry::Running { since, .. } => now.duration_since(*since) < TTL,
            });
        }
        if entries.len() >= MAX_ENTRIES {
            let oldest = entries
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Done { at, .. } => Some((*at, k.clone())),
                    Entry::Running { .. } => None,
                })
                .min();
            match oldest {
                Some((_, k)) => {
                    entries.remove(&k);
                }
                None => return Begin::Full,
            }
        }
        entries.insert(
            slot,
            Entry::Running {
                fingerprint,
                since: now,
            },
        );
        Begin::Fresh
    }

    /// Records the answer (`Some`), or forgets the key so a retry runs again (`None`).
    pub fn finish(&self, who: &str, key: &str, fingerprint: [u8; 32], answer: Option<Stored>) {
        let slot = (who.to_owned(), key.to_owned());
        let mut entries = self.lock();
        match answer {
            Some(answer) => {
                entries.insert(
                    slot,
                    Entry::Done {
                        fingerprint,
                        at: Instant::now(),
                        answer,
                    },
                );
            }
            None => {
                entries.remove(&slot);
            }
        }
    }

    /// How many answers are held (for tests and status).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_replays_a_reuse_is_refused_and_a_forgotten_key_runs_again() {
        let t = Idempotency::default();
        let (f1, f2) = ([1u8; 32], [2u8; 32]);
        assert!(matches!(t.begin("admin", "k", f1), Begin::Fresh));
        assert!(matches!(t.begin("admin", "k", f1), Begin::Running));
        assert!(matches!(t.begin("admin", "k", f2), Begin::Mismatch));
        t.finish(
            "admin",
            "k",
            f1,
            Some(Stored {
                status: 200,
                body: Bytes::from_static(b"first"),
            }),
        );
        match t.begin("admin", "k", f1) {
            Begin::Replay(s) => assert_eq!((s.status, &s.body[..]), (200, &b"first"[..])),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(t.begin("other-admin", "k", f1), Begin::Fresh),
            "keys are per identity"
        );
        t.finish("other-admin", "k", f1, None);
        assert!(matches!(t.begin("other-admin", "k", f1), Begin::Fresh));
        assert!(valid_key("0123-abcd") && !valid_key("") && !valid_key("a b") && !valid_key(&"a".repeat(129)));
    }

    #[test]
    fn the_table_stays_bounded() {
        let t = Idempotency::default();
        for i in 0..MAX_ENTRIES + 10 {
            assert!(matches!(t.begin("admin", &i.to_string(), [0; 32]), Begin::Fresh));
            t.finish(
                "admin",
                &i.to_string(),
                [0; 32],
                Some(Stored {
                    status: 200,
                    body: Bytes::new(),
                }),
            );
        }
        assert_eq!(t.len(), MAX_ENTRIES);
    }
}
