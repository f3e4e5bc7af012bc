//! Completion queues and work completions.

use std::ptr::NonNull;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::device::Context;
use crate::error::{Errno, Error, Result, WcStatus};
use crate::{result, sys};

/// What a completed work request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// SEND.
    Send,
    /// RDMA WRITE (with or without immediate).
    RdmaWrite,
    /// RDMA READ.
    RdmaRead,
    /// An atomic.
    Atomic,
    /// A receive.
    Recv,
    /// A receive completed by an RDMA WRITE with immediate.
    RecvRdmaWithImm,
    /// Something else.
    Other(u32),
}

impl WcOpcode {
    fn from_raw(v: sys::ibv_wc_opcode::Type) -> Self {
        use sys::ibv_wc_opcode as op;
        match v {
            op::IBV_WC_SEND => WcOpcode::Send,
            op::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            op::IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            op::IBV_WC_COMP_SWAP | op::IBV_WC_FETCH_ADD => WcOpcode::Atomic,
            op::IBV_WC_RECV => WcOpcode::Recv,
            op::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            o => WcOpcode::Other(o),
        }
    }
}

/// One work completion (`struct ibv_wc`). Only `wr_id`, `status`, `qp_num` and `vendor_err`
/// are defined when the status is not success.
#[derive(Debug, Clone, Copy)]
pub struct WorkCompletion {
    /// The id the work request was posted with.
    pub wr_id: u64,
    /// Its status.
    pub status: WcStatus,
    /// What it was (valid on success).
    pub opcode: WcOpcode,
    /// Bytes received (receives) or moved.
    pub byte_len: u32,
    /// Immediate data, host order, when the message carried one.
    pub imm: Option<u32>,
    /// The local QP number.
    pub qp_num: u32,
    /// The provider's error code.
    pub vendor_err: u32,
}

impl Default for WorkCompletion {
    /// A placeholder (successful, id 0) for buffers passed to [`CompletionQueue::poll`].
    fn default() -> Self {
        WorkCompletion {
            wr_id: 0,
            status: WcStatus::Success,
            opcode: WcOpcode::Other(0),
            byte_len: 0,
            imm: None,
            qp_num: 0,
            vendor_err: 0,
        }
    }
}

impl WorkCompletion {
    fn from_raw(wc: &sys::ibv_wc) -> Self {
        const IBV_WC_WITH_IMM: u32 = sys::ibv_wc_flags::IBV_WC_WITH_IMM.0;
        let status = WcStatus::from_raw(wc.status);
        let imm = if status == WcStatus::Success && wc.wc_flags & IBV_WC_WITH_IMM != 0 {
            // SAFETY: with IBV_WC_WITH_IMM set the union holds the immediate (network order).
            Some(u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }))
        } else {
            None
        };
        WorkCompletion {
            wr_id: wc.wr_id,
            status,
            opcode: WcOpcode::from_raw(wc.opcode),
            byte_len: wc.byte_len,
            imm,
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        }
    }

    /// `Ok(self)` on success, else the typed [`Error::WorkCompletion`].
    pub fn ok(self) -> Result<Self> {
        if self.status == WcStatus::Success {
            Ok(self)
        } else {
            Err(Error::WorkCompletion {
                status: self.status,
                wr_id: self.wr_id,
                qp_num: self.qp_num,
                vendor_err: self.vendor_err,
            })
        }
    }
}

/// Completions set aside for their waiters, and who waits for what.
#[derive(Default)]
struct Stash {
    reaped: Vec<WorkCompletion>,
    /// Work-request ids waiters are waiting for (single ids are ranges of one).
    awaited: Vec<std::ops::Range<u64>>,
    /// A waiter is asleep on the completion channel: the others wait on the condition
    /// variable, and it wakes them when it wakes.
    sleeper: bool,
    /// Waiters on the condition variable now: it is notified only when there are some (a
    /// notification is a system call, and setting others' completions aside happens on every
    /// turn of a polling loop).
    nappers: u32,
    /// Ids nobody will take ([`CompletionQueue::discard_ids`]), with how many of their
    /// completions are still to come: those are dropped as they are polled.
    discarded: Vec<(std::ops::Range<u64>, usize)>,
}

