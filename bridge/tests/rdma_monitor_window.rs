//! The monitor's window, tested at the NIC from the peer's side: a peer's WRITE with an old key
//! issued the moment `munmap` (whole or part), `mremap` or `madvise(MADV_DONTNEED)` of the
//! memory returns never lands in memory the process has now, on the default host path; and a
//! registration held by an operation never delays another's revocation (nor deadlocks its
//! holder).

use std::sync::Arc;
use std::time::Duration;

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, Error as VerbsError, ProtectionDomain, WcStatus};
use p2pbridge::{Bridge, BridgeOptions, Error, Policy, Registered, Strategy};
use p2pbridge_test_support::fabric::Side;
use p2pbridge_test_support::pattern;

#[path = "support/host_va.rs"]
mod host_va;
#[path = "support/links.rs"]
mod links;
#[path = "support/peers.rs"]
mod peers;
use peers::{fabric, opts};

const LEN: usize = 65_536;
const ROUNDS: usize = 24;

/// The writing peer: a bridge over host-backend memory filled with 0x5a.
struct Writer {
    bridge: Bridge,
    _mem: HostBackend,
    _buf: p2pbridge::gpu::DeviceBuffer,
    reg: Registered,
}

fn writer(pd: &ProtectionDomain) -> p2pbridge::Result<Writer> {
    let mem = HostBackend::new();
    let o = BridgeOptions { policy: Policy::default().require(Strategy::PinnedHost), ..Default::default() };
    let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], o)?;
    let buf = mem.alloc(LEN)?;
    mem.copy_to_device(&buf, 0, &pattern(LEN, 0x5a))?;
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw())?;
    Ok(Writer { bridge, _mem: mem, _buf: buf, reg })
}

/// The owner of plain host memory: a bridge with the default options (monitor on).
fn owner(pd: &ProtectionDomain) -> p2pbridge::Result<Bridge> {
    Bridge::new(pd, vec![], BridgeOptions::default())
}

fn pair() -> (Side<Writer>, Side<Bridge>) {
    fabric()
        .connect_pair(opts(), |pd| Ok((writer(pd)?, Vec::new())), |pd| Ok((owner(pd)?, Vec::new())))
        .unwrap_or_else(|e| panic!("connection set-up failed: {e}"))
}

fn is_remote_access<T: std::fmt::Debug>(r: &Result<T, Error>) -> bool {
    matches!(r, Err(Error::Verbs(VerbsError::WorkCompletion { status: WcStatus::RemoteAccess, .. })))
}

/// How the memory goes.
#[derive(Debug, Clone, Copy)]
enum Gone {
    /// `munmap` of the whole range.
    Munmap,
    /// `munmap` of its second half (the WRITE targets that half).
    MunmapHalf,
    /// `mremap` of the whole range elsewhere.
    Mremap,
    /// `madvise(MADV_DONTNEED)` of the whole range.
    DontNeed,
}

/// Makes the memory at `p` go by `gone`, puts new memory (0x77) where it was, and returns the
/// range the process now has there: (address, length) of what must stay 0x77.
fn go(p: u64, gone: Gone) -> (u64, usize, Option<(u64, usize)>) {
    match gone {
        Gone::Munmap => {
            host_va::unmap(p, LEN);
            host_va::map(Some(p), LEN);
            host_va::fill(p, LEN, 0x77);
            (p, LEN, None)
        }
        Gone::MunmapHalf => {
            let h = LEN / 2;
            host_va::unmap(p + h as u64, h);
            host_va::map(Some(p + h as u64), h);
            host_va::fill(p + h as u64, h, 0x77);
            // The first half stays (still registered, still the peer's to write).
            (p + h as u64, h, Some((p, h)))
        }
        Gone::Mremap => {
            // SAFETY: the test's own mapping, moved wholesale; the old address gets new memory.
            let q =
                unsafe { rustix::mm::mremap(p as *mut _, LEN, LEN, rustix::mm::MremapFlags::MAYMOVE).unwrap() as u64 };
            // The moved pages are the same memory, not new memory: the check is at the old
            // address. Keep q mapped until the round ends; the caller unmaps it.
            let _ = host_va::map(Some(p), LEN);
            host_va::fill(p, LEN, 0x77);
            (p, LEN, Some((q, LEN)))
        }
        Gone::DontNeed => {
            // SAFETY: the test's own mapping; its pages are dropped (zero on next touch).
            unsafe { rustix::mm::madvise(p as *mut _, LEN, rustix::mm::Advice::LinuxDontNeed) }.unwrap();
            host_va::fill(p, LEN, 0x77);
            (p, LEN, None)
        }
    }
}

