//! `transfer_bw`: the transfer API against perftest on the same link, by the method of
//! `docs/benchmarks.md`.
//!
//! ```text
//! cargo build --release -p p2pbridge-benches
//! scripts/softroce target/release/transfer_bw          # CSV + SVG in target/p2pbridge-bench/
//! ```
//!
//! Rows (each the median of `--pairs` alternating pairs, with the spread):
//! - `write` / `read` at 64 KiB and 1 MiB: `Bridge::post` at depth `--depth` against
//!   `ib_write_bw` / `ib_read_bw -t DEPTH -Q 1 -I 0`;
//! - `write` at 64 B: message rate against `ib_write_bw -s 64`;
//! - `bounce` at 1 MiB and 4 MiB: a bounce registration (the engine, ring = depth) against a
//!   direct one, same size and depth;
//! - `conns` with 1, 8 and 64 connections through one bridge sharing one completion queue:
//!   aggregate 64 KiB WRITE bandwidth against one connection's (the same requests in flight in
//!   all: DEPTH, spread over the connections, at least one each), and CPU time per MiB moved.
//!
//! Exit status: 0 done (targets are reported, not enforced); 1 a measurement failed (printed
//! as `transfer_bw: ERROR`); 2 a usage error (bad arguments, or no Soft-RoCE fabric).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use p2pbridge::gpu::{DeviceBuffer, HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, CompletionQueue, Connection, ConnectionOptions, Listener, ProtectionDomain};
use p2pbridge::{Batch, BounceConfig, Bridge, BridgeOptions, Policy, Registered, RemoteKey, Strategy, Transfer};
use p2pbridge_benches::cli::{exit_status, fabric_or_usage_error, parse_count, parse_seconds, Res, EXIT_CODES};
use p2pbridge_benches::perftest;
use p2pbridge_benches::plot::{svg, Series};
use p2pbridge_test_support::fabric::{BoxError, SoftRoce};

/// The transfer API against perftest, by the method of docs/benchmarks.md.
#[derive(Parser, Debug)]
#[command(name = "transfer_bw", version, about, after_help = EXIT_CODES)]
struct Args {
    /// Seconds per measurement (perftest's -D takes whole seconds: rounded up for it).
    #[arg(long, default_value = "1", value_parser = parse_seconds)]
    seconds: f64,
    /// Alternating pairs per row (at least 7 for a report).
    #[arg(long, default_value_t = 7, value_parser = parse_count)]
    pairs: usize,
    /// Requests in flight, both sides.
    #[arg(long, default_value_t = 16, value_parser = parse_count)]
    depth: usize,
    /// Where the CSV and the plot go.
    #[arg(long, default_value = "target/p2pbridge-bench")]
    out: PathBuf,
    /// Only these rows (write, read, rate, bounce, conns; comma-separated). `calibrate`, not
    /// run unless asked for, runs `ib_write_bw` at 64 KiB against itself by the same method:
    /// the spread a ratio of 1 shows on this link.
    #[arg(long, value_delimiter = ',', default_value = "write,read,rate,bounce,conns",
          value_parser = ["write", "read", "rate", "bounce", "conns", "calibrate"])]
    only: Vec<String>,
}

const MIB: f64 = (1u64 << 20) as f64;

/// One side of the link: a bridge over host memory, a buffer and its registration.
struct Side {
    bridge: Bridge,
    _mem: HostBackend,
    _buf: DeviceBuffer,
    reg: Registered,
}

fn side(pd: &ProtectionDomain, len: usize, strategy: Strategy, depth: usize) -> p2pbridge::Result<Side> {
    let mem = HostBackend::new();
    let opts = BridgeOptions {
        policy: Policy::default().require(strategy),
        bounce: BounceConfig { chunk: 4 << 20, ring: depth, ..Default::default() },
        ..Default::default()
    };
    let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], opts)?;
    let buf = mem.alloc(len)?;
    mem.copy_to_device(&buf, 0, &vec![0x5a; len])?;
    let reg = bridge.register(buf.addr(), len as u64, AccessFlags::remote_rw())?;
    Ok(Side { bridge, _mem: mem, _buf: buf, reg })
}

fn conn_opts(cq: Option<Arc<CompletionQueue>>) -> ConnectionOptions {
    ConnectionOptions {
        timeout: Duration::from_secs(60),
        rnr_retry_count: 7,
        send_cq: cq,
        send_depth: 64,
        ..Default::default()
    }
}

