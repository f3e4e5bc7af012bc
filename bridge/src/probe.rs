//! What this host can do for NIC <-> accelerator transfers, and if not, why not — like
//! `ucx_info` or `fi_info`, for this one question. [`Report::gather`] collects it; the
//! `p2pbridge probe` command prints it for people or, with `--json`, for scripts.

use std::path::Path;

use p2pbridge_gpu::{BackendKind, CudaBackend, HostBackend};
use p2pbridge_verbs::{
    device_names, Context, DmaBufSupport, Error as VerbsError, OdpTransportCaps, PortState, ProtectionDomain,
};
use serde::Serialize;

use crate::strategy::{plan, HostCaps, MemoryKind, PeerMem, Policy, SkipReason, Strategy, PEERMEM_PATHS};

/// Yes, or no with why and what to do.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verdict {
    /// Whether it works.
    pub supported: bool,
    /// Why not (or what it is), in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Verdict {
    fn yes() -> Self {
        Verdict { supported: true, reason: None, fix: None }
    }
    fn no(reason: impl Into<String>, fix: impl Into<String>) -> Self {
        Verdict { supported: false, reason: Some(reason.into()), fix: Some(fix.into()) }
    }
}

/// One port of an RDMA device.
#[derive(Debug, Clone, Serialize)]
pub struct PortReport {
    /// Port number.
    pub port: u8,
    /// Its state ("Active", "Down", ...).
    pub state: String,
    /// "InfiniBand" or "Ethernet".
    pub link_layer: String,
    /// Active MTU, bytes.
    pub active_mtu: u32,
}

/// One RDMA device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// Its name.
    pub name: String,
    /// Its ports.
    pub ports: Vec<PortReport>,
    /// ODP: general support.
    pub odp: Verdict,
    /// ODP operations supported on RC.
    pub odp_rc: Vec<String>,
    /// Implicit ODP.
    pub implicit_odp: Verdict,
    /// dma-buf MRs (the `ibv_reg_dmabuf_mr(pd,0,0,0,-1,0)` probe).
    pub dmabuf_mr: Verdict,
    /// `ibv_advise_mr` prefetch.
    pub advise_mr: Verdict,
    /// Type 2 memory windows: keys the NIC revokes one by one, bound to one connection.
    pub mem_windows: Verdict,
}

/// One CUDA device.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    /// Its ordinal.
    pub ordinal: usize,
    /// dma-buf export of its memory.
    pub dmabuf_export: Verdict,
    /// Its BAR1 aperture in bytes (the exported-bytes budget), or why it could not be read.
    pub bar1: std::result::Result<u64, String>,
}

/// What the bridge would do with one kind of memory.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    /// The strategy it would pick, if any.
    pub chosen: Option<String>,
    /// Each strategy not picked, with why and the fix.
    pub skipped: Vec<Skipped>,
}

/// A strategy not picked.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The strategy.
    pub strategy: String,
    /// Why.
    pub reason: String,
    /// What would make it work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// rdma-core present, and the kernel's RDMA support.
    pub rdma: Verdict,
    /// RDMA devices.
    pub devices: Vec<DeviceReport>,
    /// The device the strategies below are for (the first with an active port).
    pub device_used: Option<String>,
    /// nvidia-peermem or nv_peer_mem.
    pub peer_memory: Verdict,
    /// The CUDA driver.
    pub cuda: Verdict,
    /// CUDA devices.
    pub gpus: Vec<GpuReport>,
    /// dma-buf export of host memory through /dev/udmabuf.
    pub udmabuf: Verdict,
    /// The userfaultfd monitor for registered host memory.
    pub host_monitor: Verdict,
    /// How many bytes registrations may pin, and where that comes from.
    pub pinned_budget: crate::budget::Budget,
    /// What the bridge would do with host memory.
    pub host_memory: Option<StrategyReport>,
    /// What the bridge would do with device (CUDA) memory.
    pub device_memory: Option<StrategyReport>,
    /// At least one strategy works (there is an RDMA device with an active port).
    pub ok: bool,
}

