//! The registration cache: an interval map of registrations, keyed by (memory domain, access,
//! range), with limits, LRU eviction of unused entries, and invalidation that waits for
//! in-flight users.
//!
//! It is generic over the registration `V` (the bridge stores memory regions; tests store
//! plain values), so its logic is checked against a reference model without a NIC.
//!
//! - **Lookup** (the hit path) takes only a shared read lock and bumps the entry's LRU stamp
//!   with an atomic store: concurrent lookups never wait for each other.
//! - Entries of one (domain, access) never overlap: an insert that overlaps or touches
//!   existing entries replaces them with one entry covering the union (the caller registers
//!   that union), where [`CachePolicy::merge`] allows.
//! - A [`Handle`] keeps its entry (and so its registration) alive: in-flight work holds one.
//!   Removing an entry (eviction, replacement, invalidation) drops the cache's reference; the
//!   registration is released when the last handle goes. [`RegCache::invalidate`] waits for
//!   those handles, so memory is released only after every user of it is done.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;
use std::hash::Hash;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

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
pub struct Entry<V> {
    domain: Domain,
    access: u32,
    cost: Cost,
    range: Range<u64>,
    generation: u64,
    last_use: AtomicU64,
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
    /// Most entries kept.
    pub max_entries: usize,
    /// Most bytes kept registered, over all domains.
    pub max_bytes: u64,
    /// Most bytes of pinned host memory.
    pub max_pinned_bytes: u64,
    /// Most bytes exported to the NIC per device.
    pub max_exported_bytes_per_device: u64,
    /// Merge overlapping or adjacent registrations of the same domain and access.
    pub merge: bool,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            max_entries: 4096,
            max_bytes: 16 << 30,
            max_pinned_bytes: 8 << 30,
            max_exported_bytes_per_device: 8 << 30,
            merge: true,
        }
    }
}

type Slot = (Domain, u32);
type Intervals<V> = BTreeMap<u64, Arc<Entry<V>>>;

