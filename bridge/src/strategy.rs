//! Which registration strategy a buffer gets, and why each other one was skipped.
//!
//! In order of preference:
//! 1. **dma-buf**: an MR over the backend's dma-buf export (`ibv_reg_dmabuf_mr`);
//! 2. **peer memory**: plain `ibv_reg_mr` on a device VA, where nvidia-peermem (or the older
//!    nv_peer_mem) is loaded;
//! 3. **ODP**: `IBV_ACCESS_ON_DEMAND`, where the device's ODP caps cover the operations asked
//!    for (host memory);
//! 4. **pinned host**: `ibv_reg_mr` on host memory;
//! 5. **bounce**: registered host staging buffers and backend copies — always possible.
//!
//! [`plan`] is a pure function of the memory, the operations, the caller's [`Policy`] and
//! the host's [`HostCaps`] (from [`HostCaps::probe`]), so every decision can be tested.

use std::fmt;

use p2pbridge_gpu::BackendKind;
use p2pbridge_verbs::{DmaBufSupport, OdpCaps, OdpTransportCaps, ProtectionDomain};

/// A way to make memory reachable by the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// `ibv_reg_dmabuf_mr` on the backend's dma-buf export.
    DmaBuf,
    /// `ibv_reg_mr` on a device VA through nvidia-peermem.
    PeerMem,
    /// On-Demand Paging MR.
    Odp,
    /// Pinned host MR.
    PinnedHost,
    /// Staging through registered host buffers.
    Bounce,
}

impl Strategy {
    /// All strategies, in the order of preference.
    pub const ALL: [Strategy; 5] =
        [Strategy::DmaBuf, Strategy::PeerMem, Strategy::Odp, Strategy::PinnedHost, Strategy::Bounce];

    /// A short stable name ("dmabuf", "peermem", "odp", "pinned", "bounce").
    pub fn name(self) -> &'static str {
        match self {
            Strategy::DmaBuf => "dmabuf",
            Strategy::PeerMem => "peermem",
            Strategy::Odp => "odp",
            Strategy::PinnedHost => "pinned",
            Strategy::Bounce => "bounce",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the caller says of one strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    /// Use only required strategies (the first that works); fail otherwise.
    Require,
    /// Try before the merely allowed ones.
    Prefer,
    /// Use when it comes up in the default order.
    #[default]
    Allow,
    /// Never use.
    Forbid,
}

/// The caller's preferences, one per strategy; the default allows all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    prefs: [Preference; 5],
}

impl Policy {
    /// Sets `s` to `p`.
    pub fn set(mut self, s: Strategy, p: Preference) -> Self {
        self.prefs[s.index()] = p;
        self
    }
    /// Requires `s` (with any other required ones).
    pub fn require(self, s: Strategy) -> Self {
        self.set(s, Preference::Require)
    }
    /// Prefers `s`.
    pub fn prefer(self, s: Strategy) -> Self {
        self.set(s, Preference::Prefer)
    }
    /// Forbids `s`.
    pub fn forbid(self, s: Strategy) -> Self {
        self.set(s, Preference::Forbid)
    }
    /// The preference for `s`.
    pub fn get(&self, s: Strategy) -> Preference {
        self.prefs[s.index()]
    }

    /// The strategies to try, in order, and those the policy rules out.
    fn order(&self) -> (Vec<Strategy>, Vec<(Strategy, SkipReason)>) {
        let required: Vec<Strategy> =
            Strategy::ALL.into_iter().filter(|&s| self.get(s) == Preference::Require).collect();
        let mut out = Vec::new();
        let mut ruled_out = Vec::new();
        if !required.is_empty() {
            for s in Strategy::ALL {
                match self.get(s) {
                    Preference::Require => out.push(s),
                    Preference::Forbid => ruled_out.push((s, SkipReason::Forbidden)),
                    _ => ruled_out.push((s, SkipReason::NotRequired)),
                }
            }
            return (out, ruled_out);
        }
        for pass in [Preference::Prefer, Preference::Allow] {
            out.extend(Strategy::ALL.into_iter().filter(|&s| self.get(s) == pass));
        }
        ruled_out.extend(
            Strategy::ALL
                .into_iter()
                .filter(|&s| self.get(s) == Preference::Forbid)
                .map(|s| (s, SkipReason::Forbidden)),
        );
        (out, ruled_out)
    }
}

