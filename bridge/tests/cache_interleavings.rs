//! The registration cache under every interleaving of a few concurrent actors (issue 11: "an
//! exhaustive interleaving model for merge, insert, invalidate and concurrent miss-versus-free").
//!
//! Each actor is a short list of atomic steps, each one call (or two back to back, where the
//! bridge makes them back to back) into the real [`RegCache`], at the points where the bridge's
//! threads can be overtaken (`Bridge::register` / `register_in`, `Core::invalidate`,
//! `Inner::on_notice`):
//!
//! - a **miss**: `epoch` then `lookup` (a hit is handed out and held) → the is-it-dying check
//!   (the backend's `is_dying` after subscribing) → `merged_range` and the registration itself
//!   (which records which memory it reaches) → `insert_since(Some(epoch))` (handed out and held,
//!   or refused and revoked);
//! - a **free**: the backend marks the memory dying → `remove_overlapping` (the notice's
//!   invalidation: bumps the epoch, hands over indexed and held retired entries) → revoke
//!   everything handed over (the wait for held registrations) → acknowledge: the memory goes and
//!   is at once reused by another allocation;
//! - a **hold**: a hit (`lookup`) whose handle is held → released.
//!
//! Every order of the actors' steps is run on a fresh cache, one step at a time on one thread
//! (no threads, no sleeps: deterministic). The model is sequentially consistent at step
//! granularity — each step is one critical section of the cache's lock, or code between them —
//! so memory-ordering bugs are out of its reach (the cache's epochs are SeqCst and compared
//! under its write lock).
//!
//! Memory is a few pages, each with the version of the allocation that occupies it; a
//! registration records the versions it reached when it was made. Safety invariants:
//!
//! 1. **No stale hand-out.** A handle given to a user (a hit, or a miss's insert) never reaches
//!    memory whose free has passed its invalidation (or completed): the free would not revoke it.
//! 2. **A free completes only after every reachable registration of its memory is revoked**:
//!    when it acknowledges, every handle a user holds and every entry in the cache that reaches
//!    the freed memory is revoked (held handles, merged-away neighbours included).
//! 3. **Afterwards**: no `lookup` over any range returns a registration of freed memory, no such
//!    entry is in the cache, and every registration of freed memory ever made is revoked or
//!    released.
//!
//! The mutation tests run the same enumeration with a protocol step removed (no epoch fence,
//! no dying check, a free that revokes only indexed entries or nothing) and require a violation:
//! they prove that the enumeration reaches the racy orders and that the checks see them.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::rc::Rc;

use p2pbridge::cache::{CachePolicy, Cost, Domain, Handle, RegCache};
use p2pbridge::gpu::{AllocationKey, BackendKind};

/// What a violation breaks (invariants 1, 2, 3), and how.
type Violation = (&'static str, String);
const STALE_HAND_OUT: &str = "a stale registration handed out";
const REACHABLE_AT_ACK: &str = "a free completed while a registration of its memory was reachable";
const LEFT_OVER: &str = "a registration of freed memory left unrevoked";

const PAGE: u64 = 4096;
const PAGES: usize = 4;
const ACCESS: u32 = 1;

fn domain() -> Domain {
    Domain::Alloc(AllocationKey { backend: BackendKind::Host, device: 0, id: 1 })
}

/// Page `p` up to (not including) page `q`, in addresses.
fn pages(p: u64, q: u64) -> Range<u64> {
    p * PAGE..q * PAGE
}

fn page_indices(r: &Range<u64>) -> Range<usize> {
    (r.start / PAGE) as usize..r.end.div_ceil(PAGE) as usize
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// What one registration reaches, and what became of it.
struct RegState {
    id: usize,
    by: &'static str,
    range: Range<u64>,
    /// The version of each page of `range` when it was registered.
    reached: Vec<u32>,
    revoked: Cell<bool>,
    released: Cell<bool>,
}

impl std::fmt::Display for RegState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registration #{} by {} of pages {:?}", self.id, self.by, page_indices(&self.range))
    }
}

/// The cache's value: a registration (dropping it releases it, as a memory region's drop
/// deregisters).
struct Reg(Rc<RegState>);

impl Drop for Reg {
    fn drop(&mut self) {
        self.0.released.set(true);
    }
}

#[derive(Clone, Copy, Default)]
struct Page {
    /// Which allocation occupies the page: bumped when a free completes (the address is reused
    /// at once, the worst case).
    version: u32,
    /// A free of it began (the backend's `is_dying`).
    dying: bool,
    /// Some(version) once the free of that version ran its invalidation, until it completes.
    doomed: Option<u32>,
}

