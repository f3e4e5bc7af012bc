//! Completion queues and their completion channels.

use std::mem::MaybeUninit;
use std::ptr::NonNull;

use super::{pos_errno, ptr, verb_error};
use crate::error::Result;
use crate::sys;

/// `ibv_create_comp_channel`.
///
/// # Safety
/// `ctx` is an open context that outlives the channel, which must be destroyed once with
/// [`destroy_comp_channel`], after every CQ that uses it.
pub(crate) unsafe fn create_comp_channel(ctx: *mut sys::ibv_context) -> Result<NonNull<sys::ibv_comp_channel>> {
    // SAFETY: the caller's contract.
    ptr("ibv_create_comp_channel", unsafe { sys::ibv_create_comp_channel(ctx) })
}

/// `ibv_destroy_comp_channel` (`0` or an errno).
///
/// # Safety
/// `channel` came from [`create_comp_channel`], is destroyed once, and no CQ uses it any more.
pub(crate) unsafe fn destroy_comp_channel(channel: NonNull<sys::ibv_comp_channel>) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_destroy_comp_channel", unsafe { sys::ibv_destroy_comp_channel(channel.as_ptr()) })
}

/// `ibv_create_cq` of `cqe` entries, its events on `channel` (or none, if null).
///
/// # Safety
/// `ctx` is an open context and `channel` null or a live channel of it; both outlive the CQ,
/// which must be destroyed once with [`destroy_cq`].
pub(crate) unsafe fn create_cq(
    ctx: *mut sys::ibv_context,
    cqe: i32,
    cq_context: *mut libc::c_void,
    channel: *mut sys::ibv_comp_channel,
    comp_vector: i32,
) -> Result<NonNull<sys::ibv_cq>> {
    // SAFETY: the caller's contract.
    ptr("ibv_create_cq", unsafe { sys::ibv_create_cq(ctx, cqe, cq_context, channel, comp_vector) })
}

/// `ibv_destroy_cq` (`0` or an errno).
///
/// # Safety
/// `cq` came from [`create_cq`], is destroyed once, no QP uses it any more, and every event
/// got from its channel was acked.
pub(crate) unsafe fn destroy_cq(cq: NonNull<sys::ibv_cq>) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_destroy_cq", unsafe { sys::ibv_destroy_cq(cq.as_ptr()) })
}

/// `ibv_poll_cq` into `wc`: how many completions it wrote, in `wc`'s first entries (a negative
/// errno on failure). The provider may leave fields of a failed completion unwritten (only
/// wr_id, status, qp_num and vendor_err are valid there): initialize `wc` before reading it.
///
/// # Safety
/// `cq` is a live CQ.
pub(crate) unsafe fn poll_cq(cq: *mut sys::ibv_cq, wc: &mut [MaybeUninit<sys::ibv_wc>]) -> Result<usize> {
    let want = i32::try_from(wc.len()).unwrap_or(i32::MAX);
    // SAFETY: the caller's contract; `wc` has room for `want` entries (`MaybeUninit<T>` has
    // `T`'s layout).
    let n = unsafe { sys::ibv_poll_cq(cq, want, wc.as_mut_ptr().cast()) };
    if n < 0 {
        return Err(verb_error("ibv_poll_cq", -n));
    }
    // A provider never returns more than asked for; were one to, the extra would not be ours.
    Ok((n as usize).min(wc.len()))
}

/// `ibv_req_notify_cq` (`0` or a positive errno): arms the CQ, so that its next completion
/// (only a solicited one, with `solicited_only`) raises an event on its channel.
///
/// # Safety
/// `cq` is a live CQ with a completion channel.
pub(crate) unsafe fn req_notify_cq(cq: *mut sys::ibv_cq, solicited_only: bool) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_req_notify_cq", unsafe { sys::ibv_req_notify_cq(cq, solicited_only as i32) })
}

/// `ibv_get_cq_event` (`0`, or `-1` with errno: `EAGAIN` on a non-blocking channel with no
/// event): the CQ that raised the event, and its `cq_context`.
///
/// # Safety
/// `channel` is a live completion channel. An event got must be acked with
/// [`ack_cq_events`] before its CQ is destroyed.
pub(crate) unsafe fn get_cq_event(
    channel: *mut sys::ibv_comp_channel,
) -> Result<(*mut sys::ibv_cq, *mut libc::c_void)> {
    let mut cq = std::ptr::null_mut();
    let mut cq_context = std::ptr::null_mut();
    // SAFETY: the caller's contract; the out-pointers are valid.
    pos_errno("ibv_get_cq_event", unsafe { sys::ibv_get_cq_event(channel, &mut cq, &mut cq_context) })?;
    Ok((cq, cq_context))
}

/// `ibv_ack_cq_events`: acks `n` events of `cq` got with [`get_cq_event`].
///
/// # Safety
/// `cq` is a live CQ, and `n` of its events were got and not yet acked.
pub(crate) unsafe fn ack_cq_events(cq: *mut sys::ibv_cq, n: u32) {
    // SAFETY: the caller's contract.
    unsafe { sys::ibv_ack_cq_events(cq, n) }
}
