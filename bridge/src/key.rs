//! Remote keys: what a peer needs to reach a registration, and which registration it was.

use p2pbridge_verbs::RemoteSlice;

use crate::error::{Error, Result};

/// A descriptor of a registered range for a peer: address, length, rkey and the
/// registration's generation. A registration that is invalidated (memory freed or remapped)
/// is gone with its rkey — the NIC refuses the old key — and a new registration of the same
/// memory has a new generation, so the bridge refuses the old descriptor too
/// ([`Bridge::check_key`](crate::Bridge::check_key)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RemoteKey {
    /// Address to use in work requests.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The rkey.
    pub rkey: u32,
    /// The registration's generation.
    pub generation: u64,
}

impl RemoteKey {
    /// Encoded size: magic (4), addr (8), len (8), rkey (4), generation (8).
    pub const WIRE_LEN: usize = 32;
    const MAGIC: [u8; 4] = *b"P2K1";

    /// Little-endian encoding, for rdma_cm private data or any other channel.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[0..4].copy_from_slice(&Self::MAGIC);
        b[4..12].copy_from_slice(&self.addr.to_le_bytes());
        b[12..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.rkey.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    /// Decodes [`to_bytes`](Self::to_bytes)'s output (trailing bytes are ignored).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < Self::WIRE_LEN || b[0..4] != Self::MAGIC {
            return Err(Error::InvalidArgument(format!("not a p2pbridge remote key ({} bytes)", b.len())));
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(RemoteKey {
            addr: u(4),
            len: u(12),
            rkey: u32::from_le_bytes(b[20..24].try_into().unwrap_or([0; 4])),
            generation: u(24),
        })
    }

    /// The part `offset..offset+len` of the key, bounds-checked, for a work request.
    pub fn slice(&self, offset: u64, len: u64) -> Result<RemoteSlice> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(RemoteSlice {
                addr: self.addr + offset,
                len: u32::try_from(len)
                    .map_err(|_| Error::InvalidArgument("a work request moves at most 4 GiB - 1".into()))?,
                rkey: self.rkey,
            }),
            _ => Err(Error::OutOfBounds { offset, len, size: self.len }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_slices_are_checked() {
        let k = RemoteKey { addr: 0x1000, len: 100, rkey: 9, generation: 42 };
        let mut w = k.to_bytes().to_vec();
        w.extend([0u8; 8]);
        assert_eq!(RemoteKey::from_bytes(&w).unwrap(), k);
        assert!(RemoteKey::from_bytes(&w[..20]).is_err());
        assert_eq!(k.slice(10, 90).unwrap().addr, 0x100a);
        assert!(k.slice(10, 91).is_err());
        assert!(k.slice(u64::MAX, 1).is_err());
    }
}
