//! Envelope nonces: 96 random bits each, drawn from a per-thread buffer of 256, so a seal
//! does not pay for a `getrandom` system call (about 300 ns on the development machine,
//! three times the AEAD itself for a small message).
//!
//! A refill reads a fresh 256-bit seed from the operating system's CSPRNG and expands it to
//! the buffer's 3 KiB with AES-256 in counter mode (graviola's AES-GCM over zeros, the tag
//! discarded): a CTR_DRBG (NIST SP 800-90A) reseeded from the OS for every refill, so no
//! generator state outlives one buffer, and the seed and its key schedule are wiped
//! before the refill returns. Reading all 3 KiB from the kernel instead cost about 45 ns
//! per nonce (the kernel's ChaCha20 runs without vector instructions), 14% of a 64-byte
//! seal (docs/benchmarks.md, issue 16). On a CPU graviola does not support the buffer is
//! read from the OS whole, as before.
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

/// Whether refills expand an OS seed with graviola's AES (else the OS fills the buffer).
fn expands() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(graviola::util::is_cpu_supported)
}

/// Fills `buf` with fresh randomness: AES-256-CTR under a key read from the OS for this
/// refill alone, or the OS's own bytes where graviola cannot run.
fn refill(buf: &mut [u8; BUF_LEN]) -> Result<(), Error> {
    if !expands() {
        return system_random().fill(buf).map_err(|_| Error::Randomness);
    }
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    system_random().fill(&mut seed[..]).map_err(|_| Error::Randomness)?;
    // graviola wipes the expanded key when `ctr` is dropped; the key is used for this one
    // keystream, so the all-zero nonce never repeats under it.
    let ctr = graviola::aead::AesGcm::new(&seed[..]);
    buf.fill(0);
    let mut tag = [0u8; 16];
    ctr.encrypt(&[0u8; NONCE_LEN], &[], buf, &mut tag);
    Ok(())
}

/// Fills `out` with a fresh random nonce from this thread's buffer, refilling it from the
/// OS when it is empty or was filled in another process.
pub fn fill(out: &mut [u8; NONCE_LEN]) -> Result<(), Error> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let owner = current_owner();
        if pool.next == BUF_LEN || pool.owner != owner {
            refill(&mut pool.buf)?;
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

    /// A refill is random-looking and never the same twice: the bytes of two refills
    /// differ, and each refill's bytes are balanced (a stuck or unexpanded buffer, such as
    /// all zeros or the seed repeated, fails).
    #[test]
    fn refills_differ_and_look_random() {
        let mut a = [0u8; BUF_LEN];
        let mut b = [0u8; BUF_LEN];
        refill(&mut a).unwrap();
        refill(&mut b).unwrap();
        assert_ne!(a[..], b[..]);
        for buf in [&a, &b] {
            let ones: u32 = buf.iter().map(|x| x.count_ones()).sum();
            let bits = (BUF_LEN * 8) as f64;
            // 24,576 bits: the count of ones is within 5 standard deviations (392) of half.
            assert!(
                (f64::from(ones) - bits / 2.0).abs() < 5.0 * (bits / 4.0).sqrt(),
                "{ones} ones"
            );
            let distinct: HashSet<_> = buf.chunks(16).collect();
            assert_eq!(distinct.len(), BUF_LEN / 16, "a 16-byte block repeated within a refill");
        }
    }
}
