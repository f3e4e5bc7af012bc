//! The registration cache: an interval map of registrations, keyed by (memory domain, access,
//! range), with limits, LRU eviction of unused entries, and invalidation that hands every
//! entry over a range — held or not — to the caller to revoke.
//!
//! It is generic over the registration `V` (the bridge stores memory regions; tests store
//! plain values), so its logic is checked against a reference model without a NIC.
//!
//! - **Lookup** (the hit path) takes only a shared read lock and bumps the entry's LRU stamp
//!   with an atomic store: concurrent lookups never wait for each other. It is two map look-ups
//!   (the domain, then one `O(log n)` range query per access set the domain has).
//! - **Lookup by address** ([`RegCache::lookup_at`]): the owner may *declare* which domain an
//!   address range belongs to ([`RegCache::declare`]), for domains whose entries it guarantees
//!   never outlive their memory; a hit then needs no identification of the memory, under the
//!   same read lock. A declaration lasts while its domain has entries.
//! - Entries of one (domain, access) never overlap: an insert that overlaps or touches
//!   existing entries replaces them with one entry covering the union (the caller registers
//!   that union), where [`CachePolicy::merge`] allows.
//! - A [`Handle`] keeps its entry alive. Eviction takes only entries no handle holds.
//!   Replacement by a merged entry *retires* the old ones: out of the index (no more hits), but
//!   still found by [`RegCache::remove_overlapping`] while a handle holds them, so that
//!   invalidating a range reaches every registration over it, held or not.
//! - The cache never waits for handles: [`RegCache::remove_overlapping`] hands the entries over
//!   to the caller, who revokes them (the bridge deregisters at once; its handles turn dead).
//! - An *epoch* counts invalidations, so that a registration made on a cache miss is inserted
//!   only if no invalidation ran since the miss began ([`RegCache::insert_since`]): a free that
//!   races a registration is never missed.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;
use std::hash::Hash;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

/// Where a range lives: one allocation of a backend, or the process's host address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    /// Memory of a backend allocation (its addresses are only valid for its lifetime).
    Alloc(p2pbridge_gpu::AllocationKey),
    /// Plain host virtual memory.
    HostVa,
}

/// What a registration holds down, for the cache's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cost {
    /// Pinned host pages (pinned registrations, bounce staging).
    Pinned,
    /// Device memory exported to the NIC (dma-buf, peer memory), per device ordinal.
    Exported {
        /// The device.
        device: u32,
    },
    /// Nothing pinned (ODP).
    Unpinned,
}

/// One cached registration.
// In this order (what a hit reads and writes first, next to the reference counts; the
// registration, which may be large, last), so that a hit touches one cache line of it.
#[repr(C)]
pub struct Entry<V> {
    range: Range<u64>,
    last_use: AtomicU64,
    access: u32,
    domain: Domain,
    cost: Cost,
    generation: u64,
    value: V,
}

impl<V> Entry<V> {
    /// The memory domain.
    pub fn domain(&self) -> Domain {
        self.domain
    }
    /// The access bits it was registered with.
    pub fn access(&self) -> u32 {
        self.access
    }
    /// The registered range.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }
    /// What it holds down.
    pub fn cost(&self) -> Cost {
        self.cost
    }
    /// Unique per registration, never reused: descriptors carry it.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The registration.
    pub fn value(&self) -> &V {
        &self.value
    }
}

/// A user's hold on an entry: the registration stays alive while any handle does.
pub type Handle<V> = Arc<Entry<V>>;

/// Limits and behaviour of a cache.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// Most entries kept. The default is sized from the byte budgets, not fixed
    /// ([`CachePolicy::entries_for`]): as many entries as the pinned budget holds host pages, or
    /// as the exported budget holds 64 KiB GPU pages, whichever is more, within
    /// [`MIN_DEFAULT_ENTRIES`]..=[`MAX_DEFAULT_ENTRIES`]. A pool of small blocks (a KV cache,
    /// one registration per block) fits as long as its bytes fit the budgets; the byte limits
    /// are what bound the memory held down. A [`Bridge`](crate::Bridge) whose policy keeps the
    /// default recomputes it from the budgets it keeps (the policy's pinned budget, a GPU's
    /// BAR1 for the exported one).
    pub max_entries: usize,
    /// Most bytes kept registered, over all domains.
    pub max_bytes: u64,
    /// Most bytes of pinned host memory. The default is the process's budget
    /// ([`crate::budget::pinned`]: `RLIMIT_MEMLOCK`, or half of physical memory where that does
    /// not apply).
    pub max_pinned_bytes: u64,
    /// Most bytes exported to the NIC per device.
    pub max_exported_bytes_per_device: u64,
    /// Merge overlapping or adjacent registrations of the same domain and access.
    pub merge: bool,
}

/// The fewest entries a default policy allows (the old fixed default): small budgets
/// (`RLIMIT_MEMLOCK` of a few MiB) still cache this many unpinned (ODP) registrations.
pub const MIN_DEFAULT_ENTRIES: usize = 4096;

/// The most entries a default policy allows (about a million): each costs a few hundred bytes
/// here with its registration, plus the NIC's own state for the memory region, and eviction
/// sorts the unused entries; NICs' memory-region limits are of this order.
pub const MAX_DEFAULT_ENTRIES: usize = 1 << 20;

/// The unit the pinned budget is divided by for the default entry count: a host page.
const HOST_PAGE: u64 = 4096;

/// The unit the exported budget is divided by: a GPU page (CUDA's 64 KiB granularity).
const GPU_PAGE: u64 = 64 << 10;

