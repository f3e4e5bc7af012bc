//! `p2pb-devices`' command line, on any host (no RDMA needed): --help and --version exit 0,
//! an unknown flag is a usage error (exit 2).

use std::process::Output;

use p2pbridge_test_support::process::show_output as show;

const BIN: &str = env!("CARGO_BIN_EXE_p2pb-devices");

fn run(args: &[&str]) -> Output {
    p2pbridge_test_support::process::run_outside_fabric(BIN, args)
}

#[test]
fn help_and_version_exit_0_and_an_unknown_flag_exits_2() {
    for flag in ["--help", "-h"] {
        let o = run(&[flag]);
        assert_eq!(o.status.code(), Some(0), "{flag}: {}", show(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Usage: p2pb-devices") && out.contains("Exit status: 0"), "{flag}: {}", show(&o));
    }
    for flag in ["--version", "-V"] {
        let o = run(&[flag]);
        assert_eq!(o.status.code(), Some(0), "{flag}: {}", show(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("p2pb-devices {}", env!("CARGO_PKG_VERSION")));
    }
    let o = run(&["--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-such-flag"), "{}", show(&o));
}
