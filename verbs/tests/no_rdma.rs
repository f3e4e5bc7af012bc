//! A host without rdma-core: binaries still start and say what is missing.
//!
//! The test hides libibverbs.so.1 and librdmacm.so.1 from a child process by bind-mounting
//! /dev/null over them in a private mount namespace (`unshare -m`, or `unshare -r -m` when
//! not root), so the dynamic loader fails exactly as on a host where they are not installed.

use std::process::Command;

fn rdma_libs() -> Vec<String> {
    let out = Command::new("ldconfig").arg("-p").output().expect("ldconfig -p");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("libibverbs.so.1 ") || l.contains("librdmacm.so.1 "))
        .filter_map(|l| l.rsplit("=> ").next().map(|p| p.trim().to_string()))
        .filter_map(|p| std::fs::canonicalize(&p).ok().map(|c| c.to_string_lossy().into_owned()))
        .collect()
}

#[test]
fn host_without_libibverbs_reports_rdma_unavailable() {
    let bin = env!("CARGO_BIN_EXE_p2pb-devices");
    let libs = rdma_libs();
    let out = if libs.is_empty() {
        // rdma-core is really absent here.
        Command::new(bin).output().expect("run p2pb-devices")
    } else {
        let mut script = String::from("set -e; ");
        for l in &libs {
            script.push_str(&format!("mount --bind /dev/null '{l}'; "));
        }
        script.push_str("exec \"$0\"");
        // SAFETY-free: geteuid has no preconditions.
        let root = rustix::process::geteuid().is_root();
        let mut cmd = Command::new("unshare");
        if !root {
            cmd.arg("-r");
        }
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, bin]);
        cmd.output().expect("unshare (util-linux) must be installed")
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "expected exit 3 (RdmaUnavailable); stderr: {stderr}");
    assert!(stderr.contains("libibverbs.so.1 not found: install rdma-core / ibverbs-providers"), "stderr: {stderr}");
}
