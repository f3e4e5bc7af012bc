//! Access rights of memory regions and windows.

use bitflags::bitflags;

use crate::sys;

bitflags! {
    /// Access rights of a memory region (`enum ibv_access_flags`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct AccessFlags: u32 {
        /// The local NIC may write (RDMA READ and RECV targets). Needed by the REMOTE_WRITE
        /// and REMOTE_ATOMIC rights.
        const LOCAL_WRITE = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        /// Peers may RDMA WRITE into the region.
        const REMOTE_WRITE = sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        /// Peers may RDMA READ from the region.
        const REMOTE_READ = sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        /// Peers may run atomics on the region.
        const REMOTE_ATOMIC = sys::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0;
        /// Memory windows may be bound over the region (`IBV_ACCESS_MW_BIND`): peers then reach
        /// it through a window's rkey ([`MemoryWindow`](crate::MemoryWindow)), which can be
        /// revoked on its own.
        const MW_BIND = sys::ibv_access_flags::IBV_ACCESS_MW_BIND.0;
        /// On-Demand Paging: pages are faulted in by the NIC, not pinned.
        const ON_DEMAND = sys::ibv_access_flags::IBV_ACCESS_ON_DEMAND.0;
        /// PCIe relaxed ordering, where the device and platform allow it (an optional flag:
        /// ignored where unsupported).
        const RELAXED_ORDERING = sys::ibv_access_flags::IBV_ACCESS_RELAXED_ORDERING.0;
    }
}

impl AccessFlags {
    /// Every right a peer can be given: REMOTE_READ | REMOTE_WRITE | REMOTE_ATOMIC.
    pub const REMOTE_ANY: AccessFlags =
        AccessFlags::REMOTE_READ.union(AccessFlags::REMOTE_WRITE).union(AccessFlags::REMOTE_ATOMIC);

    /// LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ: what a buffer that peers read and write needs.
    pub fn remote_rw() -> Self {
        AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_rdma_cores() {
        // The values of rdma-core's verbs.h, which the flags take from the bindings.
        assert_eq!(AccessFlags::LOCAL_WRITE.bits(), 1);
        assert_eq!(AccessFlags::REMOTE_WRITE.bits(), 2);
        assert_eq!(AccessFlags::REMOTE_READ.bits(), 4);
        assert_eq!(AccessFlags::REMOTE_ATOMIC.bits(), 8);
        assert_eq!(AccessFlags::MW_BIND.bits(), 16);
        assert_eq!(AccessFlags::ON_DEMAND.bits(), 64);
        assert_eq!(AccessFlags::RELAXED_ORDERING.bits(), 1 << 20);
    }
}