impl CachePolicy {
    /// The default entry limit for these budgets: one entry per host page of the pinned budget
    /// or per 64 KiB GPU page of the exported budget (whichever gives more), within
    /// [`MIN_DEFAULT_ENTRIES`]..=[`MAX_DEFAULT_ENTRIES`].
    pub fn entries_for(max_pinned_bytes: u64, max_exported_bytes_per_device: u64) -> usize {
        let n = (max_pinned_bytes / HOST_PAGE).max(max_exported_bytes_per_device / GPU_PAGE);
        usize::try_from(n).unwrap_or(usize::MAX).clamp(MIN_DEFAULT_ENTRIES, MAX_DEFAULT_ENTRIES)
    }
}

impl Default for CachePolicy {
    fn default() -> Self {
        let max_pinned_bytes = crate::budget::pinned().bytes;
        let max_exported_bytes_per_device = DEFAULT_EXPORTED_BYTES;
        CachePolicy {
            max_entries: Self::entries_for(max_pinned_bytes, max_exported_bytes_per_device),
            max_bytes: 16 << 30,
            max_pinned_bytes,
            max_exported_bytes_per_device,
            merge: true,
        }
    }
}

/// The exported-bytes limit per device where no backend reports its BAR1 size.
const DEFAULT_EXPORTED_BYTES: u64 = 8 << 30;

type Slot = (Domain, u32);

/// Buckets of invalidation epochs.
const EPOCH_BUCKETS: usize = 256;

/// The entries of one (domain, access), which never overlap: by start address in a B-tree (range
/// queries: hits inside an entry, overlaps, neighbours), and in a hash map by exact start, so
/// that a hit at an entry's own start (the same buffer registered again: the common case) is
/// one probe rather than a walk down a tree of 100k entries (a cache miss per level). The tree
/// holds the entries; the hash map holds weak references to the same ones, so that an entry no
/// handle holds still has a strong count of 1.
struct Intervals<V> {
    tree: BTreeMap<u64, Arc<Entry<V>>>,
    exact: HashMap<u64, Weak<Entry<V>>>,
}

impl<V> Default for Intervals<V> {
    fn default() -> Self {
        Intervals { tree: BTreeMap::new(), exact: HashMap::default() }
    }
}

impl<V> Intervals<V> {
    fn insert(&mut self, e: Arc<Entry<V>>) {
        self.exact.insert(e.range.start, Arc::downgrade(&e));
        self.tree.insert(e.range.start, e);
    }

    fn remove(&mut self, start: u64) -> Option<Arc<Entry<V>>> {
        self.exact.remove(&start);
        self.tree.remove(&start)
    }

    fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// The entries, in address order.
    fn values(&self) -> impl Iterator<Item = &Arc<Entry<V>>> {
        self.tree.values()
    }

    fn into_values(self) -> impl Iterator<Item = Arc<Entry<V>>> {
        self.tree.into_values()
    }

    /// A hold on the entry starting at `addr`, else on the last one starting before it.
    fn at_or_before(&self, addr: u64) -> Option<Arc<Entry<V>>> {
        // Every weak reference has its entry in the tree (they come and go together), so the
        // upgrade succeeds; were it not to, the tree answers.
        if let Some(e) = self.exact.get(&addr).and_then(Weak::upgrade) {
            return Some(e);
        }
        self.tree.range(..=addr).next_back().map(|(_, e)| e.clone())
    }

    /// The start of the last entry starting at or before `addr`.
    fn start_at_or_before(&self, addr: u64) -> Option<u64> {
        self.tree.range(..=addr).next_back().map(|(&s, _)| s)
    }

    /// The entries starting within `r`, in address order.
    fn starting_in(&self, r: impl std::ops::RangeBounds<u64>) -> impl Iterator<Item = &Arc<Entry<V>>> {
        self.tree.range(r).map(|(_, e)| e)
    }
}

/// Declared address ranges (see [`RegCache::declare`]): sorted by start, never overlapping,
/// each naming a domain that has entries. They are few (one per allocation with
/// registrations), so a sorted vector searched by bisection: cheaper than a tree to search.
#[derive(Default)]
struct Directory {
    ranges: Vec<(u64, u64, Domain)>,
    /// Each declared domain's range.
    of: HashMap<Domain, Range<u64>>,
}

impl Directory {
    /// The domain declared at `addr`.
    fn at(&self, addr: u64) -> Option<Domain> {
        let i = self.ranges.partition_point(|&(start, _, _)| start <= addr);
        let &(_, end, d) = self.ranges.get(i.checked_sub(1)?)?;
        (addr < end).then_some(d)
    }

    /// Drops `d`'s declaration, if any.
    fn remove(&mut self, d: Domain) {
        if let Some(r) = self.of.remove(&d) {
            let i = self.ranges.partition_point(|&(start, _, _)| start < r.start);
            if self.ranges.get(i).is_some_and(|&(_, _, dd)| dd == d) {
                self.ranges.remove(i);
            }
        }
    }

    /// Declares `range` as `d`'s, dropping `d`'s earlier declaration and those it overlaps.
    fn declare(&mut self, d: Domain, range: Range<u64>) {
        self.remove(d);
        let over: Vec<Domain> = self
            .ranges
            .iter()
            .filter(|&&(start, end, _)| start < range.end && range.start < end)
            .map(|&(_, _, dd)| dd)
            .collect();
        for dd in over {
            self.remove(dd);
        }
        let i = self.ranges.partition_point(|&(start, _, _)| start < range.start);
        self.ranges.insert(i, (range.start, range.end, d));
        self.of.insert(d, range);
    }

