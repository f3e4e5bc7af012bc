//! p2pbridge: register accelerator memory as RDMA memory regions, choose the strategy, keep
//! every registration honest.
//!
//! - [`Bridge`] registers memory of its backends ([`gpu`]) or plain host memory through the
//!   best [`Strategy`] the host supports — dma-buf, peer memory, ODP, pinned host, or bounce
//!   buffers — and says why it skipped the others ([`SkipReason`]).
//! - Registrations are cached ([`cache`]); a backend's notice before a free removes them,
//!   waits for in-flight work, and deregisters before the memory goes.
//! - [`RemoteKey`]s carry a generation: a registration made anew after the memory was freed
//!   or remapped has a new one, the old rkey is gone at the NIC, and the bridge refuses the
//!   old key it handed out.
//!
//! ```no_run
//! use std::sync::Arc;
//! use p2pbridge::{Bridge, BridgeOptions};
//! use p2pbridge::gpu::{HostBackend, MemoryBackend};
//! use p2pbridge::verbs::{AccessFlags, Context, ProtectionDomain};
//!
//! let pd = ProtectionDomain::new(&Context::open("rxe_a")?)?;
//! let host = HostBackend::new();
//! let bridge = Bridge::new(&pd, vec![Arc::new(host.clone())], BridgeOptions::default())?;
//! let buf = host.alloc(1 << 20)?;
//! let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
//! println!("{:?} (skipped: {:?})", reg.strategy(), reg.skipped());
//! # Ok::<(), p2pbridge::Error>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bounce;
mod bridge;
pub mod cache;
mod error;
mod key;
mod keys;
pub mod probe;
mod registration;
pub mod strategy;
mod transfer;
mod uffd;

pub use bounce::{BounceConfig, BounceEngine};
pub use bridge::{Bridge, BridgeOptions};
pub use error::{Error, Result};
pub use key::RemoteKey;
pub use registration::{live_registrations, LocalGuard, Registered, Registration};
pub use strategy::{HostCaps, MemoryKind, Policy, Preference, SkipReason, Strategy};
pub use uffd::monitor_available;

pub use p2pbridge_gpu as gpu;
pub use p2pbridge_verbs as verbs;
