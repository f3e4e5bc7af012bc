//! Connection faults on the Soft-RoCE fabric: a peer process killed in the middle of a stream
//! of writes. The writer must get a typed error naming the cause within 2 s, with its queue
//! pair in the error state and nothing of its work left on the completion queue; its buffers
//! can then be freed and reused; and a new connection to a new peer moves data again.
//!
//! The peer is this same test binary, run again in a child process (the `role_*` entry
//! below, see `support/peers.rs`), so that it can be killed like any peer process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{
    AccessFlags, Connection, Context, Error as VerbsError, Fault, ProtectionDomain, QpState, WorkCompletion,
};
use p2pbridge::{Bridge, BridgeOptions, Error};

#[path = "support/peers.rs"]
mod peers;
use peers::{fabric, kill, opts, pattern, start_peer, LEN};

/// The peer: run only in the child processes the tests start (scripts/test skips `role_*`).
#[test]
#[ignore = "the peer process of rdma_faults' tests: they run it in a child process"]
fn role_peer_serves_until_killed() {
    peers::serve_until_killed();
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_a_peer_killed_mid_transfer_fails_the_writer_within_2_s_others_carry_on_and_a_new_connection_works() {
    let fab = fabric();
    fab.a.enter().unwrap();
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let mem = HostBackend::new();
    let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default()).unwrap();
    let buf = mem.alloc(LEN).unwrap();
    mem.copy_to_device(&buf, 0, &pattern(LEN, 0x21)).unwrap();
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();

    let (peer, addr) = start_peer(&fab, "1");
    let conn = Connection::connect(&pd, addr, &opts()).unwrap();
    let key = bridge.recv_key(&conn, Duration::from_secs(30)).unwrap();
    bridge.write(&conn, &reg, 0, LEN as u64, &key, 0).unwrap();
    // Another peer, which stays.
    let (other, other_addr) = start_peer(&fab, "other");
    let other_conn = Connection::connect(&pd, other_addr, &opts()).unwrap();
    let other_key = bridge.recv_key(&other_conn, Duration::from_secs(30)).unwrap();

    // Kill the peer while 16 MiB writes stream to it.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let at = Instant::now();
        kill(peer);
        at
    });
    let (err, failed_at) = loop {
        if let Err(e) = bridge.write(&conn, &reg, 0, LEN as u64, &key, 0) {
            break (e, Instant::now());
        }
    };
    let killed_at = killer.join().unwrap();
    let after = failed_at.saturating_duration_since(killed_at);
    assert!(
        matches!(err, Error::Verbs(VerbsError::ConnectionLost { cause: Fault::Disconnected })),
        "the writer's error does not name the peer's loss: {err}"
    );
    assert!(after < Duration::from_secs(2), "the writer learnt of the loss {after:?} after the kill");
    assert_eq!(conn.fault(), Some(Fault::Disconnected));
    // Drained: the QP is in the error state and none of its work is left to complete.
    assert_eq!(conn.qp().state().unwrap(), QpState::Error);
    let mut left = [WorkCompletion::default(); 16];
    assert_eq!(conn.send_cq().poll(&mut left).unwrap(), 0, "work left on the lost connection's CQ");
    // Later operations on it fail at once, with the cause.
    let again = bridge.write(&conn, &reg, 0, 4096, &key, 0);
    assert!(matches!(again, Err(Error::Verbs(VerbsError::ConnectionLost { .. }))), "{again:?}");

    // The other peer carries on, through the same registration: written, then read back.
    assert_eq!(other_conn.fault(), None);
    bridge.write(&other_conn, &reg, 0, LEN as u64, &other_key, 0).unwrap();
    let check = mem.alloc(LEN).unwrap();
    let check_reg = bridge.register(check.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();
    bridge.read(&other_conn, &check_reg, 0, LEN as u64, &other_key, 0).unwrap();
    assert!(mem.to_vec(&check).unwrap() == pattern(LEN, 0x21), "the other peer's data differs after the loss");
    drop((check_reg, other_conn));
    check.free().unwrap();
    kill(other);

    // The buffer can go, and its memory be used again.
    drop(reg);
    buf.free().unwrap();
    let buf = mem.alloc(LEN).unwrap();
    mem.copy_to_device(&buf, 0, &pattern(LEN, 0x5e)).unwrap();
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();
    drop(conn);

    // A new peer, a new connection: data moves again (written, then read back).
    let (peer, addr) = start_peer(&fab, "2");
    let conn = Connection::connect(&pd, addr, &opts()).unwrap();
    let key = bridge.recv_key(&conn, Duration::from_secs(30)).unwrap();
    bridge.write(&conn, &reg, 0, LEN as u64, &key, 0).unwrap();
    let back = mem.alloc(LEN).unwrap();
    let back_reg = bridge.register(back.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();
    bridge.read(&conn, &back_reg, 0, LEN as u64, &key, 0).unwrap();
    assert!(mem.to_vec(&back).unwrap() == pattern(LEN, 0x5e), "data read back after reconnecting differs");
    kill(peer);
}