/// How long a measurement runs.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Until a deadline: only transfers reaped done before it count.
    Seconds(f64),
    /// Until this many descriptors have completed: all count, and the time runs to the last.
    Descriptors(u64),
}

/// What one measurement moved.
#[derive(Debug, Clone, Copy, Default)]
struct Moved {
    bytes: f64,
    ops: f64,
    secs: f64,
    cpu_secs: f64,
}

impl Moved {
    fn mib_s(&self) -> f64 {
        self.bytes / MIB / self.secs
    }
    fn mops(&self) -> f64 {
        self.ops / 1e6 / self.secs
    }
}

/// This process's CPU time (user + system) in seconds, from /proc/self/stat (in clock ticks
/// of 10 ms: coarse, but over whole-second measurements within 1%).
fn cpu_time() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Keeps `depth` descriptors of `size` bytes in flight on every connection (round-robin, one
/// thread: one progress path), each connection's transfers of `group` descriptors, for
/// `secs`; counts the descriptors of transfers reaped done before the deadline.
#[allow(clippy::too_many_arguments)]
fn drive(
    bridge: &Bridge,
    conns: &[(&Connection, &RemoteKey)],
    reg: &Registered,
    read: bool,
    size: u64,
    depth: usize,
    group: usize,
    limit: Limit,
) -> p2pbridge::Result<Moved> {
    let slots = perftest::address_cycle(size).min((reg.len() / size).max(1));
    let (deadline, total) = match limit {
        Limit::Seconds(s) => (Duration::from_secs_f64(s), u64::MAX),
        Limit::Descriptors(n) => (Duration::MAX, n),
    };
    let (t0, c0) = (Instant::now(), cpu_time());
    // A deadline is kept by a timer thread, as perftest's by an alarm, so that the loop reads
    // no clock. The timer raises the flag, then notes the time: a round's completions count
    // only when the flag was still down after the round's reaping (so all were reaped before
    // it went up), and the time counted runs to the note, a little past the flag.
    let stop = AtomicBool::new(false);
    let raised = Mutex::new(None::<Duration>);
    let done = std::thread::scope(|s| -> p2pbridge::Result<u64> {
        if let Limit::Seconds(_) = limit {
            s.spawn(|| {
                let end = t0 + deadline;
                while let Some(left) = end.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
                    std::thread::sleep(left);
                }
                stop.store(true, Ordering::SeqCst);
                *raised.lock().unwrap_or_else(|e| e.into_inner()) = Some(t0.elapsed());
            });
        }
        let mut inflight: Vec<VecDeque<Transfer<'_>>> = conns.iter().map(|_| VecDeque::new()).collect();
        let mut next = 0u64;
        let mut done = 0u64;
        loop {
            let live = !stop.load(Ordering::SeqCst) && next < total;
            let mut any = false;
            let mut reaped = 0u64;
            for (c, q) in conns.iter().zip(inflight.iter_mut()) {
                while live && next < total && q.len() * group < depth {
                    let mut b = Batch::new();
                    for _ in 0..group {
                        let at = (next % slots) * size;
                        next += 1;
                        if read {
                            b.read(reg, at, size, c.1, at);
                        } else {
                            b.write(reg, at, size, c.1, at);
                        }
                    }
                    q.push_back(bridge.post(c.0, b)?);
                }
                while let Some(front) = q.front_mut() {
                    if !front.poll()? {
                        break;
                    }
                    q.pop_front();
                    reaped += group as u64;
                }
                any |= !q.is_empty();
            }
            if !stop.load(Ordering::SeqCst) {
                done += reaped;
            }
            if !live && !any {
                break;
            }
        }
        Ok(done)
    })?;
    // A deadline: the time up to the flag's note (what came after is not counted). A fixed
    // amount: the time until its last completion.
    let secs = match *raised.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(at) => at.as_secs_f64(),
        None => t0.elapsed().as_secs_f64(),
    };
    Ok(Moved { bytes: done as f64 * size as f64, ops: done as f64, secs, cpu_secs: cpu_time() - c0 })
}

/// One row's pairs: (ours, theirs) figures.
struct RowResult {
    name: String,
    unit: &'static str,
    pairs: Vec<(f64, f64)>,
    target: f64,
    note: String,
}

