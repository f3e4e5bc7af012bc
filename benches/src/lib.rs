//! Shared pieces of p2pbridge's benchmarks and harness.

pub mod cli;
pub mod drain;
pub mod perftest;
pub mod plot;
