//! Registration caching in a loop that frees and reallocates: what the bridge's cache and its
//! invalidation do for an application that churns buffers (as caching allocators do).
//!
//! ```text
//! cargo build --release -p p2pbridge-examples && scripts/softroce target/release/cache_loop
//! ```
//!
//! Each round allocates a buffer, registers it (a miss: a new registration), registers it
//! again (a hit: the cached one), hands its key out, and frees it. The free notifies the
//! bridge first, which deregisters; the next allocation often gets the same address, and gets
//! a new registration with a new generation; the old key is refused.

use p2pbridge::verbs::fabric::SoftRoce;
use p2pbridge::verbs::{AccessFlags, Context, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions};
use p2pbridge_examples::pick_backend;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = match std::env::args().nth(1) {
        Some(d) => d,
        None => {
            SoftRoce::from_env().map(|f| f.a.device).ok_or("give an RDMA device name, or run under scripts/softroce")?
        }
    };
    let pd = ProtectionDomain::new(&Context::open(&device)?)?;
    let (mem, what) = pick_backend();
    let bridge = Bridge::new(&pd, vec![mem.clone()], BridgeOptions::default())?;
    println!("{device}, {what}");
    let mut old_keys = Vec::new();
    let (mut reused, rounds) = (0, 20);
    let mut last_addr = 0;
    for round in 0..rounds {
        let buf = mem.alloc(1 << 20)?;
        let t = std::time::Instant::now();
        let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
        let miss = t.elapsed();
        let t = std::time::Instant::now();
        let again = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
        let hit = t.elapsed();
        if again.generation() != reg.generation() {
            return Err("the second registration should have been a cache hit".into());
        }
        let key = bridge.hand_out(&reg, 0..buf.len())?;
        if buf.addr() == last_addr {
            reused += 1;
        }
        last_addr = buf.addr();
        if round < 5 || round == rounds - 1 {
            println!(
                "round {round:>2}: addr {:#x} {} generation {:>3}: miss {miss:>10.2?}, hit {hit:>9.2?}",
                buf.addr(),
                reg.strategy(),
                reg.generation()
            );
        }
        drop((reg, again));
        drop(buf); // the bridge is told first: the registration is deregistered before the free
        if bridge.check_key(&key).is_ok() {
            return Err("a freed buffer's key is still accepted".into());
        }
        old_keys.push(key);
    }
    let stale = old_keys.iter().filter(|k| bridge.check_key(k).is_err()).count();
    println!(
        "{rounds} rounds, address reused {reused} times, {stale}/{} old keys refused, {} registrations left",
        old_keys.len(),
        p2pbridge::live_registrations()
    );
    if stale != old_keys.len() || p2pbridge::live_registrations() != 0 {
        return Err("stale keys accepted or registrations leaked".into());
    }
    println!("ok");
    Ok(())
}
