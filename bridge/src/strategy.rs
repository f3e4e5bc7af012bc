//! Which registration strategy a buffer gets, and why each other one was skipped; and the one
//! capability model behind both the planner and the probe.
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
//! Every "is X supported here?" — by the device, the kernel, a driver — is answered by a
//! [`Support`]: yes, or no with an [`Unsupported`] that holds the structured [`Reason`] (the
//! errno, the flag, the paths checked, ...) and its fix. The fixes live in one place,
//! [`Reason::fix`]. [`HostCaps::probe`] gathers the answers the planner needs; the probe
//! ([`crate::probe`]) reports the same values, and a strategy ruled out by one carries it as
//! [`SkipReason::Unsupported`].
//!
//! [`plan`] is a pure function of the memory, the operations, the caller's [`Policy`] and
//! the host's [`HostCaps`] (from [`HostCaps::probe`]), so every decision can be tested.

use std::fmt;

use p2pbridge_gpu::BackendKind;
use p2pbridge_verbs::{DmaBufSupport, Errno, OdpTransportCaps, ProtectionDomain};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::cache::CacheFull;

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

impl Serialize for Strategy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Whether something is supported here: yes, or no with why and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// It works.
    Yes,
    /// It does not: why, and the fix.
    No(Unsupported),
}

impl Support {
    /// No, for `reason` (with its fix).
    pub fn no(reason: Reason) -> Self {
        Support::No(Unsupported::new(reason))
    }

    /// Whether it works.
    pub fn is_yes(&self) -> bool {
        matches!(self, Support::Yes)
    }

    /// Why not, where it does not work.
    pub fn unsupported(&self) -> Option<&Unsupported> {
        match self {
            Support::Yes => None,
            Support::No(u) => Some(u),
        }
    }

    /// `Ok(())` where it works, else why not.
    pub fn as_result(&self) -> Result<(), &Unsupported> {
        self.unsupported().map_or(Ok(()), Err)
    }
}

/// "yes", or "no: why; fix: …".
impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Support::Yes => write!(f, "yes"),
            Support::No(u) => write!(f, "no: {u}"),
        }
    }
}

/// JSON: `{"supported": true}`, or `{"supported": false, "reason": {"kind": ..., fields},
/// "why": "...", "fix": "..."}` (see [`Unsupported`]).
impl Serialize for Support {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Support::Yes => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("supported", &true)?;
                m.end()
            }
            Support::No(u) => {
                let mut m = s.serialize_map(Some(4))?;
                m.serialize_entry("supported", &false)?;
                u.serialize_entries(&mut m)?;
                m.end()
            }
        }
    }
}

/// Why something is not supported, and what would make it work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    reason: Reason,
    fix: &'static str,
}

impl Unsupported {
    /// `reason`, with its fix ([`Reason::fix`]).
    pub fn new(reason: Reason) -> Self {
        let fix = reason.fix();
        Unsupported { reason, fix }
    }

    /// Why not.
    pub fn reason(&self) -> &Reason {
        &self.reason
    }

    /// What would make it work.
    pub fn fix(&self) -> &'static str {
        self.fix
    }

    fn serialize_entries<M: SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        m.serialize_entry("reason", &self.reason)?;
        m.serialize_entry("why", &self.reason.to_string())?;
        m.serialize_entry("fix", self.fix)
    }
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; fix: {}", self.reason, self.fix)
    }
}

/// JSON: `{"reason": {"kind": ..., fields}, "why": "<the reason in words>", "fix": "..."}`.
impl Serialize for Unsupported {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3))?;
        self.serialize_entries(&mut m)?;
        m.end()
    }
}

