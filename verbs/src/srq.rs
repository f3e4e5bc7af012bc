//! Shared receive queues: one pool of posted receives serving many connections.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::access::AccessFlags;
use crate::error::{Error, Result};
use crate::mr::LocalSlice;
use crate::pd::{PdInner, ProtectionDomain};
use crate::qp::{PostListError, RecvList};
use crate::{result, sys};

/// A shared receive queue (`struct ibv_srq`) in a protection domain. Connections made with it
/// ([`ConnectionOptions::srq`](crate::ConnectionOptions::srq)) take their receives from it;
/// a receive's completion arrives on the receive CQ of the connection whose message it took.
pub struct SharedReceiveQueue {
    srq: NonNull<sys::ibv_srq>,
    pd: Arc<PdInner>,
    max_wr: u32,
}

// SAFETY: posting to an SRQ is thread-safe (providers lock it); destroy happens once, in drop.
unsafe impl Send for SharedReceiveQueue {}
// SAFETY: as above.
unsafe impl Sync for SharedReceiveQueue {}

impl std::fmt::Debug for SharedReceiveQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedReceiveQueue").field("max_wr", &self.max_wr).finish()
    }
}

impl SharedReceiveQueue {
    /// Creates an SRQ of `max_wr` receives in `pd` (`ibv_create_srq`). Devices without SRQs
    /// (`max_srq` 0) refuse with EOPNOTSUPP or ENOSYS.
    pub fn new(pd: &ProtectionDomain, max_wr: u32) -> Result<Self> {
        if max_wr == 0 {
            return Err(Error::InvalidArgument("a shared receive queue needs room for a receive".into()));
        }
        // SAFETY: plain old data; the fields that matter are set below.
        let mut attr: sys::ibv_srq_init_attr = unsafe { std::mem::zeroed() };
        attr.attr.max_wr = max_wr;
        attr.attr.max_sge = 1;
        // SAFETY: the PD is live (held by `pd`, and by the returned value); `attr` is valid.
        let srq = unsafe { result::srq::create_srq(pd.as_raw(), &mut attr) }?;
        Ok(SharedReceiveQueue { srq, pd: pd.inner.clone(), max_wr })
    }

    /// The raw SRQ, for the `sys` layer.
    pub fn as_raw(&self) -> *mut sys::ibv_srq {
        self.srq.as_ptr()
    }

    /// How many receives it holds at most.
    pub fn max_wr(&self) -> u32 {
        self.max_wr
    }

    pub(crate) fn in_pd(&self, pd: &ProtectionDomain) -> bool {
        Arc::ptr_eq(&self.pd, &pd.inner)
    }

    /// Posts receives into `locals` (each in a locally writable region of the SRQ's PD), with
    /// ids `first_id`, `first_id + 1`, …, as one chained list. A bad slice posts nothing; a
    /// refusal part-way (the SRQ is full) says how many went.
    ///
    /// # Safety
    /// A message on any QP of the SRQ may land in a receive until it completes: each local
    /// slice's memory region must stay registered — not dropped nor deregistered — until that
    /// receive's completion is reaped or the SRQ is destroyed (a receive never consumed needs
    /// it for as long as the SRQ lives). A region deregistered earlier gives its lkey back to
    /// the provider, which may hand it to a later registration that a late message would
    /// then write.
    pub unsafe fn post_recv_list(
        &self,
        first_id: u64,
        locals: &[LocalSlice<'_>],
    ) -> std::result::Result<(), PostListError> {
        let refuse =
            |msg: &str| PostListError { posted: 0, error: Error::InvalidArgument(format!("SRQ receive: {msg}")) };
        for l in locals {
            if l.pd != Arc::as_ptr(&self.pd) {
                return Err(refuse("the local memory region belongs to another protection domain than the SRQ"));
            }
            if !l.access.contains(AccessFlags::LOCAL_WRITE) {
                return Err(refuse("the local memory region was registered without LOCAL_WRITE"));
            }
        }
        if locals.is_empty() {
            return Ok(());
        }
        let mut list = RecvList::new(first_id, locals);
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the SRQ is live; the list and its scatter entries outlive the call; every
        // range lies in a registered, locally writable MR of the SRQ's PD (checked above).
        unsafe { result::srq::post_srq_recv(self.srq.as_ptr(), list.head(), &mut bad) }
            .map_err(|error| list.partial(bad, error))
    }
}

impl Drop for SharedReceiveQueue {
    fn drop(&mut self) {
        // SAFETY: destroyed once; connections using it hold it (Arc) and destroy their QP first.
        if let Err(e) = unsafe { result::srq::destroy_srq(self.srq) } {
            tracing::error!("ibv_destroy_srq failed ({}); the SRQ is leaked", result::errno_of(&e));
        }
    }
}
