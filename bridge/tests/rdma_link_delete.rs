//! `rdma link delete` of the writer's device in the middle of a stream of writes, on the
//! Soft-RoCE fabric; then the device is added back and a new connection moves data.
//!
//! rxe cannot take a device away from the processes using it: the kernel's `rdma link delete`
//! waits until every process holding the device lets it go, and tells none of them (no
//! `RDMA_CM_EVENT_DEVICE_REMOVAL`, no `IBV_EVENT_DEVICE_FATAL`, as with a driver that can
//! disassociate its users, such as mlx5). librdmacm keeps the devices it has seen open for the
//! life of the process. So the writer and its peer are child processes (the `role_*` entries,
//! see `support/peers.rs`), and this process touches no device at all. What is checked: the
//! writer's operation fails with a typed error within 2 s of the delete (its 1.5 s completion
//! deadline: the QP moved to the error state and the request flushed), nothing is left on its
//! completion queue, the delete completes once the writer has let go, and through the device
//! added back a new connection writes and reads back data.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, Connection, Context, Error as VerbsError, ProtectionDomain, WorkCompletion};
use p2pbridge::{Bridge, BridgeOptions, Error};

#[path = "support/peers.rs"]
mod peers;
use peers::{fabric, kill, opts, pattern, say, start_peer, Role, LEN};

const PEER_ADDR_ENV: &str = "P2PB_PEER_ADDR";
const READY_ENV: &str = "P2PB_READY_FILE";

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

#[test]
#[ignore = "the peer process of rdma_link_delete's test: it runs it in a child process"]
fn role_peer_serves_until_killed() {
    peers::serve_until_killed();
}

/// The writer: connects from host A to the peer, then writes 16 MiB again and again until an
/// operation fails; says how it failed and when (ms since the epoch), then exits (letting the
/// device go).
#[test]
#[ignore = "the writer process of rdma_link_delete's test: it runs it in a child process"]
fn role_writer_streams_until_it_fails() {
    let fab = fabric();
    fab.a.enter().unwrap();
    let addr: std::net::SocketAddr = std::env::var(PEER_ADDR_ENV).unwrap().parse().unwrap();
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let mem = HostBackend::new();
    let bopts = BridgeOptions { completion_timeout: Duration::from_millis(1500), ..Default::default() };
    let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], bopts).unwrap();
    let buf = mem.alloc(LEN).unwrap();
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();
    let conn = Connection::connect(&pd, addr, &opts()).unwrap();
    let key = bridge.recv_key(&conn, Duration::from_secs(30)).unwrap();
    bridge.write(&conn, &reg, 0, LEN as u64, &key, 0).unwrap();
    std::fs::write(std::env::var(READY_ENV).unwrap(), "ready").unwrap();
    let err = loop {
        if let Err(e) = bridge.write(&conn, &reg, 0, LEN as u64, &key, 0) {
            break e;
        }
    };
    let at = now_ms();
    let kind = match &err {
        Error::Verbs(VerbsError::ConnectionLost { .. }) => "lost",
        Error::CompletionTimeout { .. } => "deadline",
        _ => "other",
    };
    let mut left = [WorkCompletion::default(); 16];
    let leftover = conn.send_cq().poll(&mut left).unwrap_or(0);
    say(&format!("{kind} {at} {leftover} {err}"));
    // Exit without tearing down through a device being deleted.
    std::process::exit(0);
}

/// After the device is back: connects, writes a pattern, reads it back; says "ok" or what
/// differed.
#[test]
#[ignore = "the second writer process of rdma_link_delete's test: it runs it in a child process"]
fn role_writer_moves_data() {
    let fab = fabric();
    fab.a.enter().unwrap();
    let addr: std::net::SocketAddr = std::env::var(PEER_ADDR_ENV).unwrap().parse().unwrap();
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let mem = HostBackend::new();
    let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default()).unwrap();
    let buf = mem.alloc(LEN).unwrap();
    mem.copy_to_device(&buf, 0, &pattern(LEN, 0x4b)).unwrap();
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();
    let conn = Connection::connect(&pd, addr, &opts()).unwrap();
    let key = bridge.recv_key(&conn, Duration::from_secs(30)).unwrap();
    bridge.write(&conn, &reg, 0, LEN as u64, &key, 0).unwrap();
    let back = mem.alloc(LEN).unwrap();
    let back_reg = bridge.register(back.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();
    bridge.read(&conn, &back_reg, 0, LEN as u64, &key, 0).unwrap();
    let same = mem.to_vec(&back).unwrap() == pattern(LEN, 0x4b);
    say(if same { "ok" } else { "data read back differs" });
}

