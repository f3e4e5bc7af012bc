//! Device capabilities: limits and On-Demand Paging (`ibv_query_device_ex`), and the two
//! capabilities probed by trying them on a protection domain: dma-buf MRs and advise_mr
//! prefetch.

use bitflags::bitflags;

use crate::access::AccessFlags;
use crate::device::Context;
use crate::error::{Errno, Error, Result};
use crate::pd::ProtectionDomain;
use crate::{result, sys};

bitflags! {
    /// ODP support for one transport (`enum ibv_odp_transport_cap_bits`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct OdpTransportCaps: u32 {
        /// SEND on ODP memory.
        const SEND = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_SEND.0;
        /// RECV into ODP memory.
        const RECV = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_RECV.0;
        /// RDMA WRITE targeting ODP memory.
        const WRITE = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_WRITE.0;
        /// RDMA READ of ODP memory.
        const READ = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_READ.0;
        /// Atomics on ODP memory.
        const ATOMIC = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_ATOMIC.0;
        /// SRQ receives into ODP memory.
        const SRQ_RECV = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_SRQ_RECV.0;
        /// FLUSH.
        const FLUSH = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_FLUSH.0;
        /// ATOMIC WRITE.
        const ATOMIC_WRITE = sys::ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_ATOMIC_WRITE.0;
        // Bits a newer kernel may report.
        const _ = !0;
    }
}

/// What the device can do with On-Demand Paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OdpCaps {
    /// `IBV_ODP_SUPPORT`: ODP memory regions can be registered at all.
    pub supported: bool,
    /// `IBV_ODP_SUPPORT_IMPLICIT`: one MR may cover the whole address space.
    pub implicit: bool,
    /// Per-operation support on RC QPs.
    pub rc: OdpTransportCaps,
    /// Per-operation support on UC QPs.
    pub uc: OdpTransportCaps,
    /// Per-operation support on UD QPs.
    pub ud: OdpTransportCaps,
}

impl OdpCaps {
    /// Whether RC QPs can use ODP memory for all of `ops`.
    pub fn rc_supports(&self, ops: OdpTransportCaps) -> bool {
        self.supported && self.rc.contains(ops)
    }
}

/// What `ibv_query_device_ex` says of a device.
#[derive(Debug, Clone)]
pub struct DeviceCaps {
    /// Firmware version string.
    pub fw_ver: String,
    /// Largest memory region, bytes.
    pub max_mr_size: u64,
    /// Largest number of outstanding work requests on a QP.
    pub max_qp_wr: u32,
    /// Largest scatter/gather list.
    pub max_sge: u32,
    /// Largest CQ.
    pub max_cqe: u32,
    /// Largest number of outstanding RDMA READs as responder, per QP.
    pub max_qp_rd_atom: u32,
    /// Largest number of outstanding RDMA READs as initiator, per QP.
    pub max_qp_init_rd_atom: u32,
    /// Number of physical ports.
    pub phys_port_cnt: u8,
    /// PCI vendor id.
    pub vendor_id: u32,
    /// Vendor part id.
    pub vendor_part_id: u32,
    /// On-Demand Paging support.
    pub odp: OdpCaps,
    /// Type 2 memory windows (`IBV_DEVICE_MEM_WINDOW_TYPE_2A` or `_2B`): windows bound to one
    /// QP through a work request, which can be revoked on their own.
    pub mw_type2: bool,
    /// Most memory windows (`max_mw`).
    pub max_mw: u32,
}

impl DeviceCaps {
    pub(crate) fn query(ctx: &Context) -> Result<Self> {
        // SAFETY: ibv_device_attr_ex is plain old data; all-zero is a valid value.
        let mut attr: sys::ibv_device_attr_ex = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; input may be null (no comp_mask); attr is a valid
        // out-pointer whose size the wrapper passes to the provider.
        unsafe { result::device::query_device_ex(ctx.as_raw(), &mut attr) }?;
        let o = &attr.orig_attr;
        // SAFETY: fw_ver is a NUL-terminated C string within its 64 bytes (or we stop at the end).
        let fw = {
            let bytes: Vec<u8> = o.fw_ver.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let g = attr.odp_caps.general_caps;
        let type2 = sys::ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2A.0
            | sys::ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2B.0;
        let t = attr.odp_caps.per_transport_caps;
        Ok(DeviceCaps {
            fw_ver: fw,
            max_mr_size: o.max_mr_size,
            max_qp_wr: o.max_qp_wr.max(0) as u32,
            max_sge: o.max_sge.max(0) as u32,
            max_cqe: o.max_cqe.max(0) as u32,
            max_qp_rd_atom: o.max_qp_rd_atom.max(0) as u32,
            max_qp_init_rd_atom: o.max_qp_init_rd_atom.max(0) as u32,
            phys_port_cnt: o.phys_port_cnt,
            vendor_id: o.vendor_id,
            vendor_part_id: o.vendor_part_id,
            odp: OdpCaps {
                supported: g & sys::ibv_odp_general_caps::IBV_ODP_SUPPORT.0 as u64 != 0,
                implicit: g & sys::ibv_odp_general_caps::IBV_ODP_SUPPORT_IMPLICIT.0 as u64 != 0,
                rc: OdpTransportCaps::from_bits_retain(t.rc_odp_caps),
                uc: OdpTransportCaps::from_bits_retain(t.uc_odp_caps),
                ud: OdpTransportCaps::from_bits_retain(t.ud_odp_caps),
            },
            mw_type2: o.device_cap_flags & type2 != 0 && o.max_mw > 0,
            max_mw: o.max_mw.max(0) as u32,
        })
    }
}

/// Whether a device accepts dma-buf memory regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaBufSupport {
    /// `ibv_reg_dmabuf_mr` reached the provider, which checked the (invalid) fd.
    Supported,
    /// `ibv_reg_dmabuf_mr` said the device, provider or library cannot do it.
    Unsupported(Errno),
}

