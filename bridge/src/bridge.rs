//! The bridge: registers memory through the best strategy, caches registrations, and revokes
//! them — keys first, at the NIC — when the memory goes away.
//!
//! Transfers are in [`crate::transfer`], keys in [`crate::keys`], one registration's life in
//! [`crate::registration`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use p2pbridge_gpu::{AllocationInfo, AllocationKey, MemoryBackend, Notice, Subscription};
use p2pbridge_verbs::{AccessFlags, Connection, HostBuffer, OdpTransportCaps, ProtectionDomain};

use crate::cache::{CachePolicy, Cost, Domain, RegCache};
use crate::error::{Error, Result};
use crate::key::RemoteKey;
use crate::keys::KeyLedger;
use crate::registration::{Mr, Registered, Registration};
use crate::strategy::{plan, AppliesTo, Failure, HostCaps, MemoryKind, Policy, SkipReason, Strategy};

/// How often a registration that raced an invalidation is tried again before giving up.
const RACE_RETRIES: usize = 64;

/// What revocation needs, shared with the callbacks that revoke — backend notices, the
/// monitor, connections closing — so that they revoke (and wait) even while the bridge itself
/// is going, rather than finding nothing and letting the memory go.
pub(crate) struct Core {
    pub(crate) pd: ProtectionDomain,
    pub(crate) completion_timeout: Duration,
    pub(crate) cache: RegCache<Registration>,
    pub(crate) keys: KeyLedger,
}

impl Core {
    /// Revokes every registration of `domain` over `range`, held or not: keys die at the NIC,
    /// regions are deregistered, handles turn dead. Waits only for operations in flight on
    /// them. Returns how many there were, and the first failure.
    pub(crate) fn invalidate(&self, domain: Domain, range: Range<u64>) -> (usize, Result<()>) {
        let gone = self.cache.remove_overlapping(domain, range);
        let mut r = Ok(());
        for e in &gone {
            if let Err(err) = e.value().revoke() {
                if r.is_ok() {
                    r = Err(err);
                }
            }
        }
        (gone.len(), r)
    }
}

pub(crate) struct Inner {
    pub(crate) core: Arc<Core>,
    caps: HostCaps,
    policy: Policy,
    backends: Vec<Arc<dyn MemoryBackend>>,
    subs: Mutex<HashMap<AllocationKey, Subscription>>,
    /// Backend allocations seen, by base address: a new allocation found where an old one was
    /// (freed without a notice this bridge saw) revokes the old one's registrations.
    allocs: Mutex<BTreeMap<u64, (AllocationKey, u64)>>,
    /// Keys are memory windows (the device has type 2 windows and the options allow them).
    windows: bool,
    /// The userfaultfd monitor's subscription, or why there is none.
    watch: std::result::Result<crate::uffd::Watch, String>,
    /// Where the pinned-bytes limit comes from, for errors and the probe.
    pinned_budget: crate::budget::Budget,
    /// The exported-bytes limit per device and where it comes from (a GPU's BAR1).
    exported_budget: (u64, String),
    /// The bounce engines transfers of bounce registrations run through, and their shape.
    pub(crate) engines: crate::transfer::Engines,
    pub(crate) bounce: crate::bounce::BounceConfig,
}

