//! Memory windows (type 2): a revocable remote key over part of a memory region.
//!
//! A window is allocated in a protection domain ([`ProtectionDomain::alloc_mw`]) and bound
//! over a range of a region by a work request on one queue pair
//! ([`QueuePair::post_bind_mw`](crate::QueuePair::post_bind_mw)). Its rkey then reaches
//! exactly that range, with the rights given at the bind, and only through that queue pair: a
//! peer that rewrites the length it was told, or that uses the key over another connection, is
//! refused by the NIC. Deallocating the window ([`MemoryWindow::dealloc`], or dropping it)
//! revokes the rkey at the NIC at once, whatever the queue pair's state.

use std::ptr::NonNull;

use crate::error::Result;
use crate::pd::ProtectionDomain;
use crate::{result, sys};

/// A type 2 memory window (`struct ibv_mw`), deallocated on drop.
pub struct MemoryWindow {
    mw: NonNull<sys::ibv_mw>,
    /// The rkey of the last bind (or the allocation's): providers differ in whether they
    /// update `mw->rkey` after a type 2 bind (rxe does not), so it is kept here.
    rkey: u32,
    _pd: ProtectionDomain,
}

// SAFETY: a window is a kernel/provider object handle; binding and deallocation are verbs
// that may be called from any thread.
unsafe impl Send for MemoryWindow {}
// SAFETY: shared access reads the rkey kept in the struct (changed only through `&mut`), and
// binds through `&MemoryWindow` are work requests the provider serializes on its queue.
unsafe impl Sync for MemoryWindow {}

impl std::fmt::Debug for MemoryWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWindow").field("rkey", &format_args!("{:#x}", self.rkey)).finish()
    }
}

impl ProtectionDomain {
    /// Allocates a type 2 memory window (`ibv_alloc_mw(pd, IBV_MW_TYPE_2)`), unbound. Check
    /// [`DeviceCaps::mw_type2`](crate::DeviceCaps) first: devices without windows fail here
    /// with the provider's errno (normally `EOPNOTSUPP`).
    pub fn alloc_mw(&self) -> Result<MemoryWindow> {
        // SAFETY: the PD is live (held by the window for its life).
        let mw = unsafe { result::mw::alloc_mw(self.as_raw(), sys::ibv_mw_type::IBV_MW_TYPE_2) }?;
        // SAFETY: a window just allocated and owned here.
        let rkey = unsafe { mw.as_ref() }.rkey;
        Ok(MemoryWindow { mw, rkey, _pd: self.clone() })
    }
}

impl MemoryWindow {
    /// The rkey peers use: after a successful bind, the bind's.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Whether the window belongs to `pd`.
    pub(crate) fn in_pd(&self, pd: &ProtectionDomain) -> bool {
        std::sync::Arc::ptr_eq(&self._pd.inner, &pd.inner)
    }

    /// The raw window, for the `sys` layer.
    pub fn as_raw(&self) -> *mut sys::ibv_mw {
        self.mw.as_ptr()
    }

    /// The rkey the next bind will carry (`ibv_inc_rkey`: same index, next key byte), so that a
    /// key of an earlier bind is refused.
    pub(crate) fn next_rkey(&self) -> u32 {
        result::mw::inc_rkey(self.rkey)
    }

    /// Records the rkey of a bind that completed successfully.
    pub(crate) fn set_rkey(&mut self, rkey: u32) {
        self.rkey = rkey;
    }

    /// Deallocates the window now (`ibv_dealloc_mw`): its rkey is refused by the NIC from the
    /// moment this returns `Ok`. On failure the window is leaked, and so must be whatever it
    /// is bound over: the caller keeps the region registered.
    pub fn dealloc(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: deallocated exactly once; Drop will not run.
        let r = unsafe { result::mw::dealloc_mw(me.mw) };
        // SAFETY: taken out of a value whose destructor does not run.
        drop(unsafe { std::ptr::read(&me._pd) });
        r
    }
}

impl Drop for MemoryWindow {
    fn drop(&mut self) {
        // SAFETY: deallocated exactly once.
        if let Err(e) = unsafe { result::mw::dealloc_mw(self.mw) } {
            tracing::error!("ibv_dealloc_mw failed ({}); the window is leaked", result::errno_of(&e));
        }
    }
}
