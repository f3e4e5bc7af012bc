//! The pipelined bounce-buffer engine: moves a large transfer through a ring of registered
//! host staging buffers in chunks, overlapping the backend copy of one chunk with the RDMA of
//! the chunks before it.
//!
//! - WRITE (memory -> remote): copy chunk *i* into a free slot while chunks *i-1, i-2, ...*
//!   are on the wire; a slot is reused once its WRITE has completed.
//! - READ (remote -> memory): up to `ring` READs are in flight; as each completes (in order,
//!   as an RC send queue completes), its slot is copied out and refilled with the next READ.
//!
//! Chunk size and ring depth are tunable ([`BounceConfig`]). The staging buffers are
//! registered once, when the engine is made.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use p2pbridge_gpu::MemoryBackend;
use p2pbridge_verbs::{
    AccessFlags, CompletionQueue, Connection, HostBuffer, MemoryRegion, ProtectionDomain, RemoteSlice, SendFlags,
};

use crate::completion::{next_wr_id, FLUSH_WAIT};
use crate::error::{Error, Result};
use crate::key::RemoteKey;

/// Chunking of the engine.
#[derive(Debug, Clone, Copy)]
pub struct BounceConfig {
    /// Bytes per chunk (one work request each).
    pub chunk: usize,
    /// Staging buffers in the ring (chunks in flight at most).
    pub ring: usize,
    /// How long to wait for one completion.
    pub timeout: Duration,
}

impl Default for BounceConfig {
    fn default() -> Self {
        BounceConfig { chunk: 1 << 20, ring: 4, timeout: Duration::from_secs(30) }
    }
}

/// A ring of registered staging buffers serving one backend's memory on one PD.
///
/// Transfers take `&mut self`: the slots belong to one transfer at a time, so two callers can
/// never stage into the same slot. A transfer that fails part-way returns only after every
/// chunk it posted has completed or been flushed (its queue pair moved to the error state), so
/// the next transfer never reuses a slot the NIC still reads or writes. If even the flush does
/// not come, the slots are leaked — never reused or freed — and the engine refuses further
/// work with [`Error::DeviceStuck`].
pub struct BounceEngine {
    slots: Vec<MemoryRegion<HostBuffer>>,
    backend: Arc<dyn MemoryBackend>,
    cfg: BounceConfig,
    /// Set when a device did not flush: the slots were given up.
    stuck: bool,
}

impl std::fmt::Debug for BounceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BounceEngine").field("cfg", &self.cfg).field("stuck", &self.stuck).finish()
    }
}

/// The work requests one transfer has posted and not yet reaped, oldest first: (id, slot,
/// chunk).
type InFlight = VecDeque<(u64, usize, usize)>;

impl BounceEngine {
    /// Registers `cfg.ring` staging buffers of `cfg.chunk` bytes on `pd` for `backend`.
    pub fn new(pd: &ProtectionDomain, backend: Arc<dyn MemoryBackend>, cfg: BounceConfig) -> Result<Self> {
        if cfg.chunk == 0 || cfg.ring == 0 {
            return Err(Error::InvalidArgument("bounce chunk size and ring depth must be positive".into()));
        }
        if cfg.chunk > u32::MAX as usize {
            return Err(Error::InvalidArgument("a bounce chunk is at most 4 GiB - 1".into()));
        }
        let slots = (0..cfg.ring)
            .map(|_| pd.register(HostBuffer::new(cfg.chunk)?, AccessFlags::LOCAL_WRITE))
            .collect::<p2pbridge_verbs::Result<Vec<_>>>()?;
        Ok(BounceEngine { slots, backend, cfg, stuck: false })
    }

    /// Its configuration.
    pub fn config(&self) -> BounceConfig {
        self.cfg
    }

