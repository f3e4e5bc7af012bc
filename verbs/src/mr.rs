//! Memory regions: registration (pinned, ODP, implicit ODP, dma-buf), the region that owns
//! its backing, and checked slices of it for work requests.

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Bound, RangeBounds};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use crate::access::AccessFlags;
use crate::buffer::RegisterableBuffer;
use crate::caps::DmaBufSupport;
use crate::error::{Error, Result};
use crate::pd::{PdInner, ProtectionDomain};
use crate::remote::RemoteBuf;
use crate::{result, sys};

impl ProtectionDomain {
    /// Registers `buf`, which the region then owns until it is deregistered (pinned
    /// registration, `ibv_reg_mr`; with [`AccessFlags::ON_DEMAND`] the pages are not pinned).
    ///
    /// ```no_run
    /// use p2pbridge_verbs::{AccessFlags, Context, ProtectionDomain};
    /// let pd = ProtectionDomain::new(&Context::open("rxe0")?)?;
    /// let mr = pd.register(p2pbridge_verbs::HostBuffer::new(4096)?, AccessFlags::remote_rw())?;
    /// println!("rkey {:#x}", mr.rkey());
    /// # Ok::<(), p2pbridge_verbs::Error>(())
    /// ```
    pub fn register<B: RegisterableBuffer>(&self, buf: B, access: AccessFlags) -> Result<MemoryRegion<B>> {
        check_access(access)?;
        if buf.is_empty() {
            return Err(Error::InvalidArgument("cannot register an empty buffer".into()));
        }
        let addr = buf.as_ptr();
        // SAFETY: `buf` upholds RegisterableBuffer: `len` bytes at `addr`, fixed until the
        // region (which now owns `buf`) has deregistered them.
        let mr = unsafe { self.reg_raw(addr, buf.len(), access) }?;
        Ok(MemoryRegion { mr, pd: self.clone(), access, buf: ManuallyDrop::new(buf), _not_sync_marker: PhantomData })
    }

    /// Registers `buf` with On-Demand Paging (`IBV_ACCESS_ON_DEMAND`): the NIC faults its
    /// pages in when it touches them, so nothing is pinned. Check
    /// [`DeviceCaps::odp`](crate::DeviceCaps) first; without ODP support this fails with
    /// [`Error::Unsupported`].
    pub fn register_odp<B: RegisterableBuffer>(&self, buf: B, access: AccessFlags) -> Result<MemoryRegion<B>> {
        self.require_odp(false)?;
        self.register(buf, access | AccessFlags::ON_DEMAND)
    }

    /// Registers an implicit ODP region: one MR covering the whole address space
    /// (`ibv_reg_mr(pd, NULL, SIZE_MAX, IBV_ACCESS_ON_DEMAND | ...)`).
    ///
    /// # Safety
    /// With remote rights, every peer holding the rkey may read or write any mapped address of
    /// this process. The caller must hand the rkey only to peers it trusts with all of its
    /// memory, and must not rely on Rust's aliasing rules for memory such a peer may write.
    pub unsafe fn register_implicit_odp(&self, access: AccessFlags) -> Result<MemoryRegion<Foreign>> {
        self.require_odp(true)?;
        let access = access | AccessFlags::ON_DEMAND;
        check_access(access)?;
        // SAFETY: the caller accepts the contract above; NULL/SIZE_MAX is how rdma-core spells
        // an implicit ODP registration, and the kernel maps no memory for it up front.
        let mr = unsafe { self.reg_raw(std::ptr::null_mut(), usize::MAX, access) }?;
        Ok(self.wrap(mr, access, Foreign(())))
    }

    /// Registers memory this crate does not own (a raw virtual address range).
    ///
    /// # Safety
    /// `addr..addr+len` must be mapped memory that stays mapped, at that address, until the
    /// returned region is dropped; for pinned registrations the memory must not be freed or
    /// remapped while registered. Memory a peer may write must not be read through Rust
    /// references that assume it does not change.
    pub unsafe fn register_raw(&self, addr: *mut u8, len: usize, access: AccessFlags) -> Result<MemoryRegion<Foreign>> {
        check_access(access)?;
        if len == 0 {
            return Err(Error::InvalidArgument("cannot register an empty range".into()));
        }
        if access.contains(AccessFlags::ON_DEMAND) {
            self.require_odp(false)?;
        }
        // SAFETY: forwarded from the caller's contract.
        let mr = unsafe { self.reg_raw(addr, len, access) }?;
        Ok(self.wrap(mr, access, Foreign(())))
    }