/// Why something is not supported: what was checked and what it said. `Display` says it in
/// words; [`Reason::fix`] says what to do. Serialized with a `kind` tag and the fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// A library of rdma-core cannot be loaded.
    RdmaCoreMissing {
        /// Its soname.
        library: &'static str,
        /// What the dynamic loader said.
        loader: String,
    },
    /// Listing the RDMA devices failed (`ENOSYS`: the kernel has no RDMA support loaded).
    RdmaFailed(Failure),
    /// rdma-core is installed but there is no RDMA device.
    NoRdmaDevice,
    /// No RDMA device has an active port.
    NoActivePort {
        /// The devices looked at.
        devices: Vec<String>,
    },
    /// The device could not be opened or queried.
    DeviceProbeFailed {
        /// The device.
        device: String,
        /// The failure.
        failure: Failure,
    },
    /// `ibv_reg_dmabuf_mr(pd, 0, 0, 0, -1, 0)` said the device cannot register dma-bufs.
    DmaBufMrRefused {
        /// The device.
        device: String,
        /// What it said (`EOPNOTSUPP`, `EPROTONOSUPPORT` or `ENOSYS`).
        #[serde(serialize_with = "errno_json")]
        errno: Errno,
    },
    /// The device lacks On-Demand Paging (`IBV_ODP_SUPPORT`).
    OdpAbsent {
        /// The device.
        device: String,
    },
    /// The device's ODP on RC lacks operations asked for.
    OdpOperationsAbsent {
        /// The device.
        device: String,
        /// The operations asked for.
        #[serde(serialize_with = "op_names")]
        asked: OdpTransportCaps,
        /// Those the device has.
        #[serde(serialize_with = "op_names")]
        has: OdpTransportCaps,
    },
    /// The device lacks implicit ODP (`IBV_ODP_SUPPORT_IMPLICIT`).
    ImplicitOdpAbsent {
        /// The device.
        device: String,
    },
    /// advise_mr prefetch needs ODP, which the device lacks.
    AdviseMrNeedsOdp {
        /// The device.
        device: String,
    },
    /// The device's user-space provider does not implement `ibv_advise_mr` (`EOPNOTSUPP`).
    AdviseMrUnimplemented {
        /// The device.
        device: String,
    },
    /// The device lacks type 2 memory windows (`IBV_DEVICE_MEM_WINDOW_TYPE_2A/2B`, or `max_mw`
    /// is 0).
    MemWindowsAbsent {
        /// The device.
        device: String,
        /// Its `max_mw`.
        max_mw: u32,
    },
    /// No peer-memory client module is loaded.
    PeerMemMissing {
        /// The module(s).
        module: &'static str,
        /// The paths looked at.
        checked: &'static [&'static str],
    },
    /// The CUDA driver library cannot be loaded.
    CudaDriverMissing {
        /// Its soname.
        library: &'static str,
    },
    /// The CUDA driver failed.
    CudaFailed(Failure),
    /// The CUDA driver sees no device.
    NoCudaDevice,
    /// A GPU could not be opened or queried.
    GpuProbeFailed {
        /// Its CUDA ordinal.
        ordinal: usize,
        /// The failure.
        failure: Failure,
    },
    /// A GPU cannot export its memory as dma-bufs.
    GpuDmaBufExportRefused {
        /// Its CUDA ordinal.
        ordinal: usize,
        /// Why, as the CUDA backend says it.
        driver: String,
    },
    /// `/dev/udmabuf` cannot be opened.
    UdmabufUnavailable {
        /// The path.
        path: &'static str,
        /// What opening it said.
        error: String,
    },
    /// The userfaultfd monitor cannot run.
    UserfaultfdUnavailable {
        /// What starting it said.
        error: String,
    },
    /// The caller turned it off.
    DisabledByOption {
        /// The option.
        option: &'static str,
    },
}

/// The peer-memory client modules, for [`Reason::PeerMemMissing`].
const PEERMEM_MODULES: &str = "nvidia-peermem (or nv_peer_mem)";
/// The CUDA driver library, for [`Reason::CudaDriverMissing`].
pub(crate) const LIBCUDA: &str = "libcuda.so.1";
/// The udmabuf device, for [`Reason::UdmabufUnavailable`].
pub(crate) const UDMABUF: &str = "/dev/udmabuf";

const FIX_ODP_NIC: &str = "an ODP-capable NIC (mlx5) or rxe on Linux >= 6.15";
const FIX_CHECK_RDMA: &str = "check `rdma link` and `ibv_devinfo`";