/// How a free revokes what its invalidation handed over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Revoke {
    /// Everything (the bridge).
    All,
    /// Only what was in the index before the invalidation (mutation: retired, held entries
    /// are not waited for).
    IndexedOnly,
    /// Nothing (mutation: the free does not wait for held registrations).
    Nothing,
}

#[derive(Clone)]
enum Actor {
    Miss { name: &'static str, range: Range<u64>, fence: bool, check_dying: bool },
    Hold { name: &'static str, range: Range<u64> },
    Free { name: &'static str, range: Range<u64>, revoke: Revoke },
}

impl Actor {
    fn miss(name: &'static str, range: Range<u64>) -> Self {
        Actor::Miss { name, range, fence: true, check_dying: true }
    }
    fn hold(name: &'static str, range: Range<u64>) -> Self {
        Actor::Hold { name, range }
    }
    fn free(name: &'static str, range: Range<u64>) -> Self {
        Actor::Free { name, range, revoke: Revoke::All }
    }
    fn name(&self) -> &'static str {
        match self {
            Actor::Miss { name, .. } | Actor::Hold { name, .. } | Actor::Free { name, .. } => name,
        }
    }
    fn step_names(&self) -> &'static [&'static str] {
        match self {
            Actor::Miss { .. } => &["epoch+lookup", "dying?", "merged_range+register", "insert_since"],
            Actor::Hold { .. } => &["lookup+hold", "release"],
            Actor::Free { .. } => &["mark dying", "remove_overlapping", "revoke", "ack"],
        }
    }
}

#[derive(Default)]
struct State {
    /// A miss that hit, was refused or gave up: its later steps do nothing.
    done: bool,
    epoch: u64,
    pending: Option<(Range<u64>, Reg)>,
    /// A handle the user holds.
    held: Option<Handle<Reg>>,
    /// What the free's invalidation handed over, kept until revoked.
    gone: Vec<Handle<Reg>>,
    indexed: Vec<Handle<Reg>>,
}

struct World {
    cache: RegCache<Reg>,
    mem: [Page; PAGES],
    regs: Vec<Rc<RegState>>,
    trace: Vec<String>,
    outcomes: Vec<(&'static str, String)>,
}

impl World {
    fn new(setup: &[Range<u64>]) -> Self {
        let policy = CachePolicy { max_entries: 64, max_bytes: u64::MAX, ..CachePolicy::default() };
        let mut w = World {
            cache: RegCache::new(policy),
            mem: [Page::default(); PAGES],
            regs: Vec::new(),
            trace: Vec::new(),
            outcomes: Vec::new(),
        };
        for r in setup {
            let reg = w.register("setup", r.clone());
            drop(w.cache.insert(domain(), r.clone(), ACCESS, Cost::Unpinned, reg).expect("room").handle);
        }
        w
    }

    /// A registration of `range` as the memory is now.
    fn register(&mut self, by: &'static str, range: Range<u64>) -> Reg {
        let reached = page_indices(&range).map(|p| self.mem[p].version).collect();
        let st = Rc::new(RegState {
            id: self.regs.len(),
            by,
            range,
            reached,
            revoked: Cell::new(false),
            released: Cell::new(false),
        });
        self.regs.push(st.clone());
        Reg(st)
    }

    /// Reaches memory that is gone, or whose free already ran its invalidation.
    fn stale(&self, r: &RegState) -> bool {
        page_indices(&r.range).zip(&r.reached).any(|(p, &v)| v < self.mem[p].version || self.mem[p].doomed == Some(v))
    }