    fn clear(&mut self) {
        self.ranges.clear();
        self.of.clear();
    }
}

struct Index<V> {
    /// Per domain, per access: start -> entry; the entries of one (domain, access) never
    /// overlap.
    maps: HashMap<Domain, BTreeMap<u32, Intervals<V>>>,
    /// Declared address ranges; a domain's declaration goes with its last entry.
    directory: Directory,
    entries: usize,
    bytes: u64,
    /// Bytes per cost class (Unpinned included).
    by_cost: HashMap<Cost, u64>,
    /// Entries out of the index (replaced by a merged entry, or handed over by an invalidation)
    /// that may still be held; invalidations find them too. Pruned once unheld.
    retired: Vec<Arc<Entry<V>>>,
}

/// Usage counts an insert would lead to, for the limit checks.
#[derive(Clone)]
struct Usage {
    entries: usize,
    bytes: u64,
    pinned: u64,
    exported: u64,
}

impl<V> Index<V> {
    fn slot(&self, (d, a): Slot) -> Option<&Intervals<V>> {
        self.maps.get(&d)?.get(&a)
    }

    fn remove(&mut self, (d, a): Slot, start: u64) -> Option<Arc<Entry<V>>> {
        let by_access = self.maps.get_mut(&d)?;
        let m = by_access.get_mut(&a)?;
        let e = m.remove(start)?;
        if m.is_empty() {
            by_access.remove(&a);
            if by_access.is_empty() {
                self.maps.remove(&d);
                self.directory.remove(d);
            }
        }
        self.entries -= 1;
        self.bytes -= e.range.end - e.range.start;
        *self.by_cost.entry(e.cost).or_default() -= e.range.end - e.range.start;
        Some(e)
    }

    fn insert(&mut self, e: Arc<Entry<V>>) {
        self.entries += 1;
        self.bytes += e.range.end - e.range.start;
        *self.by_cost.entry(e.cost).or_default() += e.range.end - e.range.start;
        self.maps.entry(e.domain).or_default().entry(e.access).or_default().insert(e);
    }

    /// The entry of `domain` covering `range` with at least `access` (the one with the fewest
    /// rights where several do).
    fn find(&self, domain: Domain, range: &Range<u64>, access: u32) -> Option<Handle<V>> {
        let mut best: Option<Handle<V>> = None;
        for (&acc, m) in self.maps.get(&domain)? {
            if acc & access != access || best.as_ref().is_some_and(|b| acc.count_ones() >= b.access.count_ones()) {
                continue;
            }
            if let Some(e) = m.at_or_before(range.start) {
                if e.range.end >= range.end {
                    best = Some(e);
                }
            }
        }
        best
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Entry<V>>> {
        self.maps.values().flat_map(|by| by.values().flat_map(|m| m.values()))
    }
}

/// Why an insert could not be kept within the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct CacheFull {
    /// Which limit could not be kept: "entries or bytes", "pinned bytes", "exported bytes of
    /// the device"; or [`CacheFull::EMPTY_RANGE`], for an insert of an empty or reversed range
    /// (whose entry no invalidation could ever find), refused.
    pub limit: &'static str,
    /// Entries held.
    pub entries: usize,
    /// Bytes held.
    pub bytes: u64,
    /// The entry limit.
    pub max_entries: usize,
    /// The byte limit.
    pub max_bytes: u64,
    /// Bytes counted against the broken limit that no eviction could free (held entries).
    pub used: u64,
    /// The broken limit, in bytes.
    pub max: u64,
    /// The bytes asked for.
    pub asked: u64,
}

impl CacheFull {
    /// The `limit` of a refused insert of an empty or reversed range.
    pub const EMPTY_RANGE: &'static str = "a non-empty range (start < end)";

    fn describe(&self) -> String {
        if self.limit == Self::EMPTY_RANGE {
            return "a registration cache entry needs a non-empty range (start < end): the insert was refused".into();
        }
        format!(
            "registration cache full on {}: {} more bytes asked, {} of {} in use by registrations still held ({} entries / {} bytes held; limits: {} entries, {} bytes)",
            self.limit, self.asked, self.used, self.max, self.entries, self.bytes, self.max_entries, self.max_bytes
        )
    }
}

