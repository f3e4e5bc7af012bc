//! A host without rdma-core: binaries still start and say what is missing.

use p2pbridge_test_support::fabric::without_rdma_core;

#[test]
fn host_without_libibverbs_reports_rdma_unavailable() {
    let out =
        without_rdma_core(env!("CARGO_BIN_EXE_p2pb-devices")).output().expect("unshare (util-linux) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "expected exit 3 (RdmaUnavailable); stderr: {stderr}");
    assert!(stderr.contains("libibverbs.so.1 not found: install rdma-core / ibverbs-providers"), "stderr: {stderr}");
}