    /// Invariant 1.
    fn hand_out(&self, who: &str, how: &str, h: &Handle<Reg>) -> Result<(), Violation> {
        if self.stale(&h.value().0) {
            return Err((
                STALE_HAND_OUT,
                format!("{who}: {how} handed out {}, which reaches freed memory", h.value().0),
            ));
        }
        Ok(())
    }
}

/// Runs step `i` of actor `a`.
fn step(w: &mut World, actors: &[Actor], states: &mut [State], a: usize, i: usize) -> Result<(), Violation> {
    let d = domain();
    let st = &mut states[a];
    match (&actors[a], i) {
        (_, _) if st.done => {}
        (Actor::Miss { name, range, .. }, 0) => {
            st.epoch = w.cache.epoch(d);
            if let Some(h) = w.cache.lookup(d, range.clone(), ACCESS) {
                w.hand_out(name, "a hit", &h)?;
                st.held = Some(h);
                st.done = true;
                w.outcomes.push((name, "hit".into()));
            }
        }
        (Actor::Miss { name, range, check_dying, .. }, 1) => {
            if *check_dying && page_indices(range).any(|p| w.mem[p].dying) {
                st.done = true;
                w.outcomes.push((name, "saw it dying".into()));
            }
        }
        (Actor::Miss { name, range, .. }, 2) => {
            let r = w.cache.merged_range(d, range.clone(), ACCESS);
            let reg = w.register(name, r.clone());
            st.pending = Some((r, reg));
        }
        (Actor::Miss { name, range, fence, .. }, 3) => {
            let (r, reg) = st.pending.take().expect("registered");
            let since = fence.then_some(st.epoch);
            match w.cache.insert_since(since, d, r.clone(), ACCESS, Cost::Unpinned, reg).expect("room") {
                Ok(ins) => {
                    drop(ins.removed);
                    w.hand_out(name, "an insert", &ins.handle)?;
                    let merged = r.start < range.start || r.end > range.end;
                    w.outcomes.push((name, if merged { "inserted merged" } else { "inserted" }.into()));
                    st.held = Some(ins.handle);
                }
                Err(reg) => {
                    reg.0.revoked.set(true);
                    w.outcomes.push((name, "refused".into()));
                }
            }
        }
        (Actor::Hold { name, range }, 0) => match w.cache.lookup(d, range.clone(), ACCESS) {
            Some(h) => {
                w.hand_out(name, "a hit", &h)?;
                let what = if page_indices(&h.range()).len() > page_indices(range).len() {
                    "held a wider entry"
                } else {
                    "held"
                };
                w.outcomes.push((name, what.into()));
                st.held = Some(h);
            }
            None => w.outcomes.push((name, "missed".into())),
        },
        (Actor::Hold { .. }, 1) => st.held = None,
        (Actor::Free { range, .. }, 0) => {
            for p in page_indices(range) {
                w.mem[p].dying = true;
            }
        }
        (Actor::Free { name, range, .. }, 1) => {
            st.indexed = w.cache.entries().into_iter().filter(|e| overlaps(&e.range(), range)).collect();
            st.gone = w.cache.remove_overlapping(d, range.clone());
            for p in page_indices(range) {
                w.mem[p].doomed = Some(w.mem[p].version);
            }
            let retired = st.gone.iter().filter(|g| !st.indexed.iter().any(|e| Handle::ptr_eq(e, g))).count();
            w.outcomes.push((name, format!("handed over {}", st.gone.len())));
            if retired > 0 {
                w.outcomes.push((name, "handed over a retired held entry".into()));
            }
        }
        (Actor::Free { revoke, .. }, 2) => {
            for g in &st.gone {
                let revoke = match revoke {
                    Revoke::All => true,
                    Revoke::IndexedOnly => st.indexed.iter().any(|e| Handle::ptr_eq(e, g)),
                    Revoke::Nothing => false,
                };
                if revoke {
                    g.value().0.revoked.set(true);
                }
            }
            st.gone.clear();
            st.indexed.clear();
        }
        (Actor::Free { name, range, .. }, 3) => {
            // Invariant 2: nothing a user can reach still reaches the memory about to go.
            let held = states.iter().filter_map(|s| s.held.as_ref()).map(|h| ("a held handle", h));
            let cached = w.cache.entries();
            for (what, h) in held.chain(cached.iter().map(|h| ("a cache entry", h))) {
                let r = &h.value().0;
                let reaches = page_indices(&r.range)
                    .zip(&r.reached)
                    .any(|(p, &v)| page_indices(range).contains(&p) && v == w.mem[p].version);
                if reaches && !r.revoked.get() {
                    let why = format!("{name}: the free completed while {what}, {r}, still reaches its memory");
                    return Err((REACHABLE_AT_ACK, why));
                }
            }
            for p in page_indices(range) {
                w.mem[p] = Page { version: w.mem[p].version + 1, dying: false, doomed: None };
            }
        }
        (actor, i) => unreachable!("{} has no step {i}", actor.name()),
    }
    Ok(())
}

/// Invariant 3, once every actor is done (handles still held).
fn check_after(w: &World) -> Result<(), Violation> {
    for p in 0..PAGES as u64 {
        for q in p + 1..=PAGES as u64 {
            if let Some(h) = w.cache.lookup(domain(), pages(p, q), ACCESS) {
                w.hand_out("afterwards", "a lookup", &h)?;
            }
        }
    }
    for e in w.cache.entries() {
        if w.stale(&e.value().0) {
            return Err((STALE_HAND_OUT, format!("afterwards: {} is in the cache over freed memory", e.value().0)));
        }
    }
    for r in &w.regs {
        if w.stale(r) && !r.revoked.get() && !r.released.get() {
            let why = format!("afterwards: {r} reaches freed memory and was neither revoked nor released");
            return Err((LEFT_OVER, why));
        }
    }
    Ok(())
}

/// Runs one order (actor indices, one per step); Err(why) on the first violation.
fn run(setup: &[Range<u64>], actors: &[Actor], order: &[usize]) -> (World, Result<(), Violation>) {
    let mut w = World::new(setup);
    let mut states: Vec<State> = actors.iter().map(|_| State::default()).collect();
    let mut next = vec![0; actors.len()];
    for &a in order {
        let i = next[a];
        next[a] += 1;
        w.trace.push(format!("{} {}", actors[a].name(), actors[a].step_names()[i]));
        if let Err(why) = step(&mut w, actors, &mut states, a, i) {
            return (w, Err(why));
        }
    }
    let r = check_after(&w);
    drop(states);
    (w, r)
}

/// Calls `f` with every interleaving of `counts[a]` steps of each actor `a`.
fn interleavings(counts: &mut [usize], order: &mut Vec<usize>, f: &mut impl FnMut(&[usize])) {
    if counts.iter().all(|&c| c == 0) {
        f(order);
        return;
    }
    for a in 0..counts.len() {
        if counts[a] > 0 {
            counts[a] -= 1;
            order.push(a);
            interleavings(counts, order, f);
            order.pop();
            counts[a] += 1;
        }
    }
}

#[derive(Default)]
struct Report {
    orders: usize,
    /// Kind -> (orders that broke it first, the first such order).
    violations: BTreeMap<&'static str, (usize, String)>,
    /// (actor, outcome) -> how many orders had it.
    outcomes: BTreeMap<(&'static str, String), usize>,
}

impl Report {
    fn saw(&self, actor: &str, outcome: &str) -> bool {
        self.outcomes.keys().any(|(a, o)| *a == actor && o == outcome)
    }

