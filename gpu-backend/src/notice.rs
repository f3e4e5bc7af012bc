//! Invalidation notices: the exporting side tells subscribers *before* memory goes away.
//!
//! A subscriber (the bridge's registration cache) registers for a range of an allocation. When
//! the allocation is freed, or an export of it is revoked, every subscriber whose range
//! overlaps is called with a [`Notice`]; the free (or revoke) then waits until every notice is
//! acknowledged — [`Notice::ack`], or dropping it — and only then releases the memory. A
//! subscriber may acknowledge at once, or hand the notice to another thread that first waits
//! for in-flight RDMA on the range to finish.
//!
//! ```
//! use p2pbridge_gpu::{HostBackend, MemoryBackend};
//! let host = HostBackend::new();
//! let buf = host.alloc(1 << 20)?;
//! let (tx, rx) = std::sync::mpsc::channel();
//! let _sub = host.notices().subscribe(buf.key(), 0..u64::MAX, move |n| {
//!     tx.send(n.reason).unwrap(); // deregister MRs here, then:
//!     n.ack();
//! });
//! drop(buf); // calls the subscriber, waits for its ack, then unmaps
//! assert_eq!(rx.recv().unwrap(), p2pbridge_gpu::InvalidationReason::Free);
//! # Ok::<(), p2pbridge_gpu::Error>(())
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, Weak};

use crate::alloc::AllocationKey;

/// Why a range is being invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationReason {
    /// The allocation is being freed.
    Free,
    /// A dma-buf export of the range is being revoked.
    ExportRevoked,
}

type Callback = Arc<dyn Fn(Notice) + Send + Sync>;

struct Sub {
    key: AllocationKey,
    range: Range<u64>,
    callback: Callback,
}

#[derive(Default)]
struct State {
    subs: BTreeMap<u64, Sub>,
    next: u64,
    /// Allocations whose invalidation is under way, and how many invalidations of each.
    dying: BTreeMap<AllocationKey, usize>,
}

/// Counts the notices of one invalidation that are not acknowledged yet.
struct Pending {
    left: Mutex<usize>,
    done: Condvar,
}

/// One subscriber's notice that `range` of allocation `key` is going away. The memory stays
/// valid until every notice of the invalidation is acknowledged; dropping a notice
/// acknowledges it.
pub struct Notice {
    /// The allocation.
    pub key: AllocationKey,
    /// The part of the subscriber's range that is invalidated (offsets in the allocation).
    pub range: Range<u64>,
    /// Why.
    pub reason: InvalidationReason,
    pending: Option<Arc<Pending>>,
}

impl std::fmt::Debug for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notice")
            .field("key", &self.key)
            .field("range", &self.range)
            .field("reason", &self.reason)
            .finish()
    }
}

impl Notice {
    /// Acknowledges: the subscriber no longer uses the range (its MRs are deregistered).
    pub fn ack(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(p) = self.pending.take() {
            let mut left = p.left.lock().unwrap_or_else(|e| e.into_inner());
            *left -= 1;
            if *left == 0 {
                p.done.notify_all();
            }
        }
    }
}

impl Drop for Notice {
    fn drop(&mut self) {
        self.release();
    }
}

/// The subscribers of one backend.
#[derive(Default, Clone)]
pub struct NoticeHub {
    state: Arc<Mutex<State>>,
}

/// A registration for notices; dropping it unsubscribes.
pub struct Subscription {
    state: Weak<Mutex<State>>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(s) = self.state.upgrade() {
            s.lock().unwrap_or_else(|e| e.into_inner()).subs.remove(&self.id);
        }
    }
}

impl std::fmt::Debug for NoticeHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoticeHub").field("subscribers", &self.len()).finish()
    }
}

impl NoticeHub {
    /// Calls `callback` with a [`Notice`] before `range` (offsets in the allocation) of `key`
    /// is invalidated. The callback runs on the thread that frees or revokes; it must not
    /// free memory of the same backend itself, and should acknowledge promptly.
    pub fn subscribe(
        &self,
        key: AllocationKey,
        range: Range<u64>,
        callback: impl Fn(Notice) + Send + Sync + 'static,
    ) -> Subscription {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let id = s.next;
        s.next += 1;
        s.subs.insert(id, Sub { key, range, callback: Arc::new(callback) });
        Subscription { state: Arc::downgrade(&self.state), id }
    }

    /// Number of live subscriptions.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).subs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notifies every subscriber whose range overlaps `range` of `key` and waits until all
    /// have acknowledged. Returns how many were notified.
    pub fn invalidate(&self, key: AllocationKey, range: Range<u64>, reason: InvalidationReason) -> usize {
        self.invalidate_then(key, range, reason, || ()).0
    }

