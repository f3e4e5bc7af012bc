//! The benchmark binaries' command lines, on any host (no RDMA needed): --help and --version
//! exit 0, and usage errors (an unknown flag, a bad value, no Soft-RoCE fabric where one is
//! needed) exit 2 with clap's message.

use std::process::Output;

use p2pbridge_test_support::process::{
    assert_help, assert_unknown_flag, assert_version, run_outside_fabric as run, show_output as show,
};

const BINS: [(&str, &str); 7] = [
    ("bridge_reg", env!("CARGO_BIN_EXE_bridge_reg")),
    ("copy_bw", env!("CARGO_BIN_EXE_copy_bw")),
    ("keys", env!("CARGO_BIN_EXE_keys")),
    ("p2pbridge-bench", env!("CARGO_BIN_EXE_p2pbridge-bench")),
    ("soak", env!("CARGO_BIN_EXE_soak")),
    ("transfer_bw", env!("CARGO_BIN_EXE_transfer_bw")),
    ("verbs_write_bw", env!("CARGO_BIN_EXE_verbs_write_bw")),
];

fn exe(name: &str) -> &'static str {
    BINS.iter().find(|(n, _)| *n == name).unwrap().1
}

fn assert_code(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{what}: {}", show(o));
}

#[test]
fn help_exits_0_with_usage_and_exit_codes() {
    for (name, bin) in BINS {
        assert_help(name, bin, &[]);
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

/// The options that scripts/bench, scripts/soak, scripts/gpu-bundle, the harness's test and
/// README.md use are still there (each listed in --help).
#[test]
fn the_options_scripts_and_readme_use_are_kept() {
    for (name, flags) in [
        (
            "p2pbridge-bench",
            &[
                "--min",
                "--max",
                "--seconds",
                "--out",
                "--chunk",
                "--ring",
                "--no-perftest",
                "--loopback",
                "--device",
                "--server",
                "--client",
            ][..],
        ),
        ("verbs_write_bw", &["--seconds", "--depth", "--cq-mod", "--rounds"]),
        ("soak", &["--seconds", "--seed", "--threads", "--peers"]),
        ("keys", &["--rounds", "--seconds", "--pairs"]),
        ("bridge_reg", &["--device", "--hits", "--strategy"]),
        ("copy_bw", &["--max", "--seconds"]),
        ("transfer_bw", &["--seconds", "--pairs", "--depth", "--out", "--only"]),
    ] {
        let help = String::from_utf8_lossy(&run(exe(name), &["--help"]).stdout).into_owned();
        for flag in flags {
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{name} --help lacks {flag}:\n{help}"
            );
        }
    }
}

/// Bad values are usage errors: clap's message, no figures.
#[test]
fn bad_values_exit_2() {
    for (name, args) in [
        ("p2pbridge-bench", &["--min", "0"][..]),
        ("p2pbridge-bench", &["--max", "4kb"]),
        ("p2pbridge-bench", &["--min", "1MiB", "--max", "4KiB"]),
        ("p2pbridge-bench", &["--seconds", "0"]),
        ("p2pbridge-bench", &["--ring", "0"]),
        ("p2pbridge-bench", &["--client", "192.0.2.1:7479"]),
        ("p2pbridge-bench", &["--loopback", "192.0.2.1"]),
        ("p2pbridge-bench", &["--server", "192.0.2.1:7479", "--client", "192.0.2.1:7479", "--device", "x"]),
        ("p2pbridge-bench", &["--device", "x"]),
        ("verbs_write_bw", &["--depth", "8", "--cq-mod", "9"]),
        ("verbs_write_bw", &["--rounds", "0"]),
        ("soak", &["--threads", "0"]),
        ("keys", &["--seconds", "-1"]),
        ("bridge_reg", &["--strategy", "dmabuf"]),
        ("bridge_reg", &["--hits", "0"]),
        ("copy_bw", &["--max", "0MiB"]),
        ("transfer_bw", &["--only", "nothing"]),
    ] {
        let o = run(exe(name), args);
        assert_code(&o, 2, &format!("{name} {args:?}"));
        assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: "), "{name} {args:?}: {}", show(&o));
        assert!(o.stdout.is_empty(), "{name} {args:?} ran: {}", show(&o));
    }
}

/// The binaries that need the fabric say so, as a usage error, outside it.
#[test]
fn no_fabric_is_a_usage_error() {
    for name in ["bridge_reg", "keys", "p2pbridge-bench", "soak", "transfer_bw", "verbs_write_bw"] {
        let o = run(exe(name), &[]);
        assert_code(&o, 2, name);
        assert!(String::from_utf8_lossy(&o.stderr).contains("scripts/"), "{name}: {}", show(&o));
    }
}

/// A failure while running exits 1, printed as `NAME: message` (Display, not Debug).
#[test]
fn a_failure_while_running_exits_1_with_its_message() {
    for (name, args) in [
        ("bridge_reg", &["--device", "p2pb_no_such_device"][..]),
        ("p2pbridge-bench", &["--client", "192.0.2.1:7479", "--device", "p2pb_no_such_device"]),
    ] {
        let o = run(exe(name), args);
        assert_code(&o, 1, name);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with(&format!("{name}: ")), "{}", show(&o));
        assert!(!err.contains("InvalidArgument(") && !err.contains("Error {"), "Debug, not Display: {}", show(&o));
    }
}
