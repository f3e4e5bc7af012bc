//! The bridge on the Soft-RoCE fabric, through real libibverbs: strategies moving data,
//! skipped strategies with their reasons, use-after-free safety, concurrency.

use std::sync::Arc;
use std::time::Duration;

use p2pbridge::gpu::{BackendKind, DeviceBuffer, HostBackend, MemoryBackend};
use p2pbridge::strategy::plan;
use p2pbridge::verbs::fabric::{Side, SoftRoce};
use p2pbridge::verbs::{AccessFlags, ConnectionOptions, Error as VerbsError, OdpTransportCaps, WcStatus};
use p2pbridge::{Bridge, BridgeOptions, Error, MemoryKind, Policy, Registered, RemoteKey, SkipReason, Strategy};

fn fabric() -> SoftRoce {
    SoftRoce::from_env().expect("this test needs the Soft-RoCE fabric: run it through scripts/test or scripts/softroce")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(seed as u32 % 31) as u8 ^ seed).collect()
}

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
) -> p2pbridge::verbs::Result<Host> {
    let mem = HostBackend::new();
    let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], BridgeOptions { policy, ..Default::default() })
        .map_err(|e| p2pbridge::verbs::Error::InvalidArgument(e.to_string()))?;
    let buf = mem.alloc(len).map_err(|e| p2pbridge::verbs::Error::InvalidArgument(e.to_string()))?;
    if let Some(seed) = fill {
        mem.copy_to_device(&buf, 0, &pattern(len, seed))
            .map_err(|e| p2pbridge::verbs::Error::InvalidArgument(e.to_string()))?;
    }
    let reg = bridge
        .register(buf.addr(), len as u64, AccessFlags::remote_rw())
        .map_err(|e| p2pbridge::verbs::Error::InvalidArgument(e.to_string()))?;
    Ok(Host { bridge, mem, buf: Some(buf), reg: Some(reg) })
}

fn pair(policy: Policy, len: usize) -> (Side<Host>, Side<Host>) {
    fabric()
        .connect_pair(
            ConnectionOptions { timeout: Duration::from_secs(30), ..Default::default() },
            move |pd| Ok((side(pd, policy, len, Some(0x42))?, Vec::new())),
            move |pd| {
                let h = side(pd, policy, len, None)?;
                let key = h
                    .bridge
                    .hand_out(h.reg.as_ref().unwrap(), 0..len as u64)
                    .map_err(|e| p2pbridge::verbs::Error::InvalidArgument(e.to_string()))?;
                Ok((h, key.to_bytes().to_vec()))
            },
        )
        .unwrap_or_else(|e| panic!("connection set-up failed: {e}"))
}

