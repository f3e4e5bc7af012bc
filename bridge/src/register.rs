//! Registration: the hit path, the miss path (identify, subscribe, try the plan's strategies in
//! order, insert only if no invalidation ran meanwhile), and host memory under the monitor.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Weak};

use p2pbridge_gpu::{AllocationInfo, AllocationKey, MemoryBackend};
use p2pbridge_verbs::{AccessFlags, HostBuffer, OdpTransportCaps};

use crate::bridge::{Bridge, Inner};
use crate::cache::{Cost, Domain};
use crate::error::{Error, Result};
use crate::registration::{Mr, Registered, Registration};
use crate::strategy::{plan, AppliesTo, Failure, MemoryKind, SkipReason, Strategy};

/// How often a registration that raced an invalidation is tried again before giving up.
const RACE_RETRIES: usize = 64;

impl Bridge {
    /// Registers `len` bytes at `addr`, which must be memory of one of the bridge's backends
    /// whose free the backend announces ([`MemoryBackend::notifies`]: memory the backend
    /// allocated itself). A cached registration covering the range with at least `access` is
    /// reused.
    ///
    /// Safe because the memory cannot go without the bridge revoking the registration first:
    /// the backend tells the bridge before it frees the memory, and the free waits until every
    /// key over it is refused by the NIC and the region is deregistered. A [`Registered`] that
    /// outlives its memory is dead: its operations fail with [`Error::Revoked`].
    ///
    /// Memory a backend only identifies — another allocator's, such as PyTorch's caching
    /// allocator's CUDA memory — is freed without a notice, so it is refused here with
    /// [`Error::NotAnnounced`]: register it with [`register_foreign`](Self::register_foreign).
    pub fn register(&self, addr: u64, len: u64, access: AccessFlags) -> Result<Registered> {
        self.register_backend(addr, len, access, false)
    }

    /// [`register`](Self::register), or (`foreign`) [`register_foreign`](Self::register_foreign).
    #[inline]
    fn register_backend(&self, addr: u64, len: u64, access: AccessFlags, foreign: bool) -> Result<Registered> {
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
        self.register_identified(addr, len, access, foreign)
    }

    /// Registers `len` bytes at `addr` of a backend's memory whose free the backend does not
    /// announce: memory of another allocator that the backend identifies (CUDA memory from
    /// PyTorch's caching allocator, say). Memory whose free is announced is registered as by
    /// [`register`](Self::register).
    ///
    /// # Safety
    /// Before the memory is freed or its addresses reused (`cudaFree`, the allocator handing
    /// the block to another tensor), [`Bridge::report_free`] must be called for it and have
    /// returned `Ok`: it revokes every registration over it (keys refused by the NIC, regions
    /// deregistered) after the operations in flight on it. Where it returns
    /// [`Error::Leaked`] (the NIC may still use a region that follows the memory), the memory
    /// must never be freed nor reused. Until then the NIC may write the
    /// memory, and the bridge's staging copies (bounce) read and write it. (Staging copies also
    /// check, before each copy, that the address still identifies as the allocation
    /// registered, and fail with [`Error::NotTheRegisteredMemory`] where not: a second guard,
    /// not a substitute for `report_free`.)
    pub unsafe fn register_foreign(&self, addr: u64, len: u64, access: AccessFlags) -> Result<Registered> {
        self.register_backend(addr, len, access, true)
    }

    /// [`register`](Self::register) past its hit path: identify the memory, then look up,
    /// then register on a miss. Out of line, so that the hit path stays a small function.
    /// `foreign`: memory whose free is not announced is accepted (the caller's
    /// [`register_foreign`](Self::register_foreign) contract).
    #[inline(never)]
    fn register_identified(&self, addr: u64, len: u64, access: AccessFlags, foreign: bool) -> Result<Registered> {
        for _ in 0..RACE_RETRIES {
            let (backend, info) = self.identify(addr)?;
            info.check(addr - info.base, len)?;
            let notifies = backend.notifies(&info);
            if !notifies && !foreign {
                return Err(Error::NotAnnounced { addr });
            }
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
                tracing::error!("revoking registrations of a freed allocation failed: {e}");
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
        let alloc = match domain {
            Domain::Alloc(key) => Some(key),
            Domain::HostVa => None,
        };
        let reg =
            self.try_strategies(kind, backend, reg_range.clone(), access)?.watched_by(watched).of_allocation(alloc);
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
        // The region itself grants no remote rights: with windows only windows reach it, and
        // without, keys are regions of their own over exactly what is handed out. A dma-buf
        // region without windows is the exception: it has no address to register a part of,
        // so its own rkey is the key (handed out whole only).
        let local = access & !AccessFlags::REMOTE_ANY;
        let mr_access_for = |s: Strategy| {
            if windowed {
                local | AccessFlags::MW_BIND
            } else if s == Strategy::DmaBuf {
                access
            } else {
                local
            }
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
                        // windows, then the region — before it is acknowledged. A free that
                        // began after the miss's checks is seen by the epoch: the registration
                        // is then refused by the cache and revoked before any post or key.
                        Ok(x) => unsafe { pd.register_dmabuf(x.fd(), x.offset(), len, range.start, mr_access_for(s)) }
                            .map(|m| (Mr::Direct(m), Some(x)))
                            .map_err(Error::from),
                    }
                }
                Strategy::PeerMem | Strategy::PinnedHost => {
                    // SAFETY: backend memory is revoked (deregistered) through its notices
                    // before it is freed (a free racing this miss is seen by the epoch, and
                    // the registration revoked before any post or key); host VA memory is the
                    // caller's `register_host` contract, and its unmapping revokes through the
                    // monitor.
                    unsafe { pd.register_raw(range.start as *mut u8, len, mr_access_for(s)) }
                        .map(|m| (Mr::Direct(m), None))
                        .map_err(Error::from)
                }
                Strategy::Odp => {
                    // SAFETY: as for pinned registrations above; ODP pins nothing, and the
                    // kernel's MMU notifier also drops pages that are unmapped.
                    unsafe { pd.register_raw(range.start as *mut u8, len, mr_access_for(s) | AccessFlags::ON_DEMAND) }
                        .map(|m| (Mr::Direct(m), None))
                        .map_err(Error::from)
                }
                Strategy::Bounce if backend.is_none() => {
                    skipped.push((s, SkipReason::NotForThisMemory { applies_to: AppliesTo::BackendMemory }));
                    continue;
                }
                Strategy::Bounce => HostBuffer::new(len)
                    .and_then(|b| pd.register(b, mr_access_for(s)))
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
pub(crate) fn allocations_over(
    allocs: &BTreeMap<u64, (AllocationKey, u64)>,
    range: Range<u64>,
) -> impl Iterator<Item = (u64, AllocationKey)> + '_ {
    allocs.range(..range.end).filter(move |(&b, (_, l))| b.saturating_add(*l) > range.start).map(|(&b, (k, _))| (b, *k))
}

/// `addr + len`, or why not: a registration needs 1 byte at least and may not wrap.
pub(crate) fn check_range(addr: u64, len: u64) -> Result<u64> {
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
