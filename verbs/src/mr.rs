//! Protection domains and memory regions: pinned, ODP, implicit ODP, dma-buf.

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Bound, RangeBounds};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use bitflags::bitflags;
use vm_memory::VolatileSlice;

use crate::buffer::RegisterableBuffer;
use crate::caps::DmaBufSupport;
use crate::device::Context;
use crate::error::{Errno, Error, Result};
use crate::{result, sys};

bitflags! {
    /// Access rights of a memory region (`enum ibv_access_flags`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct AccessFlags: u32 {
        /// The local NIC may write (RDMA READ and RECV targets). Needed by the REMOTE_WRITE
        /// and REMOTE_ATOMIC rights.
        const LOCAL_WRITE = 1;
        /// Peers may RDMA WRITE into the region.
        const REMOTE_WRITE = 2;
        /// Peers may RDMA READ from the region.
        const REMOTE_READ = 4;
        /// Peers may run atomics on the region.
        const REMOTE_ATOMIC = 8;
        /// Memory windows may be bound over the region (`IBV_ACCESS_MW_BIND`): peers then reach
        /// it through a window's rkey ([`MemoryWindow`](crate::MemoryWindow)), which can be
        /// revoked on its own.
        const MW_BIND = sys::ibv_access_flags::IBV_ACCESS_MW_BIND.0;
        /// On-Demand Paging: pages are faulted in by the NIC, not pinned.
        const ON_DEMAND = 64;
        /// PCIe relaxed ordering, where the device and platform allow it (an optional flag:
        /// ignored where unsupported).
        const RELAXED_ORDERING = 1 << 20;
    }
}

impl AccessFlags {
    /// LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ: what a buffer that peers read and write needs.
    pub fn remote_rw() -> Self {
        AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ
    }
}

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
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A protection domain: MRs and QPs in it may be used together.
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
        let pd = result::ptr("ibv_alloc_pd", unsafe { sys::ibv_alloc_pd(ctx.as_raw()) })?;
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
        let p =
            unsafe { sys::ibv_reg_dmabuf_mr(self.as_raw(), offset, len, iova, fd.as_raw_fd(), access.bits() as i32) };
        match NonNull::new(p) {
            Some(mr) => Ok(self.wrap(mr, access, Foreign(()))),
            None => {
                let e = Errno::last();
                match DmaBufSupport::from_probe_errno(e.0) {
                    DmaBufSupport::Unsupported(errno) => {
                        Err(Error::DmaBufUnsupported { device: self.context().name().to_string(), errno })
                    }
                    DmaBufSupport::Supported => Err(result::verb_error("ibv_reg_dmabuf_mr", e.0)),
                }
            }
        }
    }

    /// Probes dma-buf MR support the way NCCL and UCX do:
    /// `ibv_reg_dmabuf_mr(pd, 0, 0, 0, -1, 0)` must fail; `EBADF` means the provider got as
    /// far as the fd (supported), `EOPNOTSUPP`/`EPROTONOSUPPORT` mean it is not.
    pub fn dmabuf_support(&self) -> DmaBufSupport {
        // SAFETY: fd -1 with length 0 registers nothing; the call can only fail. Should a
        // provider ever accept it, the region is deregistered at once.
        let p = unsafe { sys::ibv_reg_dmabuf_mr(self.as_raw(), 0, 0, 0, -1, 0) };
        if !p.is_null() {
            // SAFETY: `p` is a region we own and drop at once.
            unsafe { sys::ibv_dereg_mr(p) };
            return DmaBufSupport::Supported;
        }
        DmaBufSupport::from_probe_errno(Errno::last().0)
    }

    /// Probes whether `ibv_advise_mr` prefetch works here: registers one ODP page and asks
    /// for it to be prefetched. `Ok(None)` when it works, `Ok(Some(reason))` when it does not
    /// (no ODP, or the provider lacks advise_mr, as rdma-core's rxe provider before v57 does).
    pub fn prefetch_support(&self) -> Result<Option<String>> {
        if let Err(e) = self.require_odp(false) {
            return Ok(Some(e.to_string()));
        }
        let mr = self.register_odp(crate::HostBuffer::new(4096)?, AccessFlags::LOCAL_WRITE)?;
        match mr.advise_prefetch(.., true) {
            Ok(()) => Ok(None),
            Err(e @ Error::Verb { errno: Errno(libc::EOPNOTSUPP), .. }) => Ok(Some(format!(
                "{e}: the user-space provider of {} does not implement advise_mr",
                self.context().name()
            ))),
            Err(e) => Err(e),
        }
    }

    /// A region of this PD over the registered `mr`, owning `buf`.
    fn wrap<B>(&self, mr: NonNull<sys::ibv_mr>, access: AccessFlags, buf: B) -> MemoryRegion<B> {
        MemoryRegion { mr, pd: self.clone(), access, buf: ManuallyDrop::new(buf), _not_sync_marker: PhantomData }
    }

    fn require_odp(&self, implicit: bool) -> Result<()> {
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

    /// # Safety
    /// As [`ProtectionDomain::register_raw`].
    unsafe fn reg_raw(&self, addr: *mut u8, len: usize, access: AccessFlags) -> Result<NonNull<sys::ibv_mr>> {
        // SAFETY: forwarded; ibv_reg_mr_iova2 with iova == addr is ibv_reg_mr that also takes
        // the optional flags (relaxed ordering).
        result::ptr("ibv_reg_mr", unsafe {
            sys::ibv_reg_mr_iova2(self.as_raw(), addr.cast(), len, addr as u64, access.bits())
        })
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
        const IBV_ADVISE_MR_FLAG_FLUSH: u32 = 1;
        // SAFETY: the PD and MR are live; `sge` is one valid entry naming this MR's lkey.
        let rc = unsafe { sys::ibv_advise_mr(self.pd.as_raw(), advice, IBV_ADVISE_MR_FLAG_FLUSH, &mut sge, 1) };
        result::pos_errno("ibv_advise_mr", rc)
    }

    /// Deregisters now and gives the backing back; unlike dropping, reports a failure.
    pub fn deregister(self) -> Result<B> {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: the MR is deregistered exactly once here; Drop will not run.
        let rc = unsafe { sys::ibv_dereg_mr(me.mr.as_ptr()) };
        // SAFETY: we take the fields out of a value whose destructor will not run.
        let (pd, buf) = unsafe { (std::ptr::read(&me.pd), std::ptr::read(&me.buf)) };
        drop(pd);
        // On failure the NIC may still reach the memory: the backing is leaked, not freed.
        result::pos_errno("ibv_dereg_mr", rc)?;
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
        let rc = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc == 0 {
            // SAFETY: dropped exactly once, here, after the NIC lost access to it.
            unsafe { ManuallyDrop::drop(&mut self.buf) };
        } else {
            // The NIC may still reach the memory (a provider refuses to deregister a region
            // with memory windows bound over it, for one): leak it rather than free it.
            eprintln!(
                "p2pbridge-verbs: ibv_dereg_mr failed ({}); the region's memory is leaked, not freed, since the NIC may still reach it",
                Errno(rc.abs())
            );
        }
    }
}