impl Inner {
    /// A backend's notice: the allocation (or part of it) goes. Revokes, then acknowledges;
    /// a registration that could not be revoked keeps the free waiting for ever rather than
    /// letting the memory go while the NIC may reach it.
    fn on_notice(core: &Core, inner: Option<Arc<Inner>>, notice: Notice) {
        // The notice's range is in offsets of the allocation, the cache's in addresses: the
        // whole allocation's registrations go (a part going is as rare as it is final).
        let (_, r) = core.invalidate(Domain::Alloc(notice.key), 0..u64::MAX);
        if let Some(inner) = inner.filter(|_| notice.reason == p2pbridge_gpu::InvalidationReason::Free) {
            inner.subs.lock().unwrap_or_else(|e| e.into_inner()).remove(&notice.key);
            let mut allocs = inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
            allocs.retain(|_, (k, _)| *k != notice.key);
        }
        match r {
            Ok(()) => notice.ack(),
            Err(e) => {
                eprintln!("p2pbridge: cannot revoke a registration of {:?} ({e}): its free is held back for ever, since the NIC may still reach the memory", notice.key);
                std::mem::forget(notice);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The subscriptions go with the bridge: nothing would tell a registration that its
        // memory went. Revoke them all now; remaining handles turn dead.
        self.core.keys.clear();
        for e in self.core.cache.drain() {
            if let Err(err) = e.value().revoke() {
                eprintln!("p2pbridge: revoking a registration as the bridge goes failed ({err}); its memory region is leaked, not freed");
            }
        }
    }
}

/// Options of a [`Bridge`].
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Which strategies may be used.
    pub policy: Policy,
    /// Cache limits.
    pub cache: CachePolicy,
    /// How long an operation waits for its completion before the bridge moves the connection's
    /// queue pair to the error state, reaps the flushed request, and returns
    /// [`Error::CompletionTimeout`]. It never returns while the NIC may still use the buffer.
    pub completion_timeout: Duration,
    /// Watch registered host memory with the userfaultfd monitor, so that `munmap`, `mremap`
    /// and `MADV_DONTNEED` revoke its registrations by themselves.
    pub monitor_host: bool,
    /// Hand out memory-window keys where the device has type 2 windows (one window per
    /// hand-out, over exactly its range, bound to the peer's queue pair). Off: keys are the
    /// region's rkey, revoked only with the whole registration.
    pub windows: bool,
    /// The shape of the bounce engine that transfers of bounce registrations run through
    /// (chunk size, chunks in flight); its timeout is `completion_timeout`.
    pub bounce: crate::bounce::BounceConfig,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            policy: Policy::default(),
            cache: CachePolicy::default(),
            completion_timeout: Duration::from_secs(30),
            monitor_host: true,
            windows: true,
            bounce: crate::bounce::BounceConfig::default(),
        }
    }
}

/// Registers memory for one protection domain. Cheap to clone (a handle). When the last clone
/// goes, every registration it made is revoked (their handles turn dead).
#[derive(Clone)]
pub struct Bridge {
    pub(crate) inner: Arc<Inner>,
}

impl Bridge {
    /// A bridge for `pd` that knows `backends` (whose memory it can identify, export, copy,
    /// and be told about before it is freed).
    pub fn new(pd: &ProtectionDomain, backends: Vec<Arc<dyn MemoryBackend>>, opts: BridgeOptions) -> Result<Self> {
        let caps = HostCaps::probe(pd)?;
        let monitor_host = opts.monitor_host;
        let windows = opts.windows && caps.nic.mem_windows.is_yes();
        let system = crate::budget::pinned();
        let pinned_budget = if opts.cache.max_pinned_bytes == system.bytes {
            system
        } else {
            crate::budget::Budget {
                bytes: opts.cache.max_pinned_bytes,
                source: "BridgeOptions::cache.max_pinned_bytes".into(),
                fix: format!("raise it (the process's own budget is {} bytes: {})", system.bytes, system.source),
            }
        };
        // The exported-bytes budget: the smallest BAR1 among the backends' GPUs, unless the
        // caller set one.
        let mut cache_policy = opts.cache;
        let defaults = CachePolicy::default();
        let mut exported_budget =
            (cache_policy.max_exported_bytes_per_device, "CachePolicy::max_exported_bytes_per_device".to_string());
        if cache_policy.max_exported_bytes_per_device == defaults.max_exported_bytes_per_device {
            if let Some(b) = backends.iter().filter_map(|b| b.export_budget()).min_by_key(|(n, _)| *n) {
                cache_policy.max_exported_bytes_per_device = b.0;
                exported_budget = b;
            }
        }
        // The entry limit, where left at its default, follows the budgets this bridge keeps
        // (the caller's pinned budget, the GPU's BAR1), as the default follows the process's.
        if cache_policy.max_entries == defaults.max_entries {
            cache_policy.max_entries =
                CachePolicy::entries_for(cache_policy.max_pinned_bytes, cache_policy.max_exported_bytes_per_device);
        }
        let core = Arc::new(Core {
            pd: pd.clone(),
            completion_timeout: opts.completion_timeout,
            cache: RegCache::new(cache_policy),
            keys: KeyLedger::default(),
        });
        let watch = if monitor_host {
            let core = core.clone();
            crate::uffd::subscribe(Box::new(move |range| {
                if let (_, Err(e)) = core.invalidate(Domain::HostVa, range.clone()) {
                    eprintln!("p2pbridge: revoking registrations of unmapped host memory {range:x?} failed: {e}");
                }
            }))
            .map_err(|e| e.to_string())
        } else {
            Err("disabled by BridgeOptions::monitor_host".into())
        };
        Ok(Bridge {
            inner: Arc::new(Inner {
                core,
                caps,
                policy: opts.policy,
                backends,
                subs: Mutex::new(HashMap::new()),
                allocs: Mutex::new(BTreeMap::new()),
                windows,
                watch,
                pinned_budget,
                exported_budget,
                engines: Default::default(),
                bounce: opts.bounce,
            }),
        })
    }

