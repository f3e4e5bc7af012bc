//! Transfers: batches of RDMA WRITE, READ, WRITE-with-immediate and SEND, posted with one call
//! and completed in the background of a handle.
//!
//! ```no_run
//! # use p2pbridge::{Batch, Bridge, RemoteKey, Registered};
//! # fn f(bridge: &Bridge, conn: &p2pbridge::verbs::Connection, reg: &Registered, key: &RemoteKey) -> p2pbridge::Result<()> {
//! let mut batch = Batch::new();
//! for block in 0..16u64 {
//!     batch.read(reg, block * 4096, 4096, key, block * 65536);
//! }
//! batch.write_imm(reg, 0, 64, key, 0, 0xfeed); // the peer's receive completes with 0xfeed
//! let mut t = bridge.post(conn, batch)?;
//! while !t.poll()? { /* overlap other work */ }
//! t.wait()?; // or wait at once; statuses per descriptor: t.status(i)
//! # Ok(()) }
//! ```
//!
//! **Direct registrations** are posted as chained lists (one `ibv_post_send` per chunk of up to
//! [`CHUNK`] requests), signalled selectively (every [`SIGNAL_EVERY`]th request and the last of
//! each chunk: an RC send queue completes in order, so a completion vouches for the requests
//! before it). Send-queue slots are reserved before posting, so transfers sharing a connection
//! never overflow it; the rest of a batch larger than the queue is posted as completions free
//! slots, by [`Transfer::poll`] and [`Transfer::wait`]. Completions are matched by work-request
//! id (a range of fresh ids per transfer), so transfers and threads sharing a connection, or
//! connections sharing a completion queue, never take each other's.
//!
//! **Bounce registrations** move through the bridge's [`BounceEngine`] (WRITE, READ: a ring of
//! staging chunks in flight, copies overlapped with the wire), or through the registration's
//! staging buffer (SEND, WRITE-with-immediate). Each runs to completion when its turn comes
//! (in [`Bridge::post`], [`Transfer::poll`] or [`Transfer::wait`]), after the direct requests
//! posted before it.
//!
//! **Lifetimes.** A [`Transfer`] borrows every registration and key of its batch, and holds each
//! registration live (its memory cannot be revoked) until the last of its requests has completed
//! or been flushed, and the handle has seen it (`poll`, `wait`, drop): a free of that memory
//! waits until then, so poll or drop handles promptly. Do not free the memory of a transfer you
//! hold from the same thread: the free waits for the handle, for ever. Dropping it early waits for that (moving the queue pair to the error state
//! if the NIC does not finish within [`BridgeOptions::completion_timeout`]), so a buffer is never
//! let go while the NIC may still use it, and nothing leaks.
//!
//! [`BridgeOptions::completion_timeout`]: crate::BridgeOptions::completion_timeout

use std::ops::Range;
use std::sync::{Arc, Mutex, RwLockReadGuard};
use std::time::{Duration, Instant};

use p2pbridge_gpu::MemoryBackend;
use p2pbridge_verbs::{Coarse, Connection, SendFlags, SendOp, SendWr, WcStatus, WorkCompletion};

use crate::bounce::{BounceConfig, BounceEngine};
use crate::bridge::Bridge;
use crate::completion::{check_connection, lost_within, next_wr_ids, ATTRIBUTE_WAIT, FAULT_POLL, FLUSH_WAIT};
use crate::error::{Error, Result};
use crate::key::RemoteKey;
use crate::registration::{Live, Registered, Registration};
use crate::small::{HeldList, Small};
use crate::staging::stage_in;

/// Most requests posted with one `ibv_post_send`.
pub const CHUNK: usize = 64;
/// A signalled request at least this often.
pub const SIGNAL_EVERY: usize = 16;

/// Descriptors a batch (and its transfer) keeps inline: a batch of this many or fewer makes
/// no allocation (a message-rate loop posts many one-descriptor transfers).
const INLINE: usize = 4;

/// Per-descriptor lists of a batch or transfer, inline up to [`INLINE`] entries.
type PerDesc<T> = Small<T, INLINE>;

/// What a descriptor does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// RDMA WRITE of the local range to the remote one.
    Write,
    /// RDMA WRITE that also completes a receive at the peer, carrying the value: tells the
    /// target that the data (this and everything posted before it on the connection) landed.
    WriteImm(u32),
    /// RDMA READ of the remote range into the local one.
    Read,
    /// SEND of the local range into the peer's next receive, with immediate data if given.
    Send(Option<u32>),
}

