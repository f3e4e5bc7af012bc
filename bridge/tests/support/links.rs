//! More connections between the fabric's two hosts.
#![allow(dead_code)] // each test binary uses its own part

use std::time::Duration;

use p2pbridge::verbs::{Connection, ConnectionOptions, Listener, ProtectionDomain};
use p2pbridge_test_support::fabric::SoftRoce;

/// One more connection between the two hosts, over existing protection domains: (client on
/// host A, server on host B).
pub fn connect(
    fab: &SoftRoce,
    cpd: &ProtectionDomain,
    spd: &ProtectionDomain,
    opts: &ConnectionOptions,
) -> (Connection, Connection) {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (b, spd, so) = (fab.b.clone(), spd.clone(), opts.clone());
    let server = std::thread::spawn(move || {
        b.enter().unwrap();
        let l = Listener::bind((b.addr, 0).into()).unwrap();
        port_tx.send(l.local_addr()).unwrap();
        l.get_request(Duration::from_secs(30)).unwrap().accept(&spd, &so).unwrap()
    });
    let (a, cpd, co) = (fab.a.clone(), cpd.clone(), opts.clone());
    let client = std::thread::spawn(move || {
        a.enter().unwrap();
        Connection::connect(&cpd, port_rx.recv().unwrap(), &co).unwrap()
    });
    (client.join().unwrap(), server.join().unwrap())
}
