//! What goes wrong, on real rxe: typed errors, QPs in error, no panic, no hang.

mod common;

use p2pbridge_test_support::fabric::kernel_count;

use common::{connect_pair, pattern, TIMEOUT};
use p2pbridge_verbs::{
    AccessFlags, Connection, ConnectionOptions, Context, DmaBufSupport, Error, GidKind, HostBuffer, LinkLayer,
    MemoryRegion, PortState, ProtectionDomain, QpState, RemoteBuf, SendFlags, WcStatus,
};

type Pair = (common::Side<MemoryRegion<HostBuffer>>, common::Side<MemoryRegion<HostBuffer>>);

const LEN: usize = 4096;
/// The client's source buffer holds `pattern(LEN, CLIENT)`; the server's buffer starts as
/// `pattern(LEN, SERVER)`: a stray or partial write of the client's bytes would show.
const CLIENT: u8 = 0x5c;
const SERVER: u8 = 0xa3;

/// A `LEN`-byte host buffer holding `pattern(LEN, seed)`.
fn filled(seed: u8) -> p2pbridge_verbs::Result<HostBuffer> {
    let mut buf = HostBuffer::new(LEN)?;
    buf.as_mut_slice().copy_from_slice(&pattern(LEN, seed));
    Ok(buf)
}

fn pair(server_access: AccessFlags) -> Pair {
    connect_pair(
        ConnectionOptions::default(),
        |pd| Ok((pd.register(filled(CLIENT)?, AccessFlags::LOCAL_WRITE)?, Vec::new())),
        move |pd| {
            let mr = pd.register(filled(SERVER)?, server_access)?;
            let d = mr.remote().to_bytes().to_vec();
            Ok((mr, d))
        },
    )
}

/// Asserts that the server's buffer still holds what it started with: nothing of the client's
/// refused `what` reached it.
fn assert_server_unchanged(server: &common::Side<MemoryRegion<HostBuffer>>, what: &str) {
    assert!(server.state.to_vec() == pattern(LEN, SERVER), "{what} changed the server's memory");
}

