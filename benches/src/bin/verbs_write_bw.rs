//! RDMA WRITE bandwidth and message rate through `p2pbridge-verbs`, against perftest's
//! `ib_write_bw` on the same link, in one run.
//!
//! ```text
//! scripts/bench          # builds in release mode and runs this inside scripts/softroce
//! ```
//!
//! Both sides keep the same number of writes in flight (`--depth`, default 128, as perftest's
//! tx depth) and ask for a completion every `--cq-mod` writes (default 100, as perftest).
//! Payloads that fit the QP's inline limit are posted inline, as perftest does. Each
//! measurement runs `--seconds` (default 3) and the pair is repeated `--rounds` times
//! (default 3), alternating ours and perftest's; the best of each is compared.
//!
//! Exit status: 0 done (the targets are reported, not enforced); 1 a measurement failed
//! (printed as `verbs_write_bw: ERROR`); 2 a usage error (bad arguments, or no Soft-RoCE
//! fabric).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use p2pbridge_verbs::{AccessFlags, ConnectionOptions, HostBuffer, MemoryRegion, RemoteBuf, SendFlags, WorkCompletion};

use p2pbridge_benches::cli::{
    exit_status, fabric_or_usage_error, parse_count, parse_seconds, usage_error, Res, EXIT_CODES,
};
use p2pbridge_benches::perftest::{self, Figures};
use p2pbridge_test_support::fabric::{Side, SoftRoce};

/// RDMA WRITE bandwidth (64 KiB) and message rate (64 B) through p2pbridge-verbs against
/// perftest's ib_write_bw on the same link (across the two Soft-RoCE hosts of
/// scripts/softroce; scripts/bench runs it)
#[derive(Parser, Debug)]
#[command(name = "verbs_write_bw", version, after_help = EXIT_CODES)]
struct Opts {
    /// Seconds per measurement
    #[arg(long, value_name = "S", default_value = "3", value_parser = parse_seconds)]
    seconds: f64,
    /// Writes in flight, both sides (perftest's tx depth)
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = parse_count)]
    depth: usize,
    /// A completion every N writes, both sides (at most --depth)
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = parse_count)]
    cq_mod: usize,
    /// Rounds of each pair (ours, perftest's); the best of each is compared
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count)]
    rounds: usize,
}

fn ours(fabric: &SoftRoce, size: usize, o: &Opts) -> Res<Figures> {
    let opts = ConnectionOptions { send_depth: o.depth as u32 + 1, max_inline: 220, ..Default::default() };
    let (client, _server): (Side<MemoryRegion<HostBuffer>>, Side<MemoryRegion<HostBuffer>>) = fabric.connect_pair(
        opts,
        move |pd| Ok((pd.register(HostBuffer::new(size)?, AccessFlags::LOCAL_WRITE)?, Vec::new())),
        move |pd| {
            let mr = pd.register(HostBuffer::new(size)?, AccessFlags::remote_rw())?;
            let d = mr.remote().to_bytes().to_vec();
            Ok((mr, d))
        },
    )?;
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data())?.slice(..)?;
    let local = client.state.slice(..)?;
    let qp = client.conn.qp();
    let cq = client.conn.send_cq();
    let inline = if local.len() <= qp.max_inline() { SendFlags::INLINE } else { SendFlags::empty() };
    let mut wcs = [WorkCompletion::default(); 16];
    let (mut posted, mut completed) = (0usize, 0usize);
    let deadline = Duration::from_secs_f64(o.seconds);
    let start = Instant::now();
    let mut elapsed;
    loop {
        while posted - completed < o.depth {
            let signal = if (posted + 1) % o.cq_mod == 0 { SendFlags::SIGNALED } else { SendFlags::empty() };
            // SAFETY: `local` is `client.state`'s region, which is dropped after `client.conn`
            // (declared first in `Side`), whose queue pair's destruction ends every request.
            unsafe { qp.post_write(posted as u64, &local, &remote, signal | inline) }?;
            posted += 1;
        }
        let n = cq.poll(&mut wcs)?;
        for wc in &wcs[..n] {
            wc.ok()?;
            completed = wc.wr_id as usize + 1;
        }
        elapsed = start.elapsed();
        if elapsed >= deadline {
            break;
        }
    }
    // Drain: what is counted is what completed.
    let last_signaled = (posted / o.cq_mod) * o.cq_mod;
    while completed < last_signaled {
        let n = cq.poll(&mut wcs)?;
        for wc in &wcs[..n] {
            wc.ok()?;
            completed = wc.wr_id as usize + 1;
        }
    }
    let t = elapsed.as_secs_f64();
    let msgs = completed as f64;
    Ok(Figures { mib_s: msgs * size as f64 / t / (1 << 20) as f64, mpps: msgs / t / 1e6 })
}

fn best(a: Figures, b: Figures) -> Figures {
    Figures { mib_s: a.mib_s.max(b.mib_s), mpps: a.mpps.max(b.mpps) }
}

fn main() -> ExitCode {
    let o = Opts::parse();
    if o.cq_mod > o.depth {
        usage_error::<Opts>(format!("--cq-mod ({}) is larger than --depth ({})", o.cq_mod, o.depth));
    }
    let fabric = fabric_or_usage_error::<Opts>("run it under scripts/softroce (or scripts/bench)");
    exit_status("verbs_write_bw", run(&fabric, &o))
}

fn run(fabric: &SoftRoce, o: &Opts) -> Res {
    println!(
        "RDMA WRITE, {} -> {}, kernel {}, depth {}, cq-mod {}, {} s x {} rounds",
        fabric.a.device, fabric.b.device, fabric.kernel, o.depth, o.cq_mod, o.seconds, o.rounds
    );
    let mut failed = Vec::new();
    for (size, what) in [(65_536usize, "bandwidth"), (64, "message rate")] {
        let (mut us, mut them) = (Figures::default(), Figures::default());
        for round in 0..o.rounds {
            match perftest::run(
                fabric,
                "ib_write_bw",
                size,
                &perftest::Params { seconds: o.seconds, depth: o.depth, cq_mod: o.cq_mod },
            ) {
                Ok(f) => {
                    println!("  {size:>6} B round {round}: ib_write_bw    {:>9.2} MiB/s {:>8.4} Mpps", f.mib_s, f.mpps);
                    them = best(them, f);
                }
                Err(e) => {
                    eprintln!("verbs_write_bw: ib_write_bw failed ({size} B, round {round}): {e}");
                    failed.push(format!("ib_write_bw {size} B round {round}"));
                }
            }
            match ours(fabric, size, o) {
                Ok(f) => {
                    println!(
                        "  {size:>6} B round {round}: p2pbridge-verbs {:>9.2} MiB/s {:>8.4} Mpps",
                        f.mib_s, f.mpps
                    );
                    us = best(us, f);
                }
                Err(e) => {
                    eprintln!("verbs_write_bw: p2pbridge-verbs failed ({size} B, round {round}): {e}");
                    failed.push(format!("p2pbridge-verbs {size} B round {round}"));
                }
            }
        }
        let (ratio, target) = if size == 64 { (us.mpps / them.mpps, 0.95) } else { (us.mib_s / them.mib_s, 0.97) };
        println!(
            "{size} B {what}: p2pbridge-verbs / ib_write_bw = {ratio:.3} (target >= {target}): {}",
            if ratio >= target { "met" } else { "NOT met" }
        );
    }
    if !failed.is_empty() {
        return Err(format!("{} measurement(s) failed: {}", failed.len(), failed.join(", ")).into());
    }
    Ok(())
}
