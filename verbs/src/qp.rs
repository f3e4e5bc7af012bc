//! Reliable-connected queue pairs: posting RDMA WRITE, READ, SEND and RECV.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bitflags::bitflags;

use crate::access::AccessFlags;
use crate::error::{Error, Result};
use crate::mr::{LocalSlice, MemoryRegion};
use crate::mw::MemoryWindow;
use crate::pd::{PdInner, ProtectionDomain};
use crate::remote::RemoteSlice;
use crate::{result, sys};

bitflags! {
    /// Flags of a send-queue work request (`enum ibv_send_flags`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SendFlags: u32 {
        /// Wait for earlier RDMA READs and atomics before this one.
        const FENCE = sys::ibv_send_flags::IBV_SEND_FENCE.0;
        /// Generate a completion (otherwise only errors complete).
        const SIGNALED = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        /// Solicited event at the receiver.
        const SOLICITED = sys::ibv_send_flags::IBV_SEND_SOLICITED.0;
        /// Copy the payload into the WQE (up to the QP's inline limit): the buffer may be
        /// reused as soon as the post returns.
        const INLINE = sys::ibv_send_flags::IBV_SEND_INLINE.0;
    }
}

/// A QP's state (`enum ibv_qp_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// RESET
    Reset,
    /// INIT
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Send queue drained.
    Sqd,
    /// Send queue error.
    Sqe,
    /// Error: every outstanding and new request is flushed.
    Error,
    /// Something else.
    Unknown(u32),
}

/// An RC queue pair. Made by [`crate::cm`] connection setup; owned by its connection.
pub struct QueuePair {
    qp: NonNull<sys::ibv_qp>,
    pd: Arc<PdInner>,
    max_inline: u32,
    /// Send-queue slots not reserved ([`reserve_send`](QueuePair::reserve_send)).
    send_credits: AtomicU32,
    /// The slots reservations share (the queue less the room kept for unreserved posts).
    max_credits: u32,
}

// SAFETY: posting and querying are thread-safe verbs (providers lock the queues).
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair").field("qp_num", &self.qp_num()).finish()
    }
}

impl QueuePair {
    /// # Safety
    /// `qp` must be a live RC QP created in `pd`, that outlives the returned value.
    /// `max_send_wr` is the send queue's depth as created.
    pub(crate) unsafe fn from_raw(
        qp: NonNull<sys::ibv_qp>,
        pd: &ProtectionDomain,
        max_inline: u32,
        max_send_wr: u32,
    ) -> Self {
        // Some room is never reserved: for requests posted without reserving (binds, raw posts).
        let credits = max_send_wr.saturating_sub(max_send_wr / 8).max(1);
        QueuePair { qp, pd: pd.inner.clone(), max_inline, send_credits: AtomicU32::new(credits), max_credits: credits }
    }

