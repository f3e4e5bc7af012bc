//! The harness in each of its modes, on the Soft-RoCE fabric, with small sizes: it must
//! finish, and write a CSV with a row per strategy, operation and size, and the plot.

use std::process::{Command, Stdio};
use std::time::Duration;

use p2pbridge_test_support::fabric::SoftRoce;
use p2pbridge_test_support::process::{KillOnDrop, Lines};

const BIN: &str = env!("CARGO_BIN_EXE_p2pbridge-bench");
const SMALL: [&str; 7] = ["--min", "64", "--max", "4KiB", "--seconds", "0.05", "--no-perftest"];

fn fabric() -> SoftRoce {
    SoftRoce::from_env().expect("run under scripts/softroce")
}

fn check_out(dir: &std::path::Path, setting: &str) {
    let csv = std::fs::read_to_string(dir.join("results.csv")).expect("results.csv");
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("strategy,op,size_bytes,bandwidth_mib_s"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // odp, pinned and bounce (rxe), write and read, 64 B / 256 B / 1 KiB / 4 KiB.
    assert_eq!(rows.len(), 3 * 2 * 4, "{csv}");
    for r in &rows {
        let bw: f64 = r[3].parse().unwrap();
        assert!(bw > 0.0, "no bandwidth measured: {r:?}");
    }
    let svg = std::fs::read_to_string(dir.join("bandwidth.svg")).expect("bandwidth.svg");
    assert_eq!(svg.matches("<polyline").count(), 6);
    assert!(svg.contains(setting), "the plot says where it ran");
}

/// Runs `cmd`, capturing its output (so it does not interleave with the test runner's), and
/// fails the test with that output if it did not succeed.
fn ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn out_dir(name: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_harness_across_the_fabric_hosts() {
    let f = fabric();
    let out = out_dir("fabric");
    ok(Command::new(BIN).args(SMALL).arg("--out").arg(&out));
    check_out(&out, &f.a.device);
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_harness_in_loopback_on_one_device() {
    let f = fabric();
    let out = out_dir("loopback");
    ok(Command::new("ip")
        .args(["netns", "exec", &f.a.netns, BIN])
        .args(SMALL)
        .args(["--loopback", &f.a.addr.to_string(), "--device", &f.a.device, "--out"])
        .arg(&out));
    check_out(&out, "loopback");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_harness_as_server_and_client_processes() {
    let f = fabric();
    let out = out_dir("two-processes");
    // Port 0: the server picks a free one and says which ("... listening on ADDR ..."). Killed
    // and reaped if anything below fails, so that it never waits for a client for ever.
    let mut server = KillOnDrop::new(
        Command::new("ip")
            .args(["netns", "exec", &f.b.netns, BIN, "--max", "4KiB", "--server", &format!("{}:0", f.b.addr)])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut said = Lines::new(server.child().stdout.take().unwrap());
    let addr = said
        .wait_for(Duration::from_secs(120), |l| {
            l.split_once("listening on ").and_then(|(_, rest)| rest.split_whitespace().next()).map(str::to_string)
        })
        .unwrap_or_else(|e| panic!("the server did not say where it listens: {e}"));
    ok(Command::new("ip")
        .args(["netns", "exec", &f.a.netns, BIN])
        .args(SMALL)
        .args(["--client", &addr, "--device", &f.a.device, "--out"])
        .arg(&out));
    let status = server.wait().unwrap();
    assert!(status.success(), "the server ends when its client disconnects ({status}):\n{}", said.all());
    check_out(&out, "server");
}
