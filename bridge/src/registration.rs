//! One registration of memory for the NIC, and the handles users hold on it.
//!
//! A [`Registration`] owns the memory region (and, for bounce, its staging buffer), the memory
//! windows bound over it for peers, and the dma-buf export. It is *live* until it is revoked:
//! revocation deallocates every window (the NIC refuses their keys from then on), deregisters
//! the region (the NIC can no longer reach the memory, not even for our own operations), and
//! releases the export — in that order, and before the memory it covers may go.
//!
//! Operations hold the registration's read lock from posting until their completion is reaped,
//! and revocation takes the write lock: it waits for operations in flight (bounded by the NIC,
//! see [`crate::BridgeOptions::completion_timeout`]) but never for handles that merely exist.
//! A [`Registered`] whose registration was revoked is *dead*: its operations fail with
//! [`Error::Revoked`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};

use p2pbridge_gpu::{AllocationKey, DmaBufExport, MemoryBackend};
use p2pbridge_verbs::{
    AccessFlags, Connection, Foreign, HostBuffer, LocalSlice, MemoryRegion, MemoryWindow, VolatileSlice,
};

use crate::cache::Handle;
use crate::error::{Error, Result};
use crate::strategy::{SkipReason, Strategy};

/// Registrations alive in this process (all bridges): for leak checks.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The number of live registrations (memory regions) the bridges of this process hold.
pub fn live_registrations() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// The memory region of a registration: over the memory itself, or over a staging buffer.
pub(crate) enum Mr {
    Direct(MemoryRegion<Foreign>),
    Bounce(MemoryRegion<HostBuffer>),
}

impl Mr {
    pub(crate) fn slice(&self, offset: u64, len: u64) -> p2pbridge_verbs::Result<LocalSlice<'_>> {
        let end = offset.checked_add(len).ok_or(p2pbridge_verbs::Error::OutOfBounds {
            what: "registration",
            offset,
            length: len as usize,
            len: self.len(),
        })?;
        match self {
            Mr::Direct(m) => m.slice(offset..end),
            Mr::Bounce(m) => m.slice(offset..end),
        }
    }
    pub(crate) fn addr(&self) -> u64 {
        match self {
            Mr::Direct(m) => m.addr(),
            Mr::Bounce(m) => m.addr(),
        }
    }
    pub(crate) fn len(&self) -> u64 {
        match self {
            Mr::Direct(m) => m.len(),
            Mr::Bounce(m) => m.len(),
        }
    }
    pub(crate) fn rkey(&self) -> u32 {
        match self {
            Mr::Direct(m) => m.rkey(),
            Mr::Bounce(m) => m.rkey(),
        }
    }
    pub(crate) fn access(&self) -> AccessFlags {
        match self {
            Mr::Direct(m) => m.access(),
            Mr::Bounce(m) => m.access(),
        }
    }
    fn pd(&self) -> &p2pbridge_verbs::ProtectionDomain {
        match self {
            Mr::Direct(m) => m.pd(),
            Mr::Bounce(m) => m.pd(),
        }
    }
    /// Binds `mw` over `offset..offset+len` of the region on `conn`'s QP (see
    /// [`QueuePair::post_bind_mw`](p2pbridge_verbs::QueuePair::post_bind_mw)).
    ///
    /// # Safety
    /// `mw` must be deallocated before this region is deregistered.
    pub(crate) unsafe fn bind(
        &self,
        conn: &Connection,
        wr_id: u64,
        mw: &MemoryWindow,
        offset: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<u32> {
        // SAFETY: forwarded from the caller.
        let k = unsafe {
            match self {
                Mr::Direct(m) => conn.qp().post_bind_mw(wr_id, mw, m, offset, len, access),
                Mr::Bounce(m) => conn.qp().post_bind_mw(wr_id, mw, m, offset, len, access),
            }
        }?;
        Ok(k)
    }

    /// A region over exactly `offset..offset+len` of this one's memory, with the same rights,
    /// for a window over part of it (see [`Bound`]).
    ///
    /// # Safety
    /// The returned region must be deregistered before this one.
    pub(crate) unsafe fn sub_region(&self, offset: u64, len: u64) -> Result<MemoryRegion<Foreign>> {
        // SAFETY: forwarded from the caller.
        unsafe { self.sub_region_with(offset, len, self.access()) }
    }

    /// A region over exactly `offset..offset+len` of this one's memory with the rights
    /// `access` (ODP where this one is), for a key handed out without windows.
    ///
    /// # Safety
    /// As [`sub_region`](Self::sub_region).
    pub(crate) unsafe fn sub_region_with(
        &self,
        offset: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<MemoryRegion<Foreign>> {
        let (pd, access) = (self.pd(), access | (self.access() & AccessFlags::ON_DEMAND));
        let len = usize::try_from(len).map_err(|_| Error::InvalidArgument("range too large".into()))?;
        // SAFETY: the range lies within this region's memory (the caller checked it) and the
        // caller drops the new region first. That memory is mapped: a backend's allocation is
        // freed only after this registration is revoked (its notices), a staging buffer is
        // ours, and host memory is the `register_host` contract, whose unmapping revokes it
        // (the hand-out catches up with the monitor before it registers, so an unmap that
        // has returned is acted on first).
        Ok(unsafe { pd.register_raw((self.addr() + offset) as *mut u8, len, access) }?)
    }

    /// The staging buffer's memory, for bounce copies (None for direct regions). Peers with
    /// a key may write it at any time, so it is a volatile view, never a slice.
    pub(crate) fn staging(&self) -> Option<VolatileSlice<'_>> {
        match self {
            Mr::Bounce(m) => Some(m.bytes()),
            Mr::Direct(_) => None,
        }
    }

    /// Deregisters now. On failure the region (and a staging buffer) is leaked, never freed:
    /// the NIC may still reach it.
    fn deregister(self) -> Result<()> {
        match self {
            Mr::Direct(m) => m.deregister().map(drop)?,
            Mr::Bounce(m) => m.deregister().map(drop)?,
        }
        Ok(())
    }
}

