//! Memory that may be handed to a NIC: what a [`MemoryRegion`](crate::MemoryRegion) can own.

use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Memory whose address stays put while the value lives, so a NIC may be given it.
///
/// # Safety
/// Implementors promise that `as_ptr()` and `len()` describe one allocation that stays valid
/// for reads and writes *through that raw pointer*, at the same address, for as long as the
/// value lives — moving the value must not move the memory — and that nothing but the value
/// itself frees it. The memory must not be owned through Rust references or smart pointers
/// that promise it does not change behind them (a `Vec<u8>` or `Box<[u8]>` does: its pointer
/// from `&self` is read-only, and the NIC writes): registered memory is written by the NIC
/// and read through volatile views ([`MemoryRegion::bytes`](crate::MemoryRegion::bytes)). A
/// memory region keeps the value (and so the memory) until it has been deregistered.
pub unsafe trait RegisterableBuffer {
    /// Start of the memory, valid for reads and writes through raw pointers.
    fn as_ptr(&self) -> *mut u8;
    /// Its length in bytes.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Page-aligned, zeroed anonymous host memory (`mmap`), unmapped on drop.
///
/// Page alignment matters for ODP and for sharing pages with other devices; the mapping is
/// private and not pinned until registered.
///
/// ```
/// let mut b = p2pbridge_verbs::HostBuffer::new(8192)?;
/// b.as_mut_slice()[0] = 7;
/// assert_eq!(b.as_slice()[0], 7);
/// # Ok::<(), p2pbridge_verbs::Error>(())
/// ```
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
}

// SAFETY: the mapping is owned by this value alone; it is plain memory.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only reads through `as_slice`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Maps `len` bytes (rounded up to whole pages), zeroed.
    pub fn new(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidArgument("a HostBuffer cannot be empty".into()));
        }
        let page = rustix::param::page_size();
        let map_len = len
            .checked_add(page - 1)
            .map(|l| l & !(page - 1))
            .ok_or_else(|| Error::InvalidArgument(format!("buffer of {len} bytes is too large")))?;
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                map_len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|e| crate::result::verb_error("mmap", e.raw_os_error()))?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| crate::result::verb_error("mmap", libc::ENOMEM))?;
        Ok(HostBuffer { ptr, len, map_len })
    }

    /// The memory as a slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes, live while `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The memory as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: this mapping was made by `new` and is unmapped once.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

// SAFETY: the mapping stays at its address until the HostBuffer is dropped, and the pointer is
// the mmap's own (not derived from a reference), valid for reads and writes.
unsafe impl RegisterableBuffer for HostBuffer {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_buffer_is_page_aligned_zeroed_and_writable() {
        let mut b = HostBuffer::new(10_000).unwrap();
        assert_eq!(b.as_ptr() as usize % rustix::param::page_size(), 0);
        assert_eq!(b.len(), 10_000);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 0xab;
        assert_eq!(b.as_slice()[9_999], 0xab);
    }

    #[test]
    fn empty_host_buffer_is_refused() {
        assert!(matches!(HostBuffer::new(0), Err(Error::InvalidArgument(_))));
    }
}
