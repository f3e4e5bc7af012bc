//! The host-memory monitor: a userfaultfd that reports when watched host memory is unmapped
//! (`munmap`), moved (`mremap`) or dropped (`madvise(MADV_DONTNEED)`), so that the bridges
//! revoke the registrations over it — as libfabric's uffd monitor does.
//!
//! One monitor serves the whole process (a range can be registered with one userfaultfd
//! only); bridges subscribe to it.
//!
//! **It never traps the NIC.** Ranges are registered in `UFFDIO_REGISTER_MODE_WP` and nothing
//! is ever write-protected: the registration only subscribes the memory to the non-cooperative
//! UNMAP, REMOVE and REMAP events. Page faults — the CPU's and the NIC's ODP faults alike — are
//! the kernel's as if the monitor were not there. (`MODE_MISSING`, which every such kernel
//! has, would hand every fault on an untouched page to the monitor, and an ODP NIC's fault is
//! refused instead: the peer's first WRITE fails with `IBV_WC_REM_ACCESS_ERR`.) Where the
//! kernel has no WP mode for the memory (anonymous memory needs Linux 5.7, shmem 5.19), the
//! range is populated first (`MADV_POPULATE_WRITE`, so neither the CPU nor the NIC meets a
//! missing page) and registered in MISSING mode; a fault that still comes is resolved with a
//! zero page, or woken to retry, never spun on.
//!
//! **Two threads.** A *reader* reads every event the moment it comes (a thread that unmaps
//! watched memory waits until its event has been read), resolves page faults itself, and
//! queues the rest in a ring of fixed size; it never allocates, frees, takes another lock
//! than the ring's and the sync counter's (held by no one who waits for it), or runs a subscriber, so nothing it does can unmap watched memory and
//! wait on itself. A *worker* acts on the queued events: it runs the subscribers, which revoke
//! registrations and may free or unmap watched memory themselves (the reader reads those
//! events meanwhile). A full ring folds new events into its newest one (their hull, acted on
//! as an unmap: more is revoked, never less).
//!
//! **Watched intervals, counted.** Each registration of host memory holds a [`Watched`] token
//! for its pages. Ranges within 64 MiB of watched ones are registered as one interval with
//! them, gap included, where the memory allows (else exactly the pages), so page-strided
//! registrations in one mapping do not split it into a VMA each (`vm.max_map_count` would
//! bound them). Memory in a gap is watched too; its unmaps are events that revoke nothing.
//! When the last token of an interval goes (the registration was evicted, invalidated, or
//! failed), the interval is unregistered. Tokens find their interval by id through merges;
//! an interval carved by an unmap keeps its count for the pieces left (see `Watchlist`), so a
//! count can be too high (an interval stays watched longer) but never too low.
//!
//! **Fork.** `UFFD_FEATURE_EVENT_FORK` is not asked for: a child's memory is not watched, and
//! the child never waits on this process's monitor.
//!
//! **Latency.** `munmap` returns once the reader has *read* its event, and the revocation
//! follows within microseconds; [`sync`] waits until every event already read is acted on.
//! The worker never waits for a registration's holders: the bridge's subscriber revokes the
//! keys at the NIC at once and leaves the region's deregistration, where an operation or a
//! `LocalGuard` still holds it, to the teardown thread (`teardown.rs`). It survives a
//! panicking subscriber.
//!
//! Pinned memory (the default for [`Bridge::register_host`](crate::Bridge::register_host))
//! keeps a stale key's WRITE in the old pages between `munmap` returning and the revocation;
//! ODP memory, an explicit opt-in, lets it reach what is mapped there next
//! ([`crate::strategy::HOST_ODP_WINDOW`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};

use linux_raw_sys::general as uapi;
use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode, Updater};

use crate::error::{Error, Result};

const UFFDIO_API: Opcode = opcode::read_write::<uapi::uffdio_api>(uapi::UFFDIO as u8, uapi::_UFFDIO_API as u8);
const UFFDIO_REGISTER: Opcode =
    opcode::read_write::<uapi::uffdio_register>(uapi::UFFDIO as u8, uapi::_UFFDIO_REGISTER as u8);
const UFFDIO_UNREGISTER: Opcode =
    opcode::read::<uapi::uffdio_range>(uapi::UFFDIO as u8, uapi::_UFFDIO_UNREGISTER as u8);
const UFFDIO_WAKE: Opcode = opcode::read::<uapi::uffdio_range>(uapi::UFFDIO as u8, uapi::_UFFDIO_WAKE as u8);
const UFFDIO_ZEROPAGE: Opcode =
    opcode::read_write::<uapi::uffdio_zeropage>(uapi::UFFDIO as u8, uapi::_UFFDIO_ZEROPAGE as u8);

/// The events the monitor lives on. Not `EVENT_FORK` (see the module documentation).
const FEATURES: u64 =
    (uapi::UFFD_FEATURE_EVENT_UNMAP | uapi::UFFD_FEATURE_EVENT_REMOVE | uapi::UFFD_FEATURE_EVENT_REMAP) as u64;
/// Asked for where the kernel has it: WP registration of shmem (memfd) memory.
const OPTIONAL: u64 = uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
/// `sizeof(struct uffd_msg)`.
const MSG: usize = 32;

/// What a subscriber is told: this host range no longer holds the memory it registered.
pub(crate) type OnGone = Box<dyn Fn(Range<u64>) + Send + Sync>;

/// How a range is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Write-protect mode with nothing protected: events only, no fault ever trapped.
    Wp,
    /// Missing mode over populated pages (kernels without WP for the memory).
    Missing,
}

/// A watched interval: page-aligned, its mode, and how many [`Watched`] tokens were counted
/// in it (never fewer than live tokens resolve to it: see [`Watchlist`]).
#[derive(Debug, Clone, Copy)]
struct Interval {
    end: u64,
    mode: Mode,
    refs: u64,
    id: u64,
}

