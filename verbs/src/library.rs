//! Whether rdma-core's libraries are present at run time.
//!
//! `rdma-mummy-sys` links a small static shim whose constructor `dlopen`s `libibverbs.so.1`
//! and `librdmacm.so.1` when the program starts; where a library is missing, every call
//! through the shim fails with `EOPNOTSUPP`, which would read as "this device does not
//! support that". This module asks the dynamic loader directly, once, so that callers get
//! [`Error::RdmaUnavailable`] with the loader's own message instead.

use std::ffi::CString;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::result::os;

/// The soname of libibverbs.
pub const LIBIBVERBS: &str = "libibverbs.so.1";
/// The soname of librdmacm.
pub const LIBRDMACM: &str = "librdmacm.so.1";

fn probe(soname: &'static str) -> Result<(), String> {
    let c = CString::new(soname).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated string. RTLD_NOLOAD only returns a handle to a
    // library that is already resident (the shim's constructor loaded it); it loads nothing
    // and runs no constructors.
    if let Some(h) = unsafe { os::dlopen(&c, libc::RTLD_LAZY | libc::RTLD_NOLOAD) } {
        // SAFETY: `h` came from dlopen above; this drops only the reference NOLOAD added.
        unsafe { os::dlclose(h) };
        return Ok(());
    }
    // Not resident: load it once more only to get the loader's reason. Even if this worked
    // (it should not), the shim's function pointers stayed null, so it is still unavailable.
    // SAFETY: as above; a library that does load is closed again at once (loading rdma-core's
    // library, initialisers included, is what the shim does at start-up anyway).
    match unsafe { os::dlopen(&c, libc::RTLD_LAZY | libc::RTLD_LOCAL) } {
        None => Err(os::dlerror().unwrap_or_else(|| "dlopen failed".to_string())),
        Some(h) => {
            // SAFETY: `h` is a live handle from dlopen.
            unsafe { os::dlclose(h) };
            Err("present now, but it was missing when the program started".to_string())
        }
    }
}

fn cached(cell: &'static OnceLock<Result<(), String>>, soname: &'static str) -> Result<()> {
    cell.get_or_init(|| probe(soname)).clone().map_err(|reason| Error::RdmaUnavailable { library: soname, reason })
}

/// `Ok` when libibverbs was loaded at start-up, else [`Error::RdmaUnavailable`].
pub fn ibverbs() -> Result<()> {
    static CELL: OnceLock<Result<(), String>> = OnceLock::new();
    cached(&CELL, LIBIBVERBS)
}

/// `Ok` when librdmacm was loaded at start-up, else [`Error::RdmaUnavailable`].
pub fn rdmacm() -> Result<()> {
    static CELL: OnceLock<Result<(), String>> = OnceLock::new();
    cached(&CELL, LIBRDMACM)
}