    /// Registers `len` bytes at `offset` of a dma-buf (`ibv_reg_dmabuf_mr`), mapped at `iova`
    /// in the region's address space (the address peers use).
    ///
    /// On devices that cannot import dma-bufs this returns [`Error::DmaBufUnsupported`].
    ///
    /// # Safety
    /// `fd` must be a dma-buf whose exporter keeps the memory valid, or revokes the NIC's
    /// mapping through move_notify, until the region is dropped; the region does not hold a
    /// reference to the file past this call (the kernel does).
    pub unsafe fn register_dmabuf(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
        access: AccessFlags,
    ) -> Result<MemoryRegion<Foreign>> {
        check_access(access)?;
        if len == 0 {
            return Err(Error::InvalidArgument("cannot register an empty dma-buf range".into()));
        }
        // SAFETY: the PD is live; the caller vouches for the dma-buf.
        let r = unsafe {
            result::mr::reg_dmabuf_mr(self.as_raw(), offset, len, iova, fd.as_raw_fd(), access.bits() as i32)
        };
        match r {
            Ok(mr) => Ok(self.wrap(mr, access, Foreign(()))),
            Err(e) => match DmaBufSupport::from_probe_errno(result::errno_of(&e).0) {
                DmaBufSupport::Unsupported(errno) => {
                    Err(Error::DmaBufUnsupported { device: self.context().name().to_string(), errno })
                }
                DmaBufSupport::Supported => Err(e),
            },
        }
    }

    /// A region of this PD over the registered `mr`, owning `buf`.
    fn wrap<B>(&self, mr: NonNull<sys::ibv_mr>, access: AccessFlags, buf: B) -> MemoryRegion<B> {
        MemoryRegion { mr, pd: self.clone(), access, buf: ManuallyDrop::new(buf), _not_sync_marker: PhantomData }
    }

    /// Registers `len` bytes at `addr`, mapped at the same address (iova).
    ///
    /// # Safety
    /// As [`ProtectionDomain::register_raw`].
    unsafe fn reg_raw(&self, addr: *mut u8, len: usize, access: AccessFlags) -> Result<NonNull<sys::ibv_mr>> {
        // SAFETY: forwarded; ibv_reg_mr_iova2 with iova == addr is ibv_reg_mr that also takes
        // the optional flags (relaxed ordering).
        unsafe { result::mr::reg_mr_iova2(self.as_raw(), addr, len, addr as u64, access.bits()) }
    }
}

fn check_access(access: AccessFlags) -> Result<()> {
    if access.intersects(AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_ATOMIC)
        && !access.contains(AccessFlags::LOCAL_WRITE)
    {
        return Err(Error::InvalidArgument(
            "REMOTE_WRITE and REMOTE_ATOMIC need LOCAL_WRITE too (ibv_reg_mr(3))".into(),
        ));
    }
    Ok(())
}

/// The backing of a region over memory this crate does not own (raw range, implicit ODP,
/// dma-buf); such regions give no slices of their memory.
#[derive(Debug)]
pub struct Foreign(());

/// A registered memory region (`struct ibv_mr`), deregistered on drop.
///
/// It owns its backing `B` (a `Vec<u8>`, [`HostBuffer`](crate::HostBuffer), ...) so the
/// memory cannot be freed while the NIC may reach it; dropping the region deregisters first
/// and frees the memory after. Work requests still in flight when a region is dropped fail
/// with a protection error: deregistration revokes the NIC's access before the memory goes.
///
/// Its bytes are reached through [`bytes`](MemoryRegion::bytes), a [`VolatileSlice`]: the NIC
/// may write them at any time while the region is registered, so they are never a `&[u8]`.
pub struct MemoryRegion<B> {
    mr: NonNull<sys::ibv_mr>,
    pd: ProtectionDomain,
    access: AccessFlags,
    /// Dropped after a successful deregistration only (leaked otherwise).
    buf: ManuallyDrop<B>,
    _not_sync_marker: PhantomData<*mut u8>,
}

// SAFETY: the MR handle may be used and deregistered from any thread; the buffer moves with it.
unsafe impl<B: Send> Send for MemoryRegion<B> {}
// SAFETY: shared access only reads the handle's immutable fields (keys, address, length) and
// hands out volatile views of the buffer, which tolerate concurrent writers.
unsafe impl<B: Sync> Sync for MemoryRegion<B> {}

