//! The bridge on the Soft-RoCE fabric, through real libibverbs: strategies moving data,
//! skipped strategies with their reasons, use-after-free safety, concurrency.

use std::sync::Arc;
use std::time::Duration;

use p2pbridge::gpu::{BackendKind, DeviceBuffer, HostBackend, MemoryBackend};
use p2pbridge::strategy::plan;
use p2pbridge::verbs::{AccessFlags, ConnectionOptions, Error as VerbsError, OdpTransportCaps, WcStatus};
use p2pbridge::{Bridge, BridgeOptions, Error, MemoryKind, Policy, Registered, RemoteKey, SkipReason, Strategy};
use p2pbridge_test_support::fabric::{Side, SoftRoce};

fn fabric() -> SoftRoce {
    SoftRoce::from_env().expect("this test needs the Soft-RoCE fabric: run it through scripts/test or scripts/softroce")
}

use p2pbridge_test_support::pattern;

#[path = "support/links.rs"]
mod links;

/// One side: its bridge, backend, buffer and registration of the whole buffer.
struct Host {
    bridge: Bridge,
    mem: HostBackend,
    buf: Option<DeviceBuffer>,
    reg: Option<Registered>,
}

fn side(
    pd: &p2pbridge::verbs::ProtectionDomain,
    policy: Policy,
    len: usize,
    fill: Option<u8>,
) -> p2pbridge::Result<Host> {
    let mem = HostBackend::new();
    let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], BridgeOptions { policy, ..Default::default() })?;
    let buf = mem.alloc(len)?;
    if let Some(seed) = fill {
        mem.copy_to_device(&buf, 0, &pattern(len, seed))?;
    }
    let reg = bridge.register(buf.addr(), len as u64, AccessFlags::remote_rw())?;
    Ok(Host { bridge, mem, buf: Some(buf), reg: Some(reg) })
}

fn opts() -> ConnectionOptions {
    // SENDs retry on RNR until the receive is posted (no sleeps to order them).
    ConnectionOptions { timeout: Duration::from_secs(30), rnr_retry_count: 7, ..Default::default() }
}

/// A client and a server, each with a buffer registered under `policy` (the client's filled
/// with pattern 0x42), and the server's whole buffer handed to the client.
fn pair(policy: Policy, len: usize) -> (Side<Host>, Side<Host>, RemoteKey) {
    let (c, s) = fabric()
        .connect_pair(
            opts(),
            move |pd| Ok((side(pd, policy, len, Some(0x42))?, Vec::new())),
            move |pd| Ok((side(pd, policy, len, None)?, Vec::new())),
        )
        .unwrap_or_else(|e| panic!("connection set-up failed: {e}"));
    let key = s.state.bridge.hand_out(&s.conn, s.state.reg.as_ref().unwrap(), 0, len as u64).unwrap();
    (c, s, key)
}

/// One more connection between the two hosts, over existing protection domains.
fn connect(
    cpd: &p2pbridge::verbs::ProtectionDomain,
    spd: &p2pbridge::verbs::ProtectionDomain,
) -> (p2pbridge::verbs::Connection, p2pbridge::verbs::Connection) {
    links::connect(&fabric(), cpd, spd, &opts())
}

/// `len` bytes of fresh private anonymous memory, never touched.
fn fresh_map(len: usize) -> u64 {
    // SAFETY: a fresh private anonymous mapping.
    unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap() as u64
}

/// A server over plain host memory: a bridge that requires `strategy` (monitor on), and a
/// fresh, untouched mapping registered with `register_host`.
struct VaServer {
    bridge: Bridge,
    reg: Option<Registered>,
    p: u64,
}

fn va_server(pd: &p2pbridge::verbs::ProtectionDomain, strategy: Strategy, len: usize) -> p2pbridge::Result<VaServer> {
    let bridge =
        Bridge::new(pd, vec![], BridgeOptions { policy: Policy::default().require(strategy), ..Default::default() })?;
    let p = fresh_map(len);
    // SAFETY: mapped; the tests unmap it only through the monitor's watch (or after dropping).
    let reg = unsafe { bridge.register_host(p, len as u64, AccessFlags::remote_rw()) }?;
    Ok(VaServer { bridge, reg: Some(reg), p })
}

/// Unmaps `p..p+len` and maps new anonymous memory at the same address, filled with 0x77.
fn replace_mapping(p: u64, len: usize) {
    // SAFETY: the tests' own mapping, replaced wholesale by new memory at the same address.
    unsafe {
        rustix::mm::munmap(p as *mut _, len).unwrap();
        let q = rustix::mm::mmap_anonymous(
            p as *mut _,
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED,
        )
        .unwrap();
        assert_eq!(q as u64, p);
        std::ptr::write_bytes(q as *mut u8, 0x77, len);
    }
}

/// Host memory at `p`, copied out (never referenced: a peer may write it).
fn host_bytes(p: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the test's live mapping; copied, not referenced.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, v.as_mut_ptr(), len) };
    v
}