/// Posts one signaled WRITE to `remote` and returns its completion error; checks the QP is in
/// error afterwards and that the next request is flushed, not hung.
fn write_fails_with(client: &common::Side<MemoryRegion<HostBuffer>>, remote: RemoteBuf, len: u64) -> WcStatus {
    let qp = client.conn.qp();
    let local = client.state.slice(0..len).unwrap();
    let rs = remote.slice(0..len).unwrap();
    // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
    unsafe { qp.post_write(77, &local, &rs, SendFlags::SIGNALED) }.unwrap();
    let status = match client.conn.send_cq().wait_one(TIMEOUT) {
        Err(Error::WorkCompletion { status, wr_id, qp_num, .. }) => {
            assert_eq!(wr_id, 77);
            assert_eq!(qp_num, qp.qp_num());
            status
        }
        other => panic!("expected a failed completion, got {other:?}"),
    };
    assert_eq!(qp.state().unwrap(), QpState::Error, "the QP should be in the error state");
    // A request posted after the failure is flushed.
    // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
    let _ = unsafe { qp.post_write(78, &local, &rs, SendFlags::SIGNALED) };
    match client.conn.send_cq().wait_one(TIMEOUT) {
        Err(Error::WorkCompletion { status: WcStatus::WrFlush, wr_id: 78, .. }) => {}
        other => panic!("expected the next request flushed, got {other:?}"),
    }
    status
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn wrong_rkey_is_a_remote_access_error() {
    let (client, server) = pair(AccessFlags::remote_rw());
    let good = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    let bad = RemoteBuf { rkey: good.rkey ^ 0x5a5a_0000, ..good };
    assert_eq!(write_fails_with(&client, bad, 64), WcStatus::RemoteAccess);
    assert_server_unchanged(&server, "a write with a wrong rkey");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn out_of_bounds_remote_range_is_a_remote_access_error() {
    let (client, server) = pair(AccessFlags::remote_rw());
    let good = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    // Our own check refuses what the descriptor does not cover...
    assert!(matches!(good.slice(4000..4100), Err(Error::OutOfBounds { .. })));
    // ...and a peer that lies about the length is refused by the NIC.
    let lying = RemoteBuf { addr: good.addr + 4000, len: 4096, ..good };
    assert_eq!(write_fails_with(&client, lying, 200), WcStatus::RemoteAccess);
    assert_server_unchanged(&server, "a write past the region's end");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn write_to_a_region_without_remote_write_is_a_remote_access_error() {
    let (client, server) = pair(AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_READ);
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    assert_eq!(write_fails_with(&client, remote, 64), WcStatus::RemoteAccess);
    assert_server_unchanged(&server, "a write to a region without REMOTE_WRITE");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn local_misuse_is_refused_before_posting() {
    let (client, server) = pair(AccessFlags::remote_rw());
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    let qp = client.conn.qp();
    // Local range out of the MR.
    assert!(matches!(client.state.slice(4000..4097), Err(Error::OutOfBounds { .. })));
    // Lengths that differ.
    // SAFETY: refused before posting (asserted): nothing is outstanding.
    let e = unsafe {
        qp.post_write(1, &client.state.slice(0..10).unwrap(), &remote.slice(0..11).unwrap(), SendFlags::SIGNALED)
    };
    assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");
    // An MR of another PD (the server's) on the client's QP.
    // SAFETY: as above.
    let e = unsafe {
        qp.post_write(1, &server.state.slice(0..8).unwrap(), &remote.slice(0..8).unwrap(), SendFlags::SIGNALED)
    };
    assert!(matches!(e, Err(Error::InvalidArgument(ref m)) if m.contains("protection domain")), "{e:?}");
    // RDMA READ into memory without LOCAL_WRITE.
    let ro = client.pd.register(HostBuffer::new(64).unwrap(), AccessFlags::empty()).unwrap();
    // SAFETY: refused before posting (asserted): nothing is outstanding on `ro`.
    let e = unsafe { qp.post_read(1, &ro.slice(..).unwrap(), &remote.slice(0..64).unwrap(), SendFlags::SIGNALED) };
    assert!(matches!(e, Err(Error::InvalidArgument(ref m)) if m.contains("LOCAL_WRITE")), "{e:?}");
    // Inline beyond the QP's limit.
    let big = client.state.slice(0..4096).unwrap();
    // SAFETY: as above.
    let e = unsafe { qp.post_write(1, &big, &remote.slice(..).unwrap(), SendFlags::INLINE | SendFlags::SIGNALED) };
    assert!(matches!(e, Err(Error::InvalidArgument(ref m)) if m.contains("inline")), "{e:?}");
    // Nothing of the refused requests reached the server.
    assert_server_unchanged(&server, "a request refused before posting");
    // The QP is still usable after all that: the next WRITE lands.
    // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
    unsafe {
        qp.post_write(5, &client.state.slice(0..16).unwrap(), &remote.slice(0..16).unwrap(), SendFlags::SIGNALED)
    }
    .unwrap();
    assert_eq!(client.conn.send_cq().wait_one(TIMEOUT).unwrap().wr_id, 5);
    assert_eq!(qp.state().unwrap(), QpState::Rts);
    let (now, client_bytes, server_bytes) = (server.state.to_vec(), pattern(LEN, CLIENT), pattern(LEN, SERVER));
    assert!(now[..16] == client_bytes[..16] && now[16..] == server_bytes[16..], "the WRITE after the refusals");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn dmabuf_mr_on_rxe_is_a_clean_unsupported_error() {
    let fab = common::fabric();
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    match pd.dmabuf_support() {
        DmaBufSupport::Unsupported(errno) => {
            assert!(errno.0 == libc::EOPNOTSUPP || errno.0 == libc::EPROTONOSUPPORT, "{errno:?}")
        }
        DmaBufSupport::Supported => panic!("rxe is not expected to import dma-bufs"),
    }
    // A real fd (a memfd: rxe refuses before looking at it).
    let fd = rustix::fs::memfd_create("p2pb-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 65_536).unwrap();
    use std::os::fd::AsFd;
    // SAFETY: the registration is expected to fail; were it to succeed, the memfd outlives it.
    let r = unsafe { pd.register_dmabuf(fd.as_fd(), 0, 65_536, 0, AccessFlags::remote_rw()) };
    match r {
        Err(e @ Error::DmaBufUnsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("does not support dma-buf MRs"), "{msg}");
            assert!(msg.contains(&fab.a.device), "{msg}");
        }
        other => panic!("expected DmaBufUnsupported, got {other:?}"),
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn devices_ports_gids_and_caps_are_reported() {
    let fab = common::fabric();
    let names = p2pbridge_verbs::device_names().unwrap();
    assert!(names.contains(&fab.a.device) && names.contains(&fab.b.device), "{names:?}");
    let ctx = Context::open(&fab.a.device).unwrap();
    let caps = ctx.caps().unwrap();
    assert!(caps.max_mr_size >= 1 << 30, "{caps:?}");
    assert_eq!(caps.phys_port_cnt, 1);
    let port = ctx.port(1).unwrap();
    assert_eq!(port.state, PortState::Active);
    assert_eq!(port.link_layer, LinkLayer::Ethernet);
    assert!(port.active_mtu >= 1024, "{port:?}");
    // Relaxed ordering is an optional flag: accepted, and ignored where unsupported.
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let ro = pd.register(HostBuffer::new(8192).unwrap(), AccessFlags::remote_rw() | AccessFlags::RELAXED_ORDERING);
    assert!(ro.is_ok(), "{ro:?}");
    let gids = ctx.gids().unwrap();
    let std::net::IpAddr::V4(a4) = fab.a.addr else { panic!("fabric uses IPv4") };
    assert!(
        gids.iter().any(|g| g.kind == GidKind::RoceV2 && g.as_ipv6() == a4.to_ipv6_mapped()),
        "no RoCE v2 GID for {a4}: {gids:?}"
    );
    match Context::open("no-such-device") {
        Err(Error::NoSuchDevice { present, .. }) => assert!(present.contains(&fab.a.device)),
        other => panic!("expected NoSuchDevice, got {other:?}"),
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn connecting_where_nobody_listens_fails_without_hanging() {
    let fab = common::fabric();
    let a = fab.a.clone();
    let b_addr = fab.b.addr;
    let cqs_before = kernel_count(&a.device, "cq").unwrap();
    let r = std::thread::spawn(move || {
        a.enter().unwrap();
        let pd = ProtectionDomain::new(&Context::open(&a.device).unwrap()).unwrap();
        let opts = ConnectionOptions { timeout: std::time::Duration::from_secs(10), ..Default::default() };
        Connection::connect(&pd, (b_addr, 1).into(), &opts)
    })
    .join()
    .unwrap();
    match r {
        Err(Error::CmEvent { got, .. }) => assert!(got.contains("REJECTED") || got.contains("UNREACHABLE"), "{got}"),
        other => panic!("expected a rejected connection, got {other:?}"),
    }
    // The failed connection's CQs (made with its QP, before the peer refused) are gone too.
    assert_eq!(kernel_count(&fab.a.device, "cq").unwrap(), cqs_before, "a failed connect leaked its CQs");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn a_pd_of_the_wrong_device_is_refused_at_connect() {
    let fab = common::fabric();
    let (a, b_dev, b_addr) = (fab.a.clone(), fab.b.device.clone(), fab.b.addr);
    let r = std::thread::spawn(move || {
        a.enter().unwrap();
        // Host A's thread routes through rxe_a; a PD on host B's device cannot serve it.
        let pd = ProtectionDomain::new(&Context::open(&b_dev).unwrap()).unwrap();
        Connection::connect(&pd, (b_addr, 1).into(), &ConnectionOptions::default())
    })
    .join()
    .unwrap();
    assert!(matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("routed")), "{r:?}");
}
