//! `p2pbridge probe` on a host without rdma-core: it starts, says why nothing works and how to
//! fix it, and exits 1.

use p2pbridge_test_support::fabric::without_rdma_core;

#[test]
fn probe_without_rdma_core_explains_and_exits_1() {
    let out =
        without_rdma_core(env!("CARGO_BIN_EXE_p2pbridge")).args(["probe", "--json"]).output().expect("run the probe");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(r["ok"], false);
    assert_eq!(r["rdma"]["supported"], false);
    // The reason as fields, and in words.
    let reason = &r["rdma"]["reason"];
    assert_eq!(reason["kind"], "rdma_core_missing", "{reason}");
    assert_eq!(reason["library"], "libibverbs.so.1", "{reason}");
    assert!(reason["loader"].as_str().is_some_and(|l| !l.is_empty()), "the loader's message: {reason}");
    let why = r["rdma"]["why"].as_str().unwrap();
    assert!(why.contains("libibverbs.so.1 not found"), "{why}");
    assert!(r["rdma"]["fix"].as_str().unwrap().contains("install rdma-core"));
    assert!(r["host_memory"].is_null() && r["device_memory"].is_null(), "no strategy without RDMA: {r}");
    assert!(r["devices"].as_array().unwrap().is_empty() && r["device_used"].is_null(), "{r}");
    if p2pbridge::gpu::CudaBackend::driver_present().is_err() {
        assert_eq!(r["cuda"]["reason"]["kind"], "cuda_driver_missing", "{}", r["cuda"]);
        assert_eq!(r["cuda"]["reason"]["library"], "libcuda.so.1", "{}", r["cuda"]);
        assert!(r["cuda"]["why"].as_str().unwrap().contains("libcuda.so.1 not found"), "{}", r["cuda"]);
    }
    // Peer memory is looked for whatever the RDMA stack: loaded, or every path checked.
    match r["peer_memory"]["supported"].as_bool() {
        Some(true) => assert!(r["peer_memory_found"].is_string(), "{r}"),
        Some(false) => {
            let pm = &r["peer_memory"]["reason"];
            assert_eq!(pm["kind"], "peer_mem_missing", "{pm}");
            let checked = pm["checked"].as_array().unwrap();
            assert!(checked.iter().any(|p| p == "/sys/module/nvidia_peermem/version"), "{pm}");
            assert!(r["peer_memory"]["fix"].as_str().unwrap().contains("modprobe nvidia-peermem"));
        }
        None => panic!("peer_memory.supported is not a bool: {r}"),
    }
    // The text form says the same to people.
    let text = without_rdma_core(env!("CARGO_BIN_EXE_p2pbridge")).arg("probe").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("NOT OK") && text.contains("install rdma-core"), "{text}");
    assert!(text.contains("rdma-core and devices: NO — libibverbs.so.1 not found"), "{text}");
}

fn p2pbridge(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_p2pbridge")).args(args).output().unwrap()
}

#[test]
fn probe_refuses_unknown_arguments() {
    for args in [&["probe", "--yaml"][..], &["frobnicate"], &[]] {
        let out = p2pbridge(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: p2pbridge"), "{args:?}");
    }
}

#[test]
fn help_and_version_exit_0_and_document_the_exit_status() {
    let out = p2pbridge(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("probe") && help.contains("Exit status: 0"), "{help}");
    let out = p2pbridge(&["probe", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--json"));
    let out = p2pbridge(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("p2pbridge {}", env!("CARGO_PKG_VERSION")));
}