/// The watched intervals and the bookkeeping that lets a token find the interval it was
/// counted in.
///
/// A token records the id of the interval that counted it. Merging intervals into a new one
/// carries their counts into it and forwards their ids to it. Carving an interval (its memory
/// went) gives the pieces new ids that nothing forwards to: tokens of the old interval then
/// decrement nothing, so a piece's count can only be too high (it stays watched until
/// unmapped: a cost in VMAs, never a range unwatched under a live registration).
#[derive(Default)]
struct Watchlist {
    intervals: BTreeMap<u64, Interval>,
    /// Interval id -> its start.
    by_id: HashMap<u64, u64>,
    /// Merged interval id -> the id it was merged into.
    forward: HashMap<u64, u64>,
    /// Live interval id -> ids forwarded to it (pruned with it).
    merged: HashMap<u64, Vec<u64>>,
    next_id: u64,
}

impl Watchlist {
    fn fresh(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn put(&mut self, start: u64, iv: Interval) {
        self.by_id.insert(iv.id, start);
        self.intervals.insert(start, iv);
    }

    fn take(&mut self, start: u64) -> Option<Interval> {
        let iv = self.intervals.remove(&start)?;
        self.by_id.remove(&iv.id);
        Some(iv)
    }

    /// Watched intervals overlapping `r`.
    fn overlapping(&self, r: &Range<u64>) -> Vec<(Range<u64>, Interval)> {
        let first = self.intervals.range(..=r.start).next_back().map(|(&s, _)| s).unwrap_or(r.start);
        self.intervals
            .range(first..r.end)
            .map(|(&s, &iv)| (s..iv.end, iv))
            .filter(|(x, _)| x.end > r.start && x.start < r.end)
            .collect()
    }

    /// The live interval that counted a token of `id` (following merges), if any.
    fn resolve(&self, mut id: u64) -> Option<(u64, Interval)> {
        while let Some(&n) = self.forward.get(&id) {
            id = n;
        }
        let start = *self.by_id.get(&id)?;
        self.intervals.get(&start).map(|&iv| (start, iv))
    }

    /// Forgets a removed interval's forwarding records.
    fn prune(&mut self, id: u64) {
        let mut stack = vec![id];
        while let Some(i) = stack.pop() {
            for o in self.merged.remove(&i).unwrap_or_default() {
                self.forward.remove(&o);
                stack.push(o);
            }
        }
    }

    /// Takes `r` out of the watched intervals, keeping what lies outside it as pieces with
    /// fresh ids and the old counts (see the type's notes).
    fn carve(&mut self, r: &Range<u64>) {
        for (x, iv) in self.overlapping(r) {
            self.take(x.start);
            self.prune(iv.id);
            if x.start < r.start {
                let id = self.fresh();
                self.put(x.start, Interval { end: r.start, id, ..iv });
            }
            if x.end > r.end {
                let id = self.fresh();
                self.put(r.end, Interval { id, ..iv });
            }
        }
    }

    /// Records `r` (just registered in `mode`) as one interval counting one new token plus
    /// the tokens of the intervals it replaces: it keeps the id of the largest of them (a range
    /// growing by strides stays one id) and the others' ids are forwarded to it; the parts of
    /// intervals reaching outside `r` stay as pieces with fresh ids (as in `carve`). Returns
    /// the interval's id.
    fn insert(&mut self, r: Range<u64>, mode: Mode) -> u64 {
        let old = self.overlapping(&r);
        // Saturating: an interval replaced in part is counted both here and in its pieces, so
        // counts of ranges registered again and again in overlapping parts can only grow (they
        // then stay watched until unmapped).
        let refs = old.iter().fold(1u64, |n, (_, iv)| n.saturating_add(iv.refs));
        let id = match old.iter().max_by_key(|(x, _)| x.end - x.start) {
            Some((_, iv)) => iv.id,
            None => self.fresh(),
        };
        for (x, iv) in &old {
            self.take(x.start);
            if iv.id != id {
                self.forward.insert(iv.id, id);
                self.merged.entry(id).or_default().push(iv.id);
            }
            if x.start < r.start {
                let pid = self.fresh();
                self.put(x.start, Interval { end: r.start, id: pid, ..*iv });
            }
            if x.end > r.end {
                let pid = self.fresh();
                self.put(r.end, Interval { id: pid, ..*iv });
            }
        }
        self.put(r.start, Interval { end: r.end, mode, refs, id });
        id
    }
}

/// What the reader hands the worker: an event to act on (`kind` is the uffd event), with the
/// sequence number of the last event it stands for.
#[derive(Debug, Clone, Copy, Default)]
struct Event {
    kind: u32,
    range: (u64, u64),
    seq: u64,
}

/// Events read and not yet acted on: a ring of fixed capacity, so that the reader never
/// allocates or frees (see the module documentation).
struct Queue {
    ring: Box<[Event]>,
    head: usize,
    len: usize,
    /// Events read so far (the sequence number of the last one).
    read: u64,
    /// Events acted on so far.
    done: u64,
    /// The latest sync request the reader has drained for, and the event count it drained to.
    drained_for: (u64, u64),
}

const QUEUE: usize = 1 << 16;

impl Queue {
    /// Queues an event; when the ring is full, the event is folded into the newest one (their
    /// hull, as an unmap: the worker then revokes at least what both cover — more is safe, but
    /// it revokes registrations of memory that did not go, so the reader first waits for room
    /// where it can: see [`room`]).
    fn push(&mut self, kind: u32, range: (u64, u64)) {
        self.read += 1;
        if self.len == self.ring.len() {
            let last = (self.head + self.len - 1) % self.ring.len();
            let e = &mut self.ring[last];
            *e = Event {
                kind: uapi::UFFD_EVENT_UNMAP,
                range: (e.range.0.min(range.0), e.range.1.max(range.1)),
                seq: self.read,
            };
            return;
        }
        let at = (self.head + self.len) % self.ring.len();
        self.ring[at] = Event { kind, range, seq: self.read };
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Event> {
        if self.len == 0 {
            return None;
        }
        let e = self.ring[self.head];
        self.head = (self.head + 1) % self.ring.len();
        self.len -= 1;
        Some(e)
    }
}

struct Monitor {
    fd: OwnedFd,
    /// Wakes the reader for [`sync`].
    wake: OwnedFd,
    subscribers: Mutex<Vec<(Weak<()>, Arc<OnGone>)>>,
    /// Watched intervals (page-aligned, disjoint).
    watched: Mutex<Watchlist>,
    /// From the reader to the worker.
    queue: Mutex<Queue>,
    /// Signalled when the queue gains events.
    queued: Condvar,
    /// Signalled when the worker takes an event (room in the ring).
    space: Condvar,
    /// Set while the worker runs the subscribers.
    in_callback: AtomicBool,
    /// (sync requests made, sync requests served).
    sync: Mutex<(u64, u64)>,
    synced: Condvar,
    /// Set while the reader drains the descriptor; with `read` and `done` it tells
    /// [`settled`] whether an event may be read and not yet acted on.
    reading: AtomicBool,
    /// Events read, and events acted on (mirrors of the queue's counters, for [`settled`]).
    read: AtomicU64,
    done: AtomicU64,
}

static MONITOR: OnceLock<std::result::Result<Arc<Monitor>, String>> = OnceLock::new();

fn page() -> u64 {
    rustix::param::page_size() as u64
}

fn err(what: &str, e: Errno) -> Error {
    Error::Monitor(format!("{what}: {}", std::io::Error::from(e)))
}

fn uffd() -> std::result::Result<OwnedFd, String> {
    // SAFETY: the descriptor is kept by this module, which registers only ranges its callers
    // handed it and never resolves a fault with anything but a zero page or a wake.
    unsafe { rustix::mm::userfaultfd(rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK) }
        .map_err(|e| {
            format!(
            "userfaultfd(2): {} (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 for this use; kernel >= 4.11)",
            std::io::Error::from(e)
        )
        })
}

fn api(fd: &OwnedFd, features: u64) -> std::result::Result<u64, String> {
    let mut a = uapi::uffdio_api { api: uapi::UFFD_API as u64, features, ioctls: 0 };
    // SAFETY: UFFDIO_API takes a struct uffdio_api, read and written.
    unsafe { rustix::ioctl::ioctl(fd, Updater::<UFFDIO_API, _>::new(&mut a)) }
        .map_err(|e| format!("UFFDIO_API: {}", std::io::Error::from(e)))?;
    Ok(a.features)
}

fn start() -> std::result::Result<Arc<Monitor>, String> {
    // What the kernel offers: a first descriptor asks for nothing and is told (UFFDIO_API can
    // be called once per descriptor).
    let offered = api(&uffd()?, 0)?;
    if offered & FEATURES != FEATURES {
        return Err(format!(
            "this kernel's userfaultfd lacks the UNMAP/REMOVE/REMAP events (features {offered:#x}; needs Linux >= 4.11)"
        ));
    }
    let fd = uffd()?;
    api(&fd, FEATURES | (offered & OPTIONAL))?;
    let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
        .map_err(|e| format!("eventfd: {}", std::io::Error::from(e)))?;
    let m = Arc::new(Monitor {
        fd,
        wake,
        subscribers: Mutex::new(Vec::new()),
        watched: Mutex::new(Watchlist::default()),
        queue: Mutex::new(Queue {
            ring: vec![Event::default(); QUEUE].into_boxed_slice(),
            head: 0,
            len: 0,
            read: 0,
            done: 0,
            drained_for: (0, 0),
        }),
        queued: Condvar::new(),
        space: Condvar::new(),
        in_callback: AtomicBool::new(false),
        sync: Mutex::new((0, 0)),
        synced: Condvar::new(),
        reading: AtomicBool::new(false),
        read: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    let (r, w) = (Arc::downgrade(&m), Arc::downgrade(&m));
    std::thread::Builder::new()
        .name("p2pbridge-uffd".into())
        .spawn(move || reader(r))
        .map_err(|e| format!("cannot start the monitor's reader thread: {e}"))?;
    std::thread::Builder::new()
        .name("p2pbridge-uffd-work".into())
        .spawn(move || worker(w))
        .map_err(|e| format!("cannot start the monitor's worker thread: {e}"))?;
    Ok(m)
}

fn monitor() -> Result<Arc<Monitor>> {
    MONITOR.get_or_init(start).clone().map_err(Error::Monitor)
}

/// Whether the monitor can run here, and if not, why.
pub fn monitor_available() -> std::result::Result<(), String> {
    monitor().map(drop).map_err(|e| e.to_string())
}

/// The reader: reads every event as soon as it comes — a thread that unmaps watched memory
/// waits until its event is *read* — resolves page faults itself, and queues the rest for the
/// worker. It never allocates, frees, takes the `watched` lock or runs a subscriber (it takes
/// only the ring's and the sync counter's locks, whose holders never wait for it), so
/// nothing it does can unmap watched memory and wait on itself.
fn reader(m: Weak<Monitor>) {
    let mut buf = [0u8; MSG * 16];
    loop {
        let Some(m) = m.upgrade() else { return };
        {
            let mut fds = [PollFd::new(&m.fd, PollFlags::IN), PollFd::new(&m.wake, PollFlags::IN)];
            // A timeout lets the thread notice when the monitor is gone.
            let _ = rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 }));
        }
        // Sync requests made before this drain are served once what it reads is acted on. The
        // wake-up is consumed first, then the requests read: a request made after the read
        // finds its wake-up still pending (the next poll returns at once), never lost.
        let mut eventfd_count = [0u8; 8];
        let _ = rustix::io::read(&m.wake, &mut eventfd_count);
        let asked = m.sync.lock().unwrap_or_else(|e| e.into_inner()).0;
        {
            // Every munmap that returned before those requests had its event read — and, as
            // this thread pushes a batch before it comes back here, queued: the requests are
            // served once the events queued so far are acted on (not the rest of this drain).
            let mut q = m.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.drained_for = (asked.max(q.drained_for.0), q.read);
        }
        m.reading.store(true, Ordering::SeqCst);
        loop {
            let n = match rustix::io::read(&m.fd, &mut buf) {
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(_) => break, // EAGAIN: nothing more to read now
            };
            if n == 0 {
                break;
            }
            let mut q = m.queue.lock().unwrap_or_else(|e| e.into_inner());
            for msg in buf[..n].chunks_exact(MSG) {
                q = room(&m, q);
                match u32::from(msg[0]) {
                    uapi::UFFD_EVENT_PAGEFAULT => resolve_fault(&m, arg(msg, 1)),
                    k @ (uapi::UFFD_EVENT_UNMAP | uapi::UFFD_EVENT_REMOVE) => q.push(k, (arg(msg, 0), arg(msg, 1))),
                    k @ uapi::UFFD_EVENT_REMAP => {
                        let (from, len) = (arg(msg, 0), arg(msg, 2));
                        q.push(k, (from, from.saturating_add(len)));
                    }
                    _ => {}
                }
            }
        }
        let q = m.queue.lock().unwrap_or_else(|e| e.into_inner());
        m.read.store(q.read, Ordering::SeqCst);
        drop(q);
        m.reading.store(false, Ordering::SeqCst);
        m.queued.notify_one();
    }
}

/// Waits for room in a full ring while the worker is draining it. It does not wait while the
/// worker is inside a subscriber, which may itself be unmapping watched memory and so waiting
/// for this thread: the event is then folded (see [`Queue::push`]). Waiting allocates nothing.
fn room<'a>(m: &'a Monitor, mut q: std::sync::MutexGuard<'a, Queue>) -> std::sync::MutexGuard<'a, Queue> {
    while q.len == q.ring.len() && !m.in_callback.load(Ordering::SeqCst) {
        m.queued.notify_one();
        q = m.space.wait_timeout(q, std::time::Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()).0;
    }
    q
}

/// The worker: acts on the events the reader queued — forgets the ranges, tells the
/// subscribers (which revoke registrations, and may unmap watched memory themselves: the
/// reader reads that event meanwhile) — and serves [`sync`].
fn worker(m: Weak<Monitor>) {
    loop {
        let Some(m) = m.upgrade() else { return };
        let next = {
            let mut q = m.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                // Served as soon as what it waits for is acted on, not when the queue is empty
                // (a steady stream of unmaps would starve it).
                serve_sync(&m, &q);
                if let Some(e) = q.pop() {
                    m.space.notify_one();
                    break Some(e);
                }
                let (g, t) =
                    m.queued.wait_timeout(q, std::time::Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner());
                q = g;
                if t.timed_out() {
                    break None; // lets the thread notice when the monitor is gone
                }
            }
        };
        if let Some(e) = next {
            m.in_callback.store(true, Ordering::SeqCst);
            handle(&m, e);
            m.in_callback.store(false, Ordering::SeqCst);
            let mut q = m.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.done = e.seq;
            m.done.store(e.seq, Ordering::SeqCst);
            serve_sync(&m, &q);
        }
    }
}

