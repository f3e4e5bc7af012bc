//! p2pbridge: register accelerator memory as RDMA memory regions, choose the strategy, keep
//! every registration honest.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cache;
pub mod strategy;

pub use p2pbridge_gpu as gpu;
pub use p2pbridge_verbs as verbs;
