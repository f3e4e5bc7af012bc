//! Receives: many posted with one call (for SENDs and WRITE-with-immediate from peers), each
//! taken as it completes.
//!
//! ```no_run
//! # use p2pbridge::{Bridge, Registered};
//! # use std::time::Duration;
//! # fn f(bridge: &Bridge, conn: &p2pbridge::verbs::Connection, reg: &Registered) -> p2pbridge::Result<()> {
//! let slots: Vec<_> = (0..64u64).map(|i| (reg, i * 4096, 4096)).collect();
//! let mut rx = bridge.post_recvs(conn, &slots)?;
//! let got = rx.next(Duration::from_secs(5))?; // slot got.index holds got.byte_len bytes
//! # Ok(()) }
//! ```
//!
//! The handle holds its registrations live until every receive has completed: a free of that
//! memory waits until then (or until the handle is dropped), so keep receives posted only while
//! you take them. Receives still posted on a connection when it is dropped can only be taken
//! back by moving the connection's queue pair to the error state (which flushes them): dropping
//! it early ends the connection. Those on a shared receive queue cannot be taken back at all
//! ([`Bridge::post_srq_recvs`] says what becomes of them).
//!
//! Connections made with a shared receive queue ([`ConnectionOptions::srq`]) take their
//! receives from it: [`Bridge::post_srq_recvs`] posts there, and the same handle takes the
//! completions from the receive CQ those connections share ([`ConnectionOptions::recv_cq`]);
//! [`Received::qp_num`] says which connection's message each one took.
//!
//! [`ConnectionOptions::srq`]: p2pbridge_verbs::ConnectionOptions::srq
//! [`ConnectionOptions::recv_cq`]: p2pbridge_verbs::ConnectionOptions::recv_cq

use std::ops::Range;
use std::time::{Duration, Instant};

use p2pbridge_verbs::{CompletionQueue, Connection, LocalSlice, SharedReceiveQueue, WorkCompletion};

use crate::bridge::Bridge;
use crate::completion::{lost_within, next_wr_ids, ATTRIBUTE_WAIT, FAULT_POLL, FLUSH_WAIT};
use crate::error::{Error, Result};
use crate::registration::Registered;
use crate::small::HeldList;
use crate::staging::stage_out;
use crate::transfer::hold;

/// One completed receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Which receive (its index in the list given to [`Bridge::post_recvs`] or
    /// [`Bridge::post_srq_recvs`]).
    pub index: usize,
    /// Bytes that landed (0 for a WRITE with immediate: its bytes went where the writer
    /// aimed them).
    pub byte_len: u32,
    /// The immediate data, if the message carried one.
    pub imm: Option<u32>,
    /// The queue pair whose message it took (`conn.qp().qp_num()`): which connection, for
    /// receives from a shared receive queue.
    pub qp_num: u32,
}

/// Where a list of receives was posted.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A connection's own receive queue.
    Conn(&'a Connection),
    /// A shared receive queue, whose connections share the receive CQ `cq`.
    Srq { srq: &'a SharedReceiveQueue, cq: &'a CompletionQueue },
}

impl<'a> Source<'a> {
    fn cq(self) -> &'a CompletionQueue {
        match self {
            Source::Conn(c) => c.recv_cq(),
            Source::Srq { cq, .. } => cq,
        }
    }

    fn conn(self) -> Option<&'a Connection> {
        match self {
            Source::Conn(c) => Some(c),
            Source::Srq { .. } => None,
        }
    }
}

/// Receives posted on one connection ([`Bridge::post_recvs`]) or on a shared receive queue
/// ([`Bridge::post_srq_recvs`]).
pub struct Receives<'a> {
    source: Source<'a>,
    /// Per receive: the registered range (address and length), its offset in its
    /// registration, and the registration's index in `held`.
    slots: Vec<(u64, u64, u64, usize)>,
    held: HeldList<'a>,
    ids: Range<u64>,
    pending: Vec<bool>,
    left: usize,
    /// Completions taken but not handed out yet.
    ready: Vec<WorkCompletion>,
}

