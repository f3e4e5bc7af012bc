//! The bridge: registers memory through the best strategy, caches registrations, and revokes
//! them — keys first, at the NIC — when the memory goes away.
//!
//! This file holds the bridge's state and its set-up. Registration is in [`crate::register`],
//! invalidation in [`crate::invalidate`], keys in [`crate::keys`], transfers in
//! [`crate::transfer`], one registration's life in [`crate::registration`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2pbridge_gpu::{AllocationKey, MemoryBackend, Notice, Subscription};
use p2pbridge_verbs::ProtectionDomain;

use crate::cache::{CachePolicy, Domain, Handle, RegCache};
use crate::error::Result;
use crate::keys::KeyLedger;
use crate::options::BridgeOptions;
use crate::registration::Registration;
use crate::strategy::{HostCaps, Policy, Reason, Support};

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
        self.revoke_over(domain, range, |e| e.value().revoke())
    }

    /// [`invalidate`](Self::invalidate) for memory that is gone already (the monitor saw it
    /// unmapped): every key over it is revoked at the NIC before this returns, but a
    /// registration an operation holds is deregistered later, once let go, by the teardown
    /// thread ([`crate::teardown`]), so that this never waits for a holder.
    pub(crate) fn invalidate_gone(&self, domain: Domain, range: Range<u64>) -> (usize, Result<()>) {
        self.revoke_over(domain, range, crate::teardown::revoke_without_waiting)
    }

    /// Takes every registration of `domain` over `range` out of the cache and revokes each
    /// with `revoke` (a panic in one turned into an error: the entries after it, taken out
    /// already, are revoked all the same). For a backend allocation, a leaked region that
    /// follows its memory — forgotten by the cache since — still holds its memory: `Leaked`.
    /// Returns how many there were, and the first failure.
    fn revoke_over(
        &self,
        domain: Domain,
        range: Range<u64>,
        revoke: impl Fn(Handle<Registration>) -> Result<()>,
    ) -> (usize, Result<()>) {
        let gone = self.cache.remove_overlapping(domain, range);
        let n = gone.len();
        let mut r = Ok(());
        for e in gone {
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| revoke(e)))
                .unwrap_or(Err(crate::Error::InvalidArgument("a revocation panicked".into())));
            if let Err(err) = done {
                if r.is_ok() {
                    r = Err(err);
                }
            }
        }
        if let (Ok(()), Domain::Alloc(key)) = (&r, domain) {
            if crate::graveyard::holds_back(key) {
                r = Err(crate::Error::Leaked { why: "a region that follows this memory is leaked" });
            }
        }
        (n, r)
    }
}

pub(crate) struct Inner {
    pub(crate) core: Arc<Core>,
    pub(crate) caps: HostCaps,
    pub(crate) policy: Policy,
    pub(crate) backends: Vec<Arc<dyn MemoryBackend>>,
    pub(crate) subs: Mutex<HashMap<AllocationKey, Subscription>>,
    /// Backend allocations seen, by base address: a new allocation found where an old one was
    /// (freed without a notice this bridge saw) revokes the old one's registrations.
    pub(crate) allocs: Mutex<BTreeMap<u64, (AllocationKey, u64)>>,
    /// Keys are memory windows (the device has type 2 windows and the options allow them).
    pub(crate) windows: bool,
    /// The userfaultfd monitor's subscription, or why there is none.
    pub(crate) watch: std::result::Result<crate::uffd::Watch, Reason>,
    /// Where the pinned-bytes limit comes from, for errors and the probe.
    pub(crate) pinned_budget: crate::budget::Budget,
    /// The exported-bytes limit per device and where it comes from (a GPU's BAR1).
    pub(crate) exported_budget: (u64, String),
    /// The bounce engines transfers of bounce registrations run through, and their shape.
    pub(crate) engines: crate::transfer::Engines,
    pub(crate) bounce: crate::bounce::BounceConfig,
}

impl Inner {
    /// A backend's notice: the allocation (or part of it) goes. Revokes, then acknowledges;
    /// a registration that could not be revoked keeps the free waiting for ever rather than
    /// letting the memory go while the NIC may reach it.
    pub(crate) fn on_notice(core: &Core, inner: Option<Arc<Inner>>, notice: Notice) {
        // The notice's range is in offsets of the allocation, the cache's in addresses: the
        // whole allocation's registrations go (a part going is as rare as it is final).
        // (A registration of it leaked meanwhile by another revoker, and forgotten by the cache
        // since, still holds the free back: `Core::invalidate` says `Leaked`.)
        let (_, r) = core.invalidate(Domain::Alloc(notice.key), 0..u64::MAX);
        if let Some(inner) = inner.as_ref().filter(|_| notice.reason == p2pbridge_gpu::InvalidationReason::Free) {
            inner.subs.lock().unwrap_or_else(|e| e.into_inner()).remove(&notice.key);
            let mut allocs = inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
            allocs.retain(|_, (k, _)| *k != notice.key);
        }
        // `inner` (maybe the last handle on the bridge) lives until the notice is answered: the
        // bridge's drop, which revokes everything, never runs before that on this thread.
        match r {
            Ok(()) => notice.ack(),
            Err(e) => {
                tracing::error!("cannot revoke a registration of {:?} ({e}): its free is held back for ever, since the NIC may still reach the memory", notice.key);
                std::mem::forget(notice);
            }
        }
        drop(inner);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The subscriptions go with the bridge: nothing would tell a registration that its
        // memory went. Revoke them all now; remaining handles turn dead.
        self.core.keys.clear();
        for e in self.core.cache.drain() {
            if let Err(err) = e.value().revoke() {
                tracing::error!(
                    "revoking a registration as the bridge goes failed ({err}); its memory region is leaked, not freed"
                );
            }
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
                if let (_, Err(e)) = core.invalidate_gone(Domain::HostVa, range.clone()) {
                    tracing::error!("revoking registrations of unmapped host memory {range:x?} failed: {e}");
                }
            }))
            .map_err(|e| Reason::UserfaultfdUnavailable { error: e.to_string() })
        } else {
            Err(Reason::DisabledByOption { option: "BridgeOptions::monitor_host" })
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
    pub fn host_monitor(&self) -> Support {
        match &self.inner.watch {
            Ok(_) => Support::Yes,
            Err(reason) => Support::no(reason.clone()),
        }
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
    pub fn key_windows(&self) -> Support {
        if self.inner.windows {
            Support::Yes
        } else if !self.inner.caps.nic.mem_windows.is_yes() {
            // The device's own answer, with its reason.
            self.inner.caps.nic.mem_windows.clone()
        } else {
            Support::no(Reason::DisabledByOption { option: "BridgeOptions::windows" })
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
}
