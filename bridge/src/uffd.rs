//! The host-memory monitor: a userfaultfd that reports when registered host ranges are
//! unmapped (`munmap`), moved (`mremap`) or dropped (`madvise(MADV_DONTNEED)`), so the cache
//! can drop registrations of memory that is gone — as libfabric's uffd monitor does.
//!
//! One monitor serves the whole process (a range can be registered with one userfaultfd
//! only); bridges subscribe to it. Ranges are registered in `UFFDIO_REGISTER_MODE_MISSING`
//! (the only mode every kernel with the non-cooperative events has), so a fault on a missing
//! page of a watched range is delivered here: the monitor resolves every such fault with
//! `UFFDIO_ZEROPAGE`, which is what the kernel itself would have done for anonymous memory and
//! for memfd/shm memory that was never written.
//!
//! The event thread never waits for in-flight RDMA (a faulting thread may need it): it removes
//! the cache entries, and each registration is deregistered when its last user lets go.
//! Until then a pinned MR keeps the *old* pages, so new memory mapped at the same address is
//! never reachable through the old key.

use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::error::{Error, Result};

// From <linux/userfaultfd.h>.
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 1;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F; // _IOWR(0xAA, 0x3F, struct uffdio_api)
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00; // _IOWR(0xAA, 0x00, struct uffdio_register)
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01; // _IOR(0xAA, 0x01, struct uffdio_range)
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04; // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: the event byte, padding, and 24 bytes of arguments.
#[repr(C)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg: [u64; 3],
}

/// What a subscriber is told: this host range no longer holds the memory it registered.
pub(crate) type OnGone = Box<dyn Fn(Range<u64>) + Send + Sync>;

struct Monitor {
    fd: OwnedFd,
    subscribers: Mutex<Vec<(Weak<()>, Arc<OnGone>)>>,
}

static MONITOR: OnceLock<std::result::Result<Arc<Monitor>, String>> = OnceLock::new();

fn page() -> u64 {
    rustix::param::page_size() as u64
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &'static str) -> Result<()> {
    // SAFETY: every request used here takes a pointer to the struct type it is called with
    // (see the constants' definitions from <linux/userfaultfd.h>).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if rc < 0 {
        return Err(Error::Monitor(format!("{what}: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

fn start() -> std::result::Result<Arc<Monitor>, String> {
    // SAFETY: userfaultfd(2) takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "userfaultfd(2): {e} (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 for this use; kernel >= 4.11)"
        ));
    }
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_REMAP,
        ioctls: 0,
    };
    ioctl(&fd, UFFDIO_API, &mut api, "UFFDIO_API").map_err(|e| e.to_string())?;
    let m = Arc::new(Monitor { fd, subscribers: Mutex::new(Vec::new()) });
    let weak = Arc::downgrade(&m);
    std::thread::Builder::new()
        .name("p2pbridge-uffd".into())
        .spawn(move || event_loop(weak))
        .map_err(|e| format!("cannot start the monitor thread: {e}"))?;
    Ok(m)
}

fn monitor() -> Result<Arc<Monitor>> {
    MONITOR.get_or_init(start).clone().map_err(Error::Monitor)
}

/// Whether the monitor can run here, and if not, why.
pub fn monitor_available() -> std::result::Result<(), String> {
    monitor().map(drop).map_err(|e| e.to_string())
}

fn event_loop(m: Weak<Monitor>) {
    loop {
        let Some(m) = m.upgrade() else { return };
        let mut pfd = libc::pollfd { fd: m.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; a timeout lets the thread notice when the monitor is gone.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if n <= 0 {
            continue;
        }
        let mut msg = UffdMsg { event: 0, _reserved1: 0, _reserved2: 0, _reserved3: 0, arg: [0; 3] };
        // SAFETY: reads at most one uffd_msg (32 bytes) into `msg`, which is that size.
        let r =
            unsafe { libc::read(m.fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), std::mem::size_of::<UffdMsg>()) };
        if r != std::mem::size_of::<UffdMsg>() as isize {
            continue;
        }
        match msg.event {
            UFFD_EVENT_PAGEFAULT => resolve_fault(&m, msg.arg[1]),
            UFFD_EVENT_UNMAP | UFFD_EVENT_REMOVE => {
                let (start, end) = (msg.arg[0], msg.arg[1]);
                if msg.event == UFFD_EVENT_REMOVE {
                    // MADV_DONTNEED: the range stays mapped; stop watching it with its old pages.
                    let mut r = UffdioRange { start, len: end - start };
                    let _ = ioctl(&m.fd, UFFDIO_UNREGISTER, &mut r, "UFFDIO_UNREGISTER");
                }
                notify(&m, start..end);
            }
            UFFD_EVENT_REMAP => {
                let (from, len) = (msg.arg[0], msg.arg[2]);
                notify(&m, from..from + len);
            }
            _ => {}
        }
    }
}

