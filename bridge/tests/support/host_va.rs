//! Plain host memory for the monitor's tests: fresh mappings, replaced and read without Rust
//! references (a peer may write them).
#![allow(dead_code)] // each test binary uses its own part

use rustix::mm::{MapFlags, ProtFlags};

/// `len` bytes of fresh private anonymous memory, never touched; at `at` (replacing what is
/// there) where given.
pub fn map(at: Option<u64>, len: usize) -> u64 {
    let (addr, flags) = match at {
        Some(a) => (a as *mut std::ffi::c_void, MapFlags::PRIVATE | MapFlags::FIXED),
        None => (std::ptr::null_mut(), MapFlags::PRIVATE),
    };
    // SAFETY: a private anonymous mapping; at a fixed address only where the test owns it.
    let p = unsafe { rustix::mm::mmap_anonymous(addr, len, ProtFlags::READ | ProtFlags::WRITE, flags) }.unwrap() as u64;
    if let Some(a) = at {
        assert_eq!(p, a);
    }
    p
}

/// Fills the test's own mapping at `p` with `byte`.
pub fn fill(p: u64, len: usize, byte: u8) {
    // SAFETY: the test's live mapping.
    unsafe { std::ptr::write_bytes(p as *mut u8, byte, len) };
}

/// Host memory at `p`, copied out (never referenced: a peer may write it).
pub fn bytes(p: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the test's live mapping; copied, not referenced.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, v.as_mut_ptr(), len) };
    v
}

/// Unmaps the test's own mapping.
pub fn unmap(p: u64, len: usize) {
    // SAFETY: the test's own mapping, no longer used.
    unsafe { rustix::mm::munmap(p as *mut _, len) }.unwrap();
}
