//! Registrations that can never be deregistered, kept where nothing empties them.
//!
//! A region the NIC may still use — a receive left posted on a shared receive queue, a request
//! a device never flushed, a window that could not be deallocated, a failed `ibv_dereg_mr` —
//! must never be deregistered (its lkey could go to a later registration of the same
//! addresses) and its memory must not be reachable by what comes next. Its parts go here, into
//! a process-wide list that eviction, invalidation and a bridge's drop never touch: the
//! cache may forget the registration, this list does not.
//!
//! What that keeps safe depends on the strategy:
//! - **pinned host memory and bounce**: the region holds the pages it had (pinned), and a late
//!   message lands only there, in pages the process no longer has: the memory's free may go
//!   ahead.
//! - **ODP, dma-buf and peer memory**: the region follows the allocation (ODP maps whatever
//!   the address space has there next), so backend memory's free is held back for ever (the
//!   grave subscribes to the allocation's notices and never acknowledges them). Plain host
//!   memory cannot be held back (`munmap` does not ask): ODP for it is an explicit opt-in
//!   ([`SkipReason::OptIn`](crate::SkipReason::OptIn)), and receives on a shared receive queue
//!   — the one route to a leak that a working device takes — are refused for ODP
//!   registrations.

use std::ops::Range;
use std::sync::Mutex;

use p2pbridge_gpu::Subscription;

use crate::strategy::Strategy;

/// One leaked registration.
pub(crate) struct Grave {
    /// What it was.
    pub(crate) strategy: Strategy,
    /// The addresses its region covers.
    pub(crate) range: Range<u64>,
    /// Why it is here.
    pub(crate) why: &'static str,
    /// The region, its export and any regions under windows that could not be deallocated:
    /// never dropped (a static is never dropped).
    #[allow(dead_code)] // kept, never read: what matters is that it is never dropped
    pub(crate) parts: Box<dyn Send>,
    /// The backend allocation it covers, if any.
    pub(crate) alloc: Option<p2pbridge_gpu::AllocationKey>,
    /// For strategies whose region follows the allocation: a subscription to its notices that
    /// never acknowledges, so that its free is held back for ever.
    #[allow(dead_code)] // kept, never read: dropping it would unsubscribe
    pub(crate) hold: Option<Subscription>,
}

static GRAVES: Mutex<Vec<Grave>> = Mutex::new(Vec::new());

/// Whether a leaked region of `strategy` follows its memory (so that a free must be held
/// back), rather than holding the pages it had.
pub(crate) fn follows_memory(strategy: Strategy) -> bool {
    matches!(strategy, Strategy::Odp | Strategy::DmaBuf | Strategy::PeerMem)
}

/// Keeps `grave` for the life of the process.
pub(crate) fn bury(grave: Grave) {
    // Kept first: nothing after this may let it go.
    let (strategy, range, why) = (grave.strategy, grave.range.clone(), grave.why);
    GRAVES.lock().unwrap_or_else(|e| e.into_inner()).push(grave);
    tracing::error!(
        %strategy,
        start = range.start,
        end = range.end,
        why,
        free_held_back = follows_memory(strategy),
        "a registration is leaked, never deregistered: the NIC may still use its region"
    );
}

/// Whether a leaked region that follows its memory covers allocation `key`: its free must be
/// held back (a free whose notices went out before the leak's own hold was made finds it
/// here).
pub(crate) fn holds_back(key: p2pbridge_gpu::AllocationKey) -> bool {
    GRAVES.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|g| g.alloc == Some(key) && follows_memory(g.strategy))
}

/// How many registrations of this process are leaked (kept registered for ever because the NIC
/// may still use them), of all bridges.
pub fn leaked_registrations() -> usize {
    GRAVES.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Why each leaked registration is leaked, with its strategy and addresses.
pub fn leaked_registration_causes() -> Vec<(Strategy, Range<u64>, &'static str)> {
    GRAVES.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|g| (g.strategy, g.range.clone(), g.why)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regions_that_follow_their_memory_hold_frees_back() {
        assert!(follows_memory(Strategy::Odp));
        assert!(follows_memory(Strategy::DmaBuf));
        assert!(follows_memory(Strategy::PeerMem));
        assert!(!follows_memory(Strategy::PinnedHost));
        assert!(!follows_memory(Strategy::Bounce));
    }

    #[test]
    fn graves_are_counted_and_say_why() {
        let before = leaked_registrations();
        bury(Grave {
            strategy: Strategy::PinnedHost,
            range: 0x1000..0x2000,
            why: "a test grave",
            alloc: None,
            parts: Box::new(()),
            hold: None,
        });
        assert_eq!(leaked_registrations(), before + 1);
        assert!(leaked_registration_causes()
            .iter()
            .any(|(s, r, w)| *s == Strategy::PinnedHost && *r == (0x1000..0x2000) && *w == "a test grave"));
    }
}
