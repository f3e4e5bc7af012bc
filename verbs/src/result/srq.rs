//! Shared receive queues.

use std::ptr::NonNull;

use super::{pos_errno, ptr};
use crate::error::Result;
use crate::sys;

/// `ibv_create_srq`; the provider writes the sizes it granted back into `attr`.
///
/// # Safety
/// `pd` is a live PD that outlives the SRQ, which must be destroyed once with
/// [`destroy_srq`].
pub(crate) unsafe fn create_srq(
    pd: *mut sys::ibv_pd,
    attr: &mut sys::ibv_srq_init_attr,
) -> Result<NonNull<sys::ibv_srq>> {
    // SAFETY: the caller's contract; `attr` is valid for the call.
    ptr("ibv_create_srq", unsafe { sys::ibv_create_srq(pd, attr) })
}

/// `ibv_destroy_srq` (`0` or an errno).
///
/// # Safety
/// `srq` came from [`create_srq`], is destroyed once, and no QP uses it any more.
pub(crate) unsafe fn destroy_srq(srq: NonNull<sys::ibv_srq>) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_destroy_srq", unsafe { sys::ibv_destroy_srq(srq.as_ptr()) })
}

/// `ibv_post_srq_recv` (`0` or a positive errno) of the chained receives from `wr`; on
/// failure `bad` is the first receive not posted.
///
/// # Safety
/// `srq` is a live SRQ; `wr` is a valid chain of receives (null-terminated `next`) whose
/// scatter lists outlive the call; every range lies in a registered, locally writable region
/// of the SRQ's PD, and stays the NIC's until the receive completes.
pub(crate) unsafe fn post_srq_recv(
    srq: *mut sys::ibv_srq,
    wr: *mut sys::ibv_recv_wr,
    bad: &mut *mut sys::ibv_recv_wr,
) -> Result<()> {
    // SAFETY: the caller's contract; `bad` is a valid out-pointer.
    pos_errno("ibv_post_srq_recv", unsafe { sys::ibv_post_srq_recv(srq, wr, bad) })
}