fn rdma_fix(e: &VerbsError) -> String {
    match e {
        VerbsError::RdmaUnavailable { .. } => "install rdma-core and ibverbs-providers (Debian/Ubuntu: apt install rdma-core ibverbs-providers)".into(),
        VerbsError::Verb { errno, .. } if errno.0 == libc::ENOSYS => {
            "load ib_uverbs and your NIC's driver (mlx5_ib, ...), or rdma_rxe for Soft-RoCE (`rdma link add rxe0 type rxe netdev eth0`); a kernel built without CONFIG_INFINIBAND needs another kernel".into()
        }
        _ => "check `rdma link` and `ibv_devinfo`".into(),
    }
}

fn skipped(list: &[(Strategy, SkipReason)]) -> Vec<Skipped> {
    list.iter()
        .filter(|(_, r)| *r != SkipReason::NotReached)
        .map(|(s, r)| Skipped { strategy: s.name().into(), reason: r.to_string(), fix: r.fix().map(str::to_string) })
        .collect()
}

fn device_report(name: &str) -> Result<(DeviceReport, Option<HostCaps>), VerbsError> {
    let ctx = Context::open(name)?;
    let caps = ctx.caps()?;
    let mut ports = Vec::new();
    let mut active = false;
    for p in 1..=caps.phys_port_cnt {
        let port = ctx.port(p)?;
        active |= port.state == PortState::Active;
        ports.push(PortReport {
            port: p,
            state: format!("{:?}", port.state),
            link_layer: format!("{:?}", port.link_layer),
            active_mtu: port.active_mtu,
        });
    }
    let pd = ProtectionDomain::new(&ctx)?;
    // The strategy planner's view of the device: the probe reports from it rather than
    // probing dma-buf and advise_mr a second time.
    let host_caps = HostCaps::probe(&pd)?;
    let dmabuf_mr = match host_caps.dmabuf {
        DmaBufSupport::Supported => Verdict::yes(),
        DmaBufSupport::Unsupported(e) => Verdict::no(
            format!("ibv_reg_dmabuf_mr: {}", e.name()),
            "a kernel >= 5.12, rdma-core >= 34 and a NIC driver that imports dma-bufs (mlx5, efa, irdma, bnxt_re); rxe and siw do not",
        ),
    };
    let advise_mr = match &host_caps.prefetch {
        Ok(()) => Verdict::yes(),
        Err(why) => Verdict::no(why.clone(), "newer rdma-core (the provider's advise_mr) and an ODP-capable device"),
    };
    let odp = if caps.odp.supported {
        Verdict::yes()
    } else {
        Verdict::no("no IBV_ODP_SUPPORT", "an ODP-capable NIC (mlx5) or rxe on Linux >= 6.15")
    };
    let implicit_odp = if caps.odp.implicit {
        Verdict::yes()
    } else {
        Verdict::no("no IBV_ODP_SUPPORT_IMPLICIT", "a NIC with implicit ODP (mlx5); rxe has none")
    };
    let odp_rc = caps.odp.rc.iter_names().map(|(n, _)| n.to_string()).collect();
    let mem_windows = if caps.mw_type2 {
        Verdict::yes()
    } else {
        Verdict::no(
            format!("no IBV_DEVICE_MEM_WINDOW_TYPE_2A/2B (max_mw {})", caps.max_mw),
            "keys are then the region's rkey, revoked with the whole registration; mlx5 and rxe (Linux >= 5.12) have type 2 windows",
        )
    };
    let host_caps = active.then_some(host_caps);
    Ok((
        DeviceReport { name: name.into(), ports, odp, odp_rc, implicit_odp, dmabuf_mr, advise_mr, mem_windows },
        host_caps,
    ))
}

