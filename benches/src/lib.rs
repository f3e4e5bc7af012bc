//! Benchmarks for p2pbridge.