impl Stash {
    fn is_awaited(&self, id: u64) -> bool {
        self.awaited.iter().any(|r| r.contains(&id))
    }

    fn unawait(&mut self, ids: &std::ops::Range<u64>) {
        if let Some(i) = self.awaited.iter().position(|r| r == ids) {
            self.awaited.swap_remove(i);
        }
    }

    /// Whether `id`'s completion is one to drop (and counts it).
    fn discard(&mut self, id: u64) -> bool {
        let Some(i) = self.discarded.iter().position(|(r, _)| r.contains(&id)) else { return false };
        self.discarded[i].1 -= 1;
        if self.discarded[i].1 == 0 {
            self.discarded.swap_remove(i);
        }
        true
    }
}

/// Where taken completions go: a `Vec` (as many as there are) or a slice (as many as it holds,
/// with no allocation).
trait Sink {
    /// How many more it takes.
    fn room(&self) -> usize;
    /// Takes one (only while `room() > 0`).
    fn put(&mut self, wc: WorkCompletion);
}

impl Sink for Vec<WorkCompletion> {
    fn room(&self) -> usize {
        usize::MAX
    }
    fn put(&mut self, wc: WorkCompletion) {
        self.push(wc);
    }
}

/// A slice filled from the front.
struct Fill<'o> {
    buf: &'o mut [WorkCompletion],
    n: usize,
}

impl Sink for Fill<'_> {
    fn room(&self) -> usize {
        self.buf.len() - self.n
    }
    fn put(&mut self, wc: WorkCompletion) {
        if let Some(slot) = self.buf.get_mut(self.n) {
            *slot = wc;
            self.n += 1;
        }
    }
}

/// `now + timeout`, or no deadline where that does not fit.
fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// How long a waiter busy-polls before it sleeps on the completion channel: completions that
/// come this soon (small messages at depth) cost no wake-up.
const SPIN: Duration = Duration::from_micros(50);

/// The longest single sleep: waiters look at their deadline (and callers at their
/// connection's faults) at least this often.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// A completion channel (`struct ibv_comp_channel`), its fd non-blocking: only one waiter
/// sleeps on it at a time, and it never blocks in `ibv_get_cq_event`.
struct CompChannel(NonNull<sys::ibv_comp_channel>);

impl CompChannel {
    fn new(ctx: &Context) -> Result<Self> {
        // SAFETY: the context is open; the channel is destroyed on drop, after its CQ.
        let ch = unsafe { result::cq::create_comp_channel(ctx.as_raw()) }?;
        let ch = CompChannel(ch);
        let fd = ch.fd();
        const WHAT: &str = "fcntl(O_NONBLOCK) on a completion channel";
        // SAFETY: fcntl on the channel's own open fd; only reads its flags.
        let fl = unsafe { result::os::fcntl_getfl(fd, WHAT) }?;
        // SAFETY: as above; only O_NONBLOCK is added (the one sleeper reading it copes with EAGAIN).
        unsafe { result::os::fcntl_setfl(fd, fl | libc::O_NONBLOCK, WHAT) }?;
        Ok(ch)
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: the channel is live; its fd is set at creation and never changes.
        unsafe { (*self.0.as_ptr()).fd }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: destroyed once, after the CQ that used it (field order in CompletionQueue's
        // drop: the CQ is destroyed in `Drop::drop`, the channel afterwards).
        if let Err(e) = unsafe { result::cq::destroy_comp_channel(self.0) } {
            tracing::error!("ibv_destroy_comp_channel failed ({}); it is leaked", result::errno_of(&e));
        }
    }
}

/// A completion queue (`struct ibv_cq`), with a completion channel: waiters busy-poll briefly,
/// then sleep until the NIC signals a completion, so that a wait costs no core.
///
/// One CQ may serve many queue pairs ([`ConnectionOptions::send_cq`](crate::ConnectionOptions::send_cq)):
/// completions are matched to their waiters by work-request id.
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    depth: u32,
    /// Completions reaped for other work requests than the reaper's, kept for their own
    /// waiters, and the ids waiters are waiting for.
    stash: Mutex<Stash>,
    /// Wakes waiters when completions are set aside or the sleeper wakes.
    woken: Condvar,
    channel: CompChannel,
    _ctx: Context,
}

