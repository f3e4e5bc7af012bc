//! A soak run on the Soft-RoCE fabric (`scripts/soak`): several threads share one bridge on
//! host A and, at random with a fixed seed, register buffers, write patterns to peers and read
//! them back, free buffers, drop and remake connections; peer processes on host B are killed
//! and restarted meanwhile. At the end it reports operations done, errors by kind, data
//! mismatches (must be 0), memory regions left in the kernel after teardown (must be 0) and
//! the growth of the resident set.
//!
//! ```text
//! soak [--seconds N] [--seed N] [--threads N] [--peers N]     (under scripts/softroce)
//! soak --peer FILE                                           (a peer process; soak starts them)
//! ```
//!
//! Exit status: 0 done, no data mismatch and no memory region left; 1 a failure while running
//! (printed as `soak: ERROR`), data mismatches or memory regions left included; 2 a usage
//! error (bad arguments, or no Soft-RoCE fabric).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{
    AccessFlags, Connection, ConnectionOptions, Context, Error as VerbsError, Listener, ProtectionDomain,
};
use p2pbridge::{Bridge, BridgeOptions, Error, RemoteKey};
use p2pbridge_benches::cli::{exit_status, fabric_or_usage_error, parse_count, Res, EXIT_CODES};
use p2pbridge_test_support::fabric::{kernel_count, SoftRoce};
use p2pbridge_test_support::{pattern, Rng};

/// A soak run across the two Soft-RoCE hosts of scripts/softroce (scripts/soak): threads on
/// host A register, write, read back, compare and free through one bridge while peer processes
/// on host B are killed and restarted; reports operations, errors by kind, data mismatches,
/// memory regions left and RSS growth.
#[derive(Parser, Debug)]
#[command(name = "soak", version, after_help = EXIT_CODES)]
struct Args {
    /// How long to run, in seconds
    #[arg(long, value_name = "N", default_value_t = 600)]
    seconds: u64,
    /// The seed of every random choice (decimal)
    #[arg(long, value_name = "N", default_value_t = 0x50a_cafe)]
    seed: u64,
    /// Client threads on host A
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_count)]
    threads: usize,
    /// Peer processes on host B
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count)]
    peers: usize,
    /// Be a peer process (soak starts them): listen on host B, write the port to FILE
    #[arg(long, value_name = "FILE", hide = true)]
    peer: Option<PathBuf>,
}

/// Bytes each peer hands out per connection.
const PEER_LEN: usize = 4 << 20;

fn opts() -> ConnectionOptions {
    ConnectionOptions { timeout: Duration::from_secs(10), rnr_retry_count: 7, ..Default::default() }
}

/// A peer process: on host B, accepts connections for ever; each gets a fresh registered
/// buffer and a key for it, sent over the connection.
fn peer(fab: &SoftRoce, out: &Path) -> Res {
    fab.b.enter()?;
    let l = Listener::bind((fab.b.addr, 0).into())?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, l.local_addr().port().to_string())?;
    std::fs::rename(&tmp, out)?;
    let pd = ProtectionDomain::new(&Context::open(&fab.b.device)?)?;
    let mem = HostBackend::new();
    let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default())?;
    let mut live = Vec::new();
    loop {
        let Ok(req) = l.get_request(Duration::from_secs(3600)) else { continue };
        let Ok(conn) = req.accept(&pd, &opts()) else { continue };
        let buf = mem.alloc(PEER_LEN)?;
        let reg = bridge.register(buf.addr(), PEER_LEN as u64, AccessFlags::remote_rw())?;
        let key = bridge.hand_out(&conn, &reg, 0, PEER_LEN as u64)?;
        if bridge.send_key(&conn, &key).is_ok() {
            live.push((conn, reg, buf));
        }
        // Connections the client dropped: their memory goes.
        live.retain(|(c, _, _)| c.fault().is_none());
    }
}

/// The peers: their processes and the addresses they listen on.
struct Peers {
    exe: std::path::PathBuf,
    b: std::net::IpAddr,
    procs: Mutex<Vec<(Child, SocketAddr)>>,
    started: AtomicU64,
}

