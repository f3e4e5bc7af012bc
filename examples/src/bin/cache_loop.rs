//! Registration caching in a loop that frees and reallocates: what the bridge's cache and its
//! invalidation do for an application that churns buffers (as caching allocators do).
//!
//! ```text
//! cargo build --release -p p2pbridge-examples && scripts/softroce target/release/cache_loop
//! ```
//!
//! On one machine, in loopback on one RDMA device (both ends on it, in this process):
//!
//! ```text
//! cache_loop --device mlx5_0                  # at the first IPv4 address of its GID table
//! cache_loop --device mlx5_0 --addr 192.0.2.10
//! ```
//!
//! Each round allocates a buffer on the server, registers it (a miss: a new registration),
//! registers it again (a hit: the cached one), hands its key to the client, and frees it. The
//! free notifies the bridge first, which revokes the key at the NIC and deregisters; the next
//! allocation often gets the same address, and gets a new registration with a new generation.
//! The client then writes with the old key: its NIC refuses it, and the new buffer is unchanged.
//!
//! Both ends run in this one process, always: the example frees the server's memory and
//! checks, on the server's bridge and its memory, what the client's write with an old key did,
//! so it needs both in view. It has no `--server`/`--client` (the other examples do).
//!
//! Exit status: 0 done, every old key refused and nothing leaked; 1 failed while running
//! (printed as `cache_loop: ERROR`), a key accepted after its free included; 2 usage error.

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use p2pbridge::verbs::{AccessFlags, Context, Error as VerbsError, WcStatus};
use p2pbridge::Error;
use p2pbridge_examples::{bridged, conn_opts, exit_status, Res, EXIT_CODES};
use p2pbridge_test_support::fabric::{Host, SoftRoce};

/// Registration caching while buffers are freed and reallocated: cache misses and hits, new
/// generations, and old keys refused by the bridge and by the NIC.
///
/// Both ends (the server whose buffers churn, and the client that writes with an old key) run
/// in this one process, always: the example checks the server's bridge and memory after the
/// client's write, so it has no --server/--client. With no arguments it runs across the two
/// Soft-RoCE hosts of scripts/softroce; with --device, in loopback on that device (run it in
/// the network namespace that has the device's address).
#[derive(Parser, Debug)]
#[command(
    name = "cache_loop",
    version,
    override_usage = "cache_loop [--rounds N] [--device NAME [--addr IP]]",
    after_help = EXIT_CODES
)]
struct Args {
    /// Run both ends in loopback on this RDMA device (`ibv_devices`, `p2pbridge probe`)
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
    /// With --device: the device's IP address to connect over (default: the first IPv4 address
    /// in its GID table)
    #[arg(long, value_name = "IP", requires = "device")]
    addr: Option<IpAddr>,
    /// How many allocate-register-free rounds
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rounds: u32,
}

/// The first IPv4 address in `device`'s GID table (RoCE GIDs of IPv4 addresses are v4-mapped).
fn device_ipv4(device: &str) -> Res<IpAddr> {
    let ctx = Context::open(device)?;
    ctx.gids()?
        .iter()
        .find_map(|g| g.as_ipv6().to_ipv4_mapped())
        .map(IpAddr::V4)
        .ok_or_else(|| format!("{device} has no IPv4 address in its GID table: give --addr IP").into())
}

/// Where the two ends run: the Soft-RoCE hosts, or one device twice (loopback).
fn fabric(args: &Args) -> Res<SoftRoce> {
    match &args.device {
        Some(device) => {
            let addr = match args.addr {
                Some(a) => a,
                None => device_ipv4(device)?,
            };
            println!("loopback on {device} ({addr})");
            let host = Host { netns: String::new(), addr, device: device.clone() };
            Ok(SoftRoce { a: host.clone(), b: host, kernel: String::new() })
        }
        // Outside scripts/softroce, no arguments is a usage error.
        None => Ok(SoftRoce::from_env().unwrap_or_else(|| {
            Args::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "give --device NAME (loopback on one device), or run with no arguments under scripts/softroce (two Soft-RoCE hosts)",
                )
                .exit()
        })),
    }
}

fn run(args: Args) -> Res {
    let fabric = fabric(&args)?;
    let (client, server) = fabric.connect_pair(
        conn_opts(),
        move |pd| {
            let (mem, bridge, _) = bridged(pd)?;
            let buf = mem.alloc(1 << 20)?;
            let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
            Ok(((mem, bridge, buf, reg), Vec::new()))
        },
        move |pd| Ok((bridged(pd)?, Vec::new())),
    )?;
    let (mem, bridge, what) = &server.state;
    let (_, cbridge, _, creg) = &client.state;
    println!("{what}; keys are memory windows: {}", bridge.key_windows());
    let mut old_keys = Vec::new();
    let (mut reused, rounds) = (0, args.rounds);
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
        let key = bridge.hand_out(&server.conn, &reg, 0, buf.len())?;
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
            Err(e) => {
                return Err(format!("a write with a freed buffer's key failed otherwise than refused: {e}").into())
            }
            Ok(()) => return Err("a write with a freed buffer's key was not refused".into()),
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

fn main() -> ExitCode {
    exit_status("cache_loop", run(Args::parse()))
}