impl std::fmt::Debug for Receives<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = matches!(self.source, Source::Srq { .. });
        f.debug_struct("Receives")
            .field("posted", &self.slots.len())
            .field("pending", &self.left)
            .field("shared_receive_queue", &shared)
            .finish()
    }
}

impl Bridge {
    /// Posts a receive into each `(registration, offset, len)` of `bufs` on `conn`, as one
    /// chained list, and returns the handle that takes them as they complete.
    ///
    /// Connections with a shared receive queue are refused here: their receives are posted on
    /// the SRQ itself ([`post_srq_recvs`](Self::post_srq_recvs)).
    pub fn post_recvs<'a>(&'a self, conn: &'a Connection, bufs: &[(&'a Registered, u64, u64)]) -> Result<Receives<'a>> {
        crate::completion::check_connection(conn)?;
        if conn.srq().is_some() {
            return Err(Error::InvalidArgument(
                "this connection takes its receives from a shared receive queue: post them there (Bridge::post_srq_recvs)"
                    .into(),
            ));
        }
        post(Source::Conn(conn), bufs)
    }

    /// Posts a receive into each `(registration, offset, len)` of `bufs` on the shared receive
    /// queue `srq`, as one chained list, and returns the handle that takes them as they
    /// complete, from `cq`: the receive completion queue that every connection made with `srq`
    /// shares ([`ConnectionOptions::recv_cq`]; a receive's completion goes to the receive CQ of
    /// the connection whose message took it, so completions on another CQ are not seen here).
    /// [`Received::qp_num`] says which connection each message came on.
    ///
    /// Unlike a connection's, receives on a shared queue cannot be flushed: those still posted
    /// when the handle is dropped stay posted, and a later message may land in them. Their
    /// completions are dropped from `cq` as they come (were the SRQ's connections to use
    /// another receive CQ, they would stay there). Their registrations are then leaked, never
    /// deregistered (a region's key could be given to a later registration of the same
    /// addresses, which a late message would then reach; see
    /// [`leaked_registrations`](crate::leaked_registrations)), and kept where no eviction,
    /// invalidation or bridge drop lets them go. A free of their memory goes ahead: their
    /// regions are pinned host memory or bounce staging, which hold the pages they had, so a
    /// late message lands only there, never in memory the process has now. Take every receive
    /// before dropping the handle, or drop the connections and the SRQ first.
    ///
    /// ODP, dma-buf and peer-memory registrations are refused here ([`Error::InvalidArgument`]):
    /// their regions follow their memory, so a receive left posted in one would reach whatever
    /// is at its addresses next, unless the memory's free were held back for ever. Register
    /// the memory pinned or bounce (`Policy::default().require(Strategy::PinnedHost)`) for
    /// receives on a shared queue.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use p2pbridge::verbs::{CompletionQueue, ConnectionOptions, SharedReceiveQueue};
    /// # fn f(bridge: &p2pbridge::Bridge, pd: &p2pbridge::verbs::ProtectionDomain, reg: &p2pbridge::Registered) -> p2pbridge::Result<()> {
    /// let srq = Arc::new(SharedReceiveQueue::new(pd, 1024)?);
    /// let cq = Arc::new(CompletionQueue::new(pd.context(), 1024)?);
    /// // Every connection that should take from the pool is made with these options.
    /// let _opts = ConnectionOptions { srq: Some(srq.clone()), recv_cq: Some(cq.clone()), ..Default::default() };
    /// let slots: Vec<_> = (0..256u64).map(|i| (reg, i * 4096, 4096)).collect();
    /// let mut rx = bridge.post_srq_recvs(&srq, &cq, &slots)?;
    /// let got = rx.next(Duration::from_secs(5))?; // on the connection whose QP is got.qp_num
    /// # Ok(()) }
    /// ```
    ///
    /// [`ConnectionOptions::recv_cq`]: p2pbridge_verbs::ConnectionOptions::recv_cq
    pub fn post_srq_recvs<'a>(
        &'a self,
        srq: &'a SharedReceiveQueue,
        cq: &'a CompletionQueue,
        bufs: &[(&'a Registered, u64, u64)],
    ) -> Result<Receives<'a>> {
        if let Some((reg, ..)) = bufs.iter().find(|(r, ..)| crate::graveyard::follows_memory(r.strategy())) {
            return Err(Error::InvalidArgument(format!(
                "receives on a shared receive queue may outlive their handle, and a {} registration (the one at {:#x}) follows its memory: a late message would reach whatever is there next, or its free would be held back for ever: register the memory pinned for receives on a shared queue (Policy::require(Strategy::PinnedHost); device memory: Strategy::Bounce)",
                reg.strategy(),
                reg.addr()
            )));
        }
        post(Source::Srq { srq, cq }, bufs)
    }

    /// Posts one receive into `len` bytes at `offset` of `local` and waits up to `timeout` for
    /// a message; returns its length and immediate data. Bounce registrations copy staging ->
    /// memory after.
    ///
    /// If no message comes in time, the connection's queue pair is moved to the error state
    /// (so that the receive can no longer land in the buffer) before the error is returned:
    /// the connection is then unusable.
    pub fn recv(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<(u32, Option<u32>)> {
        let mut rx = self.post_recvs(conn, &[(local, offset, len)])?;
        match rx.next(timeout) {
            Ok(r) => Ok((r.byte_len, r.imm)),
            Err(Error::Verbs(p2pbridge_verbs::Error::Timeout(..))) => {
                drop(rx);
                Err(Error::CompletionTimeout { what: "RECV", timeout })
            }
            Err(e) => Err(e),
        }
    }
}

