//! Safe Rust over rdma-core's libibverbs and librdmacm.
//!
//! Three layers, as in `cudarc`:
//! - [`sys`]: the raw C API (`rdma-mummy-sys`: a static shim that `dlopen`s libibverbs and
//!   librdmacm when the program starts, so binaries start on hosts without RDMA);
//! - `result` (crate-private, `src/result/`): one thin function per foreign call (every verb,
//!   rdma_cm call and libc call the crate makes goes through one), turning its return
//!   convention into [`Result`], naming the verb and its errno; each is an `unsafe fn` with a
//!   `# Safety` contract where the call has preconditions;
//! - safe RAII types: [`Context`], [`ProtectionDomain`], [`MemoryRegion`],
//!   [`CompletionQueue`], [`QueuePair`], and rdma_cm's [`Connection`] and [`Listener`]. They
//!   call only the `result` layer, each call justified by a `// SAFETY:` comment.
//!
//! Every entry point first checks that rdma-core was found and otherwise returns
//! [`Error::RdmaUnavailable`].
//!
//! ```no_run
//! use p2pbridge_verbs::{AccessFlags, Context, ProtectionDomain};
//! for name in p2pbridge_verbs::device_names()? {
//!     let ctx = Context::open(&name)?;
//!     let caps = ctx.caps()?;
//!     println!("{name}: ODP {}, implicit ODP {}", caps.odp.supported, caps.odp.implicit);
//!     let pd = ProtectionDomain::new(&ctx)?;
//!     println!("  dma-buf MRs: {:?}", pd.dmabuf_support());
//!     let mr = pd.register(p2pbridge_verbs::HostBuffer::new(1 << 20)?, AccessFlags::remote_rw())?;
//!     println!("  registered 1 MiB: {:?}", mr.remote());
//! }
//! # Ok::<(), p2pbridge_verbs::Error>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub use rdma_mummy_sys as sys;

mod access;
mod buffer;
mod caps;
pub mod cm;
mod coarse;
mod cq;
mod device;
mod error;
mod fault;
pub mod library;
mod mr;
mod mw;
mod pd;
mod qp;
mod remote;
mod result;
mod srq;

pub use access::AccessFlags;
pub use buffer::{HostBuffer, RegisterableBuffer};
pub use caps::{DeviceCaps, DmaBufSupport, OdpCaps, OdpTransportCaps};
pub use cm::{ConnectRequest, Connection, ConnectionOptions, Listener, FAULT_CHECK_INTERVAL};
pub use coarse::Coarse;
pub use cq::{CompletionQueue, WcOpcode, WorkCompletion};
pub use device::{device_names, Context, GidEntry, GidKind, LinkLayer, PortInfo, PortState};
pub use error::{Errno, Error, Result, WcStatus};
pub use fault::Fault;
pub use mr::{Foreign, LocalSlice, MemoryRegion};
pub use mw::MemoryWindow;
pub use pd::ProtectionDomain;
pub use qp::{PostListError, QpState, QueuePair, SendFlags, SendOp, SendWr};
pub use remote::{RemoteBuf, RemoteSlice};
pub use srq::SharedReceiveQueue;
/// Views of memory that the NIC or a peer may write concurrently (from rust-vmm's `vm-memory`).
pub use vm_memory::{VolatileMemory, VolatileSlice};
