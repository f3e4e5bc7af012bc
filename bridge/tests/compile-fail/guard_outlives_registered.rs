// A guard that holds a registration live borrows its handle: the handle cannot be dropped
// (nor its slices used) while the guard lives.
use p2pbridge::{Registered, Result};

fn guard_after_drop(reg: Registered) -> Result<()> {
    let guard = reg.lock()?;
    drop(reg);
    let _slice = guard.slice(0, 16)?;
    Ok(())
}

fn main() {}
