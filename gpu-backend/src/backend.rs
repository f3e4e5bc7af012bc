//! The backend abstraction the bridge uses without knowing the vendor.

use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::alloc::{AllocationInfo, AllocationKey, BackendKind};
use crate::error::Result;
use crate::notice::{InvalidationReason, NoticeHub};

/// Whether NIC writes needed flushing before the device reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    /// A flush was issued and has completed.
    Flushed,
    /// Nothing to do, and why (e.g. host memory is coherent; the GPU orders RDMA writes).
    NotNeeded(&'static str),
}

/// Accelerator (or host) memory that can be handed to a NIC.
///
/// Implementations: [`HostBackend`](crate::HostBackend), [`CudaBackend`](crate::CudaBackend).
/// See `rocm.rs` and `level_zero.rs` for the plans for AMD and Intel devices.
///
/// # Safety
/// The bridge hands the NIC memory on the strength of this trait's answers, so an
/// implementation must keep these promises; a wrong answer lets the NIC reach memory the
/// program no longer owns:
/// - [`identify`](Self::identify) returns `Some` only for memory that is mapped and belongs to
///   the allocation it names, with that allocation's true base and length, and an
///   [`AllocationKey`] that no other allocation of this backend ever has (keys are never
///   reused: an address alone never identifies memory).
/// - [`notifies`](Self::notifies) returns `true` only where every free of that allocation
///   (and every reuse of its addresses) first goes through [`notices`](Self::notices): each
///   subscriber overlapping it is called, and the memory is released only after every notice
///   is acknowledged; and the allocation reads as dying, or no longer identifies as itself,
///   from its first notice until it is released.
/// - [`export_dmabuf`](Self::export_dmabuf) returns an export whose fd covers exactly the
///   memory asked for (at the offset it reports), and that stays valid — or is revoked
///   through the exporter's own move-notify — while the export lives.
/// - The copy functions move exactly the bytes asked for, within the allocation checked.
pub unsafe trait MemoryBackend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The device ordinal it allocates on.
    fn device(&self) -> u32;

    /// The allocation granularity in bytes (64 KiB for CUDA device memory, the host page size
    /// for host memory); sizes are rounded up to it.
    fn granularity(&self) -> usize;

    /// Allocates `len` bytes. Freeing (dropping the buffer) first notifies subscribers.
    fn alloc(&self, len: usize) -> Result<DeviceBuffer>;

    /// The allocation containing `addr`, if it is this backend's memory — including memory
    /// allocated by others (CUDA: any device pointer of this device). A sub-range of a larger
    /// allocation resolves to the whole allocation.
    fn identify(&self, addr: u64) -> Result<Option<AllocationInfo>>;

    /// Exports `len` bytes at `addr` as a dma-buf, or says why not. The export covers whole
    /// host pages; [`DmaBufExport::offset`] says where `addr` lies in it.
    fn export_dmabuf(&self, addr: u64, len: u64) -> Result<DmaBufExport>;

    /// Copies `src` to device address `addr` and waits for it. The range must lie in one
    /// allocation of this backend (checked).
    ///
    /// # Safety
    /// The allocation must not be freed while the call runs (hold its `DeviceBuffer`, or a
    /// registration whose invalidation the free waits for).
    unsafe fn copy_to_addr(&self, addr: u64, src: &[u8]) -> Result<()>;

    /// Copies from device address `addr` into `dst` and waits for it.
    ///
    /// # Safety
    /// As [`copy_to_addr`](Self::copy_to_addr).
    unsafe fn copy_from_addr(&self, addr: u64, dst: &mut [u8]) -> Result<()>;

    /// Copies `src` to `dst` at `offset` and waits for it.
    fn copy_to_device(&self, dst: &DeviceBuffer, offset: u64, src: &[u8]) -> Result<()> {
        let at = dst.info().check(offset, src.len() as u64)?;
        // SAFETY: `dst` is borrowed, so its allocation lives through the call.
        unsafe { self.copy_to_addr(at, src) }
    }

    /// Copies from `src` at `offset` into `dst` and waits for it.
    fn copy_from_device(&self, src: &DeviceBuffer, offset: u64, dst: &mut [u8]) -> Result<()> {
        let at = src.info().check(offset, dst.len() as u64)?;
        // SAFETY: `src` is borrowed, so its allocation lives through the call.
        unsafe { self.copy_from_addr(at, dst) }
    }

    /// Makes completed NIC writes visible to the device before it reads them.
    fn flush_nic_writes(&self) -> Result<FlushOutcome>;

    /// Where to subscribe for invalidation notices.
    fn notices(&self) -> &NoticeHub;

    /// Whether `info` (as [`identify`](Self::identify) returned it) is an allocation whose free
    /// always goes through [`notices`](Self::notices): subscribers are told before the memory
    /// goes, and the allocation stays dying ([`NoticeHub::is_dying`]) or no longer identifies
    /// as itself from its notices until it is freed. True for allocations this backend made
    /// (freed by dropping their [`DeviceBuffer`]); false (the default) for memory it only
    /// identifies, such as CUDA memory of other allocators, freed without a notice.
    ///
    /// The bridge relies on it to serve cache hits by address alone, without identifying the
    /// memory: registrations of such an allocation never outlive it.
    fn notifies(&self, info: &AllocationInfo) -> bool {
        let _ = info;
        false
    }

    /// How many bytes of this device's memory a NIC can reach at once (a GPU's BAR1
    /// aperture), and where the number comes from; `None` where there is no such limit (host
    /// memory) or it cannot be read.
    fn export_budget(&self) -> Option<(u64, String)> {
        None
    }
}

