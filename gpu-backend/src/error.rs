//! The crate's one error type.

/// What went wrong in a backend call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend's driver library is not installed or not usable here.
    #[error("{backend} backend unavailable: {reason}")]
    BackendUnavailable {
        /// "cuda", "host", ...
        backend: &'static str,
        /// Why, and what to install.
        reason: String,
    },

    /// A CUDA driver call failed.
    #[error("{call} failed: {name} ({code}){}", .hint.map(|h| format!(" (hint: {h})")).unwrap_or_default())]
    Cuda {
        /// The driver function, e.g. `cuMemAlloc`.
        call: &'static str,
        /// The CUresult value.
        code: i32,
        /// Its name, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        name: String,
        /// What to check, where we know.
        hint: Option<&'static str>,
    },

    /// A system call failed.
    #[error("{call} failed: {err}")]
    Os {
        /// The call, e.g. `memfd_create`.
        call: &'static str,
        /// The OS error.
        err: std::io::Error,
    },

    /// This range cannot be exported as a dma-buf, and why.
    #[error("cannot export as dma-buf: {0}")]
    ExportUnsupported(String),

    /// NIC writes cannot be made visible to this device, and why (no flush entry point, no
    /// flush support, and no native ordering).
    #[error("cannot flush GPUDirect RDMA writes: {0}")]
    FlushUnsupported(String),

    /// The address is CUDA managed (unified) memory, which may migrate between host and device
    /// at any time: neither dma-buf export nor peer memory can map it for a NIC.
    #[error("address {0:#x} is CUDA managed memory (cuMemAllocManaged/cudaMallocManaged), which a NIC cannot map through GPUDirect RDMA: allocate it with cuMemAlloc/cudaMalloc (or a VMM allocation) instead")]
    ManagedMemory(u64),

    /// The address belongs to no allocation this backend knows.
    #[error("address {0:#x} is not in any allocation of this backend")]
    UnknownAddress(u64),

    /// A range falls outside its allocation.
    #[error("range {offset}+{len} is out of bounds of an allocation of {size} bytes")]
    OutOfBounds {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        len: u64,
        /// The allocation's size.
        size: u64,
    },

    /// A bad argument, caught before any call.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn os(call: &'static str, err: impl Into<std::io::Error>) -> Self {
        Error::Os { call, err: err.into() }
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
