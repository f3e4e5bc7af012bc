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
use p2pbridge_verbs::{AccessFlags, Connection, HostBuffer, MemoryRegion, ProtectionDomain, SendFlags};

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
pub struct BounceEngine {
    slots: Vec<MemoryRegion<HostBuffer>>,
    backend: Arc<dyn MemoryBackend>,
    cfg: BounceConfig,
}

impl std::fmt::Debug for BounceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BounceEngine").field("cfg", &self.cfg).finish()
    }
}

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
        Ok(BounceEngine { slots, backend, cfg })
    }

    /// Its configuration.
    pub fn config(&self) -> BounceConfig {
        self.cfg
    }

    fn chunks(&self, len: u64) -> impl Iterator<Item = (u64, usize)> + '_ {
        let c = self.cfg.chunk as u64;
        (0..len.div_ceil(c)).map(move |i| (i * c, (len - i * c).min(c) as usize))
    }

    /// Copies `len` bytes of backend memory at `addr` to `remote` at `remote_offset` by RDMA
    /// WRITE, pipelined through the ring; returns when every chunk has completed.
    ///
    /// # Safety
    /// `addr..addr+len` must be memory of the engine's backend that is not freed during the
    /// call (hold its `DeviceBuffer`, or a [`Registered`](crate::Registered) of it).
    pub unsafe fn write(
        &self,
        conn: &Connection,
        addr: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        remote.slice(remote_offset, len)?;
        let mut inflight: VecDeque<usize> = VecDeque::new();
        for (i, (off, n)) in self.chunks(len).enumerate() {
            let slot = i % self.slots.len();
            if inflight.len() == self.slots.len() {
                conn.send_cq().wait_one(self.cfg.timeout)?;
                inflight.pop_front();
            }
            let mr = &self.slots[slot];
            // SAFETY: the slot's WRITE has completed (or it was never used), so the NIC does
            // not read it now; `n <= chunk`, the slot's size. The source is the caller's
            // contract.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(mr.raw_ptr(), n);
                self.backend.copy_from_addr(addr + off, dst)?;
            }
            let rs = remote.slice(remote_offset + off, n as u64)?;
            conn.qp().post_write(i as u64, &mr.slice(..n as u64)?, &rs, SendFlags::SIGNALED)?;
            inflight.push_back(slot);
        }
        while inflight.pop_front().is_some() {
            conn.send_cq().wait_one(self.cfg.timeout)?;
        }
        Ok(())
    }

    /// Copies `len` bytes from `remote` at `remote_offset` into backend memory at `addr` by RDMA
    /// READ, pipelined through the ring; returns when every chunk is in place.
    ///
    /// # Safety
    /// As [`write`](Self::write); the memory is written.
    pub unsafe fn read(
        &self,
        conn: &Connection,
        addr: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        remote.slice(remote_offset, len)?;
        let chunks: Vec<(u64, usize)> = self.chunks(len).collect();
        let ring = self.slots.len();
        let post = |i: usize| -> Result<()> {
            let (off, n) = chunks[i];
            let rs = remote.slice(remote_offset + off, n as u64)?;
            conn.qp().post_read(i as u64, &self.slots[i % ring].slice(..n as u64)?, &rs, SendFlags::SIGNALED)?;
            Ok(())
        };
        for i in 0..chunks.len().min(ring) {
            post(i)?;
        }
        for i in 0..chunks.len() {
            let wc = conn.send_cq().wait_one(self.cfg.timeout)?;
            debug_assert_eq!(wc.wr_id, i as u64, "RC completions come in order");
            let (off, n) = chunks[i];
            let mr = &self.slots[i % ring];
            // SAFETY: chunk i's READ has completed, so the NIC no longer writes the slot; the
            // destination is the caller's contract.
            unsafe {
                let src = std::slice::from_raw_parts(mr.raw_ptr(), n);
                self.backend.copy_to_addr(addr + off, src)?;
            }
            if i + ring < chunks.len() {
                post(i + ring)?;
            }
        }
        Ok(())
    }
}