fn is_remote_access(r: &Result<(), Error>) -> bool {
    matches!(r, Err(Error::Verbs(VerbsError::WorkCompletion { status: WcStatus::RemoteAccess, .. })))
}

/// The peer's WRITE of `n` bytes with `key` over `conn` is refused by the server's NIC.
fn assert_write_refused(c: &Host, conn: &p2pbridge::verbs::Connection, key: &RemoteKey, off: u64, n: u64, what: &str) {
    let r = c.bridge.write(conn, c.reg.as_ref().unwrap(), 0, n, key, off);
    assert!(is_remote_access(&r), "{what}: a WRITE with the key should fail with a remote access error, got {r:?}");
}

/// The peer's READ with `key` over `conn` is refused and brings nothing into its buffer.
fn assert_read_refused(c: &Host, conn: &p2pbridge::verbs::Connection, key: &RemoteKey, n: u64, what: &str) {
    let buf = c.buf.as_ref().unwrap();
    c.mem.copy_to_device(buf, 0, &pattern(n as usize, 0x5c)).unwrap();
    let r = c.bridge.read(conn, c.reg.as_ref().unwrap(), 0, n, key, 0);
    assert!(r.is_err(), "{what}: a READ with the key should fail, got {r:?}");
    assert!(
        c.mem.to_vec(buf).unwrap()[..n as usize] == pattern(n as usize, 0x5c)[..],
        "{what}: the failed READ brought bytes into the peer's buffer"
    );
}

#[derive(Debug, Clone, Copy)]
enum Gone {
    /// munmap + mmap of the same VA (register_host, the monitor sees it).
    Remap,
    /// The host backend's free, then allocations until the same address comes back.
    BackendFree,
}

