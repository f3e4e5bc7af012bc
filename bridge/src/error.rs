//! The crate's one error type.

use crate::strategy::{SkipReason, Strategy};

/// What went wrong in the bridge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An RDMA verb failed.
    #[error(transparent)]
    Verbs(#[from] p2pbridge_verbs::Error),
    /// A memory backend failed.
    #[error(transparent)]
    Gpu(#[from] p2pbridge_gpu::Error),
    /// No strategy could register the memory; each one's reason.
    #[error("no registration strategy works for this memory: {}", describe(.0))]
    NoStrategy(Vec<(Strategy, SkipReason)>),
    /// The address is not memory of any of the bridge's backends.
    #[error("address {0:#x} belongs to none of the bridge's backends (for plain host memory use register_host)")]
    NotBackendMemory(u64),
    /// A descriptor whose registration is gone.
    #[error("stale remote key (generation {generation}): {why}")]
    StaleKey {
        /// The key's generation.
        generation: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// Registrations still in use when an invalidation stopped waiting.
    #[error("invalidation timed out with {0} registrations still in use (they are released when that work ends)")]
    InvalidationTimedOut(usize),
    /// The cache is full of registrations in use.
    #[error(transparent)]
    CacheFull(#[from] crate::cache::CacheFull),
    /// A range outside what it indexes.
    #[error("range {offset}+{len} is out of bounds of {size} bytes")]
    OutOfBounds {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        len: u64,
        /// The size indexed.
        size: u64,
    },
    /// The host-memory monitor (userfaultfd) cannot run or watch a range.
    #[error("host memory monitor: {0}")]
    Monitor(String),
    /// A bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn describe(v: &[(Strategy, SkipReason)]) -> String {
    v.iter().map(|(s, r)| format!("{s}: {r}")).collect::<Vec<_>>().join("; ")
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