    /// [`invalidate`](Self::invalidate), then `release` (the free itself), with `key` counted
    /// as dying ([`is_dying`](Self::is_dying)) until `release` has returned. A backend whose
    /// allocation stays identifiable until it is freed uses this, so that a subscriber that
    /// checks `is_dying` and then identifies the memory sees either the notice or the free.
    pub fn invalidate_then<R>(
        &self,
        key: AllocationKey,
        range: Range<u64>,
        reason: InvalidationReason,
        release: impl FnOnce() -> R,
    ) -> (usize, R) {
        let targets: Vec<(Callback, Range<u64>)> = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            *s.dying.entry(key).or_default() += 1;
            s.subs
                .values()
                .filter(|sub| sub.key == key && sub.range.start < range.end && range.start < sub.range.end)
                .map(|sub| (sub.callback.clone(), sub.range.start.max(range.start)..sub.range.end.min(range.end)))
                .collect()
        };
        let n = self.notify(key, reason, targets);
        let r = release();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = s.dying.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                s.dying.remove(&key);
            }
        }
        (n, r)
    }

    /// Whether an invalidation of `key` is under way: a subscriber that subscribed during it
    /// may have missed its notice, and must treat the allocation as going.
    pub fn is_dying(&self, key: AllocationKey) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).dying.contains_key(&key)
    }

    fn notify(&self, key: AllocationKey, reason: InvalidationReason, targets: Vec<(Callback, Range<u64>)>) -> usize {
        if targets.is_empty() {
            return 0;
        }
        let pending = Arc::new(Pending { left: Mutex::new(targets.len()), done: Condvar::new() });
        let n = targets.len();
        // No lock is held while callbacks run: they may subscribe or unsubscribe.
        for (cb, r) in targets {
            cb(Notice { key, range: r, reason, pending: Some(pending.clone()) });
        }
        let mut left = pending.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left > 0 {
            left = pending.done.wait(left).unwrap_or_else(|e| e.into_inner());
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::BackendKind;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn key(id: u64) -> AllocationKey {
        AllocationKey { backend: BackendKind::Host, device: 0, id }
    }

    #[test]
    fn an_allocation_is_dying_while_its_notices_are_out() {
        let hub = NoticeHub::default();
        let seen = Arc::new(AtomicBool::new(false));
        let (h2, s2) = (hub.clone(), seen.clone());
        let _sub = hub.subscribe(key(3), 0..10, move |n| {
            // A subscriber that comes now has missed this notice: it can tell.
            s2.store(h2.is_dying(key(3)) && !h2.is_dying(key(4)), Ordering::SeqCst);
            n.ack();
        });
        assert!(!hub.is_dying(key(3)));
        assert_eq!(hub.invalidate(key(3), 0..10, InvalidationReason::Free), 1);
        assert!(seen.load(Ordering::SeqCst), "not dying while its notice was out");
        assert!(!hub.is_dying(key(3)), "still dying after the invalidation ended");
        // With invalidate_then, until the release has run too.
        let h3 = hub.clone();
        let (n, during) = hub.invalidate_then(key(3), 0..10, InvalidationReason::Free, || h3.is_dying(key(3)));
        assert_eq!(n, 1);
        assert!(during, "not dying while the memory was being released");
        assert!(!hub.is_dying(key(3)));
    }

    #[test]
    fn only_overlapping_subscribers_of_the_same_allocation_are_called() {
        let hub = NoticeHub::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let (h1, h2, h3) = (hits.clone(), hits.clone(), hits.clone());
        let _a = hub.subscribe(key(1), 0..100, move |n| {
            assert_eq!(n.range, 50..100);
            h1.fetch_add(1, Ordering::SeqCst);
        });
        let _b = hub.subscribe(key(1), 200..300, move |_| {
            h2.fetch_add(100, Ordering::SeqCst);
        });
        let _c = hub.subscribe(key(2), 0..100, move |_| {
            h3.fetch_add(10_000, Ordering::SeqCst);
        });
        assert_eq!(hub.invalidate(key(1), 50..150, InvalidationReason::Free), 1);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn invalidate_waits_for_an_ack_given_on_another_thread() {
        let hub = NoticeHub::default();
        let returned = Arc::new(AtomicBool::new(false));
        let r2 = returned.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Notice>();
        let _s = hub.subscribe(key(1), 0..10, move |n| tx.send(n).unwrap());
        let acker = std::thread::spawn(move || {
            let n = rx.recv().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            // invalidate() must still be waiting: nothing was acknowledged yet.
            assert!(!r2.load(Ordering::SeqCst), "invalidate returned before the ack");
            n.ack();
        });
        hub.invalidate(key(1), 0..10, InvalidationReason::Free);
        returned.store(true, Ordering::SeqCst);
        acker.join().unwrap();
    }

    #[test]
    fn dropped_subscriptions_are_not_called_and_dropped_notices_count_as_acks() {
        let hub = NoticeHub::default();
        let s = hub.subscribe(key(1), 0..10, |_| panic!("unsubscribed callback ran"));
        drop(s);
        assert!(hub.is_empty());
        let _t = hub.subscribe(key(1), 0..10, drop);
        assert_eq!(hub.invalidate(key(1), 0..10, InvalidationReason::ExportRevoked), 1);
    }
}