impl Reason {
    /// What would make it work. Every fix the planner and the probe give is here.
    pub fn fix(&self) -> &'static str {
        let rdma_fix = |f: &Failure| {
            if f.errno == Some(Errno(libc::ENOSYS)) {
                "load ib_uverbs and your NIC's driver (mlx5_ib, ...), or rdma_rxe for Soft-RoCE (`rdma link add rxe0 type rxe netdev eth0`); a kernel built without CONFIG_INFINIBAND needs another kernel"
            } else {
                FIX_CHECK_RDMA
            }
        };
        match self {
            Reason::RdmaCoreMissing { .. } => {
                "install rdma-core and ibverbs-providers (Debian/Ubuntu: apt install rdma-core ibverbs-providers)"
            }
            Reason::RdmaFailed(f) => rdma_fix(f),
            Reason::NoRdmaDevice => {
                "load your NIC's RDMA driver, or add a Soft-RoCE device: `rdma link add rxe0 type rxe netdev eth0`"
            }
            Reason::NoActivePort { .. } => "check cabling/links: `rdma link`, `ibv_devinfo`",
            Reason::DeviceProbeFailed { failure, .. } => rdma_fix(failure),
            Reason::DmaBufMrRefused { .. } => {
                "a kernel >= 5.12, rdma-core >= 34 and a NIC driver that imports dma-bufs (mlx5, efa, irdma, bnxt_re); rxe and siw do not"
            }
            Reason::OdpAbsent { .. } | Reason::AdviseMrNeedsOdp { .. } => FIX_ODP_NIC,
            Reason::OdpOperationsAbsent { .. } => "ask for fewer operations, or use pinned memory",
            Reason::ImplicitOdpAbsent { .. } => "a NIC with implicit ODP (mlx5); rxe has none",
            Reason::AdviseMrUnimplemented { .. } => {
                "a newer rdma-core whose provider implements advise_mr (rxe's from rdma-core v57)"
            }
            Reason::MemWindowsAbsent { .. } => {
                "keys are then regions of their own (one more registration per hand-out) that work over any connection; mlx5 and rxe (Linux >= 5.12) have type 2 windows"
            }
            Reason::PeerMemMissing { .. } => "`modprobe nvidia-peermem` (shipped with the NVIDIA driver)",
            Reason::CudaDriverMissing { .. } => "install the NVIDIA driver (libcuda.so.1) on a host with an NVIDIA GPU",
            Reason::CudaFailed(_) => "check that nvidia-smi sees the GPU (the NVIDIA driver installed and loaded)",
            Reason::NoCudaDevice => "check nvidia-smi and CUDA_VISIBLE_DEVICES",
            Reason::GpuProbeFailed { .. } => "check nvidia-smi",
            Reason::GpuDmaBufExportRefused { .. } => {
                "the open NVIDIA kernel modules (driver >= 515) on a kernel >= 5.12"
            }
            Reason::UdmabufUnavailable { .. } => {
                "a kernel with CONFIG_UDMABUF (`modprobe udmabuf`), run as root or with access to /dev/udmabuf"
            }
            Reason::UserfaultfdUnavailable { .. } => {
                "run as root (or set vm.unprivileged_userfaultfd=1); without the monitor, call Bridge::invalidate_host before unmapping registered memory"
            }
            Reason::DisabledByOption { .. } => "set the option (it defaults to on)",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::RdmaCoreMissing { library, loader } => write!(f, "{library} not found ({loader})"),
            Reason::RdmaFailed(e) | Reason::CudaFailed(e) => write!(f, "{e}"),
            Reason::NoRdmaDevice => write!(f, "rdma-core is installed but there is no RDMA device"),
            Reason::NoActivePort { devices } => {
                write!(f, "no RDMA device has an active port (devices: {})", devices.join(", "))
            }
            Reason::DeviceProbeFailed { device, failure } => write!(f, "{device} could not be probed: {failure}"),
            Reason::DmaBufMrRefused { device, errno } => {
                write!(f, "{device} lacks dma-buf MRs (ibv_reg_dmabuf_mr said {})", errno.name())
            }
            Reason::OdpAbsent { device } => write!(f, "{device} lacks On-Demand Paging (IBV_ODP_SUPPORT)"),
            Reason::OdpOperationsAbsent { device, asked, has } => {
                write!(f, "{device} lacks ODP for {} on RC (it has {})", ops_text(*asked), ops_text(*has))
            }
            Reason::ImplicitOdpAbsent { device } => {
                write!(f, "{device} lacks implicit On-Demand Paging (IBV_ODP_SUPPORT_IMPLICIT)")
            }
            Reason::AdviseMrNeedsOdp { device } => {
                write!(f, "{device} lacks On-Demand Paging (IBV_ODP_SUPPORT), which advise_mr prefetches for")
            }
            Reason::AdviseMrUnimplemented { device } => {
                write!(
                    f,
                    "the user-space provider of {device} does not implement advise_mr (ibv_advise_mr said EOPNOTSUPP)"
                )
            }
            Reason::MemWindowsAbsent { device, max_mw } => {
                write!(f, "{device} lacks type 2 memory windows (IBV_DEVICE_MEM_WINDOW_TYPE_2A/2B; max_mw {max_mw})")
            }
            Reason::PeerMemMissing { module, checked } => {
                write!(f, "{module} is not loaded (checked {})", checked.join(", "))
            }
            Reason::CudaDriverMissing { library } => write!(f, "{library} not found: this host has no CUDA driver"),
            Reason::NoCudaDevice => write!(f, "the CUDA driver sees no device"),
            Reason::GpuProbeFailed { ordinal, failure } => write!(f, "GPU {ordinal} could not be probed: {failure}"),
            Reason::GpuDmaBufExportRefused { ordinal, driver } => {
                write!(f, "GPU {ordinal} cannot export dma-bufs: {driver}")
            }
            Reason::UdmabufUnavailable { error, .. } => write!(f, "{error}"),
            Reason::UserfaultfdUnavailable { error } => write!(f, "{error}"),
            Reason::DisabledByOption { option } => write!(f, "disabled by {option}"),
        }
    }
}

