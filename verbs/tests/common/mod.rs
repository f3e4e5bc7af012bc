//! Shared set-up for the tests that run on the Soft-RoCE fabric (`scripts/softroce`).
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use p2pbridge_verbs::fabric::SoftRoce;
use p2pbridge_verbs::{Connection, ConnectionOptions, Context, Listener, ProtectionDomain, Result};

/// Why these tests are ignored by a plain `cargo test`.
pub const NEEDS_FABRIC: &str = "needs an RDMA device: scripts/test runs it on Soft-RoCE";

/// The fabric; a test that runs without it fails, loudly (it is `#[ignore]`d otherwise).
pub fn fabric() -> SoftRoce {
    SoftRoce::from_env().expect(
        "this test needs the Soft-RoCE fabric (P2PB_SOFTROCE is unset): run it through scripts/test or scripts/softroce",
    )
}

/// One connected side: its connection, its PD, and what its set-up made.
pub struct Side<T> {
    pub conn: Connection,
    pub pd: ProtectionDomain,
    pub state: T,
}

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Connects a client on host A to a server on host B. Each set-up closure runs on its host's
/// thread with the side's PD before connecting, and returns its state and the private data
/// to send the other side.
pub fn connect_pair<C, S>(
    opts: ConnectionOptions,
    client_setup: impl FnOnce(&ProtectionDomain) -> Result<(C, Vec<u8>)> + Send + 'static,
    server_setup: impl FnOnce(&ProtectionDomain) -> Result<(S, Vec<u8>)> + Send + 'static,
) -> (Side<C>, Side<S>)
where
    C: Send + 'static,
    S: Send + 'static,
{
    let fab = fabric();
    let (port_tx, port_rx) = mpsc::channel();
    let (b, sopts) = (fab.b.clone(), opts.clone());
    let server = std::thread::spawn(move || -> Result<Side<S>> {
        b.enter()?;
        let pd = ProtectionDomain::new(&Context::open(&b.device)?)?;
        let (state, private_data) = server_setup(&pd)?;
        let listener = Listener::bind((b.addr, 0).into())?;
        port_tx.send(listener.local_addr()).expect("client thread gone");
        let req = listener.get_request(TIMEOUT)?;
        let conn = req.accept(&pd, &ConnectionOptions { private_data, ..sopts })?;
        Ok(Side { conn, pd, state })
    });
    let a = fab.a.clone();
    let client = std::thread::spawn(move || -> Result<Side<C>> {
        a.enter()?;
        let pd = ProtectionDomain::new(&Context::open(&a.device)?)?;
        let (state, private_data) = client_setup(&pd)?;
        let Ok(dst) = port_rx.recv_timeout(TIMEOUT) else {
            return Err(p2pbridge_verbs::Error::InvalidArgument("the server did not start listening (see its error)".into()));
        };
        let conn = Connection::connect(&pd, dst, &ConnectionOptions { private_data, ..opts })?;
        Ok(Side { conn, pd, state })
    });
    let c = client.join().expect("client thread panicked");
    let s = server.join().expect("server thread panicked");
    match (c, s) {
        (Ok(c), Ok(s)) => (c, s),
        (c, s) => panic!("connection set-up failed: server: {:?}; client: {:?}", s.err(), c.err()),
    }
}

/// A reproducible byte pattern that differs per seed and position.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(seed as u32 % 31) as u8 ^ seed).collect()
}
