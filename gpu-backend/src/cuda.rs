//! The CUDA backend, through `cudarc`'s driver API with dynamic loading: the crate builds and
//! runs on hosts without CUDA, where [`CudaBackend::new`] returns
//! [`Error::BackendUnavailable`].
//!
//! - Allocations (`cuMemAlloc`) are rounded up to 64 KiB, the page size GPUDirect RDMA pins
//!   in, and get `CU_POINTER_ATTRIBUTE_SYNC_MEMOPS` so that synchronous copies and kernels are
//!   ordered with NIC access.
//! - Pointers are identified with `cuPointerGetAttributes` (memory type, device ordinal,
//!   `BUFFER_ID`) and `cuMemGetAddressRange`, so a tensor inside a caching allocator's block
//!   resolves to the block.
//! - dma-buf export is `cuMemGetHandleForAddressRange(CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD)`,
//!   where `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` says the driver and kernel allow it.
//! - NIC writes are flushed with `cuFlushGPUDirectRDMAWrites` unless
//!   `CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING` says the device orders them itself.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError, PinnedHostSlice};

use crate::alloc::{AllocationInfo, AllocationKey, BackendKind};
use crate::backend::{DeviceBuffer, DmaBufExport, FlushOutcome, MemoryBackend, Release};
use crate::error::{Error, Result};
use crate::notice::{InvalidationReason, NoticeHub};

/// GPU page size for GPUDirect RDMA.
pub const GPU_PAGE: u64 = 64 * 1024;

fn cuda_err(call: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| {
        let name = e.error_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
        let hint = match e.0 {
            sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Some("the device is out of memory"),
            sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => {
                Some("no CUDA device is visible (CUDA_VISIBLE_DEVICES, nvidia-smi)")
            }
            sys::cudaError_enum::CUDA_ERROR_INVALID_DEVICE => Some("no device of that ordinal"),
            sys::cudaError_enum::CUDA_ERROR_NOT_SUPPORTED => Some("the driver or device does not support this"),
            _ => None,
        };
        Error::Cuda { call, code: e.0 as i32, name, hint }
    }
}

/// Whether libcuda exports `symbol` (newer entry points are missing from older drivers, and
/// cudarc panics when calling a missing one).
fn has_symbol(symbol: &str) -> bool {
    // SAFETY: culib() only loads libcuda (present: CudaBackend::new checked), and looking up a
    // symbol without calling it has no side effects.
    unsafe { sys::culib().get::<*const ()>(symbol.as_bytes()).is_ok() }
}

struct CudaInner {
    ctx: Arc<CudaContext>,
    ordinal: u32,
    hub: NoticeHub,
    /// Our allocations: base address -> buffer id (what `release` may free; what
    /// [`MemoryBackend::notifies`] answers for).
    ours: Mutex<BTreeMap<u64, u64>>,
    /// How this device makes NIC writes visible: fixed per device, so read once, on the first
    /// flush, instead of on every one.
    flush: OnceLock<FlushPlan>,
}

/// What [`MemoryBackend::flush_nic_writes`] does on this device.
enum FlushPlan {
    /// The device orders NIC writes itself.
    NotNeeded,
    /// `cuFlushGPUDirectRDMAWrites` is needed and available.
    Call,
    /// Needed but not possible, and why.
    Unsupported(String),
}

/// CUDA device memory on one device. Cheap to clone (a handle).
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<CudaInner>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("ordinal", &self.inner.ordinal).finish()
    }
}

impl CudaBackend {
    /// Whether the CUDA driver library can be loaded here; `Err` says why not.
    pub fn driver_present() -> std::result::Result<(), String> {
        // SAFETY: only tries to dlopen libcuda; loads nothing else.
        if unsafe { sys::is_culib_present() } {
            Ok(())
        } else {
            Err("libcuda.so.1 not found: install the NVIDIA driver (this host has no CUDA)".into())
        }
    }

    /// The number of CUDA devices.
    pub fn device_count() -> Result<usize> {
        Self::driver_present().map_err(|reason| Error::BackendUnavailable { backend: "cuda", reason })?;
        result::init().map_err(cuda_err("cuInit"))?;
        Ok(CudaContext::device_count().map_err(cuda_err("cuDeviceGetCount"))?.max(0) as usize)
    }