/// The unused entries (least recently used first) whose eviction makes room for an entry of
/// `len` bytes costing `cost` that replaces `merged`; each victim relieves a limit the insert
/// would break. `Err` with the limit when even evicting every unused entry would not do.
fn make_room<V>(
    idx: &Index<V>,
    p: &CachePolicy,
    merged: &[Arc<Entry<V>>],
    cost: Cost,
    len: u64,
) -> Result<Vec<(Slot, u64)>, CacheFull> {
    let counts = |c: Cost, n: u64| -> (u64, u64) {
        match c {
            Cost::Pinned => (n, 0),
            Cost::Exported { .. } if c == cost => (0, n),
            _ => (0, 0),
        }
    };
    let size = |e: &Entry<V>| e.range.end - e.range.start;
    let mut u = Usage {
        entries: idx.entries,
        bytes: idx.bytes,
        pinned: idx.by_cost.get(&Cost::Pinned).copied().unwrap_or(0),
        exported: if matches!(cost, Cost::Exported { .. }) { idx.by_cost.get(&cost).copied().unwrap_or(0) } else { 0 },
    };
    let take = |u: &mut Usage, e: &Entry<V>| {
        let (pin, exp) = counts(e.cost, size(e));
        u.entries -= 1;
        u.bytes -= size(e);
        u.pinned -= pin;
        u.exported -= exp;
    };
    for e in merged {
        take(&mut u, e);
    }
    let (new_pin, new_exp) = counts(cost, len);
    // Which limits the insert would break (each victim must relieve one of them).
    let broken = |u: &Usage| {
        (
            u.entries + 1 > p.max_entries || u.bytes.saturating_add(len) > p.max_bytes,
            new_pin > 0 && u.pinned.saturating_add(new_pin) > p.max_pinned_bytes,
            new_exp > 0 && u.exported.saturating_add(new_exp) > p.max_exported_bytes_per_device,
        )
    };
    let mut evict: Vec<(Slot, u64)> = Vec::new();
    if broken(&u) == (false, false, false) {
        return Ok(evict);
    }
    let mut victims: Vec<&Arc<Entry<V>>> =
        idx.all().filter(|e| Arc::strong_count(e) == 1).filter(|e| !merged.iter().any(|m| Arc::ptr_eq(m, e))).collect();
    victims.sort_unstable_by_key(|e| e.last_use.load(Ordering::Relaxed));
    for v in victims {
        let (any, pinned, exported) = broken(&u);
        if !(any || pinned || exported) {
            break;
        }
        let (vp, ve) = counts(v.cost, size(v));
        if any || (pinned && vp > 0) || (exported && ve > 0) {
            evict.push(((v.domain, v.access), v.range.start));
            take(&mut u, v);
        }
    }
    let (any, pinned, exported) = broken(&u);
    if !(any || pinned || exported) {
        return Ok(evict);
    }
    let (limit, used, max) = if any {
        ("entries or bytes", u.bytes, p.max_bytes)
    } else if pinned {
        ("pinned bytes", u.pinned, p.max_pinned_bytes)
    } else {
        ("exported bytes of the device", u.exported, p.max_exported_bytes_per_device)
    };
    Err(CacheFull {
        limit,
        entries: idx.entries,
        bytes: idx.bytes,
        max_entries: p.max_entries,
        max_bytes: p.max_bytes,
        used,
        max,
        asked: len,
    })
}

/// What an insert did.
pub struct Inserted<V> {
    /// The new entry.
    pub handle: Handle<V>,
    /// Entries it replaced (merged into it) or evicted to make room; dropping them releases
    /// their registrations once no handle remains.
    pub removed: Vec<Handle<V>>,
}

/// The cache. See the module documentation.
pub struct RegCache<V> {
    index: RwLock<Index<V>>,
    /// Invalidation counts, per bucket of domains: bumped by every
    /// [`remove_overlapping`](RegCache::remove_overlapping) of a domain of the bucket, under
    /// the write lock. (Buckets, not one counter, so that frees of other allocations do not make
    /// a registration start over; a shared bucket costs a spurious retry at worst.)
    epochs: Box<[AtomicU64]>,
    clock: AtomicU64,
    next_generation: AtomicU64,
    policy: CachePolicy,
}

