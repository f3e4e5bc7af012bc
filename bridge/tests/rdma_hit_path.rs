//! The hit path of `Bridge::register` (issue 13) on a real device: hits of an allocation whose
//! backend announces its free skip identification; memory a backend only identifies, freed
//! without a notice and its addresses reused, never hits the old registration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use p2pbridge::gpu::{
    AllocationInfo, BackendKind, DeviceBuffer, DmaBufExport, FlushOutcome, HostBackend, MemoryBackend, NoticeHub,
};
use p2pbridge::verbs::{AccessFlags, Context, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions, Policy, Strategy};
use p2pbridge_test_support::fabric::SoftRoce;

/// The host backend, counting identifications. `announced`: frees reach the bridge (the host
/// backend's own notices, and `notifies` as it says); otherwise the bridge subscribes to a hub
/// that never fires and is told nothing: an allocator that frees behind the bridge's back.
struct Wrapped {
    host: HostBackend,
    identified: AtomicUsize,
    announced: bool,
    silent: NoticeHub,
}

impl Wrapped {
    fn new(host: &HostBackend, announced: bool) -> Arc<Self> {
        Arc::new(Wrapped {
            host: host.clone(),
            identified: AtomicUsize::new(0),
            announced,
            silent: NoticeHub::default(),
        })
    }
    fn identified(&self) -> usize {
        self.identified.load(Ordering::SeqCst)
    }
}

// SAFETY: every answer is the host backend's, except that an unannounced `Wrapped` says it
// does not notify (true: its frees go to a hub nobody fires).
unsafe impl MemoryBackend for Wrapped {
    fn kind(&self) -> BackendKind {
        self.host.kind()
    }
    fn device(&self) -> u32 {
        self.host.device()
    }
    fn granularity(&self) -> usize {
        self.host.granularity()
    }
    fn alloc(&self, len: usize) -> p2pbridge::gpu::Result<DeviceBuffer> {
        self.host.alloc(len)
    }
    fn identify(&self, addr: u64) -> p2pbridge::gpu::Result<Option<AllocationInfo>> {
        self.identified.fetch_add(1, Ordering::SeqCst);
        self.host.identify(addr)
    }
    fn export_dmabuf(&self, addr: u64, len: u64) -> p2pbridge::gpu::Result<DmaBufExport> {
        self.host.export_dmabuf(addr, len)
    }
    unsafe fn copy_to_addr(&self, addr: u64, src: &[u8]) -> p2pbridge::gpu::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.host.copy_to_addr(addr, src) }
    }
    unsafe fn copy_from_addr(&self, addr: u64, dst: &mut [u8]) -> p2pbridge::gpu::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.host.copy_from_addr(addr, dst) }
    }
    fn flush_nic_writes(&self) -> p2pbridge::gpu::Result<FlushOutcome> {
        self.host.flush_nic_writes()
    }
    fn notices(&self) -> &NoticeHub {
        if self.announced {
            self.host.notices()
        } else {
            &self.silent
        }
    }
    fn notifies(&self, info: &AllocationInfo) -> bool {
        self.announced && self.host.notifies(info)
    }
}

fn bridge(backend: Arc<Wrapped>) -> (SoftRoce, Bridge) {
    bridge_with(backend, Strategy::PinnedHost)
}

fn bridge_with(backend: Arc<Wrapped>, strategy: Strategy) -> (SoftRoce, Bridge) {
    let fab = SoftRoce::from_env().expect("this test needs the Soft-RoCE fabric: run it through scripts/softroce");
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let opts = BridgeOptions { policy: Policy::default().require(strategy), ..Default::default() };
    let b = Bridge::new(&pd, vec![backend], opts).unwrap();
    (fab, b)
}