    /// The exported-bytes budget per device (a GPU's BAR1 aperture where a backend reports
    /// it), and where it comes from.
    pub fn exported_budget(&self) -> (u64, &str) {
        (self.inner.exported_budget.0, &self.inner.exported_budget.1)
    }

    /// The pinned-bytes budget the cache keeps registrations within, and where it comes from
    /// (see [`crate::budget`]).
    pub fn pinned_budget(&self) -> &crate::budget::Budget {
        &self.inner.pinned_budget
    }

    /// Whether host memory registered with [`Bridge::register_host`] is watched by the
    /// userfaultfd monitor, and if not, why.
    pub fn host_monitor(&self) -> std::result::Result<(), &str> {
        self.inner.watch.as_ref().map(|_| ()).map_err(|e| e.as_str())
    }

    /// Returns once every change of the address space that has already returned to its caller
    /// (`munmap`, `mremap`, `madvise(MADV_DONTNEED)` of watched memory) has been acted on: the
    /// keys over it revoked at the NIC. The monitor acts on its own within microseconds; call
    /// this where a program must know it has (before reusing an address for other data, say).
    pub fn sync_monitor(&self) -> Result<()> {
        if self.inner.watch.is_ok() {
            crate::uffd::sync()?;
        }
        Ok(())
    }

