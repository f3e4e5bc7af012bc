//! `p2pbridge probe` on the Soft-RoCE guest: the devices, what rxe can and cannot do and why,
//! the strategies the bridge would pick.

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_probe_on_soft_roce_reports_devices_reasons_and_strategies() {
    let fab = p2pbridge::verbs::fabric::SoftRoce::from_env().expect("run under scripts/softroce");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_p2pbridge")).args(["probe", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true);
    let names: Vec<&str> = r["devices"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert!(names.contains(&fab.a.device.as_str()) && names.contains(&fab.b.device.as_str()), "{names:?}");
    let dev = r["devices"].as_array().unwrap().iter().find(|d| d["name"] == fab.a.device.as_str()).unwrap();
    assert_eq!(dev["ports"][0]["state"], "Active");
    assert_eq!(dev["odp"]["supported"], true);
    assert_eq!(dev["dmabuf_mr"]["supported"], false);
    assert!(dev["dmabuf_mr"]["reason"].as_str().unwrap().contains("EOPNOTSUPP"));
    assert_eq!(dev["implicit_odp"]["supported"], false);
    assert_eq!(r["udmabuf"]["supported"], true, "the guest kernel has udmabuf");
    assert_eq!(r["host_monitor"]["supported"], true);
    assert_eq!(r["host_memory"]["chosen"], "odp");
    assert_eq!(r["device_memory"]["chosen"], "bounce");
    let skipped = r["device_memory"]["skipped"].as_array().unwrap();
    let peermem = skipped.iter().find(|s| s["strategy"] == "peermem").expect("peermem has a reason");
    assert!(peermem["reason"].as_str().unwrap().contains("not loaded"), "{peermem}");
    assert!(peermem["fix"].as_str().unwrap().contains("modprobe nvidia-peermem"));
    let dmabuf = skipped.iter().find(|s| s["strategy"] == "dmabuf").expect("dma-buf has a reason");
    assert!(dmabuf["reason"].as_str().unwrap().contains("EOPNOTSUPP"), "{dmabuf}");
}