impl Peers {
    fn spawn(&self) -> Res<(Child, SocketAddr)> {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let out = std::env::temp_dir().join(format!("p2pb-soak-peer-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&out);
        let child = Command::new(&self.exe).arg("--peer").arg(&out).spawn()?;
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&out) {
                return Ok((child, (self.b, s.trim().parse()?).into()));
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err("a peer did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        let p = self.procs.lock().unwrap();
        p[i % p.len()].1
    }

    /// Kills peer `i` and starts another in its place.
    fn restart(&self, i: usize) -> Res<()> {
        let new = self.spawn()?;
        let mut p = self.procs.lock().unwrap();
        let i = i % p.len();
        let (mut old, _) = std::mem::replace(&mut p[i], new);
        drop(p);
        let _ = old.kill();
        let _ = old.wait();
        Ok(())
    }
}

#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    bytes: AtomicU64,
    mismatches: AtomicU64,
    reconnects: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, e: &Error) {
        let kind = match e {
            Error::Verbs(VerbsError::ConnectionLost { cause }) => format!("connection lost ({cause})"),
            Error::Verbs(VerbsError::WorkCompletion { status, .. }) => format!("work completion {status:?}"),
            Error::Verbs(VerbsError::CmEvent { got, .. }) => format!("rdma_cm {got}"),
            Error::Verbs(VerbsError::Timeout(..)) => "verbs timeout".into(),
            Error::CompletionTimeout { .. } => "completion timeout".into(),
            Error::Revoked => "revoked".into(),
            Error::StaleKey { .. } => "stale key".into(),
            other => format!("other: {other}"),
        };
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }
}

/// One client thread's loop.
fn client(
    bridge: &Bridge,
    pd: &ProtectionDomain,
    mem: &HostBackend,
    peers: &Peers,
    t: &Tally,
    seed: u64,
    stop: &AtomicBool,
) {
    let mut rng = Rng(seed);
    let mut conns: BTreeMap<usize, (Connection, RemoteKey)> = BTreeMap::new();
    let npeers = peers.procs.lock().unwrap().len();
    while !stop.load(Ordering::Relaxed) {
        let p = rng.below(npeers as u64) as usize;
        if rng.below(20) == 0 {
            conns.remove(&p); // drop the connection; the next op reconnects
        }
        if let std::collections::btree_map::Entry::Vacant(v) = conns.entry(p) {
            let made = Connection::connect(pd, peers.addr(p), &opts())
                .map_err(Error::from)
                .and_then(|c| Ok((bridge.recv_key(&c, Duration::from_secs(10))?, c)));
            match made {
                Ok((k, c)) => {
                    t.reconnects.fetch_add(1, Ordering::Relaxed);
                    v.insert((c, k));
                }
                Err(e) => {
                    t.error(&e);
                    std::thread::sleep(Duration::from_millis(50)); // the peer may be restarting
                    continue;
                }
            }
        }
        let Some((conn, key)) = conns.get(&p) else { continue };
        let len = 4096 * (1 + rng.below(256)) as usize;
        let off = 4096 * rng.below(((PEER_LEN - len) / 4096) as u64 + 1);
        let data = pattern(len, rng.next_u64() as u8);
        let r = (|| -> p2pbridge::Result<bool> {
            let src = mem.alloc(len)?;
            mem.copy_to_device(&src, 0, &data)?;
            let dst = mem.alloc(len)?;
            let sreg = bridge.register(src.addr(), len as u64, AccessFlags::remote_rw())?;
            let dreg = bridge.register(dst.addr(), len as u64, AccessFlags::remote_rw())?;
            bridge.write(conn, &sreg, 0, len as u64, key, off)?;
            bridge.read(conn, &dreg, 0, len as u64, key, off)?;
            let same = mem.to_vec(&dst)?[..len] == data[..];
            drop((sreg, dreg));
            src.free()?;
            dst.free()?;
            Ok(same)
        })();
        t.ops.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(true) => {
                t.bytes.fetch_add(2 * len as u64, Ordering::Relaxed);
            }
            Ok(false) => {
                t.mismatches.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if conn.fault().is_some() || matches!(e, Error::CompletionTimeout { .. }) {
                    conns.remove(&p);
                }
                t.error(&e);
            }
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fab = fabric_or_usage_error::<Args>("run `scripts/soak` (it runs soak under scripts/softroce)");
    match &args.peer {
        Some(out) => exit_status("soak --peer", peer(&fab, out)),
        None => exit_status("soak", run(&args, fab)),
    }
}

fn run(args: &Args, fab: SoftRoce) -> Res {
    let (secs, seed, threads, npeers) = (args.seconds, args.seed, args.threads, args.peers);
    fab.a.enter()?;
    let dev = fab.a.device.clone();
    let mrs_before = kernel_count(&dev, "mr")?;
    let peers = Arc::new(Peers {
        exe: std::env::current_exe()?,
        b: fab.b.addr,
        procs: Mutex::new(Vec::new()),
        started: AtomicU64::new(0),
    });
    for _ in 0..npeers {
        let p = peers.spawn()?;
        peers.procs.lock().unwrap().push(p);
    }
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rss_start;
    let killed;
    {
        let pd = ProtectionDomain::new(&Context::open(&dev)?)?;
        let mem = HostBackend::new();
        let bopts = BridgeOptions { completion_timeout: Duration::from_secs(5), ..Default::default() };
        let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], bopts)?;
        rss_start = rss_kib();
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let (bridge, pd, mem, peers, tally, stop) =
                    (bridge.clone(), pd.clone(), mem.clone(), peers.clone(), tally.clone(), stop.clone());
                let net = fab.a.clone();
                std::thread::spawn(move || {
                    net.enter().expect("enter host A's namespace");
                    client(
                        &bridge,
                        &pd,
                        &mem,
                        &peers,
                        &tally,
                        seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        &stop,
                    )
                })
            })
            .collect();
        let mut rng = Rng(seed ^ 0xdead);
        let start = Instant::now();
        let mut kills = 0u64;
        let mut next_kill = Duration::from_secs(5 + rng.below(20));
        while start.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(200));
            if start.elapsed() >= next_kill {
                peers.restart(rng.below(npeers as u64) as usize)?;
                kills += 1;
                next_kill = start.elapsed() + Duration::from_secs(5 + rng.below(20));
            }
        }
        killed = kills;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().map_err(|_| "a client thread panicked")?;
        }
    }
    let rss_end = rss_kib();
    for (mut c, _) in peers.procs.lock().unwrap().drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let mrs_after = kernel_count(&dev, "mr")?;
    println!("soak: {secs} s, seed {seed:#x}, {threads} threads, {npeers} peers, {killed} peers killed and restarted");
    println!(
        "  operations: {} (each: register 2 buffers, WRITE, READ back, compare, free)",
        tally.ops.load(Ordering::Relaxed)
    );
    println!("  bytes moved: {} MiB", tally.bytes.load(Ordering::Relaxed) >> 20);
    println!("  connections made: {}", tally.reconnects.load(Ordering::Relaxed));
    println!("  data mismatches: {}", tally.mismatches.load(Ordering::Relaxed));
    let errors = tally.errors.lock().unwrap();
    println!("  errors: {}", errors.values().sum::<u64>());
    for (k, n) in errors.iter() {
        println!("    {n:>6}  {k}");
    }
    println!("  memory regions of {dev} in the kernel after teardown: {} (before: {mrs_before})", mrs_after);
    println!(
        "  RSS: {rss_start} KiB after set-up, {rss_end} KiB at the end ({:+} KiB)",
        rss_end as i64 - rss_start as i64
    );
    let ok = tally.mismatches.load(Ordering::Relaxed) == 0 && mrs_after == mrs_before;
    if !ok {
        return Err("soak failed: data mismatches or memory regions left".into());
    }
    Ok(())
}