    /// Reserves up to `want` send-queue slots for requests about to be posted, and returns
    /// how many it got (0 when others hold them all). Posters that reserve never overflow the
    /// queue among themselves; give the slots back with [`release_send`](Self::release_send)
    /// as the requests complete (or are flushed), or when they were not posted.
    pub fn reserve_send(&self, want: u32) -> u32 {
        let mut got = 0;
        let _ = self.send_credits.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            got = c.min(want);
            Some(c - got)
        });
        got
    }

    /// Gives back `n` slots of [`reserve_send`](Self::reserve_send). More than were reserved
    /// never raises the count past the queue's share for reservations (nor wraps it).
    pub fn release_send(&self, n: u32) {
        let max = self.max_credits;
        let _ =
            self.send_credits.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| Some(c.saturating_add(n).min(max)));
    }

    /// The QP number.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: the QP is live; qp_num is set at creation and never changes.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    /// The raw QP, for the `sys` layer.
    pub fn as_raw(&self) -> *mut sys::ibv_qp {
        self.qp.as_ptr()
    }

    /// Largest inline payload.
    pub fn max_inline(&self) -> u32 {
        self.max_inline
    }

    /// The QP's current state (`ibv_query_qp`). After a failed work request an RC QP is in
    /// [`QpState::Error`].
    pub fn state(&self) -> Result<QpState> {
        // SAFETY: plain old data out-parameters.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the QP is live; the out-pointers are valid.
        unsafe { result::qp::query_qp(self.qp.as_ptr(), &mut attr, sys::ibv_qp_attr_mask::IBV_QP_STATE, &mut init) }?;
        use sys::ibv_qp_state as s;
        Ok(match attr.qp_state {
            s::IBV_QPS_RESET => QpState::Reset,
            s::IBV_QPS_INIT => QpState::Init,
            s::IBV_QPS_RTR => QpState::Rtr,
            s::IBV_QPS_RTS => QpState::Rts,
            s::IBV_QPS_SQD => QpState::Sqd,
            s::IBV_QPS_SQE => QpState::Sqe,
            s::IBV_QPS_ERR => QpState::Error,
            o => QpState::Unknown(o),
        })
    }

    fn check_local(&self, local: &LocalSlice<'_>, needs_write: bool, verb: &str) -> Result<()> {
        if local.pd != Arc::as_ptr(&self.pd) {
            return Err(Error::InvalidArgument(format!(
                "{verb}: the local memory region belongs to another protection domain than the QP"
            )));
        }
        if needs_write && !local.access.contains(AccessFlags::LOCAL_WRITE) {
            return Err(Error::InvalidArgument(format!(
                "{verb}: the local memory region was registered without LOCAL_WRITE, which the NIC needs to write into it"
            )));
        }
        Ok(())
    }

    fn check_inline(&self, local: &LocalSlice<'_>, flags: SendFlags) -> Result<()> {
        if flags.contains(SendFlags::INLINE) && local.len > self.max_inline {
            return Err(Error::InvalidArgument(format!(
                "inline payload of {} bytes exceeds the QP's limit of {}",
                local.len, self.max_inline
            )));
        }
        Ok(())
    }

    fn post_send_wr(
        &self,
        wr_id: u64,
        opcode: u32,
        local: &LocalSlice<'_>,
        remote: Option<&RemoteSlice>,
        imm: Option<u32>,
        flags: SendFlags,
    ) -> Result<()> {
        let mut sge = local.sge();
        // SAFETY: ibv_send_wr is plain old data; zeroed is a valid empty request.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = if local.len == 0 { 0 } else { 1 };
        wr.opcode = opcode;
        wr.send_flags = flags.bits();
        if let Some(imm) = imm {
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        if let Some(r) = remote {
            wr.wr.rdma = sys::rdma_t { remote_addr: r.addr, rkey: r.rkey };
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` outlive the call (the provider copies them
        // into the send queue); the local range lies in a registered MR of this QP's PD
        // (checked by the caller), so the NIC touches only registered memory.
        unsafe { result::qp::post_send(self.qp.as_ptr(), &mut wr, &mut bad, "ibv_post_send") }
    }

    /// Posts an RDMA WRITE of `local` to `remote` (lengths must match).
    ///
    /// # Safety
    /// The NIC reads `local` whenever the WRITE goes out, which may be after this call (a full
    /// queue, retries). `local`'s memory region must stay registered — not dropped nor
    /// deregistered — until this request's completion (or a later one of the same send queue,
    /// which vouches for it) is reaped, or the queue pair is destroyed: a region deregistered
    /// earlier gives its lkey back to the provider, which may hand it to a later registration
    /// whose bytes the WRITE would then send to the peer.
    pub unsafe fn post_write(
        &self,
        wr_id: u64,
        local: &LocalSlice<'_>,
        remote: &RemoteSlice,
        flags: SendFlags,
    ) -> Result<()> {
        self.check_local(local, false, "RDMA WRITE")?;
        self.check_inline(local, flags)?;
        check_same_len(local, remote)?;
        self.post_send_wr(wr_id, sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE, local, Some(remote), None, flags)
    }

    /// Posts an RDMA WRITE with immediate: the peer also gets a receive completion carrying
    /// `imm` (it must have a receive posted).
    ///
    /// # Safety
    /// As [`post_write`](Self::post_write).
    pub unsafe fn post_write_imm(
        &self,
        wr_id: u64,
        local: &LocalSlice<'_>,
        remote: &RemoteSlice,
        imm: u32,
        flags: SendFlags,
    ) -> Result<()> {
        self.check_local(local, false, "RDMA WRITE with immediate")?;
        self.check_inline(local, flags)?;
        check_same_len(local, remote)?;
        self.post_send_wr(wr_id, sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM, local, Some(remote), Some(imm), flags)
    }

    /// Posts an RDMA READ of `remote` into `local` (which needs LOCAL_WRITE).
    ///
    /// # Safety
    /// The NIC writes `local`'s region when the READ's response comes, which may be after this
    /// call and the slice's borrow have ended (a READ retried, a completion not reaped yet).
    /// `local`'s memory region must stay registered — not dropped nor deregistered — until
    /// this request's completion is reaped (success, error or flush) or the queue pair is
    /// destroyed: a region deregistered earlier gives its lkey back to the provider, which may
    /// hand it to a later registration of other memory that the READ would then write. (The
    /// request's completion comes only where it is signaled, or where a later signaled one of
    /// the same queue completes.)
    pub unsafe fn post_read(
        &self,
        wr_id: u64,
        local: &LocalSlice<'_>,
        remote: &RemoteSlice,
        flags: SendFlags,
    ) -> Result<()> {
        self.check_local(local, true, "RDMA READ")?;
        if flags.contains(SendFlags::INLINE) {
            return Err(Error::InvalidArgument("RDMA READ cannot be inline".into()));
        }
        check_same_len(local, remote)?;
        self.post_send_wr(wr_id, sys::ibv_wr_opcode::IBV_WR_RDMA_READ, local, Some(remote), None, flags)
    }

    /// Posts a SEND of `local`, with immediate data if `imm` is given.
    ///
    /// # Safety
    /// As [`post_write`](Self::post_write): a SEND waiting for the peer's receive (RNR
    /// retries) reads its region long after the call.
    pub unsafe fn post_send(
        &self,
        wr_id: u64,
        local: &LocalSlice<'_>,
        imm: Option<u32>,
        flags: SendFlags,
    ) -> Result<()> {
        self.check_local(local, false, "SEND")?;
        self.check_inline(local, flags)?;
        let op = if imm.is_some() { sys::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM } else { sys::ibv_wr_opcode::IBV_WR_SEND };
        self.post_send_wr(wr_id, op, local, None, imm, flags)
    }

    /// Posts a receive into `local` (which needs LOCAL_WRITE).
    ///
    /// # Safety
    /// A message may land in `local` at any time until the receive completes, long after this
    /// call. `local`'s memory region must stay registered — not dropped nor deregistered —
    /// until this receive's completion is reaped (a message, an error or a flush) or the queue
    /// pair is destroyed: a receive never consumed needs it for as long as the QP lives. A
    /// region deregistered earlier gives its lkey back to the provider, which may hand it to a
    /// later registration of other memory that a late message would then write.
    pub unsafe fn post_recv(&self, wr_id: u64, local: &LocalSlice<'_>) -> Result<()> {
        self.check_local(local, true, "RECV")?;
        let mut sge = local.sge();
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: if local.len == 0 { 0 } else { 1 },
        };
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` outlive the call; the range lies in a
        // registered, locally writable MR of this PD (checked above).
        unsafe { result::qp::post_recv(self.qp.as_ptr(), &mut wr, &mut bad, "ibv_post_recv") }
    }
}

/// What a send-queue work request in a post list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// RDMA WRITE of the local slice to the remote slice (lengths equal).
    Write(RemoteSlice),
    /// RDMA WRITE with immediate: the peer also gets a receive completion with the value.
    WriteImm(RemoteSlice, u32),
    /// RDMA READ of the remote slice into the local one (which needs LOCAL_WRITE).
    Read(RemoteSlice),
    /// SEND of the local slice, with immediate data if given.
    Send(Option<u32>),
}