impl RowResult {
    fn ratios(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.pairs.iter().map(|(a, b)| a / b).collect();
        r.sort_by(|a, b| a.total_cmp(b));
        r
    }
    fn median(&self) -> f64 {
        let r = self.ratios();
        if r.is_empty() {
            return f64::NAN;
        }
        let m = r.len() / 2;
        if r.len() % 2 == 1 {
            r[m]
        } else {
            (r[m - 1] + r[m]) / 2.0
        }
    }
}

/// Runs one pair, `ours` first in even pairs and `theirs` first in odd ones (a fixed order
/// biases rxe towards the second side: docs/benchmarks.md).
fn pair<A, B, EA: Into<BoxError>, EB: Into<BoxError>>(
    i: usize,
    ours: impl FnOnce() -> Result<A, EA>,
    theirs: impl FnOnce() -> Result<B, EB>,
) -> Res<(A, B)> {
    if i.is_multiple_of(2) {
        let o = ours().map_err(Into::into)?;
        Ok((o, theirs().map_err(Into::into)?))
    } else {
        let t = theirs().map_err(Into::into)?;
        Ok((ours().map_err(Into::into)?, t))
    }
}

fn size_name(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn run(a: &Args, fabric: &SoftRoce) -> Res<Vec<RowResult>> {
    let len = 64usize << 20;
    let depth = a.depth;
    let (client, server) = fabric.connect_pair(
        conn_opts(None),
        move |pd| {
            let direct = side(pd, len, Strategy::PinnedHost, depth)?;
            let bounce = side(pd, len, Strategy::Bounce, depth)?;
            Ok(((direct, bounce), Vec::new()))
        },
        move |pd| Ok((side(pd, len, Strategy::PinnedHost, depth)?, Vec::new())),
    )?;
    let (direct, bounce) = &client.state;
    let key = server.state.bridge.hand_out(&server.conn, &server.state.reg, 0, len as u64)?;
    let mut rows = Vec::new();
    let want = |r: &str| a.only.iter().any(|o| o == r);
    let p = perftest::Params { seconds: a.seconds, depth, cq_mod: 1 };
    let have_perftest = perftest::available("ib_write_bw");
    if !have_perftest && (want("write") || want("read") || want("rate")) {
        eprintln!(
            "transfer_bw: perftest is not installed: the perftest rows are skipped (scripts/softroce installs it)"
        );
    }
    let one = [(&client.conn, &key)];
    let mut pair_rows = Vec::new();
    if have_perftest {
        for (op, tool, read) in [("write", "ib_write_bw", false), ("read", "ib_read_bw", true)] {
            if want(op) {
                for size in [64u64 << 10, 1 << 20] {
                    pair_rows.push((format!("{op} {} vs {tool}", size_name(size)), tool, read, size, false));
                }
            }
        }
        if want("rate") {
            pair_rows.push(("write 64 B message rate vs ib_write_bw".into(), "ib_write_bw", false, 64, true));
        }
    }
    for (name, tool, read, size, rate) in pair_rows {
        let mut pairs = Vec::new();
        for i in 0..a.pairs {
            let (ours, theirs) = pair(
                i,
                || drive(&direct.bridge, &one, &direct.reg, read, size, depth, 1, Limit::Seconds(a.seconds)),
                || perftest::run(fabric, tool, size as usize, &p).map_err(|e| format!("{tool}: {e}")),
            )?;
            let (o, t) = if rate { (ours.mops(), theirs.mpps) } else { (ours.mib_s(), theirs.mib_s) };
            eprintln!("{name}: pair {}: ours {o:.3}, {tool} {t:.3}", i + 1);
            pairs.push((o, t));
        }
        let target = if rate { 0.95 } else { 0.97 };
        let unit = if rate { "Mmsg/s" } else { "MiB/s" };
        rows.push(RowResult {
            name,
            unit,
            pairs,
            target,
            note: format!("depth {depth}, no inline, every request signalled"),
        });
    }
    if have_perftest && want("calibrate") {
        let (tool, size) = ("ib_write_bw", 64usize << 10);
        let mut pairs = Vec::new();
        for i in 0..a.pairs {
            let run = || perftest::run(fabric, tool, size, &p).map_err(|e| format!("{tool}: {e}"));
            let (x, y) = pair(i, run, run)?;
            eprintln!("calibrate: pair {}: {tool} (as ours) {:.3}, {tool} {:.3}", i + 1, x.mib_s, y.mib_s);
            pairs.push((x.mib_s, y.mib_s));
        }
        rows.push(RowResult {
            name: format!("{tool} 64 KiB vs itself (calibration)"),
            unit: "MiB/s",
            pairs,
            target: 0.0,
            note: format!("depth {depth}: the spread of a true ratio of 1"),
        });
    }
    if want("bounce") {
        for size in [1u64 << 20, 4 << 20] {
            let mut pairs = Vec::new();
            // The engine runs a transfer's bounce WRITEs as one pipeline of `depth` chunks in
            // flight, drained at the transfer's end: transfers of 4 x depth descriptors keep
            // that drain to one in four depths. A bounce transfer is done only when its last
            // chunk is: counted against a deadline, a whole transfer would be lost at it. So
            // both sides move the same fixed amount, 512 MiB, timed to its last completion.
            let group = 4 * depth;
            let n = Limit::Descriptors(((512u64 << 20) / size).next_multiple_of(group as u64));
            for i in 0..a.pairs {
                let (b, d) = pair(
                    i,
                    || drive(&bounce.bridge, &one, &bounce.reg, false, size, depth, group, n),
                    || drive(&direct.bridge, &one, &direct.reg, false, size, depth, 1, n),
                )?;
                eprintln!(
                    "bounce {}: pair {}: bounce {:.1}, direct {:.1} MiB/s",
                    size_name(size),
                    i + 1,
                    b.mib_s(),
                    d.mib_s()
                );
                pairs.push((b.mib_s(), d.mib_s()));
            }
            rows.push(RowResult {
                name: format!("bounce write {} vs direct", size_name(size)),
                unit: "MiB/s",
                pairs,
                target: 0.9,
                note: format!("depth {depth} both (bounce: ring of {depth} chunks), host backend"),
            });
        }
    }
    if want("conns") {
        rows.extend(connections(a, fabric, direct, &client.pd, &server)?);
    }
    Ok(rows)
}

/// Aggregate bandwidth over 1, 8 and 64 connections through one bridge, all sharing one send
/// completion queue, against one connection's, in alternating pairs.
fn connections(
    a: &Args,
    fabric: &SoftRoce,
    client: &Side,
    cpd: &ProtectionDomain,
    server: &p2pbridge_test_support::fabric::Side<Side>,
) -> Res<Vec<RowResult>> {
    const N: usize = 64;
    let size = 64u64 << 10;
    let cq = Arc::new(CompletionQueue::new(cpd.context(), 8192)?);
    // The server accepts N connections and hands each the whole buffer.
    let b = fabric.b.clone();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (keys_tx, keys_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (sbridge, sreg) = (server.state.bridge.clone(), &server.state.reg);
    let sreg_len = sreg.len();
    let spd = server.pd.clone();
    std::thread::scope(|s| -> Res<Vec<RowResult>> {
        let srv = s.spawn(move || -> Res {
            b.enter()?;
            let l = Listener::bind((b.addr, 0).into())?;
            let _ = port_tx.send(l.local_addr());
            let mut conns = Vec::new();
            for _ in 0..N {
                let conn = l.get_request(Duration::from_secs(120))?.accept(&spd, &conn_opts(None))?;
                let _ = keys_tx.send(sbridge.hand_out(&conn, sreg, 0, sreg_len)?);
                conns.push(conn);
            }
            let _ = done_rx.recv();
            Ok(())
        });
        fabric.a.enter()?;
        let to = port_rx.recv().map_err(|_| "the server thread failed")?;
        let mut conns = Vec::new();
        for _ in 0..N {
            let c = Connection::connect(cpd, to, &conn_opts(Some(cq.clone())))?;
            let k = keys_rx.recv().map_err(|_| "the server thread failed")?;
            conns.push((c, k));
        }
        let mut rows = Vec::new();
        for n in [8usize, 64] {
            let mut pairs = Vec::new();
            let mut cpu = (0.0, 0.0);
            for i in 0..a.pairs {
                let many: Vec<_> = conns[..n].iter().map(|(c, k)| (c, k)).collect();
                let one: Vec<_> = conns[..1].iter().map(|(c, k)| (c, k)).collect();
                // The same requests in flight in all (DEPTH, or one per connection where there
                // are more connections), spread over the connections.
                let per = (a.depth / n).max(1);
                let (m, o) = pair(
                    i,
                    || drive(&client.bridge, &many, &client.reg, false, size, per, 1, Limit::Seconds(a.seconds)),
                    || drive(&client.bridge, &one, &client.reg, false, size, a.depth, 1, Limit::Seconds(a.seconds)),
                )?;
                eprintln!(
                    "{n} connections: pair {}: {:.1} MiB/s, 1 connection {:.1} MiB/s",
                    i + 1,
                    m.mib_s(),
                    o.mib_s()
                );
                pairs.push((m.mib_s(), o.mib_s()));
                cpu.0 += m.cpu_secs / (m.bytes / MIB);
                cpu.1 += o.cpu_secs / (o.bytes / MIB);
            }
            let k = a.pairs as f64;
            rows.push(RowResult {
                name: format!("{n} connections vs 1 (64 KiB WRITE)"),
                unit: "MiB/s",
                pairs,
                target: if n == 64 { 0.9 } else { 0.0 },
                note: format!(
                    "{} in flight per connection (1 connection: {}), one shared CQ; CPU {:.1} us/MiB ({n}) vs {:.1} us/MiB (1)",
                    (a.depth / n).max(1),
                    a.depth,
                    cpu.0 / k * 1e6,
                    cpu.1 / k * 1e6
                ),
            });
        }
        let _ = done_tx.send(());
        drop(conns);
        srv.join().map_err(|_| "the server thread panicked")??;
        Ok(rows)
    })
}

fn report(a: &Args, rows: &[RowResult], setting: &str) -> std::io::Result<()> {
    println!(
        "transfer_bw on {setting}: median of {} alternating pairs (first side alternating), {} s each",
        a.pairs, a.seconds
    );
    println!("{:<44} {:>10} {:>10} {:>8} {:>15} {:>7}  setting", "row", "ours", "theirs", "ratio", "spread", "target");
    let mut csv = String::from("row,pair,ours,theirs,unit,ratio\n");
    let mut series = Vec::new();
    for r in rows {
        let med = |v: Vec<f64>| {
            let mut v = v;
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let ours = med(r.pairs.iter().map(|p| p.0).collect());
        let theirs = med(r.pairs.iter().map(|p| p.1).collect());
        let ratios = r.ratios();
        let spread = format!("{:.3}..{:.3}", ratios.first().unwrap_or(&f64::NAN), ratios.last().unwrap_or(&f64::NAN));
        let target = if r.target > 0.0 {
            format!("{}{:.2}", if r.median() >= r.target { ">=" } else { "MISS " }, r.target)
        } else {
            "-".into()
        };
        println!(
            "{:<44} {:>10.3} {:>10.3} {:>8.3} {:>15} {:>7}  {} ({})",
            r.name,
            ours,
            theirs,
            r.median(),
            spread,
            target,
            r.unit,
            r.note
        );
        for (i, (o, t)) in r.pairs.iter().enumerate() {
            csv.push_str(&format!("{},{},{o:.4},{t:.4},{},{:.4}\n", r.name, i + 1, r.unit, o / t));
        }
        series.push(Series {
            label: r.name.clone(),
            points: r.pairs.iter().enumerate().map(|(i, (o, t))| ((i + 1) as u64, o / t)).collect(),
            dashed: false,
        });
    }
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("transfer_bw.csv"), csv)?;
    std::fs::write(
        a.out.join("transfer_bw.svg"),
        svg("p2pbridge transfer API: ratio to the reference, per pair", setting, &series),
    )?;
    println!("wrote {} and {}", a.out.join("transfer_bw.csv").display(), a.out.join("transfer_bw.svg").display());
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    let fabric = fabric_or_usage_error::<Args>("run `scripts/softroce target/release/transfer_bw`");
    exit_status("transfer_bw", measure(&a, &fabric))
}

fn measure(a: &Args, fabric: &SoftRoce) -> Res {
    let setting = format!("Soft-RoCE {} -> {} (kernel {})", fabric.a.device, fabric.b.device, fabric.kernel);
    let rows = run(a, fabric)?;
    report(a, &rows, &setting).map_err(|e| format!("cannot write results to {}: {e}", a.out.display()))?;
    Ok(())
}
