//! Remote keys: what a peer needs to reach a registration, and which registration it was.

use p2pbridge_verbs::{RemoteBuf, RemoteSlice};

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
    /// Encoded size: a [`RemoteBuf`] (so verbs-level peers can read it) and the generation.
    pub const WIRE_LEN: usize = RemoteBuf::WIRE_LEN + 8;

    /// The address, length and rkey, as `p2pbridge-verbs` knows them.
    pub fn buf(&self) -> RemoteBuf {
        RemoteBuf { addr: self.addr, len: self.len, rkey: self.rkey }
    }

    /// Little-endian encoding, for rdma_cm private data or any other channel.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[..RemoteBuf::WIRE_LEN].copy_from_slice(&self.buf().to_bytes());
        b[RemoteBuf::WIRE_LEN..].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    /// Decodes [`to_bytes`](Self::to_bytes)'s output (trailing bytes are ignored).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let buf = RemoteBuf::from_bytes(b)?;
        let gen = b
            .get(RemoteBuf::WIRE_LEN..Self::WIRE_LEN)
            .and_then(|g| g.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| Error::InvalidArgument(format!("not a p2pbridge remote key ({} bytes)", b.len())))?;
        Ok(RemoteKey { addr: buf.addr, len: buf.len, rkey: buf.rkey, generation: gen })
    }

    /// The part `offset..offset+len` of the key, bounds-checked, for a work request.
    pub fn slice(&self, offset: u64, len: u64) -> Result<RemoteSlice> {
        let end = offset.checked_add(len).ok_or(Error::OutOfBounds { offset, len, size: self.len })?;
        Ok(self.buf().slice(offset..end)?)
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
        assert_eq!(RemoteBuf::from_bytes(&w).unwrap(), k.buf(), "a verbs peer reads the same buffer");
        assert!(RemoteKey::from_bytes(&w[..28]).is_err());
        assert_eq!(k.slice(10, 90).unwrap().addr, 0x100a);
        assert!(k.slice(10, 91).is_err());
        assert!(k.slice(u64::MAX, 1).is_err());
    }
}
