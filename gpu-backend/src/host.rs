//! The host backend: real host memory from `memfd_create` + `mmap(MAP_SHARED)`, exported as a
//! dma-buf through `/dev/udmabuf` where the kernel has it.
//!
//! This is what CPU-only nodes use, not a test double: its buffers are ordinary mapped memory
//! that a NIC can register (pinned, ODP, or — through udmabuf — as a dma-buf), and its
//! invalidation notices fire on free exactly as the CUDA backend's do.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use vm_memory::VolatileSlice;

use crate::alloc::{AllocationInfo, AllocationKey, BackendKind};
use crate::backend::{DeviceBuffer, DmaBufExport, FlushOutcome, MemoryBackend, Release};
use crate::error::{Error, Result};
use crate::notice::{InvalidationReason, NoticeHub};

/// Allocation ids of host memory: unique for the life of the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct HostAlloc {
    info: AllocationInfo,
    memfd: OwnedFd,
}

struct HostInner {
    hub: NoticeHub,
    allocs: RwLock<BTreeMap<u64, HostAlloc>>,
}

/// Host memory backed by memfds. Cheap to clone (a handle).
///
/// ```
/// use p2pbridge_gpu::{HostBackend, MemoryBackend};
/// let host = HostBackend::new();
/// let buf = host.alloc(10_000)?;
/// host.copy_to_device(&buf, 0, b"hello")?;
/// let inside = host.identify(buf.addr() + 3)?.expect("our memory");
/// assert_eq!(inside.key, buf.key());
/// # Ok::<(), p2pbridge_gpu::Error>(())
/// ```
#[derive(Clone)]
pub struct HostBackend {
    inner: Arc<HostInner>,
}

impl std::fmt::Debug for HostBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBackend").field("allocations", &self.read().len()).finish()
    }
}

impl Default for HostBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// `struct udmabuf_create` from <linux/udmabuf.h>.
#[repr(C)]
struct UdmabufCreate {
    memfd: u32,
    flags: u32,
    offset: u64,
    size: u64,
}
/// `_IOW('u', 0x42, struct udmabuf_create)`.
const UDMABUF_CREATE: libc::c_ulong = 0x4018_7542;
const UDMABUF_FLAGS_CLOEXEC: u32 = 0x01;

fn page() -> u64 {
    rustix::param::page_size() as u64
}

impl HostBackend {
    /// A host backend with no allocations yet.
    pub fn new() -> Self {
        HostBackend { inner: Arc::new(HostInner { hub: NoticeHub::default(), allocs: RwLock::new(BTreeMap::new()) }) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, HostAlloc>> {
        self.inner.allocs.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `/dev/udmabuf` can be opened here, and if not, why.
    pub fn udmabuf_support() -> std::result::Result<(), String> {
        open_udmabuf().map(drop).map_err(|e| e.to_string())
    }

    /// The bytes of a host buffer (host memory is CPU-addressable), as memory that others write
    /// concurrently: a NIC or a peer may change them at any moment while the buffer is
    /// registered, so they are never handed out as `&[u8]` (see `docs/decisions.md`,
    /// "Peer-writable memory"). Copy them out with `copy_to`, or read single values with
    /// volatile or atomic loads.
    pub fn bytes<'b>(&self, buf: &'b DeviceBuffer) -> Result<VolatileSlice<'b>> {
        if self.read().get(&buf.addr()).is_none_or(|a| a.info.key != buf.key()) {
            return Err(Error::UnknownAddress(buf.addr()));
        }
        // SAFETY: the mapping is `len` bytes at `addr` and stays mapped while `buf` (borrowed
        // for 'b) lives; the view touches it by volatile or byte copies only, never through
        // Rust references, so concurrent writers break no reference's promise.
        Ok(unsafe { VolatileSlice::new(buf.addr() as *mut u8, buf.len() as usize) })
    }

    /// Copies a host buffer's bytes out (see [`bytes`](Self::bytes)).
    pub fn to_vec(&self, buf: &DeviceBuffer) -> Result<Vec<u8>> {
        let mut v = vec![0u8; buf.len() as usize];
        self.bytes(buf)?.copy_to(&mut v[..]);
        Ok(v)
    }
}

impl HostBackend {
    /// Checks that `addr..addr+len` lies in one live allocation and returns `addr`.
    fn live_range(&self, addr: u64, len: u64) -> Result<u64> {
        let info = self.identify(addr)?.ok_or(Error::UnknownAddress(addr))?;
        info.check(addr - info.base, len)
    }
}

fn open_udmabuf() -> Result<OwnedFd> {
    match rustix::fs::open(
        "/dev/udmabuf",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => Ok(fd),
        Err(e) if e == rustix::io::Errno::NOENT => Err(Error::ExportUnsupported(
            "udmabuf not available: /dev/udmabuf is missing (the kernel needs CONFIG_UDMABUF; try `modprobe udmabuf`)"
                .into(),
        )),
        Err(e) if e == rustix::io::Errno::ACCESS || e == rustix::io::Errno::PERM => Err(Error::ExportUnsupported(
            format!("udmabuf not available: cannot open /dev/udmabuf ({e}); it is root-only by default"),
        )),
        Err(e) => Err(Error::os("open(/dev/udmabuf)", e)),
    }
}

// SAFETY: identities are a process-wide counter, never reused; every allocation is made here
// and freed only by dropping its `DeviceBuffer`, which notifies and waits for every ack before
// the memfd mapping goes; exports are udmabuf fds over the sealed memfd's pages.
unsafe impl MemoryBackend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn device(&self) -> u32 {
        0
    }