impl<B> std::fmt::Debug for MemoryRegion<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &format_args!("{:#x}", self.lkey()))
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .field("access", &self.access)
            .finish()
    }
}

impl<B> MemoryRegion<B> {
    /// The raw MR, for the `sys` layer (and memory-window binds).
    pub fn as_raw(&self) -> *mut sys::ibv_mr {
        self.mr.as_ptr()
    }

    fn raw(&self) -> &sys::ibv_mr {
        // SAFETY: the MR stays registered while `self` lives; its fields are not changed by
        // the library after registration.
        unsafe { self.mr.as_ref() }
    }

    /// The local key, for work requests on this PD.
    pub fn lkey(&self) -> u32 {
        self.raw().lkey
    }

    /// The remote key, for peers.
    pub fn rkey(&self) -> u32 {
        self.raw().rkey
    }

    /// The start address (iova) of the region.
    pub fn addr(&self) -> u64 {
        self.raw().addr as u64
    }

    /// The length of the region in bytes.
    pub fn len(&self) -> u64 {
        self.raw().length as u64
    }

    /// Whether the region is empty (never: empty registrations are refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The access rights it was registered with.
    pub fn access(&self) -> AccessFlags {
        self.access
    }

    /// Its protection domain.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// The descriptor a peer needs to reach the whole region.
    pub fn remote(&self) -> RemoteBuf {
        RemoteBuf { addr: self.addr(), len: self.len(), rkey: self.rkey() }
    }

    /// A bounds-checked part of the region for local use in work requests.
    pub fn slice(&self, range: impl RangeBounds<u64>) -> Result<LocalSlice<'_>> {
        let (offset, length) = resolve_range(range, self.len(), "local MR")?;
        let length = u32::try_from(length).map_err(|_| {
            Error::InvalidArgument(format!("a work request moves at most 4 GiB - 1, not {length} bytes"))
        })?;
        Ok(LocalSlice {
            addr: self.addr() + offset,
            len: length,
            lkey: self.lkey(),
            access: self.access,
            pd: Arc::as_ptr(&self.pd.inner),
            _mr: PhantomData,
        })
    }

    /// Asks the NIC to fault in `range` ahead of use (`ibv_advise_mr` PREFETCH, or
    /// PREFETCH_WRITE when `for_write`), waiting for it to finish. Only for ODP regions.
    pub fn advise_prefetch(&self, range: impl RangeBounds<u64>, for_write: bool) -> Result<()> {
        if !self.access.contains(AccessFlags::ON_DEMAND) {
            return Err(Error::InvalidArgument("prefetch applies to ODP regions only".into()));
        }
        let (offset, length) = resolve_range(range, self.len(), "local MR")?;
        let mut sge = sys::ibv_sge {
            addr: self.addr() + offset,
            length: u32::try_from(length)
                .map_err(|_| Error::InvalidArgument("prefetch at most 4 GiB - 1 at a time".into()))?,
            lkey: self.lkey(),
        };
        let advice = if for_write {
            sys::ib_uverbs_advise_mr_advice::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE
        } else {
            sys::ib_uverbs_advise_mr_advice::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH
        };
        // `enum ibv_advise_mr_flag` of verbs.h, which rdma-mummy-sys does not bind.
        const IBV_ADVISE_MR_FLAG_FLUSH: u32 = 1 << 0;
        // SAFETY: the PD and MR are live; `sge` is one valid entry naming this MR's lkey.
        unsafe {
            result::mr::advise_mr(self.pd.as_raw(), advice, IBV_ADVISE_MR_FLAG_FLUSH, std::slice::from_mut(&mut sge))
        }
    }

    /// Deregisters now and gives the backing back; unlike dropping, reports a failure.
    pub fn deregister(self) -> Result<B> {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: the MR is deregistered exactly once here; Drop will not run.
        let r = unsafe { result::mr::dereg_mr(me.mr) };
        // SAFETY: we take the fields out of a value whose destructor will not run.
        let (pd, buf) = unsafe { (std::ptr::read(&me.pd), std::ptr::read(&me.buf)) };
        drop(pd);
        // On failure the NIC may still reach the memory: the backing is leaked, not freed.
        r?;
        Ok(ManuallyDrop::into_inner(buf))
    }
}

