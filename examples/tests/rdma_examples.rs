//! The examples, run on the Soft-RoCE fabric as README.md says: each in one process across the
//! two hosts (each must finish with "ok"), the client/server ones also as a `--server` process
//! on host B and a `--client` process on host A, and cache_loop in loopback on one device.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};

use p2pbridge_verbs::fabric::SoftRoce;

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
/// line being "ok". Returns (client's stdout, server's stdout).
fn server_and_client(bin: &str, args: &[&str]) -> (String, String) {
    let f = fabric();
    let mut server = Command::new("ip")
        .args(["netns", "exec", &f.b.netns, bin, "--server", &format!("{}:0", f.b.addr)])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap());
    let mut head = String::new();
    let addr = loop {
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            server.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("the server ended before listening ({}):\n{head}\n{err}", server.wait().unwrap());
        }
        head.push_str(&line);
        if let Some(a) = line.trim().strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    let client = Command::new("ip")
        .args(["netns", "exec", &f.a.netns, bin, "--client", &addr, "--device", &f.a.device])
        .args(args)
        .output()
        .unwrap();
    if !client.status.success() {
        // It would wait for a client for ever.
        let _ = server.kill();
    }
    let status = server.wait().unwrap();
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    server.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let server_out = head + &rest;
    let client_out = ok(&format!("{bin} --client (server: {status}\n{server_out}\n{err})"), &client);
    assert!(status.success(), "{bin} --server failed ({status}):\n{server_out}\n{err}");
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
