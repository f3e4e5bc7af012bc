//! Invalidation the caller asks for: host memory going, any range, or a free the bridge was not
//! told about. (Frees it is told about revoke through the backends' notices, unmaps through the
//! monitor: see `bridge.rs` and `uffd.rs`.)

use crate::bridge::Bridge;
use crate::cache::Domain;
use crate::error::{Error, Result};
use crate::register::{allocations_over, check_range};
use p2pbridge_gpu::AllocationKey;

impl Bridge {
    /// Host memory, `len` bytes at `addr`, is going away: revokes what covers it (keys refused
    /// by the NIC, regions deregistered, handles dead), after in-flight operations on it finish.
    /// Returns how many registrations were revoked.
    ///
    /// It waits for every `Transfer`, `Receives` and `LocalGuard` holding those registrations:
    /// called by their holder, it waits for itself, for ever. (So do [`invalidate`](Self::invalidate)
    /// and [`report_free`](Self::report_free), and dropping the last clone of the bridge.)
    pub fn invalidate_host(&self, addr: u64, len: u64) -> Result<usize> {
        let end = addr
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument(format!("{len} bytes at {addr:#x} wrap around the address space")))?;
        let (n, r) = self.inner.core.invalidate(Domain::HostVa, addr..end);
        r.map(|()| n)
    }

    /// Revokes every registration over `len` bytes at `addr` — of host memory, and of any
    /// backend allocation recorded there — whether the memory goes or not: keys over it are
    /// refused by the NIC, handles turn dead, and the next registration is made anew. Returns
    /// how many were revoked.
    pub fn invalidate(&self, addr: u64, len: u64) -> Result<usize> {
        let end = check_range(addr, len)?;
        let keys: Vec<AllocationKey> = {
            let allocs = self.inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
            allocations_over(&allocs, addr..end).map(|(_, k)| k).collect()
        };
        let (mut n, mut r) = self.inner.core.invalidate(Domain::HostVa, addr..end);
        for k in keys {
            let (m, rk) = self.inner.core.invalidate(Domain::Alloc(k), 0..u64::MAX);
            n += m;
            // (`Leaked` where a leaked region that follows this memory still reaches it.)
            r = r.and(rk);
        }
        r.map(|()| n)
    }

    /// An allocator freed `len` bytes at `addr` without the bridge being told (PyTorch's caching
    /// allocator calling `cudaFree`, another library's `munmap`): revokes every registration
    /// over it ([`Bridge::invalidate`]) and forgets the allocations recorded there. Call it
    /// before the memory is reused. Returns how many registrations were revoked.
    pub fn report_free(&self, addr: u64, len: u64) -> Result<usize> {
        let n = self.invalidate(addr, len)?;
        let mut allocs = self.inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u64> = allocations_over(&allocs, addr..addr + len).map(|(b, _)| b).collect();
        for b in gone {
            allocs.remove(&b);
        }
        Ok(n)
    }
}
