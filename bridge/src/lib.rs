//! p2pbridge: register accelerator memory as RDMA memory regions, choose the strategy, keep
//! every registration honest.
//!
//! - [`Bridge`] registers memory of its backends ([`gpu`]) or plain host memory through the
//!   best [`Strategy`] the host supports — dma-buf, peer memory, ODP, pinned host, or bounce
//!   buffers — and says why it skipped the others ([`SkipReason`]).
//! - Registrations are cached ([`cache`]). When the memory goes — a backend's notice before a
//!   free, the userfaultfd monitor seeing an unmap, or a call — they are revoked: every key
//!   handed out over the memory is refused by the NIC from then on, the regions are
//!   deregistered after the operations in flight end, and handles turn dead
//!   ([`Error::Revoked`]).
//! - [`Bridge::hand_out`] gives a peer a [`RemoteKey`]: where the NIC has memory windows, a
//!   window over exactly the range handed out, usable only over that peer's connection.
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
pub mod budget;
pub mod cache;
mod completion;
mod error;
mod graveyard;
mod invalidate;
mod key;
mod keys;
mod metadata;
mod options;
pub mod probe;
mod receive;
mod register;
mod registration;
mod small;
mod staging;
pub mod strategy;
mod teardown;
pub mod transfer;
mod uffd;

pub use bounce::{BounceConfig, BounceEngine, Piece};
pub use bridge::Bridge;
pub use error::{Error, Result};
pub use graveyard::{leaked_registration_causes, leaked_registrations};
pub use key::RemoteKey;
pub use metadata::Metadata;
pub use options::BridgeOptions;
pub use receive::{Received, Receives};
pub use registration::{live_registrations, LocalGuard, Registered};
pub use strategy::{HostCaps, MemoryKind, Policy, Preference, SkipReason, Strategy};
pub use transfer::{Batch, Op, Status, Transfer};
pub use uffd::monitor_available;

pub use p2pbridge_gpu as gpu;
pub use p2pbridge_verbs as verbs;

/// README.md's Rust examples, compiled as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
