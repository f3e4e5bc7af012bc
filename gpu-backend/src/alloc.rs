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

/// The size of BAR `bar` in the text of a PCI device's sysfs `resource` file (one
/// "start end flags" line per BAR, hexadecimal; an unused BAR is all zeros).
pub fn pci_bar_size(resource: &str, bar: usize) -> Option<u64> {
    let line = resource.lines().nth(bar)?;
    let mut f = line.split_whitespace().map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok());
    let (start, end) = (f.next()??, f.next()??);
    (end > start).then(|| end - start + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizes_come_from_the_sysfs_resource_lines() {
        // An H100-like layout: BAR0 16 MiB, BAR1 128 GiB (64-bit, so line 2 is empty), BAR3 32 MiB.
        let text = "0x00000000e0000000 0x00000000e0ffffff 0x0000000000040200\n\
                    0x0000200000000000 0x0000201fffffffff 0x000000000014220c\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000202000000000 0x0000202001ffffff 0x000000000014220c\n";
        assert_eq!(pci_bar_size(text, 0), Some(16 << 20));
        assert_eq!(pci_bar_size(text, 1), Some(128 << 30));
        assert_eq!(pci_bar_size(text, 2), None);
        assert_eq!(pci_bar_size(text, 3), Some(32 << 20));
        assert_eq!(pci_bar_size(text, 9), None);
        assert_eq!(pci_bar_size("garbage", 0), None);
    }

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
