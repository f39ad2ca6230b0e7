//! Envelope nonces: 96 random bits each, drawn from a per-thread buffer that is filled
//! from the operating system's CSPRNG 256 nonces at a time, so a seal does not pay for a
//! `getrandom` system call (about 300 ns on the development machine, three times the
//! AEAD itself for a small message).
//!
//! A buffer of future nonces must never be used by two processes: after `fork` the child
//! holds a copy of the parent's buffer, and both would seal with the same nonces. Each
//! buffer therefore remembers the process it was filled in and is discarded when that
//! changes:
//!
//! - when a fork hook is installed (`sso_os::hardening::install_fork_hook`, which
//!   registers `pthread_atfork`), by a fork counter the hook bumps in the child: one
//!   atomic load per nonce;
//! - otherwise by comparing `getpid()` (a system call, about 160 ns here; still half the
//!   cost of `getrandom`).
//!
//! Tested by `sso-os/src/hardening.rs`,
//! `tests::buffered_nonces_never_repeat_across_fork` (both paths).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ring::rand::{SecureRandom, SystemRandom};

use crate::Error;

/// Length of one nonce.
pub const NONCE_LEN: usize = 12;
/// Nonces per refill of a thread's buffer.
const PER_REFILL: usize = 256;
const BUF_LEN: usize = NONCE_LEN * PER_REFILL;

/// Forks seen by the child-side hook.
static FORKS: AtomicU64 = AtomicU64::new(0);
/// Whether a hook bumps [`FORKS`] in every forked child.
static HOOKED: AtomicBool = AtomicBool::new(false);

/// Called in the child right after `fork` by the hook the OS module registers with
/// `pthread_atfork`. One atomic add: async-signal-safe, allocation-free.
pub fn after_fork_in_child() {
    FORKS.fetch_add(1, Ordering::SeqCst);
}

/// Told by the OS module once its `pthread_atfork` hook calling [`after_fork_in_child`] is
/// registered; from then on, buffers are checked against the fork counter instead of
/// `getpid()`. Calling this without such a hook would make buffered nonces repeat in
/// forked children: only `sso_os::hardening::install_fork_hook` calls it.
pub fn fork_hook_installed() {
    HOOKED.store(true, Ordering::SeqCst);
}

/// Which process a buffer was filled in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Nothing drawn yet.
    None,
    /// Filled before any fork hook: the filling process's id.
    Pid(u32),
    /// Filled with the hook installed: the fork counter then.
    Forks(u64),
}

struct Pool {
    owner: Owner,
    next: usize,
    buf: [u8; BUF_LEN],
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool { owner: Owner::None, next: BUF_LEN, buf: [0; BUF_LEN] })
    };
}

fn current_owner() -> Owner {
    if HOOKED.load(Ordering::Acquire) {
        Owner::Forks(FORKS.load(Ordering::Acquire))
    } else {
        Owner::Pid(std::process::id())
    }
}

fn system_random() -> &'static SystemRandom {
    static RNG: std::sync::OnceLock<SystemRandom> = std::sync::OnceLock::new();
    RNG.get_or_init(SystemRandom::new)
}

/// Fills `out` with a fresh random nonce from this thread's buffer, refilling it from the
/// OS when it is empty or was filled in another process.
pub fn fill(out: &mut [u8; NONCE_LEN]) -> Result<(), Error> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let owner = current_owner();
        if pool.next == BUF_LEN || pool.owner != owner {
            system_random().fill(&mut pool.buf).map_err(|_| Error::Randomness)?;
            pool.owner = owner;
            pool.next = 0;
        }
        let at = pool.next;
        out.copy_from_slice(&pool.buf[at..at + NONCE_LEN]);
        // A drawn nonce is not kept: the slot is cleared so the buffer only ever holds
        // nonces nobody has used.
        pool.buf[at..at + NONCE_LEN].fill(0);
        pool.next = at + NONCE_LEN;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn nonces_do_not_repeat_across_refills_and_threads() {
        let draw = || {
            (0..PER_REFILL * 5)
                .map(|_| {
                    let mut n = [0u8; NONCE_LEN];
                    fill(&mut n).unwrap();
                    n
                })
                .collect::<Vec<_>>()
        };
        let other = std::thread::spawn(draw);
        let mut all = draw();
        all.extend(other.join().unwrap());
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "a nonce repeated");
        assert!(all.iter().all(|n| *n != [0; NONCE_LEN]));
    }
}