/// The promise at the NIC: once the memory is gone, both keys handed out over it (one per
/// connection) are refused by the server's NIC — WRITE and READ — the new memory at the same
/// address is unchanged, and a handle held across is dead.
fn revocation_case(strategy: Strategy, gone: Gone, hold: bool) {
    let what = format!("{strategy} {gone:?} handle {}", if hold { "held" } else { "dropped" });
    let len = 65_536usize;
    let n = 4096u64;
    let fab = fabric();
    let client = move |pd: &p2pbridge::verbs::ProtectionDomain| {
        Ok((side(pd, Policy::default().require(Strategy::PinnedHost), len, Some(0x31))?, Vec::new()))
    };
    match gone {
        Gone::Remap => {
            let (c, s) =
                fab.connect_pair(opts(), client, move |pd| Ok((va_server(pd, strategy, len)?, Vec::new()))).unwrap();
            let (c2, s2) = connect(&c.pd, &s.pd);
            let mut srv = s.state;
            assert_eq!(srv.reg.as_ref().unwrap().strategy(), strategy);
            srv.bridge.host_monitor().as_result().expect("the userfaultfd monitor runs on the fabric");
            let kw = srv.bridge.hand_out(&s.conn, srv.reg.as_ref().unwrap(), 0, len as u64).unwrap();
            let kr = srv.bridge.hand_out(&s2, srv.reg.as_ref().unwrap(), 0, len as u64).unwrap();
            // Both keys work while the memory is there.
            c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, n, &kw, 0).unwrap();
            c.state.bridge.read(&c2, c.state.reg.as_ref().unwrap(), 0, n, &kr, 0).unwrap();
            let held = srv.reg.take().filter(|_| hold);
            replace_mapping(srv.p, len);
            srv.bridge.sync_monitor().unwrap();
            assert_write_refused(&c.state, &c.conn, &kw, 0, n, &what);
            assert_read_refused(&c.state, &c2, &kr, n, &what);
            assert!(host_bytes(srv.p, len).iter().all(|&b| b == 0x77), "{what}: the new memory was changed");
            assert!(matches!(srv.bridge.check_key(&kw), Err(Error::StaleKey { .. })), "{what}");
            if let Some(h) = held {
                assert!(!h.is_live(), "{what}: the held handle is still live");
            }
            // SAFETY: ours.
            unsafe { rustix::mm::munmap(srv.p as *mut _, len).unwrap() };
        }
        Gone::BackendFree => {
            let policy = Policy::default().require(strategy);
            let (c, s) =
                fab.connect_pair(opts(), client, move |pd| Ok((side(pd, policy, len, None)?, Vec::new()))).unwrap();
            let (c2, s2) = connect(&c.pd, &s.pd);
            let mut srv = s.state;
            assert_eq!(srv.reg.as_ref().unwrap().strategy(), strategy);
            let kw = srv.bridge.hand_out(&s.conn, srv.reg.as_ref().unwrap(), 0, len as u64).unwrap();
            let kr = srv.bridge.hand_out(&s2, srv.reg.as_ref().unwrap(), 0, len as u64).unwrap();
            c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, n, &kw, 0).unwrap();
            srv.bridge.sync_to_peers(srv.reg.as_ref().unwrap()).unwrap();
            c.state.bridge.read(&c2, c.state.reg.as_ref().unwrap(), 0, n, &kr, 0).unwrap();
            let held = srv.reg.take().filter(|_| hold);
            let old_addr = srv.buf.as_ref().unwrap().addr();
            drop(srv.buf.take()); // the notice revokes before the free goes on
            let mut others = Vec::new();
            let new = loop {
                let b = srv.mem.alloc(len).unwrap();
                if b.addr() == old_addr || others.len() == 8 {
                    break b;
                }
                others.push(b);
            };
            srv.mem.copy_to_device(&new, 0, &vec![0x99; len]).unwrap();
            assert_write_refused(&c.state, &c.conn, &kw, 0, n, &what);
            assert_read_refused(&c.state, &c2, &kr, n, &what);
            assert!(srv.mem.to_vec(&new).unwrap().iter().all(|&b| b == 0x99), "{what}: the new memory was changed");
            if let Some(h) = held {
                assert!(!h.is_live(), "{what}: the held handle is still live");
                let r = c.state.bridge.write(&c.conn, &h, 0, 1, &kw, 0);
                assert!(r.is_err(), "{what}: an operation on a dead handle must fail");
                assert!(matches!(srv.bridge.sync_to_peers(&h), Err(Error::Revoked)), "{what}: a dead handle's publish");
            }
            eprintln!("{what}: same address reused: {}", new.addr() == old_addr);
        }
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_old_keys_are_refused_by_the_nic_after_munmap_and_remap_of_host_memory() {
    for strategy in [Strategy::PinnedHost, Strategy::Odp] {
        for hold in [false, true] {
            revocation_case(strategy, Gone::Remap, hold);
        }
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_old_keys_are_refused_by_the_nic_after_a_backend_free_and_realloc() {
    for strategy in [Strategy::PinnedHost, Strategy::Odp, Strategy::Bounce] {
        for hold in [false, true] {
            revocation_case(strategy, Gone::BackendFree, hold);
        }
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_untouched_registered_memory_is_reachable_by_the_peer_with_the_monitor_on() {
    let len = 65_536usize;
    for strategy in [Strategy::PinnedHost, Strategy::Odp] {
        let (c, s) = fabric()
            .connect_pair(
                opts(),
                move |pd| Ok((side(pd, Policy::default().require(Strategy::PinnedHost), len, Some(0x21))?, Vec::new())),
                move |pd| Ok((va_server(pd, strategy, len)?, Vec::new())),
            )
            .unwrap();
        let srv = &s.state;
        srv.bridge.host_monitor().as_result().expect("the userfaultfd monitor runs on the fabric");
        // ODP registrations are prefetched where advise_mr works, and say why not elsewhere.
        match (strategy, srv.reg.as_ref().unwrap().prefetch(), srv.bridge.caps().nic.advise_mr.as_result()) {
            (Strategy::Odp, Some(Ok(())), Ok(())) => {}
            (Strategy::Odp, Some(Err(why)), Err(probe)) => {
                assert_eq!(why, probe.to_string(), "the registration's reason is the probe's");
                eprintln!("SKIPPED prefetch of {strategy} registrations: {why}");
            }
            (Strategy::PinnedHost, None, _) => {}
            (s, got, probe) => panic!("{s}: prefetch {got:?} disagrees with the probe's {probe:?}"),
        }
        let key = srv.bridge.hand_out(&s.conn, srv.reg.as_ref().unwrap(), 0, len as u64).unwrap();
        // Never touched by the owner: the peer's first WRITE lands, its first READ works.
        c.state
            .bridge
            .write(&c.conn, c.state.reg.as_ref().unwrap(), 0, 8192, &key, 0)
            .unwrap_or_else(|e| panic!("{strategy}: the peer's first WRITE into untouched memory failed: {e}"));
        c.state
            .bridge
            .read(&c.conn, c.state.reg.as_ref().unwrap(), 8192, 8192, &key, 16384)
            .unwrap_or_else(|e| panic!("{strategy}: the peer's first READ of untouched memory failed: {e}"));
        assert!(host_bytes(srv.p, 8192) == pattern(len, 0x21)[..8192], "{strategy}: the WRITE did not land");
        let got = c.state.mem.to_vec(c.state.buf.as_ref().unwrap()).unwrap();
        assert!(got[8192..16384].iter().all(|&b| b == 0), "{strategy}: untouched memory read back non-zero");
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_key_leaked_to_another_connection_is_refused() {
    let len = 65_536usize;
    let (c, s, key) = pair(Policy::default().require(Strategy::PinnedHost), len);
    s.state.bridge.key_windows().as_result().expect("rxe has type 2 memory windows");
    let (c2, _s2) = connect(&c.pd, &s.pd);
    // The key was bound to the first connection's QP; over the second the NIC refuses it.
    assert_write_refused(&c.state, &c2, &key, 0, 4096, "a key used over another connection");
    assert!(s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap().iter().all(|&b| b == 0));
    // Over its own connection it works.
    c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, 4096, &key, 0).unwrap();
    // The connections go before the bridges: the windows bound to their QPs go with them.
    drop((c2, _s2));
    drop((c, s));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_key_for_part_of_a_registration_reaches_that_part_only() {
    let len = 65_536usize;
    let (c, s, _) = pair(Policy::default().require(Strategy::PinnedHost), len);
    let (sreg, sbridge) = (s.state.reg.as_ref().unwrap(), &s.state.bridge);
    sbridge.key_windows().as_result().expect("rxe has type 2 memory windows");
    let part = sbridge.hand_out(&s.conn, sreg, 4096, 4096).unwrap();
    assert_eq!(part.len, 4096);
    c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, 4096, &part, 0).unwrap();
    // The peer rewrites the length: past the end, the NIC refuses.
    let forged = RemoteKey { len: len as u64, ..part };
    assert_write_refused(&c.state, &c.conn, &forged, 4096, 4096, "past the handed-out end");
    // And before the start (a second connection: the first is in the error state now).
    let (c2, s2) = connect(&c.pd, &s.pd);
    let part2 = sbridge.hand_out(&s2, sreg, 4096, 4096).unwrap();
    let forged2 = RemoteKey { addr: part2.addr - 4096, len: len as u64, ..part2 };
    assert_write_refused(&c.state, &c2, &forged2, 0, 4096, "before the handed-out start");
    let server = s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap();
    assert!(server[4096..8192] == pattern(len, 0x42)[..4096], "the handed-out part got the write");
    assert!(
        server[..4096].iter().chain(&server[8192..]).all(|&b| b == 0),
        "bytes outside the handed-out range changed"
    );
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_key_grants_only_the_rights_asked_for() {
    let len = 65_536usize;
    let (c, s, _) = pair(Policy::default().require(Strategy::PinnedHost), len);
    // A read-only registration of memory already registered read-write: a cache hit on the
    // read-write entry, but its key lets the peer read only.
    let ro =
        s.state.bridge.register(s.state.buf.as_ref().unwrap().addr(), len as u64, AccessFlags::REMOTE_READ).unwrap();
    assert_eq!(ro.generation(), s.state.reg.as_ref().unwrap().generation(), "a hit on the read-write entry");
    let key = s.state.bridge.hand_out(&s.conn, &ro, 0, len as u64).unwrap();
    c.state.bridge.read(&c.conn, c.state.reg.as_ref().unwrap(), 0, 4096, &key, 0).unwrap();
    assert_write_refused(&c.state, &c.conn, &key, 0, 4096, "a read-only key");
    assert!(s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap().iter().all(|&b| b == 0));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_revoked_key_is_refused_and_its_siblings_still_work() {
    let len = 65_536usize;
    let (c, s, k1) = pair(Policy::default().require(Strategy::Odp), len);
    let (c2, s2) = connect(&c.pd, &s.pd);
    let k2 = s.state.bridge.hand_out(&s2, s.state.reg.as_ref().unwrap(), 0, len as u64).unwrap();
    s.state.bridge.revoke_key(&k1).unwrap();
    assert!(matches!(s.state.bridge.check_key(&k1), Err(Error::StaleKey { .. })));
    assert_write_refused(&c.state, &c.conn, &k1, 0, 4096, "a revoked key");
    c.state.bridge.write(&c2, c.state.reg.as_ref().unwrap(), 0, 4096, &k2, 0).unwrap();
    s.state.bridge.check_key(&k2).unwrap();
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_keys_on_one_connection_share_one_close_hook_and_die_with_the_connection() {
    let len = 65_536usize;
    let (c, s, _k) = pair(Policy::default().require(Strategy::Odp), len);
    let (c2, s2) = connect(&c.pd, &s.pd);
    let reg = s.state.reg.as_ref().unwrap();
    let before = s2.close_hooks();
    let keys: Vec<RemoteKey> = (0..16u64)
        .map(|i| {
            let k = s.state.bridge.hand_out(&s2, reg, i * 4096, 4096).unwrap();
            if i % 2 == 0 {
                s.state.bridge.revoke_key(&k).unwrap();
            }
            k
        })
        .collect();
    assert_eq!(s2.close_hooks(), before + 1, "one close hook per connection, not one per key");
    c.state.mem.copy_to_device(c.state.buf.as_ref().unwrap(), 0, &pattern(4096, 0x6d)).unwrap();
    c.state.bridge.write(&c2, c.state.reg.as_ref().unwrap(), 0, 4096, &keys[1], 0).unwrap();
    assert!(s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap()[4096..8192] == pattern(4096, 0x6d)[..]);
    // Closing the connection revokes every key still bound on it (its windows go before its QP).
    drop(s2);
    for k in &keys {
        assert!(matches!(s.state.bridge.check_key(k), Err(Error::StaleKey { .. })), "{k:?} outlived its connection");
    }
    drop(c2);
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_without_windows_a_free_deregisters_at_once_and_the_old_key_is_refused() {
    let len = 65_536usize;
    let (c, s) = fabric()
        .connect_pair(
            opts(),
            move |pd| Ok((side(pd, Policy::default().require(Strategy::PinnedHost), len, Some(0x11))?, Vec::new())),
            move |pd| {
                let mem = HostBackend::new();
                let opts = BridgeOptions { windows: false, ..Default::default() };
                let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], opts)?;
                let buf = mem.alloc(len)?;
                let reg = bridge.register(buf.addr(), len as u64, AccessFlags::remote_rw())?;
                Ok((Host { bridge, mem, buf: Some(buf), reg: Some(reg) }, Vec::new()))
            },
        )
        .unwrap();
    let mut srv = s.state;
    assert_eq!(
        srv.bridge.key_windows(),
        p2pbridge::strategy::Support::no(p2pbridge::strategy::Reason::DisabledByOption {
            option: "BridgeOptions::windows"
        }),
        "keys are the region's rkey, and the bridge says why"
    );
    let key = srv.bridge.hand_out(&s.conn, srv.reg.as_ref().unwrap(), 0, len as u64).unwrap();
    c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, 4096, &key, 0).unwrap();
    let held = srv.reg.take().unwrap();
    drop(srv.buf.take());
    assert!(!held.is_live(), "the handle outlived the free");
    assert_write_refused(&c.state, &c.conn, &key, 0, 4096, "no windows, after the free");
}

/// Without windows, a key handed out for part of a registration, or with fewer rights than the
/// cached registration holds, reaches exactly that part with exactly those rights (a region
/// of its own), and can be revoked alone.
#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_without_windows_a_key_reaches_only_its_range_with_only_its_rights() {
    let len = 65_536usize;
    let (c, s) = fabric()
        .connect_pair(
            opts(),
            move |pd| Ok((side(pd, Policy::default().require(Strategy::PinnedHost), len, Some(0x61))?, Vec::new())),
            move |pd| {
                let mem = HostBackend::new();
                let opts = BridgeOptions {
                    windows: false,
                    policy: Policy::default().require(Strategy::PinnedHost),
                    ..Default::default()
                };
                let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], opts)?;
                let buf = mem.alloc(len)?;
                let reg = bridge.register(buf.addr(), len as u64, AccessFlags::remote_rw())?;
                Ok((Host { bridge, mem, buf: Some(buf), reg: Some(reg) }, Vec::new()))
            },
        )
        .unwrap();
    let srv = &s.state;
    let (sreg, base) = (srv.reg.as_ref().unwrap(), srv.buf.as_ref().unwrap().addr());
    let zeros = || srv.mem.to_vec(srv.buf.as_ref().unwrap()).unwrap();
    // Part of it: 4096..8192.
    let part = srv.bridge.hand_out(&s.conn, sreg, 4096, 4096).unwrap();
    c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, 4096, &part, 0).unwrap();
    assert!(zeros()[4096..8192] == pattern(len, 0x61)[..4096]);
    // The same rkey claimed over the whole buffer: the NIC refuses what lies outside the part.
    let forged = RemoteKey { addr: base, len: len as u64, ..part };
    let (c2, _s2) = connect(&c.pd, &s.pd);
    assert_write_refused(&c.state, &c2, &forged, 0, 4096, "a part's key used outside the part");
    assert!(zeros()[..4096].iter().all(|&b| b == 0), "the WRITE outside the part landed");
    // Fewer rights than the cached registration: a write-only handle's key cannot be read.
    let wonly = srv.bridge.register(base, len as u64, AccessFlags::REMOTE_WRITE).unwrap();
    assert_eq!(wonly.generation(), sreg.generation(), "the write-only handle is a hit of the same registration");
    let wkey = srv.bridge.hand_out(&s.conn, &wonly, 0, len as u64).unwrap();
    let (c3, _s3) = connect(&c.pd, &s.pd);
    assert_read_refused(&c.state, &c3, &wkey, 4096, "a READ with a write-only key");
    // Revoked alone: the part's key is refused, the whole registration's still works.
    srv.bridge.revoke_key(&part).unwrap();
    let (c4, _s4) = connect(&c.pd, &s.pd);
    assert_write_refused(&c.state, &c4, &part, 0, 4096, "a revoked part's key");
    assert!(matches!(srv.bridge.check_key(&part), Err(Error::StaleKey { .. })));
    let whole = srv.bridge.hand_out(&s.conn, sreg, 0, len as u64).unwrap();
    let (c5, _s5) = connect(&c.pd, &s.pd);
    c.state.bridge.write(&c5, c.state.reg.as_ref().unwrap(), 0, 4096, &whole, 8192).unwrap();
    // Even a key over the whole registration is a region of its own: revoked alone.
    srv.bridge.revoke_key(&whole).unwrap();
    let (c6, _s6) = connect(&c.pd, &s.pd);
    assert_write_refused(&c.state, &c6, &whole, 0, 4096, "a revoked whole key");
    assert!(sreg.is_live(), "revoking a key leaves its registration live");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_bad_ranges_get_typed_errors_never_panics() {
    let len = 65_536usize;
    let (c, s, key) = pair(Policy::default().require(Strategy::PinnedHost), len);
    let (b, reg, buf) = (&s.state.bridge, s.state.reg.as_ref().unwrap(), s.state.buf.as_ref().unwrap());
    let base = buf.addr();
    let edges = [0, 1, 4095, 4096, len as u64 - 1, len as u64, len as u64 + 1, u64::MAX / 2, u64::MAX - 10, u64::MAX];
    let addrs = [0, 1, base - 1, base, base + 1, base + len as u64 - 1, base + len as u64, u64::MAX - 10, u64::MAX];
    for &a in &addrs {
        for &l in &edges {
            let fits = l > 0 && a >= base && a.checked_add(l).is_some_and(|e| e <= base + len as u64);
            match b.register(a, l, AccessFlags::remote_rw()) {
                Ok(r) => assert!(fits, "register({a:#x}, {l}) accepted memory outside the buffer: {r:?}"),
                Err(e) => assert!(!fits, "register({a:#x}, {l}) of buffer memory failed: {e}"),
            }
            if l == 0 || a.checked_add(l).is_none() {
                assert!(
                    // SAFETY: these ranges are empty or wrap: refused before anything is touched.
                    unsafe { b.register_host(a, l, AccessFlags::remote_rw()) }.is_err(),
                    "register_host({a:#x}, {l})"
                );
                assert!(b.report_free(a, l).is_err(), "report_free({a:#x}, {l})");
            }
        }
    }
    for &o in &edges {
        for &l in &edges {
            let fits = o.checked_add(l).is_some_and(|e| e <= len as u64);
            if !(fits && l > 0) {
                assert!(b.hand_out(&s.conn, reg, o, l).is_err(), "hand_out({o}, {l})");
            }
            if !fits {
                let creg = c.state.reg.as_ref().unwrap();
                assert!(c.state.bridge.write(&c.conn, creg, o, l, &key, 0).is_err(), "write at {o}+{l}");
                assert!(
                    c.state.bridge.read(&c.conn, creg, 0, l.min(16), &key, o).is_err() || o < len as u64,
                    "read at {o}"
                );
                assert!(s.state.bridge.recv(&s.conn, reg, o, l, Duration::from_millis(1)).is_err(), "recv at {o}+{l}");
            }
        }
    }
    let wrapping = b.invalidate_host(u64::MAX - 10, 100);
    assert!(matches!(wrapping, Err(Error::InvalidArgument(_))), "{wrapping:?}");
    // Nothing above was posted: the connection still works.
    c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, 4096, &key, 0).unwrap();
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_each_strategy_rxe_supports_moves_data_between_hosts() {
    for strategy in [Strategy::PinnedHost, Strategy::Odp, Strategy::Bounce] {
        for len in [4096usize, 1 << 20] {
            let (c, s, key) = pair(Policy::default().require(strategy), len);
            let (creg, sreg) = (c.state.reg.as_ref().unwrap(), s.state.reg.as_ref().unwrap());
            assert_eq!(creg.strategy(), strategy);
            assert_eq!(sreg.strategy(), strategy);
            // Write the client's pattern into the server's buffer.
            c.state.bridge.write(&c.conn, creg, 0, len as u64, &key, 0).unwrap();
            s.state.bridge.sync_from_peers(sreg).unwrap();
            let server_bytes = s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap();
            assert!(
                server_bytes == pattern(len, 0x42).as_slice(),
                "{strategy}: server memory differs after WRITE of {len} B"
            );
            // The server changes its buffer; the client reads it back over its own.
            s.state.mem.copy_to_device(s.state.buf.as_ref().unwrap(), 0, &pattern(len, 0x17)).unwrap();
            s.state.bridge.sync_to_peers(sreg).unwrap();
            c.state.bridge.read(&c.conn, creg, 0, len as u64, &key, 0).unwrap();
            let client_bytes = c.state.mem.to_vec(c.state.buf.as_ref().unwrap()).unwrap();
            assert!(client_bytes == pattern(len, 0x17).as_slice(), "{strategy}: READ of {len} B brought other bytes");
            // SEND/RECV: the client sends its buffer (now the 0x17 pattern, changed here) back.
            c.state.mem.copy_to_device(c.state.buf.as_ref().unwrap(), 0, &pattern(len, 0x23)).unwrap();
            let (sb, cb) = (s.state.bridge.clone(), c.state.bridge.clone());
            std::thread::scope(|scope| {
                let rx = scope.spawn(|| sb.recv(&s.conn, sreg, 0, len as u64, Duration::from_secs(30)));
                cb.send(&c.conn, creg, 0, len as u64, Some(7)).unwrap();
                assert_eq!(rx.join().unwrap().unwrap(), (len as u32, Some(7)));
            });
            let server_bytes = s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap();
            assert!(server_bytes == pattern(len, 0x23).as_slice(), "{strategy}: SEND of {len} B arrived changed");
        }
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_dmabuf_and_peermem_are_skipped_with_the_probes_reasons() {
    let fab = fabric();
    let a = fab.a.clone();
    std::thread::spawn(move || {
        a.enter().unwrap();
        let pd = p2pbridge::verbs::ProtectionDomain::new(&p2pbridge::verbs::Context::open(&a.device).unwrap()).unwrap();
        let mem = HostBackend::new();
        let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default()).unwrap();
        // Host-backend memory on rxe: dma-buf is refused by the device's probe, ODP is used.
        let buf = mem.alloc(65_536).unwrap();
        let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw()).unwrap();
        assert_eq!(reg.strategy(), Strategy::Odp, "{:?}", reg.skipped());
        let dmabuf = reg.skipped().iter().find(|(s, _)| *s == Strategy::DmaBuf).expect("dma-buf has a reason");
        match &dmabuf.1 {
            SkipReason::Unsupported(u) => match u.reason() {
                p2pbridge::strategy::Reason::DmaBufMrRefused { device, errno } => {
                    assert_eq!((device.as_str(), errno.name()), (a.device.as_str(), "EOPNOTSUPP"), "{u}")
                }
                other => panic!("dma-buf skipped for {other:?}"),
            },
            other => panic!("dma-buf skipped for {other:?}"),
        }
        assert_eq!(dmabuf.1, SkipReason::Unsupported(bridge.caps().nic.dmabuf_mr.unsupported().unwrap().clone()));
        assert!(reg.skipped().contains(&(
            Strategy::PeerMem,
            SkipReason::NotForThisMemory { applies_to: p2pbridge::strategy::AppliesTo::DeviceMemory }
        )));
        // What device memory would get on this host: the same probe, no peer-memory module.
        let p =
            plan(MemoryKind::Backend(BackendKind::Cuda), OdpTransportCaps::WRITE, &Policy::default(), bridge.caps());
        assert_eq!(p.candidates, vec![Strategy::Bounce]);
        assert!(
            p.skipped.iter().any(|(s, r)| *s == Strategy::PeerMem
                && matches!(r, SkipReason::Unsupported(u)
                    if matches!(u.reason(), p2pbridge::strategy::Reason::PeerMemMissing { .. }))),
            "{:?}",
            p.skipped
        );
        // Requiring dma-buf fails with every reason listed.
        let strict = Bridge::new(
            &pd,
            vec![Arc::new(mem.clone())],
            BridgeOptions { policy: Policy::default().require(Strategy::DmaBuf), ..Default::default() },
        )
        .unwrap();
        let buf2 = mem.alloc(4096).unwrap();
        match strict.register(buf2.addr(), 4096, AccessFlags::remote_rw()) {
            Err(Error::NoStrategy(reasons)) => {
                assert!(reasons.iter().any(|(s, _)| *s == Strategy::DmaBuf));
                assert!(reasons.contains(&(Strategy::PinnedHost, SkipReason::NotRequired)));
            }
            other => panic!("expected NoStrategy, got {other:?}"),
        }
    })
    .join()
    .unwrap();
}

fn kernel_mr_count(device: &str) -> usize {
    p2pbridge_test_support::fabric::kernel_count(device, "mr").unwrap()
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_eight_threads_register_look_up_and_free_without_leaks_or_deadlock() {
    let fab = fabric();
    let a = fab.a.clone();
    let before = kernel_mr_count(&a.device);
    std::thread::spawn(move || {
        a.enter().unwrap();
        let pd = p2pbridge::verbs::ProtectionDomain::new(&p2pbridge::verbs::Context::open(&a.device).unwrap()).unwrap();
        let mem = HostBackend::new();
        let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default()).unwrap();
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (bridge, mem) = (bridge.clone(), mem.clone());
                std::thread::spawn(move || {
                    let mut rng = t * 7919 + 1;
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    for _ in 0..200 {
                        let buf = mem.alloc(((next() % 16 + 1) * 4096) as usize).unwrap();
                        let mut held = Vec::new();
                        for _ in 0..4 {
                            let off = next() % buf.len();
                            let len = 1 + next() % (buf.len() - off);
                            held.push(bridge.register(buf.addr() + off, len, AccessFlags::remote_rw()).unwrap());
                        }
                        // A registration held by another thread across the free: the free
                        // revokes it (no waiting for the handle), and the handle is dead after.
                        let keep = held.pop().unwrap();
                        let (tx, rx) = std::sync::mpsc::channel::<()>();
                        let holder = std::thread::spawn(move || {
                            rx.recv().unwrap();
                            assert!(!keep.is_live(), "a handle outlived its memory's free and is still live");
                        });
                        drop(held);
                        drop(buf); // notices: revoke (keys, then regions), ack, unmap
                        tx.send(()).unwrap();
                        holder.join().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(bridge.cache_usage().0, 0, "entries left in the cache after every buffer was freed");
    })
    .join()
    .unwrap();
    assert_eq!(p2pbridge::live_registrations(), 0, "registrations leaked");
    assert_eq!(kernel_mr_count(&fab.a.device), before, "the kernel still has MRs of ours");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_pipelined_bounce_engine_moves_odd_sizes_through_a_small_ring() {
    let len = (16 << 20) + 4097;
    let (c, s, key) = pair(Policy::default().require(Strategy::PinnedHost), len);
    let cfg = p2pbridge::BounceConfig { chunk: 256 << 10, ring: 3, ..Default::default() };
    let mut engine = p2pbridge::BounceEngine::new(&c.pd, Arc::new(c.state.mem.clone()), cfg).unwrap();
    let cbuf = c.state.buf.as_ref().unwrap();
    for (n, seed) in [(1u64, 1u8), (4095, 2), ((1 << 20) + 7, 3), (len as u64, 4)] {
        c.state.mem.copy_to_device(cbuf, 0, &pattern(n as usize, seed)).unwrap();
        // SAFETY: `cbuf` is the client backend's live buffer, held for the whole call.
        unsafe { engine.write(&c.conn, cbuf.addr(), n, &key, 0) }.unwrap();
        let server = s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap();
        assert!(&server[..n as usize] == pattern(n as usize, seed).as_slice(), "bounce WRITE of {n} B");
        // Read it back into the other half of nothing: zero the client buffer first.
        c.state.mem.copy_to_device(cbuf, 0, &vec![0u8; n as usize]).unwrap();
        // SAFETY: as above.
        unsafe { engine.read(&c.conn, cbuf.addr(), n, &key, 0) }.unwrap();
        let back = c.state.mem.to_vec(cbuf).unwrap();
        assert!(&back[..n as usize] == pattern(n as usize, seed).as_slice(), "bounce READ of {n} B");
    }
    // Out of the remote key's range: refused by the key's own bounds check, before anything is
    // posted (exactly that refusal: 16 B at the key's end, against its length)...
    // SAFETY: as above.
    let e = unsafe { engine.write(&c.conn, cbuf.addr(), 16, &key, len as u64) };
    match e {
        Err(Error::Verbs(VerbsError::OutOfBounds { what: "remote buffer", offset, length: 16, len: of }))
            if offset == len as u64 && of == len as u64 => {}
        other => panic!("expected the remote key's bounds refusal (16 B at {len} of {len} B), got {other:?}"),
    }
    // ...so the queue pair is untouched: still ready to send, nothing of the refused transfer on
    // its completion queue, and the same connection carries the next transfer.
    assert_eq!(c.conn.qp().state().unwrap(), p2pbridge::verbs::QpState::Rts);
    let mut left = [p2pbridge::verbs::WorkCompletion::default(); 16];
    assert_eq!(c.conn.send_cq().poll(&mut left).unwrap(), 0, "completions of a refused transfer: {:?}", &left[..]);
    // (The whole client buffer changes, so that a WRITE of more than its 4096 B would show.)
    c.state.mem.copy_to_device(cbuf, 0, &pattern(len, 9)).unwrap();
    // SAFETY: as above.
    unsafe { engine.write(&c.conn, cbuf.addr(), 4096, &key, 0) }.unwrap();
    let server = s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap();
    assert!(server[..4096] == pattern(4096, 9)[..], "the WRITE after the refusal, on the same connection");
    assert!(server[4096..len] == pattern(len, 4)[4096..], "the WRITE after the refusal went beyond its 4096 B");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_bounce_engine_failing_mid_transfer_reaps_every_chunk_before_it_returns() {
    let len = 1 << 20;
    let (c, s, key) = pair(Policy::default().require(Strategy::PinnedHost), len);
    let cfg = p2pbridge::BounceConfig { chunk: 64 << 10, ring: 4, ..Default::default() };
    let mut engine = p2pbridge::BounceEngine::new(&c.pd, Arc::new(c.state.mem.clone()), cfg).unwrap();
    let cbuf = c.state.buf.as_ref().unwrap();
    // A key that claims more than the peer granted: the chunks past the window fail at the
    // peer's NIC while the ring has others in flight behind them.
    let forged = RemoteKey { len: 4 * len as u64, ..key };
    // SAFETY: `cbuf` is the client backend's live buffer, held for the whole call.
    let e = unsafe { engine.write(&c.conn, cbuf.addr(), len as u64, &forged, len as u64 / 2) };
    assert!(matches!(e, Err(Error::Verbs(p2pbridge::verbs::Error::WorkCompletion { .. }))), "{e:?}");
    // Nothing of the transfer is left for anyone to find: every chunk was reaped or flushed.
    let mut left = [p2pbridge::verbs::WorkCompletion::default(); 16];
    assert_eq!(c.conn.send_cq().poll(&mut left).unwrap(), 0, "completions left behind: {:?}", &left[..]);
    assert_eq!(c.conn.qp().state().unwrap(), p2pbridge::verbs::QpState::Error);
    // The engine's slots are free again: the next transfer, on a new connection, moves data.
    let (cc, sc) = connect(&c.pd, &s.pd);
    let key2 = s.state.bridge.hand_out(&sc, s.state.reg.as_ref().unwrap(), 0, len as u64).unwrap();
    c.state.mem.copy_to_device(cbuf, 0, &pattern(len, 0x3c)).unwrap();
    // SAFETY: as above.
    unsafe { engine.write(&cc, cbuf.addr(), len as u64, &key2, 0) }.unwrap();
    assert!(s.state.mem.to_vec(s.state.buf.as_ref().unwrap()).unwrap()[..len] == pattern(len, 0x3c)[..]);
}
