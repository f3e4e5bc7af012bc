//! Accelerator memory for p2pbridge (the "exporting device" of the design).
//!
//! **Not built yet.** This crate holds the place of the backend layer described in
//! `docs/architecture.md`: allocation, pointer identification, dma-buf export, copies and
//! invalidation notices for CUDA (through `cudarc`) and host memory (memfd + udmabuf). The
//! work is tracked as its own issue; nothing here pretends to work before then, so the crate
//! exports no items.