    /// Opens device `ordinal` (its primary context).
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::driver_present().map_err(|reason| Error::BackendUnavailable { backend: "cuda", reason })?;
        let n = Self::device_count()?;
        if ordinal >= n {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: format!("no CUDA device {ordinal}: {n} present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
        Ok(CudaBackend {
            inner: Arc::new(CudaInner {
                ctx,
                ordinal: ordinal as u32,
                hub: NoticeHub::default(),
                ours: Mutex::new(BTreeMap::new()),
                flush: OnceLock::new(),
            }),
        })
    }

    fn bind(&self) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))
    }

    fn attribute(&self, a: sys::CUdevice_attribute) -> Result<i32> {
        self.inner.ctx.attribute(a).map_err(cuda_err("cuDeviceGetAttribute"))
    }

    /// The size of this GPU's BAR1 aperture — how much of its memory the NIC can reach at once
    /// through GPUDirect RDMA — read from the PCI device's sysfs `resource` file (BAR1 is its
    /// second line), with the PCI address CUDA reports.
    pub fn bar1_bytes(&self) -> Result<(u64, String)> {
        let a = |x| self.attribute(x).map(|v| v as u32);
        let addr = format!(
            "{:04x}:{:02x}:{:02x}.0",
            a(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
            a(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
            a(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
        );
        let path = format!("/sys/bus/pci/devices/{addr}/resource");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::InvalidArgument(format!("cannot read {path} for the GPU's BAR1 size: {e}")))?;
        let n = crate::alloc::pci_bar_size(&text, 1)
            .ok_or_else(|| Error::InvalidArgument(format!("{path} has no BAR1 (is {addr} a GPU?)")))?;
        Ok((n, format!("BAR1 of GPU {} ({addr})", self.inner.ordinal)))
    }

    /// Whether this device can export dma-bufs, and if not, why.
    pub fn dmabuf_support(&self) -> Result<std::result::Result<(), String>> {
        if !has_symbol("cuMemGetHandleForAddressRange") {
            return Ok(Err(
                "the CUDA driver is too old for dma-buf export (cuMemGetHandleForAddressRange needs CUDA 11.7+)".into(),
            ));
        }
        if self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)? == 0 {
            return Ok(Err("CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0: needs an open-source NVIDIA kernel module (or a driver >= 515 on a kernel >= 5.12 that allows it)".into()));
        }
        Ok(Ok(()))
    }

    /// The device address of `offset..offset+len` in `buf`, after checking that `buf` is this
    /// device's CUDA memory (a host backend's buffer passed here would otherwise reach the
    /// driver as a device pointer) and that the range lies inside it; binds the context.
    fn own_range(&self, buf: &DeviceBuffer, offset: u64, len: usize) -> Result<u64> {
        let key = buf.key();
        if key.backend != BackendKind::Cuda || key.device != self.inner.ordinal {
            return Err(Error::InvalidArgument(format!(
                "buffer at {:#x} belongs to {:?} device {}, not CUDA device {}",
                buf.addr(),
                key.backend,
                key.device,
                self.inner.ordinal
            )));
        }
        let at = buf.info().check(offset, len as u64)?;
        self.bind()?;
        Ok(at)
    }

    /// Reads how this device makes NIC writes visible (see [`FlushPlan`]).
    fn flush_plan(&self) -> Result<FlushPlan> {
        let ordering = self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING)?;
        if ordering >= sys::CUGPUDirectRDMAWritesOrdering::CU_GPU_DIRECT_RDMA_WRITES_ORDERING_OWNER as i32 {
            return Ok(FlushPlan::NotNeeded);
        }
        if !has_symbol("cuFlushGPUDirectRDMAWrites") {
            return Ok(FlushPlan::Unsupported(
                "the CUDA driver lacks cuFlushGPUDirectRDMAWrites (needs CUDA 11.3+)".into(),
            ));
        }
        let options =
            self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS)?;
        let host_flush = sys::CUflushGPUDirectRDMAWritesOptions::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_OPTION_HOST as i32;
        if options & host_flush == 0 {
            return Ok(FlushPlan::Unsupported(format!(
                "the device neither orders NIC writes (GPU_DIRECT_RDMA_WRITES_ORDERING = {ordering}) nor supports \
                 cuFlushGPUDirectRDMAWrites (GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS = {options:#x}): GPUDirect RDMA \
                 writes cannot be made visible safely on this device"
            )));
        }
        Ok(FlushPlan::Call)
    }

    /// A new stream for asynchronous copies.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.inner.ctx.new_stream().map_err(cuda_err("cuStreamCreate"))
    }

    /// Starts copying `src` to `dst` at `offset` on `stream`; returns at once.
    ///
    /// # Safety
    /// `src` must stay valid and unchanged, and `dst` allocated, until `stream` has been
    /// synchronized (`stream.synchronize()`).
    pub unsafe fn copy_to_device_async(
        &self,
        dst: &DeviceBuffer,
        offset: u64,
        src: &[u8],
        stream: &CudaStream,
    ) -> Result<()> {
        let at = self.own_range(dst, offset, src.len())?;
        // SAFETY: forwarded from the caller's contract; the range lies in `dst` (checked).
        unsafe { result::memcpy_htod_async(at, src, stream.cu_stream()) }.map_err(cuda_err("cuMemcpyHtoDAsync"))
    }

    /// Starts copying from `src` at `offset` into `dst` on `stream`; returns at once.
    ///
    /// # Safety
    /// `dst` must stay valid and not be read or written, and `src` allocated, until `stream`
    /// has been synchronized.
    pub unsafe fn copy_from_device_async(
        &self,
        src: &DeviceBuffer,
        offset: u64,
        dst: &mut [u8],
        stream: &CudaStream,
    ) -> Result<()> {
        let at = self.own_range(src, offset, dst.len())?;
        // SAFETY: forwarded from the caller's contract; the range lies in `src` (checked).
        unsafe { result::memcpy_dtoh_async(dst, at, stream.cu_stream()) }.map_err(cuda_err("cuMemcpyDtoHAsync"))
    }
}

