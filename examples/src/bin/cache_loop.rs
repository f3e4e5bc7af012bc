//! Registration caching in a loop that frees and reallocates: what the bridge's cache and its
//! invalidation do for an application that churns buffers (as caching allocators do).
//!
//! ```text
//! cargo build --release -p p2pbridge-examples && scripts/softroce target/release/cache_loop
//! ```
//!
//! Each round allocates a buffer on the server, registers it (a miss: a new registration),
//! registers it again (a hit: the cached one), hands its key to the client, and frees it. The
//! free notifies the bridge first, which revokes the key at the NIC and deregisters; the next
//! allocation often gets the same address, and gets a new registration with a new generation.
//! The client then writes with the old key: its NIC refuses it, and the new buffer is unchanged.

use std::time::Duration;

use p2pbridge::verbs::fabric::SoftRoce;
use p2pbridge::verbs::{AccessFlags, ConnectionOptions, Error as VerbsError, WcStatus};
use p2pbridge::Error;
use p2pbridge_examples::{bridged, verbs_err};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fabric = SoftRoce::from_env().ok_or("run it under scripts/softroce (two Soft-RoCE hosts)")?;
    let (client, server) = fabric.connect_pair(
        ConnectionOptions { timeout: Duration::from_secs(60), ..Default::default() },
        move |pd| {
            let (mem, bridge, _) = bridged(pd)?;
            let buf = mem.alloc(1 << 20).map_err(verbs_err)?;
            let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw()).map_err(verbs_err)?;
            Ok(((mem, bridge, buf, reg), Vec::new()))
        },
        move |pd| Ok((bridged(pd)?, Vec::new())),
    )?;
    let (mem, bridge, what) = &server.state;
    let (_, cbridge, _, creg) = &client.state;
    println!("{what}; keys are memory windows: {:?}", bridge.key_windows());
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
        let key = bridge.hand_out(&server.conn, &reg, 0..buf.len())?;
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
        // The handles are kept on purpose: the free revokes the registration anyway.
        drop(buf); // the bridge is told first: keys revoked at the NIC, region deregistered
        if bridge.check_key(&key).is_ok() || reg.is_live() {
            return Err("a freed buffer's key is still accepted".into());
        }
        drop((reg, again));
        old_keys.push(key);
    }
    // From the peer's side: every old key is refused by the server's NIC, and the memory now at
    // those addresses is unchanged.
    let probe = mem.alloc(1 << 20)?;
    mem.copy_to_device(&probe, 0, &vec![0x5a; 1 << 20])?;
    let mut refused = 0;
    // One write (the newest old key): an RC queue pair is in the error state after a remote
    // access error, so each further key would need a new connection.
    if let Some(k) = old_keys.last() {
        match cbridge.write(&client.conn, creg, 0, 4096, k, 0) {
            Err(Error::Verbs(VerbsError::WorkCompletion { status: WcStatus::RemoteAccess, .. })) => refused += 1,
            other => return Err(format!("a write with a freed buffer's key was not refused: {other:?}").into()),
        }
    }
    let mut now = vec![0u8; 1 << 20];
    mem.copy_from_device(&probe, 0, &mut now)?;
    if now.iter().any(|&b| b != 0x5a) {
        return Err("memory at a freed buffer's address changed through its old key".into());
    }
    let stale = old_keys.iter().filter(|k| bridge.check_key(k).is_err()).count();
    drop(probe);
    drop(client);
    drop(server);
    println!(
        "{rounds} rounds, address reused {reused} times, {stale}/{} old keys refused by the bridge, the newest refused by the NIC ({refused}), {} registrations left",
        old_keys.len(),
        p2pbridge::live_registrations()
    );
    if stale != old_keys.len() || refused != 1 || p2pbridge::live_registrations() != 0 {
        return Err("stale keys accepted or registrations leaked".into());
    }
    println!("ok");
    Ok(())
}