struct Index<V> {
    /// Per domain, per access: start -> entry; the entries of one (domain, access) never
    /// overlap.
    maps: HashMap<Domain, BTreeMap<u32, Intervals<V>>>,
    entries: usize,
    bytes: u64,
    /// Bytes per cost class (Unpinned included).
    by_cost: HashMap<Cost, u64>,
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
        let e = m.remove(&start)?;
        if m.is_empty() {
            by_access.remove(&a);
            if by_access.is_empty() {
                self.maps.remove(&d);
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
        self.maps.entry(e.domain).or_default().entry(e.access).or_default().insert(e.range.start, e);
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Entry<V>>> {
        self.maps.values().flat_map(|by| by.values().flat_map(|m| m.values()))
    }
}

/// Why an insert could not be kept within the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registration cache full: {entries} entries / {bytes} bytes held, and what is over its limit ({limit}) is all in use by in-flight work (limits: {max_entries} entries, {max_bytes} bytes)")]
pub struct CacheFull {
    /// Which limit could not be kept: "entries or bytes", "pinned bytes", "exported bytes of the device".
    pub limit: &'static str,
    /// Entries held.
    pub entries: usize,
    /// Bytes held.
    pub bytes: u64,
    /// The entry limit.
    pub max_entries: usize,
    /// The byte limit.
    pub max_bytes: u64,
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
    clock: AtomicU64,
    next_generation: AtomicU64,
    policy: CachePolicy,
}

impl<V> RegCache<V> {
    /// An empty cache.
    pub fn new(policy: CachePolicy) -> Self {
        RegCache {
            index: RwLock::new(Index { maps: HashMap::default(), entries: 0, bytes: 0, by_cost: HashMap::default() }),
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
        let mut best: Option<&Arc<Entry<V>>> = None;
        for (&acc, m) in idx.maps.get(&domain)?.iter() {
            if acc & access != access {
                continue;
            }
            if let Some((_, e)) = m.range(..=range.start).next_back() {
                if e.range.end >= range.end && best.is_none_or(|b| e.access.count_ones() < b.access.count_ones()) {
                    best = Some(e);
                }
            }
        }
        best.map(|e| {
            e.last_use.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
            e.clone()
        })
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
        let mut idx = self.write();
        let slot = (domain, access);
        // Entries the new one replaces (merged into it).
        let merged: Vec<Arc<Entry<V>>> = match idx.slot(slot) {
            Some(m) => neighbours(m, &range).cloned().collect(),
            None => Vec::new(),
        };
        let p = &self.policy;
        let counts = |e: &Entry<V>| -> (u64, u64) {
            let n = e.range.end - e.range.start;
            match e.cost {
                Cost::Pinned => (n, 0),
                Cost::Exported { .. } if e.cost == cost => (0, n),
                _ => (0, 0),
            }
        };
        let mut u = Usage {
            entries: idx.entries,
            bytes: idx.bytes,
            pinned: idx.by_cost.get(&Cost::Pinned).copied().unwrap_or(0),
            exported: if matches!(cost, Cost::Exported { .. }) {
                idx.by_cost.get(&cost).copied().unwrap_or(0)
            } else {
                0
            },
        };
        let take = |u: &mut Usage, e: &Entry<V>| {
            let (pin, exp) = counts(e);
            u.entries -= 1;
            u.bytes -= e.range.end - e.range.start;
            u.pinned -= pin;
            u.exported -= exp;
        };
        for e in &merged {
            take(&mut u, e);
        }
        let (new_pin, new_exp) = counts(&entry);
        // Which limits the insert would break (each victim must relieve one of them).
        let broken = |u: &Usage| {
            (
                u.entries + 1 > p.max_entries || u.bytes + len > p.max_bytes,
                new_pin > 0 && u.pinned + new_pin > p.max_pinned_bytes,
                new_exp > 0 && u.exported + new_exp > p.max_exported_bytes_per_device,
            )
        };
        // Room for it: unused entries, least recently used first, that relieve a broken
        // limit. Nothing changes unless the insert can succeed.
        let mut evict: Vec<(Slot, u64)> = Vec::new();
        if broken(&u) != (false, false, false) {
            let mut victims: Vec<&Arc<Entry<V>>> = idx
                .all()
                .filter(|e| Arc::strong_count(e) == 1)
                .filter(|e| !merged.iter().any(|m| Arc::ptr_eq(m, e)))
                .collect();
            victims.sort_unstable_by_key(|e| e.last_use.load(Ordering::Relaxed));
            for v in victims {
                let (any, pinned, exported) = broken(&u);
                if !(any || pinned || exported) {
                    break;
                }
                let (vp, ve) = counts(v);
                if any || (pinned && vp > 0) || (exported && ve > 0) {
                    evict.push(((v.domain, v.access), v.range.start));
                    take(&mut u, v);
                }
            }
            let (any, pinned, _) = broken(&u);
            if broken(&u) != (false, false, false) {
                let limit = if any {
                    "entries or bytes"
                } else if pinned {
                    "pinned bytes"
                } else {
                    "exported bytes of the device"
                };
                return Err(CacheFull {
                    limit,
                    entries: idx.entries,
                    bytes: idx.bytes,
                    max_entries: p.max_entries,
                    max_bytes: p.max_bytes,
                });
            }
        }
        let merged: Vec<u64> = merged.iter().map(|e| e.range.start).collect();
        let mut removed: Vec<Handle<V>> = merged.into_iter().filter_map(|s| idx.remove(slot, s)).collect();
        removed.extend(evict.into_iter().filter_map(|(vslot, s)| idx.remove(vslot, s)));
        idx.insert(entry.clone());
        Ok(Inserted { handle: entry, removed })
    }

    /// Removes every entry of `domain` overlapping `range` and returns them: the memory is
    /// about to go. Use [`invalidate`](Self::invalidate) to also wait for their users.
    pub fn remove_overlapping(&self, domain: Domain, range: Range<u64>) -> Vec<Handle<V>> {
        let mut idx = self.write();
        let victims: Vec<(u32, u64)> = match idx.maps.get(&domain) {
            Some(by) => by.iter().flat_map(|(&a, m)| overlapping(m, &range).map(move |e| (a, e.range.start))).collect(),
            None => Vec::new(),
        };
        victims.into_iter().filter_map(|(a, start)| idx.remove((domain, a), start)).collect()
    }

    /// Removes the entries of `domain` overlapping `range`, then waits (up to `timeout`) until
    /// no handle to them remains, and drops them — releasing their registrations — before
    /// returning. Returns how many there were, or the ones still in use at the deadline
    /// (which are released when their last handle goes).
    pub fn invalidate(&self, domain: Domain, range: Range<u64>, timeout: Duration) -> Result<usize, usize> {
        let mut gone = self.remove_overlapping(domain, range);
        let n = gone.len();
        let deadline = Instant::now() + timeout;
        loop {
            gone.retain(|e| Arc::strong_count(e) > 1);
            if gone.is_empty() {
                return Ok(n);
            }
            if Instant::now() >= deadline {
                return Err(gone.len());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
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
                m.range(..=range.start)
                    .next_back()
                    .is_some_and(|(_, e)| e.generation == generation && e.range.end >= range.end)
            })
        })
    }
}

/// Entries of `m` that overlap `r`.
fn overlapping<'a, V>(
    m: &'a BTreeMap<u64, Arc<Entry<V>>>,
    r: &Range<u64>,
) -> impl Iterator<Item = &'a Arc<Entry<V>>> + 'a {
    let first = m.range(..r.start.saturating_add(1)).next_back().map(|(&s, _)| s).unwrap_or(r.start);
    let end = r.end;
    let start = r.start;
    m.range(first..end).map(|(_, e)| e).filter(move |e| e.range.end > start && e.range.start < end)
}

/// Entries of `m` that overlap or touch `r`.
fn neighbours<'a, V>(
    m: &'a BTreeMap<u64, Arc<Entry<V>>>,
    r: &Range<u64>,
) -> impl Iterator<Item = &'a Arc<Entry<V>>> + 'a {
    let first = m.range(..=r.start).next_back().map(|(&s, _)| s).unwrap_or(r.start);
    let (start, end) = (r.start, r.end);
    m.range(first..=end).map(|(_, e)| e).filter(move |e| e.range.end >= start && e.range.start <= end)
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
    fn invalidate_waits_for_handles_then_releases() {
        let c = std::sync::Arc::new(cache(10));
        let h = c.insert(Domain::HostVa, 0..100, 1, Cost::Unpinned, "x").unwrap().handle;
        let gen = h.generation();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(h);
        });
        let start = Instant::now();
        assert_eq!(c.invalidate(Domain::HostVa, 50..60, Duration::from_secs(5)), Ok(1));
        assert!(start.elapsed() >= Duration::from_millis(40), "invalidate returned while a handle was held");
        assert!(!c.is_live(Domain::HostVa, 0..100, gen));
        t.join().unwrap();
        let h2 = c.insert(Domain::HostVa, 0..100, 1, Cost::Unpinned, "y").unwrap().handle;
        assert_eq!(c.invalidate(Domain::HostVa, 0..1, Duration::from_millis(10)), Err(1));
        drop(h2);
    }
}
