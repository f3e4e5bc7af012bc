//! Protection domains.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::device::Context;
use crate::error::{Error, Result};
use crate::{result, sys};

pub(crate) struct PdInner {
    pd: NonNull<sys::ibv_pd>,
    ctx: Context,
}

// SAFETY: a PD is a kernel object handle; verbs on it are thread-safe.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: every MR, QP and connection holds an Arc to this PD, so none is left.
        let _ = unsafe { result::pd::dealloc_pd(self.pd) };
    }
}

/// A protection domain: MRs and QPs in it may be used together.
///
/// Memory is registered in it by [`register`](ProtectionDomain::register) and its kin
/// (`mr.rs`), memory windows allocated by [`alloc_mw`](ProtectionDomain::alloc_mw) (`mw.rs`),
/// and what the device can do with it probed by
/// [`dmabuf_support`](ProtectionDomain::dmabuf_support) and
/// [`prefetch_support`](ProtectionDomain::prefetch_support) (`caps.rs`).
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain").field("device", &self.inner.ctx.name()).finish()
    }
}

impl ProtectionDomain {
    /// Allocates a protection domain on `ctx` (`ibv_alloc_pd`).
    pub fn new(ctx: &Context) -> Result<Self> {
        // SAFETY: the context is open for as long as the PD holds it.
        let pd = unsafe { result::pd::alloc_pd(ctx.as_raw()) }?;
        Ok(ProtectionDomain { inner: Arc::new(PdInner { pd, ctx: ctx.clone() }) })
    }

    /// The device context.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// The raw PD, for the `sys` layer.
    pub fn as_raw(&self) -> *mut sys::ibv_pd {
        self.inner.pd.as_ptr()
    }

    /// `Ok` when the device has On-Demand Paging (with `implicit`, implicit ODP too), else
    /// [`Error::Unsupported`].
    pub(crate) fn require_odp(&self, implicit: bool) -> Result<()> {
        let caps = self.context().caps()?;
        let what = if implicit {
            "implicit On-Demand Paging (IBV_ODP_SUPPORT_IMPLICIT)"
        } else {
            "On-Demand Paging (IBV_ODP_SUPPORT)"
        };
        if !caps.odp.supported || (implicit && !caps.odp.implicit) {
            return Err(Error::Unsupported { device: self.context().name().to_string(), what: what.to_string() });
        }
        Ok(())
    }
}