    /// Whether keys handed out are memory windows (see [`BridgeOptions::windows`]), and if not,
    /// why.
    pub fn key_windows(&self) -> std::result::Result<(), &'static str> {
        if self.inner.windows {
            Ok(())
        } else if !self.inner.caps.nic.mem_windows.is_yes() {
            Err("the device has no type 2 memory windows: keys are the region's rkey, revoked with the whole registration")
        } else {
            Err("disabled by BridgeOptions::windows: keys are the region's rkey, revoked with the whole registration")
        }
    }

    /// What the host can do, as probed.
    pub fn caps(&self) -> &HostCaps {
        &self.inner.caps
    }

    /// The protection domain.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.inner.core.pd
    }

    /// (entries, bytes) in the registration cache.
    pub fn cache_usage(&self) -> (usize, u64) {
        self.inner.core.cache.usage()
    }

    /// The cache's limits.
    pub fn cache_policy(&self) -> &CachePolicy {
        self.inner.core.cache.policy()
    }

    /// Registers `len` bytes at `addr`, which must be memory of one of the bridge's backends.
    /// A cached registration covering the range with at least `access` is reused.
    ///
    /// Safe because the memory cannot go without the bridge revoking the registration first:
    /// the backend tells the bridge before it frees the memory, and the free waits until every
    /// key over it is refused by the NIC and the region is deregistered. A [`Registered`] that
    /// outlives its memory is dead: its operations fail with [`Error::Revoked`].
    pub fn register(&self, addr: u64, len: u64, access: AccessFlags) -> Result<Registered> {
        check_range(addr, len)?;
        let access = access | AccessFlags::LOCAL_WRITE;
        // The hit path: no identification, one read lock. The cache finds the allocation by
        // address among those declared to it, and only allocations whose backend announces their
        // free are declared (`MemoryBackend::notifies`): their registrations are revoked before
        // the memory goes and none is made after (the miss path below refuses one that raced the
        // free), so an entry found is over live memory of that allocation, however old the
        // declaration. Memory a backend only identifies (CUDA memory of other allocators) may
        // be freed and its addresses reused without a notice: it is never declared, and takes
        // the path below, which identifies first, so a new allocation at the same addresses
        // (another id) never finds the old one's registrations. See docs/decisions.md, "The
        // register hit path".
        if let Some(handle) = self.inner.core.cache.lookup_at(addr..addr + len, access.bits()) {
            return Ok(Registered { handle, addr, len, access });
        }
        self.register_identified(addr, len, access)
    }

    /// [`register`](Self::register) past its hit path: identify the memory, then look up,
    /// then register on a miss. Out of line, so that the hit path stays a small function.
    #[inline(never)]
    fn register_identified(&self, addr: u64, len: u64, access: AccessFlags) -> Result<Registered> {
        for _ in 0..RACE_RETRIES {
            let (backend, info) = self.identify(addr)?;
            info.check(addr - info.base, len)?;
            let domain = Domain::Alloc(info.key);
            // Before the second identification below: a free of this allocation that runs
            // after it is seen by the epoch.
            let epoch = self.inner.core.cache.epoch(domain);
            if let Some(handle) = self.inner.core.cache.lookup(domain, addr..addr + len, access.bits()) {
                return Ok(Registered { handle, addr, len, access });
            }
            // A miss: be told before this allocation goes, then make sure it did not start going
            // before we listened.
            self.subscribe(&backend, info.key, info.len);
            // Dying first, then identified again: a free whose notices went out before we
            // subscribed shows as dying until the memory is released (`notifies` backends keep
            // it so), and one that is over by then no longer identifies as this allocation.
            let dying = backend.notices().is_dying(info.key);
            let (_, again) = self.identify(addr)?;
            if dying || again.key != info.key || backend.notices().is_dying(info.key) {
                std::thread::yield_now();
                continue;
            }
            self.note_allocation(&info);
            let kind = MemoryKind::Backend(backend.kind());
            let notifies = backend.notifies(&info);
            if let Some(r) = self.register_in(epoch, domain, kind, Some(backend), addr, len, access)? {
                if notifies {
                    // From now on its hits take the path above (until its last entry goes).
                    self.inner.core.cache.declare(domain, info.base..info.base.saturating_add(info.len));
                }
                return Ok(r);
            }
        }
        Err(Error::Raced(RACE_RETRIES))
    }

    /// Registers host memory no backend owns (a `Vec`, an mmap).
    ///
    /// Where the userfaultfd monitor runs ([`Bridge::host_monitor`]), the range is watched:
    /// `munmap`, `mremap` or `madvise(MADV_DONTNEED)` of it revoke its registrations by
    /// themselves (keys refused by the NIC, handles dead), within the monitor's latency
    /// ([`Bridge::sync_monitor`] waits for it). Watching needs anonymous or shared memory
    /// (not a file mapping): other memory is refused with [`Error::Monitor`].
    ///
    /// # Safety
    /// The range must be mapped when registered. Without the monitor, [`Bridge::invalidate_host`]
    /// must be called for it before any `munmap`, `mremap` or `madvise(MADV_DONTNEED)` of it.
    /// Memory a peer may write must not be read through Rust references that assume it does
    /// not change.
    ///
    /// A registration made after an `munmap` of the range has returned never finds the old
    /// memory's registration (the bridge catches up with the monitor first). One made while
    /// another thread's `munmap` of the same range is still in progress may: it is then
    /// revoked a moment later, and its operations fail with [`Error::Revoked`] (pinned memory
    /// stays the old pages' until then; no other memory is reached).
    pub unsafe fn register_host(&self, addr: u64, len: u64, access: AccessFlags) -> Result<Registered> {
        check_range(addr, len)?;
        let access = access | AccessFlags::LOCAL_WRITE;
        // An munmap that has returned but is not acted on yet must not leave its registration
        // to be found by the memory mapped there next: catch up first (rare; two loads else).
        if self.inner.watch.is_ok() && !crate::uffd::settled() {
            crate::uffd::sync()?;
        }
        for _ in 0..RACE_RETRIES {
            let epoch = self.inner.core.cache.epoch(Domain::HostVa);
            // The hit path first: a cached range is already watched.
            if let Some(handle) = self.inner.core.cache.lookup(Domain::HostVa, addr..addr + len, access.bits()) {
                return Ok(Registered { handle, addr, len, access });
            }
            if let Some(r) = self.register_in(epoch, Domain::HostVa, MemoryKind::Host, None, addr, len, access)? {
                return Ok(r);
            }
        }
        Err(Error::Raced(RACE_RETRIES))
    }

    /// Host memory at `range` is going away: revokes what covers it (keys refused by the NIC,
    /// regions deregistered, handles dead), after in-flight operations on it finish. Returns
    /// how many registrations were revoked.
    pub fn invalidate_host(&self, range: Range<u64>) -> Result<usize> {
        if range.start > range.end {
            return Err(Error::InvalidArgument(format!("reversed range {:#x}..{:#x}", range.start, range.end)));
        }
        let (n, r) = self.inner.core.invalidate(Domain::HostVa, range);
        r.map(|()| n)
    }

    /// Revokes every registration over `len` bytes at `addr` — of host memory, and of any
    /// backend allocation recorded there — whether the memory goes or not: keys over it are
    /// refused by the NIC, handles turn dead, and the next registration is made anew. Returns
    /// how many were revoked.
    pub fn invalidate(&self, addr: u64, len: u64) -> Result<usize> {
        let end = check_range(addr, len)?;
        let keys: Vec<AllocationKey> = {
            let allocs = self.inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
            allocations_over(&allocs, addr..end).map(|(_, k)| k).collect()
        };
        let (mut n, mut r) = self.inner.core.invalidate(Domain::HostVa, addr..end);
        for k in keys {
            let (m, rk) = self.inner.core.invalidate(Domain::Alloc(k), 0..u64::MAX);
            n += m;
            r = r.and(rk);
        }
        r.map(|()| n)
    }

    /// An allocator freed `len` bytes at `addr` without the bridge being told (PyTorch's caching
    /// allocator calling `cudaFree`, another library's `munmap`): revokes every registration
    /// over it ([`Bridge::invalidate`]) and forgets the allocations recorded there. Call it
    /// before the memory is reused. Returns how many registrations were revoked.
    pub fn report_free(&self, addr: u64, len: u64) -> Result<usize> {
        let n = self.invalidate(addr, len)?;
        let mut allocs = self.inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u64> = allocations_over(&allocs, addr..addr + len).map(|(b, _)| b).collect();
        for b in gone {
            allocs.remove(&b);
        }
        Ok(n)
    }

    /// Hands `range` (offsets within `reg`) to the peer at the other end of `conn`, and
    /// returns the key to send it. With memory windows ([`Bridge::key_windows`]) the key
    /// reaches exactly `range`, only over `conn`, with the remote rights `reg` was registered
    /// with; it is refused by the NIC once the memory goes or [`Bridge::revoke_key`] is called.
    ///
    /// For bounce registrations the key names the staging buffer: the owner calls
    /// [`Bridge::publish`] before peers read and [`Bridge::flush`] after they write.
    pub fn hand_out(&self, conn: &Connection, reg: &Registered, range: Range<u64>) -> Result<RemoteKey> {
        let access = reg.access;
        self.inner.core.keys.hand_out(&self.inner.core, conn, reg, range, access)
    }

    /// `Ok` while a key this bridge handed out still reaches its memory; [`Error::StaleKey`]
    /// once it was revoked (memory freed, unmapped or invalidated, or the key revoked).
    pub fn check_key(&self, key: &RemoteKey) -> Result<()> {
        self.inner.core.keys.check(key)
    }

    /// Revokes one key handed out with memory windows: the NIC refuses it from the moment this
    /// returns. Other keys of the same registration stay valid.
    pub fn revoke_key(&self, key: &RemoteKey) -> Result<()> {
        self.inner.core.keys.revoke(key)
    }

    fn identify(&self, addr: u64) -> Result<(Arc<dyn MemoryBackend>, AllocationInfo)> {
        for b in &self.inner.backends {
            if let Some(info) = b.identify(addr)? {
                return Ok((b.clone(), info));
            }
        }
        Err(Error::NotBackendMemory(addr))
    }

    /// Records where an allocation lives; one recorded before over the same addresses was
    /// freed behind our back (its notice never reached us): its registrations are revoked.
    fn note_allocation(&self, info: &AllocationInfo) {
        let stale: Vec<AllocationKey> = {
            let mut allocs = self.inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
            let end = info.base.saturating_add(info.len);
            let over: Vec<u64> =
                allocations_over(&allocs, info.base..end).filter(|&(_, k)| k != info.key).map(|(b, _)| b).collect();
            let stale = over.iter().filter_map(|b| allocs.remove(b)).map(|(k, _)| k).collect();
            allocs.insert(info.base, (info.key, info.len));
            stale
        };
        for k in stale {
            if let (_, Err(e)) = self.inner.core.invalidate(Domain::Alloc(k), 0..u64::MAX) {
                eprintln!("p2pbridge: revoking registrations of a freed allocation failed: {e}");
            }
        }
    }

    /// Registers `addr..addr+len` of `domain` (a miss that began at `epoch`); `backend` is the
    /// memory's backend (None for host VA memory). `Ok(None)`: an invalidation ran meanwhile,
    /// the registration was revoked, try again.
    #[allow(clippy::too_many_arguments)]
    fn register_in(
        &self,
        epoch: u64,
        domain: Domain,
        kind: MemoryKind,
        backend: Option<Arc<dyn MemoryBackend>>,
        addr: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<Option<Registered>> {
        let range = addr..addr + len;
        if let Some(handle) = self.inner.core.cache.lookup(domain, range.clone(), access.bits()) {
            return Ok(Some(Registered { handle, addr, len, access }));
        }
        let reg_range = self.inner.core.cache.merged_range(domain, range, access.bits());
        // Host memory is watched from before it is registered until the registration is
        // dropped (the monitor then stops watching it, unless other registrations need it).
        let watched = match (domain, &self.inner.watch) {
            (Domain::HostVa, Ok(_)) => Some(crate::uffd::watch(reg_range.clone())?),
            _ => None,
        };
        let device = backend.as_ref().map(|b| b.device()).unwrap_or(0);
        let reg = self.try_strategies(kind, backend, reg_range.clone(), access)?.watched_by(watched);
        let cost = cost_of(reg.strategy(), device);
        match self.inner.core.cache.insert_since(Some(epoch), domain, reg_range, access.bits(), cost, reg)? {
            Ok(ins) => {
                drop(ins.removed);
                Ok(Some(Registered { handle: ins.handle, addr, len, access }))
            }
            Err(stale) => {
                stale.revoke()?;
                Ok(None)
            }
        }
    }

    fn try_strategies(
        &self,
        kind: MemoryKind,
        backend: Option<Arc<dyn MemoryBackend>>,
        range: Range<u64>,
        access: AccessFlags,
    ) -> Result<Registration> {
        let ops = ops_for(access);
        let p = plan(kind, ops, &self.inner.policy, &self.inner.caps);
        let mut skipped = p.skipped;
        let len = usize::try_from(range.end - range.start).map_err(|_| {
            Error::InvalidArgument(format!("{} bytes do not fit this address space", range.end - range.start))
        })?;
        let pd = &self.inner.core.pd;
        let windowed = self.inner.windows;
        // With windows, the region itself grants no remote rights: only windows reach it.
        let mr_access = if windowed {
            (access & !(AccessFlags::REMOTE_READ | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_ATOMIC))
                | AccessFlags::MW_BIND
        } else {
            access
        };
        let device = backend.as_ref().map(|b| b.device()).unwrap_or(0);
        let mut over_budget = None;
        for s in p.candidates {
            // Within the budgets, after evicting what is unused; else the next strategy, with
            // the reason. (Dropping the evicted handles releases their registrations.)
            // Unused registrations in the way go before this one pins: the kernel counts pages
            // as they are pinned.
            let full = match self.inner.core.cache.evict_for(cost_of(s, device), range.end - range.start) {
                Ok(evicted) => {
                    drop(evicted); // deregistered (unpinned) here, before this one pins
                    None
                }
                Err(full) => Some(full),
            };
            if let Some(full) = full {
                let fix = match full.limit {
                    "pinned bytes" => self.inner.pinned_budget.fix.clone(),
                    "exported bytes of the device" => "raise CachePolicy::max_exported_bytes_per_device (up to the GPU's BAR1 size), or release registrations".into(),
                    _ => "raise CachePolicy::max_entries / max_bytes, or release registrations".into(),
                };
                let source = match full.limit {
                    "pinned bytes" => self.inner.pinned_budget.source.clone(),
                    "exported bytes of the device" => self.inner.exported_budget.1.clone(),
                    _ => "CachePolicy".into(),
                };
                over_budget.get_or_insert((full.to_string(), source.clone(), fix.clone()));
                skipped.push((s, SkipReason::OverBudget { limit: full, source, fix }));
                continue;
            }
            let attempt: Result<(Mr, Option<p2pbridge_gpu::DmaBufExport>)> = match s {
                Strategy::DmaBuf => {
                    let b = backend.as_ref().ok_or_else(|| Error::InvalidArgument("dma-buf needs a backend".into()))?;
                    match b.export_dmabuf(range.start, range.end - range.start) {
                        Err(e) => {
                            skipped.push((s, SkipReason::ExportUnsupported(Failure::from(&e))));
                            continue;
                        }
                        // SAFETY: the exporter keeps the memory valid until it notifies us
                        // (the backend's notices), and a notice revokes the registration —
                        // windows, then the region — before it is acknowledged.
                        Ok(x) => unsafe { pd.register_dmabuf(x.fd(), x.offset(), len, range.start, mr_access) }
                            .map(|m| (Mr::Direct(m), Some(x)))
                            .map_err(Error::from),
                    }
                }
                Strategy::PeerMem | Strategy::PinnedHost => {
                    // SAFETY: backend memory is revoked (deregistered) through its notices
                    // before it is freed; host VA memory is the caller's `register_host`
                    // contract, and its unmapping revokes through the monitor.
                    unsafe { pd.register_raw(range.start as *mut u8, len, mr_access) }
                        .map(|m| (Mr::Direct(m), None))
                        .map_err(Error::from)
                }
                Strategy::Odp => {
                    // SAFETY: as for pinned registrations above; ODP pins nothing, and the
                    // kernel's MMU notifier also drops pages that are unmapped.
                    unsafe { pd.register_raw(range.start as *mut u8, len, mr_access | AccessFlags::ON_DEMAND) }
                        .map(|m| (Mr::Direct(m), None))
                        .map_err(Error::from)
                }
                Strategy::Bounce if backend.is_none() => {
                    skipped.push((s, SkipReason::NotForThisMemory { applies_to: AppliesTo::BackendMemory }));
                    continue;
                }
                Strategy::Bounce => HostBuffer::new(len)
                    .and_then(|b| pd.register(b, mr_access))
                    .map(|m| (Mr::Bounce(m), None))
                    .map_err(Error::from),
            };
            match attempt {
                Ok((mr, export)) => {
                    let prefetch = (s == Strategy::Odp).then(|| self.prefetch(&mr, access));
                    return Ok(Registration::new(s, skipped, windowed, prefetch, backend.clone(), mr, export));
                }
                Err(e) => skipped.push((s, SkipReason::Failed(Failure::from(&e)))),
            }
        }
        match over_budget {
            Some((limit, source_of_limit, fix)) => Err(Error::OverBudget { limit, source_of_limit, fix, skipped }),
            None => Err(Error::NoStrategy(skipped)),
        }
    }

    /// Faults an ODP registration's pages into the NIC now (`ibv_advise_mr`, for writing where
    /// peers may write), so that the first transfers do not pay for the faults; or says why not.
    fn prefetch(&self, mr: &Mr, access: AccessFlags) -> std::result::Result<(), String> {
        if let Some(why) = self.inner.caps.nic.advise_mr.unsupported() {
            return Err(why.to_string());
        }
        match mr {
            Mr::Direct(m) => m
                .advise_prefetch(.., access.intersects(AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE))
                .map_err(|e| e.to_string()),
            Mr::Bounce(_) => Err("not an ODP region".into()),
        }
    }

    /// Subscribes (once per allocation) to the backend's notices: before the allocation is
    /// freed, its registrations are revoked, then the notice is acknowledged.
    fn subscribe(&self, backend: &Arc<dyn MemoryBackend>, key: AllocationKey, len: u64) {
        let mut subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
        if subs.contains_key(&key) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let core = self.inner.core.clone();
        // The core, not the bridge: a free while the bridge goes still revokes (and waits).
        let sub =
            backend.notices().subscribe(key, 0..len, move |notice| Inner::on_notice(&core, weak.upgrade(), notice));
        subs.insert(key, sub);
    }
}