    fn chunks(&self, len: u64) -> impl Iterator<Item = (u64, usize)> + 'static {
        let c = self.cfg.chunk as u64;
        (0..len.div_ceil(c)).map(move |i| (i * c, (len - i * c).min(c) as usize))
    }

    fn usable(&self) -> Result<()> {
        if self.stuck {
            return Err(Error::DeviceStuck { what: "an earlier bounce transfer (its staging slots were given up)" });
        }
        Ok(())
    }

    /// Ends a transfer: on success nothing is in flight; on failure the QP is moved to the
    /// error state and every request still in flight is reaped (completed or flushed) before
    /// the error is returned. A device that does not flush costs the slots (leaked).
    fn settle(&mut self, conn: &Connection, inflight: &mut InFlight, r: Result<()>) -> Result<()> {
        if inflight.is_empty() {
            return r;
        }
        let err = r.err().unwrap_or(Error::InvalidArgument("bounce transfer ended with work in flight".into()));
        let cq = conn.send_cq();
        let mut flushed = conn.qp().set_error().is_ok();
        for (id, _, _) in inflight.drain(..) {
            // An id given up stays marked awaited: nobody else takes its completion if it comes.
            if flushed
                && matches!(cq.wait_wr(id, FLUSH_WAIT), Ok(_) | Err(p2pbridge_verbs::Error::WorkCompletion { .. }))
            {
                cq.unexpect(id);
            } else {
                // Not reaped (no flush, or polling failed): the NIC may still use the slot.
                flushed = false;
            }
        }
        if !flushed {
            // The NIC may still read or write the slots: give them up for ever.
            self.stuck = true;
            std::mem::take(&mut self.slots).into_iter().for_each(std::mem::forget);
            return Err(Error::DeviceStuck { what: "a bounce transfer" });
        }
        Err(err)
    }

    /// Copies `len` bytes of backend memory at `addr` to `remote` at `remote_offset` by RDMA
    /// WRITE, pipelined through the ring; returns when every chunk has completed.
    ///
    /// # Safety
    /// `addr..addr+len` must be memory of the engine's backend that is not freed during the
    /// call (hold its `DeviceBuffer`, or a [`Registered`](crate::Registered) of it).
    pub unsafe fn write(
        &mut self,
        conn: &Connection,
        addr: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.write_many(conn, &[Piece { addr, len, remote, remote_offset }]) }.map_err(|(_, e)| e)
    }

    /// Copies each piece's memory to its remote range by RDMA WRITE, all pieces' chunks
    /// pipelined through one ring (as many in flight as the ring has slots); returns when every
    /// chunk has completed. On failure, the error comes with how many pieces (from the first)
    /// had fully completed.
    ///
    /// # Safety
    /// As [`write`](Self::write), for every piece.
    pub unsafe fn write_many(
        &mut self,
        conn: &Connection,
        pieces: &[Piece<'_>],
    ) -> std::result::Result<(), (usize, Error)> {
        let chunks = self.plan(pieces).map_err(|e| (0, e))?;
        let mut inflight = InFlight::new();
        let mut done = 0;
        // SAFETY: forwarded from the caller.
        let r = unsafe { self.write_chunks(conn, &chunks, &mut inflight, &mut done) };
        self.settle(conn, &mut inflight, r).map_err(|e| (done, e))
    }

    /// Every piece's chunks, in order: (piece, memory address, remote slice, length).
    fn plan(&self, pieces: &[Piece<'_>]) -> Result<Vec<Chunk>> {
        self.usable()?;
        let mut chunks = Vec::new();
        for (p, piece) in pieces.iter().enumerate() {
            piece.remote.slice(piece.remote_offset, piece.len)?;
            for (off, n) in self.chunks(piece.len) {
                let rs = piece.remote.slice(piece.remote_offset + off, n as u64)?;
                chunks.push(Chunk {
                    piece: p,
                    addr: piece.addr + off,
                    remote: rs,
                    len: n,
                    last: off + n as u64 == piece.len,
                });
            }
        }
        Ok(chunks)
    }

    /// # Safety
    /// As [`write`](Self::write).
    unsafe fn write_chunks(
        &self,
        conn: &Connection,
        chunks: &[Chunk],
        inflight: &mut InFlight,
        done: &mut usize,
    ) -> Result<()> {
        let cq = conn.send_cq();
        for (i, c) in chunks.iter().enumerate() {
            let slot = i % self.slots.len();
            if inflight.len() == self.slots.len() {
                reap_front(cq, inflight, self.cfg.timeout, chunks, done)?;
            }
            let mr = &self.slots[slot];
            // SAFETY: the slot's WRITE has completed (or it was never used), and `&mut self`
            // keeps every other transfer off it, so neither the NIC nor another thread reads
            // it now; `len <= chunk`, the slot's size. The source is the caller's contract.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(mr.raw_ptr(), c.len);
                self.backend.copy_from_addr(c.addr, dst)?;
            }
            let local = mr.slice(..c.len as u64)?;
            let id = next_wr_id();
            cq.expect(id);
            // SAFETY: as for the READs: the slot is the engine's own region, every WRITE posted
            // is reaped (or flushed) before the transfer returns, and where the device does
            // not flush the slots are leaked and the engine refuses further work.
            if let Err(e) = unsafe { conn.qp().post_write(id, &local, &c.remote, SendFlags::SIGNALED) } {
                cq.unexpect(id);
                return Err(e.into());
            }
            inflight.push_back((id, slot, i));
        }
        while !inflight.is_empty() {
            reap_front(cq, inflight, self.cfg.timeout, chunks, done)?;
        }
        Ok(())
    }

    /// Copies `len` bytes from `remote` at `remote_offset` into backend memory at `addr` by RDMA
    /// READ, pipelined through the ring; returns when every chunk is in place.
    ///
    /// # Safety
    /// As [`write`](Self::write); the memory is written.
    pub unsafe fn read(
        &mut self,
        conn: &Connection,
        addr: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.read_many(conn, &[Piece { addr, len, remote, remote_offset }]) }.map_err(|(_, e)| e)
    }

    /// Reads each piece's remote range into its memory by RDMA READ, all pieces' chunks
    /// pipelined through one ring; returns when every chunk is in place. On failure, the error
    /// comes with how many pieces (from the first) were fully in place.
    ///
    /// # Safety
    /// As [`write`](Self::write), for every piece; the memory is written.
    pub unsafe fn read_many(
        &mut self,
        conn: &Connection,
        pieces: &[Piece<'_>],
    ) -> std::result::Result<(), (usize, Error)> {
        let chunks = self.plan(pieces).map_err(|e| (0, e))?;
        let mut inflight = InFlight::new();
        let mut done = 0;
        // SAFETY: forwarded from the caller.
        let r = unsafe { self.read_chunks(conn, &chunks, &mut inflight, &mut done) };
        self.settle(conn, &mut inflight, r).map_err(|e| (done, e))
    }

    /// # Safety
    /// As [`read`](Self::read).
    unsafe fn read_chunks(
        &self,
        conn: &Connection,
        chunks: &[Chunk],
        inflight: &mut InFlight,
        done: &mut usize,
    ) -> Result<()> {
        let cq = conn.send_cq();
        let ring = self.slots.len();
        let post = |i: usize, inflight: &mut InFlight| -> Result<()> {
            let c = &chunks[i];
            let local = self.slots[i % ring].slice(..c.len as u64)?;
            let id = next_wr_id();
            cq.expect(id);
            // SAFETY: the slot is the engine's own region, deregistered only when the engine
            // goes; every READ posted here is reaped (or flushed) before the transfer returns,
            // and where the device does not flush the slots are leaked and the engine refuses
            // further work (`settle`), so no slot is deregistered under a request.
            if let Err(e) = unsafe { conn.qp().post_read(id, &local, &c.remote, SendFlags::SIGNALED) } {
                cq.unexpect(id);
                return Err(e.into());
            }
            inflight.push_back((id, i % ring, i));
            Ok(())
        };
        for i in 0..chunks.len().min(ring) {
            post(i, inflight)?;
        }
        for (i, c) in chunks.iter().enumerate() {
            // Counted done only once copied out (below): reap without counting.
            let slot = reap_front(cq, inflight, self.cfg.timeout, chunks, &mut 0)?;
            let mr = &self.slots[slot];
            // SAFETY: chunk i's READ has completed, so the NIC no longer writes the slot (it
            // has only local rights: no peer can), and `&mut self` keeps other transfers off
            // it; the destination is the caller's contract.
            unsafe {
                let src = std::slice::from_raw_parts(mr.raw_ptr(), c.len);
                self.backend.copy_to_addr(c.addr, src)?;
            }
            if c.last {
                *done = c.piece + 1;
            }
            if i + ring < chunks.len() {
                post(i + ring, inflight)?;
            }
        }
        Ok(())
    }
}