/// A window handed to a peer, and the region it is bound over when that is not the
/// registration's own: a region over exactly the handed-out range, so that the range is
/// enforced by providers that check a window's accesses against its region's bounds only
/// (rxe does).
pub(crate) struct Bound {
    pub(crate) mw: MemoryWindow,
    pub(crate) region: Option<MemoryRegion<Foreign>>,
}

/// The windows bound over a registration for peers (see [`crate::keys`]), outside its
/// read-write lock: revocation deallocates them at once, whoever holds the registration.
#[derive(Default)]
pub(crate) struct Windows {
    pub(crate) list: Vec<Bound>,
    /// Set by revocation once every window is deallocated: no window may be bound after.
    pub(crate) closed: bool,
    /// Without windows: regions over exactly a handed-out range with exactly its rights, whose
    /// rkeys are the keys handed out; deregistered with the windows.
    pub(crate) exact: Vec<MemoryRegion<Foreign>>,
    /// Regions under windows that could not be deallocated: never deregistered.
    kept: Vec<MemoryRegion<Foreign>>,
    /// The rkeys of windows (or key regions) that could not be deallocated (deregistered):
    /// they may still reach the memory, so their keys are never forgotten nor said revoked.
    pub(crate) failed: Vec<u32>,
}

impl Windows {
    /// Keeps the region under a window that could not be deallocated, to be leaked with the
    /// registration (never deregistered).
    pub(crate) fn keep(&mut self, region: Option<MemoryRegion<Foreign>>) {
        self.kept.extend(region);
    }
}

/// What a live registration holds.
pub(crate) struct Live {
    pub(crate) mr: Mr,
    /// Kept while the region exists: revoking or dropping it is the exporter's business.
    export: Option<DmaBufExport>,
    /// Serializes the bounce copies and the operations on the staging buffer.
    bounce: Mutex<()>,
}

