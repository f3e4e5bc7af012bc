//! `p2pbridge`: the command-line face of the library.
//!
//! ```text
//! p2pbridge probe [--json]   what this host can do for NIC <-> accelerator transfers, and why not
//! ```
//!
//! Exit status: 0 when at least one registration strategy works here; 1 when none does (the
//! report says why), or the report cannot be written (`p2pbridge: message` on stderr); 2 on a
//! usage error (clap's, with the usage). `--help` and `--version` exit 0.
//!
//! The library gathers the report as data ([`Report`]); the text and JSON forms are made here.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use p2pbridge::probe::{Report, StrategyReport};
use p2pbridge::strategy::Support;

const EXIT_STATUS: &str = "Exit status: 0 at least one registration strategy works here; 1 none works (the report says why), or the report cannot be written; 2 usage error.";

/// Register accelerator memory as RDMA memory regions: what this host supports, and why not
#[derive(Parser, Debug)]
#[command(name = "p2pbridge", version, after_help = EXIT_STATUS)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// What this host can do for NIC <-> accelerator transfers; for each "no", why and the fix
    #[command(after_help = EXIT_STATUS)]
    Probe {
        /// Print the report as JSON (every reason as fields), for scripts
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Probe { json } => probe(json),
    }
}

fn probe(json: bool) -> ExitCode {
    let report = Report::gather();
    let out = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => s + "\n",
            Err(e) => return fail(format_args!("cannot encode the report: {e}")),
        }
    } else {
        text(&report)
    };
    if let Err(e) = std::io::stdout().lock().write_all(out.as_bytes()) {
        return fail(format_args!("cannot write the report: {e}"));
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Prints `p2pbridge: message` on stderr; exit status 1.
fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("p2pbridge: {message}");
    ExitCode::from(1)
}

/// One answer: `what: yes`, or `what: NO — why` and the fix on the next line.
fn support(o: &mut String, what: &str, s: &Support) {
    let _ = match s {
        Support::Yes => writeln!(o, "  {what}: yes"),
        Support::No(u) => writeln!(o, "  {what}: NO — {}\n      fix: {}", u.reason(), u.fix()),
    };
}

/// The report for people.
fn text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "RDMA");
    support(&mut o, "rdma-core and devices", &r.rdma);
    for d in &r.devices {
        let _ = writeln!(o, "  device {}", d.name);
        for p in &d.ports {
            let _ = writeln!(o, "    port {}: {} {} mtu {}", p.port, p.state, p.link_layer, p.active_mtu);
        }
        if let Some(e) = &d.error {
            let _ = writeln!(o, "    not probed: {}\n      fix: {}", e.reason(), e.fix());
        }
        if let Some(c) = &d.caps {
            support(&mut o, "  ODP", &c.odp);
            if !c.odp_rc.is_empty() {
                let ops: Vec<&str> = c.odp_rc.iter_names().map(|(n, _)| n).collect();
                let _ = writeln!(o, "      RC ops: {}", ops.join(" "));
            }
            support(&mut o, "  implicit ODP", &c.implicit_odp);
            support(&mut o, "  dma-buf MRs", &c.dmabuf_mr);
            support(&mut o, "  advise_mr prefetch", &c.advise_mr);
            support(&mut o, "  memory windows (type 2)", &c.mem_windows);
        }
    }
    let _ = writeln!(o, "Peer memory");
    match (&r.peer_memory, r.peer_memory_found) {
        (Support::Yes, Some(p)) => {
            let _ = writeln!(o, "  nvidia-peermem: yes (found {p})");
        }
        (s, _) => support(&mut o, "nvidia-peermem", s),
    }
    let _ = writeln!(o, "GPUs");
    support(&mut o, "CUDA driver", &r.cuda);
    for g in &r.gpus {
        support(&mut o, &format!("GPU {} dma-buf export", g.ordinal), &g.dmabuf_export);
        match (g.bar1_bytes, &g.bar1_error) {
            (Some(n), _) => {
                let _ = writeln!(o, "  GPU {} BAR1 (exported-bytes budget): {} MiB", g.ordinal, n >> 20);
            }
            (None, why) => {
                let why = why.as_ref().map(|f| f.message.as_str()).unwrap_or("?");
                let _ = writeln!(o, "  GPU {} BAR1: unknown ({why}); the budget stays CachePolicy's", g.ordinal);
            }
        }
    }
    let _ = writeln!(o, "Host memory");
    support(&mut o, "udmabuf export", &r.udmabuf);
    support(&mut o, "userfaultfd monitor", &r.host_monitor);
    let b = &r.pinned_budget;
    let _ = writeln!(o, "  pinned-bytes budget: {} MiB, from {}; {}", b.bytes >> 20, b.source, b.fix);
    for (what, s) in [("host memory", &r.host_memory), ("device memory", &r.device_memory)] {
        let on = r.device_used.as_ref().map(|d| format!(" on {d}")).unwrap_or_default();
        let _ = writeln!(o, "Strategy for {what}{on}");
        strategies(&mut o, s.as_ref());
    }
    let _ = writeln!(o, "{}", if r.ok { "OK: at least one strategy works" } else { "NOT OK: no strategy works here" });
    o
}

fn strategies(o: &mut String, r: Option<&StrategyReport>) {
    let Some(r) = r else {
        let _ = writeln!(o, "  none: no usable RDMA device");
        return;
    };
    let _ = writeln!(o, "  chosen: {}", r.chosen.map_or("none", |s| s.name()));
    for s in &r.skipped {
        let _ = writeln!(o, "  not {}: {}", s.strategy, s.reason);
    }
}
