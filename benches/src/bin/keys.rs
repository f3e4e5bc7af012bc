//! What revocable keys cost, on the Soft-RoCE fabric:
//!
//! ```text
//! cargo build --release -p p2pbridge-benches && scripts/softroce target/release/keys
//! ```
//!
//! - **Revocation latency**: from `munmap` of registered host memory (the monitor sees it) and
//!   from the host backend's free, to the key being revoked at the NIC (its window
//!   deallocated: the NIC refuses it from then on; the tests prove the refusal from the peer's
//!   side). Median and p99 over `--rounds`.
//! - **Hand-out cost**: `Bridge::hand_out` with a memory window (allocate, bind on the QP,
//!   reap the bind) against a hand-out without windows (the region's rkey), which is what a
//!   hand-out was before windows.
//! - **WRITE bandwidth through a window's key against the region's own key**, at 64 KiB and
//!   1 MiB: the same buffers, size, depth (16) and no inline on both sides; `--pairs` (7) pairs, each
//!   `--seconds` long per side, the first of each pair alternating between the two keys; only completions reaped before the
//!   deadline count; the median ratio and its spread.
//!
//! Exit status: 0 done; 1 a failure while running (printed as `keys: ERROR`), a freed
//! buffer's key that survived its free included; 2 a usage error (bad arguments, or no
//! Soft-RoCE fabric).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, Connection, ConnectionOptions, SendFlags, WorkCompletion};
use p2pbridge::{Bridge, BridgeOptions, Policy, Registered, RemoteKey, Strategy};
use p2pbridge_benches::cli::{exit_status, fabric_or_usage_error, parse_count, parse_seconds, Res, EXIT_CODES};
use p2pbridge_test_support::fabric::SoftRoce;

/// What revocable keys cost, across the two Soft-RoCE hosts of scripts/softroce: revocation
/// latency (from munmap and from a backend free), hand-out cost with and without a memory
/// window, and WRITE bandwidth through a window's key against the region's own key.
#[derive(Parser, Debug)]
#[command(name = "keys", version, after_help = EXIT_CODES)]
struct Args {
    /// Rounds of each latency and hand-out measurement
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = parse_count)]
    rounds: usize,
    /// Seconds per bandwidth measurement (each side of a pair)
    #[arg(long, value_name = "S", default_value = "1", value_parser = parse_seconds)]
    seconds: f64,
    /// Alternating pairs per bandwidth row
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = parse_count)]
    pairs: usize,
}