/// A server side over plain host memory: an anonymous mapping registered with
/// `register_host` (pinned) and its key handed out.
type HostVaServer = (Bridge, Registered, u64);
fn host_va_server(
    pd: &p2pbridge::verbs::ProtectionDomain,
    len: usize,
) -> p2pbridge::verbs::Result<(HostVaServer, Vec<u8>)> {
    let err = |e: Error| p2pbridge::verbs::Error::InvalidArgument(e.to_string());
    let bridge = Bridge::new(
        pd,
        vec![],
        BridgeOptions { policy: Policy::default().require(Strategy::PinnedHost), ..Default::default() },
    )
    .map_err(err)?;
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap() as u64;
    // SAFETY: mapped; the tests invalidate (or the monitor sees the munmap) before reuse.
    let reg = unsafe { bridge.register_host(p, len as u64, AccessFlags::remote_rw()) }.map_err(err)?;
    let key = bridge.hand_out(&reg, 0..len as u64).map_err(err)?;
    Ok(((bridge, reg, p), key.to_bytes().to_vec()))
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

/// The peer's write with `old_key` fails with a remote access error, the new memory at `p`
/// (0x77) is unchanged, and registering it anew gives a new generation.
fn assert_old_key_refused(c: &Side<Host>, bridge: &Bridge, old_key: &RemoteKey, p: u64, len: usize) {
    match c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, len as u64, old_key, 0) {
        Err(Error::Verbs(VerbsError::WorkCompletion { status: WcStatus::RemoteAccess, .. })) => {}
        other => panic!("a write with the old key should fail with a remote access error, got {other:?}"),
    }
    // SAFETY: the new mapping is the test's and live.
    let now = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
    assert!(now.iter().all(|&b| b == 0x77), "the new memory was changed through the old key");
    // SAFETY: the new memory is mapped; the test invalidates or unmaps it afterwards.
    let again = unsafe { bridge.register_host(p, len as u64, AccessFlags::remote_rw()) }.unwrap();
    assert_ne!(again.generation(), old_key.generation, "a fresh registration must have a new generation");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_each_strategy_rxe_supports_moves_data_between_hosts() {
    for strategy in [Strategy::PinnedHost, Strategy::Odp, Strategy::Bounce] {
        for len in [4096usize, 1 << 20] {
            let (c, s) = pair(Policy::default().require(strategy), len);
            let (creg, sreg) = (c.state.reg.as_ref().unwrap(), s.state.reg.as_ref().unwrap());
            assert_eq!(creg.strategy(), strategy);
            assert_eq!(sreg.strategy(), strategy);
            let key = RemoteKey::from_bytes(c.conn.remote_private_data()).unwrap();
            // Write the client's pattern into the server's buffer.
            c.state.bridge.write(&c.conn, creg, 0, len as u64, &key, 0).unwrap();
            s.state.bridge.flush(sreg).unwrap();
            let server_bytes = s.state.mem.as_slice(s.state.buf.as_ref().unwrap()).unwrap();
            assert!(
                server_bytes == pattern(len, 0x42).as_slice(),
                "{strategy}: server memory differs after WRITE of {len} B"
            );
            // The server changes its buffer; the client reads it back over its own.
            s.state.mem.copy_to_device(s.state.buf.as_ref().unwrap(), 0, &pattern(len, 0x17)).unwrap();
            s.state.bridge.publish(sreg).unwrap();
            c.state.bridge.read(&c.conn, creg, 0, len as u64, &key, 0).unwrap();
            let client_bytes = c.state.mem.as_slice(c.state.buf.as_ref().unwrap()).unwrap();
            assert!(client_bytes == pattern(len, 0x17).as_slice(), "{strategy}: READ of {len} B brought other bytes");
            // SEND/RECV: the client sends its buffer (now the 0x17 pattern, changed here) back.
            c.state.mem.copy_to_device(c.state.buf.as_ref().unwrap(), 0, &pattern(len, 0x23)).unwrap();
            let (sb, cb) = (s.state.bridge.clone(), c.state.bridge.clone());
            std::thread::scope(|scope| {
                let rx = scope.spawn(|| sb.recv(&s.conn, sreg, 0, len as u64, Duration::from_secs(30)));
                std::thread::sleep(Duration::from_millis(50)); // let the receive be posted first
                cb.send(&c.conn, creg, 0, len as u64, Some(7)).unwrap();
                assert_eq!(rx.join().unwrap().unwrap(), (len as u32, Some(7)));
            });
            let server_bytes = s.state.mem.as_slice(s.state.buf.as_ref().unwrap()).unwrap();
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
            SkipReason::CapabilityAbsent { capability, .. } => {
                assert!(capability.contains("EOPNOTSUPP") && capability.contains(&a.device), "{capability}")
            }
            other => panic!("dma-buf skipped for {other:?}"),
        }
        assert!(reg
            .skipped()
            .contains(&(Strategy::PeerMem, SkipReason::NotForThisMemory { applies_to: "device memory" })));
        // What device memory would get on this host: the same probe, no peer-memory module.
        let p =
            plan(MemoryKind::Backend(BackendKind::Cuda), OdpTransportCaps::WRITE, &Policy::default(), bridge.caps());
        assert_eq!(p.candidates, vec![Strategy::Bounce]);
        assert!(
            p.skipped.iter().any(|(s, r)| *s == Strategy::PeerMem && matches!(r, SkipReason::ModuleMissing { .. })),
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

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_freed_buffer_is_unreachable_through_its_old_key() {
    let len = 65_536usize;
    let (c, mut s) = pair(Policy::default().require(Strategy::PinnedHost), len);
    let old_key = RemoteKey::from_bytes(c.conn.remote_private_data()).unwrap();
    s.state.bridge.check_key(&old_key).unwrap();
    let old_addr = s.state.buf.as_ref().unwrap().addr();
    // The server frees its buffer: the backend's notice deregisters first.
    drop(s.state.reg.take());
    drop(s.state.buf.take());
    assert!(matches!(s.state.bridge.check_key(&old_key), Err(Error::StaleKey { .. })));
    // New memory, quite possibly at the same address, with other contents.
    let mut fresh = Vec::new();
    let new = loop {
        let b = s.state.mem.alloc(len).unwrap();
        if b.addr() == old_addr || fresh.len() == 8 {
            break b;
        }
        fresh.push(b);
    };
    s.state.mem.copy_to_device(&new, 0, &pattern(len, 0x99)).unwrap();
    let new_reg = s.state.bridge.register(new.addr(), len as u64, AccessFlags::remote_rw()).unwrap();
    assert_ne!(new_reg.generation(), old_key.generation, "a new registration must have a new generation");
    // The peer writes with the old key: the NIC refuses it, the new memory is unchanged.
    match c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, len as u64, &old_key, 0) {
        Err(Error::Verbs(VerbsError::WorkCompletion { status: WcStatus::RemoteAccess, .. })) => {}
        other => panic!("a write with the freed buffer's key should fail with a remote access error, got {other:?}"),
    }
    assert!(s.state.mem.as_slice(&new).unwrap() == pattern(len, 0x99).as_slice(), "new memory was changed");
    eprintln!("same address reused: {}", new.addr() == old_addr);
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_remapped_host_memory_is_unreachable_after_invalidate_host() {
    let len = 65_536usize;
    let fab = fabric();
    let (c, s) = fab
        .connect_pair(
            ConnectionOptions::default(),
            move |pd| Ok((side(pd, Policy::default().require(Strategy::PinnedHost), len, Some(1))?, Vec::new())),
            move |pd| host_va_server(pd, len),
        )
        .unwrap();
    let old_key = RemoteKey::from_bytes(c.conn.remote_private_data()).unwrap();
    let (bridge, reg, p) = s.state;
    drop(reg);
    // What a munmap hook (or the planned userfaultfd monitor) does: invalidate, then unmap.
    assert_eq!(bridge.invalidate_host(p..p + len as u64).unwrap(), 1);
    replace_mapping(p, len);
    assert!(matches!(bridge.check_key(&old_key), Err(Error::StaleKey { .. })));
    assert_old_key_refused(&c, &bridge, &old_key, p, len);
    bridge.invalidate_host(p..p + len as u64).unwrap();
    // SAFETY: ours, unregistered.
    unsafe { rustix::mm::munmap(p as *mut _, len).unwrap() };
}

fn kernel_mr_count(device: &str) -> usize {
    let out = std::process::Command::new("rdma").args(["resource", "show"]).output().expect("rdma (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.contains(&format!("{device}:"))).unwrap_or_else(|| panic!("no {device} in {text}"));
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mr" {
            return words.next().and_then(|n| n.parse().ok()).expect("an mr count");
        }
    }
    panic!("no mr count in {line}")
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
                        // A registration held by another thread across the free: the free waits.
                        let keep = held.pop().unwrap();
                        let releaser = std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_micros(200));
                            drop(keep);
                        });
                        drop(held);
                        drop(buf); // notices: invalidate, wait for `keep`, deregister, unmap
                        releaser.join().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(bridge.cache().usage().0, 0, "entries left in the cache after every buffer was freed");
    })
    .join()
    .unwrap();
    assert_eq!(p2pbridge::live_registrations(), 0, "registrations leaked");
    assert_eq!(kernel_mr_count(&fab.a.device), before, "the kernel still has MRs of ours");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_munmapped_host_buffer_is_unreachable_through_its_old_key() {
    let len = 65_536usize;
    let (c, s) = fabric()
        .connect_pair(
            ConnectionOptions::default(),
            move |pd| Ok((side(pd, Policy::default().require(Strategy::PinnedHost), len, Some(3))?, Vec::new())),
            move |pd| host_va_server(pd, len),
        )
        .unwrap();
    let (bridge, reg, p) = s.state;
    bridge.host_monitor().expect("the userfaultfd monitor runs in the guest");
    let old_key = RemoteKey::from_bytes(c.conn.remote_private_data()).unwrap();
    // A write through the key works while the memory is there.
    c.state.bridge.write(&c.conn, c.state.reg.as_ref().unwrap(), 0, 64, &old_key, 0).unwrap();
    drop(reg);
    // The application unmaps the buffer and maps new memory at the same address; nobody tells
    // the bridge — the monitor sees the munmap.
    replace_mapping(p, len);
    // The monitor's event is processed asynchronously: wait (bounded) for the key to go stale.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bridge.check_key(&old_key).is_ok() {
        assert!(std::time::Instant::now() < deadline, "the monitor did not drop the unmapped buffer's registration");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_old_key_refused(&c, &bridge, &old_key, p, len);
    // SAFETY: ours; the monitor drops the registration.
    unsafe { rustix::mm::munmap(p as *mut _, len).unwrap() };
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_pipelined_bounce_engine_moves_odd_sizes_through_a_small_ring() {
    let len = (16 << 20) + 4097;
    let (c, s) = pair(Policy::default().require(Strategy::PinnedHost), len);
    let key = RemoteKey::from_bytes(c.conn.remote_private_data()).unwrap();
    let cfg = p2pbridge::BounceConfig { chunk: 256 << 10, ring: 3, ..Default::default() };
    let engine = p2pbridge::BounceEngine::new(&c.pd, Arc::new(c.state.mem.clone()), cfg).unwrap();
    let cbuf = c.state.buf.as_ref().unwrap();
    for (n, seed) in [(1u64, 1u8), (4095, 2), ((1 << 20) + 7, 3), (len as u64, 4)] {
        c.state.mem.copy_to_device(cbuf, 0, &pattern(n as usize, seed)).unwrap();
        // SAFETY: `cbuf` is the client backend's live buffer, held for the whole call.
        unsafe { engine.write(&c.conn, cbuf.addr(), n, &key, 0) }.unwrap();
        let server = s.state.mem.as_slice(s.state.buf.as_ref().unwrap()).unwrap();
        assert!(&server[..n as usize] == pattern(n as usize, seed).as_slice(), "bounce WRITE of {n} B");
        // Read it back into the other half of nothing: zero the client buffer first.
        c.state.mem.copy_to_device(cbuf, 0, &vec![0u8; n as usize]).unwrap();
        // SAFETY: as above.
        unsafe { engine.read(&c.conn, cbuf.addr(), n, &key, 0) }.unwrap();
        let back = c.state.mem.as_slice(cbuf).unwrap();
        assert!(&back[..n as usize] == pattern(n as usize, seed).as_slice(), "bounce READ of {n} B");
    }
    // Out of the remote key's range: refused before anything is posted.
    // SAFETY: as above.
    let e = unsafe { engine.write(&c.conn, cbuf.addr(), 16, &key, len as u64) };
    assert!(matches!(e, Err(Error::Verbs(_)) | Err(Error::OutOfBounds { .. })), "{e:?}");
}
