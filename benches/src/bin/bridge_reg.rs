//! Cold registration cost through the bridge, 4 KiB to 1 GiB, per strategy the device
//! supports (pinned host, ODP), with the cache-hit cost beside it for scale.
//!
//! ```text
//! cargo build --release -p p2pbridge-benches && scripts/softroce --mem 6144 target/release/bridge_reg
//! ```
//! (Any RDMA device works: `--device NAME`; under scripts/softroce it uses host A's.)
//!
//! `--hits [N]` (default 100000) measures the hit path instead (issue 13): one host
//! allocation, N registrations of 4 KiB at a 2-page stride (gaps, so they do not merge: N
//! entries in one domain), then random hits through `Bridge::register` against bare
//! `RegCache::lookup` on `RegCache<()>`s holding the same ranges, in the same run, rounds
//! interleaved. Prints the medians over rounds (ns per hit) and their ratio. One bare cache is
//! filled as the bridge registers, so that its entries are as scattered in memory as the
//! bridge's (the comparison is then of the paths, not of where the allocator put entries);
//! one is filled afterwards, packed, for comparison. `--strategy
//! pinned|odp` (default pinned) picks how the N ranges are registered.
//!
//! ```text
//! scripts/softroce --mem 6144 target/release/bridge_reg --hits 100000
//! ```
//!
//! Exit status: 0 done; 1 a failure while running (printed as `bridge_reg: ERROR`), a hit
//! that missed included; 2 a usage error (bad arguments, or neither `--device` nor a
//! Soft-RoCE fabric).

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use p2pbridge::cache::{Cost, Domain, RegCache};
use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, Context, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions, Policy, Strategy};
use p2pbridge_benches::cli::{exit_status, fabric_or_usage_error, parse_count, Res, EXIT_CODES};
use p2pbridge_test_support::Rng;

/// Cold registration cost through the bridge, 4 KiB to 1 GiB, per strategy the device supports
/// (pinned host, ODP), with the cache-hit cost beside it; or, with --hits, the hit path against
/// a bare cache lookup.
#[derive(Parser, Debug)]
#[command(name = "bridge_reg", version, after_help = EXIT_CODES)]
struct Args {
    /// The RDMA device (default: host A's, under scripts/softroce)
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
    /// Measure the hit path instead: N page-strided 4 KiB registrations, then random hits
    /// (N: 100000 when not given)
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "100000", value_parser = parse_count)]
    hits: Option<usize>,
    /// With --hits: how the N ranges are registered
    #[arg(long, value_enum, default_value_t = HitStrategy::Pinned)]
    strategy: HitStrategy,
}

/// How `--hits` registers its ranges.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum HitStrategy {
    /// Pinned host memory
    Pinned,
    /// On-Demand Paging
    Odp,
}

/// Hits per timed round.
const BATCH: usize = 20_000;
/// Timed rounds per side (bridge, bare cache), interleaved.
const ROUNDS: usize = 41;

