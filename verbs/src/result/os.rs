//! The C library's calls the crate makes: descriptor flags and polling of the channels'
//! descriptors, and the dynamic loader (to tell whether rdma-core is present). `what` names
//! the call in errors, with the descriptor it was made on.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use super::neg_errno;
use crate::error::Result;

/// `fcntl(fd, F_GETFL)`: the descriptor's status flags (`-1` with errno on failure).
///
/// # Safety
/// `fd` is an open descriptor that the caller owns, or borrows for the call.
pub(crate) unsafe fn fcntl_getfl(fd: RawFd, what: &'static str) -> Result<libc::c_int> {
    // SAFETY: the caller's contract; F_GETFL only reads the flags.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    neg_errno(what, fl)?;
    Ok(fl)
}

/// `fcntl(fd, F_SETFL, flags)` (`-1` with errno on failure).
///
/// # Safety
/// `fd` is an open descriptor that the caller owns, or borrows for the call, and whose users
/// expect the flags set (e.g. `O_NONBLOCK`: every reader copes with `EAGAIN`).
pub(crate) unsafe fn fcntl_setfl(fd: RawFd, flags: libc::c_int, what: &'static str) -> Result<()> {
    // SAFETY: the caller's contract.
    neg_errno(what, unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })
}

/// `poll(fds, timeout_ms)`: how many descriptors have events (`-1` with errno on failure,
/// `EINTR` included).
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int, what: &'static str) -> Result<usize> {
    // SAFETY: `fds` is valid for reads and writes of `fds.len()` entries for the call; poll
    // touches nothing else (a closed or foreign descriptor is reported, not accessed).
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    neg_errno(what, n)?;
    Ok(n as usize)
}

/// `dlopen(name, flags)`: a handle, or `None` (then [`dlerror`] says why).
///
/// # Safety
/// Unless `flags` has `RTLD_NOLOAD`, the library may be loaded, which runs its initialisers:
/// the caller vouches that loading it is sound. A handle must be closed once with [`dlclose`].
pub(crate) unsafe fn dlopen(name: &CStr, flags: libc::c_int) -> Option<NonNull<libc::c_void>> {
    // SAFETY: the caller's contract; `name` is a valid NUL-terminated string.
    NonNull::new(unsafe { libc::dlopen(name.as_ptr(), flags) })
}

/// `dlclose(handle)`; a failure (which [`dlerror`] would describe) is not reported.
///
/// # Safety
/// `handle` came from [`dlopen`] and is closed once; nothing of the library is used through
/// it afterwards (a library loaded only by this handle is unloaded).
pub(crate) unsafe fn dlclose(handle: NonNull<libc::c_void>) {
    // SAFETY: the caller's contract.
    unsafe { libc::dlclose(handle.as_ptr()) };
}

/// `dlerror()`: the calling thread's last loader error, copied out, if there is one.
pub(crate) fn dlerror() -> Option<String> {
    // SAFETY: dlerror returns a thread-local string or null, valid until the next dl call.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        return None;
    }
    // SAFETY: non-null dlerror results are NUL-terminated C strings; copied before any other
    // dl call.
    Some(unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned())
}