/// A call that failed: which, its code where there is one, and the whole error in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The call (a verb, a driver entry point, a system call), where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call: Option<&'static str>,
    /// The errno it set, where it sets one.
    #[serde(serialize_with = "opt_errno_json", skip_serializing_if = "Option::is_none")]
    pub errno: Option<Errno>,
    /// The driver's error code (a `CUresult` name), where it is a driver call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The error.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<&p2pbridge_verbs::Error> for Failure {
    fn from(e: &p2pbridge_verbs::Error) -> Self {
        use p2pbridge_verbs::Error as E;
        let (call, errno) = match e {
            E::Verb { verb, errno, .. } => (Some(*verb), Some(*errno)),
            E::DmaBufUnsupported { errno, .. } => (Some("ibv_reg_dmabuf_mr"), Some(*errno)),
            _ => (None, None),
        };
        Failure { call, errno, code: None, message: e.to_string() }
    }
}

impl From<&p2pbridge_gpu::Error> for Failure {
    fn from(e: &p2pbridge_gpu::Error) -> Self {
        use p2pbridge_gpu::Error as E;
        let (call, errno, code) = match e {
            E::Cuda { call, name, .. } => (Some(*call), None, Some(name.clone())),
            E::Os { call, err } => (Some(*call), err.raw_os_error().map(Errno), None),
            _ => (None, None, None),
        };
        Failure { call, errno, code, message: e.to_string() }
    }
}

impl From<&crate::Error> for Failure {
    fn from(e: &crate::Error) -> Self {
        match e {
            crate::Error::Verbs(v) => v.into(),
            crate::Error::Gpu(g) => g.into(),
            other => Failure { call: None, errno: None, code: None, message: other.to_string() },
        }
    }
}

#[derive(Serialize)]
struct ErrnoJson {
    name: &'static str,
    value: i32,
}

fn errno_json<S: Serializer>(e: &Errno, s: S) -> Result<S::Ok, S::Error> {
    ErrnoJson { name: e.name(), value: e.0 }.serialize(s)
}

fn opt_errno_json<S: Serializer>(e: &Option<Errno>, s: S) -> Result<S::Ok, S::Error> {
    e.map(|e| ErrnoJson { name: e.name(), value: e.0 }).serialize(s)
}

fn op_names<S: Serializer>(ops: &OdpTransportCaps, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ops.iter_names().map(|(n, _)| n))
}

fn ops_text(ops: OdpTransportCaps) -> String {
    let names: Vec<&str> = ops.iter_names().map(|(n, _)| n).collect();
    if names.is_empty() {
        "no operation".into()
    } else {
        names.join(" | ")
    }
}

/// What memory a strategy applies to, where the memory at hand is not of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppliesTo {
    /// Memory of a backend that exports dma-bufs (dma-buf).
    ExportingBackendMemory,
    /// Device memory (peer memory).
    DeviceMemory,
    /// Host memory the kernel can fault in for the NIC (ODP).
    PageableHostMemory,
    /// Host memory (pinned).
    HostMemory,
    /// Memory of a backend, which copies to and from the staging buffers (bounce).
    BackendMemory,
}

impl fmt::Display for AppliesTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AppliesTo::ExportingBackendMemory => {
                "memory of a backend that exports dma-bufs (device memory, or the host backend's memfd memory)"
            }
            AppliesTo::DeviceMemory => "device memory",
            AppliesTo::PageableHostMemory => {
                "host memory (device memory would need HMM, which cuMemAlloc memory is not)"
            }
            AppliesTo::HostMemory => "host memory",
            AppliesTo::BackendMemory => "memory of a backend (plain host memory has none to copy staging with)",
        })
    }
}

