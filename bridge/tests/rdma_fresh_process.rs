//! Fresh processes, where a device's asynchronous events are read for the first time: two
//! threads starting transfers on two new connections of one device at once never hang. (The
//! event descriptor was made non-blocking by whichever thread read it first; the other could
//! block in `ibv_get_async_event` holding the lock every `Connection::fault` takes: measured in
//! the last review in 36 of 200 fresh processes.)

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, Connection, Context, Listener, ProtectionDomain};
use p2pbridge::{Batch, Bridge, BridgeOptions};

#[path = "support/peers.rs"]
mod peers;
use peers::{fabric, opts, say, Role};

/// Child processes started, one after another.
const RUNS: usize = 40;
/// Where a child connects to.
const TO_ENV: &str = "P2PB_ROLE_TO";

/// The child: connects twice to the parent's server on host B, then two threads post their
/// first transfer (a SEND) at the same moment and wait for it. Says "done".
#[test]
#[ignore = "a role process of rdma_two_threads_starting_transfers_in_a_fresh_process_never_hang"]
fn role_two_threads_start_their_first_transfers_at_once() {
    let to: std::net::SocketAddr = std::env::var(TO_ENV).expect("started by the fresh-process test").parse().unwrap();
    let fab = fabric();
    fab.a.enter().unwrap();
    let pd = ProtectionDomain::new(&Context::open(&fab.a.device).unwrap()).unwrap();
    let mem = HostBackend::new();
    let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default()).unwrap();
    let buf = mem.alloc(8192).unwrap();
    let reg = bridge.register(buf.addr(), 8192, AccessFlags::LOCAL_WRITE).unwrap();
    let conns: Vec<Connection> = (0..2).map(|_| Connection::connect(&pd, to, &opts()).unwrap()).collect();
    let go = Barrier::new(conns.len());
    std::thread::scope(|s| {
        for (i, conn) in conns.iter().enumerate() {
            let (go, bridge, reg) = (&go, &bridge, &reg);
            s.spawn(move || {
                go.wait();
                let mut b = Batch::new();
                b.send(reg, i as u64 * 4096, 4096, None);
                bridge.post(conn, b).and_then(|t| t.wait()).unwrap();
            });
        }
    });
    say("done");
}

#[test]
#[ignore = "needs the Soft-RoCE fabric (scripts/test)"]
fn rdma_two_threads_starting_transfers_in_a_fresh_process_never_hang() {
    let fab = fabric();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let b = fab.b.clone();
    // The server: every connection gets one receive, taken on a thread of its own.
    let server = std::thread::spawn(move || {
        b.enter().unwrap();
        let l = Listener::bind((b.addr, 0).into()).unwrap();
        port_tx.send(l.local_addr()).unwrap();
        let pd = ProtectionDomain::new(&Context::open(&b.device).unwrap()).unwrap();
        let mem = HostBackend::new();
        let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default()).unwrap();
        let buf = mem.alloc(2 * RUNS * 4096).unwrap();
        let reg = bridge.register(buf.addr(), (2 * RUNS * 4096) as u64, AccessFlags::LOCAL_WRITE).unwrap();
        // Each connection is kept until every run is over: one dropped as soon as its message
        // came could reach the child as a disconnection before its SEND's completion did.
        std::thread::scope(|s| {
            let mut kept = Vec::new();
            for k in 0..2 * RUNS {
                let conn = l.get_request(Duration::from_secs(120)).unwrap().accept(&pd, &opts()).unwrap();
                let (bridge, reg) = (&bridge, &reg);
                kept.push(s.spawn(move || {
                    bridge.recv(&conn, reg, k as u64 * 4096, 4096, Duration::from_secs(120)).unwrap();
                    conn
                }));
            }
            kept.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
        })
    });
    let to = port_rx.recv().unwrap();
    for run in 0..RUNS {
        let mut r = Role::start(
            "role_two_threads_start_their_first_transfers_at_once",
            &format!("fresh{run}"),
            &[(TO_ENV, to.to_string())],
        );
        let t = Instant::now();
        let status = loop {
            if let Some(st) = r.child.try_wait().unwrap() {
                break Some(st);
            }
            if t.elapsed() > Duration::from_secs(60) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match status {
            Some(st) => {
                assert!(st.success(), "run {run}: the child failed ({st}):\n{}", r.log());
                assert_eq!(r.heard(Duration::from_secs(1)), "done", "run {run}");
            }
            None => {
                let log = r.log();
                peers::kill(r.child);
                panic!("run {run}: two threads starting their first transfers hung (60 s):\n{log}");
            }
        }
    }
    // The server's connections go only now, after every run.
    drop(server.join().unwrap());
}
