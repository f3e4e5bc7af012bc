//! Helpers shared by the examples.

use std::sync::Arc;

use p2pbridge::verbs::ProtectionDomain;
use p2pbridge::{Bridge, BridgeOptions};
use p2pbridge_gpu::{CudaBackend, HostBackend, MemoryBackend};

/// The memory the examples move: CUDA device 0 where there is one, else host memory (the
/// host backend), and a line saying which and why.
pub fn pick_backend() -> (Arc<dyn MemoryBackend>, String) {
    match CudaBackend::new(0) {
        Ok(g) => (Arc::new(g), "CUDA device 0".to_string()),
        Err(e) => (Arc::new(HostBackend::new()), format!("host memory (no GPU: {e})")),
    }
}

/// A reproducible byte pattern for block or buffer `seed`.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9E37_79B9)).to_le_bytes()[1]).collect()
}

/// One side of an example: the backend ([`pick_backend`]), a bridge on `pd` that knows it, and
/// the line saying which memory it is. Errors come as verbs errors, which is what
/// `SoftRoce::connect_pair`'s set-up closures return.
pub fn bridged(pd: &ProtectionDomain) -> p2pbridge::verbs::Result<(Arc<dyn MemoryBackend>, Bridge, String)> {
    let (mem, what) = pick_backend();
    let bridge = Bridge::new(pd, vec![mem.clone()], BridgeOptions::default()).map_err(verbs_err)?;
    Ok((mem, bridge, what))
}

/// Any error as a verbs error (for `connect_pair`'s set-up closures).
pub fn verbs_err(e: impl std::fmt::Display) -> p2pbridge::verbs::Error {
    p2pbridge::verbs::Error::InvalidArgument(e.to_string())
}