impl Live {
    /// For bounce registrations, the lock that serializes staging copies and operations on the
    /// staging buffer; `None` (nothing to serialize) for direct ones.
    pub(crate) fn bounce_lock(&self) -> Option<MutexGuard<'_, ()>> {
        self.mr.staging().map(|_| self.bounce.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One registration in the cache: a memory region over the memory (direct strategies) or
/// over a registered staging buffer (bounce), until it is revoked.
pub(crate) struct Registration {
    strategy: Strategy,
    skipped: Vec<(Strategy, SkipReason)>,
    /// Memory windows carry the keys handed out (the region has no remote rights itself).
    windowed: bool,
    /// ODP registrations: whether the pages were prefetched into the NIC, or why not.
    prefetch: Option<std::result::Result<(), String>>,
    pub(crate) backend: Option<Arc<dyn MemoryBackend>>,
    /// The backend allocation it covers (None for plain host memory).
    alloc: Option<AllocationKey>,
    state: RwLock<Option<Live>>,
    /// Windows bound for peers; deallocated before any region goes.
    windows: Mutex<Windows>,
    /// A revocation has begun: no new hold is given.
    revoking: AtomicBool,
    /// Why its region must never be deregistered (the NIC may still use it), once something
    /// says so: it is then leaked into the graveyard on revocation ([`crate::graveyard`]).
    leak: OnceLock<&'static str>,
    /// For a leaked region that follows its memory: the subscription, made when the leak is
    /// known, that holds the allocation's free back for ever (moved to the grave).
    hold: Mutex<Option<p2pbridge_gpu::Subscription>>,
    /// Its teardown has been handed to a thread ([`crate::teardown`]): not again.
    deferred: AtomicBool,
    /// Host memory: the monitor watches it while this lives (dropped after the region, since
    /// fields drop after `Drop::drop` revokes).
    watched: Option<crate::uffd::Watched>,
}

impl Registration {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        strategy: Strategy,
        skipped: Vec<(Strategy, SkipReason)>,
        windowed: bool,
        prefetch: Option<std::result::Result<(), String>>,
        backend: Option<Arc<dyn MemoryBackend>>,
        mr: Mr,
        export: Option<DmaBufExport>,
    ) -> Self {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Registration {
            strategy,
            skipped,
            windowed,
            prefetch,
            backend,
            alloc: None,
            state: RwLock::new(Some(Live { mr, export, bounce: Mutex::new(()) })),
            windows: Mutex::new(Windows::default()),
            revoking: AtomicBool::new(false),
            leak: OnceLock::new(),
            hold: Mutex::new(None),
            deferred: AtomicBool::new(false),
            watched: None,
        }
    }

    /// Keeps `watched` (the monitor's watch over its host memory) as long as it lives.
    pub(crate) fn watched_by(mut self, watched: Option<crate::uffd::Watched>) -> Self {
        self.watched = watched;
        self
    }

    /// Records the backend allocation it covers, so that a leak can hold that allocation's free
    /// back ([`crate::graveyard`]).
    pub(crate) fn of_allocation(mut self, key: Option<AllocationKey>) -> Self {
        self.alloc = key;
        self
    }

    /// The backend allocation it covers (None for plain host memory).
    pub(crate) fn alloc(&self) -> Option<AllocationKey> {
        self.alloc
    }

    /// Why its region is kept registered for ever (leaked), if it is.
    pub(crate) fn leaked(&self) -> Option<&'static str> {
        self.leak.get().copied()
    }

    /// The strategy used.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// For ODP registrations, whether the pages were prefetched into the NIC at registration
    /// (`ibv_advise_mr`), or why not; `None` for other strategies.
    pub fn prefetch(&self) -> Option<std::result::Result<(), &str>> {
        self.prefetch.as_ref().map(|r| r.as_ref().map(|_| ()).map_err(|e| e.as_str()))
    }

    /// Whether the keys handed out for it are memory windows (bound to one connection) rather
    /// than regions of their own over the handed-out ranges.
    pub fn windowed(&self) -> bool {
        self.windowed
    }

    /// Whether it is still live: not revoked, and no revocation under way.
    pub fn is_live(&self) -> bool {
        self.live().is_ok()
    }

