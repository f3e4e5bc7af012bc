//! A stress run of the host-memory monitor through the public API, in the Soft-RoCE guest:
//! threads register host memory, fault its pages in, unmap or drop parts of it, and fork, at
//! random (fixed seeds), for `P2PB_STRESS_SECS` seconds (120 by default).
//!
//! Each thread works in an address range of its own and maps each round's memory with
//! MAP_FIXED, so an address is reused as soon as it was given up; memory "goes" by `munmap`
//! in forked children and by PROT_NONE memory mapped over it in the parent (an unmap to the
//! monitor, without opening a hole that another thread's allocations could land in).
//!
//! What must hold: nothing hangs (a watchdog fails the run when no thread makes progress for
//! 30 s); once the monitor has caught up (`sync_monitor`), every registration over memory that
//! was unmapped or dropped is dead, and no registration dies while its memory is mapped (a
//! registration made after an unmap never finds the old memory's); a forked child's unmaps revoke nothing in the parent, and
//! every child finishes; and when the bridge is gone no memory region is left in the kernel.

use p2pbridge_test_support::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pbridge::verbs::{AccessFlags, Context, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions, Error, Registered};
use p2pbridge_test_support::fabric::{kernel_count, SoftRoce};

fn page() -> u64 {
    rustix::param::page_size() as u64
}

/// Each thread's own address range: rounds map memory in it with MAP_FIXED, so addresses are
/// reused at once (what the monitor must get right), and "unmapping" maps PROT_NONE over the
/// memory (an unmap to the monitor) so that no hole ever opens for other threads' mappings
/// to land in.
const SLOTS: u64 = 64;
const SLOT_PAGES: u64 = 16;

fn reserve(len: u64) -> u64 {
    // SAFETY: a fresh private anonymous mapping, no access.
    unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len as usize,
            rustix::mm::ProtFlags::empty(),
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
        )
    }
    .expect("mmap") as u64
}

/// Maps `len` bytes of fresh memory at `at` (inside the thread's reservation), replacing what
/// was there: to the monitor, an unmap of the old memory.
fn map_at(at: u64, len: u64, prot: rustix::mm::ProtFlags) {
    // SAFETY: `at..at+len` lies in the calling thread's own reservation; MAP_FIXED replaces it.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            at as *mut _,
            len as usize,
            prot,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED,
        )
    }
    .expect("mmap(MAP_FIXED)");
    assert_eq!(p as u64, at);
}

fn rw() -> rustix::mm::ProtFlags {
    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
}

/// Takes the memory away: PROT_NONE memory mapped over it.
fn unmap(at: u64, len: u64) {
    map_at(at, len, rustix::mm::ProtFlags::empty());
}

fn touch(addr: u64, pages: u64, v: u8) {
    for i in 0..pages {
        // SAFETY: the caller's own mapping, still mapped.
        unsafe { std::ptr::write_volatile((addr + i * page()) as *mut u8, v) };
    }
}

fn dead(r: &Registered) -> bool {
    matches!(r.lock(), Err(Error::Revoked))
}