/// Why a strategy was not used — machine-readable, with the fix where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The caller forbade it.
    Forbidden,
    /// The caller required others.
    NotRequired,
    /// It does not apply to this kind of memory.
    NotForThisMemory {
        /// Which memory it is for.
        applies_to: &'static str,
    },
    /// A kernel module it needs is not loaded.
    ModuleMissing {
        /// The module(s).
        module: &'static str,
        /// The paths looked at.
        checked: &'static str,
        /// The fix.
        fix: &'static str,
    },
    /// The RDMA device lacks a capability.
    CapabilityAbsent {
        /// Which.
        capability: String,
        /// The fix, where known.
        fix: &'static str,
    },
    /// The backend cannot export this memory as a dma-buf.
    ExportUnsupported {
        /// Its reason.
        reason: String,
    },
    /// It applied but the registration failed.
    Failed {
        /// The error.
        error: String,
    },
    /// It would pass a memory budget, even after evicting unused registrations.
    OverBudget {
        /// Which limit, and how full it is.
        limit: String,
        /// How to raise it.
        fix: String,
    },
    /// An earlier strategy was chosen: this one was not considered.
    NotReached,
}

impl SkipReason {
    /// What would make the strategy work, where there is something to do.
    pub fn fix(&self) -> Option<&'static str> {
        match self {
            SkipReason::ModuleMissing { fix, .. } | SkipReason::CapabilityAbsent { fix, .. } => Some(fix),
            _ => None,
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Forbidden => write!(f, "forbidden by the caller's policy"),
            SkipReason::NotRequired => write!(f, "the policy requires other strategies"),
            SkipReason::NotForThisMemory { applies_to } => write!(f, "applies to {applies_to} only"),
            SkipReason::ModuleMissing { module, checked, fix } => {
                write!(f, "{module} is not loaded (checked {checked}); fix: {fix}")
            }
            SkipReason::CapabilityAbsent { capability, fix } => {
                write!(f, "the RDMA device lacks {capability}; fix: {fix}")
            }
            SkipReason::ExportUnsupported { reason } => write!(f, "export failed: {reason}"),
            SkipReason::Failed { error } => write!(f, "registration failed: {error}"),
            SkipReason::OverBudget { limit, fix } => write!(f, "over budget: {limit}; {fix}"),
            SkipReason::NotReached => write!(f, "not tried: an earlier strategy was chosen"),
        }
    }
}

/// What memory is being registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Host memory that no backend owns (a Vec, an mmap).
    Host,
    /// Memory a backend owns: its dma-buf export may apply.
    Backend(BackendKind),
}

impl MemoryKind {
    fn is_device(self) -> bool {
        matches!(self, MemoryKind::Backend(k) if k != BackendKind::Host)
    }
}

/// Whether a peer-memory client module is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMem {
    /// Loaded: which path showed it.
    Loaded(&'static str),
    /// Not loaded.
    Missing,
}

/// The paths NCCL and UCX look at for the peer-memory clients.
pub const PEERMEM_PATHS: [&str; 3] = [
    "/sys/kernel/mm/memory_peers/nv_mem/version",
    "/sys/kernel/mm/memory_peers/nv_mem_nc/version",
    "/sys/module/nvidia_peermem/version",
];

impl PeerMem {
    /// Looks at [`PEERMEM_PATHS`] under `root` ("/" normally).
    pub fn detect(root: &std::path::Path) -> PeerMem {
        for p in PEERMEM_PATHS {
            if root.join(p.trim_start_matches('/')).exists() {
                return PeerMem::Loaded(p);
            }
        }
        PeerMem::Missing
    }
}

/// What this host's RDMA device and kernel can do, as far as strategy choice goes.
#[derive(Debug, Clone)]
pub struct HostCaps {
    /// The RDMA device.
    pub device: String,
    /// dma-buf MR support (probe).
    pub dmabuf: DmaBufSupport,
    /// Peer-memory module.
    pub peermem: PeerMem,
    /// ODP caps.
    pub odp: OdpCaps,
    /// Type 2 memory windows, for keys the NIC revokes one by one.
    pub mem_windows: bool,
    /// ODP prefetch (`ibv_advise_mr`), or why not.
    pub prefetch: std::result::Result<(), String>,
}

