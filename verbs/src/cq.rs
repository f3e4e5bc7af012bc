//! Completion queues and work completions.

use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::device::Context;
use crate::error::{Error, Result, WcStatus};
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
    fn from_raw(v: u32) -> Self {
        match v {
            0 => WcOpcode::Send,
            1 => WcOpcode::RdmaWrite,
            2 => WcOpcode::RdmaRead,
            3 | 4 => WcOpcode::Atomic,
            128 => WcOpcode::Recv,
            129 => WcOpcode::RecvRdmaWithImm,
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
        const IBV_WC_WITH_IMM: u32 = 1 << 1;
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

#[derive(Default)]
struct Stash {
    reaped: Vec<WorkCompletion>,
    awaited: std::collections::HashSet<u64>,
}

/// `now + timeout`, or no deadline where that does not fit.
fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// A completion queue (`struct ibv_cq`), polled (no completion channel).
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    depth: u32,
    /// Completions reaped for other work requests than the reaper's, kept for their own
    /// waiters, and the ids [`wait_wr`](CompletionQueue::wait_wr) callers are waiting for.
    stash: Mutex<Stash>,
    _ctx: Context,
}

// SAFETY: ibv_poll_cq and ibv_destroy_cq may be called from any thread; providers lock the CQ.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above: concurrent ibv_poll_cq calls on one CQ are serialized by the provider.
unsafe impl Sync for CompletionQueue {}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue").field("depth", &self.depth).finish()
    }
}

impl CompletionQueue {
    /// Creates a CQ of at least `depth` entries on `ctx`.
    pub fn new(ctx: &Context, depth: u32) -> Result<Self> {
        if depth == 0 {
            return Err(Error::InvalidArgument("a CQ needs at least one entry".into()));
        }
        let cqe = i32::try_from(depth).map_err(|_| Error::InvalidArgument(format!("CQ depth {depth} too large")))?;
        // SAFETY: the context is open (held by `_ctx`); no channel, no context pointer.
        let cq = result::ptr("ibv_create_cq", unsafe {
            sys::ibv_create_cq(ctx.as_raw(), cqe, std::ptr::null_mut(), std::ptr::null_mut(), 0)
        })?;
        Ok(CompletionQueue { cq, depth, stash: Mutex::new(Stash::default()), _ctx: ctx.clone() })
    }

    /// The raw CQ, for the `sys` layer.
    pub fn as_raw(&self) -> *mut sys::ibv_cq {
        self.cq.as_ptr()
    }

    /// Its depth as asked for.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Polls up to `out.len()` completions without waiting; returns how many were written.
    /// Completions with error statuses are returned as they are (see [`WorkCompletion::ok`]).
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        const BATCH: usize = 32;
        // SAFETY: ibv_wc is plain old data; zeroed values are overwritten by the provider.
        let mut raw: [sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let want = out.len().min(BATCH) as i32;
        // SAFETY: `raw` has room for `want` entries and the CQ is live.
        let n = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), want, raw.as_mut_ptr()) };
        if n < 0 {
            return Err(result::verb_error("ibv_poll_cq", -n));
        }
        for (o, r) in out.iter_mut().zip(&raw[..n as usize]) {
            *o = WorkCompletion::from_raw(r);
        }
        Ok(n as usize)
    }

    /// Waits (busy-polling) for the next completion, up to `timeout`; an error status is
    /// returned as [`Error::WorkCompletion`]. Completions that [`wait_wr`](Self::wait_wr)
    /// callers set aside come first.
    pub fn wait_one(&self, timeout: Duration) -> Result<WorkCompletion> {
        // Not a completion a `wait_wr` caller is waiting for.
        self.wait_for(timeout, |w, awaited| !awaited.contains(&w.wr_id))
    }

    /// Waits for the first completion that `pick` accepts — set aside earlier, or polled now —
    /// setting aside the others it polls meanwhile.
    fn wait_for(
        &self,
        timeout: Duration,
        pick: impl Fn(&WorkCompletion, &std::collections::HashSet<u64>) -> bool,
    ) -> Result<WorkCompletion> {
        let deadline = deadline(timeout);
        let mut batch = [WorkCompletion::default(); 16];
        let mut spins = 0u32;
        loop {
            {
                let mut st = self.stash.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = st.reaped.iter().position(|w| pick(w, &st.awaited)) {
                    return st.reaped.remove(i).ok();
                }
                let n = self.poll(&mut batch)?;
                let mut mine = None;
                for w in &batch[..n] {
                    if mine.is_none() && pick(w, &st.awaited) {
                        mine = Some(*w);
                    } else {
                        st.reaped.push(*w);
                    }
                }
                if let Some(w) = mine {
                    return w.ok();
                }
            }
            spins += 1;
            if spins.is_multiple_of(256) {
                if past(deadline) {
                    return Err(Error::Timeout(timeout, "a work completion"));
                }
                std::thread::yield_now();
            }
        }
    }
}

impl CompletionQueue {
    /// Waits (busy-polling) for the completion of the work request posted with `wr_id`, up to
    /// `timeout`, and returns it (an error status as [`Error::WorkCompletion`]). Completions of
    /// other work requests reaped meanwhile are set aside for their own `wait_wr` or
    /// [`wait_one`](Self::wait_one) callers — `wait_one` never takes one a `wait_wr` caller is
    /// waiting for — so threads sharing a CQ never take each other's completions, as long as
    /// each posts with ids of its own. (Raw [`poll`](Self::poll) sees neither the set-aside
    /// completions nor spares the awaited ones: do not mix it with these on one CQ.)
    ///
    /// On [`Error::Timeout`] the work request may still be outstanding: its buffers stay the
    /// NIC's until its completion (or its flush, after [`QueuePair::set_error`](crate::QueuePair::set_error))
    /// has been reaped.
    pub fn wait_wr(&self, wr_id: u64, timeout: Duration) -> Result<WorkCompletion> {
        self.expect(wr_id);
        let r = self.wait_wr_inner(wr_id, timeout);
        self.stash.lock().unwrap_or_else(|e| e.into_inner()).awaited.remove(&wr_id);
        r
    }

    /// Marks `wr_id` as awaited before its request is posted, so that no
    /// [`wait_one`](Self::wait_one) caller takes its completion before [`wait_wr`](Self::wait_wr)
    /// begins. `wait_wr` ends the mark; [`unexpect`](Self::unexpect) ends it when the post failed.
    pub fn expect(&self, wr_id: u64) {
        self.stash.lock().unwrap_or_else(|e| e.into_inner()).awaited.insert(wr_id);
    }

    /// Ends an [`expect`](Self::expect) whose request was not posted.
    pub fn unexpect(&self, wr_id: u64) {
        self.stash.lock().unwrap_or_else(|e| e.into_inner()).awaited.remove(&wr_id);
    }

    fn wait_wr_inner(&self, wr_id: u64, timeout: Duration) -> Result<WorkCompletion> {
        self.wait_for(timeout, |w, _| w.wr_id == wr_id)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: destroyed once; QPs using this CQ hold it alive (Connection owns both and
        // destroys the QP first).
        let rc = unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            eprintln!("p2pbridge-verbs: ibv_destroy_cq failed ({}); the CQ is leaked", crate::Errno(rc.abs()));
        }
    }
}
