//! dma-buf export of host memory through /dev/udmabuf, on the Soft-RoCE guest's kernel (which
//! has CONFIG_UDMABUF; our machines' kernel does not). Run by scripts/test's fabric pass.

use std::os::fd::AsFd;

use p2pbridge_gpu::{HostBackend, InvalidationReason, MemoryBackend};

#[test]
#[ignore = "needs /dev/udmabuf: scripts/test runs it in the Soft-RoCE guest"]
fn udmabuf_export_has_the_right_size_and_the_allocation_bytes() {
    HostBackend::udmabuf_support().expect("this test runs where /dev/udmabuf exists");
    let host = HostBackend::new();
    let page = host.granularity() as u64;
    let buf = host.alloc(4 * page as usize).unwrap();
    let pattern: Vec<u8> = (0..buf.len()).map(|i| (i * 7 % 251) as u8).collect();
    host.copy_to_device(&buf, 0, &pattern).unwrap();

    // A range that starts and ends inside pages is widened to whole pages.
    let (off, len) = (page + 100, 2 * page);
    let e = host.export_dmabuf(buf.addr() + off, len).unwrap();
    assert_eq!(e.offset(), 100);
    assert_eq!(e.dmabuf_len(), 3 * page);
    let st = rustix::fs::fstat(e.fd()).unwrap();
    let end = rustix::fs::seek(e.fd(), rustix::fs::SeekFrom::End(0)).unwrap();
    assert_eq!(end, 3 * page, "lseek(SEEK_END) on the dma-buf (fstat says {})", st.st_size);

    // The dma-buf maps the very pages of the allocation.
    // SAFETY: a fresh shared read-only mapping of the dma-buf, unmapped below.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            (3 * page) as usize,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::SHARED,
            e.fd().as_fd(),
            0,
        )
    }
    .unwrap();
    // SAFETY: the mapping is 3 pages long and live until munmap.
    let seen = unsafe { std::slice::from_raw_parts(p as *const u8, (3 * page) as usize) };
    assert!(seen == &pattern[page as usize..4 * page as usize], "dma-buf contents differ from the allocation");
    host.copy_to_device(&buf, page, b"changed").unwrap();
    assert_eq!(&seen[..7], b"changed", "the dma-buf does not share the allocation's pages");
    // SAFETY: unmapping what we mapped.
    unsafe { rustix::mm::munmap(p, (3 * page) as usize) }.unwrap();

    // Revoking tells the subscribers of the range.
    let (tx, rx) = std::sync::mpsc::channel();
    let _sub =
        host.notices().subscribe(buf.key(), 0..buf.len(), move |n| tx.send((n.reason, n.range.clone())).unwrap());
    assert_eq!(e.revoke(), 1);
    assert_eq!(rx.recv().unwrap(), (InvalidationReason::ExportRevoked, off..off + len));
}