/// One descriptor of a [`Batch`].
#[derive(Debug, Clone, Copy)]
struct Desc<'a> {
    op: Op,
    local: &'a Registered,
    offset: u64,
    len: u64,
    remote: Option<(&'a RemoteKey, u64)>,
}

/// Descriptors to post together ([`Bridge::post`]): each a local range (offset and length in a
/// [`Registered`]), and for RDMA a remote key with an offset in it.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    descs: PerDesc<Desc<'a>>,
}

impl<'a> Batch<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Batch { descs: Small::new() }
    }

    fn push(
        &mut self,
        op: Op,
        local: &'a Registered,
        offset: u64,
        len: u64,
        remote: Option<(&'a RemoteKey, u64)>,
    ) -> &mut Self {
        self.descs.push(Desc { op, local, offset, len, remote });
        self
    }

    /// RDMA WRITE of `len` bytes at `offset` of `local` to `remote` at `remote_offset`.
    pub fn write(
        &mut self,
        local: &'a Registered,
        offset: u64,
        len: u64,
        remote: &'a RemoteKey,
        remote_offset: u64,
    ) -> &mut Self {
        self.push(Op::Write, local, offset, len, Some((remote, remote_offset)))
    }

    /// RDMA WRITE with immediate data `imm` (the peer needs a receive posted).
    pub fn write_imm(
        &mut self,
        local: &'a Registered,
        offset: u64,
        len: u64,
        remote: &'a RemoteKey,
        remote_offset: u64,
        imm: u32,
    ) -> &mut Self {
        self.push(Op::WriteImm(imm), local, offset, len, Some((remote, remote_offset)))
    }

    /// RDMA READ of `len` bytes from `remote` at `remote_offset` into `local` at `offset`.
    pub fn read(
        &mut self,
        local: &'a Registered,
        offset: u64,
        len: u64,
        remote: &'a RemoteKey,
        remote_offset: u64,
    ) -> &mut Self {
        self.push(Op::Read, local, offset, len, Some((remote, remote_offset)))
    }

    /// SEND of `len` bytes at `offset` of `local`, with immediate data if given (the peer needs
    /// a receive posted).
    pub fn send(&mut self, local: &'a Registered, offset: u64, len: u64, imm: Option<u32>) -> &mut Self {
        self.push(Op::Send(imm), local, offset, len, None)
    }

    /// How many descriptors it holds.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }
}

/// Where one descriptor of a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Posted, not known to be complete yet.
    Pending,
    /// Completed: its bytes moved.
    Done,
    /// Failed with its own completion status (`None`: failed before its completion, e.g. a
    /// bounce copy). On an RC connection the queue pair is then in the error state.
    Failed(Option<WcStatus>),
    /// Flushed: not executed, because an earlier request failed or the connection was lost.
    Flushed,
    /// Never posted: the transfer stopped (an error) before it.
    NotPosted,
}

/// A registration held live for a transfer or receives.
pub(crate) struct Held<'a> {
    pub(crate) reg: &'a Registration,
    guard: RwLockReadGuard<'a, Option<Live>>,
}

impl Held<'_> {
    /// The live state (always there: it was live when held, and revocation waits for us).
    pub(crate) fn live(&self) -> Result<&Live> {
        self.guard.as_ref().ok_or(Error::Revoked)
    }
}

/// The index of `reg` in `held`, holding it (live) first if it is not there yet.
pub(crate) fn hold<'a>(held: &mut HeldList<'a>, reg: &'a Registration) -> Result<usize> {
    if let Some(i) = held.iter().position(|h| std::ptr::eq(h.reg, reg)) {
        return Ok(i);
    }
    Ok(held.push(Held { reg, guard: reg.live()? }))
}

