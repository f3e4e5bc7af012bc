//! What a peer needs to reach a registered region ([`RemoteBuf`]), its wire format, and
//! checked parts of it for work requests ([`RemoteSlice`]).

use std::ops::RangeBounds;

use crate::error::{Error, Result};
use crate::mr::resolve_range;

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
}
