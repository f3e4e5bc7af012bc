//! `p2pbridge probe` on a host without rdma-core: it starts, says why nothing works and how to
//! fix it, and exits 1.

use p2pbridge::verbs::fabric::without_rdma_core;

#[test]
fn probe_without_rdma_core_explains_and_exits_1() {
    let out =
        without_rdma_core(env!("CARGO_BIN_EXE_p2pbridge")).args(["probe", "--json"]).output().expect("run the probe");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(r["ok"], false);
    assert_eq!(r["rdma"]["supported"], false);
    let reason = r["rdma"]["reason"].as_str().unwrap();
    assert!(reason.contains("libibverbs.so.1 not found"), "{reason}");
    assert!(r["rdma"]["fix"].as_str().unwrap().contains("install rdma-core"));
    assert!(r["host_memory"].is_null() && r["device_memory"].is_null(), "no strategy without RDMA: {r}");
    if p2pbridge::gpu::CudaBackend::driver_present().is_err() {
        assert!(r["cuda"]["reason"].as_str().unwrap().contains("libcuda.so.1 not found"), "{}", r["cuda"]);
    }
    // The text form says the same to people.
    let text = without_rdma_core(env!("CARGO_BIN_EXE_p2pbridge")).arg("probe").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("NOT OK") && text.contains("install rdma-core"), "{text}");
}

#[test]
fn probe_refuses_unknown_arguments() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_p2pbridge")).args(["probe", "--yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
