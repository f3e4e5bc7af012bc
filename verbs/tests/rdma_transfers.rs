//! Data moved between the two Soft-RoCE hosts through real libibverbs, checked byte for byte.

mod common;

use common::{connect_pair, pattern, TIMEOUT};
use p2pbridge_verbs::{
    AccessFlags, ConnectionOptions, HostBuffer, MemoryRegion, OdpTransportCaps, RemoteBuf, SendFlags, WcOpcode,
};

const SIZES: &[usize] = &[1, 7, 4096, 65_536, 1 << 20, 64 << 20];

fn host_mr(
    pd: &p2pbridge_verbs::ProtectionDomain,
    len: usize,
    access: AccessFlags,
) -> p2pbridge_verbs::Result<MemoryRegion<HostBuffer>> {
    pd.register(HostBuffer::new(len)?, access)
}

/// Client WRITEs a pattern into the server's buffer, the server's memory is checked, then the
/// client READs it back into a second buffer.
fn write_then_read(size: usize, server_odp: bool, prefetch: bool) {
    let (client, server) = connect_pair(
        ConnectionOptions::default(),
        move |pd| {
            let src = host_mr(pd, size, AccessFlags::LOCAL_WRITE)?;
            src.bytes().copy_from(&pattern(size, 0x5a)[..]);
            let back = host_mr(pd, size, AccessFlags::LOCAL_WRITE)?;
            Ok(((src, back), Vec::new()))
        },
        move |pd| {
            let buf = HostBuffer::new(size)?;
            let mr = if server_odp {
                let mr = pd.register_odp(buf, AccessFlags::remote_rw())?;
                if prefetch {
                    mr.advise_prefetch(.., true)?;
                }
                mr
            } else {
                pd.register(buf, AccessFlags::remote_rw())?
            };
            let desc = mr.remote().to_bytes().to_vec();
            Ok((mr, desc))
        },
    );
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    assert_eq!(remote.len, size as u64);
    let (src, back) = &client.state;
    let qp = client.conn.qp();
    // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
    unsafe { qp.post_write(1, &src.slice(..).unwrap(), &remote.slice(..).unwrap(), SendFlags::SIGNALED) }.unwrap();
    let wc = client.conn.send_cq().wait_one(TIMEOUT).unwrap();
    assert_eq!((wc.wr_id, wc.opcode), (1, WcOpcode::RdmaWrite));
    assert!(server.state.to_vec() == src.to_vec(), "server buffer differs after RDMA WRITE of {size} B");

    // SAFETY: `back` is the client `Side`'s state, dropped after its connection (declared
    // first), whose queue pair's destruction ends the READ if it is not reaped here.
    unsafe { qp.post_read(2, &back.slice(..).unwrap(), &remote.slice(..).unwrap(), SendFlags::SIGNALED) }.unwrap();
    let wc = client.conn.send_cq().wait_one(TIMEOUT).unwrap();
    assert_eq!((wc.wr_id, wc.opcode), (2, WcOpcode::RdmaRead));
    assert!(back.to_vec() == src.to_vec(), "RDMA READ of {size} B brought back other bytes");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_write_and_read_round_trip_1b_to_64mib() {
    for &size in SIZES {
        write_then_read(size, false, false);
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_write_into_a_sub_range_leaves_the_rest_untouched() {
    let (client, server) = connect_pair(
        ConnectionOptions::default(),
        |pd| {
            let src = host_mr(pd, 100, AccessFlags::LOCAL_WRITE)?;
            src.bytes().copy_from(&[0xee_u8; 100][..]);
            Ok((src, Vec::new()))
        },
        |pd| {
            let mr = host_mr(pd, 4096, AccessFlags::remote_rw())?;
            let d = mr.remote().to_bytes().to_vec();
            Ok((mr, d))
        },
    );
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    let qp = client.conn.qp();
    // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
    unsafe {
        qp.post_write(9, &client.state.slice(10..50).unwrap(), &remote.slice(1000..1040).unwrap(), SendFlags::SIGNALED)
    }
    .unwrap();
    client.conn.send_cq().wait_one(TIMEOUT).unwrap();
    let s = server.state.to_vec();
    assert!(s[..1000].iter().all(|&b| b == 0));
    assert!(s[1000..1040].iter().all(|&b| b == 0xee));
    assert!(s[1040..].iter().all(|&b| b == 0));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn send_recv_with_and_without_immediate_1b_to_64mib() {
    for &size in SIZES {
        let (client, server) = connect_pair(
            ConnectionOptions::default(),
            move |pd| {
                let src = host_mr(pd, size, AccessFlags::LOCAL_WRITE)?;
                src.bytes().copy_from(&pattern(size, 0x33)[..]);
                Ok((src, Vec::new()))
            },
            move |pd| Ok((host_mr(pd, size, AccessFlags::LOCAL_WRITE)?, Vec::new())),
        );
        for (i, imm) in [None, Some(0xC0FFEE_u32)].into_iter().enumerate() {
            server.state.to_vec(); // (the buffer is checked after each receive below)
                                   // SAFETY: the server `Side`'s state, dropped after its connection (declared first).
            unsafe { server.conn.qp().post_recv(100 + i as u64, &server.state.slice(..).unwrap()) }.unwrap();
            // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
            unsafe { client.conn.qp().post_send(i as u64, &client.state.slice(..).unwrap(), imm, SendFlags::SIGNALED) }
                .unwrap();
            client.conn.send_cq().wait_one(TIMEOUT).unwrap();
            let wc = server.conn.recv_cq().wait_one(TIMEOUT).unwrap();
            assert_eq!(wc.wr_id, 100 + i as u64);
            assert_eq!(wc.opcode, WcOpcode::Recv);
            assert_eq!(wc.byte_len as usize, size);
            assert_eq!(wc.imm, imm);
            assert!(server.state.to_vec() == client.state.to_vec(), "SEND of {size} B arrived changed");
        }
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_write_with_immediate_completes_a_receive_at_the_peer() {
    let (client, server) = connect_pair(
        ConnectionOptions::default(),
        |pd| {
            let src = host_mr(pd, 8192, AccessFlags::LOCAL_WRITE)?;
            src.bytes().copy_from(&pattern(8192, 1)[..]);
            Ok((src, Vec::new()))
        },
        |pd| {
            let mr = host_mr(pd, 8192, AccessFlags::remote_rw())?;
            let d = mr.remote().to_bytes().to_vec();
            Ok((mr, d))
        },
    );
    let empty: &'static _ = Box::leak(Box::new(host_mr(&server.pd, 1, AccessFlags::LOCAL_WRITE).unwrap()));
    // SAFETY: `empty` is leaked: never deregistered.
    unsafe { server.conn.qp().post_recv(7, &empty.slice(0..0).unwrap()) }.unwrap();
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
    unsafe {
        client.conn.qp().post_write_imm(
            1,
            &client.state.slice(..).unwrap(),
            &remote.slice(..).unwrap(),
            42,
            SendFlags::SIGNALED,
        )
    }
    .unwrap();
    client.conn.send_cq().wait_one(TIMEOUT).unwrap();
    let wc = server.conn.recv_cq().wait_one(TIMEOUT).unwrap();
    assert_eq!((wc.wr_id, wc.opcode, wc.imm), (7, WcOpcode::RecvRdmaWithImm, Some(42)));
    assert!(server.state.to_vec() == client.state.to_vec());
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn odp_mr_receives_rdma_write_and_serves_read() {
    let fab = common::fabric();
    let ctx = p2pbridge_verbs::Context::open(&fab.b.device).unwrap();
    let odp = ctx.caps().unwrap().odp;
    assert!(
        odp.rc_supports(OdpTransportCaps::WRITE | OdpTransportCaps::READ),
        "{} on kernel {} reports no RC WRITE/READ ODP support ({odp:?}); rxe has it from Linux 6.15",
        fab.b.device,
        fab.kernel
    );
    for &size in &[4096usize, 1 << 20, 16 << 20] {
        write_then_read(size, true, false);
    }
}

/// ODP with `ibv_advise_mr` prefetch. scripts/test skips this test (with the reason) where
/// the provider lacks advise_mr, as rdma-core's rxe provider before v57 does.
#[test]
#[ignore = "needs an RDMA device with advise_mr: scripts/test runs it where the provider has it"]
fn odp_prefetch_then_rdma_write_and_read() {
    for &size in &[4096usize, 1 << 20] {
        write_then_read(size, true, true);
    }
}

/// Implicit ODP: one MR over the whole address space. scripts/test skips this test (with
/// the reason) where the device lacks IBV_ODP_SUPPORT_IMPLICIT, as rxe does; here it must work.
#[test]
#[ignore = "needs an RDMA device with implicit ODP: scripts/test runs it where the device has it"]
fn implicit_odp_mr_receives_rdma_write() {
    let (client, server) = connect_pair(
        ConnectionOptions::default(),
        |pd| {
            let src = host_mr(pd, 65_536, AccessFlags::LOCAL_WRITE)?;
            src.bytes().copy_from(&pattern(65_536, 9)[..]);
            Ok((src, Vec::new()))
        },
        |pd| {
            let target = HostBuffer::new(65_536)?;
            // SAFETY: the rkey goes only to this test's own client, which writes only into
            // `target`; `target` is read after the write's completion.
            let mr = unsafe { pd.register_implicit_odp(AccessFlags::remote_rw())? };
            let d = RemoteBuf {
                addr: p2pbridge_verbs::RegisterableBuffer::as_ptr(&target) as u64,
                len: 65_536,
                rkey: mr.rkey(),
            };
            Ok(((mr, target), d.to_bytes().to_vec()))
        },
    );
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    // SAFETY: the client `Side`'s state, dropped after its connection (declared first).
    unsafe {
        client.conn.qp().post_write(
            1,
            &client.state.slice(..).unwrap(),
            &remote.slice(..).unwrap(),
            SendFlags::SIGNALED,
        )
    }
    .unwrap();
    client.conn.send_cq().wait_one(TIMEOUT).unwrap();
    assert!(server.state.1.as_slice() == client.state.to_vec());
}

/// Two connections take their receives from one shared receive queue, posted as one list, and
/// report them on one shared receive CQ: every message lands in a receive of the pool, whole,
/// and each receive is used once.
#[test]
#[ignore = "needs the Soft-RoCE fabric (scripts/test)"]
fn rdma_two_connections_share_a_receive_queue_and_a_completion_queue() {
    use p2pbridge_verbs::{CompletionQueue, Connection, Context, Listener, ProtectionDomain, SharedReceiveQueue};
    use std::sync::Arc;
    const MSG: usize = 4096;
    const PER: usize = 3;
    let fab = common::fabric();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let b = fab.b.clone();
    let server = std::thread::spawn(move || {
        b.enter().unwrap();
        let pd = ProtectionDomain::new(&Context::open(&b.device).unwrap()).unwrap();
        let srq = Arc::new(SharedReceiveQueue::new(&pd, 64).unwrap());
        let cq = Arc::new(CompletionQueue::new(pd.context(), 64).unwrap());
        let pool: &'static _ = Box::leak(Box::new(host_mr(&pd, 2 * PER * MSG, AccessFlags::LOCAL_WRITE).unwrap()));
        let slots: Vec<_> =
            (0..2 * PER as u64).map(|i| pool.slice(i * MSG as u64..(i + 1) * MSG as u64).unwrap()).collect();
        // SAFETY: `pool` is leaked: never deregistered.
        unsafe { srq.post_recv_list(100, &slots) }.unwrap();
        let l = Listener::bind((b.addr, 0).into()).unwrap();
        port_tx.send(l.local_addr()).unwrap();
        let o = ConnectionOptions { srq: Some(srq.clone()), recv_cq: Some(cq.clone()), ..Default::default() };
        let conns: Vec<Connection> = (0..2).map(|_| l.get_request(TIMEOUT).unwrap().accept(&pd, &o).unwrap()).collect();
        assert!(conns.iter().all(|c| c.srq().is_some()));
        ready_tx.send(()).unwrap();
        let mut wcs = Vec::new();
        while wcs.len() < 2 * PER {
            cq.wait_ids(100..100 + 2 * PER as u64, TIMEOUT, &mut wcs).unwrap();
        }
        let qpns: Vec<u32> = conns.iter().map(|c| c.qp().qp_num()).collect();
        (wcs, qpns, pool.to_vec())
    });
    fab.a.enter().unwrap();
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let to = port_rx.recv().unwrap();
    let conns: Vec<Connection> =
        (0..2).map(|_| Connection::connect(&pd, to, &ConnectionOptions::default()).unwrap()).collect();
    ready_rx.recv().unwrap();
    let src: &'static _ = Box::leak(Box::new(host_mr(&pd, 2 * PER * MSG, AccessFlags::LOCAL_WRITE).unwrap()));
    src.bytes().copy_from(&pattern(2 * PER * MSG, 0x77)[..]);
    for (c, conn) in conns.iter().enumerate() {
        for m in 0..PER {
            let at = ((c * PER + m) * MSG) as u64;
            // SAFETY: `src` is leaked: never deregistered.
            unsafe {
                conn.qp().post_send(
                    m as u64,
                    &src.slice(at..at + MSG as u64).unwrap(),
                    Some((c * PER + m) as u32),
                    SendFlags::SIGNALED,
                )
            }
            .unwrap();
            conn.send_cq().wait_wr(m as u64, TIMEOUT).unwrap();
        }
    }
    let (wcs, qpns, pool) = server.join().unwrap();
    let sent = pattern(2 * PER * MSG, 0x77);
    let mut used: Vec<u64> = wcs.iter().map(|w| w.wr_id).collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used.len(), 2 * PER, "each receive of the pool was used once");
    for w in &wcs {
        assert_eq!(w.status, p2pbridge_verbs::WcStatus::Success);
        assert_eq!(w.byte_len as usize, MSG);
        let msg = w.imm.unwrap() as usize;
        // The message's connection: the first PER came over the first.
        assert_eq!(w.qp_num, qpns[msg / PER], "message {msg} was reported for its own connection");
        let slot = (w.wr_id - 100) as usize;
        assert!(
            pool[slot * MSG..(slot + 1) * MSG] == sent[msg * MSG..(msg + 1) * MSG],
            "message {msg} in receive {slot}"
        );
    }
}