    fn granularity(&self) -> usize {
        page() as usize
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot allocate 0 bytes".into()));
        }
        let size = (len as u64)
            .checked_next_multiple_of(page())
            .ok_or_else(|| Error::InvalidArgument(format!("{len} bytes is too large")))?;
        let memfd = rustix::fs::memfd_create("p2pbridge-host", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| Error::os("memfd_create", e))?;
        rustix::fs::ftruncate(&memfd, size).map_err(|e| Error::os("ftruncate(memfd)", e))?;
        // udmabuf requires F_SEAL_SHRINK (and refuses F_SEAL_WRITE): the pages it hands to a
        // device cannot be truncated away.
        rustix::fs::fcntl_add_seals(&memfd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| Error::os("fcntl(F_ADD_SEALS)", e))?;
        // SAFETY: a new shared mapping of a memfd nobody else has; it aliases nothing.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                size as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &memfd,
                0,
            )
        }
        .map_err(|e| Error::os("mmap(memfd)", e))?;
        let info = AllocationInfo {
            key: AllocationKey { backend: BackendKind::Host, device: 0, id: NEXT_ID.fetch_add(1, Ordering::Relaxed) },
            base: p as u64,
            len: size,
        };
        self.inner.allocs.write().unwrap_or_else(|e| e.into_inner()).insert(info.base, HostAlloc { info, memfd });
        Ok(DeviceBuffer::new(info, self.inner.clone()))
    }

    fn identify(&self, addr: u64) -> Result<Option<AllocationInfo>> {
        Ok(self.read().range(..=addr).next_back().map(|(_, a)| a.info).filter(|i| i.contains(addr)))
    }

    fn export_dmabuf(&self, addr: u64, len: u64) -> Result<DmaBufExport> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot export 0 bytes".into()));
        }
        let allocs = self.read();
        let a = allocs
            .range(..=addr)
            .next_back()
            .map(|(_, a)| a)
            .filter(|a| a.info.contains(addr))
            .ok_or(Error::UnknownAddress(addr))?;
        let off = addr - a.info.base;
        a.info.check(off, len)?;
        // udmabuf takes whole pages: widen the range outwards (allocations are whole pages).
        let start = off / page() * page();
        let end = (off + len).next_multiple_of(page());
        let dev = open_udmabuf()?;
        let mut req = UdmabufCreate {
            memfd: a.memfd.as_raw_fd() as u32,
            flags: UDMABUF_FLAGS_CLOEXEC,
            offset: start,
            size: end - start,
        };
        // SAFETY: UDMABUF_CREATE reads one struct udmabuf_create, which `req` is, and returns a
        // new fd (or -1 with errno); the memfd is sealed against shrinking as udmabuf requires.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE, &mut req as *mut UdmabufCreate) };
        if fd < 0 {
            return Err(Error::os("ioctl(UDMABUF_CREATE)", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd from the ioctl, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DmaBufExport::new(fd, off - start, len, end - start, a.info.key, off..off + len, self.inner.hub.clone()))
    }

    unsafe fn copy_to_addr(&self, addr: u64, src: &[u8]) -> Result<()> {
        let at = self.live_range(addr, src.len() as u64)?;
        // SAFETY: `at..at+len` lies in a live mapping of ours (checked), which the caller keeps
        // alive for the call; the mapping is shared with the NIC and with other views, so it is
        // written through a volatile view, never a `&mut [u8]`.
        unsafe { VolatileSlice::new(at as *mut u8, src.len()) }.copy_from(src);
        Ok(())
    }

    unsafe fn copy_from_addr(&self, addr: u64, dst: &mut [u8]) -> Result<()> {
        let at = self.live_range(addr, dst.len() as u64)?;
        // SAFETY: as above, reading.
        unsafe { VolatileSlice::new(at as *mut u8, dst.len()) }.copy_to(dst);
        Ok(())
    }

    fn flush_nic_writes(&self) -> Result<FlushOutcome> {
        Ok(FlushOutcome::NotNeeded(
            "host memory is cache-coherent with PCIe DMA; a completion already orders the NIC's writes",
        ))
    }

    fn notices(&self) -> &NoticeHub {
        &self.inner.hub
    }

    fn notifies(&self, info: &AllocationInfo) -> bool {
        // Every allocation it identifies is its own, and `release` takes it out of the table
        // (so it no longer identifies) before the notices go out.
        self.read().get(&info.base).is_some_and(|a| a.info.key == info.key)
    }
}

impl Release for HostInner {
    fn release(&self, info: &AllocationInfo) -> Result<()> {
        // Out of the table first, so that `identify` no longer finds an allocation whose
        // subscribers are being told it goes (a registration racing the free then fails its
        // re-identification instead of registering dying memory); then the subscribers, while
        // the memory is still mapped.
        let a = self.allocs.write().unwrap_or_else(|e| e.into_inner()).remove(&info.base);
        self.hub.invalidate(info.key, 0..info.len, InvalidationReason::Free);
        // SAFETY: the mapping was made by `alloc` with this base and length and is unmapped
        // once (it is no longer in the table).
        unsafe { rustix::mm::munmap(info.base as *mut libc::c_void, info.len as usize) }
            .map_err(|e| Error::os("munmap", e))?;
        drop(a); // closes the memfd; pages held by a udmabuf stay until it is closed too
        Ok(())
    }
}
