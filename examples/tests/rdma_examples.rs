//! The examples, run on the Soft-RoCE fabric as README.md says; each must finish with "ok".

fn run(bin: &str) {
    let out = std::process::Command::new(bin).output().unwrap_or_else(|e| panic!("{bin}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{bin} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_remote_buffer() {
    run(env!("CARGO_BIN_EXE_remote_buffer"));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_kv_fetch() {
    run(env!("CARGO_BIN_EXE_kv_fetch"));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_cache_loop() {
    run(env!("CARGO_BIN_EXE_cache_loop"));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_example_write_read() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_write_read")).args(["--size", "1MiB"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("server buffer matches: true; read-back matches: true"));
}
