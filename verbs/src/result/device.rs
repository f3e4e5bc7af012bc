//! Devices and contexts: device lists (libibverbs' and librdmacm's), opening and closing,
//! device and port attributes, GID tables, asynchronous events.

use std::ffi::CStr;
use std::ptr::NonNull;

use super::{neg_errno, pos_errno, ptr, verb_error};
use crate::error::Result;
use crate::sys;

/// `ibv_get_device_list`: the devices of this host, and how many there are. The list must be
/// freed once with [`free_device_list`]; the devices in it are valid until then.
pub(crate) fn get_device_list() -> Result<(NonNull<*mut sys::ibv_device>, usize)> {
    let mut n: i32 = 0;
    // SAFETY: `n` is a valid out-pointer; the call has no other precondition.
    let list = ptr("ibv_get_device_list", unsafe { sys::ibv_get_device_list(&mut n) })?;
    Ok((list, n.max(0) as usize))
}

/// `ibv_free_device_list`.
///
/// # Safety
/// `list` came from [`get_device_list`] and is freed once; none of its device pointers is
/// used afterwards (contexts opened from them stay valid).
pub(crate) unsafe fn free_device_list(list: NonNull<*mut sys::ibv_device>) {
    // SAFETY: the caller's contract.
    unsafe { sys::ibv_free_device_list(list.as_ptr()) }
}

/// `ibv_get_device_name`: the device's name, `None` where the library has none (it sets no
/// errno).
///
/// # Safety
/// `dev` is a live device (from a device list not yet freed, or a context's `device`); the
/// name is used no longer than the device lives (`'a`).
pub(crate) unsafe fn get_device_name<'a>(dev: *mut sys::ibv_device) -> Option<&'a CStr> {
    // SAFETY: the caller's contract; the returned name lives as long as the device.
    let p = unsafe { sys::ibv_get_device_name(dev) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null device names are NUL-terminated, and live as long as the device.
    Some(unsafe { CStr::from_ptr(p) })
}

/// `ibv_open_device`.
///
/// # Safety
/// `dev` is a live device from a device list not yet freed (opening before the list is freed
/// is what rdma-core requires). The context must be closed once with [`close_device`].
pub(crate) unsafe fn open_device(dev: *mut sys::ibv_device) -> Result<NonNull<sys::ibv_context>> {
    // SAFETY: the caller's contract.
    ptr("ibv_open_device", unsafe { sys::ibv_open_device(dev) })
}

/// `ibv_close_device` (`0`, or `-1` with errno).
///
/// # Safety
/// `ctx` came from [`open_device`], is closed once, and nothing made from it (PD, CQ, MR, ...)
/// is left.
pub(crate) unsafe fn close_device(ctx: NonNull<sys::ibv_context>) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno("ibv_close_device", unsafe { sys::ibv_close_device(ctx.as_ptr()) })
}

/// `rdma_get_devices`: librdmacm's open contexts, one per device, and how many there are.
/// The list must be freed once with [`rdma_free_devices`]; the contexts stay librdmacm's.
pub(crate) fn rdma_get_devices() -> Result<(NonNull<*mut sys::ibv_context>, usize)> {
    let mut n: i32 = 0;
    // SAFETY: `n` is a valid out-pointer; the call has no other precondition.
    let list = ptr("rdma_get_devices", unsafe { sys::rdma_get_devices(&mut n) })?;
    Ok((list, n.max(0) as usize))
}

/// `rdma_free_devices`.
///
/// # Safety
/// `list` came from [`rdma_get_devices`] and is freed once; its contexts are not used through
/// it afterwards.
pub(crate) unsafe fn rdma_free_devices(list: NonNull<*mut sys::ibv_context>) {
    // SAFETY: the caller's contract.
    unsafe { sys::rdma_free_devices(list.as_ptr()) }
}

/// `ibv_query_device_ex` without input (`0` or a positive errno), into `attr`.
///
/// # Safety
/// `ctx` is an open context.
pub(crate) unsafe fn query_device_ex(ctx: *mut sys::ibv_context, attr: &mut sys::ibv_device_attr_ex) -> Result<()> {
    // SAFETY: the caller's contract; input may be null (no comp_mask); `attr` is a valid
    // out-pointer whose size the wrapper passes to the provider.
    pos_errno("ibv_query_device_ex", unsafe { sys::ibv_query_device_ex(ctx, std::ptr::null(), attr) })
}

/// `ibv_query_port` (`0` or a positive errno), into `attr`.
///
/// # Safety
/// `ctx` is an open context.
pub(crate) unsafe fn query_port(ctx: *mut sys::ibv_context, port: u8, attr: &mut sys::ibv_port_attr) -> Result<()> {
    // SAFETY: the caller's contract; `attr` is a valid out-pointer of the right size.
    pos_errno("ibv_query_port", unsafe { sys::ibv_query_port(ctx, port, attr) })
}

/// `ibv_query_gid_table` into `entries`: how many valid entries it wrote (a negative errno
/// on failure).
///
/// # Safety
/// `ctx` is an open context.
pub(crate) unsafe fn query_gid_table(ctx: *mut sys::ibv_context, entries: &mut [sys::ibv_gid_entry]) -> Result<usize> {
    // SAFETY: the caller's contract; `entries` has room for `entries.len()` entries.
    let n = unsafe { sys::ibv_query_gid_table(ctx, entries.as_mut_ptr(), entries.len(), 0) };
    if n < 0 {
        return Err(verb_error("ibv_query_gid_table", (-n) as i32));
    }
    Ok(n as usize)
}

/// `ibv_get_async_event` (`0`, or `-1` with errno: `EAGAIN` when nothing is pending on a
/// non-blocking descriptor). Any other return is an error too.
///
/// # Safety
/// `ctx` is an open context and `event` is valid for writes of a `struct ibv_async_event`.
/// An event got must be acked once with [`ack_async_event`].
pub(crate) unsafe fn get_async_event(ctx: *mut sys::ibv_context, event: *mut sys::ibv_async_event) -> Result<()> {
    // SAFETY: the caller's contract.
    pos_errno("ibv_get_async_event", unsafe { sys::ibv_get_async_event(ctx, event) })
}

/// `ibv_ack_async_event`.
///
/// # Safety
/// `event` was filled by a successful [`get_async_event`] and is acked once.
pub(crate) unsafe fn ack_async_event(event: *mut sys::ibv_async_event) {
    // SAFETY: the caller's contract.
    unsafe { sys::ibv_ack_async_event(event) }
}
