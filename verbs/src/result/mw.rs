//! Memory windows.

use std::ptr::NonNull;

use super::{pos_errno, ptr};
use crate::error::Result;
use crate::sys;

/// `ibv_alloc_mw`.
///
/// # Safety
/// `pd` is a live PD that outlives the window, which must be deallocated once with
/// [`dealloc_mw`].
pub(crate) unsafe fn alloc_mw(pd: *mut sys::ibv_pd, kind: sys::ibv_mw_type::Type) -> Result<NonNull<sys::ibv_mw>> {
    // SAFETY: the caller's contract.
    ptr("ibv_alloc_mw", unsafe { sys::ibv_alloc_mw(pd, kind) })
}

/// `ibv_dealloc_mw` (`0` or a positive errno): from its success on, the window's rkey is
/// refused by the NIC.
///
/// # Safety
/// `mw` came from [`alloc_mw`] and is deallocated once (whatever the outcome, it is not used
/// afterwards).
pub(crate) unsafe fn dealloc_mw(mw: NonNull<sys::ibv_mw>) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_dealloc_mw", unsafe { sys::ibv_dealloc_mw(mw.as_ptr()) })
}

/// `ibv_inc_rkey`: the same key index with the next key byte.
pub(crate) fn inc_rkey(rkey: u32) -> u32 {
    // SAFETY: a pure function of its argument (rdma-core's static inline, in Rust).
    unsafe { sys::ibv_inc_rkey(rkey) }
}
