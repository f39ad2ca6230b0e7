//! Process hardening: no core dumps, not ptrace-attachable by other users, key memory
//! locked where the OS allows it. The only module in the workspace with `unsafe`: each
//! block is one libc call on plain integers.
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
}