    /// The live state, held (read-locked) for an operation: revocation waits until the guard
    /// is dropped. `Err(Revoked)` once revoked, and as soon as a revocation is under way: a
    /// new hold never queues behind the revoker (std's lock would put it behind the waiting
    /// writer, and a thread already holding this registration — a `Transfer`, a `LocalGuard` —
    /// would then wait for itself). The memory is going anyway.
    pub(crate) fn live(&self) -> Result<RwLockReadGuard<'_, Option<Live>>> {
        if self.revoking.load(Ordering::SeqCst) {
            return Err(Error::Revoked);
        }
        let g = match self.state.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            // Held for writing, or a writer waits: only `revoke` writes.
            Err(std::sync::TryLockError::WouldBlock) => return Err(Error::Revoked),
        };
        if g.is_none() {
            return Err(Error::Revoked);
        }
        Ok(g)
    }

    /// The NIC may still use its region (`why`): the region is leaked on revocation into the
    /// graveyard ([`crate::graveyard`]), never deregistered. The first cause given is kept.
    ///
    /// Where the region follows its memory (ODP, dma-buf, peer memory) of a backend, the
    /// allocation's free is held back from now on (a subscription to its notices that never
    /// acknowledges), whatever becomes of this registration's cache entry meanwhile.
    pub(crate) fn pin_forever(&self, why: &'static str) {
        if self.leak.set(why).is_err() {
            return;
        }
        if let (Some(b), Some(key)) = (&self.backend, self.alloc) {
            if crate::graveyard::follows_memory(self.strategy) {
                let sub = b.notices().subscribe(key, 0..u64::MAX, std::mem::forget);
                *self.hold.lock().unwrap_or_else(|e| e.into_inner()) = Some(sub);
            }
        }
    }

    /// Whether its teardown is done (the region deregistered or leaked).
    pub(crate) fn torn_down(&self) -> bool {
        match self.state.try_read() {
            Ok(g) => g.is_none(),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().is_none(),
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    /// Marks its teardown as handed to a thread; `false` if it already was.
    pub(crate) fn defer_once(&self) -> bool {
        !self.deferred.swap(true, Ordering::SeqCst)
    }

    /// The error a revocation returns for a leaked registration: only where the region follows
    /// its memory (ODP, dma-buf, peer memory), whose free must then be held back. A pinned or
    /// bounce region holds the pages it had, so the free may go ahead.
    fn leak_result(&self) -> Result<()> {
        match self.leaked() {
            Some(why) if crate::graveyard::follows_memory(self.strategy) => Err(Error::Leaked { why }),
            _ => Ok(()),
        }
    }

    /// The windows bound over it for peers.
    pub(crate) fn windows(&self) -> MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first step of revocation, which waits for no holder: no new hold is given from now
    /// on, and every window over it is deallocated (the NIC refuses their keys from the moment
    /// this returns) and no other may be bound. Idempotent.
    pub(crate) fn revoke_keys(&self) {
        self.revoking.store(true, Ordering::SeqCst);
        let mut w = self.windows();
        w.closed = true;
        let mut regions = std::mem::take(&mut w.exact);
        for b in std::mem::take(&mut w.list) {
            let rkey = b.mw.rkey();
            match b.mw.dealloc() {
                Ok(()) => regions.extend(b.region),
                Err(_) => {
                    // The window is leaked (dealloc does not hand it back), and so is the
                    // region under it.
                    self.pin_forever("a memory window over it could not be deallocated");
                    w.failed.push(rkey);
                    w.kept.extend(b.region);
                }
            }
        }
        // Under the lock, which `tear_down` takes too: a second revoker's teardown (a free
        // racing an invalidation) never deregisters the region, nor lets the memory go, while a
        // key's region over it is still registered here, and sees a failure's leak.
        for r in regions {
            let rkey = r.rkey();
            if r.deregister().is_err() {
                // Still registered (a failed deregistration leaks the region itself): so is
                // the memory under it, and a key that is this region's rkey still reaches it.
                self.pin_forever("a region under one of its windows could not be deregistered");
                w.failed.push(rkey);
            }
        }
        drop(w);
    }

    /// Whether a revocation has begun (no new hold is given; work not yet posted must not be).
    pub(crate) fn is_revoking(&self) -> bool {
        self.revoking.load(Ordering::SeqCst)
    }

    /// Revokes it: deallocates every window over it (their keys are refused by the NIC from
    /// then on, at once: [`revoke_keys`](Self::revoke_keys)), then deregisters its region and
    /// releases the export once the operations holding it ([`live`](Self::live)) are done. It
    /// waits for those operations, never for handles. Idempotent.
    ///
    /// Where the NIC may still use the region ([`pin_forever`](Self::pin_forever), or a window
    /// or region that cannot be deallocated), the region is leaked into the graveyard rather
    /// than deregistered, and [`Error::Leaked`] is returned where the free of its memory must
    /// be held back (regions that follow their memory; see [`crate::graveyard`]).
    pub(crate) fn revoke(&self) -> Result<()> {
        self.revoke_keys();
        // The write lock is held until the teardown is over: a second revoker (a free racing an
        // invalidation of the same memory) returns only once the NIC can no longer reach it.
        let guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        self.tear_down(guard)
    }

    /// [`revoke`](Self::revoke) where no operation holds it; `None` (and the keys revoked) where
    /// one does: the caller then finishes with `revoke` later, on a thread that may wait.
    pub(crate) fn try_revoke(&self) -> Option<Result<()>> {
        self.revoke_keys();
        match self.state.try_write() {
            Ok(guard) => Some(self.tear_down(guard)),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(self.tear_down(e.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Deregisters the region (or leaks it), under the write lock; windows are gone already.
    /// The windows' lock is held throughout: a key's region being deregistered (or leaked) by
    /// `revoke_key` or another revoker is done with before this one decides.
    fn tear_down(&self, mut guard: std::sync::RwLockWriteGuard<'_, Option<Live>>) -> Result<()> {
        let mut w = self.windows();
        let Some(live) = guard.take() else {
            drop(w);
            return self.leak_result();
        };
        LIVE.fetch_sub(1, Ordering::SeqCst);
        let Live { mr, export, .. } = live;
        let kept = std::mem::take(&mut w.kept);
        let range = mr.addr()..mr.addr() + mr.len();
        let range_rkey = mr.rkey();
        let parts: Box<dyn Send> = if self.leaked().is_some() {
            Box::new((mr, export, kept))
        } else {
            match mr.deregister() {
                Ok(()) => {
                    drop(export);
                    drop(guard);
                    return Ok(());
                }
                Err(_) => {
                    self.pin_forever("ibv_dereg_mr failed");
                    Box::new((export, kept))
                }
            }
        };
        let why = self.leaked().unwrap_or("leaked");
        // A dma-buf region's own rkey is a key where there are no windows: it still works, and
        // must never be said revoked.
        if !self.windowed && self.strategy == Strategy::DmaBuf {
            w.failed.push(range_rkey);
        }
        // A region that follows its memory: hold that memory's free back for ever.
        // Made when the leak became known (`pin_forever`).
        let hold = self.hold.lock().unwrap_or_else(|e| e.into_inner()).take();
        let alloc = self.alloc;
        crate::graveyard::bury(crate::graveyard::Grave { strategy: self.strategy, range, why, alloc, parts, hold });
        drop(w);
        drop(guard);
        self.leak_result()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // A leak was buried (and said why) by `revoke`.
        if self.revoke().is_err() || self.leaked().is_some() {
            // The leaked region may be ODP: keep its memory watched, so that an unmap is still
            // seen rather than unwatched under a region that reaches what comes next.
            std::mem::forget(self.watched.take());
        }
    }
}

/// A registered range: what operations take. It holds its cache entry, but not the memory:
/// when the memory goes (freed, unmapped), the registration is revoked and this handle turns
/// dead — its operations then fail with [`Error::Revoked`], and no key reaches the memory.
pub struct Registered {
    pub(crate) handle: Handle<Registration>,
    pub(crate) addr: u64,
    pub(crate) len: u64,
    /// The rights asked for (the cached registration may have more): what keys grant.
    pub(crate) access: AccessFlags,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("strategy", &self.strategy())
            .field("generation", &self.generation())
            .field("live", &self.is_live())
            .finish()
    }
}

impl Registered {
    /// The strategy that serves it.
    pub fn strategy(&self) -> Strategy {
        self.handle.value().strategy
    }
    /// Why the better strategies were not used.
    pub fn skipped(&self) -> &[(Strategy, SkipReason)] {
        &self.handle.value().skipped
    }
    /// Its address (the memory's own: device VA or host VA).
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether it is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The registration's generation: changes whenever the memory is registered anew.
    pub fn generation(&self) -> u64 {
        self.handle.generation()
    }
    /// For ODP registrations, whether the pages were prefetched into the NIC at registration,
    /// or why not; `None` for other strategies.
    pub fn prefetch(&self) -> Option<std::result::Result<(), &str>> {
        self.handle.value().prefetch()
    }
    /// Whether its registration is still live (the memory has not gone since). A leaked
    /// registration (see [`leaked`](Self::leaked)) is not live: nothing can use it, though its
    /// region stays registered.
    pub fn is_live(&self) -> bool {
        self.handle.value().is_live()
    }
    /// Why its region is kept registered for ever, if it is: the NIC may still use it (a
    /// receive left posted on a shared receive queue, a request the device never flushed, a
    /// window that could not be deallocated). See [`leaked_registrations`](crate::leaked_registrations).
    pub fn leaked(&self) -> Option<&'static str> {
        self.handle.value().leaked()
    }
    /// Offset of `self.addr` inside the cache entry's registration.
    pub(crate) fn entry_offset(&self) -> u64 {
        self.addr - self.handle.range().start
    }

    /// `offset..offset+len` of this range, checked, as an offset into the registration.
    pub(crate) fn entry_range(&self, offset: u64, len: u64) -> Result<u64> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::OutOfBounds { offset, len, size: self.len });
        }
        Ok(self.entry_offset() + offset)
    }

    /// Holds the registration live for posting work requests yourself (on a QP of the
    /// bridge's PD): while the returned guard lives, the registration is not revoked — a free
    /// or unmap of the memory waits for it. Keep it until the completions of the work requests
    /// posted with its slices are reaped, and no longer. `Err(Revoked)` if the memory is
    /// already gone.
    ///
    /// While holding it, do not free this memory through its backend: the free waits for the
    /// guard itself, for ever. (Other calls on this registration meanwhile fail with
    /// [`Error::Revoked`] once a revocation is under way, rather than wait.) Unmapping host
    /// memory under a held guard revokes its keys at the NIC at once, as without a guard; the
    /// region itself is deregistered when the guard goes (pinned memory keeps the old pages
    /// until then, which is where requests still in flight land). The monitor never waits
    /// for a guard: other revocations, and `register_host` or `sync_monitor` by the guard's
    /// holder, go on meanwhile.
    pub fn lock(&self) -> Result<LocalGuard<'_>> {
        Ok(LocalGuard { reg: self, guard: self.handle.value().live()? })
    }
}

