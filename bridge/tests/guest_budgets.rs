//! The pinned-bytes budget in the Soft-RoCE guest, where the kernel enforces it: this test's
//! thread drops `CAP_IPC_LOCK` and the process's `RLIMIT_MEMLOCK` is set to 1 MiB (as
//! `ulimit -l 1024` would). Registrations past the budget evict unused ones first, then take
//! a strategy that pins nothing where the policy allows (the reason recorded), else fail with
//! a typed error that names the limit and how to raise it. (Its own binary: the limit is the
//! whole process's.)

use std::sync::Arc;

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::fabric::SoftRoce;
use p2pbridge::verbs::{AccessFlags, Context, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions, Error, Policy, SkipReason, Strategy};

const LIMIT: u64 = 1 << 20;

/// Makes this thread subject to RLIMIT_MEMLOCK = `LIMIT`, as an unprivileged process is.
fn limit_memlock() {
    let mut caps = rustix::thread::capabilities(None).expect("capget");
    caps.effective.remove(rustix::thread::CapabilitySet::IPC_LOCK);
    rustix::thread::set_capabilities(None, caps).expect("capset");
    let hard = rustix::process::getrlimit(rustix::process::Resource::Memlock).maximum;
    let lim = rustix::process::Rlimit { current: Some(LIMIT), maximum: hard };
    rustix::process::setrlimit(rustix::process::Resource::Memlock, lim).expect("setrlimit(RLIMIT_MEMLOCK)");
}

#[test]
#[ignore = "needs an RDMA device and root (to drop CAP_IPC_LOCK): scripts/test runs it on Soft-RoCE"]
fn guest_past_the_memlock_budget_registrations_evict_then_fall_back_then_fail_typed() {
    let fab = SoftRoce::from_env().expect("this test needs the Soft-RoCE fabric: run it through scripts/softroce");
    limit_memlock();
    let budget = p2pbridge::budget::pinned();
    assert_eq!(budget.bytes, LIMIT, "{budget:?}");
    assert!(budget.source.contains("RLIMIT_MEMLOCK") && budget.fix.contains("ulimit -l"), "{budget:?}");

    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let mem = HostBackend::new();
    let buf = mem.alloc(4 << 20).unwrap();
    let at = |i: u64| buf.addr() + i * (1 << 20);
    let half = 512 << 10;

    // The limit is real here: the kernel itself refuses to pin past it.
    // SAFETY: `buf` is live memory of this test; the region is dropped (or never made) before it.
    let raw = unsafe { pd.register_raw(at(0) as *mut u8, 2 << 20, AccessFlags::LOCAL_WRITE) };
    assert!(raw.is_err(), "the kernel pinned 2 MiB past a 1 MiB RLIMIT_MEMLOCK");
    drop(raw);

    // Pinned only: an unused registration is evicted to make room.
    let pinned_only = Bridge::new(
        &pd,
        vec![Arc::new(mem.clone())],
        BridgeOptions { policy: Policy::default().require(Strategy::PinnedHost), ..Default::default() },
    )
    .unwrap();
    assert_eq!(pinned_only.pinned_budget().bytes, LIMIT);
    let a = pinned_only.register(at(0), 768 << 10, AccessFlags::remote_rw()).unwrap();
    drop(a); // unused now: evictable
    let b = pinned_only.register(at(1), 768 << 10, AccessFlags::remote_rw()).unwrap();
    assert_eq!(b.strategy(), Strategy::PinnedHost);
    assert_eq!(pinned_only.cache_usage().0, 1, "the unused registration was not evicted");
    // Held, so nothing can be evicted: a typed error naming the limit and its fix.
    match pinned_only.register(at(2), half, AccessFlags::remote_rw()) {
        Err(Error::OverBudget { limit, source_of_limit, fix, skipped }) => {
            assert!(limit.contains("pinned bytes"), "{limit}");
            assert!(source_of_limit.contains("RLIMIT_MEMLOCK"), "{source_of_limit}");
            assert!(fix.contains("ulimit -l"), "{fix}");
            assert!(skipped
                .iter()
                .any(|(s, r)| *s == Strategy::PinnedHost && matches!(r, SkipReason::OverBudget { .. })));
        }
        other => panic!("expected Error::OverBudget, got {:?}", other.map(|r| r.strategy())),
    }
    drop(b);
    drop(pinned_only);

    // Pinned preferred, ODP allowed: past the budget the registration pins nothing, and says why.
    let fallback = Bridge::new(
        &pd,
        vec![Arc::new(mem.clone())],
        BridgeOptions { policy: Policy::default().prefer(Strategy::PinnedHost), ..Default::default() },
    )
    .unwrap();
    let c = fallback.register(at(0), 768 << 10, AccessFlags::remote_rw()).unwrap();
    assert_eq!(c.strategy(), Strategy::PinnedHost);
    let d = fallback.register(at(2), 768 << 10, AccessFlags::remote_rw()).unwrap();
    assert_eq!(d.strategy(), Strategy::Odp, "past the budget, ODP (pins nothing) was not taken");
    assert!(
        d.skipped().iter().any(|(s, r)| *s == Strategy::PinnedHost && matches!(r, SkipReason::OverBudget { .. })),
        "the fallback's reason is not recorded: {:?}",
        d.skipped()
    );
    drop((c, d));
    drop(fallback);
    buf.free().unwrap();
}