/// `ROUNDS` rounds of: fresh memory registered with `register_host` (default policy) and its
/// key handed to the peer; the memory goes by `gone`, new memory is put at the old address,
/// and at once the peer WRITEs with the old key. The new memory must be unchanged, whether the
/// NIC refused the WRITE (revoked already) or took it into the old pages.
fn window_case(gone: Gone) {
    let (c, s) = pair();
    let srv = &s.state;
    srv.host_monitor().as_result().expect("the userfaultfd monitor runs on the fabric");
    let (mut refused, mut landed_old) = (0, 0);
    for round in 0..ROUNDS {
        // A connection of its own: a refused WRITE moves the writer's QP to the error state.
        let (cc, sc) = links::connect(&fabric(), &c.pd, &s.pd, &opts());
        let p = host_va::map(None, LEN);
        // SAFETY: mapped; it goes only through the calls below, which the monitor watches.
        let reg = unsafe { srv.register_host(p, LEN as u64, AccessFlags::remote_rw()) }.unwrap();
        assert_eq!(reg.strategy(), Strategy::PinnedHost, "the default host path is pinned: {:?}", reg.skipped());
        let key = srv.hand_out(&sc, &reg, 0, LEN as u64).unwrap();
        drop(reg);
        let (at, n, other) = go(p, gone);
        let off = at - p;
        let r = c.state.bridge.write(&cc, &c.state.reg, 0, n as u64, &key, off);
        let now = host_va::bytes(at, n);
        assert!(
            now.iter().all(|&b| b == 0x77),
            "{gone:?} round {round}: the peer's WRITE with the old key ({r:?}) changed the memory the process has now"
        );
        match &r {
            Ok(()) => landed_old += 1,
            _ if is_remote_access(&r) => refused += 1,
            Err(e) => panic!("{gone:?} round {round}: the WRITE failed otherwise: {e}"),
        }
        srv.sync_monitor().unwrap();
        if r.is_ok() {
            // Once the monitor has acted, the key is refused at the NIC.
            let again = c.state.bridge.write(&cc, &c.state.reg, 0, n as u64, &key, off);
            assert!(is_remote_access(&again), "{gone:?} round {round}: after sync_monitor: {again:?}");
            assert!(host_va::bytes(at, n).iter().all(|&b| b == 0x77), "{gone:?} round {round}");
        }
        assert!(matches!(srv.check_key(&key), Err(Error::StaleKey { .. })));
        host_va::unmap(p, LEN);
        if let Some((q, l)) = other {
            if q != p {
                host_va::unmap(q, l);
            }
        }
    }
    eprintln!("{gone:?}: {ROUNDS} rounds: {refused} WRITEs refused at once, {landed_old} taken into the old pages, none in new memory");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_write_the_moment_munmap_returns_never_reaches_new_memory() {
    window_case(Gone::Munmap);
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_write_the_moment_a_partial_munmap_returns_never_reaches_new_memory() {
    window_case(Gone::MunmapHalf);
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_write_the_moment_mremap_returns_never_reaches_new_memory() {
    window_case(Gone::Mremap);
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_write_the_moment_madvise_dontneed_returns_never_reaches_new_memory() {
    window_case(Gone::DontNeed);
}

/// Runs `f` on another thread and fails (naming `what`) if it does not return within 30 s: a
/// deadlock shows as a failure, not a hung suite.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("{what} did not return: deadlock"))
}

/// What holds range X's registration while X is unmapped.
#[derive(Debug, Clone, Copy)]
enum Holder {
    /// A `LocalGuard` (`Registered::lock`).
    Guard,
    /// A transfer from X, posted and never polled.
    Transfer,
}

/// A registration of range X is held (`holder`) while X is unmapped, and range Y is unmapped
/// and new memory mapped there: Y's key is refused by the NIC and Y's new memory is unchanged;
/// X's key is refused too, though X is held; the holder's own `sync_monitor` and
/// `register_host` return. When the holder goes, X's region is deregistered.
#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_held_registration_never_delays_another_revocation_nor_deadlocks_its_holder() {
    for holder in [Holder::Guard, Holder::Transfer] {
        held_case(holder);
    }
}

fn held_case(holder: Holder) {
    let (c, s) = pair();
    let srv = s.state.clone();
    srv.host_monitor().as_result().expect("the userfaultfd monitor runs on the fabric");
    let (x, y) = (host_va::map(None, LEN), host_va::map(None, LEN));
    // SAFETY: mapped; they go only by the unmaps below, which the monitor watches.
    let (rx, ry) = unsafe {
        (
            srv.register_host(x, LEN as u64, AccessFlags::remote_rw()).unwrap(),
            srv.register_host(y, LEN as u64, AccessFlags::remote_rw()).unwrap(),
        )
    };
    let (kx, ky) =
        (srv.hand_out(&s.conn, &rx, 0, LEN as u64).unwrap(), srv.hand_out(&s.conn, &ry, 0, LEN as u64).unwrap());
    let live_before = p2pbridge::live_registrations();
    let back = c.state.bridge.hand_out(&c.conn, &c.state.reg, 0, LEN as u64).unwrap();
    let (mut guard, mut transfer) = (None, None);
    match holder {
        Holder::Guard => guard = Some(rx.lock().unwrap()),
        Holder::Transfer => {
            let mut b = p2pbridge::Batch::new();
            b.write(&rx, 0, 4096, &back, 0);
            transfer = Some(srv.post(&s.conn, b).unwrap());
        }
    }
    host_va::unmap(x, LEN);
    host_va::unmap(y, LEN);
    host_va::map(Some(y), LEN);
    host_va::fill(y, LEN, 0x77);
    // The holder waits for the monitor, and registers: neither waits for the guard it holds.
    let b = srv.clone();
    within(&format!("sync_monitor by the holder ({holder:?})"), move || b.sync_monitor().unwrap());
    let b = srv.clone();
    let z = host_va::map(None, LEN);
    // SAFETY: mapped; unmapped below after its registration is dropped.
    let rz = within(&format!("register_host by the holder ({holder:?})"), move || unsafe {
        b.register_host(z, LEN as u64, AccessFlags::remote_rw()).unwrap()
    });
    let r = c.state.bridge.write(&c.conn, &c.state.reg, 0, LEN as u64, &ky, 0);
    assert!(is_remote_access(&r), "{holder:?}: Y's key must be refused at the NIC while X is held: {r:?}");
    assert!(
        host_va::bytes(y, LEN).iter().all(|&b| b == 0x77),
        "{holder:?}: the WRITE with Y's key changed Y's new memory"
    );
    assert!(
        matches!(srv.check_key(&kx), Err(Error::StaleKey { .. })),
        "{holder:?}: X's key is revoked though X is held"
    );
    assert!(!rx.is_live() && !ry.is_live());
    // X's region is still registered (held); Y's is gone.
    assert_eq!(
        p2pbridge::live_registrations(),
        live_before,
        "{holder:?}: only Y's region (and Z's new one) changed the count"
    );
    drop(guard);
    if let Some(t) = transfer {
        // Its WRITE read X's old pages (pinned): it completed.
        t.wait().unwrap();
    }
    // The teardown thread deregisters X once let go.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while p2pbridge::live_registrations() >= live_before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        p2pbridge::live_registrations(),
        live_before - 1,
        "{holder:?}: X's region was not deregistered after its holder went"
    );
    drop((ry, rz));
    host_va::unmap(y, LEN);
    host_va::unmap(z, LEN);
}