/// Keeps a handle from being optimised away, by reference (what a caller gets is used in
/// place, not copied), and drops it.
fn used<T>(handle: T) {
    black_box(&handle);
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `--hits`: N page-strided registrations of one allocation, then random hits through the
/// bridge and through a bare cache of the same ranges.
fn hits(pd: &ProtectionDomain, device: &str, n: usize, strategy: Strategy) -> Res {
    let mem = HostBackend::new();
    let defaults = BridgeOptions::default();
    let mut cache = defaults.cache.clone();
    let default_entries = cache.max_entries;
    cache.max_entries = cache.max_entries.max(n + 16);
    let bridge = Bridge::new(
        pd,
        vec![Arc::new(mem.clone())],
        BridgeOptions { policy: Policy::default().require(strategy), cache, ..defaults },
    )?;
    let page = 4096u64;
    let stride = 2 * page;
    let buf = mem.alloc(n * stride as usize)?;
    let access = AccessFlags::remote_rw();
    println!(
        "hit path on {device}: {n} registrations ({strategy}) of 4 KiB at a {stride}-byte stride in one {} MiB allocation; default max_entries here {default_entries}",
        buf.len() >> 20
    );
    let bits = (access | AccessFlags::LOCAL_WRITE).bits();
    let domain = Domain::Alloc(buf.key());
    // The same ranges in bare caches, as the bridge stores them (its access bits include
    // LOCAL_WRITE), declared as the bridge declares the allocation: one filled as the bridge
    // registers (its entries lie among the bridge's in memory, as scattered), one filled
    // afterwards (its entries packed together: fewer cache and TLB misses, whatever the path).
    let (beside, packed): (RegCache<()>, RegCache<()>) =
        (RegCache::new(bridge.cache_policy().clone()), RegCache::new(bridge.cache_policy().clone()));
    let insert = |c: &RegCache<()>, a: u64| -> Res {
        c.insert(domain, a..a + page, bits, Cost::Pinned, ()).map_err(|e| format!("bare cache insert: {e}"))?;
        Ok(())
    };
    let t = Instant::now();
    let mut regs = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let a = buf.addr() + i * stride;
        regs.push(bridge.register(a, page, access)?);
        insert(&beside, a)?;
    }
    let made = t.elapsed();
    drop(regs); // unheld: the cache keeps them (within its limits)
    for i in 0..n as u64 {
        insert(&packed, buf.addr() + i * stride)?;
    }
    for c in [&beside, &packed] {
        c.declare(domain, buf.addr()..buf.addr() + buf.len());
    }
    let (entries, bytes) = bridge.cache_usage();
    println!(
        "  registered in {made:.2?} ({:.1} us each); cache: {entries} entries, {bytes} bytes",
        made.as_secs_f64() * 1e6 / n as f64
    );
    if entries != n {
        return Err(format!("expected {n} cache entries, found {entries} (merged or evicted?)").into());
    }
    const SIDES: [&str; 4] = [
        "Bridge::register hit",
        "RegCache::lookup (filled beside the bridge's)",
        "RegCache::lookup_at (filled beside)",
        "RegCache::lookup (filled afterwards, packed)",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // ns per hit, per round and side.
    let mut times: [Vec<f64>; SIDES.len()] = Default::default();
    let mut addrs = vec![0u64; BATCH];
    for round in 0..=ROUNDS {
        for a in addrs.iter_mut() {
            *a = buf.addr() + rng.below(n as u64) * stride;
        }
        // Rotate which side goes first, so that none always runs on a warmer cache.
        for k in 0..SIDES.len() {
            let side = (round + k) % SIDES.len();
            let t = Instant::now();
            for &a in &addrs {
                let hit = match side {
                    0 => bridge.register(black_box(a), page, access).map(used).is_ok(),
                    1 => beside.lookup(domain, black_box(a)..a + page, bits).map(used).is_some(),
                    2 => beside.lookup_at(black_box(a)..a + page, bits).map(used).is_some(),
                    _ => packed.lookup(domain, black_box(a)..a + page, bits).map(used).is_some(),
                };
                if !hit {
                    return Err(format!("a hit at {a:#x} failed ({})", SIDES[side]).into());
                }
            }
            let ns = t.elapsed().as_secs_f64() * 1e9 / BATCH as f64;
            if round > 0 {
                times[side].push(ns); // round 0 is warm-up
            }
        }
    }
    let (entries_after, _) = bridge.cache_usage();
    if entries_after != n {
        return Err(format!("the hits changed the cache ({n} -> {entries_after} entries): some missed").into());
    }
    println!("  {ROUNDS} rounds x {BATCH} random hits among {n} entries of one domain, ns per hit:");
    let mut medians = [0f64; SIDES.len()];
    for (i, name) in SIDES.iter().enumerate() {
        medians[i] = median(&mut times[i]);
        let t = &times[i];
        println!("    {name:<46} median {:8.1} (min {:.1}, max {:.1})", medians[i], t[0], t[t.len() - 1]);
    }
    println!(
        "    ratio Bridge::register / RegCache::lookup: {:.2} (filled beside; target <= 1.5), {:.2} (packed)",
        medians[0] / medians[1],
        medians[0] / medians[3]
    );
    drop(bridge);
    drop(buf);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let device = match &args.device {
        Some(d) => d.clone(),
        None => fabric_or_usage_error::<Args>("give --device NAME, or run under scripts/softroce").a.device,
    };
    exit_status("bridge_reg", run(&args, &device))
}

fn run(args: &Args, device: &str) -> Res {
    let pd = ProtectionDomain::new(&Context::open(device)?)?;
    if let Some(n) = args.hits {
        let strategy = match args.strategy {
            HitStrategy::Pinned => Strategy::PinnedHost,
            HitStrategy::Odp => Strategy::Odp,
        };
        return hits(&pd, device, n, strategy);
    }
    let mem = HostBackend::new();
    println!("cold registration through the bridge on {device} (register + first lookup; then a cache hit)");
    for strategy in [Strategy::PinnedHost, Strategy::Odp] {
        let bridge = Bridge::new(
            &pd,
            vec![Arc::new(mem.clone())],
            BridgeOptions { policy: Policy::default().require(strategy), ..Default::default() },
        )?;
        let mut size = 4096usize;
        while size <= 1 << 30 {
            let buf = mem.alloc(size)?;
            if strategy == Strategy::PinnedHost {
                // Fault the pages in first: the cost measured is the registration's.
                mem.copy_to_device(&buf, 0, &vec![1u8; size])?;
            }
            let t = Instant::now();
            let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
            let cold = t.elapsed();
            let t = Instant::now();
            let hit = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
            let warm = t.elapsed();
            println!("  {strategy:<7} {size:>11} B: cold {cold:>12.2?}  hit {warm:>9.2?}");
            drop((reg, hit));
            let t = Instant::now();
            drop(buf); // notice -> invalidate -> deregister -> unmap
            println!("  {strategy:<7} {size:>11} B: free-to-invalidated (with deregistration) {:.2?}", t.elapsed());
            size *= 4;
        }
    }
    Ok(())
}