impl CudaBackend {
    /// Allocates `len` bytes of page-locked host memory (`cuMemHostAlloc`, portable), zeroed:
    /// the fast side of host<->device copies. It is cudarc's own pinned type; registered host
    /// memory for the NIC is `p2pbridge_verbs::HostBuffer` (or any memory, through the bridge).
    pub fn alloc_pinned_host(&self, len: usize) -> Result<PinnedHostSlice<u8>> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot allocate 0 bytes".into()));
        }
        self.bind()?;
        // SAFETY: the context is current; the memory is unset until zeroed just below, before
        // anything reads it.
        let mut p = unsafe { self.inner.ctx.alloc_pinned_with_flags::<u8>(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(cuda_err("cuMemHostAlloc"))?;
        let ptr = p.as_mut_ptr().map_err(cuda_err("cuEventSynchronize"))?;
        // SAFETY: `len` bytes of fresh host memory owned by `p`, written once, nothing else
        // refers to them yet.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(p)
    }
}

// SAFETY: identities are CUDA's buffer ids (never reused within a context); `notifies` is true
// only for allocations this backend made, freed by dropping their `DeviceBuffer`, which
// notifies and waits for every ack before `cuMemFree`; exports are
// `cuMemGetHandleForAddressRange` fds over the range asked for.
unsafe impl MemoryBackend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device(&self) -> u32 {
        self.inner.ordinal
    }

    fn granularity(&self) -> usize {
        GPU_PAGE as usize
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot allocate 0 bytes".into()));
        }
        let size = (len as u64)
            .checked_next_multiple_of(GPU_PAGE)
            .ok_or_else(|| Error::InvalidArgument(format!("{len} bytes is too large")))?;
        self.bind()?;
        // SAFETY: the context is current; the allocation is freed by `release` only.
        let ptr = unsafe { result::malloc_sync(size as usize) }.map_err(cuda_err("cuMemAlloc"))?;
        let one: u32 = 1;
        // SAFETY: SYNC_MEMOPS takes a pointer to an unsigned int; `ptr` is a live allocation.
        let set = unsafe {
            sys::cuPointerSetAttribute(
                (&one as *const u32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
                ptr,
            )
        };
        let info = match set
            .result()
            .map_err(cuda_err("cuPointerSetAttribute(SYNC_MEMOPS)"))
            .and_then(|()| self.identify(ptr))
        {
            Ok(Some(info)) => info,
            Ok(None) => {
                Err(Error::InvalidArgument("cuMemAlloc returned memory cuPointerGetAttributes does not know".into()))
                    .inspect_err(|_| {
                        // SAFETY: ours, freed once on this error path.
                        let _ = unsafe { result::free_sync(ptr) };
                    })?
            }
            Err(e) => {
                // SAFETY: ours, freed once on this error path.
                let _ = unsafe { result::free_sync(ptr) };
                return Err(e);
            }
        };
        self.inner.ours.lock().unwrap_or_else(|e| e.into_inner()).insert(info.base, info.key.id);
        Ok(DeviceBuffer::new(info, self.inner.clone()))
    }

    fn identify(&self, addr: u64) -> Result<Option<AllocationInfo>> {
        self.bind()?;
        let mut mem_type: u32 = 0;
        let mut ordinal: i32 = -1;
        let mut buffer_id: u64 = 0;
        // A boolean the driver writes as an int; 8 zeroed bytes hold either width.
        let mut is_managed: u64 = 0;
        let mut attrs = [
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_BUFFER_ID,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED,
        ];
        let mut data: [*mut libc::c_void; 4] = [
            (&mut mem_type as *mut u32).cast(),
            (&mut ordinal as *mut i32).cast(),
            (&mut buffer_id as *mut u64).cast(),
            (&mut is_managed as *mut u64).cast(),
        ];
        // SAFETY: four attributes with four out-pointers at least as large as what the driver
        // writes (CUmemorytype: 4 bytes, ordinal: int, buffer id: unsigned long long,
        // is-managed: a boolean int).
        let r = unsafe { sys::cuPointerGetAttributes(4, attrs.as_mut_ptr(), data.as_mut_ptr(), addr) };
        if r == sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE {
            return Ok(None); // not a pointer CUDA knows
        }
        r.result().map_err(cuda_err("cuPointerGetAttributes"))?;
        if mem_type == 0 {
            return Ok(None); // memory CUDA did not allocate or register (plain host memory)
        }
        if is_managed != 0 {
            // Managed memory reports DEVICE or HOST wherever its pages happen to be: refuse it
            // rather than let it pass for either.
            return Err(Error::ManagedMemory(addr));
        }
        if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 || ordinal != self.inner.ordinal as i32 {
            return Ok(None);
        }
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: valid out-pointers; `addr` is device memory of this context's device.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) }
            .result()
            .map_err(cuda_err("cuMemGetAddressRange"))?;
        Ok(Some(AllocationInfo {
            key: AllocationKey { backend: BackendKind::Cuda, device: self.inner.ordinal, id: buffer_id },
            base,
            len: size as u64,
        }))
    }

    fn export_dmabuf(&self, addr: u64, len: u64) -> Result<DmaBufExport> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot export 0 bytes".into()));
        }
        if let Err(why) = self.dmabuf_support()? {
            return Err(Error::ExportUnsupported(why));
        }
        let info = self.identify(addr)?.ok_or(Error::UnknownAddress(addr))?;
        let off = addr - info.base;
        info.check(off, len)?;
        let page = rustix::param::page_size() as u64;
        // cuMemGetHandleForAddressRange wants a host-page-aligned address and size.
        let start = off / page * page;
        let end = (off + len).next_multiple_of(page);
        if end > info.len || (info.base % page) != 0 {
            return Err(Error::ExportUnsupported(format!(
                "range {off}+{len} cannot be widened to host pages ({page} B) inside its allocation of {} B at {:#x}",
                info.len, info.base
            )));
        }
        let mut fd: libc::c_int = -1;
        // SAFETY: the handle out-parameter of a DMA_BUF_FD request is an int; the range lies in
        // one live allocation of this device and is page-aligned (checked above).
        unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut libc::c_int).cast(),
                info.base + start,
                (end - start) as usize,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        }
        .result()
        .map_err(cuda_err("cuMemGetHandleForAddressRange"))?;
        // SAFETY: a fresh fd from the driver, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DmaBufExport::new(fd, off - start, len, end - start, info.key, off..off + len, self.inner.hub.clone()))
    }

    unsafe fn copy_to_addr(&self, addr: u64, src: &[u8]) -> Result<()> {
        let info = self.identify(addr)?.ok_or(Error::UnknownAddress(addr))?;
        let at = info.check(addr - info.base, src.len() as u64)?;
        // SAFETY: the range lies in a live allocation of this device (checked), which the
        // caller keeps alive; the copy is synchronous.
        unsafe { result::memcpy_htod_sync(at, src) }.map_err(cuda_err("cuMemcpyHtoD"))
    }

    unsafe fn copy_from_addr(&self, addr: u64, dst: &mut [u8]) -> Result<()> {
        let info = self.identify(addr)?.ok_or(Error::UnknownAddress(addr))?;
        let at = info.check(addr - info.base, dst.len() as u64)?;
        // SAFETY: as above.
        unsafe { result::memcpy_dtoh_sync(dst, at) }.map_err(cuda_err("cuMemcpyDtoH"))
    }

    fn copy_to_device(&self, dst: &DeviceBuffer, offset: u64, src: &[u8]) -> Result<()> {
        // Overridden: the buffer's allocation is known, so no cuPointerGetAttributes per copy.
        let at = self.own_range(dst, offset, src.len())?;
        // SAFETY: `dst` is borrowed (alive through the call) and is this device's memory; the
        // range lies in it (checked); the copy is synchronous.
        unsafe { result::memcpy_htod_sync(at, src) }.map_err(cuda_err("cuMemcpyHtoD"))
    }

    fn copy_from_device(&self, src: &DeviceBuffer, offset: u64, dst: &mut [u8]) -> Result<()> {
        let at = self.own_range(src, offset, dst.len())?;
        // SAFETY: as in copy_to_device.
        unsafe { result::memcpy_dtoh_sync(dst, at) }.map_err(cuda_err("cuMemcpyDtoH"))
    }

    fn flush_nic_writes(&self) -> Result<FlushOutcome> {
        let plan = match self.inner.flush.get() {
            Some(plan) => plan,
            None => {
                let plan = self.flush_plan()?; // an error is not kept: the next flush asks again
                self.inner.flush.get_or_init(|| plan)
            }
        };
        match plan {
            FlushPlan::NotNeeded => {
                return Ok(FlushOutcome::NotNeeded(
                    "GPU_DIRECT_RDMA_WRITES_ORDERING >= OWNER: the device orders NIC writes before its own reads",
                ))
            }
            FlushPlan::Unsupported(why) => return Err(Error::FlushUnsupported(why.clone())),
            FlushPlan::Call => {}
        }
        self.bind()?;
        // SAFETY: no pointers; flushes the current context's pending RDMA writes.
        unsafe {
            sys::cuFlushGPUDirectRDMAWrites(
                sys::CUflushGPUDirectRDMAWritesTarget::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX,
                sys::CUflushGPUDirectRDMAWritesScope::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER,
            )
        }
        .result()
        .map_err(cuda_err("cuFlushGPUDirectRDMAWrites"))?;
        Ok(FlushOutcome::Flushed)
    }

    fn export_budget(&self) -> Option<(u64, String)> {
        self.bar1_bytes().ok()
    }

    fn notices(&self) -> &NoticeHub {
        &self.inner.hub
    }

    fn notifies(&self, info: &AllocationInfo) -> bool {
        // Ours (buffer ids are never reused), freed only through `release`, which keeps it dying
        // until cuMemFree has returned. Memory of other allocators is freed without a notice.
        info.key.backend == BackendKind::Cuda
            && info.key.device == self.inner.ordinal
            && self.inner.ours.lock().unwrap_or_else(|e| e.into_inner()).get(&info.base) == Some(&info.key.id)
    }
}

impl Release for CudaInner {
    fn release(&self, info: &AllocationInfo) -> Result<()> {
        // The pointer identifies as this allocation until cuMemFree returns: it stays dying
        // (`NoticeHub::is_dying`) until then, so that a registration racing the free sees either
        // the notice or the free, never neither (see `MemoryBackend::notifies`).
        let (_, freed) = self.hub.invalidate_then(info.key, 0..info.len, InvalidationReason::Free, || {
            if self.ours.lock().unwrap_or_else(|e| e.into_inner()).remove(&info.base).is_none() {
                return Ok(());
            }
            self.ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))?;
            // SAFETY: our allocation (it was in `ours`), freed once.
            unsafe { result::free_sync(info.base) }.map_err(cuda_err("cuMemFree"))
        });
        freed
    }
}