impl<V> RegCache<V> {
    /// An empty cache.
    pub fn new(policy: CachePolicy) -> Self {
        RegCache {
            index: RwLock::new(Index {
                maps: HashMap::default(),
                directory: Directory::default(),
                entries: 0,
                bytes: 0,
                by_cost: HashMap::default(),
                retired: Vec::new(),
            }),
            epochs: (0..EPOCH_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            clock: AtomicU64::new(1),
            next_generation: AtomicU64::new(1),
            policy,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Index<V>> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index<V>> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The policy.
    pub fn policy(&self) -> &CachePolicy {
        &self.policy
    }

    /// (entries, bytes) held.
    pub fn usage(&self) -> (usize, u64) {
        let i = self.read();
        (i.entries, i.bytes)
    }

    /// An entry of `domain` covering `range` with at least `access`, if cached (a hit).
    pub fn lookup(&self, domain: Domain, range: Range<u64>, access: u32) -> Option<Handle<V>> {
        let idx = self.read();
        idx.find(domain, &range, access).map(|e| self.touch(e))
    }

    /// [`lookup`](Self::lookup) in the domain declared ([`declare`](Self::declare)) at
    /// `range.start`, under the same read lock: a hit found by address alone. `None` where no
    /// declared domain lies there, or it has no entry covering `range` with `access`.
    pub fn lookup_at(&self, range: Range<u64>, access: u32) -> Option<Handle<V>> {
        let idx = self.read();
        let domain = idx.directory.at(range.start)?;
        idx.find(domain, &range, access).map(|e| self.touch(e))
    }

    /// Declares that the addresses `range` are `domain`'s (its allocation's extent), so that
    /// [`lookup_at`](Self::lookup_at) finds its entries by address. Declarations of other
    /// domains overlapping `range` are dropped, as is `domain`'s earlier one. Nothing is
    /// declared unless `domain` has entries now; the declaration goes with its last entry
    /// (invalidated, evicted, merged away), so it never outlives them.
    ///
    /// The cache trusts a declaration only as a place to look: the caller declares only
    /// domains whose entries are all removed ([`remove_overlapping`](Self::remove_overlapping))
    /// before their memory goes, so that a found entry is always over live memory of `domain`,
    /// however old the declaration.
    pub fn declare(&self, domain: Domain, range: Range<u64>) {
        if self.read().directory.of.get(&domain) == Some(&range) {
            return; // already (the common case: a miss in a domain that has hits)
        }
        let mut idx = self.write();
        if !idx.maps.contains_key(&domain) || range.start >= range.end {
            return;
        }
        idx.directory.declare(domain, range);
    }

    /// Stamps `e` as just used, for LRU eviction.
    fn touch(&self, e: Handle<V>) -> Handle<V> {
        e.last_use.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        e
    }

    /// The range an insert of `range` would register: `range` widened by every overlapping or
    /// adjacent entry of the same (domain, access) when merging is on.
    pub fn merged_range(&self, domain: Domain, range: Range<u64>, access: u32) -> Range<u64> {
        if !self.policy.merge {
            return range;
        }
        let idx = self.read();
        let Some(m) = idx.slot((domain, access)) else { return range };
        let mut r = range;
        for e in neighbours(m, &r) {
            r = r.start.min(e.range.start)..r.end.max(e.range.end);
        }
        r
    }

    /// Inserts a registration of `range` (normally [`merged_range`](Self::merged_range)'s
    /// answer). Entries of the same (domain, access) that it overlaps or touches are replaced;
    /// then unused entries are evicted, least recently used first, until the limits hold.
    pub fn insert(
        &self,
        domain: Domain,
        range: Range<u64>,
        access: u32,
        cost: Cost,
        value: V,
    ) -> Result<Inserted<V>, CacheFull> {
        match self.insert_since(None, domain, range, access, cost, value)? {
            Ok(ins) => Ok(ins),
            Err(_) => unreachable!("an insert without an epoch is never stale"),
        }
    }

    /// The current epoch of `domain`: read it before a cache miss starts its registration, and
    /// pass it to [`insert_since`](Self::insert_since).
    pub fn epoch(&self, domain: Domain) -> u64 {
        self.epoch_of(domain).load(Ordering::SeqCst)
    }

    fn epoch_of(&self, domain: Domain) -> &AtomicU64 {
        use std::hash::BuildHasher;
        let h = rustc_hash::FxBuildHasher.hash_one(domain);
        &self.epochs[(h % EPOCH_BUCKETS as u64) as usize]
    }

    /// [`insert`](Self::insert), but (with `since: Some(epoch)`) only if no invalidation of
    /// `domain` ran since `epoch` ([`epoch`](Self::epoch)) was read:
    /// otherwise `Ok(Err(value))` gives the registration back (its memory may be gone; the
    /// caller drops it and tries again).
    pub fn insert_since(
        &self,
        since: Option<u64>,
        domain: Domain,
        range: Range<u64>,
        access: u32,
        cost: Cost,
        value: V,
    ) -> Result<Result<Inserted<V>, V>, CacheFull> {
        let mut idx = self.write();
        if range.start >= range.end {
            let p = &self.policy;
            return Err(CacheFull {
                limit: CacheFull::EMPTY_RANGE,
                entries: idx.entries,
                bytes: idx.bytes,
                max_entries: p.max_entries,
                max_bytes: p.max_bytes,
                used: 0,
                max: 0,
                asked: 0,
            });
        }
        if since.is_some_and(|e| e != self.epoch_of(domain).load(Ordering::SeqCst)) {
            return Ok(Err(value));
        }
        let len = range.end.saturating_sub(range.start);
        let entry = Arc::new(Entry {
            domain,
            access,
            cost,
            range: range.clone(),
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            last_use: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
            value,
        });
        let slot = (domain, access);
        // Entries the new one replaces (merged into it).
        let merged: Vec<Arc<Entry<V>>> = match idx.slot(slot) {
            Some(m) => neighbours(m, &range).cloned().collect(),
            None => Vec::new(),
        };
        let evict = make_room(&idx, &self.policy, &merged, cost, len)?;
        // The domain's declaration survives its entries being replaced by this one.
        let declared = idx.directory.of.get(&domain).cloned();
        let merged: Vec<u64> = merged.iter().map(|e| e.range.start).collect();
        let replaced: Vec<Handle<V>> = merged.into_iter().filter_map(|s| idx.remove(slot, s)).collect();
        // Unheld retired entries are done with; the replaced ones are retired (the caller drops
        // its copies, and the next prune lets the unheld ones go).
        let mut removed = prune_retired(&mut idx.retired);
        idx.retired.extend(replaced.iter().cloned());
        removed.extend(replaced);
        removed.extend(evict.into_iter().filter_map(|(vslot, s)| idx.remove(vslot, s)));
        idx.insert(entry.clone());
        if let Some(r) = declared {
            if !idx.directory.of.contains_key(&domain) {
                idx.directory.declare(domain, r);
            }
        }
        Ok(Ok(Inserted { handle: entry, removed }))
    }

    /// Whether an entry of `len` bytes costing `cost` would fit — after evicting unused entries,
    /// which an insert would do — and if not, which limit it would break. Changes nothing: a
    /// registration checks this before it pins or exports memory, and takes another strategy
    /// (or fails with the limit) instead of pinning past the budget.
    pub fn room_for(&self, cost: Cost, len: u64) -> Result<(), CacheFull> {
        make_room(&self.read(), &self.policy, &[], cost, len).map(drop)
    }

    /// Makes room for an entry of `len` bytes costing `cost` now: evicts the unused entries
    /// [`room_for`](Self::room_for) would, and returns them (dropping them releases their
    /// registrations). A registration calls this before it pins: the kernel counts pinned
    /// pages as they are pinned, so the old ones must go first. Nothing changes on `Err`.
    pub fn evict_for(&self, cost: Cost, len: u64) -> Result<Vec<Handle<V>>, CacheFull> {
        let mut idx = self.write();
        let evict = make_room(&idx, &self.policy, &[], cost, len)?;
        Ok(evict.into_iter().filter_map(|(slot, s)| idx.remove(slot, s)).collect())
    }

    /// Removes every entry of `domain` overlapping `range` — indexed ones, and retired ones
    /// still held — and returns them: the memory is about to go, and the caller revokes them.
    /// Bumps the epoch (see [`insert_since`](Self::insert_since)).
    pub fn remove_overlapping(&self, domain: Domain, range: Range<u64>) -> Vec<Handle<V>> {
        let overlaps = |e: &Entry<V>| e.domain == domain && e.range.start < range.end && range.start < e.range.end;
        let unheld;
        let gone = {
            let mut idx = self.write();
            self.epoch_of(domain).fetch_add(1, Ordering::SeqCst);
            // Retired entries no one holds any more are done with: dropped (which releases
            // their registrations) once the lock is released, before this returns.
            unheld = prune_retired(&mut idx.retired);
            let mut gone = Vec::new();
            let victims: Vec<(u32, u64)> = match idx.maps.get(&domain) {
                Some(by) => {
                    by.iter().flat_map(|(&a, m)| overlapping(m, &range).map(move |e| (a, e.range.start))).collect()
                }
                None => Vec::new(),
            };
            let indexed: Vec<Handle<V>> =
                victims.into_iter().filter_map(|(a, start)| idx.remove((domain, a), start)).collect();
            gone.extend(idx.retired.iter().filter(|e| overlaps(e)).cloned());
            // What is handed over stays findable (retired) while anyone holds it, so that a
            // second invalidation of the same memory — a free racing this one — gets it too and
            // waits for its revocation instead of finding nothing.
            idx.retired.extend(indexed.iter().cloned());
            gone.extend(indexed);
            gone
        };
        drop(unheld);
        gone
    }

    /// Removes every entry (indexed and retired) and returns them, for the caller to revoke.
    pub fn drain(&self) -> Vec<Handle<V>> {
        let mut idx = self.write();
        for e in self.epochs.iter() {
            e.fetch_add(1, Ordering::SeqCst);
        }
        let maps = std::mem::take(&mut idx.maps);
        idx.directory.clear();
        idx.retired.extend(maps.into_values().flat_map(|by| by.into_values().flat_map(|m| m.into_values())));
        idx.entries = 0;
        idx.bytes = 0;
        idx.by_cost.clear();
        // Kept findable, as in `remove_overlapping`.
        idx.retired.clone()
    }

    /// Every entry (for inspection and tests), in no particular order.
    pub fn entries(&self) -> Vec<Handle<V>> {
        self.read().all().cloned().collect()
    }

    /// Whether `generation` names a live entry of `domain` that covers `range`.
    pub fn is_live(&self, domain: Domain, range: Range<u64>, generation: u64) -> bool {
        let idx = self.read();
        idx.maps.get(&domain).is_some_and(|by| {
            by.values().any(|m| {
                m.at_or_before(range.start).is_some_and(|e| e.generation == generation && e.range.end >= range.end)
            })
        })
    }
}

/// Takes the retired entries no handle holds any more out of `retired`.
fn prune_retired<V>(retired: &mut Vec<Arc<Entry<V>>>) -> Vec<Arc<Entry<V>>> {
    let (done, held): (Vec<_>, Vec<_>) = std::mem::take(retired).into_iter().partition(|e| Arc::strong_count(e) == 1);
    *retired = held;
    done
}

/// Entries of `m` that overlap `r`.
fn overlapping<'a, V>(m: &'a Intervals<V>, r: &Range<u64>) -> impl Iterator<Item = &'a Arc<Entry<V>>> + 'a {
    let first = m.start_at_or_before(r.start).unwrap_or(r.start);
    let end = r.end;
    let start = r.start;
    m.starting_in(first..end.max(first)).filter(move |e| e.range.end > start && e.range.start < end)
}

/// Entries of `m` that overlap or touch `r`.
fn neighbours<'a, V>(m: &'a Intervals<V>, r: &Range<u64>) -> impl Iterator<Item = &'a Arc<Entry<V>>> + 'a {
    let first = m.start_at_or_before(r.start).unwrap_or(r.start);
    let (start, end) = (r.start, r.end);
    m.starting_in(first..=end.max(first)).filter(move |e| e.range.end >= start && e.range.start <= end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_entries: usize) -> RegCache<&'static str> {
        RegCache::new(CachePolicy {
            max_entries,
            max_bytes: u64::MAX,
            max_pinned_bytes: u64::MAX,
            max_exported_bytes_per_device: u64::MAX,
            merge: true,
        })
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)]
    fn an_empty_or_reversed_range_is_refused_not_kept_where_no_invalidation_finds_it() {
        let c = cache(8);
        for r in [10..10, 20..10] {
            let e = c.insert(Domain::HostVa, r.clone(), 1, Cost::Unpinned, "x").err().expect("refused");
            assert_eq!(e.limit, CacheFull::EMPTY_RANGE);
            assert!(e.to_string().contains("non-empty range"), "{e}");
        }
        assert_eq!(c.usage(), (0, 0), "nothing was kept");
    }

    #[test]
    fn a_full_cache_of_held_entries_refuses_and_changes_nothing() {
        let c = cache(2);
        let a = c.insert(Domain::HostVa, 0..10, 1, Cost::Unpinned, "a").unwrap().handle;
        let b = c.insert(Domain::HostVa, 100..110, 1, Cost::Unpinned, "b").unwrap().handle;
        let e = c.insert(Domain::HostVa, 200..210, 1, Cost::Unpinned, "c").err().expect("both entries are held");
        assert_eq!((e.entries, e.max_entries), (2, 2));
        // Merging into a held neighbour is not blocked by it: it is replaced, not evicted.
        let before = c.entries().len();
        assert_eq!(before, 2);
        drop(b);
        let ins = c.insert(Domain::HostVa, 200..210, 1, Cost::Unpinned, "c").unwrap();
        assert_eq!(ins.removed.len(), 1, "the unused entry is evicted");
        assert_eq!(ins.removed[0].value(), &"b");
        assert!(c.lookup(Domain::HostVa, 0..10, 1).is_some(), "the held entry stays");
        drop(a);
    }

    #[test]
    fn pinned_and_exported_limits_evict_only_what_relieves_them() {
        let c: RegCache<&str> = RegCache::new(CachePolicy {
            max_entries: 100,
            max_bytes: u64::MAX,
            max_pinned_bytes: 200,
            max_exported_bytes_per_device: 100,
            merge: false,
        });
        let gpu0 = Cost::Exported { device: 0 };
        let gpu1 = Cost::Exported { device: 1 };
        c.insert(Domain::HostVa, 0..100, 1, Cost::Pinned, "p1").unwrap();
        c.insert(Domain::HostVa, 1000..1100, 1, Cost::Unpinned, "odp").unwrap();
        c.insert(Domain::HostVa, 2000..2100, 1, gpu0, "g0").unwrap();
        c.insert(Domain::HostVa, 3000..3100, 1, gpu1, "g1").unwrap();
        c.insert(Domain::HostVa, 200..300, 1, Cost::Pinned, "p2").unwrap();
        // A third pinned entry: the oldest pinned one goes, not the older ODP/exported ones.
        let ins = c.insert(Domain::HostVa, 400..500, 1, Cost::Pinned, "p3").unwrap();
        assert_eq!(ins.removed.iter().map(|e| *e.value()).collect::<Vec<_>>(), vec!["p1"]);
        // Device 0's export limit evicts device 0's entry only.
        let ins = c.insert(Domain::HostVa, 4000..4100, 1, gpu0, "g0b").unwrap();
        assert_eq!(ins.removed.iter().map(|e| *e.value()).collect::<Vec<_>>(), vec!["g0"]);
        // Held, nothing relieves the limit: refused, nothing changed.
        let held = c.lookup(Domain::HostVa, 4000..4100, 1).unwrap();
        let e = c.insert(Domain::HostVa, 5000..5100, 1, gpu0, "g0c").err().expect("device 0's export limit is held");
        assert_eq!(e.limit, "exported bytes of the device");
        assert_eq!(c.entries().len(), 5);
        drop(held);
    }

    #[test]
    fn lookups_pick_the_narrowest_access_that_covers() {
        let c = cache(10);
        c.insert(Domain::HostVa, 0..100, 7, Cost::Unpinned, "rw").unwrap();
        c.insert(Domain::HostVa, 0..100, 1, Cost::Unpinned, "local").unwrap();
        assert_eq!(*c.lookup(Domain::HostVa, 10..20, 1).unwrap().value(), "local");
        assert_eq!(*c.lookup(Domain::HostVa, 10..20, 3).unwrap().value(), "rw");
        assert!(c.lookup(Domain::HostVa, 90..101, 1).is_none());
        assert!(c.lookup(Domain::HostVa, 10..20, 8).is_none());
    }

    #[test]
    fn adjacent_registrations_merge() {
        let c = cache(10);
        c.insert(Domain::HostVa, 0..100, 1, Cost::Unpinned, "x").unwrap();
        c.insert(Domain::HostVa, 200..300, 1, Cost::Unpinned, "y").unwrap();
        assert_eq!(c.merged_range(Domain::HostVa, 100..200, 1), 0..300);
        let ins = c.insert(Domain::HostVa, 0..300, 1, Cost::Unpinned, "xy").unwrap();
        assert_eq!(ins.removed.len(), 2);
        assert_eq!(c.entries().len(), 1);
        assert_eq!(c.usage(), (1, 300));
    }

    #[test]
    fn held_entries_merged_away_are_still_found_by_invalidation() {
        // Hold 0..4096, register 4096..8192 (merged into 0..8192): invalidating everything must
        // return the held old entry too, not only the merged one.
        let c = cache(10);
        let held = c.insert(Domain::HostVa, 0..4096, 1, Cost::Unpinned, "a").unwrap().handle;
        let merged = c.merged_range(Domain::HostVa, 4096..8192, 1);
        assert_eq!(merged, 0..8192);
        let ins = c.insert(Domain::HostVa, merged, 1, Cost::Unpinned, "ab").unwrap();
        drop(ins.removed);
        assert_eq!(c.usage(), (1, 8192), "the old entry is out of the index");
        let gone = c.remove_overlapping(Domain::HostVa, 0..u64::MAX);
        let mut names: Vec<&str> = gone.iter().map(|e| *e.value()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["a", "ab"], "the held, merged-away entry must be invalidated too");
        // Unheld retired entries are let go at the next insert.
        drop((gone, held));
        let x = c.insert(Domain::HostVa, 0..10, 1, Cost::Unpinned, "x").unwrap();
        let y = c.insert(Domain::HostVa, 0..20, 1, Cost::Unpinned, "y").unwrap();
        drop((x, y));
        let z = c.insert(Domain::HostVa, 100..110, 1, Cost::Unpinned, "z").unwrap();
        assert_eq!(
            z.removed.iter().map(|e| *e.value()).collect::<Vec<_>>(),
            vec!["x"],
            "unheld retired entries are pruned"
        );
    }

    fn alloc(id: u64) -> Domain {
        Domain::Alloc(p2pbridge_gpu::AllocationKey { backend: p2pbridge_gpu::BackendKind::Host, device: 0, id })
    }

    #[test]
    fn lookups_by_address_find_declared_domains_only_while_they_have_entries() {
        let c = cache(10);
        let (a, b) = (alloc(1), alloc(2));
        // Nothing declared, or declared without entries: no hit by address.
        c.declare(a, 0..1000);
        c.insert(a, 100..200, 3, Cost::Unpinned, "a").unwrap();
        assert!(c.lookup_at(100..200, 3).is_none(), "a declaration made without entries was kept");
        c.declare(a, 0..1000);
        assert_eq!(*c.lookup_at(100..200, 3).unwrap().value(), "a");
        assert_eq!(*c.lookup_at(150..160, 1).unwrap().value(), "a", "a sub-range, fewer rights");
        assert!(c.lookup_at(150..260, 3).is_none(), "past the entry");
        assert!(c.lookup_at(150..160, 4).is_none(), "more rights than registered");
        assert!(c.lookup_at(2000..2100, 3).is_none(), "outside the declaration");
        // An entry of an undeclared domain at the same addresses is not found by address.
        c.insert(b, 300..400, 3, Cost::Unpinned, "b").unwrap();
        assert!(c.lookup_at(300..400, 3).is_none());
        assert!(c.lookup(b, 300..400, 3).is_some());
        // Replacing the domain's only entry by a merged one keeps the declaration.
        let m = c.merged_range(a, 200..250, 3);
        assert_eq!(m, 100..250);
        drop(c.insert(a, m, 3, Cost::Unpinned, "a2").unwrap());
        assert_eq!(*c.lookup_at(100..250, 3).unwrap().value(), "a2");
        // Its last entry invalidated, the declaration goes, and a new entry does not bring it back.
        drop(c.remove_overlapping(a, 0..u64::MAX));
        c.insert(a, 100..200, 3, Cost::Unpinned, "a3").unwrap();
        assert!(c.lookup_at(100..200, 3).is_none(), "a declaration outlived its domain's entries");
        assert!(c.lookup(a, 100..200, 3).is_some());
        // A declaration over another's addresses replaces it.
        c.declare(a, 0..1000);
        c.declare(b, 0..500);
        assert!(c.lookup_at(100..200, 3).is_none(), "the overlapped declaration was kept");
        assert_eq!(*c.lookup_at(300..400, 3).unwrap().value(), "b");
        assert!(c.drain().len() >= 2);
        assert!(c.lookup_at(300..400, 3).is_none());
    }

    #[test]
    fn hits_at_an_entry_start_and_inside_it_agree() {
        let c = cache(1000);
        for i in 0..500u64 {
            c.insert(Domain::HostVa, i * 8192..i * 8192 + 4096, 3, Cost::Unpinned, "x").unwrap();
        }
        for i in 0..500u64 {
            let at = c.lookup(Domain::HostVa, i * 8192..i * 8192 + 4096, 3).unwrap();
            let inside = c.lookup(Domain::HostVa, i * 8192 + 100..i * 8192 + 200, 3).unwrap();
            assert!(Arc::ptr_eq(&at, &inside));
            assert!(c.lookup(Domain::HostVa, i * 8192 + 4096..i * 8192 + 4097, 3).is_none(), "a gap hit");
            assert!(c.is_live(Domain::HostVa, i * 8192..i * 8192 + 4096, at.generation()));
        }
        // Handles held by lookups leave entries held; dropped, they are evictable again.
        let held = c.lookup(Domain::HostVa, 0..4096, 3).unwrap();
        assert_eq!(Arc::strong_count(&held), 2, "the index holds an entry once");
    }

    #[test]
    fn the_default_entry_limit_follows_the_budgets() {
        assert_eq!(CachePolicy::entries_for(0, 0), MIN_DEFAULT_ENTRIES);
        assert_eq!(CachePolicy::entries_for(8 << 20, 0), MIN_DEFAULT_ENTRIES, "an 8 MiB memlock");
        assert_eq!(CachePolicy::entries_for(1 << 30, 0), 1 << 18, "a page per entry");
        assert_eq!(CachePolicy::entries_for(0, 16 << 30), 1 << 18, "a 64 KiB GPU page per entry");
        assert_eq!(CachePolicy::entries_for(u64::MAX, u64::MAX), MAX_DEFAULT_ENTRIES);
        let d = CachePolicy::default();
        assert_eq!(d.max_entries, CachePolicy::entries_for(d.max_pinned_bytes, d.max_exported_bytes_per_device));
        assert!(d.max_entries >= 131_072, "the default exported budget alone allows 128Ki entries");
    }

    #[test]
    fn an_insert_after_an_invalidation_since_the_miss_is_refused() {
        let c = cache(10);
        let e0 = c.epoch(Domain::HostVa);
        drop(c.remove_overlapping(Domain::HostVa, 0..100));
        match c.insert_since(Some(e0), Domain::HostVa, 0..100, 1, Cost::Unpinned, "late").unwrap() {
            Err(v) => assert_eq!(v, "late"),
            Ok(_) => panic!("a registration that raced an invalidation was inserted"),
        }
        assert_eq!(c.usage(), (0, 0));
        let e1 = c.epoch(Domain::HostVa);
        assert!(c.insert_since(Some(e1), Domain::HostVa, 0..100, 1, Cost::Unpinned, "ok").unwrap().is_ok());
        assert_eq!(c.drain().len(), 1);
        assert_eq!(c.usage(), (0, 0));
    }
}
