//! Budgets: how much memory the bridge may pin for the NIC, from the process's real limits.
//!
//! Pinned registrations (and bounce staging buffers) lock pages in memory, which the kernel
//! charges to `RLIMIT_MEMLOCK` unless the process has `CAP_IPC_LOCK`. The registration cache
//! counts pinned bytes against this budget: past it, unused entries are evicted first; then
//! another strategy that pins nothing (ODP) is taken where the policy allows, with the reason
//! recorded; else the registration fails with [`Error::OverBudget`](crate::Error::OverBudget),
//! naming the limit and how to raise it. Without a budget the kernel's own `ENOMEM` would be
//! the first sign, on whichever registration came last.
//!
//! The budget assumes the whole limit is the bridge's: other locked memory of the process
//! (`mlock`, other libraries' registrations) is not counted. Set
//! `CachePolicy::max_pinned_bytes` lower where that matters.

use serde::Serialize;

/// A limit on memory given to the NIC, where it comes from, and how to raise it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// The limit in bytes.
    pub bytes: u64,
    /// Where the number comes from.
    pub source: String,
    /// How to raise it.
    pub fix: String,
}

/// Half of physical memory: the pinned budget where no rlimit bounds pinning.
fn half_of_ram() -> u64 {
    // SAFETY: sysinfo(2) fills the struct it is given, which is zeroed plain data.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `si` is a valid, writable struct sysinfo.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return 8 << 30;
    }
    (si.totalram as u64).saturating_mul(u64::from(si.mem_unit.max(1))) / 2
}

/// The pinned-bytes budget of the calling thread: `RLIMIT_MEMLOCK`'s soft limit, or half of
/// physical memory where the limit does not apply (`CAP_IPC_LOCK`) or is unlimited.
pub fn pinned() -> Budget {
    if cfg!(miri) {
        // Miri runs no capget/getrlimit: the pure-Rust tests it checks need a number only.
        return Budget { bytes: 8 << 30, source: "a fixed 8 GiB (under Miri)".into(), fix: "none".into() };
    }
    let ipc_lock = rustix::thread::capabilities(None)
        .map(|c| c.effective.contains(rustix::thread::CapabilitySet::IPC_LOCK))
        .unwrap_or(false);
    let raise = "raise it: `ulimit -l` (memlock in /etc/security/limits.conf, LimitMEMLOCK= for a systemd unit, --ulimit memlock=-1 for docker), or grant CAP_IPC_LOCK";
    if ipc_lock {
        return Budget {
            bytes: half_of_ram(),
            source: "half of physical memory (CAP_IPC_LOCK: RLIMIT_MEMLOCK does not apply)".into(),
            fix: "set CachePolicy::max_pinned_bytes".into(),
        };
    }
    match rustix::process::getrlimit(rustix::process::Resource::Memlock).current {
        None => Budget {
            bytes: half_of_ram(),
            source: "half of physical memory (RLIMIT_MEMLOCK is unlimited)".into(),
            fix: "set CachePolicy::max_pinned_bytes".into(),
        },
        Some(n) => {
            Budget { bytes: n, source: format!("RLIMIT_MEMLOCK soft limit ({} KiB)", n / 1024), fix: raise.into() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_budget_follows_rlimit_memlock_without_cap_ipc_lock() {
        let b = pinned();
        let caps = rustix::thread::capabilities(None).unwrap();
        let lim = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
        if !caps.effective.contains(rustix::thread::CapabilitySet::IPC_LOCK) {
            if let Some(n) = lim {
                assert_eq!(b.bytes, n);
                assert!(b.source.contains("RLIMIT_MEMLOCK") && b.fix.contains("ulimit -l"), "{b:?}");
                return;
            }
        }
        assert_eq!(b.bytes, half_of_ram(), "{b:?}");
        assert!(b.bytes > 0);
    }
}