/// Serves the sync requests whose events are all acted on.
fn serve_sync(m: &Monitor, q: &Queue) {
    let (asked, upto) = q.drained_for;
    if q.done >= upto {
        let mut s = m.sync.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 < asked {
            s.1 = asked;
            m.synced.notify_all();
        }
    }
}

fn arg(msg: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[8 + 8 * i..16 + 8 * i]);
    u64::from_ne_bytes(b)
}

fn handle(m: &Monitor, e: Event) {
    let r = e.range.0..e.range.1;
    match e.kind {
        uapi::UFFD_EVENT_REMOVE => {
            // The range stays mapped and watched (WP traps nothing); in MISSING mode its pages
            // are missing again, so stop watching it there rather than trap the NIC.
            let missing: Vec<Range<u64>> = {
                let w = m.watched.lock().unwrap_or_else(|e| e.into_inner());
                w.overlapping(&r).into_iter().filter(|(_, iv)| iv.mode == Mode::Missing).map(|(x, _)| x).collect()
            };
            for x in missing {
                let x = x.start.max(r.start)..x.end.min(r.end);
                unregister(m, &x);
                forget(m, &x);
            }
            notify(m, r);
        }
        _ => {
            forget(m, &r);
            notify(m, r);
        }
    }
}

/// A fault on a missing page of a range watched in MISSING mode: resolve it with a zero page
/// (what the kernel would have mapped), or, if the mapping is changing under it (EAGAIN: an
/// event not read yet) or anything else fails, wake the faulting thread to fault again. Never
/// spins: the next fault comes after this thread has read the pending event.
fn resolve_fault(m: &Monitor, addr: u64) {
    let start = addr / page() * page();
    let mut z = uapi::uffdio_zeropage { range: uapi::uffdio_range { start, len: page() }, mode: 0, zeropage: 0 };
    // SAFETY: UFFDIO_ZEROPAGE takes a struct uffdio_zeropage; the range is the faulting page.
    let zeroed = unsafe { rustix::ioctl::ioctl(&m.fd, Updater::<UFFDIO_ZEROPAGE, _>::new(&mut z)) };
    if zeroed.is_err() {
        let mut r = uapi::uffdio_range { start, len: page() };
        // SAFETY: UFFDIO_WAKE takes a struct uffdio_range.
        let _ = unsafe { rustix::ioctl::ioctl(&m.fd, Updater::<UFFDIO_WAKE, _>::new(&mut r)) };
    }
}