/// The recorded allocations (base, key) that overlap `range`.
fn allocations_over(
    allocs: &BTreeMap<u64, (AllocationKey, u64)>,
    range: Range<u64>,
) -> impl Iterator<Item = (u64, AllocationKey)> + '_ {
    allocs.range(..range.end).filter(move |(&b, (_, l))| b.saturating_add(*l) > range.start).map(|(&b, (k, _))| (b, *k))
}

/// `addr + len`, or why not: a registration needs 1 byte at least and may not wrap.
fn check_range(addr: u64, len: u64) -> Result<u64> {
    if len == 0 {
        return Err(Error::InvalidArgument("cannot register 0 bytes".into()));
    }
    addr.checked_add(len)
        .ok_or_else(|| Error::InvalidArgument(format!("{len} bytes at {addr:#x} wrap around the address space")))
}

/// The RC operations an access set implies, for ODP capability checks.
fn ops_for(access: AccessFlags) -> OdpTransportCaps {
    let mut ops = OdpTransportCaps::SEND | OdpTransportCaps::RECV;
    if access.contains(AccessFlags::REMOTE_WRITE) {
        ops |= OdpTransportCaps::WRITE;
    }
    if access.contains(AccessFlags::REMOTE_READ) {
        ops |= OdpTransportCaps::READ;
    }
    if access.contains(AccessFlags::REMOTE_ATOMIC) {
        ops |= OdpTransportCaps::ATOMIC;
    }
    ops
}

/// What a registration by `strategy` costs the cache's budgets.
fn cost_of(strategy: Strategy, device: u32) -> Cost {
    match strategy {
        Strategy::DmaBuf | Strategy::PeerMem => Cost::Exported { device },
        Strategy::PinnedHost | Strategy::Bounce => Cost::Pinned,
        Strategy::Odp => Cost::Unpinned,
    }
}
