//! Protection domains.

use std::ptr::NonNull;

use super::{pos_errno, ptr};
use crate::error::Result;
use crate::sys;

/// `ibv_alloc_pd`.
///
/// # Safety
/// `ctx` is an open context that outlives the PD, which must be deallocated once with
/// [`dealloc_pd`].
pub(crate) unsafe fn alloc_pd(ctx: *mut sys::ibv_context) -> Result<NonNull<sys::ibv_pd>> {
    // SAFETY: the caller's contract.
    ptr("ibv_alloc_pd", unsafe { sys::ibv_alloc_pd(ctx) })
}

/// `ibv_dealloc_pd` (`0` or a positive errno).
///
/// # Safety
/// `pd` came from [`alloc_pd`], is deallocated once, and nothing made in it (MR, QP, SRQ,
/// window) is left.
pub(crate) unsafe fn dealloc_pd(pd: NonNull<sys::ibv_pd>) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_dealloc_pd", unsafe { sys::ibv_dealloc_pd(pd.as_ptr()) })
}
