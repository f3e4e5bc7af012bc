//! What identifies an allocation, and what a backend knows of one.

use std::fmt;

/// Which backend owns memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    /// Host memory (memfd), this crate's host backend.
    Host,
    /// NVIDIA CUDA device memory.
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Host => "host",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// The identity of one allocation: (backend, device, allocation id). Never an address alone:
/// addresses are reused after a free, ids are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationKey {
    /// The backend.
    pub backend: BackendKind,
    /// The device ordinal (0 for host memory).
    pub device: u32,
    /// Unique for the life of the process (CUDA: `CU_POINTER_ATTRIBUTE_BUFFER_ID`; host: a
    /// counter).
    pub id: u64,
}

/// One allocation as its backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationInfo {
    /// Its identity.
    pub key: AllocationKey,
    /// Start address (device VA for device memory).
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl AllocationInfo {
    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }

    /// Checks that `offset..offset+len` lies inside and returns the absolute start address.
    pub fn check(&self, offset: u64, len: u64) -> crate::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.base + offset),
            _ => Err(crate::Error::OutOfBounds { offset, len, size: self.len }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_containment() {
        let a = AllocationInfo {
            key: AllocationKey { backend: BackendKind::Host, device: 0, id: 1 },
            base: 4096,
            len: 100,
        };
        assert!(a.contains(4096) && a.contains(4195) && !a.contains(4196) && !a.contains(4095));
        assert_eq!(a.check(10, 90).unwrap(), 4106);
        assert!(a.check(10, 91).is_err());
        assert!(a.check(u64::MAX, 2).is_err());
    }
}
