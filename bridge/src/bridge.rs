//! The bridge: registers memory through the best strategy, caches registrations, and keeps
//! them honest when memory goes away.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use p2pbridge_gpu::{AllocationKey, FlushOutcome, MemoryBackend, Subscription};
use p2pbridge_verbs::{
    AccessFlags, Connection, Foreign, HostBuffer, LocalSlice, MemoryRegion, OdpTransportCaps, ProtectionDomain,
    SendFlags,
};

use crate::cache::{CachePolicy, Cost, Domain, Handle, RegCache};
use crate::error::{Error, Result};
use crate::key::RemoteKey;
use crate::strategy::{plan, HostCaps, MemoryKind, Policy, SkipReason, Strategy};

/// Registrations alive in this process (all bridges): for leak checks.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The number of registrations (memory regions) the bridge holds in this process.
pub fn live_registrations() -> usize {
    LIVE.load(Ordering::SeqCst)
}

enum Mr {
    Direct(MemoryRegion<Foreign>),
    Bounce(MemoryRegion<HostBuffer>),
}

impl Mr {
    fn lkey_slice(&self, offset: u64, len: u64) -> p2pbridge_verbs::Result<LocalSlice<'_>> {
        match self {
            Mr::Direct(m) => m.slice(offset..offset + len),
            Mr::Bounce(m) => m.slice(offset..offset + len),
        }
    }
    fn addr(&self) -> u64 {
        match self {
            Mr::Direct(m) => m.addr(),
            Mr::Bounce(m) => m.addr(),
        }
    }
    fn rkey(&self) -> u32 {
        match self {
            Mr::Direct(m) => m.rkey(),
            Mr::Bounce(m) => m.rkey(),
        }
    }
}

/// One registration in the cache: an MR (direct) or a registered staging buffer (bounce).
pub struct Registration {
    strategy: Strategy,
    skipped: Vec<(Strategy, SkipReason)>,
    mr: Mr,
    backend: Option<Arc<dyn MemoryBackend>>,
    // Kept while the MR exists: revoking or dropping it is the exporter's business.
    _export: Option<p2pbridge_gpu::DmaBufExport>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Registration {
    /// The strategy used.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }
    /// The strategies not used, and why.
    pub fn skipped(&self) -> &[(Strategy, SkipReason)] {
        &self.skipped
    }
}

/// A registered range: what RDMA operations take. It holds its cache entry, so the memory is
/// not deregistered (and, for backend memory, not freed) while it lives.
pub struct Registered {
    handle: Handle<Registration>,
    addr: u64,
    len: u64,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("strategy", &self.strategy())
            .field("generation", &self.generation())
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
    /// Offset of `self.addr` inside the cache entry's registration.
    fn entry_offset(&self) -> u64 {
        self.addr - self.handle.range().start
    }
    /// The descriptor a peer needs to reach `range` (offsets within this registered range).
    /// For bounce registrations it names the staging buffer: the owner calls
    /// [`Bridge::publish`] before peers read and [`Bridge::flush`] after they write.
    pub fn remote_key(&self, range: Range<u64>) -> Result<RemoteKey> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::OutOfBounds {
                offset: range.start,
                len: range.end.saturating_sub(range.start),
                size: self.len,
            });
        }
        let mr = &self.handle.value().mr;
        Ok(RemoteKey {
            addr: mr.addr() + self.entry_offset() + range.start,
            len: range.end - range.start,
            rkey: mr.rkey(),
            generation: self.generation(),
        })
    }
    /// A bounds-checked part of the registration for posting work requests yourself (on a
    /// QP of the bridge's PD). For bounce registrations it names the staging buffer.
    pub fn slice(&self, offset: u64, len: u64) -> Result<LocalSlice<'_>> {
        self.local(offset, len)
    }

    fn local(&self, offset: u64, len: u64) -> Result<LocalSlice<'_>> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::OutOfBounds { offset, len, size: self.len });
        }
        Ok(self.handle.value().mr.lkey_slice(self.entry_offset() + offset, len)?)
    }
}

struct Inner {
    pd: ProtectionDomain,
    caps: HostCaps,
    policy: Policy,
    cache: RegCache<Registration>,
    backends: Vec<Arc<dyn MemoryBackend>>,
    subs: Mutex<HashMap<AllocationKey, Subscription>>,
    handed_out: Mutex<HashMap<u64, (Domain, Range<u64>)>>,
    invalidate_timeout: Duration,
    /// The userfaultfd monitor's subscription, or why there is none.
    watch: std::result::Result<crate::uffd::Watch, String>,
}