/// Batches of descriptors in flight on one connection: see the [module documentation](self).
pub struct Transfer<'a> {
    bridge: &'a Bridge,
    conn: &'a Connection,
    descs: PerDesc<Desc<'a>>,
    /// Per descriptor: its offset in its registration, and the registration's index in `held`.
    at: PerDesc<(u64, usize)>,
    held: HeldList<'a>,
    /// Work-request ids: `ids.start + i` for descriptor `i`, and the last for the drain
    /// marker.
    ids: Range<u64>,
    status: PerDesc<Status>,
    /// Descriptors handed to the NIC (or run by the engine) so far.
    posted: usize,
    /// Descriptors before this are no longer pending.
    resolved: usize,
    /// Send-queue slots reserved and not given back.
    credits: u32,
    /// Why the transfer stopped posting (its first error).
    error: Option<Error>,
    /// When a completion was last seen to have come (or the transfer began): taken from the
    /// (coarse) clock only when a stall is checked for ([`stalled`](Self::stalled)), so that
    /// taking completions reads no clock.
    progress: Coarse,
    /// Completions taken so far, and how many of them [`stalled`](Self::stalled) had seen.
    events: u64,
    seen: u64,
    /// The drain marker is posted and its completion not yet taken.
    marker: bool,
    /// The device did not flush: the ids stay marked awaited for ever.
    gave_up: bool,
    finished: bool,
}

impl std::fmt::Debug for Transfer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("descriptors", &self.descs.len())
            .field("posted", &self.posted)
            .field("resolved", &self.resolved)
            .field("finished", &self.finished)
            .finish()
    }
}

/// The bridge's bounce engines, one per backend, made on first use.
#[derive(Default)]
pub(crate) struct Engines {
    engines: Mutex<Vec<(Arc<dyn MemoryBackend>, BounceEngine)>>,
}

impl Drop for Engines {
    /// Engines whose transfer panicked may have chunks in flight, unreaped: their staging
    /// slots are never deregistered (leaked with them), rather than given to later memory.
    fn drop(&mut self) {
        if self.engines.is_poisoned() {
            let all = std::mem::take(self.engines.get_mut().unwrap_or_else(|e| e.into_inner()));
            std::mem::forget(all);
        }
    }
}

impl Engines {
    /// Runs `f` with the engine for `backend` (exclusively: one bounce transfer at a time per
    /// backend and bridge).
    fn with<R>(
        &self,
        bridge: &Bridge,
        backend: &Arc<dyn MemoryBackend>,
        f: impl FnOnce(&mut BounceEngine) -> Result<R>,
    ) -> Result<R> {
        // A panic in an engine's run (a backend copy) may have left its chunks in flight and
        // unreaped: such engines are never used again, nor their slots freed (`Drop`).
        let mut all = self.engines.lock().map_err(|_| Error::DeviceStuck {
            what: "a bounce engine whose transfer panicked (its staging slots are not reused)",
        })?;
        let i = match all.iter().position(|(b, _)| Arc::ptr_eq(b, backend)) {
            Some(i) => i,
            None => {
                let cfg = BounceConfig { timeout: bridge.inner.core.completion_timeout, ..bridge.inner.bounce };
                all.push((backend.clone(), BounceEngine::new(&bridge.inner.core.pd, backend.clone(), cfg)?));
                all.len() - 1
            }
        };
        f(&mut all[i].1)
    }
}

impl Bridge {
    /// Posts `batch` on `conn` and returns its [`Transfer`]: direct registrations' requests are
    /// on the wire when it returns (as many as the send queue has room for; the rest follow as
    /// the handle is polled or waited on); bounce registrations' run when their turn comes.
    ///
    /// Checked before anything is posted: every range lies in its registration and its key,
    /// every registration is live, the connection is not lost. A batch that fails those checks
    /// posts nothing.
    pub fn post<'a>(&'a self, conn: &'a Connection, batch: Batch<'a>) -> Result<Transfer<'a>> {
        let descs = batch.descs;
        check_connection(conn)?;
        let mut held = HeldList::new();
        let mut at = PerDesc::new();
        for d in descs.iter() {
            let off = d.local.entry_range(d.offset, d.len)?;
            if let Some((key, roff)) = d.remote {
                key.slice(roff, d.len)?;
            }
            if d.len > u64::from(u32::MAX) {
                return Err(Error::InvalidArgument(format!("a descriptor of {} bytes: at most 4 GiB - 1", d.len)));
            }
            at.push((off, hold(&mut held, d.local.handle.value())?));
        }
        let n = descs.len();
        // One id per descriptor, and one more for the drain marker (`abort`).
        let first = next_wr_ids(n as u64 + 1);
        let ids = first..first + n as u64 + 1;
        conn.send_cq().expect_ids(ids.clone());
        let mut t = Transfer {
            bridge: self,
            conn,
            status: Small::from_elem(Status::Pending, n),
            descs,
            at,
            held,
            ids,
            posted: 0,
            resolved: 0,
            credits: 0,
            error: None,
            progress: Coarse::now(),
            events: 0,
            seen: 0,
            marker: false,
            gave_up: false,
            finished: false,
        };
        t.post_more();
        Ok(t)
    }

    /// RDMA WRITE of `len` bytes at `offset` of `local` to `remote` at `remote_offset`, waiting
    /// for the completion: a [`Transfer`] of one descriptor.
    pub fn write(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        let mut b = Batch::new();
        b.write(local, offset, len, remote, remote_offset);
        self.post(conn, b)?.wait()
    }

    /// RDMA READ of `len` bytes from `remote` at `remote_offset` into `local` at `offset`,
    /// waiting for the completion: a [`Transfer`] of one descriptor.
    pub fn read(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        let mut b = Batch::new();
        b.read(local, offset, len, remote, remote_offset);
        self.post(conn, b)?.wait()
    }

    /// SEND of `len` bytes at `offset` of `local` (with immediate data if given), waiting for
    /// the completion. The peer must have a receive posted ([`Bridge::recv`], [`Bridge::post_recvs`]).
    pub fn send(&self, conn: &Connection, local: &Registered, offset: u64, len: u64, imm: Option<u32>) -> Result<()> {
        let mut b = Batch::new();
        b.send(local, offset, len, imm);
        self.post(conn, b)?.wait()
    }
}