/// `rdma link show`'s state and netdev of `dev`, if it is there (in network namespace
/// `netns`, where the fabric's devices live).
fn link(netns: &str, dev: &str) -> Option<(String, String)> {
    let out =
        Command::new("ip").args(["netns", "exec", netns, "rdma", "link", "show"]).output().expect("run rdma link show");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text.lines().find(|l| l.starts_with(&format!("link {dev}/")))?.to_string();
    let after = |k: &str| line.split_whitespace().skip_while(|w| *w != k).nth(1).map(str::to_string);
    Some((after("state")?, after("netdev")?))
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE (deletes and re-adds rxe_a)"]
fn rdma_link_delete_mid_transfer_fails_the_writer_within_2_s_and_the_device_added_back_moves_data() {
    let fab = fabric();
    let (dev, netns) = (fab.a.device.clone(), fab.a.netns.clone());
    let (_, netdev) = link(&netns, &dev).unwrap_or_else(|| panic!("{dev} is not in `rdma link show` in {netns}"));
    let ready = std::env::temp_dir().join(format!("p2pb-writer-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);

    let (peer, addr) = start_peer(&fab, "peer1");
    let writer = Role::start(
        "role_writer_streams_until_it_fails",
        "writer1",
        &[(PEER_ADDR_ENV, addr.to_string()), (READY_ENV, ready.display().to_string())],
    );
    let t = Instant::now();
    while !ready.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "the writer did not start writing");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let deleted_at = now_ms();
    let mut delete = Command::new("timeout")
        .args(["120", "ip", "netns", "exec", &netns, "rdma", "link", "delete", &dev])
        .spawn()
        .expect("run rdma link delete");

    let said = writer.heard(Duration::from_secs(60));
    let mut w = said.splitn(4, ' ');
    let (kind, at, leftover, err) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap(), w.next().unwrap_or(""));
    let after = at.parse::<u128>().unwrap().saturating_sub(deleted_at);
    eprintln!("writer: {kind} after {after} ms: {err}");
    assert!(kind == "lost" || kind == "deadline", "the writer's error is neither the loss nor the deadline: {err}");
    assert!(after < 2000, "the writer failed {after} ms after the delete began ({err})");
    assert_eq!(leftover, "0", "work left on the writer's completion queue");
    kill(writer.child);
    kill(peer);

    // Nobody holds the device now: the delete completes.
    let status = delete.wait().unwrap();
    assert!(status.success(), "rdma link delete {dev} failed or hung: {status}");
    assert!(link(&netns, &dev).is_none(), "{dev} is still there after the delete");

    // Back, and a new connection through it moves data.
    let added = Command::new("ip")
        .args(["netns", "exec", &netns, "rdma", "link", "add", &dev, "type", "rxe", "netdev", &netdev])
        .status()
        .unwrap();
    assert!(added.success(), "rdma link add {dev} netdev {netdev} failed");
    let t = Instant::now();
    while link(&netns, &dev).is_none_or(|(state, _)| state != "ACTIVE") {
        assert!(t.elapsed() < Duration::from_secs(30), "{dev} did not come back ACTIVE");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (peer, addr) = start_peer(&fab, "peer2");
    let writer = Role::start("role_writer_moves_data", "writer2", &[(PEER_ADDR_ENV, addr.to_string())]);
    let said = writer.heard(Duration::from_secs(120));
    kill(writer.child);
    kill(peer);
    assert_eq!(said, "ok", "after the device came back: {said}");
}
