//! `p2pbridge-bench`: direct registration against bounce buffers, measured.
//!
//! ```text
//! cargo build --release -p p2pbridge-benches
//! scripts/softroce target/release/p2pbridge-bench            # CSV + SVG in target/p2pbridge-bench/
//! ```
//!
//! One process, one QP pair, the same buffers. A client on Soft-RoCE host A moves data to and
//! from a server buffer on host B. For each size, each strategy the host supports (dma-buf,
//! peer memory, ODP, pinned host; then the pipelined bounce engine) registers the client's
//! memory and is measured:
//! - RDMA WRITE and READ bandwidth and message rate (16 requests in flight, at most 64 MiB);
//! - latency p50/p99 (one request at a time);
//! - registration cost (cold, cache hit, and ODP first touch);
//! - flush cost.
//!
//! Where perftest is installed, `ib_write_bw`/`ib_read_bw` run on the same link, and our ratio
//! to them is printed. Options: `--min SIZE --max SIZE --seconds S --out DIR --chunk SIZE
//! --ring N --no-perftest` (sizes like 64, 4KiB, 256MiB); `--loopback IP --device NAME` (one
//! device, in this process), `--server IP:PORT` and `--client IP:PORT --device NAME` (across
//! two machines). `--help` lists them.
//!
//! Exit status: 0 done; 1 a failure while running (printed as `p2pbridge-bench: ERROR`); 2 a
//! usage error (bad arguments, or no Soft-RoCE fabric and no `--loopback`/`--server`/`--client`).

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use p2pbridge::gpu::{DeviceBuffer, HostBackend, MemoryBackend};
use p2pbridge::verbs::{
    AccessFlags, Connection, ConnectionOptions, Context, Listener, ProtectionDomain, SendFlags, WorkCompletion,
};
use p2pbridge::{BounceConfig, BounceEngine, Bridge, BridgeOptions, Policy, Registered, RemoteKey, Strategy};
use p2pbridge_benches::cli::{
    exit_status, fabric_or_usage_error, parse_count, parse_seconds, parse_size, usage_error, Res, EXIT_CODES,
};
use p2pbridge_benches::perftest;
use p2pbridge_benches::plot::{svg, Series};
use p2pbridge_test_support::fabric::{Host, SoftRoce};

/// Direct registration against bounce buffers, measured: for each size and each strategy the
/// host supports, RDMA WRITE and READ bandwidth, message rate, latency, registration and flush
/// cost; a CSV and a plot. By default across the two Soft-RoCE hosts of scripts/softroce.
#[derive(Parser, Debug)]
#[command(name = "p2pbridge-bench", version, after_help = EXIT_CODES)]
struct Args {
    /// The smallest size measured (64, 4KiB, 256MiB); sizes go up by 4x
    #[arg(long, value_name = "SIZE", default_value = "64", value_parser = parse_size)]
    min: usize,
    /// The largest size measured (and the buffers' size)
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    max: usize,
    /// Seconds per bandwidth measurement (latency: half of it)
    #[arg(long, value_name = "S", default_value = "0.5", value_parser = parse_seconds)]
    seconds: f64,
    /// Where results.csv and bandwidth.svg go
    #[arg(long, value_name = "DIR", default_value = "target/p2pbridge-bench")]
    out: PathBuf,
    /// The bounce engine's chunk size
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    chunk: usize,
    /// The bounce engine's ring: chunks in flight
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_count)]
    ring: usize,
    /// Do not run perftest for comparison
    #[arg(long)]
    no_perftest: bool,
    /// Both ends in this process on one device, connecting to this address of it (needs
    /// --device)
    #[arg(long, value_name = "IP", requires = "device", conflicts_with_all = ["server", "client"])]
    loopback: Option<IpAddr>,
    /// Serve a buffer of --max bytes at IP:PORT (port 0: any, printed) until the client
    /// disconnects
    #[arg(long, value_name = "IP:PORT", conflicts_with = "client")]
    server: Option<SocketAddr>,
    /// Measure against a server at IP:PORT (needs --device)
    #[arg(long, value_name = "IP:PORT", requires = "device")]
    client: Option<SocketAddr>,
    /// The RDMA device, with --loopback or --client (`ibv_devices`, `p2pbridge probe`)
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
}