impl HostCaps {
    /// Probes the device of `pd` and this host.
    pub fn probe(pd: &ProtectionDomain) -> p2pbridge_verbs::Result<Self> {
        let caps = pd.context().caps()?;
        Ok(HostCaps {
            device: pd.context().name().to_string(),
            dmabuf: pd.dmabuf_support(),
            peermem: PeerMem::detect(std::path::Path::new("/")),
            odp: caps.odp,
            mem_windows: caps.mw_type2,
            prefetch: match pd.prefetch_support() {
                Ok(None) => Ok(()),
                Ok(Some(why)) => Err(why),
                Err(e) => Err(e.to_string()),
            },
        })
    }
}

/// The strategy to try for a buffer, in order, with what was ruled out and why.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Candidates, best first; the bridge tries them in turn.
    pub candidates: Vec<Strategy>,
    /// Strategies ruled out before trying, with why.
    pub skipped: Vec<(Strategy, SkipReason)>,
}

/// Plans the strategy for memory of `kind`, used for `ops`, under `policy`, on `caps`. Whether
/// a backend can export the range as a dma-buf is learnt when the bridge tries it.
pub fn plan(kind: MemoryKind, ops: OdpTransportCaps, policy: &Policy, caps: &HostCaps) -> Plan {
    let (order, mut skipped) = policy.order();
    let mut candidates = Vec::new();
    for s in order {
        match applies(s, kind, ops, caps) {
            Ok(()) => candidates.push(s),
            Err(r) => skipped.push((s, r)),
        }
    }
    Plan { candidates, skipped }
}