/// Why a strategy was not used — structured data (serialized with a `kind` tag), with the fix
/// where there is one; `Display` says it in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SkipReason {
    /// The caller forbade it.
    Forbidden,
    /// The caller required others.
    NotRequired,
    /// It does not apply to this kind of memory.
    NotForThisMemory {
        /// Which memory it is for.
        applies_to: AppliesTo,
    },
    /// This host cannot do it (a device capability, a kernel module): why, and the fix.
    Unsupported(Unsupported),
    /// The backend cannot export this memory as a dma-buf.
    ExportUnsupported(Failure),
    /// It applied but the registration failed.
    Failed(Failure),
    /// It would pass a memory budget, even after evicting unused registrations.
    OverBudget {
        /// The limit, and how full it is.
        #[serde(serialize_with = "cache_full_json")]
        limit: CacheFull,
        /// Where the limit comes from.
        source: String,
        /// How to raise it.
        fix: String,
    },
    /// An earlier strategy was chosen: this one was not considered.
    NotReached,
    /// It applies, but only where the caller asks for it ([`Preference::Prefer`] or
    /// [`Preference::Require`]): ODP for host memory registered with
    /// [`Bridge::register_host`](crate::Bridge::register_host), whose unmapping the monitor
    /// acts on only after `munmap` has returned (a peer's WRITE in that window reaches the
    /// memory mapped there next).
    OptIn {
        /// What asking for it means.
        why: &'static str,
    },
}

impl SkipReason {
    /// What would make the strategy work, where there is something to do.
    pub fn fix(&self) -> Option<&str> {
        match self {
            SkipReason::Unsupported(u) => Some(u.fix()),
            SkipReason::OverBudget { fix, .. } => Some(fix),
            SkipReason::OptIn { .. } => Some("Policy::prefer(Strategy::Odp), accepting that window"),
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
            SkipReason::Unsupported(u) => write!(f, "{u}"),
            SkipReason::ExportUnsupported(e) => write!(f, "export failed: {e}"),
            SkipReason::Failed(e) => write!(f, "registration failed: {e}"),
            SkipReason::OverBudget { limit, fix, .. } => write!(f, "over budget: {limit}; {fix}"),
            SkipReason::NotReached => write!(f, "not tried: an earlier strategy was chosen"),
            SkipReason::OptIn { why } => write!(f, "used only where the policy asks for it: {why}"),
        }
    }
}

/// [`CacheFull`]'s fields, with the limit named.
#[derive(Serialize)]
struct CacheFullJson {
    limit: &'static str,
    asked: u64,
    used: u64,
    max: u64,
    entries: usize,
    bytes: u64,
    max_entries: usize,
    max_bytes: u64,
}

fn cache_full_json<S: Serializer>(c: &CacheFull, s: S) -> Result<S::Ok, S::Error> {
    CacheFullJson {
        limit: c.limit,
        asked: c.asked,
        used: c.used,
        max: c.max,
        entries: c.entries,
        bytes: c.bytes,
        max_entries: c.max_entries,
        max_bytes: c.max_bytes,
    }
    .serialize(s)
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

    /// Whether peer memory is supported: loaded, or why not.
    pub fn support(&self) -> Support {
        match self {
            PeerMem::Loaded(_) => Support::Yes,
            PeerMem::Missing => {
                Support::no(Reason::PeerMemMissing { module: PEERMEM_MODULES, checked: &PEERMEM_PATHS })
            }
        }
    }
}

/// What one RDMA device can do, as far as strategy choice goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicCaps {
    /// The device (reported beside these by whoever serializes them).
    #[serde(skip)]
    pub device: String,
    /// ODP: general support (`IBV_ODP_SUPPORT`).
    pub odp: Support,
    /// ODP operations supported on RC.
    #[serde(serialize_with = "op_names")]
    pub odp_rc: OdpTransportCaps,
    /// Implicit ODP (`IBV_ODP_SUPPORT_IMPLICIT`).
    pub implicit_odp: Support,
    /// dma-buf MRs (the `ibv_reg_dmabuf_mr(pd,0,0,0,-1,0)` probe).
    pub dmabuf_mr: Support,
    /// `ibv_advise_mr` prefetch of ODP regions (tried on one page).
    pub advise_mr: Support,
    /// Type 2 memory windows: keys the NIC revokes one by one, bound to one connection.
    pub mem_windows: Support,
}