/// Where the two ends run.
enum Mode {
    /// Across the Soft-RoCE hosts (scripts/softroce).
    Fabric,
    /// Client and server on one device, in this process.
    Loopback { device: String, addr: IpAddr },
    /// This process serves its buffer at ADDR until the client is done.
    Server { addr: SocketAddr },
    /// This process measures against a server at ADDR, through DEVICE.
    Client { addr: SocketAddr, device: String },
}

impl Args {
    /// The mode asked for; a usage error (exit 2) where the arguments do not make one.
    fn mode(&self) -> Mode {
        if self.min > self.max {
            usage_error::<Args>(format!("--min ({}) is larger than --max ({})", self.min, self.max));
        }
        match (self.loopback, self.server, self.client, &self.device) {
            (Some(addr), None, None, Some(device)) => Mode::Loopback { device: device.clone(), addr },
            (None, Some(addr), None, None) => Mode::Server { addr },
            (None, None, Some(addr), Some(device)) => Mode::Client { addr, device: device.clone() },
            (None, None, None, None) => Mode::Fabric,
            _ => usage_error::<Args>("--device goes with --loopback IP or --client IP:PORT"),
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    strategy: String,
    op: &'static str,
    size: usize,
    mib_s: f64,
    mops: f64,
    p50_us: f64,
    p99_us: f64,
    reg_cold_us: f64,
    reg_hit_us: f64,
    first_touch_us: f64,
    flush_us: f64,
}

const CSV_HEADER: &str = "strategy,op,size_bytes,bandwidth_mib_s,msg_rate_mops,lat_p50_us,lat_p99_us,reg_cold_us,reg_hit_us,odp_first_touch_us,flush_us";

impl Row {
    fn csv(&self) -> String {
        format!(
            "{},{},{},{:.3},{:.5},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2}",
            self.strategy,
            self.op,
            self.size,
            self.mib_s,
            self.mops,
            self.p50_us,
            self.p99_us,
            self.reg_cold_us,
            self.reg_hit_us,
            self.first_touch_us,
            self.flush_us
        )
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// What moves the client's bytes: a direct registration, or the bounce engine.
enum Mover<'a> {
    Direct(&'a Registered),
    Bounce(&'a std::cell::RefCell<BounceEngine>, u64),
}

use p2pbridge_benches::drain::drain;

fn one_op(conn: &Connection, m: &Mover<'_>, read: bool, size: usize, key: &RemoteKey) -> p2pbridge::Result<()> {
    match m {
        Mover::Direct(reg) => {
            let held = reg.lock()?;
            let (l, r) = (held.slice(0, size as u64)?, key.slice(0, size as u64)?);
            // SAFETY: `held` keeps the registration live until the request is reaped below, or
            // flushed and reaped by `drain` (which exits where the device flushes nothing,
            // before the region could go).
            unsafe {
                if read {
                    conn.qp().post_read(0, &l, &r, SendFlags::SIGNALED)?;
                } else {
                    conn.qp().post_write(0, &l, &r, SendFlags::SIGNALED)?;
                }
            }
            conn.send_cq().wait_one(Duration::from_secs(60)).map_err(|e| drain(conn, 1, p2pbridge::Error::from(e)))?;
            Ok(())
        }
        // SAFETY: the harness holds the client buffer for the whole run.
        Mover::Bounce(e, addr) => unsafe {
            if read {
                e.borrow_mut().read(conn, *addr, size as u64, key, 0)
            } else {
                e.borrow_mut().write(conn, *addr, size as u64, key, 0)
            }
        },
    }
}

/// Bandwidth with 16 requests in flight (direct), or back-to-back engine transfers (bounce).
fn bandwidth(
    conn: &Connection,
    m: &Mover<'_>,
    read: bool,
    size: usize,
    key: &RemoteKey,
    secs: f64,
) -> p2pbridge::Result<(f64, f64)> {
    let t = Instant::now();
    let mut done = 0u64;
    match m {
        Mover::Direct(reg) => {
            let held = reg.lock()?;
            let (l, r) = (held.slice(0, size as u64)?, key.slice(0, size as u64)?);
            let mut wcs = [WorkCompletion::default(); 16];
            let mut posted = 0u64;
            // 16 in flight, or fewer for large transfers: at most 64 MiB on the wire.
            let depth = (16u64).min(((64 << 20) / size as u64).max(1));
            loop {
                while posted - done < depth && t.elapsed().as_secs_f64() < secs {
                    // SAFETY: `held` keeps the registration live until every request is reaped
                    // here, or flushed and reaped by `drain` (which exits where the device
                    // flushes nothing, before the region could go).
                    let r = unsafe {
                        if read {
                            conn.qp().post_read(posted, &l, &r, SendFlags::SIGNALED)
                        } else {
                            conn.qp().post_write(posted, &l, &r, SendFlags::SIGNALED)
                        }
                    };
                    r.map_err(|e| drain(conn, posted - done, p2pbridge::Error::from(e)))?;
                    posted += 1;
                }
                if done == posted {
                    break;
                }
                let n =
                    conn.send_cq().poll(&mut wcs).map_err(|e| drain(conn, posted - done, p2pbridge::Error::from(e)))?;
                for (k, wc) in wcs[..n].iter().enumerate() {
                    done += 1;
                    if let Err(e) = wc.ok() {
                        // The rest of this batch is reaped already.
                        let rest = (n - k - 1) as u64;
                        return Err(drain(conn, posted - done - rest, p2pbridge::Error::from(e)));
                    }
                }
            }
        }
        Mover::Bounce(..) => {
            while done == 0 || t.elapsed().as_secs_f64() < secs {
                one_op(conn, m, read, size, key)?;
                done += 1;
            }
        }
    }
    let el = t.elapsed().as_secs_f64();
    Ok((done as f64 * size as f64 / el / (1 << 20) as f64, done as f64 / el / 1e6))
}

fn latency(
    conn: &Connection,
    m: &Mover<'_>,
    read: bool,
    size: usize,
    key: &RemoteKey,
    secs: f64,
) -> p2pbridge::Result<(f64, f64)> {
    let t = Instant::now();
    let mut samples = Vec::new();
    while samples.is_empty() || (t.elapsed().as_secs_f64() < secs && samples.len() < 5000) {
        let s = Instant::now();
        one_op(conn, m, read, size, key)?;
        samples.push(us(s.elapsed()));
    }
    Ok((percentile(&mut samples, 0.5), percentile(&mut samples, 0.99)))
}

struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        if self.tty {
            let w = 30;
            let filled = self.done * w / self.total.max(1);
            eprint!("\r[{}{}] {}/{} {what:<32}", "#".repeat(filled), " ".repeat(w - filled), self.done, self.total);
            let _ = std::io::stderr().flush();
        }
    }
}

fn size_name(b: usize) -> String {
    match b {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

type ServerState = (HostBackend, DeviceBuffer, Bridge, Registered);

/// The server's half: `max` bytes of host memory registered (pinned) for remote access; its
/// key is handed out once the connection is up ([`Bridge::hand_out`] binds a memory window to
/// the connection's queue pair where the device has them).
fn serve_buffer(pd: &ProtectionDomain, max: usize) -> p2pbridge::Result<ServerState> {
    let mem = HostBackend::new();
    let policy = Policy::default().require(Strategy::PinnedHost);
    let bridge = Bridge::new(pd, vec![Arc::new(mem.clone())], BridgeOptions { policy, ..Default::default() })?;
    let buf = mem.alloc(max)?;
    let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
    Ok((mem, buf, bridge, reg))
}

/// Connection options of the harness: the key travels over the connection as a SEND, retried
/// on RNR until the client's receive is posted.
fn conn_opts() -> ConnectionOptions {
    ConnectionOptions { timeout: Duration::from_secs(60), rnr_retry_count: 7, ..Default::default() }
}

/// The client's memory: `max` bytes from the host backend.
fn client_buffer(max: usize) -> p2pbridge::Result<(HostBackend, DeviceBuffer)> {
    let mem = HostBackend::new();
    let buf = mem.alloc(max)?;
    Ok((mem, buf))
}

/// Both ends in this process, on the fabric's two hosts (or one host twice: loopback).
fn run_pair(a: &Args, fabric: &SoftRoce) -> Res<Vec<Row>> {
    let max = a.max;
    let (client, server) = fabric.connect_pair(
        conn_opts(),
        move |_pd| Ok((client_buffer(max)?, Vec::new())),
        move |pd| Ok((serve_buffer(pd, max)?, Vec::new())),
    )?;
    let (_, _, sbridge, sreg) = &server.state;
    let key = sbridge.hand_out(&server.conn, sreg, 0, max as u64)?;
    let (mem, buf) = &client.state;
    Ok(sweep(a, &client.conn, &client.pd, mem, buf, &key)?)
}

/// This process serves its buffer to one client at `addr`, until that client disconnects.
fn serve(a: &Args, addr: SocketAddr) -> Res {
    let listener = Listener::bind(addr)?;
    println!("p2pbridge-bench server: listening on {} with {} of host memory", listener.local_addr(), size_name(a.max));
    let req = listener.get_request(Duration::from_secs(3600))?;
    let dev = req.device_name().ok_or("a connection request on an unknown device")?;
    let pd = ProtectionDomain::new(&Context::open(&dev)?)?;
    let (_mem, _buf, bridge, reg) = serve_buffer(&pd, a.max)?;
    let conn = req.accept(&pd, &conn_opts())?;
    let key = bridge.hand_out(&conn, &reg, 0, a.max as u64)?;
    bridge.send_key(&conn, &key)?;
    println!("client connected through {dev}; serving until it disconnects");
    conn.wait_disconnect(Duration::from_secs(24 * 3600))?;
    Ok(())
}

/// This process measures against a server at `addr`, through `device`.
fn run_client(a: &Args, addr: SocketAddr, device: &str) -> Res<Vec<Row>> {
    let pd = ProtectionDomain::new(&Context::open(device)?)?;
    let (mem, buf) = client_buffer(a.max)?;
    let conn = Connection::connect(&pd, addr, &conn_opts())?;
    let key = Bridge::new(&pd, Vec::new(), BridgeOptions::default())?.recv_key(&conn, Duration::from_secs(60))?;
    if key.len < a.max as u64 {
        return Err(format!("the server's buffer ({} B) is smaller than --max ({} B)", key.len, a.max).into());
    }
    Ok(sweep(a, &conn, &pd, &mem, &buf, &key)?)
}

/// The measurements: every strategy, every size, WRITE and READ.
fn sweep(
    a: &Args,
    conn: &Connection,
    pd: &ProtectionDomain,
    mem: &HostBackend,
    buf: &DeviceBuffer,
    key: &RemoteKey,
) -> p2pbridge::Result<Vec<Row>> {
    let key = *key;
    let sizes: Vec<usize> =
        std::iter::successors(Some(a.min), |s| s.checked_mul(4)).take_while(|&s| s <= a.max).collect();

    // Which direct strategies work for this memory here; each one's reason otherwise.
    let mut movers: Vec<(String, Option<Bridge>)> = Vec::new();
    for s in [Strategy::DmaBuf, Strategy::PeerMem, Strategy::Odp, Strategy::PinnedHost] {
        let b = Bridge::new(
            pd,
            vec![Arc::new(mem.clone())],
            BridgeOptions { policy: Policy::default().require(s), ..Default::default() },
        )?;
        match b.register(buf.addr(), 4096, AccessFlags::remote_rw()) {
            Ok(_) => movers.push((s.name().to_string(), Some(b))),
            Err(p2pbridge::Error::NoStrategy(reasons)) => {
                for (_, why) in reasons.iter().filter(|(r, _)| *r == s) {
                    println!("{:<8} not measured: {why}", s.name());
                }
            }
            Err(e) => println!("{:<8} not measured: {e}", s.name()),
        }
    }
    movers.push(("bounce".into(), None));
    let engine = std::cell::RefCell::new(BounceEngine::new(
        pd,
        Arc::new(mem.clone()),
        BounceConfig { chunk: a.chunk, ring: a.ring, ..Default::default() },
    )?);

    let mut prog = Progress { total: movers.len() * sizes.len() * 2, done: 0, tty: std::io::stderr().is_terminal() };
    let mut rows = Vec::new();
    for (name, bridge) in &movers {
        for &size in &sizes {
            let (mut cold, mut hit, mut touch, mut flush) = (0.0, 0.0, 0.0, 0.0);
            let reg;
            let mover = match bridge {
                Some(b) => {
                    b.invalidate(buf.addr(), buf.len())?;
                    let t = Instant::now();
                    reg = b.register(buf.addr(), size as u64, AccessFlags::remote_rw())?;
                    cold = us(t.elapsed());
                    let t = Instant::now();
                    drop(b.register(buf.addr(), size as u64, AccessFlags::remote_rw())?);
                    hit = us(t.elapsed());
                    let m = Mover::Direct(&reg);
                    let t = Instant::now();
                    one_op(conn, &m, false, size, &key)?;
                    if name == "odp" {
                        touch = us(t.elapsed());
                    }
                    let t = Instant::now();
                    b.sync_from_peers(&reg)?;
                    flush = us(t.elapsed());
                    m
                }
                None => Mover::Bounce(&engine, buf.addr()),
            };
            for (read, op) in [(false, "write"), (true, "read")] {
                prog.step(&format!("{name} {op} {}", size_name(size)));
                let (mib_s, mops) = bandwidth(conn, &mover, read, size, &key, a.seconds)?;
                let (p50, p99) = latency(conn, &mover, read, size, &key, a.seconds / 2.0)?;
                rows.push(Row {
                    strategy: name.clone(),
                    op,
                    size,
                    mib_s,
                    mops,
                    p50_us: p50,
                    p99_us: p99,
                    reg_cold_us: cold,
                    reg_hit_us: hit,
                    first_touch_us: touch,
                    flush_us: flush,
                });
            }
        }
    }
    if prog.tty {
        eprintln!();
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mode = a.mode();
    exit_status("p2pbridge-bench", run(&a, mode))
}

fn run(a: &Args, mode: Mode) -> Res {
    let (rows, fabric, setting) = match mode {
        Mode::Fabric => {
            let fabric = fabric_or_usage_error::<Args>(
                "run `scripts/softroce target/release/p2pbridge-bench`, or give --loopback IP --device NAME, or --server/--client (see --help)",
            );
            let setting = format!("Soft-RoCE {} -> {} (kernel {})", fabric.a.device, fabric.b.device, fabric.kernel);
            (run_pair(a, &fabric)?, Some(fabric), setting)
        }
        Mode::Loopback { device, addr } => {
            let host = Host { netns: String::new(), addr, device: device.clone() };
            let one = SoftRoce { a: host.clone(), b: host, kernel: String::new() };
            (run_pair(a, &one)?, None, format!("loopback on {device} ({addr})"))
        }
        Mode::Server { addr } => return serve(a, addr),
        Mode::Client { addr, device } => (run_client(a, addr, &device)?, None, format!("{device} -> server {addr}")),
    };
    report(a, rows, fabric.as_ref(), &setting)
}

fn report(a: &Args, mut rows: Vec<Row>, fabric: Option<&SoftRoce>, setting: &str) -> Res {
    println!(
        "{:<8} {:<5} {:>10} {:>12} {:>10} {:>10} {:>10} {:>11} {:>9} {:>9} {:>8}",
        "strategy",
        "op",
        "size",
        "MiB/s",
        "Mops/s",
        "p50 us",
        "p99 us",
        "reg cold us",
        "hit us",
        "touch us",
        "flush us"
    );
    for r in &rows {
        println!(
            "{:<8} {:<5} {:>10} {:>12.2} {:>10.5} {:>10.1} {:>10.1} {:>11.1} {:>9.1} {:>9.1} {:>8.1}",
            r.strategy,
            r.op,
            size_name(r.size),
            r.mib_s,
            r.mops,
            r.p50_us,
            r.p99_us,
            r.reg_cold_us,
            r.reg_hit_us,
            r.first_touch_us,
            r.flush_us
        );
    }
    // perftest on the same link, for scale (across the fabric's hosts).
    if let Some(fabric) = fabric.filter(|_| !a.no_perftest && perftest::available("ib_write_bw")) {
        let p = perftest::Params { seconds: 1.0, depth: 16, cq_mod: 1 };
        for size in [64usize << 10, 1 << 20].into_iter().filter(|s| *s >= a.min && *s <= a.max) {
            for (tool, op) in [("ib_write_bw", "write"), ("ib_read_bw", "read")] {
                match perftest::run(fabric, tool, size, &p) {
                    Ok(f) => {
                        let ours = rows
                            .iter()
                            .filter(|r| r.op == op && r.size == size && r.strategy == "pinned")
                            .map(|r| r.mib_s)
                            .next();
                        if let Some(o) = ours {
                            println!(
                                "{tool} {}: {:.2} MiB/s; pinned / {tool} = {:.3}",
                                size_name(size),
                                f.mib_s,
                                o / f.mib_s
                            );
                        }
                        rows.push(Row {
                            strategy: tool.into(),
                            op,
                            size,
                            mib_s: f.mib_s,
                            mops: f.mpps,
                            ..Default::default()
                        });
                    }
                    Err(e) => eprintln!("{tool}: {e}"),
                }
            }
        }
    }
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&a.out)?;
        let mut csv = String::from(CSV_HEADER);
        csv.push('\n');
        for r in &rows {
            csv.push_str(&r.csv());
            csv.push('\n');
        }
        std::fs::write(a.out.join("results.csv"), csv)?;
        let mut series = Vec::new();
        for op in ["write", "read"] {
            let mut names: Vec<&str> = rows
                .iter()
                .filter(|r| r.op == op && !r.strategy.starts_with("ib_"))
                .map(|r| r.strategy.as_str())
                .collect();
            names.dedup();
            for n in names {
                let pts =
                    rows.iter().filter(|r| r.op == op && r.strategy == n).map(|r| (r.size as u64, r.mib_s)).collect();
                series.push(Series { label: format!("{n} {op}"), points: pts, dashed: op == "read" });
            }
        }
        let sub = format!("{setting}, host memory, 16 in flight");
        std::fs::write(
            a.out.join("bandwidth.svg"),
            svg("p2pbridge: RDMA bandwidth by registration strategy", &sub, &series),
        )?;
        Ok(())
    };
    write().map_err(|e| format!("cannot write results to {}: {e}", a.out.display()))?;
    println!("wrote {} and {}", a.out.join("results.csv").display(), a.out.join("bandwidth.svg").display());
    Ok(())
}