// SAFETY: ibv_poll_cq, ibv_req_notify_cq and ibv_destroy_cq may be called from any thread;
// providers lock the CQ. The channel is read only by the one sleeper (see `Stash::sleeper`).
unsafe impl Send for CompletionQueue {}
// SAFETY: as above: concurrent ibv_poll_cq calls on one CQ are serialized by the provider.
unsafe impl Sync for CompletionQueue {}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue").field("depth", &self.depth).finish()
    }
}

impl CompletionQueue {
    /// Creates a CQ of at least `depth` entries on `ctx`, with its completion channel.
    pub fn new(ctx: &Context, depth: u32) -> Result<Self> {
        if depth == 0 {
            return Err(Error::InvalidArgument("a CQ needs at least one entry".into()));
        }
        let cqe = i32::try_from(depth).map_err(|_| Error::InvalidArgument(format!("CQ depth {depth} too large")))?;
        let channel = CompChannel::new(ctx)?;
        // SAFETY: the context is open (held by `_ctx`); the channel is live and outlives the CQ.
        let cq = unsafe { result::cq::create_cq(ctx.as_raw(), cqe, std::ptr::null_mut(), channel.0.as_ptr(), 0) }?;
        Ok(CompletionQueue {
            cq,
            depth,
            stash: Mutex::new(Stash::default()),
            woken: Condvar::new(),
            channel,
            _ctx: ctx.clone(),
        })
    }

    /// The raw CQ, for the `sys` layer.
    pub fn as_raw(&self) -> *mut sys::ibv_cq {
        self.cq.as_ptr()
    }

    /// Its depth as asked for.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Whether it was made on `ctx`'s device context.
    pub fn on(&self, ctx: &Context) -> bool {
        self._ctx.as_raw() == ctx.as_raw()
    }