/// What a backend does when a buffer goes away (crate-private).
pub(crate) trait Release: Send + Sync {
    /// Notifies subscribers, waits for their acks, then frees.
    fn release(&self, info: &AllocationInfo) -> Result<()>;
}

/// Memory allocated by a backend; freed on drop, after every subscriber has acknowledged the
/// invalidation notice.
pub struct DeviceBuffer {
    info: AllocationInfo,
    owner: Option<Arc<dyn Release>>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer").field("info", &self.info).finish()
    }
}

impl DeviceBuffer {
    pub(crate) fn new(info: AllocationInfo, owner: Arc<dyn Release>) -> Self {
        DeviceBuffer { info, owner: Some(owner) }
    }

    /// Its identity.
    pub fn key(&self) -> AllocationKey {
        self.info.key
    }

    /// What the backend knows of it.
    pub fn info(&self) -> AllocationInfo {
        self.info
    }

    /// Its start address (device VA for device memory).
    pub fn addr(&self) -> u64 {
        self.info.base
    }

    /// Its size in bytes (rounded up to the granularity).
    pub fn len(&self) -> u64 {
        self.info.len
    }

    /// Whether it is empty (never).
    pub fn is_empty(&self) -> bool {
        self.info.len == 0
    }

    /// Frees now, reporting a failure that dropping would swallow.
    pub fn free(mut self) -> Result<()> {
        match self.owner.take() {
            Some(o) => o.release(&self.info),
            None => Ok(()),
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(o) = self.owner.take() {
            // Drop cannot report; `free` does. The notices were delivered either way.
            let _ = o.release(&self.info);
        }
    }
}

/// A dma-buf export of part of an allocation.
pub struct DmaBufExport {
    fd: OwnedFd,
    offset: u64,
    len: u64,
    dmabuf_len: u64,
    key: AllocationKey,
    range: Range<u64>,
    hub: NoticeHub,
}

impl std::fmt::Debug for DmaBufExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBufExport")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("dmabuf_len", &self.dmabuf_len)
            .field("key", &self.key)
            .finish()
    }
}

impl DmaBufExport {
    pub(crate) fn new(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        dmabuf_len: u64,
        key: AllocationKey,
        range: Range<u64>,
        hub: NoticeHub,
    ) -> Self {
        DmaBufExport { fd, offset, len, dmabuf_len, key, range, hub }
    }

    /// The dma-buf file descriptor (for `ibv_reg_dmabuf_mr`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where the asked address lies in the dma-buf.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The asked length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the asked length is zero (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole dma-buf's size (page-aligned, at least `offset + len`).
    pub fn dmabuf_len(&self) -> u64 {
        self.dmabuf_len
    }

    /// The allocation it exports.
    pub fn key(&self) -> AllocationKey {
        self.key
    }

    /// The exporter takes the export back: subscribers of the range are notified (reason
    /// [`InvalidationReason::ExportRevoked`]) and acknowledge before the fd is closed.
    /// Importers holding their own reference to the dma-buf keep it; the notice is what tells
    /// them to stop.
    pub fn revoke(self) -> usize {
        self.hub.invalidate(self.key, self.range.clone(), InvalidationReason::ExportRevoked)
    }
}