/// One work request of a [`QueuePair::post_send_list`].
#[derive(Debug, Clone, Copy)]
pub struct SendWr<'a> {
    /// Its id, returned in its completion.
    pub wr_id: u64,
    /// What it does.
    pub op: SendOp,
    /// The local memory it reads or writes.
    pub local: LocalSlice<'a>,
    /// Its flags (only signaled requests complete on success).
    pub flags: SendFlags,
}

/// A post list that the provider took only in part: the first `posted` requests were posted
/// (and complete as usual, or flush), the rest were not.
#[derive(Debug, thiserror::Error)]
#[error("{posted} work requests of the list were posted, the rest were not: {error}")]
pub struct PostListError {
    /// How many of the list's requests were posted.
    pub posted: usize,
    /// Why the next one was not.
    #[source]
    pub error: Error,
}

impl QueuePair {
    /// Posts `wrs` as one chained list (one `ibv_post_send`, one doorbell). Every request is
    /// checked first (protection domain, rights, lengths, inline limit): a bad one posts
    /// nothing. If the provider refuses one part-way (a full send queue: ENOMEM), the error
    /// says how many went.
    ///
    /// # Safety
    /// As [`post_read`](Self::post_read) and [`post_write`](Self::post_write), for every
    /// request of the list that was posted: each local slice's memory region must stay
    /// registered until that request's completion (or a later one of the same send queue, which
    /// vouches for it) is reaped, or the queue pair is destroyed. (A READ writes its region; a
    /// WRITE or SEND reads it, and would send a later registration's bytes to the peer.)
    pub unsafe fn post_send_list(&self, wrs: &[SendWr<'_>]) -> std::result::Result<(), PostListError> {
        let none = |error| PostListError { posted: 0, error };
        if wrs.is_empty() {
            return Ok(());
        }
        for w in wrs {
            let (verb, needs_write) = match w.op {
                SendOp::Write(r) | SendOp::WriteImm(r, _) => {
                    check_same_len(&w.local, &r).map_err(none)?;
                    ("RDMA WRITE", false)
                }
                SendOp::Read(r) => {
                    check_same_len(&w.local, &r).map_err(none)?;
                    if w.flags.contains(SendFlags::INLINE) {
                        return Err(none(Error::InvalidArgument("RDMA READ cannot be inline".into())));
                    }
                    ("RDMA READ", true)
                }
                SendOp::Send(_) => ("SEND", false),
            };
            self.check_local(&w.local, needs_write, verb).map_err(none)?;
            self.check_inline(&w.local, w.flags).map_err(none)?;
        }
        // Short lists (a transfer's usual one or two requests) are built on the stack: no
        // allocation per post.
        const ON_STACK: usize = 4;
        // SAFETY: ibv_sge and ibv_send_wr are plain old data; zeroed is a valid empty entry.
        let (mut sge_arr, mut raw_arr): ([sys::ibv_sge; ON_STACK], [sys::ibv_send_wr; ON_STACK]) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        let (mut sge_vec, mut raw_vec);
        let (sges, raw): (&mut [sys::ibv_sge], &mut [sys::ibv_send_wr]) = if wrs.len() <= ON_STACK {
            (&mut sge_arr[..wrs.len()], &mut raw_arr[..wrs.len()])
        } else {
            sge_vec = vec![sge_arr[0]; wrs.len()];
            // SAFETY: as above.
            raw_vec = (0..wrs.len()).map(|_| unsafe { std::mem::zeroed() }).collect::<Vec<sys::ibv_send_wr>>();
            (&mut sge_vec[..], &mut raw_vec[..])
        };
        for (s, w) in sges.iter_mut().zip(wrs) {
            *s = w.local.sge();
        }
        for (w, r) in wrs.iter().zip(raw.iter_mut()) {
            r.wr_id = w.wr_id;
            r.num_sge = if w.local.len == 0 { 0 } else { 1 };
            r.send_flags = w.flags.bits();
            let (opcode, remote, imm) = match w.op {
                SendOp::Write(rs) => (sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE, Some(rs), None),
                SendOp::WriteImm(rs, imm) => (sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM, Some(rs), Some(imm)),
                SendOp::Read(rs) => (sys::ibv_wr_opcode::IBV_WR_RDMA_READ, Some(rs), None),
                SendOp::Send(None) => (sys::ibv_wr_opcode::IBV_WR_SEND, None, None),
                SendOp::Send(Some(imm)) => (sys::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM, None, Some(imm)),
            };
            r.opcode = opcode;
            if let Some(imm) = imm {
                r.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
            }
            if let Some(rs) = remote {
                r.wr.rdma = sys::rdma_t { remote_addr: rs.addr, rkey: rs.rkey };
            }
        }
        // Linked last, through pointers taken after the last use of `sges` and `raw` as
        // references: neither is reborrowed (nor moved) until the post has returned.
        let sge_base = sges.as_mut_ptr();
        let base = raw.as_mut_ptr();
        for i in 0..wrs.len() {
            // SAFETY: `i < len`, and `i + 1 < len` where it is added: pointers into the two
            // slices of `len` entries, derived after their last use as references (above).
            unsafe {
                (*base.add(i)).sg_list = sge_base.add(i);
                (*base.add(i)).next = if i + 1 < wrs.len() { base.add(i + 1) } else { std::ptr::null_mut() };
            }
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; the chained requests and their scatter entries outlive the
        // call (the provider copies them into the send queue); every local range lies in a
        // registered MR of this QP's PD with the rights its op needs (checked above).
        match unsafe { result::qp::post_send(self.qp.as_ptr(), base, &mut bad, "ibv_post_send (a list)") } {
            Ok(()) => Ok(()),
            Err(error) => {
                // `bad` is the first request not posted; those before it were. A `bad` that is
                // not in the list (null, or a provider's mistake) is taken as "all posted": the
                // safe direction, since a request counted as posted is waited for.
                let posted = raw.iter().position(|w| std::ptr::eq(w, bad)).unwrap_or(raw.len());
                Err(PostListError { posted, error })
            }
        }
    }

    /// Posts receives into `locals` (each needs LOCAL_WRITE), with ids `first_id`,
    /// `first_id + 1`, …, as one chained list. A bad slice posts nothing; a refusal part-way
    /// says how many went.
    ///
    /// # Safety
    /// As [`post_recv`](Self::post_recv), for every receive that was posted.
    pub unsafe fn post_recv_list(
        &self,
        first_id: u64,
        locals: &[LocalSlice<'_>],
    ) -> std::result::Result<(), PostListError> {
        for l in locals {
            self.check_local(l, true, "RECV").map_err(|error| PostListError { posted: 0, error })?;
        }
        if locals.is_empty() {
            return Ok(());
        }
        let mut list = RecvList::new(first_id, locals);
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; the list and its scatter entries outlive the call; every
        // range lies in a registered, locally writable MR of this PD (checked above).
        unsafe { result::qp::post_recv(self.qp.as_ptr(), list.head(), &mut bad, "ibv_post_recv (a list)") }
            .map_err(|error| list.partial(bad, error))
    }
}

/// A chained list of receive work requests, one scatter entry each (for the QP's and the
/// SRQ's post lists).
pub(crate) struct RecvList {
    /// Pointed to by the requests' `sg_list` (a vector's heap buffer does not move).
    _sges: Vec<sys::ibv_sge>,
    wrs: Vec<sys::ibv_recv_wr>,
}

impl RecvList {
    /// Receives into `locals` with ids `first_id`, `first_id + 1`, …, chained in order.
    pub(crate) fn new(first_id: u64, locals: &[LocalSlice<'_>]) -> Self {
        let mut sges: Vec<sys::ibv_sge> = locals.iter().map(|l| l.sge()).collect();
        let mut wrs: Vec<sys::ibv_recv_wr> = locals
            .iter()
            .zip(sges.iter_mut())
            .enumerate()
            .map(|(i, (l, sge))| sys::ibv_recv_wr {
                wr_id: first_id.wrapping_add(i as u64),
                next: std::ptr::null_mut(),
                sg_list: sge,
                num_sge: if l.len == 0 { 0 } else { 1 },
            })
            .collect();
        let base = wrs.as_mut_ptr();
        let n = wrs.len();
        for (i, r) in wrs.iter_mut().enumerate().take(n.saturating_sub(1)) {
            // SAFETY: `i + 1 < n`: an element of the same vector, which is never resized.
            r.next = unsafe { base.add(i + 1) };
        }
        RecvList { _sges: sges, wrs }
    }

    /// The first request (null for an empty list).
    pub(crate) fn head(&mut self) -> *mut sys::ibv_recv_wr {
        if self.wrs.is_empty() {
            std::ptr::null_mut()
        } else {
            self.wrs.as_mut_ptr()
        }
    }

    /// The error for a post that stopped at `bad` (the first request not posted).
    pub(crate) fn partial(&self, bad: *mut sys::ibv_recv_wr, error: Error) -> PostListError {
        // Not in the list (null, or a provider's mistake): taken as all posted, the safe
        // direction (what is counted as posted is waited for).
        let posted = self.wrs.iter().position(|w| std::ptr::eq(w, bad)).unwrap_or(self.wrs.len());
        PostListError { posted, error }
    }
}

impl QueuePair {
    /// Binds `mw` over `offset..offset+len` of `mr` with the remote rights in `access`
    /// (`IBV_WR_BIND_MW`, signaled, with `wr_id`), and returns the rkey the bind gives. The key
    /// works once the bind's completion has been reaped with success (then call
    /// [`bind_completed`](Self::bind_completed)); it reaches exactly that range, and only over
    /// this queue pair.
    ///
    /// The region needs [`AccessFlags::MW_BIND`]; REMOTE_WRITE and REMOTE_ATOMIC windows need
    /// its LOCAL_WRITE.
    ///
    /// # Safety
    /// The window must be deallocated (which revokes its key at the NIC) before `mr` is
    /// deregistered or dropped: a peer reaches `mr`'s memory through it until then.
    pub unsafe fn post_bind_mw<B>(
        &self,
        wr_id: u64,
        mw: &MemoryWindow,
        mr: &MemoryRegion<B>,
        offset: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<u32> {
        if !Arc::ptr_eq(&mr.pd().inner, &self.pd) {
            return Err(Error::InvalidArgument(
                "memory window bind: the region belongs to another protection domain than the QP".into(),
            ));
        }
        if !mw.in_pd(mr.pd()) {
            return Err(Error::InvalidArgument(
                "memory window bind: the window belongs to another protection domain than the region".into(),
            ));
        }
        if !mr.access().contains(AccessFlags::MW_BIND) {
            return Err(Error::InvalidArgument("memory window bind: the region was registered without MW_BIND".into()));
        }
        if access.intersects(AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_ATOMIC)
            && !mr.access().contains(AccessFlags::LOCAL_WRITE)
        {
            return Err(Error::InvalidArgument(
                "memory window bind: remote write or atomic rights need the region's LOCAL_WRITE".into(),
            ));
        }
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > mr.len()) {
            return Err(Error::OutOfBounds { what: "memory window bind", offset, length: len as usize, len: mr.len() });
        }
        let remote = access & AccessFlags::REMOTE_ANY;
        let rkey = mw.next_rkey();
        // SAFETY: ibv_send_wr is plain old data; zeroed is a valid empty request.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.send_flags = SendFlags::SIGNALED.bits();
        wr.bind_mw_tso_union.bind_mw = sys::bind_mw_t {
            mw: mw.as_raw(),
            rkey,
            bind_info: sys::ibv_mw_bind_info {
                mr: mr.as_raw(),
                addr: mr.addr() + offset,
                length: len,
                mw_access_flags: remote.bits(),
            },
        };
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP, window and region are live and of one PD (checked); `wr` outlives the
        // call; the caller keeps the region registered while the window may be bound.
        unsafe { result::qp::post_send(self.qp.as_ptr(), &mut wr, &mut bad, "ibv_post_send (IBV_WR_BIND_MW)") }?;
        Ok(rkey)
    }

    /// Records that the bind posted by [`post_bind_mw`](Self::post_bind_mw) completed with
    /// success, so that `mw.rkey()` is its key.
    pub fn bind_completed(&self, mw: &mut MemoryWindow, rkey: u32) {
        mw.set_rkey(rkey);
    }

    /// Moves the QP to the error state (`ibv_modify_qp(IBV_QPS_ERR)`): every outstanding work
    /// request completes with `IBV_WC_WR_FLUSH_ERR`, and the NIC stops touching their buffers.
    pub fn set_error(&self) -> Result<()> {
        // SAFETY: plain old data; only the state is read (mask IBV_QP_STATE).
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        // SAFETY: the QP is live; `attr` is valid for the call.
        unsafe {
            result::qp::modify_qp(
                self.qp.as_ptr(),
                &mut attr,
                sys::ibv_qp_attr_mask::IBV_QP_STATE,
                "ibv_modify_qp (to IBV_QPS_ERR)",
            )
        }
    }
}

fn check_same_len(local: &LocalSlice<'_>, remote: &RemoteSlice) -> Result<()> {
    if local.len != remote.len {
        return Err(Error::InvalidArgument(format!(
            "local slice of {} bytes and remote slice of {} bytes differ",
            local.len, remote.len
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_flag_bits_are_rdma_cores() {
        // The values of rdma-core's verbs.h, which the flags take from the bindings.
        assert_eq!(SendFlags::FENCE.bits(), 1);
        assert_eq!(SendFlags::SIGNALED.bits(), 2);
        assert_eq!(SendFlags::SOLICITED.bits(), 4);
        assert_eq!(SendFlags::INLINE.bits(), 8);
    }
}
