//! Process hardening: no core dumps, not ptrace-attachable by other users, key memory
//! locked where the OS allows it; and the fork hook that keeps buffered envelope nonces
//! from repeating in a forked child. The only module in the workspace with `unsafe`: each
//! block is one libc call on plain integers or a handler function.
#![allow(unsafe_code)]

use std::io;

/// What [`harden_process`] achieved. Anything not achieved was logged as a warning: the
/// process still runs, with the exposure stated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hardening {
    /// `RLIMIT_CORE` is 0: a crash writes no core file.
    pub core_dumps_disabled: bool,
    /// `PR_SET_DUMPABLE` is 0: no core dumps, and `/proc/PID/mem` is closed to other users.
    pub non_dumpable: bool,
    /// All current and future pages are locked in RAM, so keys never reach swap.
    pub memory_locked: bool,
    /// Why memory is not locked, when it is not.
    pub memory_lock_problem: Option<String>,
    /// SIGXFSZ is ignored: a write past the file-size limit (`LimitFSIZE`, `ulimit -f`)
    /// fails with EFBIG, which the store and the audit log report like a full disk,
    /// instead of killing the process (the signal's default action).
    pub file_size_signal_ignored: bool,
}

/// Disables core dumps, marks the process non-dumpable, and locks memory when the
/// locked-memory limit is unlimited.
///
/// Memory is locked with `mlockall(MCL_CURRENT | MCL_FUTURE)` only when `RLIMIT_MEMLOCK`
/// is unlimited: with a finite limit, `MCL_FUTURE` would make later allocations fail once
/// the limit is reached, turning a hardening measure into an outage. Operators raise the
/// limit (`LimitMEMLOCK=infinity` in systemd) to get locking.
pub fn harden_process() -> Hardening {
    let mut result = Hardening {
        core_dumps_disabled: disable_core_dumps().is_ok(),
        ..Hardening::default()
    };
    result.non_dumpable = set_non_dumpable().is_ok();
    result.file_size_signal_ignored = ignore_file_size_signal().is_ok();
    if !result.file_size_signal_ignored {
        tracing::warn!("a write past the file-size limit will kill this process (SIGXFSZ)");
    }
    match lock_memory() {
        Ok(()) => result.memory_locked = true,
        Err(problem) => result.memory_lock_problem = Some(problem),
    }
    if !result.core_dumps_disabled || !result.non_dumpable {
        tracing::warn!(?result, "could not fully disable core dumps");
    }
    if let Some(problem) = &result.memory_lock_problem {
        tracing::warn!(%problem, "key memory is not locked in RAM and may be swapped out");
    }
    result
}

/// Registers (once per process) a `pthread_atfork` child handler that tells
/// `sso_proto::nonce` a fork happened, so each thread's buffer of future nonces is
/// discarded in the child with one atomic load per nonce instead of a `getpid()` call per
/// nonce. Without it (or if registering fails, when this returns `false`) the nonce
/// buffers fall back to comparing process ids, which is also fork-safe, only slower.
/// Forks that bypass libc (a raw `clone` system call) do not run the handler; nothing in
/// this workspace forks that way. `sso_client::Client` installs it when built.
pub fn install_fork_hook() -> bool {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| {
        extern "C" fn in_child() {
            sso_proto::nonce::after_fork_in_child();
        }
        // SAFETY: registers a handler that takes no arguments and does one atomic add
        // (async-signal-safe, no allocation, no locks), as POSIX requires of handlers that
        // run in the child of a multi-threaded process.
        let r = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if r == 0 {
            sso_proto::nonce::fork_hook_installed();
        }
        r == 0
    })
}

/// Whether the process is currently marked non-dumpable.
pub fn is_non_dumpable() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_DUMPABLE takes no pointer arguments and only reads process state.
        let r = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

fn disable_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid, initialised rlimit that outlives the call.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: installs the SIG_IGN disposition (no handler function runs) for one signal
    // number; no pointers are passed.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_non_dumpable() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_DUMPABLE takes an integer flag; no pointers are passed.
        let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "non-dumpable processes are Linux-only",
        ))
    }
}