impl<'a> Transfer<'a> {
    /// How many descriptors it has.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Whether every descriptor is settled (done, failed, flushed or not posted), as of the
    /// last [`poll`](Self::poll) or [`wait`](Self::wait). Polls nothing.
    pub fn is_done(&self) -> bool {
        self.finished
    }

    /// Where descriptor `i` stands (in the order of the batch).
    pub fn status(&self, i: usize) -> Option<Status> {
        self.status.get(i).copied()
    }

    /// Every descriptor's status.
    pub fn statuses(&self) -> &[Status] {
        &self.status
    }

    /// Takes the completions that have come, posts what the send queue has room for, and
    /// returns whether the transfer is done, without waiting. A lost connection is noticed
    /// here too. Errors are those of [`wait`](Self::wait), returned once, by the call that
    /// finds the transfer done (later calls return `Ok(true)`).
    pub fn poll(&mut self) -> Result<bool> {
        if self.finished {
            return Ok(true);
        }
        // Taken into the stack, a batch at a time: a poll allocates nothing.
        let mut wcs = [WorkCompletion::default(); SIGNAL_EVERY];
        loop {
            match self.conn.send_cq().take_ids_into(self.ids.clone(), &mut wcs) {
                Ok(n) => {
                    self.absorb(&wcs[..n]);
                    if n < wcs.len() {
                        break;
                    }
                }
                Err(e) => {
                    self.abort(e.into());
                    break;
                }
            }
        }
        if self.resolved < self.posted {
            // The coarse clock, read once per call that finds the transfer pending (none per
            // completion); `fault` looks at the connection at most every FAULT_CHECK_INTERVAL.
            let stalled = self.stalled(Coarse::now());
            if self.error.is_some() {
                // Failed: the rest is being flushed; if that stalls, drain as on a timeout.
                if stalled >= FLUSH_WAIT {
                    self.abort(self.timeout_error());
                }
            } else if let Some(cause) = self.conn.fault() {
                self.abort(p2pbridge_verbs::Error::ConnectionLost { cause }.into());
            } else if stalled >= self.bridge.inner.core.completion_timeout {
                self.abort(self.timeout_error());
            }
        }
        self.post_more();
        self.try_finish()
    }

    /// Waits until every descriptor is settled. `Ok` if all are [`Status::Done`]; else the
    /// first error (a completion's status, the connection's loss, or
    /// [`Error::CompletionTimeout`] when the NIC made no progress for
    /// [`BridgeOptions::completion_timeout`](crate::BridgeOptions::completion_timeout)), with
    /// every descriptor's fate in [`statuses`](Self::statuses). Sleeps on the completion
    /// channel rather than spinning a core.
    pub fn wait(mut self) -> Result<()> {
        self.wait_mut()
    }