/// Posts `bufs` as one chained receive list on `source`.
fn post<'a>(source: Source<'a>, bufs: &[(&'a Registered, u64, u64)]) -> Result<Receives<'a>> {
    if bufs.is_empty() {
        return Err(Error::InvalidArgument("no receive to post".into()));
    }
    let mut held = HeldList::new();
    let mut slots = Vec::with_capacity(bufs.len());
    for &(reg, offset, len) in bufs {
        let at = reg.entry_range(offset, len)?;
        let h = hold(&mut held, reg.handle.value())?;
        slots.push((reg.addr + offset, len, at, h));
    }
    let locals = slots
        .iter()
        .map(|&(_, len, at, h)| -> Result<_> { Ok(held[h].live()?.mr.slice(at, len)?) })
        .collect::<Result<Vec<LocalSlice<'_>>>>()?;
    let first = next_wr_ids(bufs.len() as u64);
    let ids = first..first + bufs.len() as u64;
    let cq = source.cq();
    cq.expect_ids(ids.clone());
    // SAFETY: each registration is held live by `held` (revocation waits for it) until its
    // receive is reaped: the handle's drop flushes and reaps a connection's receives, and
    // leaks the regions of those it cannot reap (receives left on a shared queue, a device
    // that does not flush: `pin_forever`, then the graveyard), never deregistering them.
    let posted = unsafe {
        match source {
            Source::Conn(conn) => conn.qp().post_recv_list(first, &locals),
            Source::Srq { srq, .. } => srq.post_recv_list(first, &locals),
        }
    };
    drop(locals);
    let rx = |posted: usize| Receives {
        source,
        pending: (0..bufs.len()).map(|i| i < posted).collect(),
        left: posted,
        slots,
        held,
        ids: ids.clone(),
        ready: Vec::new(),
    };
    match posted {
        Ok(()) => Ok(rx(bufs.len())),
        Err(p) => {
            if p.posted > 0 {
                // The ones posted must be flushed (or given up, on a shared queue) before
                // their memory is let go: the handle's drop does that.
                drop(rx(p.posted));
            } else {
                cq.unexpect_ids(&ids);
            }
            Err(p.error.into())
        }
    }
}

impl Receives<'_> {
    /// How many receives have not completed yet.
    pub fn pending(&self) -> usize {
        self.left
    }

    /// Waits up to `timeout` for the next receive to complete (in the order messages arrive)
    /// and returns it. Bounce registrations copy staging -> memory before it returns.
    ///
    /// A receive that completed with an error (flushed: the connection failed) is returned as
    /// that error. No message within `timeout` is `Verbs(Timeout)`, and nothing changes: the
    /// receives stay posted. A lost connection is `ConnectionLost` (receives on a connection's
    /// own queue; a shared receive queue outlives any one of its connections).
    pub fn next(&mut self, timeout: Duration) -> Result<Received> {
        if self.left == 0 && self.ready.is_empty() {
            return Err(Error::InvalidArgument("every receive of this list has completed".into()));
        }
        let start = Instant::now();
        while self.ready.is_empty() {
            let left = timeout.saturating_sub(start.elapsed());
            match self.source.cq().wait_ids(self.ids.clone(), left.min(FAULT_POLL), &mut self.ready) {
                Ok(_) => {}
                Err(p2pbridge_verbs::Error::Timeout(..)) => {
                    if let Some(cause) = self.source.conn().and_then(Connection::fault) {
                        return Err(p2pbridge_verbs::Error::ConnectionLost { cause }.into());
                    }
                    if start.elapsed() >= timeout {
                        return Err(p2pbridge_verbs::Error::Timeout(timeout, "a receive").into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let wc = self.ready.remove(0);
        let i = (wc.wr_id - self.ids.start) as usize;
        self.settle(i);
        if let Err(e) = wc.ok() {
            return Err(match self.source.conn().and_then(|c| lost_within(c, ATTRIBUTE_WAIT)) {
                Some(cause) => p2pbridge_verbs::Error::ConnectionLost { cause }.into(),
                None => e.into(),
            });
        }
        let (addr, len, at, h) = self.slots[i];
        let held = &self.held[h];
        let live = held.live()?;
        if live.mr.staging().is_some() {
            let _staging = live.bounce_lock();
            stage_out(held.reg, live, addr, at, u64::from(wc.byte_len).min(len))?;
        }
        Ok(Received { index: i, byte_len: wc.byte_len, imm: wc.imm, qp_num: wc.qp_num })
    }

    fn settle(&mut self, i: usize) {
        if std::mem::replace(&mut self.pending[i], false) {
            self.left -= 1;
        }
        if self.left == 0 {
            self.source.cq().unexpect_ids(&self.ids);
        }
    }

    /// Flushes the receives still posted (the queue pair to the error state) and reaps them;
    /// on a shared receive queue, which cannot be flushed, gives them up (module docs).
    fn flush_rest(&mut self) {
        for wc in std::mem::take(&mut self.ready) {
            self.settle((wc.wr_id - self.ids.start) as usize);
        }
        if self.left == 0 {
            return;
        }
        let conn = match self.source {
            Source::Conn(conn) => conn,
            Source::Srq { cq, .. } => {
                // A message may still land in these, through their regions' lkeys: those
                // regions are never deregistered (an lkey can be given to a later registration
                // of the same addresses), only leaked when their memory goes.
                for (i, _) in self.pending.iter().enumerate().filter(|(_, p)| **p) {
                    self.held[self.slots[i].3].reg.pin_forever("a receive left posted on a shared receive queue");
                }
                cq.discard_ids(self.ids.clone(), self.left);
                self.left = 0;
                return;
            }
        };
        let stuck = |rx: &mut Self| {
            for h in rx.held.iter() {
                h.reg.pin_forever("receives the device never flushed");
            }
        };
        if conn.qp().set_error().is_err() {
            return stuck(self);
        }
        let start = Instant::now();
        let mut wcs = Vec::new();
        while self.left > 0 {
            let left = FLUSH_WAIT.saturating_sub(start.elapsed());
            wcs.clear();
            if left.is_zero() || conn.recv_cq().wait_ids(self.ids.clone(), left, &mut wcs).is_err() {
                return stuck(self);
            }
            for wc in &wcs {
                self.settle((wc.wr_id - self.ids.start) as usize);
            }
        }
    }
}

impl Drop for Receives<'_> {
    /// Receives still posted on a connection are flushed (its queue pair is moved to the error
    /// state) and reaped before the registrations are let go; those on a shared receive queue
    /// stay posted ([`Bridge::post_srq_recvs`]).
    ///
    /// [`Bridge::post_srq_recvs`]: crate::Bridge::post_srq_recvs
    fn drop(&mut self) {
        self.flush_rest();
    }
}
