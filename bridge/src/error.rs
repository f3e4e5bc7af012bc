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
    /// Registering would pass a memory budget even after evicting every unused registration,
    /// and the policy allows no strategy that stays within it.
    #[error("{limit} (budget: {source_of_limit}); {fix}")]
    OverBudget {
        /// The limit broken, and how full it is.
        limit: String,
        /// Where the budget comes from.
        source_of_limit: String,
        /// How to raise it.
        fix: String,
        /// Every strategy's reason.
        skipped: Vec<(Strategy, SkipReason)>,
    },
    /// The address is not memory of any of the bridge's backends.
    #[error("address {0:#x} belongs to none of the bridge's backends (for plain host memory use register_host)")]
    NotBackendMemory(u64),
    /// The memory's backend does not announce its free (memory of another allocator, such as
    /// PyTorch's caching allocator): [`Bridge::register`](crate::Bridge::register) refuses it.
    #[error("the allocation at {addr:#x} is freed without a notice the bridge can wait for (another allocator's memory): register it with the unsafe register_foreign, and call report_free before it is freed or reused")]
    NotAnnounced {
        /// The address asked for.
        addr: u64,
    },
    /// [`Transfer::wait`](crate::Transfer::wait) of a transfer whose error an earlier
    /// [`Transfer::poll`](crate::Transfer::poll) returned: not every descriptor is done.
    #[error("the transfer failed (an earlier poll returned its error): descriptor {index} is {status:?}")]
    TransferFailed {
        /// The first descriptor not done.
        index: usize,
        /// Its status.
        status: crate::transfer::Status,
    },
    /// A staging copy found other memory at the registration's address than the allocation
    /// registered: it was freed (and its addresses reused) without `report_free`.
    #[error("the memory at {addr:#x} is no longer the allocation that was registered (freed without report_free?): nothing was copied")]
    NotTheRegisteredMemory {
        /// The address of the copy.
        addr: u64,
    },
    /// A descriptor whose registration is gone.
    #[error("stale remote key (generation {generation}): {why}")]
    StaleKey {
        /// The key's generation.
        generation: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// The registration was revoked: its memory was freed, unmapped or invalidated, so its
    /// handles are dead and its keys are refused by the NIC.
    #[error("the registration was revoked (its memory was freed, unmapped or invalidated): register the memory anew")]
    Revoked,
    /// The NIC may still use a registration's region, so it was leaked (kept registered for
    /// ever) rather than deregistered, and the region follows its memory (ODP, dma-buf, peer
    /// memory): that memory's free is held back. See [`crate::leaked_registrations`].
    #[error(
        "the registration's memory region is leaked, never deregistered ({why}); the free of its memory is held back"
    )]
    Leaked {
        /// Why the NIC may still use the region.
        why: &'static str,
    },
    /// A work request's completion did not come in time: the queue pair was moved to the error
    /// state and the request flushed, so the NIC no longer touches its buffers.
    #[error("no completion for {what} within {timeout:?}: the queue pair was moved to the error state and the request flushed (is the peer alive? raise BridgeOptions::completion_timeout for slow links)")]
    CompletionTimeout {
        /// The operation.
        what: &'static str,
        /// How long it waited.
        timeout: std::time::Duration,
    },
    /// The completion did not come even after the queue pair was moved to the error state: the
    /// device no longer answers. The registration stays held (never released while the NIC may
    /// still use it).
    #[error("the device did not flush {what} after its queue pair was moved to the error state; its memory stays registered")]
    DeviceStuck {
        /// The operation.
        what: &'static str,
    },
    /// A registration kept racing invalidations of the same memory (freed or unmapped while
    /// being registered) and was given up.
    #[error("the memory was invalidated while being registered, {0} times in a row: is it being freed or unmapped concurrently?")]
    Raced(usize),
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