impl NicCaps {
    /// Probes the device of `pd`: its caps, and the dma-buf MR and advise_mr probes.
    pub fn probe(pd: &ProtectionDomain) -> p2pbridge_verbs::Result<Self> {
        let ctx = pd.context();
        let caps = ctx.caps()?;
        let device = ctx.name().to_string();
        let no = |r: Reason| Support::no(r);
        let dmabuf_mr = match pd.dmabuf_support() {
            DmaBufSupport::Supported => Support::Yes,
            DmaBufSupport::Unsupported(errno) => no(Reason::DmaBufMrRefused { device: device.clone(), errno }),
        };
        let advise_mr = if !caps.odp.supported {
            no(Reason::AdviseMrNeedsOdp { device: device.clone() })
        } else {
            // With ODP there, `Some` means the provider lacks advise_mr (see `prefetch_support`).
            match pd.prefetch_support() {
                Ok(None) => Support::Yes,
                Ok(Some(_)) => no(Reason::AdviseMrUnimplemented { device: device.clone() }),
                Err(e) => no(Reason::DeviceProbeFailed { device: device.clone(), failure: (&e).into() }),
            }
        };
        Ok(NicCaps {
            odp: if caps.odp.supported { Support::Yes } else { no(Reason::OdpAbsent { device: device.clone() }) },
            odp_rc: caps.odp.rc,
            implicit_odp: if caps.odp.implicit {
                Support::Yes
            } else {
                no(Reason::ImplicitOdpAbsent { device: device.clone() })
            },
            dmabuf_mr,
            advise_mr,
            mem_windows: if caps.mw_type2 {
                Support::Yes
            } else {
                no(Reason::MemWindowsAbsent { device: device.clone(), max_mw: caps.max_mw })
            },
            device,
        })
    }

    /// ODP for `ops` on RC: ODP at all, and every operation.
    pub fn odp_for(&self, ops: OdpTransportCaps) -> Support {
        match &self.odp {
            Support::No(_) => self.odp.clone(),
            Support::Yes if self.odp_rc.contains(ops) => Support::Yes,
            Support::Yes => {
                Support::no(Reason::OdpOperationsAbsent { device: self.device.clone(), asked: ops, has: self.odp_rc })
            }
        }
    }
}

/// What this host's RDMA device and kernel can do, as far as strategy choice goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCaps {
    /// The RDMA device.
    pub nic: NicCaps,
    /// A peer-memory client module (nvidia-peermem, nv_peer_mem).
    pub peer_memory: Support,
}