/// A registration held live ([`Registered::lock`]), giving slices for work requests.
///
/// Posting a request over a slice is `unsafe` ([`QueuePair::post_write`](p2pbridge_verbs::QueuePair::post_write),
/// [`QueuePair::post_recv`](p2pbridge_verbs::QueuePair::post_recv) and their kin): keep this
/// guard until every such request is reaped, which is their contract's part here. The
/// bridge's own transfers ([`Bridge::post`](crate::Bridge::post), [`Bridge::post_recvs`](crate::Bridge::post_recvs)) hold
/// their registrations so by themselves. A thread holding a guard must not itself invalidate
/// the memory ([`Bridge::invalidate_host`](crate::Bridge::invalidate_host) and its kin), free it
/// through its backend, or drop the last clone of the bridge: each waits for the guard.
/// Work-request ids from 2^63 up are the bridge's own (its waiters take completions by id): on
/// connections the bridge also uses, post with ids below 2^63.
pub struct LocalGuard<'r> {
    reg: &'r Registered,
    guard: RwLockReadGuard<'r, Option<Live>>,
}

impl LocalGuard<'_> {
    /// A bounds-checked part of the registered range (offsets within it). For bounce
    /// registrations it names the staging buffer.
    pub fn slice(&self, offset: u64, len: u64) -> Result<LocalSlice<'_>> {
        let at = self.reg.entry_range(offset, len)?;
        let live = self.guard.as_ref().ok_or(Error::Revoked)?;
        Ok(live.mr.slice(at, len)?)
    }
}
