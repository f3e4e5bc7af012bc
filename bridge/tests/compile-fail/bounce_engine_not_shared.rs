// The bounce engine's staging slots belong to one transfer at a time: a transfer needs the
// engine exclusively, so two threads (or two calls) sharing `&BounceEngine` cannot stage into
// the same slot.
use p2pbridge::verbs::Connection;
use p2pbridge::{BounceEngine, RemoteKey, Result};

fn shared(engine: &BounceEngine, conn: &Connection, addr: u64, key: &RemoteKey) -> Result<()> {
    // SAFETY: (irrelevant: this must not compile)
    unsafe { engine.write(conn, addr, 4096, key, 0) }
}

fn main() {}