/// Allocates `len` bytes at `addr` again (mmap hands back the address just unmapped, as a
/// caching allocator reuses its blocks); the misses are freed.
fn realloc_at(host: &HostBackend, addr: u64, len: usize) -> DeviceBuffer {
    let mut others = Vec::new();
    for _ in 0..64 {
        let b = host.alloc(len).unwrap();
        if b.addr() == addr {
            return b;
        }
        others.push(b);
    }
    panic!("the address {addr:#x} was not handed out again in 64 allocations");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_hits_of_an_announced_allocation_skip_identification_and_end_with_its_free() {
    let host = HostBackend::new();
    let w = Wrapped::new(&host, true);
    let (_fab, bridge) = bridge(w.clone());
    let buf = host.alloc(1 << 20).unwrap();
    let (addr, len) = (buf.addr(), buf.len());
    let first = bridge.register(addr + 8192, 4096, AccessFlags::remote_rw()).unwrap();
    let n = w.identified();
    assert!(n > 0, "the miss identified the memory");
    for i in 0..1000u64 {
        let hit = bridge.register(addr + 8192 + (i % 4) * 1024, 1024, AccessFlags::remote_rw()).unwrap();
        assert_eq!(hit.generation(), first.generation());
    }
    assert_eq!(w.identified(), n, "a hit of an announced allocation identified the memory");
    // A miss elsewhere in it identifies again, then its hits do not.
    let other = bridge.register(addr + 65536, 4096, AccessFlags::remote_rw()).unwrap();
    let m = w.identified();
    assert!(m > n);
    drop(bridge.register(addr + 65536, 4096, AccessFlags::remote_rw()).unwrap());
    assert_eq!(w.identified(), m);

    // The free revokes them; the same addresses allocated again are registered anew.
    drop(buf);
    assert!(!first.is_live() && !other.is_live(), "registrations outlived their memory's free");
    let again = realloc_at(&host, addr, len as usize);
    let fresh = bridge.register(addr + 8192, 4096, AccessFlags::remote_rw()).unwrap();
    assert_ne!(fresh.generation(), first.generation(), "a registration of freed memory was hit");
    assert!(fresh.is_live());
    assert!(w.identified() > m, "the new allocation was not identified");
    drop(fresh);
    drop(again);
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_memory_freed_without_a_notice_and_reused_never_hits_the_old_registration() {
    let host = HostBackend::new();
    let w = Wrapped::new(&host, false);
    let (_fab, bridge) = bridge(w.clone());
    let buf = host.alloc(1 << 20).unwrap();
    let (addr, len) = (buf.addr(), buf.len());
    // The safe call refuses memory whose free the bridge cannot wait for.
    assert!(matches!(
        bridge.register(addr + 8192, 4096, AccessFlags::remote_rw()),
        Err(p2pbridge::Error::NotAnnounced { .. })
    ));
    // SAFETY: this test breaks the report_free contract on purpose (the free below is never
    // reported), to check the defence behind it; no key is handed out and no operation or
    // staging copy touches the memory, and the pinned region keeps the old pages.
    let foreign = |a: u64| unsafe { bridge.register_foreign(a, 4096, AccessFlags::remote_rw()) }.unwrap();
    let old = foreign(addr + 8192);
    // Its hits identify first (the allocation is not announced: no hit by address alone).
    let n = w.identified();
    let hit = foreign(addr + 8192);
    assert_eq!(hit.generation(), old.generation());
    assert!(w.identified() > n, "a hit of memory whose free is not announced skipped identification");
    drop(hit);

    // Freed behind the bridge's back (it hears nothing), and the addresses reused by a new
    // allocation: the old registration is not hit, and it is revoked once the new allocation
    // is seen where it was.
    drop(buf);
    assert!(old.is_live(), "nothing told the bridge (the test's premise)");
    let again = realloc_at(&host, addr, len as usize);
    let fresh = foreign(addr + 8192);
    assert_ne!(fresh.generation(), old.generation(), "the freed allocation's registration was hit");
    assert!(!old.is_live(), "the freed allocation's registration was not revoked when its addresses were reused");
    drop(fresh);
    drop(again);
}

/// The second guard behind `register_foreign`'s contract: a bounce registration's staging copy
/// checks that the address is still the allocation registered, and copies nothing where it is
/// not (freed without `report_free`, its addresses reused).
#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_staging_copy_into_reused_addresses_of_unreported_memory_is_refused() {
    let host = HostBackend::new();
    let w = Wrapped::new(&host, false);
    let (_fab, bridge) = bridge_with(w.clone(), Strategy::Bounce);
    let buf = host.alloc(1 << 20).unwrap();
    let (addr, len) = (buf.addr(), buf.len());
    // SAFETY: this test breaks the report_free contract on purpose (the free below is never
    // reported), to check the staging copies' identity check; no key is handed out, and the
    // copies are the check's subject: they must not run.
    let reg = unsafe { bridge.register_foreign(addr, 4096, AccessFlags::remote_rw()) }.unwrap();
    assert_eq!(reg.strategy(), Strategy::Bounce);
    bridge.sync_to_peers(&reg).unwrap();
    bridge.sync_from_peers(&reg).unwrap();
    drop(buf);
    let again = realloc_at(&host, addr, len as usize);
    host.copy_to_device(&again, 0, &vec![0x99; 4096]).unwrap();
    for r in [bridge.sync_from_peers(&reg).map(drop), bridge.sync_to_peers(&reg)] {
        assert!(
            matches!(r, Err(p2pbridge::Error::NotTheRegisteredMemory { addr: a }) if a == addr),
            "a staging copy into another allocation at the registered address: {r:?}"
        );
    }
    assert!(host.to_vec(&again).unwrap()[..4096].iter().all(|&b| b == 0x99), "the new allocation was written");
    drop(reg);
    drop(again);
}
