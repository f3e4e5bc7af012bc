//! Shared pieces of p2pbridge's benchmarks and harness.

pub mod perftest;
pub mod plot;