    fn wait_mut(&mut self) -> Result<()> {
        if self.finished {
            // Its outcome was returned by a poll: `Ok` only if every descriptor is done.
            return match self.status.iter().position(|s| *s != Status::Done) {
                None => Ok(()),
                Some(index) => Err(Error::TransferFailed { index, status: self.status[index] }),
            };
        }
        let mut wcs = [WorkCompletion::default(); SIGNAL_EVERY];
        loop {
            self.post_more();
            if self.try_finish()? {
                return Ok(());
            }
            if self.resolved == self.posted {
                // Nothing of ours in flight, yet more to post: others hold the send queue.
                if self.stalled(Coarse::now()) >= self.bridge.inner.core.completion_timeout {
                    self.abort(self.timeout_error());
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
                continue;
            }
            match self.conn.send_cq().wait_ids_into(self.ids.clone(), FAULT_POLL, &mut wcs) {
                // A full array leaves the rest for the next turn (which finds them at once).
                Ok(n) => self.absorb(&wcs[..n]),
                Err(p2pbridge_verbs::Error::Timeout(..)) => {
                    if let Some(cause) = self.conn.fault() {
                        self.abort(p2pbridge_verbs::Error::ConnectionLost { cause }.into());
                    } else if self.stalled(Coarse::now()) >= self.bridge.inner.core.completion_timeout {
                        self.abort(self.timeout_error());
                    }
                }
                // Polling failed: the requests may still be outstanding; drain them.
                Err(e) => self.abort(e.into()),
            }
        }
    }

    /// How long, as of `now`, no completion has come: a completion taken since the last look
    /// counts as progress at `now` (so a stall is never overstated, at most understated by the
    /// time between looks and a tick of the coarse clock).
    fn stalled(&mut self, now: Coarse) -> Duration {
        if self.events != self.seen {
            self.seen = self.events;
            self.progress = now;
        }
        now.since(self.progress)
    }

    fn timeout_error(&self) -> Error {
        Error::CompletionTimeout {
            what: "a transfer's work requests",
            timeout: self.bridge.inner.core.completion_timeout,
        }
    }

    /// Posts what can be posted now: bounce descriptors run to completion; direct ones go as
    /// chained lists while the send queue has room.
    fn post_more(&mut self) {
        while self.posted < self.descs.len() && self.error.is_none() {
            // A registration whose revocation has begun (its memory unmapped, say) takes no
            // new work: what is in flight finishes, nothing more reaches the memory.
            if self.held.iter().any(|h| h.reg.is_revoking()) {
                self.fail_unposted(Error::Revoked);
                return;
            }
            let i = self.posted;
            if self.is_bounce(i) {
                // Earlier direct requests first: the engine waits on the same queue.
                if self.resolved < self.posted {
                    return;
                }
                let (n, r) = self.run_bounce(i);
                self.posted += n;
                match r {
                    Ok(()) => self.status[i..i + n].fill(Status::Done),
                    Err((done, e)) => {
                        // `done` counts the run's descriptors settled before the failure (at
                        // most `n`, whatever the engine says: never an index past the run).
                        let done = done.min(n);
                        self.status[i..i + done].fill(Status::Done);
                        if done < n {
                            self.status[i + done] = Status::Failed(wc_status(&e));
                            self.status[i + done + 1..i + n].fill(Status::Failed(None));
                        }
                        self.error = Some(e);
                    }
                }
                self.resolved = self.posted;
                continue;
            }
            // A run of direct descriptors, as long as slots allow.
            let run = (i..self.descs.len()).take(CHUNK).take_while(|&j| !self.is_bounce(j)).count();
            let want = run as u32;
            let got = self.conn.qp().reserve_send(want);
            if got == 0 {
                return;
            }
            self.credits += got;
            let end = i + got as usize;
            // The requests borrow the transfer: built and posted in one statement, so that
            // they are gone before it changes.
            // SAFETY: every descriptor's registration is held live by this transfer until its
            // requests are reaped (completed or flushed); where the device flushes nothing, the
            // registrations are leaked (`stuck`), never deregistered.
            let sent = self.work_requests(i..end).map(|wrs| unsafe { self.conn.qp().post_send_list(&wrs) });
            match sent {
                Err(e) => {
                    self.give_back(got);
                    self.fail_unposted(e);
                    return;
                }
                Ok(Ok(())) => self.posted = end,
                Ok(Err(p)) => {
                    self.posted = i + p.posted;
                    self.give_back(got - p.posted as u32);
                    // Requests posted unsignalled may never complete now: flush them, with the
                    // drain marker after them.
                    self.abort(p.error.into());
                    return;
                }
            }
        }
    }

    /// Whether descriptor `i`'s registration is a bounce one (its region is a staging buffer).
    fn is_bounce(&self, i: usize) -> bool {
        self.live(i).is_some_and(|l| l.mr.staging().is_some())
    }

    fn live(&self, i: usize) -> Option<&Live> {
        self.held[self.at[i].1].guard.as_ref()
    }

    /// The work requests of descriptors `range` (direct registrations), signalled every
    /// [`SIGNAL_EVERY`] and at the end.
    fn work_requests(&self, range: Range<usize>) -> Result<PerDesc<SendWr<'_>>> {
        let last = range.end - 1;
        range
            .map(|i| {
                let d = &self.descs[i];
                let live = self.live(i).ok_or(Error::Revoked)?;
                let local = live.mr.slice(self.at[i].0, d.len)?;
                let remote = |d: &Desc<'_>| -> Result<_> {
                    let (key, off) = d.remote.ok_or_else(no_key)?;
                    key.slice(off, d.len)
                };
                let op = match d.op {
                    Op::Write => SendOp::Write(remote(d)?),
                    Op::WriteImm(imm) => SendOp::WriteImm(remote(d)?, imm),
                    Op::Read => SendOp::Read(remote(d)?),
                    Op::Send(imm) => SendOp::Send(imm),
                };
                let signal = i == last || (i + 1) % SIGNAL_EVERY == 0;
                let flags = if signal { SendFlags::SIGNALED } else { SendFlags::empty() };
                Ok(SendWr { wr_id: self.ids.start + i as u64, op, local, flags })
            })
            .collect()
    }

    /// Runs bounce descriptors from `i` to completion, and returns how many: a run of WRITEs
    /// (or of READs) of one backend goes through its engine as one pipeline (the ring's depth
    /// in flight); a SEND or WRITE-with-immediate goes through its registration's staging
    /// buffer, alone. On failure: how many of the run were done, and the error.
    fn run_bounce(&mut self, i: usize) -> (usize, std::result::Result<(), (usize, Error)>) {
        let d = self.descs[i];
        let reg = self.held[self.at[i].1].reg;
        let Some(backend) = reg.backend.clone() else {
            return (1, Err((0, Error::InvalidArgument("a bounce registration without a backend".into()))));
        };
        if matches!(d.op, Op::Write | Op::Read) {
            let same = |j: usize| {
                let e = &self.descs[j];
                e.op == d.op
                    && self.is_bounce(j)
                    && e.local.handle.value().backend.as_ref().is_some_and(|b| Arc::ptr_eq(b, &backend))
            };
            let n = (i..self.descs.len()).take_while(|&j| same(j)).count();
            let pieces = self.descs[i..i + n]
                .iter()
                .map(|e| {
                    let (key, off) = e.remote.ok_or_else(no_key)?;
                    Ok(crate::bounce::Piece {
                        addr: e.local.addr + e.offset,
                        len: e.len,
                        remote: key,
                        remote_offset: off,
                    })
                })
                .collect::<Result<Vec<_>>>();
            let pieces = match pieces {
                Ok(p) => p,
                Err(e) => return (n, Err((0, e))),
            };
            // A second guard: each piece is still the allocation registered (staging.rs).
            // Nothing of the run is done when one fails it.
            for (e, p) in self.descs[i..i + n].iter().zip(&pieces) {
                if let Err(err) =
                    crate::staging::same_allocation(e.local.handle.value(), backend.as_ref(), p.addr, p.len)
                {
                    return (n, Err((0, err)));
                }
            }
            let (conn, write) = (self.conn, d.op == Op::Write);
            let r = self.bridge.inner.engines.with(self.bridge, &backend, |e| {
                // SAFETY: every piece's registration is held live (this transfer's guards), and
                // was just checked to be the allocation registered. Memory registered safely is
                // freed only through its backend's notices, which revoke it first, waiting for
                // the guard; memory of `register_foreign` is reported (`report_free`, which
                // also waits) before it goes, by that function's contract.
                Ok(unsafe {
                    if write {
                        e.write_many(conn, &pieces)
                    } else {
                        e.read_many(conn, &pieces)
                    }
                })
            });
            return match r {
                Ok(r) => (n, r),
                Err(e) => (n, Err((0, e))),
            };
        }
        (1, self.run_staged(i).map_err(|e| (0, e)))
    }

    /// Runs bounce descriptor `i` (a SEND or WRITE-with-immediate) through its registration's
    /// staging buffer, to completion.
    fn run_staged(&self, i: usize) -> Result<()> {
        let d = self.descs[i];
        let (at, h) = self.at[i];
        let reg = self.held[h].reg;
        let live = self.held[h].live()?;
        let conn = self.conn;
        let _staging = live.bounce_lock();
        stage_in(reg, live, d.local.addr + d.offset, at, d.len)?;
        let local = live.mr.slice(at, d.len)?;
        let op = match (d.op, d.remote) {
            (Op::WriteImm(imm), Some((key, off))) => SendOp::WriteImm(key.slice(off, d.len)?, imm),
            (Op::Send(imm), _) => SendOp::Send(imm),
            _ => return Err(no_key()),
        };
        let id = crate::completion::next_wr_id();
        let cq = conn.send_cq();
        cq.expect(id);
        let wr = SendWr { wr_id: id, op, local, flags: SendFlags::SIGNALED };
        // SAFETY: the registration is held live (the caller's guard) until `reap_on` has reaped
        // the request (completed or flushed); where the device did not, it is leaked below.
        if let Err(p) = unsafe { conn.qp().post_send_list(&[wr]) } {
            cq.unexpect(id);
            return Err(p.error.into());
        }
        let timeout = self.bridge.inner.core.completion_timeout;
        let r = crate::completion::reap_on(conn, cq, id, timeout, "a bounce SEND or WRITE with immediate");
        if matches!(r, Err(Error::DeviceStuck { .. })) {
            reg.pin_forever("a staged SEND the device never completed nor flushed");
        }
        r.map(|_| ())
    }

    fn give_back(&mut self, n: u32) {
        let n = n.min(self.credits);
        self.credits -= n;
        self.conn.qp().release_send(n);
    }

    /// Stops with `e` before anything more is posted.
    fn fail_unposted(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Settles descriptors by their completions: a completion of descriptor `k` (in an RC
    /// send queue's order) vouches for every earlier one still pending — done if they came
    /// before a failure, since a failure completes (and flushes) every request after it.
    fn absorb(&mut self, wcs: &[WorkCompletion]) {
        for wc in wcs {
            let Some(k) = wc.wr_id.checked_sub(self.ids.start).map(|k| k as usize) else { continue };
            if k == self.descs.len() {
                // The drain marker, posted after the queue pair entered the error state: every
                // request before it has completed. Those still pending made no completion, so
                // they succeeded unsignalled (a failed or flushed one always completes).
                self.events += 1;
                let mut freed = 0;
                for j in self.resolved..self.posted {
                    if self.status[j] == Status::Pending {
                        self.status[j] = Status::Done;
                        freed += 1;
                    }
                }
                self.resolved = self.posted;
                self.marker = false;
                self.give_back(freed);
                continue;
            }
            if k >= self.posted || self.status[k] != Status::Pending {
                continue;
            }
            self.events += 1;
            let mut freed = 0;
            for j in self.resolved..k {
                if self.status[j] == Status::Pending {
                    self.status[j] = Status::Done;
                    freed += 1;
                }
            }
            self.status[k] = match wc.status {
                WcStatus::Success => Status::Done,
                WcStatus::WrFlush => Status::Flushed,
                s => Status::Failed(Some(s)),
            };
            freed += 1;
            if wc.status != WcStatus::Success && self.error.is_none() {
                self.error = Some(self.failure(wc));
            }
            self.resolved = self.resolved.max(k + 1);
            self.give_back(freed);
        }
    }

    /// The error for a failed completion: the connection's loss if it shows soon (a dead peer's
    /// memory goes before its rdma_cm id), else the completion's status.
    fn failure(&self, wc: &WorkCompletion) -> Error {
        let status = p2pbridge_verbs::Error::WorkCompletion {
            status: wc.status,
            wr_id: wc.wr_id,
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        };
        match lost_within(self.conn, ATTRIBUTE_WAIT) {
            Some(cause) => p2pbridge_verbs::Error::ConnectionLost { cause }.into(),
            None => status.into(),
        }
    }

    /// Stops the transfer with `e`: moves the queue pair to the error state and reaps every
    /// request still in flight (completed or flushed). A device that does not flush keeps the
    /// registrations' regions for ever (the NIC may still use them).
    fn abort(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
        if self.resolved == self.posted {
            return;
        }
        if self.conn.qp().set_error().is_err() {
            return self.stuck();
        }
        // A request posted last but unsignalled (a list the provider took only in part) that
        // succeeded before the error state makes no completion: a signalled marker after it,
        // flushed in its turn, vouches for it (as the kernel's ib_drain_sq does).
        self.marker = self.post_marker();
        let start = Instant::now();
        let mut wcs = [WorkCompletion::default(); SIGNAL_EVERY];
        // Until the marker itself is taken (it completes last): no completion of this
        // transfer's ids is left behind for another waiter.
        while self.resolved < self.posted || self.marker {
            let left = FLUSH_WAIT.saturating_sub(start.elapsed());
            if left.is_zero() {
                return self.stuck();
            }
            match self.conn.send_cq().wait_ids_into(self.ids.clone(), left, &mut wcs) {
                Ok(n) => self.absorb(&wcs[..n]),
                Err(_) => return self.stuck(),
            }
        }
    }

    /// Posts the zero-length, signalled drain marker (the transfer's last id) on the queue pair,
    /// which is in the error state: it completes (flushed) after every request before it.
    fn post_marker(&self) -> bool {
        let Some(live) = self.held.first().and_then(|h| h.guard.as_ref()) else { return false };
        let Ok(local) = live.mr.slice(0, 0) else { return false };
        let marker = SendWr { wr_id: self.ids.end - 1, op: SendOp::Send(None), local, flags: SendFlags::SIGNALED };
        // If it cannot be posted, the wait ends on the flushes alone, or as stuck.
        // SAFETY: zero bytes: the marker reaches no memory; its registration is held by this
        // transfer until reaped, or leaked (`stuck`).
        unsafe { self.conn.qp().post_send_list(&[marker]) }.is_ok()
    }

    /// The NIC did not flush: the requests in flight stay its own for ever.
    fn stuck(&mut self) {
        for h in self.held.iter() {
            h.reg.pin_forever("a transfer's work requests the device never completed nor flushed");
        }
        self.error = Some(Error::DeviceStuck { what: "a transfer's work requests" });
        // Their slots and ids are never given back: the requests may still complete, and no
        // other waiter may take their completions.
        self.credits = 0;
        self.resolved = self.posted;
        self.marker = false;
        self.gave_up = true;
    }

    /// Once nothing is in flight and nothing more will be posted: releases the registrations
    /// and returns the outcome.
    fn try_finish(&mut self) -> Result<bool> {
        if self.finished {
            return Ok(true);
        }
        let more = self.posted < self.descs.len() && self.error.is_none();
        if self.resolved < self.posted || more {
            return Ok(false);
        }
        for s in &mut self.status[self.posted..] {
            *s = Status::NotPosted;
        }
        self.finished = true;
        self.give_back(self.credits);
        if !self.gave_up {
            self.conn.send_cq().unexpect_ids(&self.ids);
        }
        self.held.clear();
        match self.error.take() {
            None => Ok(true),
            Some(e) => Err(e),
        }
    }
}

impl Drop for Transfer<'_> {
    /// Waits until nothing of the transfer is in flight (see [`Transfer::wait`]); only then are
    /// its registrations released.
    fn drop(&mut self) {
        if !self.finished {
            // Nothing more is posted; what is in flight is waited for.
            self.fail_unposted(Error::InvalidArgument("the transfer was dropped before it was done".into()));
            let _ = self.wait_mut();
        }
    }
}