impl DmaBufSupport {
    /// Classifies the errno of `ibv_reg_dmabuf_mr(pd, 0, 0, 0, -1, 0)`, as NCCL and UCX do:
    /// `EOPNOTSUPP`/`EPROTONOSUPPORT` mean "not supported"; anything else (normally `EBADF`
    /// for the fd -1) means the call reached a provider that imports dma-bufs.
    pub fn from_probe_errno(errno: i32) -> Self {
        if errno == libc::EOPNOTSUPP || errno == libc::EPROTONOSUPPORT || errno == libc::ENOSYS {
            DmaBufSupport::Unsupported(Errno(errno))
        } else {
            DmaBufSupport::Supported
        }
    }
}

impl ProtectionDomain {
    /// Probes dma-buf MR support the way NCCL and UCX do:
    /// `ibv_reg_dmabuf_mr(pd, 0, 0, 0, -1, 0)` must fail; `EBADF` means the provider got as
    /// far as the fd (supported), `EOPNOTSUPP`/`EPROTONOSUPPORT` mean it is not.
    pub fn dmabuf_support(&self) -> DmaBufSupport {
        // SAFETY: fd -1 with length 0 registers nothing; the call can only fail. Should a
        // provider ever accept it, the region is deregistered at once.
        match unsafe { result::mr::reg_dmabuf_mr(self.as_raw(), 0, 0, 0, -1, 0) } {
            Ok(mr) => {
                // SAFETY: `mr` is a region we own and drop at once.
                let _ = unsafe { result::mr::dereg_mr(mr) };
                DmaBufSupport::Supported
            }
            Err(e) => DmaBufSupport::from_probe_errno(result::errno_of(&e).0),
        }
    }

    /// Probes whether `ibv_advise_mr` prefetch works here: registers one ODP page and asks
    /// for it to be prefetched. `Ok(None)` when it works, `Ok(Some(reason))` when it does not
    /// (no ODP, or the provider lacks advise_mr, as rdma-core's rxe provider before v57 does).
    pub fn prefetch_support(&self) -> Result<Option<String>> {
        if let Err(e) = self.require_odp(false) {
            return Ok(Some(e.to_string()));
        }
        let mr = self.register_odp(crate::HostBuffer::new(4096)?, AccessFlags::LOCAL_WRITE)?;
        match mr.advise_prefetch(.., true) {
            Ok(()) => Ok(None),
            Err(e @ Error::Verb { errno: Errno(libc::EOPNOTSUPP), .. }) => Ok(Some(format!(
                "{e}: the user-space provider of {} does not implement advise_mr",
                self.context().name()
            ))),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmabuf_probe_classification_follows_nccl() {
        assert_eq!(DmaBufSupport::from_probe_errno(libc::EBADF), DmaBufSupport::Supported);
        assert_eq!(
            DmaBufSupport::from_probe_errno(libc::EOPNOTSUPP),
            DmaBufSupport::Unsupported(Errno(libc::EOPNOTSUPP))
        );
        assert_eq!(
            DmaBufSupport::from_probe_errno(libc::EPROTONOSUPPORT),
            DmaBufSupport::Unsupported(Errno(libc::EPROTONOSUPPORT))
        );
    }

    #[test]
    fn odp_rc_support_needs_general_support_too() {
        let c = OdpCaps {
            supported: false,
            implicit: false,
            rc: OdpTransportCaps::all(),
            uc: OdpTransportCaps::empty(),
            ud: OdpTransportCaps::empty(),
        };
        assert!(!c.rc_supports(OdpTransportCaps::WRITE));
        let c = OdpCaps { supported: true, ..c };
        assert!(c.rc_supports(OdpTransportCaps::WRITE | OdpTransportCaps::READ));
    }
}