fn lock_memory() -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit the call writes into; it outlives the call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if r != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_MEMLOCK) failed: {}",
            io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur != libc::RLIM_INFINITY {
        return Err(format!(
            "RLIMIT_MEMLOCK is {} bytes, not unlimited; set LimitMEMLOCK=infinity (systemd) or ulimit -l unlimited",
            limit.rlim_cur
        ));
    }
    // SAFETY: mlockall takes integer flags only.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("mlockall failed: {}", io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_makes_the_process_non_dumpable() {
        // Run in a child so the test binary itself stays debuggable.
        if std::env::var_os("SSO_HARDEN_CHILD").is_some() {
            let h = harden_process();
            assert!(h.core_dumps_disabled);
            assert!(h.non_dumpable);
            assert!(is_non_dumpable());
            assert_eq!(h.memory_locked, h.memory_lock_problem.is_none());
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "hardening::tests::hardening_makes_the_process_non_dumpable",
                "--test-threads=1",
            ])
            .env("SSO_HARDEN_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
        assert!(!is_non_dumpable(), "the parent was not hardened");
    }

    /// Warms this thread's nonce buffer, forks, and has parent and child each draw 2,000
    /// nonces (the child writes its own to a pipe): none may repeat. Runs in a child test
    /// process per mode, one with the `pthread_atfork` hook and one without (the
    /// `getpid()` fallback), so neither mode sees the other's hook.
    #[test]
    fn buffered_nonces_never_repeat_across_fork() {
        const NAME: &str = "hardening::tests::buffered_nonces_never_repeat_across_fork";
        if let Some(mode) = std::env::var_os("SSO_FORK_CHILD") {
            fork_and_compare(mode == "hook");
            return;
        }
        for mode in ["pid", "hook"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
                .env("SSO_FORK_CHILD", mode)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "mode {mode}: {text}");
            assert!(text.contains("1 passed"), "mode {mode} ran no test: {text}");
        }
    }

    fn fork_and_compare(hook: bool) {
        use std::collections::HashSet;
        use std::io::Read;
        use std::os::fd::FromRawFd;
        const N: usize = 2_000;
        const LEN: usize = sso_proto::nonce::NONCE_LEN;
        if hook {
            assert!(install_fork_hook(), "pthread_atfork failed");
        }
        let mut warm = [0u8; LEN];
        sso_proto::nonce::fill(&mut warm).unwrap();
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only draws nonces (thread-local buffer, getrandom), writes them
        // to the pipe and leaves with _exit; it allocates nothing and takes no locks.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut status = 0;
            for _ in 0..N {
                let mut nonce = [0u8; LEN];
                if sso_proto::nonce::fill(&mut nonce).is_err() {
                    status = 2;
                    break;
                }
                let mut done = 0;
                while done < LEN {
                    // SAFETY: writes from a live buffer of LEN bytes to the pipe's write end.
                    let n = unsafe { libc::write(fds[1], nonce[done..].as_ptr().cast(), LEN - done) };
                    if n <= 0 {
                        status = 3;
                        break;
                    }
                    done += n as usize;
                }
            }
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(status) };
        }
        // SAFETY: closes the parent's copy of the write end, which it does not use.
        unsafe { libc::close(fds[1]) };
        let mut seen: HashSet<[u8; LEN]> = HashSet::new();
        seen.insert(warm);
        for _ in 0..N {
            let mut nonce = [0u8; LEN];
            sso_proto::nonce::fill(&mut nonce).unwrap();
            assert!(seen.insert(nonce), "the parent repeated a nonce");
        }
        // SAFETY: the read end is open and owned by nothing else from here on.
        let mut reader = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let mut from_child = Vec::new();
        reader.read_to_end(&mut from_child).unwrap();
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` outlives the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status}"
        );
        assert_eq!(from_child.len(), N * LEN, "the child sent {} bytes", from_child.len());
        let repeated = from_child
            .chunks_exact(LEN)
            .filter(|c| !seen.insert(<[u8; LEN]>::try_from(*c).unwrap()))
            .count();
        assert_eq!(
            repeated, 0,
            "{repeated} of the child's {N} nonces repeated the parent's (hook: {hook})"
        );
    }
}