    /// Each (actor, outcome) happened in some order: the enumeration reaches it.
    fn assert_saw(&self, wanted: &[(&str, &str)]) {
        for (a, o) in wanted {
            assert!(
                self.saw(a, o),
                "no order had {a} {o:?}: the model is vacuous there; outcomes: {:?}",
                self.outcomes
            );
        }
    }

    fn assert_safe(&self) {
        if let Some((kind, (n, example))) = self.violations.iter().next() {
            panic!("{kind}, in {n} of {} orders; the first: {example}", self.orders);
        }
    }

    /// A mutation is caught as `kind`.
    fn assert_caught(&self, kind: &str) {
        let Some((n, example)) = self.violations.get(kind) else {
            panic!("no order shows {kind:?} over all {} orders; violations: {:?}", self.orders, self.violations)
        };
        eprintln!("{kind}, in {n} of {} orders; the first: {example}", self.orders);
    }
}

fn explore(setup: &[Range<u64>], actors: &[Actor]) -> Report {
    let mut counts: Vec<usize> = actors.iter().map(|a| a.step_names().len()).collect();
    let mut report = Report::default();
    interleavings(&mut counts, &mut Vec::new(), &mut |order| {
        report.orders += 1;
        let (w, r) = run(setup, actors, order);
        if let Err((kind, why)) = r {
            let v = report
                .violations
                .entry(kind)
                .or_insert_with(|| (0, format!("{why}\n  order: {}", w.trace.join(" → "))));
            v.0 += 1;
        }
        for o in w.outcomes {
            *report.outcomes.entry(o).or_default() += 1;
        }
    });
    let expected = multinomial(&actors.iter().map(|a| a.step_names().len()).collect::<Vec<_>>());
    assert_eq!(report.orders, expected, "not every interleaving was run");
    report
}

/// (Σk)! / Π(k!): the number of interleavings.
fn multinomial(ks: &[usize]) -> usize {
    let fact = |n: usize| (1..=n).product::<usize>();
    fact(ks.iter().sum()) / ks.iter().map(|&k| fact(k)).product::<usize>()
}

// ---------------------------------------------------------------------------------------------
// The protocol as the bridge runs it: every order is safe.

#[test]
fn a_miss_racing_a_free_of_its_range_never_hands_out_freed_memory() {
    let r = explore(&[], &[Actor::miss("A", pages(0, 1)), Actor::free("F", pages(0, 1))]);
    assert_eq!(r.orders, 70);
    r.assert_safe();
    r.assert_saw(&[("A", "inserted"), ("A", "refused"), ("A", "saw it dying"), ("F", "handed over 1")]);
}

#[test]
fn two_misses_that_merge_racing_a_free_of_one_of_them_never_hand_out_freed_memory() {
    // A registers page 0, C the adjacent page 1 (merged with A's entry into pages 0..2 when A's
    // is in first); F frees page 0.
    let r =
        explore(&[], &[Actor::miss("A", pages(0, 1)), Actor::miss("C", pages(1, 2)), Actor::free("F", pages(0, 1))]);
    assert_eq!(r.orders, 34_650);
    r.assert_safe();
    r.assert_saw(&[
        ("A", "inserted"),
        ("A", "refused"),
        ("A", "saw it dying"),
        ("C", "inserted merged"),
        ("C", "refused"),
        ("F", "handed over 2"),
        ("F", "handed over a retired held entry"),
    ]);
}

#[test]
fn a_handle_held_across_a_merge_and_a_free_is_revoked_before_the_free_completes() {
    // H holds a hit on page 0; C's miss on page 1 merges it away (retired, still held); F frees
    // page 0 and must find and revoke both.
    let setup = [pages(0, 1)];
    let r =
        explore(&setup, &[Actor::hold("H", pages(0, 1)), Actor::miss("C", pages(1, 2)), Actor::free("F", pages(0, 1))]);
    assert_eq!(r.orders, 3_150);
    r.assert_safe();
    r.assert_saw(&[
        ("H", "held"),
        ("H", "held a wider entry"),
        ("H", "missed"),
        ("C", "inserted merged"),
        ("C", "refused"),
        ("F", "handed over a retired held entry"),
    ]);
}

#[test]
fn two_frees_racing_over_one_held_entry_each_revoke_it_before_completing() {
    // One entry over pages 0..2, held by H; F1 frees page 0, F2 page 1. Whichever invalidates
    // second finds the entry retired (still held) and revokes it too before it acknowledges.
    let setup = [pages(0, 2)];
    let r = explore(
        &setup,
        &[Actor::hold("H", pages(0, 1)), Actor::free("F1", pages(0, 1)), Actor::free("F2", pages(1, 2))],
    );
    assert_eq!(r.orders, 3_150);
    r.assert_safe();
    r.assert_saw(&[
        ("H", "held a wider entry"),
        ("H", "missed"),
        ("F1", "handed over a retired held entry"),
        ("F2", "handed over a retired held entry"),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Mutations: the same enumeration with one protocol step removed must find a violation.

#[test]
fn without_the_epoch_fence_a_miss_racing_a_free_hands_out_freed_memory() {
    // insert_since(None): the registration made before the free's invalidation is inserted
    // after it (the invalidation found nothing to revoke).
    let miss = Actor::Miss { name: "A", range: pages(0, 1), fence: false, check_dying: true };
    explore(&[], &[miss, Actor::free("F", pages(0, 1))]).assert_caught(STALE_HAND_OUT);
    let merging = Actor::Miss { name: "C", range: pages(1, 2), fence: false, check_dying: true };
    explore(&[pages(0, 1)], &[merging, Actor::free("F", pages(0, 1))]).assert_caught(STALE_HAND_OUT);
}

#[test]
fn without_the_dying_check_a_miss_begun_after_the_invalidation_is_not_fenced() {
    // The epoch fences only misses that began before the invalidation; one that begins between
    // the invalidation and the memory going must see that the memory is dying.
    let miss = Actor::Miss { name: "A", range: pages(0, 1), fence: true, check_dying: false };
    explore(&[], &[miss, Actor::free("F", pages(0, 1))]).assert_caught(STALE_HAND_OUT);
}

#[test]
fn a_free_that_revokes_only_indexed_entries_misses_the_held_merged_away_neighbour() {
    let setup = [pages(0, 1)];
    let free = Actor::Free { name: "F", range: pages(0, 1), revoke: Revoke::IndexedOnly };
    let r = explore(&setup, &[Actor::hold("H", pages(0, 1)), Actor::miss("C", pages(1, 2)), free]);
    // Held when the free completes; or released by then, and left registered in the cache's
    // retired list.
    r.assert_caught(REACHABLE_AT_ACK);
    r.assert_caught(LEFT_OVER);
}

#[test]
fn a_free_that_does_not_revoke_what_it_was_handed_completes_under_a_held_handle() {
    let setup = [pages(0, 1)];
    let free = Actor::Free { name: "F", range: pages(0, 1), revoke: Revoke::Nothing };
    explore(&setup, &[Actor::hold("H", pages(0, 1)), free]).assert_caught(REACHABLE_AT_ACK);
}
