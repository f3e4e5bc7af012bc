//! Safe Rust over rdma-core's libibverbs and librdmacm.
//!
//! Three layers, as in `cudarc`:
//! - [`sys`]: the raw C API (`rdma-mummy-sys`: a static shim that `dlopen`s libibverbs and
//!   librdmacm when the program starts, so binaries start on hosts without RDMA);
//! - `result` (crate-private): each verb's return convention turned into [`Result`], naming
//!   the verb and its errno;
//! - safe RAII types: [`Context`], [`ProtectionDomain`], [`MemoryRegion`],
//!   [`CompletionQueue`], [`QueuePair`], and rdma_cm's [`Connection`] and [`Listener`].
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

pub use rdma_mummy_sys as sys;

mod buffer;
mod caps;
pub mod cm;
mod cq;
mod device;
mod error;
pub mod fabric;
mod fault;
pub mod library;
mod mr;
mod mw;
mod qp;
mod result;
mod srq;

pub use buffer::{HostBuffer, RegisterableBuffer};
pub use caps::{DeviceCaps, DmaBufSupport, OdpCaps, OdpTransportCaps};
pub use cm::{ConnectRequest, Connection, ConnectionOptions, Listener};
pub use cq::{CompletionQueue, WcOpcode, WorkCompletion};
pub use device::{device_names, Context, GidEntry, GidKind, LinkLayer, PortInfo, PortState};
pub use error::{Errno, Error, Result, WcStatus};
pub use mr::{AccessFlags, Foreign, LocalSlice, MemoryRegion, ProtectionDomain, RemoteBuf, RemoteSlice};
pub use mw::MemoryWindow;
pub use srq::SharedReceiveQueue;
pub use fault::Fault;
/// Views of memory that the NIC or a peer may write concurrently (from rust-vmm's `vm-memory`).
pub use vm_memory::{VolatileMemory, VolatileSlice};
pub use qp::{PostListError, QpState, QueuePair, SendFlags, SendOp, SendWr};