fn notify(m: &Monitor, range: Range<u64>) {
    let subs: Vec<Arc<OnGone>> = {
        let mut s = m.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|(alive, _)| alive.strong_count() > 0);
        s.iter().map(|(_, f)| f.clone()).collect()
    };
    for f in subs {
        // One subscriber's panic must not stop the monitor (every later munmap of watched
        // memory would then go unseen).
        if catch_unwind(AssertUnwindSafe(|| f(range.clone()))).is_err() {
            tracing::error!("a host-memory monitor subscriber panicked on {range:x?}; the monitor goes on");
        }
    }
}

/// Removes `r` from the watched set (the memory is gone from there).
fn forget(m: &Monitor, r: &Range<u64>) {
    m.watched.lock().unwrap_or_else(|e| e.into_inner()).carve(r);
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

/// Whether every event the monitor has read (or is reading) has been acted on: two atomic
/// loads, for the registration hit path. `false` means an `munmap` that has returned may not be
/// acted on yet; [`sync`] then catches up. (An `munmap` still in progress on another thread,
/// its event not yet read, is not seen: that race is the caller's.)
pub(crate) fn settled() -> bool {
    let Some(Ok(m)) = MONITOR.get() else { return true };
    !m.reading.load(Ordering::SeqCst) && m.read.load(Ordering::SeqCst) == m.done.load(Ordering::SeqCst)
}

/// Returns once every event the monitor has read (every `munmap`, `mremap` and
/// `MADV_DONTNEED` of watched memory that has returned to its caller) is acted on.
pub(crate) fn sync() -> Result<()> {
    let m = monitor()?;
    let want = {
        let mut s = m.sync.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        s.0
    };
    rustix::io::write(&m.wake, &1u64.to_ne_bytes()).map_err(|e| err("eventfd write", e))?;
    let mut s = m.sync.lock().unwrap_or_else(|e| e.into_inner());
    while s.1 < want {
        s = m.synced.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    Ok(())
}

/// Registers `r` with the kernel in `mode`; returns the ioctls the kernel supports on it.
fn register(m: &Monitor, r: &Range<u64>, mode: Mode) -> std::result::Result<u64, Errno> {
    let mode_bits = match mode {
        Mode::Wp => uapi::UFFDIO_REGISTER_MODE_WP,
        Mode::Missing => uapi::UFFDIO_REGISTER_MODE_MISSING,
    } as u64;
    let mut reg = uapi::uffdio_register {
        range: uapi::uffdio_range { start: r.start, len: r.end - r.start },
        mode: mode_bits,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register, read and written.
    unsafe { rustix::ioctl::ioctl(&m.fd, Updater::<UFFDIO_REGISTER, _>::new(&mut reg)) }?;
    Ok(reg.ioctls)
}

/// Stops watching `r` (errors ignored: the memory may be gone already, which unregisters it).
fn unregister(m: &Monitor, r: &Range<u64>) {
    let mut ur = uapi::uffdio_range { start: r.start, len: r.end - r.start };
    // SAFETY: UFFDIO_UNREGISTER takes a struct uffdio_range.
    let _ = unsafe { rustix::ioctl::ioctl(&m.fd, Updater::<UFFDIO_UNREGISTER, _>::new(&mut ur)) };
}

/// Watched ranges closer than this to each other are watched as one, gap included, so that
/// page-strided registrations in one mapping do not split it into a VMA each (the map count,
/// `vm.max_map_count`, would bound how many ranges can be registered).
const MERGE_GAP: u64 = 64 << 20;

/// The pages a registration keeps watched; dropping it stops watching them once no other
/// token lies in the same watched interval.
#[derive(Debug)]
pub(crate) struct Watched {
    #[cfg_attr(not(test), allow(dead_code))] // what the tests check
    mode: Mode,
    /// The interval that counted this token.
    id: u64,
}

impl Watched {
    /// How the pages are watched.
    #[cfg(test)]
    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let Ok(m) = monitor() else { return };
        let mut w = m.watched.lock().unwrap_or_else(|e| e.into_inner());
        // Carved away (the memory went) or never counted: nothing to give back.
        let Some((start, iv)) = w.resolve(self.id) else { return };
        if iv.refs > 1 {
            w.put(start, Interval { refs: iv.refs - 1, ..iv });
        } else {
            w.take(start);
            w.prune(iv.id);
            unregister(&m, &(start..iv.end));
        }
    }
}

/// Starts watching the pages that cover `range`, and says how; they stay watched while the token lives.
pub(crate) fn watch(range: Range<u64>) -> Result<Watched> {
    watch_with(range, false)
}

/// [`watch`]; `force_missing` takes the path of kernels without WP mode (for tests).
pub(crate) fn watch_with(range: Range<u64>, force_missing: bool) -> Result<Watched> {
    let m = monitor()?;
    let start = range.start / page() * page();
    let end = range
        .end
        .checked_next_multiple_of(page())
        .ok_or_else(|| Error::InvalidArgument(format!("range {range:x?} wraps around the address space")))?;
    let pages = start..end;
    let mut w = m.watched.lock().unwrap_or_else(|e| e.into_inner());
    // Registered with the kernel every time, even where the list says the pages are watched:
    // the list lags the kernel by the events the worker has not acted on yet, and memory
    // unmapped and mapped again at a watched address is a new, unwatched VMA until this
    // registers it. (The cache's hit path comes before this; a miss registers an MR anyway.)
    let mut tried = Vec::new();
    if !force_missing {
        // One interval with the watched neighbours within MERGE_GAP, gap included, where the
        // memory between allows it (one mapping, or compatible ones); else exactly the pages.
        let near = pages.start.saturating_sub(MERGE_GAP)..pages.end.saturating_add(MERGE_GAP);
        let neighbours = w.overlapping(&near);
        let hull = neighbours
            .iter()
            .filter(|(_, iv)| iv.mode == Mode::Wp)
            .fold(pages.clone(), |h, (x, _)| h.start.min(x.start)..h.end.max(x.end));
        // Failing that, the pages with the intervals they overlap (registering exactly the
        // pages inside an interval would carve it into pieces whose counts strand).
        let local =
            w.overlapping(&pages).iter().fold(pages.clone(), |h, (x, _)| h.start.min(x.start)..h.end.max(x.end));
        for candidate in [hull, local, pages.clone()] {
            match register(&m, &candidate, Mode::Wp) {
                Ok(_) => {
                    let id = w.insert(candidate, Mode::Wp);
                    return Ok(Watched { mode: Mode::Wp, id });
                }
                Err(e) => tried.push(format!("WP {candidate:x?}: {}", std::io::Error::from(e))),
            }
            if candidate == pages {
                break;
            }
        }
    }
    // No WP mode for this memory: populate it, so that neither the CPU nor the NIC meets a
    // missing page, and watch it in MISSING mode.
    let len = (pages.end - pages.start) as usize;
    // SAFETY: MADV_POPULATE_WRITE faults the pages in as a write would, changing no contents;
    // the caller vouches that the range is mapped.
    let populated = unsafe { rustix::mm::madvise(pages.start as *mut _, len, rustix::mm::Advice::LinuxPopulateWrite) };
    if let Err(e) = populated {
        tried.push(format!("MADV_POPULATE_WRITE: {}", std::io::Error::from(e)));
        return Err(Error::Monitor(format!(
            "cannot watch {pages:x?} without trapping the NIC's faults ({}); is it anonymous or shared memory? Without the monitor, call Bridge::invalidate_host before unmapping it",
            tried.join("; ")
        )));
    }
    let ioctls = register(&m, &pages, Mode::Missing)
        .map_err(|e| err("UFFDIO_REGISTER (is the range anonymous or shared memory?)", e))?;
    // A fault in MISSING mode is resolved with a zero page: memory without UFFDIO_ZEROPAGE
    // (hugetlbfs) would have its faulting thread woken to fault again, for ever.
    if ioctls & (1u64 << uapi::_UFFDIO_ZEROPAGE) == 0 {
        unregister(&m, &pages);
        // Watched intervals inside these pages were unregistered with them: watched again, as
        // they were. What cannot be is no longer watched: treated as gone (forgotten, and its
        // registrations revoked), outside the watch list's lock.
        let mut lost = Vec::new();
        for (r, iv) in w.overlapping(&pages) {
            let r = r.start.max(pages.start)..r.end.min(pages.end);
            if register(&m, &r, iv.mode).is_err() {
                lost.push(r);
            }
        }
        drop(w);
        for r in lost {
            forget(&m, &r);
            notify(&m, r);
        }
        return Err(Error::Monitor(format!(
            "cannot watch {pages:x?}: the kernel offers neither write-protect mode nor zero pages for it (hugetlbfs memory on a kernel before 5.19?); without the monitor, call Bridge::invalidate_host before unmapping it"
        )));
    }
    let id = w.insert(pages.clone(), Mode::Missing);
    Ok(Watched { mode: Mode::Missing, id })
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

    /// Whether `test` can run: the monitor needs userfaultfd(2) with the non-cooperative
    /// events, and opening one needs privilege (root's CAP_SYS_PTRACE, or
    /// vm.unprivileged_userfaultfd=1). Where that is missing (EPERM: not root, or a seccomp
    /// filter) or the kernel has no userfaultfd (ENOSYS) or lacks the events, the test is
    /// skipped by name with the reason; anything else, or a monitor that does not start where
    /// userfaultfd works, fails the test.
    fn need_monitor(test: &str) -> bool {
        // SAFETY: a descriptor only asked what it offers, then closed; nothing is registered.
        let fd = match unsafe { rustix::mm::userfaultfd(rustix::mm::UserfaultfdFlags::CLOEXEC) } {
            Ok(fd) => fd,
            Err(Errno::PERM) => {
                eprintln!(
                    "SKIPPED {test}: needs root (userfaultfd(2): EPERM; it takes CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1, and no seccomp filter against it)"
                );
                return false;
            }
            Err(Errno::NOSYS) => {
                eprintln!("SKIPPED {test}: this kernel has no userfaultfd(2) (CONFIG_USERFAULTFD)");
                return false;
            }
            Err(e) => panic!("{test}: userfaultfd(2): {}", std::io::Error::from(e)),
        };
        let offered = api(&fd, 0).unwrap_or_else(|e| panic!("{test}: {e}"));
        if offered & FEATURES != FEATURES {
            eprintln!("SKIPPED {test}: this kernel's userfaultfd lacks the UNMAP/REMOVE/REMAP events (Linux >= 4.11)");
            return false;
        }
        if let Err(why) = monitor_available() {
            panic!("{test}: userfaultfd works here, yet the monitor does not start: {why}");
        }
        true
    }

    fn events() -> (mpsc::Receiver<Range<u64>>, Watch) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let w = subscribe(Box::new(move |r| {
            let _ = tx.lock().unwrap().send(r);
        }))
        .unwrap();
        (rx, w)
    }

    fn seen(rx: &mpsc::Receiver<Range<u64>>, want: Range<u64>) {
        loop {
            let r = rx.recv_timeout(Duration::from_secs(5)).expect("no event from the monitor");
            if r.start <= want.start && r.end >= want.end {
                return;
            }
        }
    }

    #[test]
    fn munmap_madvise_and_mremap_of_watched_memory_are_reported() {
        if !need_monitor("munmap_madvise_and_mremap_of_watched_memory_are_reported") {
            return;
        }
        let (rx, _w) = events();
        let p = page();
        let len = 4 * p as usize;

        let a = map(len);
        let wa = watch(a..a + len as u64).unwrap();
        assert_eq!(wa.mode(), Mode::Wp, "this kernel has WP mode for anonymous memory");
        // SAFETY: our mapping; untouched pages must not trap (WP mode protects nothing).
        unsafe {
            std::ptr::write_volatile((a + p) as *mut u8, 7);
            assert_eq!(std::ptr::read_volatile((a + p) as *const u8), 7);
            assert_eq!(std::ptr::read_volatile((a + 2 * p) as *const u8), 0);
        }
        // SAFETY: our mapping.
        unsafe { rustix::mm::madvise((a + p) as *mut _, p as usize, rustix::mm::Advice::LinuxDontNeed) }.unwrap();
        seen(&rx, a + p..a + 2 * p);
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
        seen(&rx, a..a + len as u64);

        let b = map(len);
        let target = map(len);
        let _wb = watch(b..b + len as u64).unwrap();
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

    #[test]
    fn sync_returns_after_the_unmap_is_acted_on() {
        if !need_monitor("sync_returns_after_the_unmap_is_acted_on") {
            return;
        }
        let acted = Arc::new(Mutex::new(Vec::new()));
        let a2 = acted.clone();
        let _w = subscribe(Box::new(move |r| {
            std::thread::sleep(Duration::from_millis(20)); // a slow subscriber
            a2.lock().unwrap().push(r);
        }))
        .unwrap();
        let len = 2 * page() as usize;
        let a = map(len);
        let _wa = watch(a..a + len as u64).unwrap();
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
        sync().unwrap();
        assert!(
            acted.lock().unwrap().iter().any(|r| r.start <= a && r.end >= a + len as u64),
            "sync returned before the monitor acted on the munmap"
        );
    }

    #[test]
    fn a_panicking_subscriber_does_not_stop_the_monitor() {
        if !need_monitor("a_panicking_subscriber_does_not_stop_the_monitor") {
            return;
        }
        let _bad = subscribe(Box::new(|_| panic!("a subscriber that panics"))).unwrap();
        let (rx, _w) = events();
        for _ in 0..2 {
            let len = page() as usize;
            let a = map(len);
            let _wa = watch(a..a + len as u64).unwrap();
            // SAFETY: our mapping.
            unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
            seen(&rx, a..a + len as u64);
        }
    }

    #[test]
    fn a_range_already_watched_is_counted_in_its_interval() {
        if !need_monitor("a_range_already_watched_is_counted_in_its_interval") {
            return;
        }
        let len = 4 * page() as usize;
        let a = map(len);
        let _wa = watch(a..a + len as u64).unwrap();
        let m = monitor().unwrap();
        let before = m.watched.lock().unwrap().overlapping(&(a..a + len as u64));
        // A part of it: the same interval, one more token.
        let _wp = watch(a + page()..a + 2 * page()).unwrap();
        let after = m.watched.lock().unwrap().overlapping(&(a..a + len as u64));
        assert_eq!(after.len(), 1);
        assert_eq!((after[0].0.clone(), after[0].1.id), (before[0].0.clone(), before[0].1.id));
        assert_eq!(after[0].1.refs, before[0].1.refs + 1);
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
    }

    #[test]
    fn forked_children_neither_hang_nor_leave_descriptors() {
        if !need_monitor("forked_children_neither_hang_nor_leave_descriptors") {
            return;
        }
        // userfaultfd descriptors of this process (other tests open and close other files).
        let fds = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().contains("userfaultfd"))
                .count()
        };
        let len = 4 * page() as usize;
        let a = map(len);
        let _wa = watch(a..a + len as u64).unwrap();
        let before = fds();
        for _ in 0..4 {
            // SAFETY: the child only touches and unmaps its copy of `a`, then _exits.
            match unsafe { libc::fork() } {
                // SAFETY: in the child, its own copy of the watched mapping (page-aligned,
                // `len` bytes, mapped above): touched, read, unmapped, then `_exit`.
                0 => unsafe {
                    std::ptr::write_volatile((a + page()) as *mut u8, 1);
                    let _ = std::ptr::read_volatile((a + 2 * page()) as *const u8);
                    libc::munmap(a as *mut _, len);
                    libc::_exit(0);
                },
                pid => {
                    assert!(pid > 0, "fork failed");
                    let mut status = 0;
                    let t = std::time::Instant::now();
                    loop {
                        // SAFETY: our own child.
                        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                        if r == pid {
                            break;
                        }
                        if t.elapsed() > Duration::from_secs(10) {
                            // SAFETY: our own child.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                            panic!("a forked child hung on watched memory");
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed: {status}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(fds(), before, "fork left userfaultfd descriptors behind in the parent");
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
    }

    /// The kernel's pool of huge pages, by count.
    const POOL: &str = "/proc/sys/vm/nr_hugepages";

    /// Puts the kernel's huge-page pool back as it was, however the test ends.
    struct Pool(Option<String>);

    impl Drop for Pool {
        fn drop(&mut self) {
            if let Some(v) = self.0.take() {
                let _ = std::fs::write(POOL, v);
            }
        }
    }

    /// One 2 MiB huge page of anonymous hugetlb memory, reserving one in the kernel's pool where
    /// there is none and this process may (root); why not where it cannot be had.
    fn huge_page() -> std::result::Result<(u64, Pool), String> {
        let before = std::fs::read_to_string(POOL).map_err(|e| format!("{POOL}: {e}"))?;
        let restore = if before.trim() == "0" {
            std::fs::write(POOL, "1")
                .map_err(|e| format!("no huge page reserved, and {POOL} cannot be raised: {e}"))?;
            Some(before.trim().to_string())
        } else {
            None
        };
        // SAFETY: a fresh private anonymous huge-page mapping.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                2 << 20,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::HUGETLB,
            )
        };
        let pool = Pool(restore);
        match p {
            Ok(p) => Ok((p as u64, pool)),
            Err(e) => Err(format!("mmap(MAP_HUGETLB) of 2 MiB: {}", std::io::Error::from(e))),
        }
    }

    #[test]
    fn hugetlb_memory_is_refused_in_missing_mode_rather_than_faulting_for_ever() {
        const TEST: &str = "hugetlb_memory_is_refused_in_missing_mode_rather_than_faulting_for_ever";
        if !need_monitor(TEST) {
            return;
        }
        let (p, _pool) = match huge_page() {
            Ok(x) => x,
            Err(why) => {
                eprintln!("SKIPPED {TEST}: {why}");
                return;
            }
        };
        // As on a kernel without write-protect mode for hugetlb (before 5.19): MISSING mode
        // would resolve a fault with UFFDIO_ZEROPAGE, which hugetlbfs lacks.
        let r = watch_with(p..p + (2 << 20), true);
        assert!(matches!(&r, Err(Error::Monitor(m)) if m.contains("zero pages")), "{:?}", r.map(|w| w.mode()));
        // Unwatched: touching it faults as usual, nothing waits on the monitor.
        // SAFETY: our mapping.
        unsafe {
            std::ptr::write_volatile(p as *mut u8, 1);
            rustix::mm::munmap(p as *mut _, 2 << 20).unwrap();
        }
    }

    #[test]
    fn without_wp_the_range_is_populated_and_faults_never_hang() {
        if !need_monitor("without_wp_the_range_is_populated_and_faults_never_hang") {
            return;
        }
        let (rx, _w) = events();
        let len = 8 * page() as usize;
        let a = map(len);
        let wa = watch_with(a..a + len as u64, true).unwrap();
        assert_eq!(wa.mode(), Mode::Missing);
        // SAFETY: our mapping: reads and writes of every page complete.
        unsafe {
            for i in 0..8 {
                assert_eq!(std::ptr::read_volatile((a + i * page()) as *const u8), 0);
            }
            std::ptr::write_volatile(a as *mut u8, 3);
        }
        // After MADV_DONTNEED the pages are missing again: the monitor stops watching them,
        // and a fault there completes (the kernel's own zero page).
        // SAFETY: our mapping.
        unsafe { rustix::mm::madvise(a as *mut _, len, rustix::mm::Advice::LinuxDontNeed) }.unwrap();
        seen(&rx, a..a + len as u64);
        sync().unwrap();
        // SAFETY: our mapping.
        unsafe { assert_eq!(std::ptr::read_volatile(a as *const u8), 0) };
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
    }

    /// VMAs of this process overlapping `a..a+len`.
    fn vmas(a: u64, len: u64) -> usize {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (r, _) = l.split_once(' ')?;
                let (s, e) = r.split_once('-')?;
                Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?))
            })
            .filter(|&(s, e)| e > a && s < a + len)
            .count()
    }

    #[test]
    fn page_strided_ranges_share_one_watched_interval_and_split_no_vmas() {
        if !need_monitor("page_strided_ranges_share_one_watched_interval_and_split_no_vmas") {
            return;
        }
        // More non-adjacent ranges than vm.max_map_count (65530) allows VMAs for, if each
        // split its mapping in three.
        let n = 40_000u64;
        let p = page();
        let len = 2 * n * p;
        let a = map(len as usize);
        let tokens: Vec<Watched> = (0..n).map(|i| watch(a + 2 * i * p..a + (2 * i + 1) * p).unwrap()).collect();
        assert!(tokens.iter().all(|t| t.mode() == Mode::Wp));
        assert!(vmas(a, len) <= 2, "watching split the mapping into {} VMAs", vmas(a, len));
        let m = monitor().unwrap();
        let ivs = m.watched.lock().unwrap().overlapping(&(a..a + len));
        assert_eq!(ivs.len(), 1, "one interval for the whole stride");
        assert_eq!(ivs[0].1.refs, n);
        drop(tokens);
        assert!(m.watched.lock().unwrap().overlapping(&(a..a + len)).is_empty(), "still watched after the last token");
        // Unwatched now: an unmap is no event.
        let (rx, _w) = events();
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len as usize) }.unwrap();
        sync().unwrap();
        assert!(
            rx.try_iter().all(|r| r.end <= a || r.start >= a + len),
            "memory no registration watches any more was still reported"
        );
    }

    #[test]
    fn a_token_of_memory_that_went_never_unwatches_the_memory_mapped_there_next() {
        if !need_monitor("a_token_of_memory_that_went_never_unwatches_the_memory_mapped_there_next") {
            return;
        }
        let (rx, _w) = events();
        let len = 2 * page() as usize;
        let a = map(len);
        let old = watch(a..a + len as u64).unwrap();
        // New memory at the same address (MAP_FIXED over the old: no moment in which another
        // thread could map something there), watched by a new registration.
        // SAFETY: our own mapping is replaced.
        let b = unsafe {
            rustix::mm::mmap_anonymous(
                a as *mut _,
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED,
            )
        }
        .unwrap() as u64;
        assert_eq!(b, a);
        seen(&rx, a..a + len as u64); // the old memory's unmap
        sync().unwrap();
        let new = watch(a..a + len as u64).unwrap();
        // The stale token goes: the new memory must stay watched.
        drop(old);
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(a as *mut _, len) }.unwrap();
        seen(&rx, a..a + len as u64);
        drop(new);
    }

    #[test]
    fn a_subscriber_that_unmaps_watched_memory_does_not_hang_the_monitor() {
        if !need_monitor("a_subscriber_that_unmaps_watched_memory_does_not_hang_the_monitor") {
            return;
        }
        let (rx, _w) = events();
        let len = page() as usize;
        let (trigger, other) = (map(len), map(len));
        let _wt = watch(trigger..trigger + len as u64).unwrap();
        let _wo = watch(other..other + len as u64).unwrap();
        // A subscriber that frees watched memory when told of the trigger's unmap (as a
        // revocation that drops the last owner of a buffer does).
        let _s = subscribe(Box::new(move |r| {
            if r.start <= trigger && r.end >= trigger + len as u64 {
                // SAFETY: the test's own mapping, unmapped once, here.
                unsafe { rustix::mm::munmap(other as *mut _, len) }.unwrap();
            }
        }))
        .unwrap();
        // SAFETY: our mapping.
        unsafe { rustix::mm::munmap(trigger as *mut _, len) }.unwrap();
        seen(&rx, trigger..trigger + len as u64);
        // The subscriber's own munmap was read and acted on: the monitor did not wait on itself.
        seen(&rx, other..other + len as u64);
    }
}
