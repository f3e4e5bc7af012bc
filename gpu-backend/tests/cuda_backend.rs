//! The CUDA backend on a real GPU. Ignored where there is none (scripts/test says so and why);
//! run on a GPU machine with `scripts/test-gpu`.

use p2pbridge_gpu::{
    BackendKind, CudaBackend, Error, FlushOutcome, HostBackend, InvalidationReason, MemoryBackend, GPU_PAGE,
};

fn gpu() -> CudaBackend {
    CudaBackend::new(0).unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"))
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/test-gpu runs it on a GPU machine"]
fn cuda_alloc_identify_and_free() {
    let g = gpu();
    let buf = g.alloc(100_000).unwrap();
    assert_eq!(buf.len() % GPU_PAGE, 0);
    assert_eq!(buf.key().backend, BackendKind::Cuda);
    for off in [0u64, 1, 65_537, buf.len() - 1] {
        assert_eq!(g.identify(buf.addr() + off).unwrap(), Some(buf.info()), "offset {off}");
    }
    let host = [0u8; 16];
    assert_eq!(g.identify(host.as_ptr() as u64).unwrap(), None, "host memory is not CUDA device memory");
    let (addr, key) = (buf.addr(), buf.key());
    buf.free().unwrap();
    let again = g.alloc(100_000).unwrap();
    assert_ne!(again.key(), key, "a new allocation must get a new buffer id");
    if again.addr() == addr {
        assert_eq!(g.identify(addr).unwrap().unwrap().key, again.key());
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/test-gpu runs it on a GPU machine"]
fn cuda_copies_round_trip_patterns() {
    let g = gpu();
    for size in [1usize, 4096, 1 << 20, 64 << 20] {
        let buf = g.alloc(size).unwrap();
        let pattern: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        g.copy_to_device(&buf, 0, &pattern).unwrap();
        let mut back = vec![0u8; size];
        g.copy_from_device(&buf, 0, &mut back).unwrap();
        assert!(back == pattern, "{size} B came back changed");
        let stream = g.new_stream().unwrap();
        let mut back2 = vec![0u8; size];
        // SAFETY: both host slices outlive the synchronize below and are not touched before it.
        unsafe { g.copy_from_device_async(&buf, 0, &mut back2, &stream).unwrap() };
        stream.synchronize().unwrap();
        assert!(back2 == pattern);
        assert!(matches!(g.copy_to_device(&buf, buf.len(), &[1]), Err(Error::OutOfBounds { .. })));
    }
    // Host memory from another backend must not reach the driver as a device pointer.
    let host = HostBackend::new();
    let hb = host.alloc(4096).unwrap();
    let err = g.copy_to_device(&hb, 0, &[1]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("not CUDA device 0")), "{err}");
    let stream = g.new_stream().unwrap();
    let mut out = [0u8; 8];
    // SAFETY: refused before any copy is queued.
    let err = unsafe { g.copy_from_device_async(&hb, 0, &mut out, &stream) }.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// Prints the line by which scripts/test counts this test as skipped (not passed), with why.
fn skipped(test: &str, why: &str) {
    println!("SKIPPED {test}: {why}");
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/test-gpu runs it on a GPU machine"]
fn cuda_dmabuf_export_has_the_right_size() {
    let g = gpu();
    let buf = g.alloc(4 << 20).unwrap();
    if let Err(why) = g.dmabuf_support().unwrap() {
        return skipped(
            "cuda_dmabuf_export_has_the_right_size",
            &format!("this GPU or driver exports no dma-buf: {why}"),
        );
    }
    let e = g.export_dmabuf(buf.addr() + 8192, 1 << 20).unwrap();
    assert_eq!(e.offset(), 0);
    let end = rustix::fs::seek(e.fd(), rustix::fs::SeekFrom::End(0)).unwrap();
    assert_eq!(end, 1 << 20);
    let (tx, rx) = std::sync::mpsc::channel();
    let _s = g.notices().subscribe(buf.key(), 0..buf.len(), move |n| tx.send(n.reason).unwrap());
    assert_eq!(e.revoke(), 1);
    assert_eq!(rx.recv().unwrap(), InvalidationReason::ExportRevoked);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/test-gpu runs it on a GPU machine"]
fn cuda_dmabuf_export_is_refused_with_the_reason_where_unsupported() {
    let g = gpu();
    let buf = g.alloc(4 << 20).unwrap();
    let Err(why) = g.dmabuf_support().unwrap() else {
        return skipped(
            "cuda_dmabuf_export_is_refused_with_the_reason_where_unsupported",
            "this GPU exports dma-bufs (cuda_dmabuf_export_has_the_right_size checks them)",
        );
    };
    match g.export_dmabuf(buf.addr(), 4096) {
        Err(Error::ExportUnsupported(msg)) => assert_eq!(msg, why),
        other => panic!("dma-buf unsupported ({why}) but export gave {other:?}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/test-gpu runs it on a GPU machine"]
fn cuda_notices_come_before_free() {
    let g = gpu();
    let buf = g.alloc(1 << 20).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let g2 = g.clone();
    let base = buf.addr();
    let _s = g.notices().subscribe(buf.key(), 0..buf.len(), move |n| {
        // Still allocated while we are told.
        tx.send(g2.identify(base).unwrap().is_some()).unwrap();
        n.ack();
    });
    drop(buf);
    assert!(rx.recv().unwrap(), "the memory was gone before the notice");
}

/// The NIC-write flush does what the device's attributes call for: nothing where the device
/// orders NIC writes before its own reads, `cuFlushGPUDirectRDMAWrites` where it supports
/// that, and a refusal with the reason where it does neither.
#[test]
#[ignore = "needs a CUDA GPU: scripts/test-gpu runs it on a GPU machine"]
fn cuda_flush_follows_the_devices_write_ordering() {
    use cudarc::driver::{result, sys};
    let g = gpu();
    // CudaBackend::new initialised the driver; device 0 exists (it opened it).
    let dev = result::device::get(0).unwrap();
    // SAFETY: as above; plain attribute queries.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap();
    let ordering = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING);
    let options = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS);
    let owner = sys::CUGPUDirectRDMAWritesOrdering::CU_GPU_DIRECT_RDMA_WRITES_ORDERING_OWNER as i32;
    let host = sys::CUflushGPUDirectRDMAWritesOptions::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_OPTION_HOST as i32;
    let got = g.flush_nic_writes();
    if ordering >= owner {
        assert!(matches!(got, Ok(FlushOutcome::NotNeeded(_))), "ordering {ordering}: {got:?}");
    } else if options & host != 0 {
        assert!(matches!(got, Ok(FlushOutcome::Flushed)), "flush options {options:#x}: {got:?}");
    } else {
        assert!(matches!(got, Err(Error::FlushUnsupported(_))), "neither: {got:?}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/test-gpu runs it on a GPU machine"]
fn cuda_managed_memory_is_refused_not_mistaken() {
    use cudarc::driver::{result, sys};
    let g = gpu();
    // SAFETY: the primary context is current on this thread (CudaBackend::new bound it); the
    // memory is freed below and never read through Rust.
    let managed = unsafe { result::malloc_managed(1 << 20, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }.unwrap();
    let err = g.identify(managed + 4096).unwrap_err();
    assert!(matches!(err, Error::ManagedMemory(a) if a == managed + 4096), "{err}");
    assert!(matches!(
        g.export_dmabuf(managed, 1 << 20),
        Err(Error::ManagedMemory(_)) | Err(Error::ExportUnsupported(_))
    ));
    // SAFETY: allocated above, freed once.
    unsafe { result::free_sync(managed) }.unwrap();
}
