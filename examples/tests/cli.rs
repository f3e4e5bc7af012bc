//! The examples' command lines, on any host (no RDMA needed): --help and --version exit 0,
//! usage errors exit 2 with clap's message, and failures while running exit 1 with the error's
//! message (not its Debug form) after the binary's name.

use std::process::Output;

use p2pbridge_test_support::process::{
    assert_help, assert_unknown_flag, assert_version, run_outside_fabric as run, show_output as show,
};

const BINS: [(&str, &str); 4] = [
    ("cache_loop", env!("CARGO_BIN_EXE_cache_loop")),
    ("kv_fetch", env!("CARGO_BIN_EXE_kv_fetch")),
    ("remote_buffer", env!("CARGO_BIN_EXE_remote_buffer")),
    ("write_read", env!("CARGO_BIN_EXE_write_read")),
];

/// The examples with a client and a server half.
const SPLIT: [&str; 3] = ["kv_fetch", "remote_buffer", "write_read"];

fn exe(name: &str) -> &'static str {
    BINS.iter().find(|(n, _)| *n == name).unwrap().1
}

fn assert_code(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "{}", show(o));
}

#[test]
fn help_exits_0_with_usage_and_exit_codes() {
    for (name, bin) in BINS {
        assert_help(name, bin, &["--device"]);
    }
}

#[test]
fn version_exits_0() {
    for (name, bin) in BINS {
        assert_version(name, bin, env!("CARGO_PKG_VERSION"));
    }
}

#[test]
fn an_unknown_flag_exits_2() {
    for (name, bin) in BINS {
        assert_unknown_flag(name, bin);
    }
}

#[test]
fn no_arguments_outside_softroce_is_a_usage_error() {
    for (name, bin) in BINS {
        let o = run(bin, &[]);
        assert_code(&o, 2);
        assert!(String::from_utf8_lossy(&o.stderr).contains("scripts/softroce"), "{name}: {}", show(&o));
    }
}

#[test]
fn split_examples_take_server_client_and_device() {
    for name in SPLIT {
        let bin = exe(name);
        let help = String::from_utf8_lossy(&run(bin, &["--help"]).stdout).into_owned();
        for flag in ["--server <ADDR:PORT>", "--client <ADDR:PORT>", "--device <NAME>", "--clients <N>"] {
            assert!(help.contains(flag), "{name} --help lacks {flag}:\n{help}");
        }
        // --client needs --device; --server and --client exclude each other; addresses parse.
        for args in [
            &["--client", "192.0.2.1:7471"][..],
            &["--device", "mlx5_0"],
            &["--server", "192.0.2.1:7471", "--client", "192.0.2.1:7471", "--device", "mlx5_0"],
            &["--server", "192.0.2.1"],
            &["--client", "not-an-address", "--device", "mlx5_0"],
            &["--clients", "2"],
        ] {
            assert_code(&run(bin, args), 2);
        }
    }
}

#[test]
fn cache_loop_says_it_has_no_server_or_client() {
    let bin = exe("cache_loop");
    let help = String::from_utf8_lossy(&run(bin, &["--help"]).stdout).into_owned();
    assert!(help.contains("no --server/--client"), "{help}");
    assert_code(&run(bin, &["--server", "192.0.2.1:7471"]), 2);
    assert_code(&run(bin, &["--addr", "192.0.2.1"]), 2); // --addr needs --device
    assert_code(&run(bin, &["--device", "x", "--rounds", "0"]), 2);
}

/// A device that is not there fails while running: exit 1, "NAME: message" on stderr, the
/// message as Display prints it (no Debug `Variant(..)` form), nothing on stdout but what ran.
#[test]
fn a_failure_while_running_exits_1_with_its_message() {
    for (name, bin) in BINS {
        let args: &[&str] = if name == "cache_loop" {
            &["--device", "p2pb_no_such_device", "--addr", "192.0.2.1"]
        } else {
            &["--client", "192.0.2.1:7471", "--device", "p2pb_no_such_device"]
        };
        let o = run(bin, args);
        assert_code(&o, 1);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with(&format!("{name}: ")), "{}", show(&o));
        assert!(!err.contains("InvalidArgument(") && !err.contains("Error {"), "Debug, not Display: {}", show(&o));
    }
}
