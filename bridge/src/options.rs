//! The bridge's options.

use std::time::Duration;

use crate::cache::CachePolicy;
use crate::strategy::Policy;

/// Options of a [`Bridge`](crate::Bridge).
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Which strategies may be used.
    pub policy: Policy,
    /// Cache limits.
    pub cache: CachePolicy,
    /// How long an operation waits for its completion before the bridge moves the connection's
    /// queue pair to the error state, reaps the flushed request, and returns
    /// [`Error::CompletionTimeout`](crate::Error::CompletionTimeout). It never returns while the NIC may still use the buffer.
    pub completion_timeout: Duration,
    /// Watch registered host memory with the userfaultfd monitor, so that `munmap`, `mremap`
    /// and `MADV_DONTNEED` revoke its registrations by themselves.
    pub monitor_host: bool,
    /// Hand out memory-window keys where the device has type 2 windows (one window per
    /// hand-out, over exactly its range, bound to the peer's queue pair). Off: each key is a
    /// region of its own over exactly its range with exactly its rights, usable over any
    /// connection (a dma-buf registration's own rkey, handed out whole only).
    pub windows: bool,
    /// The shape of the bounce engine that transfers of bounce registrations run through
    /// (chunk size, chunks in flight); its timeout is `completion_timeout`.
    pub bounce: crate::bounce::BounceConfig,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            policy: Policy::default(),
            cache: CachePolicy::default(),
            completion_timeout: Duration::from_secs(30),
            monitor_host: true,
            windows: true,
            bounce: crate::bounce::BounceConfig::default(),
        }
    }
}
