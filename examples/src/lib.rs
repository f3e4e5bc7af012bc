//! Examples for p2pbridge.
