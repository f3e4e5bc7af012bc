//! Running perftest (`ib_write_bw`, `ib_read_bw`) across the Soft-RoCE hosts, for comparison
//! with our own figures on the same link.

use std::process::{Command, Stdio};
use std::time::Duration;

use p2pbridge_test_support::fabric::SoftRoce;

/// Bandwidth and message rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    /// MiB/s (2^20 bytes, as perftest's MB/sec).
    pub mib_s: f64,
    /// Million messages per second.
    pub mpps: f64,
}

/// How perftest runs.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Duration (`-D`, rounded up to whole seconds).
    pub seconds: f64,
    /// Outstanding work requests (`-t`).
    pub depth: usize,
    /// Completion every so many requests (`-Q`).
    pub cq_mod: usize,
}

/// perftest's cycle buffer: one page (`sysconf(_SC_PAGESIZE)`, which `ib_*_bw` uses unless
/// told otherwise).
const CYCLE_BUFFER: u64 = 4096;

/// How many distinct addresses perftest's bandwidth tests cycle through for `size`-byte
/// messages: a message of at most half the cycle buffer moves to the next `size` step within
/// it on every post; a larger one is posted at the same address every time. A side that is
/// compared with perftest posts at the same addresses (offsets `0, size, ..` modulo this many
/// steps), so that both sides touch the same amount of memory.
pub fn address_cycle(size: u64) -> u64 {
    if size == 0 || size > CYCLE_BUFFER / 2 {
        1
    } else {
        CYCLE_BUFFER / size
    }
}

fn netns_cmd(ns: &str, args: &[String]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// Whether `tool` is installed.
pub fn available(tool: &str) -> bool {
    Command::new(tool).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Runs `tool` (`ib_write_bw` or `ib_read_bw`) with a server on host B and a client on host A
/// for `size`-byte messages, and parses its result line. A run that prints no result or a
/// zero one (seen once in about 130 runs under emulation, cause not known) is run again, up to
/// three times in all, saying so on stderr.
pub fn run(fabric: &SoftRoce, tool: &str, size: usize, p: &Params) -> Result<Figures, String> {
    let mut last = String::new();
    for attempt in 1..=3 {
        match run_once(fabric, tool, size, p) {
            Ok(f) if f.mib_s > 0.0 => return Ok(f),
            Ok(_) => last = format!("{tool} reported 0 MiB/s"),
            Err(e) => last = e,
        }
        eprintln!("perftest: attempt {attempt}: {last}; running it again");
    }
    Err(last)
}

fn run_once(fabric: &SoftRoce, tool: &str, size: usize, p: &Params) -> Result<Figures, String> {
    let common = |dev: &str| -> Vec<String> {
        let mut v: Vec<String> = vec![tool.into(), "-d".into(), dev.into(), "-s".into(), size.to_string()];
        v.extend(["-D".into(), format!("{}", p.seconds.ceil().max(1.0) as u64), "-F".into()]);
        v.extend(["-t".into(), p.depth.to_string(), "-Q".into(), p.cq_mod.to_string()]);
        if tool == "ib_write_bw" {
            // No inline, as on our side (READs never are).
            v.extend(["-I".into(), "0".into()]);
        }
        v
    };
    let mut server = netns_cmd(&fabric.b.netns, &common(&fabric.b.device))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {tool} (install perftest): {e}"))?;
    std::thread::sleep(Duration::from_millis(1500));
    let mut cargs = common(&fabric.a.device);
    cargs.push(fabric.b.addr.to_string());
    let out = netns_cmd(&fabric.a.netns, &cargs).output().map_err(|e| e.to_string())?;
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    // The result line: "#bytes #iterations BW peak BW average MsgRate".
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 5 && f[0] == size.to_string() {
            let mib_s: f64 = f[3].parse().map_err(|_| format!("cannot parse {line:?}"))?;
            let mpps: f64 = f[4].parse().map_err(|_| format!("cannot parse {line:?}"))?;
            return Ok(Figures { mib_s, mpps });
        }
    }
    Err(format!("{tool} printed no result:\\n{text}\\n{}", String::from_utf8_lossy(&out.stderr)))
}
