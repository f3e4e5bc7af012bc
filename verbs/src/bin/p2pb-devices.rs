//! `p2pb-devices`: what RDMA devices this host has and what each can do — ports, GIDs,
//! limits, On-Demand Paging, dma-buf MRs, advise_mr prefetch.
//!
//! Exit status: 0 when at least one device was listed, 2 when there is none, 3 when
//! rdma-core itself is missing ([`Error::RdmaUnavailable`]), 1 on any other error.

use p2pbridge_verbs::{device_names, Context, DmaBufSupport, Error, GidKind, ProtectionDomain};

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

fn main() {
    let names = match device_names() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("p2pb-devices: {e}");
            std::process::exit(if matches!(e, Error::RdmaUnavailable { .. }) { 3 } else { 1 });
        }
    };
    if names.is_empty() {
        eprintln!("p2pb-devices: no RDMA devices (check `rdma link`; for a software device: scripts/softroce)");
        std::process::exit(2);
    }
    let mut rc = 0;
    for n in &names {
        if let Err(e) = show(n) {
            eprintln!("p2pb-devices: {n}: {e}");
            rc = 1;
        }
    }
    std::process::exit(rc);
}