fn applies(s: Strategy, kind: MemoryKind, ops: OdpTransportCaps, caps: &HostCaps) -> Result<(), SkipReason> {
    match s {
        Strategy::DmaBuf => {
            if kind == MemoryKind::Host {
                return Err(SkipReason::NotForThisMemory {
                    applies_to:
                        "memory of a backend that exports dma-bufs (device memory, or the host backend's memfd memory)",
                });
            }
            if let DmaBufSupport::Unsupported(errno) = caps.dmabuf {
                return Err(SkipReason::CapabilityAbsent {
                    capability: format!("dma-buf MRs ({} said {})", caps.device, errno.name()),
                    fix: "a kernel >= 5.12, rdma-core >= 34 and a NIC driver that imports dma-bufs (mlx5, efa, irdma, bnxt_re); rxe and siw do not",
                });
            }
            Ok(())
        }
        Strategy::PeerMem => {
            if !kind.is_device() {
                return Err(SkipReason::NotForThisMemory { applies_to: "device memory" });
            }
            match caps.peermem {
                PeerMem::Loaded(_) => Ok(()),
                PeerMem::Missing => Err(SkipReason::ModuleMissing {
                    module: "nvidia-peermem (or nv_peer_mem)",
                    checked:
                        "/sys/kernel/mm/memory_peers/{nv_mem,nv_mem_nc}/version, /sys/module/nvidia_peermem/version",
                    fix: "`modprobe nvidia-peermem` (shipped with the NVIDIA driver)",
                }),
            }
        }
        Strategy::Odp => {
            if kind.is_device() {
                return Err(SkipReason::NotForThisMemory {
                    applies_to: "host memory (device memory would need HMM, which cuMemAlloc memory is not)",
                });
            }
            if !caps.odp.supported {
                return Err(SkipReason::CapabilityAbsent {
                    capability: "On-Demand Paging (IBV_ODP_SUPPORT)".into(),
                    fix: "an ODP-capable NIC (mlx5) or rxe on Linux >= 6.15",
                });
            }
            if !caps.odp.rc_supports(ops) {
                return Err(SkipReason::CapabilityAbsent {
                    capability: format!("ODP for {ops:?} on RC (has {:?})", caps.odp.rc),
                    fix: "ask for fewer operations, or use pinned memory",
                });
            }
            Ok(())
        }
        Strategy::PinnedHost => {
            if kind.is_device() {
                return Err(SkipReason::NotForThisMemory { applies_to: "host memory" });
            }
            Ok(())
        }
        Strategy::Bounce => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pbridge_verbs::Errno;

    fn caps(dmabuf: bool, peermem: bool, odp: bool) -> HostCaps {
        HostCaps {
            device: "mlx5_0".into(),
            dmabuf: if dmabuf { DmaBufSupport::Supported } else { DmaBufSupport::Unsupported(Errno(libc::EOPNOTSUPP)) },
            peermem: if peermem { PeerMem::Loaded(PEERMEM_PATHS[2]) } else { PeerMem::Missing },
            odp: OdpCaps {
                supported: odp,
                implicit: false,
                rc: if odp { OdpTransportCaps::all() } else { OdpTransportCaps::empty() },
                uc: OdpTransportCaps::empty(),
                ud: OdpTransportCaps::empty(),
            },
            mem_windows: true,
            prefetch: Ok(()),
        }
    }

    const RW: OdpTransportCaps = OdpTransportCaps::WRITE.union(OdpTransportCaps::READ);
    const CUDA: MemoryKind = MemoryKind::Backend(BackendKind::Cuda);

    #[test]
    fn device_memory_prefers_dmabuf_then_peermem_then_bounce() {
        let p = plan(CUDA, RW, &Policy::default(), &caps(true, true, true));
        assert_eq!(p.candidates, vec![Strategy::DmaBuf, Strategy::PeerMem, Strategy::Bounce]);
        let p = plan(CUDA, RW, &Policy::default(), &caps(false, false, true));
        assert_eq!(p.candidates, vec![Strategy::Bounce]);
        let reasons: Vec<_> = p.skipped.iter().map(|(s, _)| *s).collect();
        assert_eq!(reasons, vec![Strategy::DmaBuf, Strategy::PeerMem, Strategy::Odp, Strategy::PinnedHost]);
        assert!(matches!(p.skipped[1].1, SkipReason::ModuleMissing { .. }));
    }

    #[test]
    fn host_memory_uses_odp_only_when_the_caps_cover_the_operations() {
        let p = plan(MemoryKind::Host, RW, &Policy::default(), &caps(true, false, true));
        assert_eq!(p.candidates, vec![Strategy::Odp, Strategy::PinnedHost, Strategy::Bounce]);
        let mut c = caps(true, false, true);
        c.odp.rc = OdpTransportCaps::SEND | OdpTransportCaps::RECV;
        let p = plan(MemoryKind::Host, RW, &Policy::default(), &c);
        assert_eq!(p.candidates, vec![Strategy::PinnedHost, Strategy::Bounce]);
        assert!(p.skipped.iter().any(|(s, r)| *s == Strategy::Odp && matches!(r, SkipReason::CapabilityAbsent { .. })));
    }

    #[test]
    fn policies_require_prefer_and_forbid() {
        let c = caps(true, true, true);
        let p = plan(MemoryKind::Host, RW, &Policy::default().prefer(Strategy::PinnedHost), &c);
        assert_eq!(p.candidates[0], Strategy::PinnedHost);
        let p = plan(MemoryKind::Host, RW, &Policy::default().forbid(Strategy::Odp), &c);
        assert_eq!(p.candidates, vec![Strategy::PinnedHost, Strategy::Bounce]);
        assert!(p.skipped.contains(&(Strategy::Odp, SkipReason::Forbidden)));
        let p = plan(CUDA, RW, &Policy::default().require(Strategy::PeerMem), &caps(true, false, true));
        assert!(p.candidates.is_empty(), "required peermem is missing: nothing may be used");
        assert!(p.skipped.contains(&(Strategy::DmaBuf, SkipReason::NotRequired)));
        let p = plan(MemoryKind::Backend(BackendKind::Host), RW, &Policy::default(), &c);
        assert_eq!(p.candidates, vec![Strategy::DmaBuf, Strategy::Odp, Strategy::PinnedHost, Strategy::Bounce]);
    }

    #[test]
    fn peermem_is_detected_from_sysfs() {
        let root = std::env::temp_dir().join(format!("p2pb-peermem-{}", std::process::id()));
        assert_eq!(PeerMem::detect(&root), PeerMem::Missing);
        let f = root.join("sys/module/nvidia_peermem/version");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "1.0\\n").unwrap();
        assert_eq!(PeerMem::detect(&root), PeerMem::Loaded("/sys/module/nvidia_peermem/version"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
