//! `p2pb-devices`' command line, on any host (no RDMA needed): --help and --version exit 0,
//! an unknown flag is a usage error (exit 2).

use p2pbridge_test_support::process::{assert_help, assert_unknown_flag, assert_version};

const BIN: &str = env!("CARGO_BIN_EXE_p2pb-devices");

#[test]
fn help_and_version_exit_0_and_an_unknown_flag_exits_2() {
    assert_help("p2pb-devices", BIN, &[]);
    assert_version("p2pb-devices", BIN, env!("CARGO_PKG_VERSION"));
    assert_unknown_flag("p2pb-devices", BIN);
}
