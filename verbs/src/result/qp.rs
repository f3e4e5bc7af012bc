//! Queue pairs: state queries and changes, posting work requests.

use super::pos_errno;
use crate::error::Result;
use crate::sys;

/// `ibv_query_qp` (`0` or a positive errno): the attributes in `mask` into `attr`, and the
/// creation attributes into `init`.
///
/// # Safety
/// `qp` is a live QP.
pub(crate) unsafe fn query_qp(
    qp: *mut sys::ibv_qp,
    attr: &mut sys::ibv_qp_attr,
    mask: sys::ibv_qp_attr_mask,
    init: &mut sys::ibv_qp_init_attr,
) -> Result<()> {
    // SAFETY: the caller's contract; the out-pointers are valid.
    pos_errno("ibv_query_qp", unsafe { sys::ibv_query_qp(qp, attr, mask.0 as i32, init) })
}

/// `ibv_modify_qp` (`0` or a positive errno): the attributes in `mask` from `attr`. `verb`
/// names the call in errors (`ibv_modify_qp`, with the transition).
///
/// # Safety
/// `qp` is a live QP.
pub(crate) unsafe fn modify_qp(
    qp: *mut sys::ibv_qp,
    attr: &mut sys::ibv_qp_attr,
    mask: sys::ibv_qp_attr_mask,
    verb: &'static str,
) -> Result<()> {
    // SAFETY: the caller's contract; `attr` is valid for the call.
    pos_errno(verb, unsafe { sys::ibv_modify_qp(qp, attr, mask.0 as i32) })
}

/// `ibv_post_send` (`0` or a positive errno) of the chained requests from `wr`; on failure
/// `bad` is the first request not posted. `verb` names the call in errors (`ibv_post_send`,
/// with what was posted).
///
/// # Safety
/// `qp` is a live QP; `wr` is a valid chain of requests (null-terminated `next`) whose
/// scatter lists outlive the call; every local range lies in a registered region of the QP's
/// PD with the rights its operation needs, and stays the NIC's until the request completes
/// (inline payloads excepted); every window bound is deallocated before its region goes.
pub(crate) unsafe fn post_send(
    qp: *mut sys::ibv_qp,
    wr: *mut sys::ibv_send_wr,
    bad: &mut *mut sys::ibv_send_wr,
    verb: &'static str,
) -> Result<()> {
    // SAFETY: the caller's contract; `bad` is a valid out-pointer.
    pos_errno(verb, unsafe { sys::ibv_post_send(qp, wr, bad) })
}

/// `ibv_post_recv` (`0` or a positive errno) of the chained receives from `wr`; on failure
/// `bad` is the first receive not posted. `verb` names the call in errors.
///
/// # Safety
/// `qp` is a live QP; `wr` is a valid chain of receives (null-terminated `next`) whose
/// scatter lists outlive the call; every range lies in a registered, locally writable region
/// of the QP's PD, and stays the NIC's until the receive completes.
pub(crate) unsafe fn post_recv(
    qp: *mut sys::ibv_qp,
    wr: *mut sys::ibv_recv_wr,
    bad: &mut *mut sys::ibv_recv_wr,
    verb: &'static str,
) -> Result<()> {
    // SAFETY: the caller's contract; `bad` is a valid out-pointer.
    pos_errno(verb, unsafe { sys::ibv_post_recv(qp, wr, bad) })
}
