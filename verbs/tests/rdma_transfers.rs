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
    qp.post_write(1, &src.slice(..).unwrap(), &remote.slice(..).unwrap(), SendFlags::SIGNALED).unwrap();
    let wc = client.conn.send_cq().wait_one(TIMEOUT).unwrap();
    assert_eq!((wc.wr_id, wc.opcode), (1, WcOpcode::RdmaWrite));
    assert!(server.state.to_vec() == src.to_vec(), "server buffer differs after RDMA WRITE of {size} B");

    qp.post_read(2, &back.slice(..).unwrap(), &remote.slice(..).unwrap(), SendFlags::SIGNALED).unwrap();
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
    qp.post_write(9, &client.state.slice(10..50).unwrap(), &remote.slice(1000..1040).unwrap(), SendFlags::SIGNALED)
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
            server.conn.qp().post_recv(100 + i as u64, &server.state.slice(..).unwrap()).unwrap();
            client.conn.qp().post_send(i as u64, &client.state.slice(..).unwrap(), imm, SendFlags::SIGNALED).unwrap();
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
    let empty = host_mr(&server.pd, 1, AccessFlags::LOCAL_WRITE).unwrap();
    server.conn.qp().post_recv(7, &empty.slice(0..0).unwrap()).unwrap();
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data()).unwrap();
    client
        .conn
        .qp()
        .post_write_imm(1, &client.state.slice(..).unwrap(), &remote.slice(..).unwrap(), 42, SendFlags::SIGNALED)
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
    client
        .conn
        .qp()
        .post_write(1, &client.state.slice(..).unwrap(), &remote.slice(..).unwrap(), SendFlags::SIGNALED)
        .unwrap();
    client.conn.send_cq().wait_one(TIMEOUT).unwrap();
    assert!(server.state.1.as_slice() == client.state.to_vec());
}
