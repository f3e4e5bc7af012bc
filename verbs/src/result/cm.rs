//! rdma_cm (librdmacm): event channels, ids, address and route resolution, connection
//! set-up and tear-down. librdmacm's calls return `0`, or `-1` with errno set.

use std::ffi::CStr;
use std::ptr::NonNull;

use super::{neg_errno, ptr};
use crate::error::Result;
use crate::sys;

/// `rdma_create_event_channel`. The channel must be destroyed once with
/// [`destroy_event_channel`], after every id on it.
pub(crate) fn create_event_channel() -> Result<NonNull<sys::rdma_event_channel>> {
    // SAFETY: no preconditions.
    ptr("rdma_create_event_channel", unsafe { sys::rdma_create_event_channel() })
}

/// `rdma_destroy_event_channel`.
///
/// # Safety
/// `channel` came from [`create_event_channel`], is destroyed once, and every id on it was
/// destroyed (or migrated away) first.
pub(crate) unsafe fn destroy_event_channel(channel: NonNull<sys::rdma_event_channel>) {
    // SAFETY: the caller's contract.
    unsafe { sys::rdma_destroy_event_channel(channel.as_ptr()) }
}

/// `rdma_create_id` on `channel`.
///
/// # Safety
/// `channel` is a live event channel that outlives the id, which must be destroyed once with
/// [`destroy_id`].
pub(crate) unsafe fn create_id(
    channel: *mut sys::rdma_event_channel,
    context: *mut libc::c_void,
    ps: sys::rdma_port_space::Type,
) -> Result<NonNull<sys::rdma_cm_id>> {
    let mut id = std::ptr::null_mut();
    // SAFETY: the caller's contract; `id` is a valid out-pointer.
    neg_errno("rdma_create_id", unsafe { sys::rdma_create_id(channel, &mut id, context, ps) })?;
    ptr("rdma_create_id", id)
}

/// `rdma_destroy_id`: waits for the id's unacked events.
///
/// # Safety
/// `id` is a live id, destroyed once, whose QP (if any) was destroyed first.
pub(crate) unsafe fn destroy_id(id: NonNull<sys::rdma_cm_id>) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_destroy_id", unsafe { sys::rdma_destroy_id(id.as_ptr()) })
}

/// `rdma_bind_addr`.
///
/// # Safety
/// `id` is a live id and `addr` a valid sockaddr of its family.
pub(crate) unsafe fn bind_addr(id: *mut sys::rdma_cm_id, addr: *mut libc::sockaddr) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_bind_addr", unsafe { sys::rdma_bind_addr(id, addr) })
}

/// `rdma_listen`.
///
/// # Safety
/// `id` is a live, bound id.
pub(crate) unsafe fn listen(id: *mut sys::rdma_cm_id, backlog: i32) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_listen", unsafe { sys::rdma_listen(id, backlog) })
}

/// `rdma_resolve_addr` (answered by an event on the id's channel).
///
/// # Safety
/// `id` is a live id; `src` is null or a valid sockaddr, `dst` a valid sockaddr.
pub(crate) unsafe fn resolve_addr(
    id: *mut sys::rdma_cm_id,
    src: *mut libc::sockaddr,
    dst: *mut libc::sockaddr,
    timeout_ms: i32,
) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_resolve_addr", unsafe { sys::rdma_resolve_addr(id, src, dst, timeout_ms) })
}

/// `rdma_resolve_route` (answered by an event on the id's channel).
///
/// # Safety
/// `id` is a live id whose address is resolved.
pub(crate) unsafe fn resolve_route(id: *mut sys::rdma_cm_id, timeout_ms: i32) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_resolve_route", unsafe { sys::rdma_resolve_route(id, timeout_ms) })
}

