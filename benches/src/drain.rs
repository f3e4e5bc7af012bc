//! What a benchmark does when a transfer loop fails with requests still posted: it may not let
//! their registration go (its region could be given to later memory) until they are reaped.

use std::time::{Duration, Instant};

use p2pbridge_verbs::{Connection, WorkCompletion};

/// After a failure `e` with `outstanding` requests possibly still posted on `conn`'s send
/// queue: moves its queue pair to the error state and reaps their flushes, so that the
/// registration they use may be let go, and returns `e`. Where the flushes do not all come
/// within 30 s, or polling for them fails, the process exits at once (status 1), before
/// anything could deregister their memory.
pub fn drain<E: std::fmt::Display>(conn: &Connection, mut outstanding: u64, e: E) -> E {
    let _ = conn.qp().set_error();
    let mut wcs = [WorkCompletion::default(); 16];
    let t = Instant::now();
    while outstanding > 0 && t.elapsed() < Duration::from_secs(30) {
        match conn.send_cq().poll(&mut wcs) {
            Ok(n) => outstanding = outstanding.saturating_sub(n as u64),
            // Whether the requests are still out cannot be known: the process goes at once.
            Err(pe) => {
                eprintln!("{e}; polling for the flush failed ({pe}): exiting");
                std::process::exit(1);
            }
        }
    }
    if outstanding > 0 {
        eprintln!("{e}; the device did not flush {outstanding} requests: exiting");
        std::process::exit(1);
    }
    e
}
