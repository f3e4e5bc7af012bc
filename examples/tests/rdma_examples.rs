//! The examples, run on the Soft-RoCE fabric as README.md says: each in one process across the
//! two hosts (each must finish with "ok"), the client/server ones also as a `--server` process
//! on host B and a `--client` process on host A, and cache_loop in loopback on one device.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use p2pbridge_test_support::fabric::SoftRoce;
use p2pbridge_test_support::process::{KillOnDrop, Lines};

fn fabric() -> SoftRoce {
    SoftRoce::from_env().expect("run under scripts/softroce")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that `out` is a success whose last line is "ok"; returns its stdout.
fn ok(what: &str, out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    stdout
}

fn run(bin: &str) -> String {
    ok(bin, &Command::new(bin).output().unwrap_or_else(|e| panic!("{bin}: {e}")))
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_remote_buffer() {
    let out = run(env!("CARGO_BIN_EXE_remote_buffer"));
    assert!(out.contains("server buffer verified") && out.contains("client buffer verified"), "{out}");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_kv_fetch() {
    let out = run(env!("CARGO_BIN_EXE_kv_fetch"));
    assert!(out.contains("all verified"), "{out}");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_cache_loop() {
    run(env!("CARGO_BIN_EXE_cache_loop"));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_write_read() {
    let bin = env!("CARGO_BIN_EXE_write_read");
    let out = ok(bin, &Command::new(bin).args(["--size", "1MiB"]).output().unwrap());
    assert!(out.contains("read-back matches: true") && out.contains("server buffer matches: true"), "{out}");
}

/// cache_loop in loopback: both ends on host A's device, in host A's namespace.
#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_cache_loop_on_one_device() {
    let f = fabric();
    let bin = env!("CARGO_BIN_EXE_cache_loop");
    let out = Command::new("ip")
        .args(["netns", "exec", &f.a.netns, bin, "--device", &f.a.device, "--rounds", "8"])
        .output()
        .unwrap();
    let out = ok("cache_loop --device", &out);
    assert!(out.contains(&format!("loopback on {} ({})", f.a.device, f.a.addr)), "{out}");
}

/// Runs `bin --server` in host B's namespace (on port 0: the port it prints) and `bin --client
/// ADDR --device DEV` in host A's, both with `args`; asserts both exit 0, the client's last
/// line being "ok". Returns (client's stdout, server's stdout). The server is killed and reaped
/// however this ends (it would wait for a client for ever).
fn server_and_client(bin: &str, args: &[&str]) -> (String, String) {
    let f = fabric();
    let mut server = KillOnDrop::new(
        Command::new("ip")
            .args(["netns", "exec", &f.b.netns, bin, "--server", &format!("{}:0", f.b.addr)])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = Lines::new(server.child().stdout.take().unwrap());
    let err = Lines::new(server.child().stderr.take().unwrap());
    let addr =
        match out.wait_for(Duration::from_secs(120), |l| l.trim().strip_prefix("listening on ").map(str::to_string)) {
            Ok(a) => a,
            Err(e) => panic!("{bin} --server did not say where it listens: {e}\nstderr:\n{}", err.all()),
        };
    let client = Command::new("ip")
        .args(["netns", "exec", &f.a.netns, bin, "--client", &addr, "--device", &f.a.device])
        .args(args)
        .output()
        .unwrap();
    // A client that failed may never have connected: the server would wait for ever.
    let status = if client.status.success() { server.wait() } else { server.kill() }.unwrap();
    let (server_out, server_err) = (out.all(), err.all());
    let client_out = ok(&format!("{bin} --client (server: {status}\n{server_out}\n{server_err})"), &client);
    assert!(status.success(), "{bin} --server failed ({status}):\n{server_out}\n{server_err}");
    (client_out, server_out)
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_write_read_as_server_and_client_processes() {
    let (client, server) = server_and_client(env!("CARGO_BIN_EXE_write_read"), &["--size", "1MiB"]);
    assert!(client.contains("read-back matches: true"), "{client}");
    assert!(server.contains("server buffer matches: true"), "{server}");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_remote_buffer_as_server_and_client_processes() {
    let (client, server) = server_and_client(env!("CARGO_BIN_EXE_remote_buffer"), &[]);
    assert!(client.contains("server buffer verified") && client.contains("client buffer verified"), "{client}");
    assert!(server.contains("buffer holds the client's pattern"), "{server}");
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_kv_fetch_as_server_and_client_processes() {
    let (client, _) = server_and_client(env!("CARGO_BIN_EXE_kv_fetch"), &[]);
    assert!(client.contains("all verified"), "{client}");
}