impl Report {
    /// Probes this host.
    pub fn gather() -> Report {
        let mut devices = Vec::new();
        let mut caps: Option<HostCaps> = None;
        let rdma = match device_names() {
            Err(e) => Verdict::no(e.to_string(), rdma_fix(&e)),
            Ok(names) if names.is_empty() => Verdict::no(
                "rdma-core is installed but there is no RDMA device",
                "load your NIC's RDMA driver, or add a Soft-RoCE device: `rdma link add rxe0 type rxe netdev eth0`",
            ),
            Ok(names) => {
                for n in names {
                    match device_report(&n) {
                        Ok((d, c)) => {
                            if caps.is_none() {
                                caps = c;
                            }
                            devices.push(d);
                        }
                        Err(e) => devices.push(DeviceReport {
                            name: n,
                            ports: Vec::new(),
                            odp: Verdict::no(e.to_string(), rdma_fix(&e)),
                            odp_rc: Vec::new(),
                            implicit_odp: Verdict::no("not probed", "see odp"),
                            dmabuf_mr: Verdict::no("not probed", "see odp"),
                            advise_mr: Verdict::no("not probed", "see odp"),
                            mem_windows: Verdict::no("not probed", "see odp"),
                        }),
                    }
                }
                if caps.is_some() {
                    Verdict::yes()
                } else {
                    Verdict::no("no RDMA device has an active port", "check cabling/links: `rdma link`, `ibv_devinfo`")
                }
            }
        };
        let peer_memory = match PeerMem::detect(Path::new("/")) {
            PeerMem::Loaded(p) => Verdict { supported: true, reason: Some(format!("found {p}")), fix: None },
            PeerMem::Missing => Verdict::no(
                format!("none of {} exists", PEERMEM_PATHS.join(", ")),
                "`modprobe nvidia-peermem` (shipped with the NVIDIA driver)",
            ),
        };
        let (cuda, gpus) = match CudaBackend::device_count() {
            Err(e) => (
                Verdict::no(e.to_string(), "install the NVIDIA driver (libcuda.so.1) on a host with an NVIDIA GPU"),
                Vec::new(),
            ),
            Ok(0) => {
                (Verdict::no("the CUDA driver sees no device", "check nvidia-smi and CUDA_VISIBLE_DEVICES"), Vec::new())
            }
            Ok(n) => {
                let gpus = (0..n)
                    .map(|i| GpuReport {
                        ordinal: i,
                        dmabuf_export: match CudaBackend::new(i).and_then(|g| g.dmabuf_support()) {
                            Ok(Ok(())) => Verdict::yes(),
                            Ok(Err(why)) => {
                                Verdict::no(why, "the open NVIDIA kernel modules (driver >= 515) on a kernel >= 5.12")
                            }
                            Err(e) => Verdict::no(e.to_string(), "check nvidia-smi"),
                        },
                        bar1: CudaBackend::new(i).and_then(|g| g.bar1_bytes()).map(|(n, _)| n).map_err(|e| e.to_string()),
                    })
                    .collect();
                (Verdict::yes(), gpus)
            }
        };
        let udmabuf = match HostBackend::udmabuf_support() {
            Ok(()) => Verdict::yes(),
            Err(why) => Verdict::no(
                why,
                "a kernel with CONFIG_UDMABUF (`modprobe udmabuf`), run as root or with access to /dev/udmabuf",
            ),
        };
        let host_monitor = match crate::uffd::monitor_available() {
            Ok(()) => Verdict::yes(),
            Err(why) => Verdict::no(why, "run as root (or set vm.unprivileged_userfaultfd=1); without the monitor, call Bridge::invalidate_host before unmapping registered memory"),
        };
        let ops = OdpTransportCaps::SEND | OdpTransportCaps::RECV | OdpTransportCaps::WRITE | OdpTransportCaps::READ;
        let report_for = |kind: MemoryKind| {
            caps.as_ref().map(|c| {
                let p = plan(kind, ops, &Policy::default(), c);
                StrategyReport {
                    chosen: p.candidates.first().map(|s| s.name().to_string()),
                    skipped: skipped(&p.skipped),
                }
            })
        };
        let host_memory = report_for(MemoryKind::Host);
        let device_memory = report_for(MemoryKind::Backend(BackendKind::Cuda));
        let ok = caps.is_some();
        Report {
            rdma,
            device_used: caps.as_ref().map(|c| c.device.clone()),
            devices,
            peer_memory,
            cuda,
            gpus,
            udmabuf,
            host_monitor,
            pinned_budget: crate::budget::pinned(),
            host_memory,
            device_memory,
            ok,
        }
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let v = |o: &mut String, what: &str, v: &Verdict| {
            let _ = match (v.supported, &v.reason, &v.fix) {
                (true, None, _) => writeln!(o, "  {what}: yes"),
                (true, Some(r), _) => writeln!(o, "  {what}: yes ({r})"),
                (false, r, f) => writeln!(
                    o,
                    "  {what}: NO — {}\n      fix: {}",
                    r.as_deref().unwrap_or("?"),
                    f.as_deref().unwrap_or("?")
                ),
            };
        };
        let _ = writeln!(o, "RDMA");
        v(&mut o, "rdma-core and devices", &self.rdma);
        for d in &self.devices {
            let _ = writeln!(o, "  device {}", d.name);
            for p in &d.ports {
                let _ = writeln!(o, "    port {}: {} {} mtu {}", p.port, p.state, p.link_layer, p.active_mtu);
            }
            v(&mut o, "  ODP", &d.odp);
            if !d.odp_rc.is_empty() {
                let _ = writeln!(o, "      RC ops: {}", d.odp_rc.join(" "));
            }
            v(&mut o, "  implicit ODP", &d.implicit_odp);
            v(&mut o, "  dma-buf MRs", &d.dmabuf_mr);
            v(&mut o, "  advise_mr prefetch", &d.advise_mr);
            v(&mut o, "  memory windows (type 2)", &d.mem_windows);
        }
        let _ = writeln!(o, "Peer memory");
        v(&mut o, "nvidia-peermem", &self.peer_memory);
        let _ = writeln!(o, "GPUs");
        v(&mut o, "CUDA driver", &self.cuda);
        for g in &self.gpus {
            v(&mut o, &format!("GPU {} dma-buf export", g.ordinal), &g.dmabuf_export);
            match &g.bar1 {
                Ok(n) => {
                    let _ = writeln!(o, "  GPU {} BAR1 (exported-bytes budget): {} MiB", g.ordinal, n >> 20);
                }
                Err(why) => {
                    let _ = writeln!(o, "  GPU {} BAR1: unknown ({why}); the budget stays CachePolicy's", g.ordinal);
                }
            }
        }
        let _ = writeln!(o, "Host memory");
        v(&mut o, "udmabuf export", &self.udmabuf);
        v(&mut o, "userfaultfd monitor", &self.host_monitor);
        let b = &self.pinned_budget;
        let _ = writeln!(o, "  pinned-bytes budget: {} MiB, from {}; {}", b.bytes >> 20, b.source, b.fix);
        for (what, r) in [("host memory", &self.host_memory), ("device memory", &self.device_memory)] {
            let _ = writeln!(
                o,
                "Strategy for {what}{}",
                self.device_used.as_ref().map(|d| format!(" on {d}")).unwrap_or_default()
            );
            match r {
                None => {
                    let _ = writeln!(o, "  none: no usable RDMA device");
                }
                Some(r) => {
                    let _ = writeln!(o, "  chosen: {}", r.chosen.as_deref().unwrap_or("none"));
                    for s in &r.skipped {
                        let _ = writeln!(o, "  not {}: {}", s.strategy, s.reason);
                    }
                }
            }
        }
        let _ = writeln!(
            o,
            "{}",
            if self.ok { "OK: at least one strategy works" } else { "NOT OK: no strategy works here" }
        );
        o
    }
}