impl HostCaps {
    /// Probes the device of `pd` ([`NicCaps::probe`]) and this host's peer-memory module.
    pub fn probe(pd: &ProtectionDomain) -> p2pbridge_verbs::Result<Self> {
        Ok(HostCaps { nic: NicCaps::probe(pd)?, peer_memory: PeerMem::detect(std::path::Path::new("/")).support() })
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

/// What opting in to ODP for [`Bridge::register_host`](crate::Bridge::register_host) memory
/// accepts.
pub const HOST_ODP_WINDOW: &str = "an ODP region follows the address space, and the monitor revokes it only after munmap, mremap or madvise(MADV_DONTNEED) has returned: a peer's WRITE with an old key in between reaches the memory mapped there next (pinned memory keeps it in the old pages)";

/// Plans the strategy for memory of `kind`, used for `ops`, under `policy`, on `caps`. Whether
/// a backend can export the range as a dma-buf is learnt when the bridge tries it. ODP for
/// plain host memory ([`MemoryKind::Host`]) is used only where `policy` prefers or requires it
/// ([`SkipReason::OptIn`]).
pub fn plan(kind: MemoryKind, ops: OdpTransportCaps, policy: &Policy, caps: &HostCaps) -> Plan {
    let (order, mut skipped) = policy.order();
    let mut candidates = Vec::new();
    for s in order {
        match applies(s, kind, ops, caps) {
            // Pinned host memory keeps a stale key's WRITE in the pages the registration had
            // (never in memory the process has now), however the memory went; an ODP region
            // follows the address space, so between an `munmap` and the monitor's revocation
            // a peer's WRITE reaches what is mapped there next. ODP is the caller's choice.
            Ok(()) if s == Strategy::Odp && kind == MemoryKind::Host && policy.get(s) == Preference::Allow => {
                skipped.push((s, SkipReason::OptIn { why: HOST_ODP_WINDOW }))
            }
            Ok(()) => candidates.push(s),
            Err(r) => skipped.push((s, r)),
        }
    }
    Plan { candidates, skipped }
}

fn applies(s: Strategy, kind: MemoryKind, ops: OdpTransportCaps, caps: &HostCaps) -> Result<(), SkipReason> {
    let supported = |s: Support| match s {
        Support::Yes => Ok(()),
        Support::No(u) => Err(SkipReason::Unsupported(u)),
    };
    let only = |applies_to| Err(SkipReason::NotForThisMemory { applies_to });
    match s {
        Strategy::DmaBuf if kind == MemoryKind::Host => only(AppliesTo::ExportingBackendMemory),
        Strategy::DmaBuf => supported(caps.nic.dmabuf_mr.clone()),
        Strategy::PeerMem if !kind.is_device() => only(AppliesTo::DeviceMemory),
        Strategy::PeerMem => supported(caps.peer_memory.clone()),
        Strategy::Odp if kind.is_device() => only(AppliesTo::PageableHostMemory),
        Strategy::Odp => supported(caps.nic.odp_for(ops)),
        Strategy::PinnedHost if kind.is_device() => only(AppliesTo::HostMemory),
        Strategy::PinnedHost | Strategy::Bounce => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(dmabuf: bool, peermem: bool, odp: bool) -> HostCaps {
        let device = "mlx5_0".to_string();
        let no = |r| Support::no(r);
        HostCaps {
            nic: NicCaps {
                odp: if odp { Support::Yes } else { no(Reason::OdpAbsent { device: device.clone() }) },
                odp_rc: if odp { OdpTransportCaps::all() } else { OdpTransportCaps::empty() },
                implicit_odp: no(Reason::ImplicitOdpAbsent { device: device.clone() }),
                dmabuf_mr: if dmabuf {
                    Support::Yes
                } else {
                    no(Reason::DmaBufMrRefused { device: device.clone(), errno: Errno(libc::EOPNOTSUPP) })
                },
                advise_mr: Support::Yes,
                mem_windows: Support::Yes,
                device,
            },
            peer_memory: if peermem { PeerMem::Loaded(PEERMEM_PATHS[2]) } else { PeerMem::Missing }.support(),
        }
    }

    const RW: OdpTransportCaps = OdpTransportCaps::WRITE.union(OdpTransportCaps::READ);
    const CUDA: MemoryKind = MemoryKind::Backend(BackendKind::Cuda);

    fn unsupported(r: &SkipReason) -> Option<&Reason> {
        match r {
            SkipReason::Unsupported(u) => Some(u.reason()),
            _ => None,
        }
    }

    #[test]
    fn device_memory_prefers_dmabuf_then_peermem_then_bounce() {
        let p = plan(CUDA, RW, &Policy::default(), &caps(true, true, true));
        assert_eq!(p.candidates, vec![Strategy::DmaBuf, Strategy::PeerMem, Strategy::Bounce]);
        let p = plan(CUDA, RW, &Policy::default(), &caps(false, false, true));
        assert_eq!(p.candidates, vec![Strategy::Bounce]);
        let reasons: Vec<_> = p.skipped.iter().map(|(s, _)| *s).collect();
        assert_eq!(reasons, vec![Strategy::DmaBuf, Strategy::PeerMem, Strategy::Odp, Strategy::PinnedHost]);
        assert_eq!(
            unsupported(&p.skipped[0].1),
            Some(&Reason::DmaBufMrRefused { device: "mlx5_0".into(), errno: Errno(libc::EOPNOTSUPP) })
        );
        assert!(matches!(unsupported(&p.skipped[1].1), Some(Reason::PeerMemMissing { .. })));
        assert_eq!(p.skipped[3].1, SkipReason::NotForThisMemory { applies_to: AppliesTo::HostMemory });
    }

    #[test]
    fn host_memory_uses_odp_only_when_the_caps_cover_the_operations() {
        let odp = Policy::default().prefer(Strategy::Odp);
        let p = plan(MemoryKind::Host, RW, &odp, &caps(true, false, true));
        assert_eq!(p.candidates, vec![Strategy::Odp, Strategy::PinnedHost, Strategy::Bounce]);
        let mut c = caps(true, false, true);
        c.nic.odp_rc = OdpTransportCaps::SEND | OdpTransportCaps::RECV;
        let p = plan(MemoryKind::Host, RW, &odp, &c);
        assert_eq!(p.candidates, vec![Strategy::PinnedHost, Strategy::Bounce]);
        let (_, odp) = p.skipped.iter().find(|(s, _)| *s == Strategy::Odp).unwrap();
        assert_eq!(
            unsupported(odp),
            Some(&Reason::OdpOperationsAbsent { device: "mlx5_0".into(), asked: RW, has: c.nic.odp_rc })
        );
        assert_eq!(odp.fix(), Some("ask for fewer operations, or use pinned memory"));
        let p = plan(MemoryKind::Host, RW, &Policy::default(), &caps(true, false, false));
        let (_, odp) = p.skipped.iter().find(|(s, _)| *s == Strategy::Odp).unwrap();
        assert_eq!(unsupported(odp), Some(&Reason::OdpAbsent { device: "mlx5_0".into() }), "no ODP at all comes first");
    }

    #[test]
    fn odp_for_plain_host_memory_is_opt_in_and_backend_memory_keeps_it() {
        let c = caps(true, false, true);
        let p = plan(MemoryKind::Host, RW, &Policy::default(), &c);
        assert_eq!(p.candidates, vec![Strategy::PinnedHost, Strategy::Bounce]);
        let (_, why) = p.skipped.iter().find(|(s, _)| *s == Strategy::Odp).unwrap();
        assert_eq!(why, &SkipReason::OptIn { why: HOST_ODP_WINDOW });
        assert!(why.to_string().contains("munmap"), "{why}");
        assert_eq!(why.fix(), Some("Policy::prefer(Strategy::Odp), accepting that window"));
        let p = plan(MemoryKind::Host, RW, &Policy::default().require(Strategy::Odp), &c);
        assert_eq!(p.candidates, vec![Strategy::Odp]);
        // Backend memory's frees wait for revocation: no window, ODP stays in the default order.
        let p = plan(MemoryKind::Backend(BackendKind::Host), RW, &Policy::default(), &c);
        assert_eq!(p.candidates[1], Strategy::Odp);
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
    fn reasons_say_what_was_checked_and_the_fix() {
        let p = plan(CUDA, RW, &Policy::default(), &caps(false, false, true));
        let text: Vec<String> = p.skipped.iter().map(|(_, r)| r.to_string()).collect();
        assert_eq!(
            text[0],
            "mlx5_0 lacks dma-buf MRs (ibv_reg_dmabuf_mr said EOPNOTSUPP); fix: a kernel >= 5.12, rdma-core >= 34 and a NIC driver that imports dma-bufs (mlx5, efa, irdma, bnxt_re); rxe and siw do not"
        );
        assert_eq!(
            text[1],
            "nvidia-peermem (or nv_peer_mem) is not loaded (checked /sys/kernel/mm/memory_peers/nv_mem/version, /sys/kernel/mm/memory_peers/nv_mem_nc/version, /sys/module/nvidia_peermem/version); fix: `modprobe nvidia-peermem` (shipped with the NVIDIA driver)"
        );
        assert_eq!(
            text[2],
            "applies to host memory (device memory would need HMM, which cuMemAlloc memory is not) only"
        );
        assert_eq!(p.skipped[1].1.fix(), Some("`modprobe nvidia-peermem` (shipped with the NVIDIA driver)"));
        assert_eq!(p.skipped[2].1.fix(), None);
    }

    #[test]
    fn reasons_serialize_as_fields() {
        let p = plan(CUDA, RW, &Policy::default().forbid(Strategy::Bounce), &caps(false, false, true));
        let j = serde_json::to_value(&p.skipped).unwrap();
        assert_eq!(j[0][0], "bounce");
        assert_eq!(j[0][1], serde_json::json!({"kind": "forbidden"}));
        assert_eq!(j[1][0], "dmabuf");
        let dmabuf = &j[1][1];
        assert_eq!(dmabuf["kind"], "unsupported");
        assert_eq!(
            dmabuf["reason"],
            serde_json::json!({"kind": "dma_buf_mr_refused", "device": "mlx5_0", "errno": {"name": "EOPNOTSUPP", "value": libc::EOPNOTSUPP}})
        );
        assert!(dmabuf["why"].as_str().unwrap().contains("EOPNOTSUPP"), "{dmabuf}");
        assert!(dmabuf["fix"].as_str().unwrap().contains("kernel >= 5.12"), "{dmabuf}");
        let peermem = &j[2][1]["reason"];
        assert_eq!(peermem["kind"], "peer_mem_missing");
        assert_eq!(peermem["checked"], serde_json::json!(PEERMEM_PATHS));
        assert_eq!(j[3][1], serde_json::json!({"kind": "not_for_this_memory", "applies_to": "pageable_host_memory"}));
        let s = serde_json::to_value(&Support::Yes).unwrap();
        assert_eq!(s, serde_json::json!({"supported": true}));
        let c = caps(true, true, false);
        let s = serde_json::to_value(&c.nic).unwrap();
        assert_eq!(s["odp"]["supported"], false);
        assert_eq!(s["odp"]["reason"], serde_json::json!({"kind": "odp_absent", "device": "mlx5_0"}));
        assert_eq!(s["odp_rc"], serde_json::json!([]));
        assert_eq!(s["dmabuf_mr"], serde_json::json!({"supported": true}));
    }

    #[test]
    fn peermem_is_detected_from_sysfs() {
        let root = std::env::temp_dir().join(format!("p2pb-peermem-{}", std::process::id()));
        assert_eq!(PeerMem::detect(&root), PeerMem::Missing);
        let f = root.join("sys/module/nvidia_peermem/version");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "1.0\\n").unwrap();
        assert_eq!(PeerMem::detect(&root), PeerMem::Loaded("/sys/module/nvidia_peermem/version"));
        assert!(PeerMem::detect(&root).support().is_yes());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