    /// Polls up to `out.len()` completions without waiting; returns how many were written.
    /// Completions with error statuses are returned as they are (see [`WorkCompletion::ok`]).
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        const BATCH: usize = 32;
        // Only the entries asked for are zeroed (this runs on every turn of a polling loop):
        // zeroed, not left uninitialized, because a provider need not write every field of a
        // failed completion (only wr_id, status, qp_num and vendor_err are valid there).
        let mut raw = [const { std::mem::MaybeUninit::<sys::ibv_wc>::uninit() }; BATCH];
        let want = out.len().min(BATCH);
        for r in &mut raw[..want] {
            *r = std::mem::MaybeUninit::zeroed();
        }
        // SAFETY: `raw` has room for `want` entries and the CQ is live.
        let n = unsafe { result::cq::poll_cq(self.cq.as_ptr(), &mut raw[..want]) }?;
        for (o, r) in out.iter_mut().zip(&raw[..n]) {
            // SAFETY: the first `want` entries (so the first `n`, `n <= want`) were zeroed
            // above, and ibv_wc is plain old data, valid when zeroed; the provider wrote over
            // what it returned.
            *o = WorkCompletion::from_raw(unsafe { r.assume_init_ref() });
        }
        Ok(n)
    }

    fn lock(&self) -> MutexGuard<'_, Stash> {
        self.stash.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Polls the CQ dry, or until `out` is full; completions `pick` accepts go to `out`, the
    /// others are set aside (waking their waiters). Returns how many went to `out`.
    fn drain(
        &self,
        st: &mut Stash,
        pick: &dyn Fn(&WorkCompletion, &Stash) -> bool,
        out: &mut dyn Sink,
    ) -> Result<usize> {
        let mut taken = 0;
        let mut i = 0;
        while i < st.reaped.len() && out.room() > 0 {
            if pick(&st.reaped[i], st) {
                out.put(st.reaped.remove(i));
                taken += 1;
            } else {
                i += 1;
            }
        }
        let mut batch = [WorkCompletion::default(); 16];
        let mut others = false;
        // One entry first: most turns of a polling loop find the CQ empty, and a poll's cost
        // grows with the entries it prepares.
        let mut size = 1;
        loop {
            let n = match self.poll(&mut batch[..size]) {
                Ok(n) => n,
                // What was taken already is the caller's (a slice keeps no count of its own):
                // the failure shows again on the next poll.
                Err(_) if taken > 0 => break,
                Err(e) => return Err(e),
            };
            for w in &batch[..n] {
                if st.discard(w.wr_id) {
                    // Given up by its owner (ids are never reused): nobody takes it, not even
                    // a `wait_one` caller, and it is not kept.
                } else if out.room() > 0 && pick(w, st) {
                    out.put(*w);
                    taken += 1;
                } else {
                    others |= st.is_awaited(w.wr_id);
                    st.reaped.push(*w);
                }
            }
            if n < size || out.room() == 0 {
                break;
            }
            size = batch.len();
        }
        if others && st.nappers > 0 {
            self.woken.notify_all();
        }
        Ok(taken)
    }

    /// Waits until at least one completion that `pick` accepts is taken into `out` (until it
    /// is full), up to `timeout`: busy-polls for [`SPIN`], then sleeps on the completion
    /// channel (one waiter at a time; the others on the condition variable).
    fn wait_take(
        &self,
        timeout: Duration,
        pick: &dyn Fn(&WorkCompletion, &Stash) -> bool,
        out: &mut dyn Sink,
    ) -> Result<usize> {
        self.wait_take_spinning(timeout, SPIN, pick, out)
    }

    /// [`wait_take`](Self::wait_take), busy-polling for `spin` before it sleeps.
    fn wait_take_spinning(
        &self,
        timeout: Duration,
        spin: Duration,
        pick: &dyn Fn(&WorkCompletion, &Stash) -> bool,
        out: &mut dyn Sink,
    ) -> Result<usize> {
        let start = Instant::now();
        let deadline = deadline(timeout);
        let mut spins = 0u32;
        loop {
            let mut st = self.lock();
            let n = self.drain(&mut st, pick, out)?;
            if n > 0 {
                return Ok(n);
            }
            if past(deadline) {
                return Err(Error::Timeout(timeout, "a work completion"));
            }
            if start.elapsed() < spin {
                drop(st);
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(256) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let nap = deadline.map_or(MAX_SLEEP, |d| d.saturating_duration_since(Instant::now()).min(MAX_SLEEP));
            if st.sleeper {
                // Another waiter sleeps on the channel; it (or whoever sets a completion of
                // ours aside) wakes us.
                st.nappers += 1;
                let (mut st, _) = self.woken.wait_timeout(st, nap).unwrap_or_else(|e| e.into_inner());
                st.nappers -= 1;
                continue;
            }
            st.sleeper = true;
            drop(st);
            let r = self.sleep(nap);
            let mut st = self.lock();
            st.sleeper = false;
            if st.nappers > 0 {
                self.woken.notify_all();
            }
            drop(st);
            r?;
        }
    }

    /// Arms the CQ, and sleeps on its channel for up to `nap` unless a completion is already
    /// there (one that came before the arm raises no event: it is looked for after arming).
    fn sleep(&self, nap: Duration) -> Result<()> {
        // SAFETY: the CQ is live and has a channel; not solicited only: any completion raises
        // the event.
        unsafe { result::cq::req_notify_cq(self.cq.as_ptr(), false) }?;
        {
            let mut st = self.lock();
            let before = st.reaped.len();
            // Set everything aside (the CQ polled dry, taking nothing: a `Vec` has room, and
            // nothing is put in it, so nothing is allocated): the waiters (us included) take
            // theirs on their next turn.
            self.drain(&mut st, &|_, _| false, &mut Vec::new())?;
            if st.reaped.len() > before {
                return Ok(());
            }
        }
        let mut pfd = libc::pollfd { fd: self.channel.fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(nap.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        let ready = match result::os::poll(std::slice::from_mut(&mut pfd), ms, "poll (completion channel)") {
            Ok(n) => n > 0,
            Err(Error::Verb { errno: Errno(libc::EINTR), .. }) => false,
            Err(e) => return Err(e),
        };
        if ready {
            // SAFETY: the channel is live and non-blocking. Only the sleeper reads the channel.
            if unsafe { result::cq::get_cq_event(self.channel.0.as_ptr()) }.is_ok() {
                // SAFETY: one event of this CQ (the channel's only CQ) was got: ack it, so that
                // destroying the CQ does not wait for it.
                unsafe { result::cq::ack_cq_events(self.cq.as_ptr(), 1) };
            }
        }
        Ok(())
    }

    /// Waits for the next completion that no [`wait_wr`](Self::wait_wr) or
    /// [`wait_ids`](Self::wait_ids) caller is waiting for, up to `timeout`; an error status is
    /// returned as [`Error::WorkCompletion`].
    pub fn wait_one(&self, timeout: Duration) -> Result<WorkCompletion> {
        let mut one = [WorkCompletion::default()];
        let mut out = Fill { buf: &mut one, n: 0 };
        self.wait_take(timeout, &|w, st| !st.is_awaited(w.wr_id), &mut out)?;
        taken_one(out, timeout)
    }

    /// Waits for the completion of the work request posted with `wr_id`, up to `timeout`,
    /// and returns it (an error status as [`Error::WorkCompletion`]). Completions of other
    /// work requests reaped meanwhile are set aside for their own waiters — [`wait_one`](Self::wait_one)
    /// never takes one that a `wait_wr` or `wait_ids` caller is waiting for — so threads (and
    /// queue pairs) sharing a CQ never take each other's completions, as long as each posts
    /// with ids of its own. (Raw [`poll`](Self::poll) sees neither the set-aside completions
    /// nor spares the awaited ones: do not mix it with these on one CQ.)
    ///
    /// On [`Error::Timeout`] the work request may still be outstanding: its buffers stay the
    /// NIC's until its completion (or its flush, after [`QueuePair::set_error`](crate::QueuePair::set_error))
    /// has been reaped.
    pub fn wait_wr(&self, wr_id: u64, timeout: Duration) -> Result<WorkCompletion> {
        self.wait_wr_spinning(wr_id, timeout, SPIN)
    }

    /// [`wait_wr`](Self::wait_wr) that busy-polls for the whole wait and never sleeps: for
    /// loops that keep the wire busy (the bounce engine's ring), where a wake-up from the
    /// completion channel would cost more than the request takes.
    pub fn wait_wr_busy(&self, wr_id: u64, timeout: Duration) -> Result<WorkCompletion> {
        self.wait_wr_spinning(wr_id, timeout, timeout)
    }

    fn wait_wr_spinning(&self, wr_id: u64, timeout: Duration, spin: Duration) -> Result<WorkCompletion> {
        let ids = wr_id..wr_id.wrapping_add(1);
        // Marked by the caller's `expect` (which the caller ends, with `unexpect`, once it has
        // the completion or gives the request up: a timed-out wait keeps it marked, so that
        // nobody else takes it meanwhile), or marked here for this wait only.
        let own = {
            let mut st = self.lock();
            let marked = st.awaited.contains(&ids);
            if !marked {
                st.awaited.push(ids.clone());
            }
            !marked
        };
        let mut one = [WorkCompletion::default()];
        let mut out = Fill { buf: &mut one, n: 0 };
        let r = self.wait_take_spinning(timeout, spin, &|w, _| w.wr_id == wr_id, &mut out);
        if own {
            self.unexpect_ids(&ids);
        }
        r?;
        taken_one(out, timeout)
    }

    /// Takes, without waiting, the completions of work requests with ids in `ids` (set aside
    /// earlier or polled now), error statuses included, into `out`; returns how many.
    pub fn take_ids(&self, ids: std::ops::Range<u64>, out: &mut Vec<WorkCompletion>) -> Result<usize> {
        let mut st = self.lock();
        self.drain(&mut st, &|w, _| ids.contains(&w.wr_id), out)
    }

    /// [`take_ids`](Self::take_ids) into a slice: takes at most `out.len()` completions (the
    /// rest stay for a later call), and allocates nothing; returns how many it wrote, from
    /// the front.
    pub fn take_ids_into(&self, ids: std::ops::Range<u64>, out: &mut [WorkCompletion]) -> Result<usize> {
        let mut st = self.lock();
        self.drain(&mut st, &|w, _| ids.contains(&w.wr_id), &mut Fill { buf: out, n: 0 })
    }

    /// Waits up to `timeout` until at least one completion of a work request with an id in
    /// `ids` is taken into `out` (error statuses included), then takes every such completion
    /// there is; returns how many. The ids should be marked with [`expect_ids`](Self::expect_ids)
    /// from before they are posted until they are all reaped.
    pub fn wait_ids(
        &self,
        ids: std::ops::Range<u64>,
        timeout: Duration,
        out: &mut Vec<WorkCompletion>,
    ) -> Result<usize> {
        self.wait_take(timeout, &|w, _| ids.contains(&w.wr_id), out)
    }

    /// [`wait_ids`](Self::wait_ids) into a slice: takes at most `out.len()` completions (the
    /// rest stay for a later call), and allocates nothing; returns how many it wrote, from
    /// the front.
    pub fn wait_ids_into(
        &self,
        ids: std::ops::Range<u64>,
        timeout: Duration,
        out: &mut [WorkCompletion],
    ) -> Result<usize> {
        self.wait_take(timeout, &|w, _| ids.contains(&w.wr_id), &mut Fill { buf: out, n: 0 })
    }

    /// Marks `wr_id` as awaited before its request is posted, so that no
    /// [`wait_one`](Self::wait_one) caller takes its completion, until
    /// [`unexpect`](Self::unexpect): call it once the completion is reaped (by
    /// [`wait_wr`](Self::wait_wr), which leaves the mark in place across waits), or when the
    /// post failed.
    pub fn expect(&self, wr_id: u64) {
        self.expect_ids(wr_id..wr_id.wrapping_add(1));
    }

    /// Ends an [`expect`](Self::expect) mark: the request's completion was reaped, or it was
    /// not posted.
    pub fn unexpect(&self, wr_id: u64) {
        self.unexpect_ids(&(wr_id..wr_id.wrapping_add(1)));
    }

    /// Marks the ids `ids` as awaited (see [`expect`](Self::expect)), until
    /// [`unexpect_ids`](Self::unexpect_ids) with the same range.
    pub fn expect_ids(&self, ids: std::ops::Range<u64>) {
        let mut st = self.lock();
        if !st.awaited.contains(&ids) {
            st.awaited.push(ids);
        }
    }

    /// Ends an [`expect_ids`](Self::expect_ids) mark.
    pub fn unexpect_ids(&self, ids: &std::ops::Range<u64>) {
        self.lock().unawait(ids);
    }

    /// Gives up on `count` completions still to come for ids in `ids` (marked with
    /// [`expect_ids`](Self::expect_ids) with the same range, whose mark this ends): those set
    /// aside already and those polled from now on are dropped, not kept for a taker, so that
    /// requests nobody will reap (receives left on a shared receive queue) do not pile up
    /// here. Completions of other ids are not affected; were fewer than `count` to come, the
    /// range's entry stays (a few bytes).
    pub fn discard_ids(&self, ids: std::ops::Range<u64>, count: usize) {
        let mut st = self.lock();
        st.unawait(&ids);
        let before = st.reaped.len();
        st.reaped.retain(|w| !ids.contains(&w.wr_id));
        let left = count.saturating_sub(before - st.reaped.len());
        if left > 0 && !ids.is_empty() {
            st.discarded.push((ids, left));
        }
    }
}

/// The one completion a single-completion wait took, as a `Result` of its status.
fn taken_one(out: Fill<'_>, timeout: Duration) -> Result<WorkCompletion> {
    match out.n {
        0 => Err(Error::Timeout(timeout, "a work completion")),
        _ => out.buf[0].ok(),
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: destroyed once; QPs using this CQ hold it alive (connections hold it in an
        // Arc and destroy their QP first). Every channel event was acked when it was got. The
        // channel (a field) is destroyed after this.
        if let Err(e) = unsafe { result::cq::destroy_cq(self.cq) } {
            tracing::error!("ibv_destroy_cq failed ({}); the CQ is leaked", result::errno_of(&e));
        }
    }
}
