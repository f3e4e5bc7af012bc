//! Memory regions: registration (pinned, ODP, dma-buf), deregistration, advise_mr.

use std::os::fd::RawFd;
use std::ptr::NonNull;

use super::{pos_errno, ptr};
use crate::error::Result;
use crate::sys;

/// `ibv_reg_mr_iova2`: `ibv_reg_mr` that also takes the optional access flags (relaxed
/// ordering), and maps the memory at `iova`. Errors name `ibv_reg_mr` (whose hint about
/// RLIMIT_MEMLOCK they share).
///
/// # Safety
/// `pd` is a live PD. `addr..addr+len` is mapped memory that stays mapped, at that address,
/// until the region is deregistered (or `addr` is null and `len` `SIZE_MAX` with
/// `IBV_ACCESS_ON_DEMAND`: implicit ODP, over the whole address space); memory a peer may
/// write is not read through Rust references that assume it does not change. The region must
/// be deregistered once with [`dereg_mr`].
pub(crate) unsafe fn reg_mr_iova2(
    pd: *mut sys::ibv_pd,
    addr: *mut u8,
    len: usize,
    iova: u64,
    access: u32,
) -> Result<NonNull<sys::ibv_mr>> {
    // SAFETY: the caller's contract.
    ptr("ibv_reg_mr", unsafe { sys::ibv_reg_mr_iova2(pd, addr.cast(), len, iova, access) })
}

/// `ibv_reg_dmabuf_mr`: `len` bytes at `offset` of the dma-buf `fd`, mapped at `iova`.
///
/// # Safety
/// `pd` is a live PD. If the call can succeed (`len > 0`, a valid fd), `fd` is a dma-buf whose
/// exporter keeps the memory valid, or revokes the NIC's mapping through move_notify, until the
/// region is deregistered once with [`dereg_mr`].
pub(crate) unsafe fn reg_dmabuf_mr(
    pd: *mut sys::ibv_pd,
    offset: u64,
    len: usize,
    iova: u64,
    fd: RawFd,
    access: i32,
) -> Result<NonNull<sys::ibv_mr>> {
    // SAFETY: the caller's contract.
    ptr("ibv_reg_dmabuf_mr", unsafe { sys::ibv_reg_dmabuf_mr(pd, offset, len, iova, fd, access) })
}

/// `ibv_dereg_mr` (`0` or a positive errno). On failure the region may still be registered:
/// the NIC may still reach its memory.
///
/// # Safety
/// `mr` is a registered region, deregistered once (whatever the outcome, it is not used
/// afterwards).
pub(crate) unsafe fn dereg_mr(mr: NonNull<sys::ibv_mr>) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_dereg_mr", unsafe { sys::ibv_dereg_mr(mr.as_ptr()) })
}

/// `ibv_advise_mr` (`0` or a positive errno) over the ranges in `sges`.
///
/// # Safety
/// `pd` is a live PD, and every entry of `sges` names a range of a live region of it by its
/// lkey.
pub(crate) unsafe fn advise_mr(
    pd: *mut sys::ibv_pd,
    advice: sys::ib_uverbs_advise_mr_advice::Type,
    flags: u32,
    sges: &mut [sys::ibv_sge],
) -> Result<()> {
    let n = u32::try_from(sges.len()).unwrap_or(u32::MAX);
    // SAFETY: the caller's contract; `sges` holds `n` valid entries for the call.
    pos_errno("ibv_advise_mr", unsafe { sys::ibv_advise_mr(pd, advice, flags, sges.as_mut_ptr(), n) })
}