fn resolve_range(range: impl RangeBounds<u64>, len: u64, what: &'static str) -> Result<(u64, u64)> {
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

/// What a peer needs to reach a registered region: address, length and rkey.
///
/// It travels between hosts (in rdma_cm private data, see [`RemoteBuf::to_bytes`]). The
/// length is what the peer *claims*; our bounds checks use it, and the NIC checks the real
/// region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteBuf {
    /// The region's start address on the peer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The peer's rkey for it.
    pub rkey: u32,
}

impl RemoteBuf {
    /// The encoded size: 4-byte magic, 8-byte address, 8-byte length, 4-byte rkey.
    pub const WIRE_LEN: usize = 24;
    const MAGIC: [u8; 4] = *b"P2B1";

    /// Encodes the descriptor (little-endian) for a peer.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[0..4].copy_from_slice(&Self::MAGIC);
        b[4..12].copy_from_slice(&self.addr.to_le_bytes());
        b[12..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

    /// Decodes a descriptor; trailing bytes (rdma_cm pads private data) are ignored.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < Self::WIRE_LEN || b[0..4] != Self::MAGIC {
            return Err(Error::InvalidArgument(format!(
                "not a p2pbridge remote buffer descriptor ({} bytes)",
                b.len()
            )));
        }
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let mut k = [0u8; 4];
        k.copy_from_slice(&b[20..24]);
        Ok(RemoteBuf { addr: u64_at(4), len: u64_at(12), rkey: u32::from_le_bytes(k) })
    }

    /// A bounds-checked part of the remote buffer (against the length the peer gave).
    pub fn slice(&self, range: impl RangeBounds<u64>) -> Result<RemoteSlice> {
        let (offset, length) = resolve_range(range, self.len, "remote buffer")?;
        let len = u32::try_from(length).map_err(|_| {
            Error::InvalidArgument(format!("a work request moves at most 4 GiB - 1, not {length} bytes"))
        })?;
        // The descriptor came from a peer: its address may be anything.
        let addr = self.addr.checked_add(offset).ok_or(Error::OutOfBounds {
            what: "remote buffer (its address wraps)",
            offset,
            length: len as usize,
            len: self.len,
        })?;
        Ok(RemoteSlice { addr, len, rkey: self.rkey })
    }
}

/// A part of a remote buffer, for one work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSlice {
    /// Remote address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Remote key.
    pub rkey: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_buf_round_trips_and_rejects_garbage() {
        let r = RemoteBuf { addr: 0x7f00_1234_5000, len: 64 << 20, rkey: 0xdead_beef };
        let mut wire = r.to_bytes().to_vec();
        wire.extend_from_slice(&[0u8; 32]); // rdma_cm pads private data
        assert_eq!(RemoteBuf::from_bytes(&wire).unwrap(), r);
        assert!(RemoteBuf::from_bytes(&wire[..10]).is_err());
        let mut bad = r.to_bytes();
        bad[0] = b'X';
        assert!(RemoteBuf::from_bytes(&bad).is_err());
    }

    #[test]
    fn remote_slices_are_bounds_checked() {
        let r = RemoteBuf { addr: 1000, len: 100, rkey: 7 };
        let s = r.slice(10..30).unwrap();
        assert_eq!((s.addr, s.len, s.rkey), (1010, 20, 7));
        assert_eq!(r.slice(..).unwrap().len, 100);
        assert!(matches!(r.slice(90..101), Err(Error::OutOfBounds { .. })));
        #[allow(clippy::reversed_empty_ranges)]
        let rev = r.slice(50..40);
        assert!(matches!(rev, Err(Error::OutOfBounds { .. })));
        assert!(matches!(r.slice(..=100), Err(Error::OutOfBounds { .. })));
    }

    #[test]
    fn remote_write_without_local_write_is_refused_before_the_verb() {
        assert!(check_access(AccessFlags::REMOTE_WRITE).is_err());
        assert!(check_access(AccessFlags::REMOTE_ATOMIC | AccessFlags::REMOTE_READ).is_err());
        assert!(check_access(AccessFlags::remote_rw()).is_ok());
        assert!(check_access(AccessFlags::REMOTE_READ).is_ok());
    }
}