/// One round: a mapping, a few registrations in it, then one way for (part of) it to go.
fn round(bridge: &Bridge, base: u64, rng: &mut Rng, forks: &AtomicU64) {
    let p = page();
    let pages = 2 + rng.below(SLOT_PAGES - 1);
    let len = pages * p;
    let a = base + rng.below(SLOTS) * SLOT_PAGES * p;
    map_at(a, len, rw());
    if rng.below(2) == 0 {
        touch(a, pages, 1); // some rounds register memory never touched
    }
    let regs: Vec<(u64, u64, Registered)> = (0..1 + rng.below(4))
        .map(|_| {
            let first = rng.below(pages);
            let n = 1 + rng.below(pages - first);
            let (at, l) = (a + first * p, n * p);
            // SAFETY: the range is this round's own mapping; the monitor revokes the
            // registration when it goes.
            let r = unsafe { bridge.register_host(at, l, AccessFlags::remote_rw()) }
                .unwrap_or_else(|e| panic!("register_host({at:#x}, {l}): {e}"));
            (at, l, r)
        })
        .collect();
    touch(a, pages, 2); // faults on registered pages, never trapped
    for (at, l, r) in &regs {
        assert!(!dead(r), "registration {at:#x}+{l} died while its memory is mapped");
    }
    match rng.below(4) {
        // All of it unmapped: every registration dies.
        0 => {
            unmap(a, len);
            bridge.sync_monitor().unwrap();
            for (at, l, r) in &regs {
                assert!(dead(r), "registration {at:#x}+{l} outlived the munmap of its memory");
            }
            return;
        }
        // One page unmapped, or its contents dropped: what covers it dies.
        1 | 2 => {
            let victim = a + rng.below(pages) * p;
            if rng.below(2) == 0 {
                unmap(victim, p);
            } else {
                // SAFETY: this round's mapping.
                unsafe { rustix::mm::madvise(victim as *mut _, p as usize, rustix::mm::Advice::LinuxDontNeed) }
                    .unwrap();
            }
            bridge.sync_monitor().unwrap();
            for (at, l, r) in &regs {
                if *at < victim + p && victim < at + l {
                    assert!(dead(r), "registration {at:#x}+{l} outlived its page {victim:#x}");
                }
            }
        }
        // A child unmaps its copy: nothing of ours is revoked, and the child finishes.
        _ => {
            forks.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the child runs only async-signal-safe calls on its copy, then _exits.
            match unsafe { libc::fork() } {
                // SAFETY: in the child, its own copy of `a` (mapped, `len` bytes): written,
                // unmapped, then `_exit` (async-signal-safe calls only).
                0 => unsafe {
                    std::ptr::write_volatile(a as *mut u8, 9);
                    libc::munmap(a as *mut _, len as usize);
                    libc::_exit(0);
                },
                pid => {
                    assert!(pid > 0, "fork failed");
                    let t = Instant::now();
                    let mut status = 0;
                    // SAFETY: our own child.
                    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
                        if t.elapsed() > Duration::from_secs(10) {
                            // SAFETY: our own child.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                            panic!("a forked child hung on watched memory");
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child: status {status}");
                    bridge.sync_monitor().unwrap();
                    for (at, l, r) in &regs {
                        assert!(!dead(r), "a child's munmap revoked the parent's registration {at:#x}+{l}");
                    }
                }
            }
        }
    }
    // Registrations dropped before their memory goes (and so unwatched, unless another
    // registration still needs the pages).
    drop(regs);
    unmap(a, len);
}

#[test]
#[ignore = "needs an RDMA device and userfaultfd: scripts/test runs it on Soft-RoCE (P2PB_STRESS_SECS, default 120 s)"]
fn guest_monitor_stress_register_fault_unmap_fork() {
    let fab = SoftRoce::from_env().expect("this test needs the Soft-RoCE fabric: run it through scripts/softroce");
    let secs: u64 = std::env::var("P2PB_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    p2pbridge::monitor_available().expect("the guest has userfaultfd");
    let dev = fab.a.device.clone();
    let mrs_before = kernel_count(&dev, "mr").unwrap();
    let pd = ProtectionDomain::new(&Context::open(&dev).unwrap()).unwrap();
    let bridge = Arc::new(Bridge::new(&pd, vec![], BridgeOptions::default()).unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let forks = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let (bridge, stop, rounds, forks) = (bridge.clone(), stop.clone(), rounds.clone(), forks.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                let base = reserve(SLOTS * SLOT_PAGES * page());
                while !stop.load(Ordering::Relaxed) {
                    round(&bridge, base, &mut rng, &forks);
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let end = Instant::now() + Duration::from_secs(secs);
    let (mut last, mut last_change) = (0, Instant::now());
    while Instant::now() < end && workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        let now = rounds.load(Ordering::Relaxed);
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
        assert!(last_change.elapsed() < Duration::from_secs(30), "no round finished for 30 s: the monitor hangs");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a stress thread failed (its message is above)");
    }
    let (n, f) = (rounds.load(Ordering::Relaxed), forks.load(Ordering::Relaxed));
    println!("monitor stress: {n} rounds, {f} forks in {secs} s, 4 threads");
    assert!(n > 0);
    drop(bridge);
    drop(pd);
    assert_eq!(kernel_count(&dev, "mr").unwrap(), mrs_before, "memory regions left in the kernel");
}