fn resolve_fault(m: &Monitor, addr: u64) {
    let start = addr / page() * page();
    loop {
        let mut z = UffdioZeropage { range: UffdioRange { start, len: page() }, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE takes a uffdio_zeropage; the range is the faulting page.
        let rc = unsafe { libc::ioctl(m.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z as *mut UffdioZeropage) };
        // EAGAIN: the mapping changed under us; try again (the kernel will settle it).
        if rc == 0 || z.zeropage != -(libc::EAGAIN as i64) {
            return;
        }
    }
}

fn notify(m: &Monitor, range: Range<u64>) {
    let subs: Vec<Arc<OnGone>> = {
        let mut s = m.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|(alive, _)| alive.strong_count() > 0);
        s.iter().map(|(_, f)| f.clone()).collect()
    };
    for f in subs {
        f(range.clone());
    }
}

/// A bridge's subscription to the monitor; dropping it (the bridge) unsubscribes.
pub(crate) struct Watch {
    _alive: Arc<()>,
}

/// Subscribes `on_gone` to the process's monitor (starting it if needed).
pub(crate) fn subscribe(on_gone: OnGone) -> Result<Watch> {
    let m = monitor()?;
    let alive = Arc::new(());
    m.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push((Arc::downgrade(&alive), Arc::new(on_gone)));
    Ok(Watch { _alive: alive })
}

/// Starts watching the pages that cover `range` (idempotent for ranges already watched).
pub(crate) fn watch(range: Range<u64>) -> Result<()> {
    let m = monitor()?;
    let start = range.start / page() * page();
    let end = range.end.div_ceil(page()) * page();
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len: end - start },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(&m.fd, UFFDIO_REGISTER, &mut reg, "UFFDIO_REGISTER (is the range anonymous or shared memory?)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn map(len: usize) -> u64 {
        // SAFETY: a fresh private anonymous mapping.
        unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .expect("mmap") as u64
    }

    #[test]
    fn munmap_madvise_and_mremap_of_watched_memory_are_reported_and_faults_resolved() {
        if let Err(why) = monitor_available() {
            panic!("userfaultfd is needed here (root, kernel >= 4.11): {why}");
        }
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let _w = subscribe(Box::new(move |r| {
            let _ = tx.lock().unwrap().send(r);
        }))
        .unwrap();
        let p = page();
        let len = 4 * p as usize;
        let seen = |rx: &mpsc::Receiver<Range<u64>>, want: Range<u64>| loop {
            let r = rx.recv_timeout(Duration::from_secs(5)).expect("no event from the monitor");
            if r.start <= want.start && r.end >= want.end {
                return;
            }
        };

        // A watched range whose pages were never touched: faults are resolved (zero pages).
        let a = map(len);
        watch(a..a + len as u64).unwrap();
        // SAFETY: our mapping; writing and reading it must not hang.
        unsafe {
            std::ptr::write_volatile((a + p) as *mut u8, 7);
            assert_eq!(std::ptr::read_volatile((a + p) as *const u8), 7);
            assert_eq!(std::ptr::read_volatile((a + 2 * p) as *const u8), 0);
        }
        // madvise(MADV_DONTNEED) on part of it.
        // SAFETY: our mapping.
        unsafe { rustix::mm::madvise((a + p) as *mut _, p as usize, rustix::mm::Advice::LinuxDontNeed) }.unwrap();
        seen(&rx, a + p..a + 2 * p);
        // munmap of the rest.
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
        seen(&rx, a..a + len as u64);

        // mremap moves it (into a reserved range, so it must move).
        let b = map(len);
        let target = map(len);
        watch(b..b + len as u64).unwrap();
        // SAFETY: our mappings; `b` is moved over `target` and then unmapped by us.
        unsafe {
            std::ptr::write_volatile(b as *mut u8, 1);
            let nb = libc::mremap(
                b as *mut _,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target as *mut libc::c_void,
            );
            assert_eq!(nb as u64, target);
            seen(&rx, b..b + len as u64);
            assert_eq!(std::ptr::read_volatile(target as *const u8), 1);
            libc::munmap(nb, len);
        }
    }
}