impl<B: RegisterableBuffer> MemoryRegion<B> {
    /// The registered memory, as memory that others write concurrently.
    ///
    /// While the region is registered, the NIC may write its bytes at any moment — a READ or
    /// RECV posted earlier, or a peer holding its rkey — so the region never hands out
    /// `&[u8]`: a Rust reference promises bytes that do not change, and the compiler relies on
    /// it (a loop that waits for a peer's flag byte through a slice never sees it change). A
    /// [`VolatileSlice`] copies in and out (`copy_to`, `copy_from`) and reads single values
    /// with volatile or atomic loads, which is honest about the NIC. To own the bytes again,
    /// [`deregister`](Self::deregister) the region and take the buffer back.
    ///
    /// ```no_run
    /// # fn f(mr: &p2pbridge_verbs::MemoryRegion<p2pbridge_verbs::HostBuffer>) {
    /// let mut head = [0u8; 8];
    /// mr.bytes().copy_to(&mut head[..]); // whatever the bytes are at this moment
    /// # }
    /// ```
    pub fn bytes(&self) -> VolatileSlice<'_> {
        // SAFETY: the buffer is `len()` bytes at `as_ptr()`, valid for reads and writes through
        // that raw pointer (RegisterableBuffer's contract: not memory owned through Rust
        // references) while the region owns it, which outlives the returned borrow of `self`;
        // the view accesses it only by volatile or byte copies through that pointer, so
        // concurrent writers (the NIC, other `bytes()` views) break no reference's promise.
        unsafe { VolatileSlice::new(self.buf.as_ptr(), self.buf.len()) }
    }

    /// Copies the region's bytes out (see [`bytes`](Self::bytes) on why there is no slice).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.buf.len()];
        self.bytes().copy_to(&mut v[..]);
        v
    }
}

impl MemoryRegion<crate::HostBuffer> {
    /// A raw pointer to the region's memory (an mmap of our own, not derived from a Rust
    /// reference), for writing into the buffer while views of it may exist elsewhere — as the
    /// NIC itself does. Writing through it is `unsafe`, with the usual rules for raw pointers:
    /// stay within `len()` bytes, and do not race with other writers of the same bytes.
    pub fn raw_ptr(&self) -> *mut u8 {
        crate::RegisterableBuffer::as_ptr(&*self.buf)
    }
}

impl<B> Drop for MemoryRegion<B> {
    fn drop(&mut self) {
        // SAFETY: deregistered exactly once; the buffer is dropped after this, so the NIC
        // loses access before the memory is freed.
        match unsafe { result::mr::dereg_mr(self.mr) } {
            // SAFETY: dropped exactly once, here, after the NIC lost access to it.
            Ok(()) => unsafe { ManuallyDrop::drop(&mut self.buf) },
            Err(e) => {
                // The NIC may still reach the memory (a provider refuses to deregister a region
                // with memory windows bound over it, for one): leak it rather than free it.
                tracing::error!("ibv_dereg_mr failed ({}); the region's memory is leaked, not freed, since the NIC may still reach it",
                    result::errno_of(&e)
                );
            }
        }
    }
}

pub(crate) fn resolve_range(range: impl RangeBounds<u64>, len: u64, what: &'static str) -> Result<(u64, u64)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    if start > end || end > len {
        return Err(Error::OutOfBounds { what, offset: start, length: end.saturating_sub(start) as usize, len });
    }
    Ok((start, end - start))
}

/// A checked part of a local memory region, for one work request.
#[derive(Debug, Clone, Copy)]
pub struct LocalSlice<'mr> {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) lkey: u32,
    pub(crate) access: AccessFlags,
    pub(crate) pd: *const PdInner,
    _mr: PhantomData<&'mr ()>,
}

impl LocalSlice<'_> {
    /// Its length in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub(crate) fn sge(&self) -> sys::ibv_sge {
        sys::ibv_sge { addr: self.addr, length: self.len, lkey: self.lkey }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_write_without_local_write_is_refused_before_the_verb() {
        assert!(check_access(AccessFlags::REMOTE_WRITE).is_err());
        assert!(check_access(AccessFlags::REMOTE_ATOMIC | AccessFlags::REMOTE_READ).is_err());
        assert!(check_access(AccessFlags::remote_rw()).is_ok());
        assert!(check_access(AccessFlags::REMOTE_READ).is_ok());
    }
}