/// `rdma_create_qp`: a QP on the id (its `qp` field), in `pd`; the provider writes the
/// capabilities it granted back into `attr`.
///
/// # Safety
/// `id` is a live id routed through `pd`'s device context; `pd` and the CQs (and SRQ) named
/// in `attr` are live and outlive the QP, which must be destroyed once with [`destroy_qp`].
pub(crate) unsafe fn create_qp(
    id: *mut sys::rdma_cm_id,
    pd: *mut sys::ibv_pd,
    attr: &mut sys::ibv_qp_init_attr,
) -> Result<()> {
    // SAFETY: the caller's contract; `attr` is valid for the call.
    neg_errno("rdma_create_qp", unsafe { sys::rdma_create_qp(id, pd, attr) })
}

/// `rdma_destroy_qp`.
///
/// # Safety
/// `id` is a live id whose QP was made by [`create_qp`] and is destroyed once.
pub(crate) unsafe fn destroy_qp(id: *mut sys::rdma_cm_id) {
    // SAFETY: the caller's contract.
    unsafe { sys::rdma_destroy_qp(id) }
}

/// `rdma_connect` (answered by an event on the id's channel).
///
/// # Safety
/// `id` is a live, routed id with a QP; `param` and its private data are valid for the call.
pub(crate) unsafe fn connect(id: *mut sys::rdma_cm_id, param: &mut sys::rdma_conn_param) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_connect", unsafe { sys::rdma_connect(id, param) })
}

/// `rdma_accept` (answered by an event on the id's channel).
///
/// # Safety
/// `id` is a live id of a connect request, with a QP; `param` and its private data are valid
/// for the call.
pub(crate) unsafe fn accept(id: *mut sys::rdma_cm_id, param: &mut sys::rdma_conn_param) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_accept", unsafe { sys::rdma_accept(id, param) })
}

/// `rdma_reject` of a connect request, with no private data.
///
/// # Safety
/// `id` is a live id of a connect request not yet accepted.
pub(crate) unsafe fn reject(id: *mut sys::rdma_cm_id) -> Result<()> {
    // SAFETY: the caller's contract; no private data.
    neg_errno("rdma_reject", unsafe { sys::rdma_reject(id, std::ptr::null(), 0) })
}

/// `rdma_disconnect` (fails on an id that is not connected, harmlessly).
///
/// # Safety
/// `id` is a live id.
pub(crate) unsafe fn disconnect(id: *mut sys::rdma_cm_id) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_disconnect", unsafe { sys::rdma_disconnect(id) })
}

/// `rdma_migrate_id`: moves the id's events to `channel`.
///
/// # Safety
/// `id` is a live id with no unacked event, and `channel` a live channel that outlives it.
pub(crate) unsafe fn migrate_id(id: *mut sys::rdma_cm_id, channel: *mut sys::rdma_event_channel) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_migrate_id", unsafe { sys::rdma_migrate_id(id, channel) })
}

/// `rdma_get_cm_event`: the next event of `channel` (blocking, unless the channel's fd is
/// non-blocking or has an event ready).
///
/// # Safety
/// `channel` is a live event channel. The event must be acked once with [`ack_cm_event`].
pub(crate) unsafe fn get_cm_event(channel: *mut sys::rdma_event_channel) -> Result<NonNull<sys::rdma_cm_event>> {
    let mut ev = std::ptr::null_mut();
    // SAFETY: the caller's contract; `ev` is a valid out-pointer.
    neg_errno("rdma_get_cm_event", unsafe { sys::rdma_get_cm_event(channel, &mut ev) })?;
    ptr("rdma_get_cm_event", ev)
}

/// `rdma_ack_cm_event`: the event (and what it points to) is freed.
///
/// # Safety
/// `event` came from [`get_cm_event`] and is acked once; nothing refers to it afterwards.
pub(crate) unsafe fn ack_cm_event(event: NonNull<sys::rdma_cm_event>) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("rdma_ack_cm_event", unsafe { sys::rdma_ack_cm_event(event.as_ptr()) })
}

/// `rdma_event_str`: the event's name (`None` where the library gives none).
pub(crate) fn event_str(event: sys::rdma_cm_event_type::Type) -> Option<&'static CStr> {
    // SAFETY: rdma_event_str returns a static string for every value.
    let p = unsafe { sys::rdma_event_str(event) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null results are static NUL-terminated strings.
    Some(unsafe { CStr::from_ptr(p) })
}
