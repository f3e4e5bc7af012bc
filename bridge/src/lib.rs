//! p2pbridge: register accelerator memory as RDMA memory regions, choose the strategy, keep
//! every registration honest.
//!
//! **Not built yet** beyond the layers it stands on: the RDMA layer is [`verbs`]
//! (`p2pbridge-verbs`), re-exported here. Strategy choice, the registration cache and safe
//! buffer types are tracked as their own issue (see `docs/architecture.md`).

pub use p2pbridge_verbs as verbs;
