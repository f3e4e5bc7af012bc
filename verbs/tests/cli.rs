//! `p2pb-devices`' command line, on any host (no RDMA needed): --help and --version exit 0,
//! an unknown flag is a usage error (exit 2).

use std::process::Output;

use p2pbridge_test_support::process::{assert_help, assert_version, show_output as show};

const BIN: &str = env!("CARGO_BIN_EXE_p2pb-devices");

fn run(args: &[&str]) -> Output {
    p2pbridge_test_support::process::run_outside_fabric(BIN, args)
}

#[test]
fn help_and_version_exit_0_and_an_unknown_flag_exits_2() {
    assert_help("p2pb-devices", BIN, &[]);
    assert_version("p2pb-devices", BIN, env!("CARGO_PKG_VERSION"));
    let o = run(&["--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-such-flag"), "{}", show(&o));
}