/// The error of a WRITE, READ or WRITE-with-immediate descriptor that names no remote key (built
/// only when needed: it allocates).
fn no_key() -> Error {
    Error::InvalidArgument("an RDMA descriptor without a key".into())
}

/// The completion status in `e`, if it is a completion's.
fn wc_status(e: &Error) -> Option<WcStatus> {
    match e {
        Error::Verbs(p2pbridge_verbs::Error::WorkCompletion { status, .. }) => Some(*status),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{Batch, Transfer};
    use crate::receive::Receives;
    use crate::registration::Registered;

    /// Checked by the compiler, as `Vec` would allow: a batch, a transfer and receives of
    /// longer-lived borrows pass as ones of shorter-lived borrows (covariance), and a batch
    /// may be declared before the registration it borrows (no drop of its own that could
    /// touch it). Neither function is run: that they compile is the test.
    #[test]
    fn batches_transfers_and_receives_shorten_like_vecs() {
        fn shorten<'s>(
            b: Batch<'static>,
            t: Transfer<'static>,
            r: Receives<'static>,
        ) -> (Batch<'s>, Transfer<'s>, Receives<'s>) {
            (b, t, r)
        }
        fn declared_first(reg: Registered) -> usize {
            let mut b = Batch::new();
            let reg = reg;
            b.send(&reg, 0, 1, None);
            b.len()
        }
        let _ = (shorten as fn(_, _, _) -> _, declared_first as fn(_) -> _);
    }
}
