//! The pinned-bytes budget in the Soft-RoCE guest, where the kernel enforces it: this test's
//! thread drops `CAP_IPC_LOCK` and the process's `RLIMIT_MEMLOCK` is set to 1 MiB (as
//! `ulimit -l 1024` would). Registrations past the budget evict unused ones first, then take
//! a strategy that pins nothing where the policy allows (the reason recorded), else fail with
//! a typed error that names the limit and how to raise it. (Its own binary: the limit is the
//! whole process's.)

use std::sync::Arc;

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, Context, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions, Error, Policy, SkipReason, Strategy};
use p2pbridge_test_support::fabric::SoftRoce;

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

/// Host memory whose backend reports a BAR1-like aperture of `LIMIT` bytes: the real host
/// backend (memfd, udmabuf) in every other respect.
struct SmallAperture(HostBackend);

// SAFETY: every answer is the host backend's own; only the export budget differs.
unsafe impl MemoryBackend for SmallAperture {
    fn kind(&self) -> p2pbridge::gpu::BackendKind {
        self.0.kind()
    }
    fn device(&self) -> u32 {
        self.0.device()
    }
    fn granularity(&self) -> usize {
        self.0.granularity()
    }
    fn alloc(&self, len: usize) -> p2pbridge::gpu::Result<p2pbridge::gpu::DeviceBuffer> {
        self.0.alloc(len)
    }
    fn identify(&self, addr: u64) -> p2pbridge::gpu::Result<Option<p2pbridge::gpu::AllocationInfo>> {
        self.0.identify(addr)
    }
    fn export_dmabuf(&self, addr: u64, len: u64) -> p2pbridge::gpu::Result<p2pbridge::gpu::DmaBufExport> {
        self.0.export_dmabuf(addr, len)
    }
    unsafe fn copy_to_addr(&self, addr: u64, src: &[u8]) -> p2pbridge::gpu::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.copy_to_addr(addr, src) }
    }
    unsafe fn copy_from_addr(&self, addr: u64, dst: &mut [u8]) -> p2pbridge::gpu::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.copy_from_addr(addr, dst) }
    }
    fn flush_nic_writes(&self) -> p2pbridge::gpu::Result<p2pbridge::gpu::FlushOutcome> {
        self.0.flush_nic_writes()
    }
    fn notices(&self) -> &p2pbridge::gpu::NoticeHub {
        self.0.notices()
    }
    fn export_budget(&self) -> Option<(u64, String)> {
        Some((LIMIT, "a 1 MiB aperture (test)".into()))
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn guest_the_exported_bytes_budget_is_the_smallest_aperture_its_backends_report() {
    // (rxe imports no dma-bufs, so no registration here is an exported one: the cache's own
    // unit tests cover refusing past the exported-bytes limit.)
    let fab = SoftRoce::from_env().expect("this test needs the Soft-RoCE fabric: run it through scripts/softroce");
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let mem = HostBackend::new();
    let bridge =
        Bridge::new(&pd, vec![Arc::new(mem.clone()), Arc::new(SmallAperture(mem.clone()))], BridgeOptions::default())
            .unwrap();
    assert_eq!(bridge.exported_budget(), (LIMIT, "a 1 MiB aperture (test)"));
    // A budget the caller sets wins.
    let mut opts = BridgeOptions::default();
    opts.cache.max_exported_bytes_per_device = 3 << 20;
    let mine = Bridge::new(&pd, vec![Arc::new(SmallAperture(mem.clone()))], opts).unwrap();
    assert_eq!(mine.exported_budget(), (3 << 20, "CachePolicy::max_exported_bytes_per_device"));
}
