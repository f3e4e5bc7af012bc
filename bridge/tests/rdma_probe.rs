//! `p2pbridge probe` on the Soft-RoCE guest: the devices, what rxe can and cannot do and why,
//! the strategies the bridge would pick.

#[test]
#[ignore = "needs an RDMA device: scripts/test runs it on Soft-RoCE"]
fn rdma_probe_on_soft_roce_reports_devices_reasons_and_strategies() {
    let fab = p2pbridge_test_support::fabric::SoftRoce::from_env().expect("run under scripts/softroce");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_p2pbridge")).args(["probe", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true);
    let names: Vec<&str> = r["devices"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert!(names.contains(&fab.a.device.as_str()) && names.contains(&fab.b.device.as_str()), "{names:?}");
    let dev = r["devices"].as_array().unwrap().iter().find(|d| d["name"] == fab.a.device.as_str()).unwrap();
    assert_eq!(dev["ports"][0]["state"], "Active");
    assert_eq!(dev["odp"]["supported"], true);
    assert!(dev["odp_rc"].as_array().unwrap().iter().any(|o| o == "WRITE"), "{dev}");
    assert_eq!(dev["dmabuf_mr"]["supported"], false);
    let dmabuf_mr = &dev["dmabuf_mr"]["reason"];
    assert_eq!(dmabuf_mr["kind"], "dma_buf_mr_refused", "{dmabuf_mr}");
    assert_eq!(dmabuf_mr["device"], fab.a.device.as_str());
    assert_eq!(dmabuf_mr["errno"]["name"], "EOPNOTSUPP", "{dmabuf_mr}");
    assert!(dev["dmabuf_mr"]["why"].as_str().unwrap().contains("EOPNOTSUPP"));
    assert!(dev["dmabuf_mr"]["fix"].as_str().unwrap().contains("kernel >= 5.12"));
    assert_eq!(dev["implicit_odp"]["supported"], false);
    assert_eq!(dev["implicit_odp"]["reason"]["kind"], "implicit_odp_absent");
    assert_eq!(dev["mem_windows"]["supported"], true, "rxe has type 2 memory windows");
    // advise_mr: either way, an answer with its reason.
    let advise = &dev["advise_mr"];
    assert!(advise["supported"] == true || advise["reason"]["kind"] == "advise_mr_unimplemented", "{advise}");
    assert_eq!(r["udmabuf"]["supported"], true, "the guest kernel has udmabuf");
    assert_eq!(r["host_monitor"]["supported"], true);
    // Plain host memory is pinned by default: ODP only where the policy asks (the monitor's
    // window), and the plan says so.
    assert_eq!(r["host_memory"]["chosen"], "pinned");
    let host_odp = r["host_memory"]["skipped"].as_array().unwrap().iter().find(|s| s["strategy"] == "odp").cloned();
    let host_odp = host_odp.expect("host memory's ODP has a reason");
    assert_eq!(host_odp["reason"]["kind"], "opt_in", "{host_odp}");
    assert!(host_odp["reason"]["why"].as_str().unwrap().contains("munmap"), "{host_odp}");
    assert_eq!(r["device_memory"]["chosen"], "bounce");
    let skipped = r["device_memory"]["skipped"].as_array().unwrap();
    // Each skipped strategy's reason as fields: the same answer the device's report gives.
    let peermem = &skipped.iter().find(|s| s["strategy"] == "peermem").expect("peermem has a reason")["reason"];
    assert_eq!(peermem["kind"], "unsupported", "{peermem}");
    assert_eq!(peermem["reason"]["kind"], "peer_mem_missing", "{peermem}");
    assert_eq!(peermem["reason"]["checked"].as_array().unwrap().len(), 3, "{peermem}");
    assert!(peermem["why"].as_str().unwrap().contains("not loaded"), "{peermem}");
    assert!(peermem["fix"].as_str().unwrap().contains("modprobe nvidia-peermem"));
    let dmabuf = &skipped.iter().find(|s| s["strategy"] == "dmabuf").expect("dma-buf has a reason")["reason"];
    assert_eq!(dmabuf["kind"], "unsupported", "{dmabuf}");
    // The plan is made on the first active device, whichever the kernel lists first: its
    // reason is that device's report, word for word.
    let planned_on = dmabuf["reason"]["device"].as_str().expect("the reason names its device");
    let planned_dev = r["devices"].as_array().unwrap().iter().find(|d| d["name"] == planned_on).unwrap();
    assert_eq!(dmabuf["reason"], planned_dev["dmabuf_mr"]["reason"], "the planner's reason is the device report's");
    assert_eq!(dmabuf["reason"]["kind"], dmabuf_mr["kind"]);
    assert!(dmabuf["why"].as_str().unwrap().contains("EOPNOTSUPP"), "{dmabuf}");
    let odp = &skipped.iter().find(|s| s["strategy"] == "odp").expect("ODP has a reason")["reason"];
    assert_eq!(*odp, serde_json::json!({"kind": "not_for_this_memory", "applies_to": "pageable_host_memory"}));
    let host_skipped = r["host_memory"]["skipped"].as_array().unwrap();
    let host_dmabuf = host_skipped.iter().find(|s| s["strategy"] == "dmabuf").expect("dma-buf has a reason");
    assert_eq!(host_dmabuf["reason"]["applies_to"], "exporting_backend_memory", "{host_dmabuf}");
    // The text form says the same to people.
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_p2pbridge")).arg("probe").output().unwrap();
    assert_eq!(text.status.code(), Some(0));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("chosen: pinned") && text.contains("chosen: bounce") && text.contains("OK: at least"),
        "{text}"
    );
    assert!(text.contains("dma-buf MRs: NO — ") && text.contains("not peermem: "), "{text}");
}
