//! Shared set-up for the tests that run on the Soft-RoCE fabric (`scripts/softroce`).
#![allow(dead_code)]

use std::time::Duration;

pub use p2pbridge_test_support::fabric::Side;
use p2pbridge_test_support::fabric::{BoxError, SoftRoce};
use p2pbridge_verbs::{ConnectionOptions, ProtectionDomain};

/// The fabric; a test that runs without it fails, loudly (it is `#[ignore]`d otherwise).
pub fn fabric() -> SoftRoce {
    SoftRoce::from_env().expect(
        "this test needs the Soft-RoCE fabric (P2PB_SOFTROCE is unset): run it through scripts/test or scripts/softroce",
    )
}

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Connects a client on host A to a server on host B (see `SoftRoce::connect_pair`); panics
/// with both sides' errors when that fails.
pub fn connect_pair<C, S>(
    opts: ConnectionOptions,
    client_setup: impl FnOnce(&ProtectionDomain) -> Result<(C, Vec<u8>), BoxError> + Send + 'static,
    server_setup: impl FnOnce(&ProtectionDomain) -> Result<(S, Vec<u8>), BoxError> + Send + 'static,
) -> (Side<C>, Side<S>)
where
    C: Send + 'static,
    S: Send + 'static,
{
    fabric().connect_pair(opts, client_setup, server_setup).unwrap_or_else(|e| panic!("connection set-up failed: {e}"))
}

#[allow(unused_imports)] // not every test binary checks data
pub use p2pbridge_test_support::pattern;
