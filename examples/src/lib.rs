//! Helpers shared by the examples.

use std::sync::Arc;

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
