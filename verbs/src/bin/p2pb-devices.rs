//! `p2pb-devices`: what RDMA devices this host has and what each can do — ports, GIDs,
//! limits, On-Demand Paging, dma-buf MRs, advise_mr prefetch.
//!
//! ```text
//! scripts/softroce target/debug/p2pb-devices
//! ```
//!
//! Exit status: 0 when every device (at least one) was listed; 1 on a failure while running, printed as `p2pb-devices: message` (no RDMA device,
//! a device that cannot be opened or queried); 2 on a usage error; 3 when rdma-core itself is
//! missing ([`Error::RdmaUnavailable`]).

use std::process::ExitCode;

use clap::Parser;
use p2pbridge_verbs::{device_names, Context, DmaBufSupport, Error, GidKind, ProtectionDomain};

/// What RDMA devices this host has and what each can do: ports, GIDs, limits, On-Demand
/// Paging, dma-buf MRs, advise_mr prefetch
#[derive(Parser, Debug)]
#[command(
    name = "p2pb-devices",
    version,
    after_help = "Exit status: 0 every device (at least one) was listed; 1 failed while running (no RDMA device, or a device that cannot be opened or queried; printed as `p2pb-devices: ERROR`); 2 usage error; 3 rdma-core (libibverbs) is not installed."
)]
struct Args {}

fn show(name: &str) -> Result<(), Error> {
    let ctx = Context::open(name)?;
    let caps = ctx.caps()?;
    println!("{name}");
    println!(
        "  fw_ver {}  vendor {:#x}:{:#x}  max_mr_size {:#x}",
        caps.fw_ver, caps.vendor_id, caps.vendor_part_id, caps.max_mr_size
    );
    println!("  max_qp_wr {}  max_sge {}  max_cqe {}", caps.max_qp_wr, caps.max_sge, caps.max_cqe);
    for p in 1..=caps.phys_port_cnt {
        let port = ctx.port(p)?;
        println!(
            "  port {p}: {:?}, {:?}, active_mtu {} (max {})",
            port.state, port.link_layer, port.active_mtu, port.max_mtu
        );
    }
    for g in ctx.gids()? {
        if g.kind != GidKind::Other {
            println!("  gid[{}] port {} {:?} {}", g.index, g.port, g.kind, g.as_ipv6());
        }
    }
    let o = caps.odp;
    println!("  odp: supported {}  implicit {}  rc {:?}  ud {:?}", o.supported, o.implicit, o.rc, o.ud);
    let pd = ProtectionDomain::new(&ctx)?;
    match pd.dmabuf_support() {
        DmaBufSupport::Supported => println!("  dma-buf MRs: supported"),
        DmaBufSupport::Unsupported(e) => println!("  dma-buf MRs: unsupported ({e})"),
    }
    match pd.prefetch_support()? {
        None => println!("  advise_mr prefetch: supported"),
        Some(why) => println!("  advise_mr prefetch: unsupported ({why})"),
    }
    Ok(())
}

/// Prints `p2pb-devices: message` on stderr and returns `code`.
fn fail(message: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("p2pb-devices: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    Args::parse();
    let names = match device_names() {
        Ok(n) => n,
        Err(e) => return fail(&e, if matches!(e, Error::RdmaUnavailable { .. }) { 3 } else { 1 }),
    };
    if names.is_empty() {
        return fail("no RDMA devices (check `rdma link`; for a software device: scripts/softroce)", 1);
    }
    let mut rc = ExitCode::SUCCESS;
    for n in &names {
        if let Err(e) = show(n) {
            rc = fail(format_args!("{n}: {e}"), 1);
        }
    }
    rc
}
