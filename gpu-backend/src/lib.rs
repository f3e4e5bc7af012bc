//! Accelerator memory for p2pbridge: the "exporting device" of the design.
//!
//! A [`MemoryBackend`] allocates memory, identifies pointers (a sub-range of a larger
//! allocation resolves to the allocation), exports ranges as dma-bufs or says why not, copies
//! to and from the device, makes NIC writes visible to the device, and — before any memory is
//! freed or an export revoked — calls every subscriber of the range and waits for its
//! acknowledgement ([`NoticeHub`]). Allocations are identified by (backend, device, id),
//! never by address alone: addresses are reused after a free.
//!
//! Backends:
//! - [`HostBackend`]: memfd-backed host memory, dma-buf export through `/dev/udmabuf`.
//! - [`CudaBackend`]: CUDA device memory through `cudarc` (driver API, loaded at run time;
//!   [`Error::BackendUnavailable`] where there is no driver).
//! - ROCm and Level Zero: planned, see [`rocm`] and [`level_zero`]; nothing there pretends
//!   to work yet.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod alloc;
mod backend;
mod cuda;
mod error;
mod host;
pub mod level_zero;
mod notice;
pub mod rocm;

pub use alloc::{AllocationInfo, AllocationKey, BackendKind};
pub use backend::{DeviceBuffer, DmaBufExport, FlushOutcome, MemoryBackend};
pub use cuda::{CudaBackend, GPU_PAGE};
/// Page-locked host memory from CUDA ([`CudaBackend::alloc_pinned_host`]): cudarc's type.
pub use cudarc::driver::PinnedHostSlice;
pub use error::{Error, Result};
pub use host::HostBackend;
pub use notice::{InvalidationReason, Notice, NoticeHub, Subscription};
/// Views of memory that a NIC or a peer may write concurrently (from rust-vmm's `vm-memory`).
pub use vm_memory::VolatileSlice;