fn pinned(windows: bool, monitor: bool) -> BridgeOptions {
    BridgeOptions {
        policy: Policy::default().require(Strategy::PinnedHost),
        windows,
        monitor_host: monitor,
        ..Default::default()
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// MiB/s of WRITEs of `size` from `local` to `key` over `conn`, 16 in flight, for `secs`;
/// completions reaped after the deadline do not count.
fn write_bw(conn: &Connection, local: &Registered, key: &RemoteKey, size: u64, secs: f64) -> Res<f64> {
    let held = local.lock()?;
    let (l, r) = (held.slice(0, size)?, key.slice(0, size)?);
    let mut wcs = [WorkCompletion::default(); 16];
    let (mut posted, mut done, mut counted) = (0u64, 0u64, 0u64);
    let t = Instant::now();
    use p2pbridge_benches::drain::drain;
    loop {
        while posted - done < 16 && t.elapsed().as_secs_f64() < secs {
            // SAFETY: `held` keeps the registration live until every WRITE is reaped here, or
            // flushed and reaped by `drain` (which exits where the device flushes nothing,
            // before the region could go).
            unsafe { conn.qp().post_write(posted, &l, &r, SendFlags::SIGNALED) }
                .map_err(|e| drain(conn, posted - done, e))?;
            posted += 1;
        }
        if done == posted {
            break;
        }
        let n = conn.send_cq().poll(&mut wcs).map_err(|e| drain(conn, posted - done, e))?;
        let in_time = t.elapsed().as_secs_f64() < secs;
        for (k, wc) in wcs[..n].iter().enumerate() {
            done += 1;
            if let Err(e) = wc.ok() {
                // The rest of this batch is reaped already.
                let rest = (n - k - 1) as u64;
                return Err(drain(conn, posted - done - rest, e).into());
            }
            if in_time {
                counted += 1;
            }
        }
    }
    Ok((counted * size) as f64 / secs / (1 << 20) as f64)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fabric = fabric_or_usage_error::<Args>("run `scripts/softroce target/release/keys` (two Soft-RoCE hosts)");
    exit_status("keys", run(&args, &fabric))
}

fn run(args: &Args, fabric: &SoftRoce) -> Res {
    let (rounds, secs, pairs) = (args.rounds, args.seconds, args.pairs);
    let max = 1usize << 20;
    let (client, server) = fabric.connect_pair(
        ConnectionOptions { timeout: Duration::from_secs(60), ..Default::default() },
        move |pd| {
            let mem = HostBackend::new();
            let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], pinned(true, true))?;
            let buf = mem.alloc(max)?;
            let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
            Ok(((mem, bridge, buf, reg), Vec::new()))
        },
        move |pd| {
            let mem = HostBackend::new();
            let windowed = Bridge::new(pd, vec![Arc::new(mem.clone())], pinned(true, true))?;
            let plain = Bridge::new(pd, vec![Arc::new(mem.clone())], pinned(false, false))?;
            Ok(((mem, windowed, plain), Vec::new()))
        },
    )?;
    let (mem, windowed, plain) = &server.state;
    let conn = &server.conn;
    windowed.key_windows().as_result().map_err(|e| format!("this device has no memory windows to measure: {e}"))?;
    println!("device {}, {} rounds", fabric.b.device, rounds);

    // Revocation latency from munmap.
    let page = rustix::param::page_size();
    let mut from_munmap = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                16 * page,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }? as u64;
        // SAFETY: mapped; the monitor watches it, and its munmap below revokes it.
        let reg = unsafe { windowed.register_host(p, (16 * page) as u64, AccessFlags::remote_rw()) }?;
        let key = windowed.hand_out(conn, &reg, 0, (16 * page) as u64)?;
        drop(reg);
        let t = Instant::now();
        // SAFETY: ours.
        unsafe { rustix::mm::munmap(p as *mut _, 16 * page) }?;
        while windowed.check_key(&key).is_ok() {
            std::hint::spin_loop();
        }
        from_munmap.push(us(t.elapsed()));
    }
    // Revocation latency from a backend free (the free returns once the key is revoked).
    let mut from_free = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let buf = mem.alloc(16 * page)?;
        let reg = windowed.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
        let key = windowed.hand_out(conn, &reg, 0, buf.len())?;
        let t = Instant::now();
        drop(buf);
        from_free.push(us(t.elapsed()));
        if windowed.check_key(&key).is_ok() {
            return Err("a freed buffer's key survived its free".into());
        }
    }
    println!(
        "revocation latency, munmap -> key revoked: median {:.1} us, p99 {:.1} us",
        percentile(&mut from_munmap, 0.5),
        percentile(&mut from_munmap, 0.99)
    );
    println!(
        "revocation latency, backend free -> key revoked (the free's own time): median {:.1} us, p99 {:.1} us",
        percentile(&mut from_free, 0.5),
        percentile(&mut from_free, 0.99)
    );

    // Hand-out cost.
    let buf = mem.alloc(max)?;
    let wreg = windowed.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
    let preg = plain.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
    let (mut with_mw, mut without) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let k = windowed.hand_out(conn, &wreg, 0, max as u64)?;
        with_mw.push(us(t.elapsed()));
        windowed.revoke_key(&k)?;
        let t = Instant::now();
        let k = plain.hand_out(conn, &preg, 0, max as u64)?;
        without.push(us(t.elapsed()));
        plain.revoke_key(&k)?;
    }
    let (m_with, m_without) = (percentile(&mut with_mw, 0.5), percentile(&mut without, 0.5));
    println!(
        "hand-out: with a window bind median {m_with:.1} us, without {m_without:.2} us ({:.0}x)",
        m_with / m_without
    );

    // Bandwidth: window key against the region's own key.
    let wkey = windowed.hand_out(conn, &wreg, 0, max as u64)?;
    let pkey = plain.hand_out(conn, &preg, 0, max as u64)?;
    let (_, _, _, creg) = &client.state;
    for size in [64u64 << 10, 1 << 20] {
        let mut ratios = Vec::new();
        for i in 0..pairs {
            // Each pair alternates which key goes first.
            let (w, m) = if i % 2 == 0 {
                let w = write_bw(&client.conn, creg, &wkey, size, secs)?;
                (w, write_bw(&client.conn, creg, &pkey, size, secs)?)
            } else {
                let m = write_bw(&client.conn, creg, &pkey, size, secs)?;
                (write_bw(&client.conn, creg, &wkey, size, secs)?, m)
            };
            ratios.push(w / m);
        }
        let (lo, hi) = (ratios.iter().cloned().fold(f64::MAX, f64::min), ratios.iter().cloned().fold(0.0, f64::max));
        println!(
            "WRITE {} KiB: window key / region key = {:.3} median of {pairs} pairs (spread {lo:.3}..{hi:.3})",
            size >> 10,
            percentile(&mut ratios, 0.5)
        );
    }
    drop(client);
    Ok(())
}