/// Options of a [`Bridge`].
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Which strategies may be used.
    pub policy: Policy,
    /// Cache limits.
    pub cache: CachePolicy,
    /// How long an invalidation waits for in-flight work before it gives up waiting (the
    /// registration is then released when that work ends).
    pub invalidate_timeout: Duration,
    /// Watch registered host memory with the userfaultfd monitor, so that `munmap`, `mremap`
    /// and `MADV_DONTNEED` drop its registrations by themselves.
    pub monitor_host: bool,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            policy: Policy::default(),
            cache: CachePolicy::default(),
            invalidate_timeout: Duration::from_secs(30),
            monitor_host: true,
        }
    }
}

/// Registers memory for one protection domain. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

impl Bridge {
    /// A bridge for `pd` that knows `backends` (whose memory it can identify, export, copy,
    /// and be told about before it is freed).
    pub fn new(pd: &ProtectionDomain, backends: Vec<Arc<dyn MemoryBackend>>, opts: BridgeOptions) -> Result<Self> {
        let caps = HostCaps::probe(pd)?;
        let monitor_host = opts.monitor_host;
        Ok(Bridge {
            inner: Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
                pd: pd.clone(),
                caps,
                policy: opts.policy,
                cache: RegCache::new(opts.cache),
                backends,
                subs: Mutex::new(HashMap::new()),
                handed_out: Mutex::new(HashMap::new()),
                invalidate_timeout: opts.invalidate_timeout,
                watch: if monitor_host {
                    let weak = weak.clone();
                    crate::uffd::subscribe(Box::new(move |range| {
                        if let Some(inner) = weak.upgrade() {
                            // Never wait here: a faulting thread may need the monitor. The
                            // registrations are released when their last user lets go.
                            drop(inner.cache.remove_overlapping(Domain::HostVa, range));
                        }
                    }))
                    .map_err(|e| e.to_string())
                } else {
                    Err("disabled by BridgeOptions::monitor_host".into())
                },
            }),
        })
    }

    /// Whether host memory registered with [`Bridge::register_host`] is watched by the
    /// userfaultfd monitor, and if not, why.
    pub fn host_monitor(&self) -> std::result::Result<(), &str> {
        self.inner.watch.as_ref().map(|_| ()).map_err(|e| e.as_str())
    }

    /// What the host can do, as probed.
    pub fn caps(&self) -> &HostCaps {
        &self.inner.caps
    }

    /// The protection domain.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.inner.pd
    }

    /// The cache (for inspection).
    pub fn cache(&self) -> &RegCache<Registration> {
        &self.inner.cache
    }

    /// Registers `len` bytes at `addr`, which must be memory of one of the bridge's backends.
    /// A cached registration covering the range with at least `access` is reused.
    ///
    /// Safe because the backend tells the bridge before freeing that memory, and the free
    /// waits until the registration is gone and no [`Registered`] of it is left.
    pub fn register(&self, addr: u64, len: u64, access: AccessFlags) -> Result<Registered> {
        let mut found = None;
        for b in &self.inner.backends {
            if let Some(info) = b.identify(addr)? {
                found = Some((b.clone(), info));
                break;
            }
        }
        let (backend, info) = found.ok_or(Error::NotBackendMemory(addr))?;
        info.check(addr - info.base, len)?;
        let domain = Domain::Alloc(info.key);
        self.register_in(domain, MemoryKind::Backend(backend.kind()), Some((backend, info)), addr, len, access)
    }

    /// Registers host memory no backend owns (a `Vec`, an mmap).
    ///
    /// Where the userfaultfd monitor runs ([`Bridge::host_monitor`]), the range is watched:
    /// `munmap`, `mremap` or `madvise(MADV_DONTNEED)` of it drop its registrations by
    /// themselves, so a later mapping at the same address is never reached through the old
    /// key. Watching needs anonymous or shared memory (not a file mapping): other memory is
    /// refused with [`Error::Monitor`].
    ///
    /// # Safety
    /// The range must be mapped when registered. Without the monitor, [`Bridge::invalidate_host`]
    /// must be called for it before any `munmap`, `mremap` or `madvise(MADV_DONTNEED)` of it.
    /// Memory a peer may write must not be read through Rust references that assume it does
    /// not change.
    pub unsafe fn register_host(&self, addr: u64, len: u64, access: AccessFlags) -> Result<Registered> {
        if self.inner.watch.is_ok() && len > 0 {
            crate::uffd::watch(addr..addr + len)?;
        }
        self.register_in(Domain::HostVa, MemoryKind::Host, None, addr, len, access)
    }

    /// Host memory at `range` is going away: deregisters what covers it, after in-flight work
    /// on it finishes. Returns how many registrations were dropped.
    pub fn invalidate_host(&self, range: Range<u64>) -> Result<usize> {
        self.inner
            .cache
            .invalidate(Domain::HostVa, range, self.inner.invalidate_timeout)
            .map_err(Error::InvalidationTimedOut)
    }

    /// Registers `addr..addr+len` of `domain`; `alloc` is the backend and allocation for
    /// backend memory (None for host VA memory).
    fn register_in(
        &self,
        domain: Domain,
        kind: MemoryKind,
        alloc: Option<(Arc<dyn MemoryBackend>, p2pbridge_gpu::AllocationInfo)>,
        addr: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<Registered> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot register 0 bytes".into()));
        }
        let access = access | AccessFlags::LOCAL_WRITE;
        let range = addr..addr + len;
        if let Some(handle) = self.inner.cache.lookup(domain, range.clone(), access.bits()) {
            return Ok(Registered { handle, addr, len });
        }
        // A miss: make sure the backend tells us before this allocation goes away (once per
        // allocation; the hit path above needs no subscription lookup).
        let backend = alloc.map(|(b, info)| {
            self.subscribe(&b, info.key, info.len);
            b
        });
        let reg_range = self.inner.cache.merged_range(domain, range.clone(), access.bits());
        let device = backend.as_ref().map(|b| b.device()).unwrap_or(0);
        let reg = self.try_strategies(kind, backend, reg_range.clone(), access)?;
        let cost = match reg.strategy {
            Strategy::DmaBuf | Strategy::PeerMem => Cost::Exported { device },
            Strategy::PinnedHost | Strategy::Bounce => Cost::Pinned,
            Strategy::Odp => Cost::Unpinned,
        };
        let ins = self.inner.cache.insert(domain, reg_range, access.bits(), cost, reg)?;
        drop(ins.removed);
        Ok(Registered { handle: ins.handle, addr, len })
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
        let len = (range.end - range.start) as usize;
        let pd = &self.inner.pd;
        for s in p.candidates {
            let attempt: Result<(Mr, Option<p2pbridge_gpu::DmaBufExport>)> = match s {
                Strategy::DmaBuf => {
                    let b = backend.as_ref().ok_or_else(|| Error::InvalidArgument("dma-buf needs a backend".into()))?;
                    match b.export_dmabuf(range.start, range.end - range.start) {
                        Err(e) => {
                            skipped.push((s, SkipReason::ExportUnsupported { reason: e.to_string() }));
                            continue;
                        }
                        // SAFETY: the exporter keeps the memory valid until it notifies us
                        // (the backend's notices, which deregister before the free).
                        Ok(x) => unsafe { pd.register_dmabuf(x.fd(), x.offset(), len, range.start, access) }
                            .map(|m| (Mr::Direct(m), Some(x)))
                            .map_err(Error::from),
                    }
                }
                Strategy::PeerMem | Strategy::PinnedHost => {
                    // SAFETY: backend memory is deregistered (via its notices) before it is
                    // freed; host VA memory is the caller's `register_host` contract.
                    unsafe { pd.register_raw(range.start as *mut u8, len, access) }
                        .map(|m| (Mr::Direct(m), None))
                        .map_err(Error::from)
                }
                Strategy::Odp => {
                    // SAFETY: as for pinned registrations above; ODP pins nothing, and the
                    // kernel's MMU notifier also drops pages that are unmapped.
                    unsafe { pd.register_raw(range.start as *mut u8, len, access | AccessFlags::ON_DEMAND) }
                        .map(|m| (Mr::Direct(m), None))
                        .map_err(Error::from)
                }
                Strategy::Bounce => HostBuffer::new(len)
                    .and_then(|b| pd.register(b, access))
                    .map(|m| (Mr::Bounce(m), None))
                    .map_err(Error::from),
            };
            match attempt {
                Ok((mr, export)) => {
                    LIVE.fetch_add(1, Ordering::SeqCst);
                    return Ok(Registration { strategy: s, skipped, mr, backend: backend.clone(), _export: export });
                }
                Err(e) => skipped.push((s, SkipReason::Failed { error: e.to_string() })),
            }
        }
        Err(Error::NoStrategy(skipped))
    }

    /// Subscribes (once per allocation) to the backend's notices: before the allocation is
    /// freed, its registrations are removed, in-flight work on them is waited for, and they are
    /// deregistered; then the notice is acknowledged.
    fn subscribe(&self, backend: &Arc<dyn MemoryBackend>, key: AllocationKey, len: u64) {
        let mut subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
        if subs.contains_key(&key) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let sub = backend.notices().subscribe(key, 0..len, move |notice| {
            if let Some(inner) = weak.upgrade() {
                let _ = inner.cache.invalidate(Domain::Alloc(notice.key), 0..u64::MAX, inner.invalidate_timeout);
                if notice.reason == p2pbridge_gpu::InvalidationReason::Free {
                    inner.subs.lock().unwrap_or_else(|e| e.into_inner()).remove(&notice.key);
                }
            }
            notice.ack();
        });
        subs.insert(key, sub);
    }

    /// Records that `key` was handed to a peer, so that [`Bridge::check_key`] can refuse it
    /// once stale. Returns the key.
    pub fn hand_out(&self, reg: &Registered, range: Range<u64>) -> Result<RemoteKey> {
        let k = reg.remote_key(range)?;
        let mut handed = self.inner.handed_out.lock().unwrap_or_else(|e| e.into_inner());
        // Keys of invalidated registrations are forgotten once the record outgrows the cache,
        // so a process that churns buffers does not grow it without bound (amortized O(1)).
        if handed.len() >= 2 * self.inner.cache.usage().0 + 64 {
            handed.retain(|&g, (d, r)| self.inner.cache.is_live(*d, r.clone(), g));
        }
        handed.insert(k.generation, (reg.handle.domain(), reg.handle.range()));
        Ok(k)
    }

    /// Refuses a descriptor this bridge handed out whose registration has since been
    /// invalidated (its generation is gone).
    pub fn check_key(&self, key: &RemoteKey) -> Result<()> {
        let handed = self.inner.handed_out.lock().unwrap_or_else(|e| e.into_inner());
        let Some((domain, range)) = handed.get(&key.generation).cloned() else {
            return Err(Error::StaleKey {
                generation: key.generation,
                why: "not a key this bridge handed out, or one invalidated and forgotten since",
            });
        };
        drop(handed);
        if self.inner.cache.is_live(domain, range, key.generation) {
            Ok(())
        } else {
            self.inner.handed_out.lock().unwrap_or_else(|e| e.into_inner()).remove(&key.generation);
            Err(Error::StaleKey {
                generation: key.generation,
                why: "its registration was invalidated (memory freed or remapped)",
            })
        }
    }

    /// RDMA WRITE of `len` bytes at `offset` of `local` to `remote` at `remote_offset`, waiting
    /// for the completion. Bounce registrations copy device -> staging first.
    pub fn write(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        self.stage_in(local, offset, len)?;
        let rs = remote.slice(remote_offset, len)?;
        conn.qp().post_write(0, &local.local(offset, len)?, &rs, SendFlags::SIGNALED)?;
        conn.send_cq().wait_one(self.inner.invalidate_timeout)?;
        Ok(())
    }

    /// RDMA READ of `len` bytes from `remote` at `remote_offset` into `local` at `offset`,
    /// waiting for the completion. Bounce registrations copy staging -> device after.
    pub fn read(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        let rs = remote.slice(remote_offset, len)?;
        conn.qp().post_read(0, &local.local(offset, len)?, &rs, SendFlags::SIGNALED)?;
        conn.send_cq().wait_one(self.inner.invalidate_timeout)?;
        if self.bounce_backend(local).is_some() {
            self.flush_range(local, offset, len)?;
        }
        Ok(())
    }

    /// SEND of `len` bytes at `offset` of `local` (with immediate data if given), waiting for
    /// the completion. The peer must have a receive posted ([`Bridge::recv`]).
    pub fn send(&self, conn: &Connection, local: &Registered, offset: u64, len: u64, imm: Option<u32>) -> Result<()> {
        self.stage_in(local, offset, len)?;
        conn.qp().post_send(0, &local.local(offset, len)?, imm, SendFlags::SIGNALED)?;
        conn.send_cq().wait_one(self.inner.invalidate_timeout)?;
        Ok(())
    }

    /// Posts a receive into `len` bytes at `offset` of `local` and waits (up to `timeout`) for
    /// a message; returns its length and immediate data. Bounce registrations copy staging ->
    /// memory after.
    pub fn recv(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<(u32, Option<u32>)> {
        conn.qp().post_recv(0, &local.local(offset, len)?)?;
        let wc = conn.recv_cq().wait_one(timeout)?;
        if self.bounce_backend(local).is_some() {
            self.flush_range(local, offset, u64::from(wc.byte_len))?;
        }
        Ok((wc.byte_len, wc.imm))
    }

    /// Makes what peers wrote into `reg` visible to its memory's owner: bounce registrations
    /// copy staging -> memory; device memory gets the backend's NIC-write flush.
    pub fn flush(&self, reg: &Registered) -> Result<FlushOutcome> {
        if self.bounce_backend(reg).is_some() {
            self.flush_range(reg, 0, reg.len)?;
            return Ok(FlushOutcome::Flushed);
        }
        match &reg.handle.value().backend {
            Some(b) => Ok(b.flush_nic_writes()?),
            None => Ok(FlushOutcome::NotNeeded("host memory: a completion already orders the NIC's writes")),
        }
    }

    /// Before peers RDMA READ a bounce registration: copies memory -> staging. (No-op for
    /// direct registrations.)
    pub fn publish(&self, reg: &Registered) -> Result<()> {
        self.stage_in(reg, 0, reg.len)
    }

    /// For a bounce registration: copies `len` bytes at `offset` of the memory into its
    /// staging buffer (no-op for direct registrations).
    fn stage_in(&self, reg: &Registered, offset: u64, len: u64) -> Result<()> {
        if let Some(b) = self.bounce_backend(reg) {
            let mut tmp = vec![0u8; len as usize];
            // SAFETY: `reg` holds its cache entry, so the allocation cannot be freed during the
            // copy (its free waits for the entry's invalidation).
            unsafe { b.copy_from_addr(reg.addr + offset, &mut tmp) }?;
            self.write_staging(reg, reg.entry_offset() + offset, &tmp)?;
        }
        Ok(())
    }

    fn flush_range(&self, reg: &Registered, offset: u64, len: u64) -> Result<()> {
        let b = self.bounce_backend(reg).ok_or_else(|| Error::InvalidArgument("not a bounce registration".into()))?;
        let start = (reg.entry_offset() + offset) as usize;
        let data = match &reg.handle.value().mr {
            Mr::Bounce(m) => m.as_slice()[start..start + len as usize].to_vec(),
            Mr::Direct(_) => return Ok(()),
        };
        // SAFETY: `reg` holds its cache entry (see `write`).
        unsafe { b.copy_to_addr(reg.addr + offset, &data) }?;
        Ok(())
    }

    fn bounce_backend<'r>(&self, reg: &'r Registered) -> Option<&'r Arc<dyn MemoryBackend>> {
        let v = reg.handle.value();
        match (&v.mr, &v.backend) {
            (Mr::Bounce(_), Some(b)) => Some(b),
            _ => None,
        }
    }

    /// Writes `data` into the staging buffer of a bounce registration at `at` (an offset in
    /// the cache entry's range).
    fn write_staging(&self, reg: &Registered, at: u64, data: &[u8]) -> Result<()> {
        match &reg.handle.value().mr {
            Mr::Bounce(m) => {
                if at.checked_add(data.len() as u64).is_none_or(|e| e > m.len()) {
                    return Err(Error::OutOfBounds { offset: at, len: data.len() as u64, size: m.len() });
                }
                // SAFETY: within the staging mapping (checked); its pointer is the mmap's own.
                // Concurrent operations on one registration's same bytes are the caller's to
                // avoid, as for any RDMA buffer.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), m.raw_ptr().add(at as usize), data.len()) };
                Ok(())
            }
            Mr::Direct(_) => Err(Error::InvalidArgument("not a bounce registration".into())),
        }
    }
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
