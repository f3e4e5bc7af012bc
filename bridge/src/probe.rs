//! What this host can do for NIC <-> accelerator transfers, and if not, why not — like
//! `ucx_info` or `fi_info`, for this one question. [`Report::gather`] collects it as data:
//! every answer a [`Support`] (the planner's own, from [`HostCaps::probe`]), every strategy
//! not picked a [`SkipReason`]. The `p2pbridge probe` command renders it for people or, with
//! `--json`, for scripts.

use std::path::Path;

use p2pbridge_gpu::{BackendKind, CudaBackend, HostBackend};
use p2pbridge_verbs::{device_names, Context, Error as VerbsError, OdpTransportCaps, PortState, ProtectionDomain};
use serde::Serialize;

use crate::strategy::{
    plan, Failure, HostCaps, MemoryKind, NicCaps, PeerMem, Policy, Reason, SkipReason, Strategy, Support, Unsupported,
    LIBCUDA, UDMABUF,
};

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
    /// Why it could not be probed; its capabilities are then absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Unsupported>,
    /// What it can do (the strategy planner's view of it), where it could be probed.
    #[serde(flatten)]
    pub caps: Option<NicCaps>,
}

/// One CUDA device.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    /// Its ordinal.
    pub ordinal: usize,
    /// dma-buf export of its memory.
    pub dmabuf_export: Support,
    /// Its BAR1 aperture in bytes (the exported-bytes budget), where it could be read.
    pub bar1_bytes: Option<u64>,
    /// Why BAR1 could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar1_error: Option<Failure>,
}

/// What the bridge would do with one kind of memory.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    /// The strategy it would pick, if any.
    pub chosen: Option<Strategy>,
    /// Each strategy not picked, with why (and the fix, where there is one).
    pub skipped: Vec<Skipped>,
}

/// A strategy not picked.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The strategy.
    pub strategy: Strategy,
    /// Why.
    pub reason: SkipReason,
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// rdma-core, the kernel's RDMA support, and an RDMA device with an active port.
    pub rdma: Support,
    /// RDMA devices.
    pub devices: Vec<DeviceReport>,
    /// The device the strategies below are for (the first with an active port).
    pub device_used: Option<String>,
    /// nvidia-peermem or nv_peer_mem.
    pub peer_memory: Support,
    /// The path that showed the peer-memory module loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_memory_found: Option<&'static str>,
    /// The CUDA driver.
    pub cuda: Support,
    /// CUDA devices.
    pub gpus: Vec<GpuReport>,
    /// dma-buf export of host memory through /dev/udmabuf.
    pub udmabuf: Support,
    /// The userfaultfd monitor for registered host memory.
    pub host_monitor: Support,
    /// How many bytes registrations may pin, and where that comes from.
    pub pinned_budget: crate::budget::Budget,
    /// What the bridge would do with host memory.
    pub host_memory: Option<StrategyReport>,
    /// What the bridge would do with device (CUDA) memory.
    pub device_memory: Option<StrategyReport>,
    /// At least one strategy works (there is an RDMA device with an active port).
    pub ok: bool,
}

/// Probes device `name`: its ports, and the planner's view of it where a port is active.
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
    let host_caps = HostCaps::probe(&pd)?;
    let report = DeviceReport { name: name.into(), ports, error: None, caps: Some(host_caps.nic.clone()) };
    Ok((report, active.then_some(host_caps)))
}

fn rdma_reason(e: &VerbsError) -> Reason {
    match e {
        VerbsError::RdmaUnavailable { library, reason } => Reason::RdmaCoreMissing { library, loader: reason.clone() },
        e => Reason::RdmaFailed(e.into()),
    }
}

impl Report {
    /// Probes this host.
    pub fn gather() -> Report {
        let mut devices = Vec::new();
        let mut caps: Option<HostCaps> = None;
        let rdma = match device_names() {
            Err(e) => Support::no(rdma_reason(&e)),
            Ok(names) if names.is_empty() => Support::no(Reason::NoRdmaDevice),
            Ok(names) => {
                for n in &names {
                    match device_report(n) {
                        Ok((d, c)) => {
                            if caps.is_none() {
                                caps = c;
                            }
                            devices.push(d);
                        }
                        Err(e) => devices.push(DeviceReport {
                            name: n.clone(),
                            ports: Vec::new(),
                            error: Some(Unsupported::new(Reason::DeviceProbeFailed {
                                device: n.clone(),
                                failure: (&e).into(),
                            })),
                            caps: None,
                        }),
                    }
                }
                if caps.is_some() {
                    Support::Yes
                } else {
                    Support::no(Reason::NoActivePort { devices: names })
                }
            }
        };
        let peermem = PeerMem::detect(Path::new("/"));
        let peer_memory_found = match peermem {
            PeerMem::Loaded(p) => Some(p),
            PeerMem::Missing => None,
        };
        let (cuda, gpus) = if CudaBackend::driver_present().is_err() {
            (Support::no(Reason::CudaDriverMissing { library: LIBCUDA }), Vec::new())
        } else {
            match CudaBackend::device_count() {
                Err(e) => (Support::no(Reason::CudaFailed((&e).into())), Vec::new()),
                Ok(0) => (Support::no(Reason::NoCudaDevice), Vec::new()),
                Ok(n) => (Support::Yes, (0..n).map(gpu_report).collect()),
            }
        };
        let udmabuf = match HostBackend::udmabuf_support() {
            Ok(()) => Support::Yes,
            Err(error) => Support::no(Reason::UdmabufUnavailable { path: UDMABUF, error }),
        };
        let host_monitor = match crate::uffd::monitor_available() {
            Ok(()) => Support::Yes,
            Err(error) => Support::no(Reason::UserfaultfdUnavailable { error }),
        };
        let ops = OdpTransportCaps::SEND | OdpTransportCaps::RECV | OdpTransportCaps::WRITE | OdpTransportCaps::READ;
        let report_for = |kind: MemoryKind| {
            caps.as_ref().map(|c| {
                let p = plan(kind, ops, &Policy::default(), c);
                StrategyReport {
                    chosen: p.candidates.first().copied(),
                    skipped: p
                        .skipped
                        .into_iter()
                        .filter(|(_, r)| *r != SkipReason::NotReached)
                        .map(|(strategy, reason)| Skipped { strategy, reason })
                        .collect(),
                }
            })
        };
        let host_memory = report_for(MemoryKind::Host);
        let device_memory = report_for(MemoryKind::Backend(BackendKind::Cuda));
        let ok = caps.is_some();
        Report {
            rdma,
            device_used: caps.as_ref().map(|c| c.nic.device.clone()),
            devices,
            peer_memory: peermem.support(),
            peer_memory_found,
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
}

fn gpu_report(ordinal: usize) -> GpuReport {
    let gpu = CudaBackend::new(ordinal);
    let dmabuf_export =
        match gpu.as_ref().map_err(Failure::from).and_then(|g| g.dmabuf_support().map_err(|e| (&e).into())) {
            Ok(Ok(())) => Support::Yes,
            Ok(Err(driver)) => Support::no(Reason::GpuDmaBufExportRefused { ordinal, driver }),
            Err(failure) => Support::no(Reason::GpuProbeFailed { ordinal, failure }),
        };
    let (bar1_bytes, bar1_error) = match gpu.and_then(|g| g.bar1_bytes()) {
        Ok((n, _)) => (Some(n), None),
        Err(e) => (None, Some((&e).into())),
    };
    GpuReport { ordinal, dmabuf_export, bar1_bytes, bar1_error }
}