/// One piece of a [`BounceEngine::write_many`] or [`read_many`](BounceEngine::read_many):
/// `len` bytes of backend memory at `addr`, and the remote range at `remote_offset` of
/// `remote`.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// The backend memory's address.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
    /// The peer's key.
    pub remote: &'a RemoteKey,
    /// Where in the key's range.
    pub remote_offset: u64,
}

/// One chunk of a piece: one work request through one slot.
struct Chunk {
    piece: usize,
    addr: u64,
    remote: RemoteSlice,
    len: usize,
    /// The piece's last chunk.
    last: bool,
}

/// Reaps the oldest request in flight and returns its slot; a WRITE chunk that was its piece's
/// last completes the piece (`done`). A completion with an error status is reaped (out of
/// `inflight`) and returned as the error; on a timeout (or a failed poll) the request stays in
/// `inflight`, still the NIC's, for [`BounceEngine::settle`] to flush.
fn reap_front(
    cq: &CompletionQueue,
    inflight: &mut InFlight,
    timeout: Duration,
    chunks: &[Chunk],
    done: &mut usize,
) -> Result<usize> {
    let &(id, slot, i) = inflight.front().ok_or_else(|| Error::InvalidArgument("no bounce chunk in flight".into()))?;
    // Busy: the ring keeps the wire busy, and a wake-up costs more than a chunk takes.
    match cq.wait_wr_busy(id, timeout) {
        // Reaped: completed, or failed with a status.
        r @ (Ok(_) | Err(p2pbridge_verbs::Error::WorkCompletion { .. })) => {
            inflight.pop_front();
            cq.unexpect(id);
            r?;
            if chunks[i].last {
                *done = chunks[i].piece + 1;
            }
            Ok(slot)
        }
        // A timeout, or polling failed: still the NIC's, left for `settle` to flush.
        Err(e) => Err(e.into()),
    }
}
