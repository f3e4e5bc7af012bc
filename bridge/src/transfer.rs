//! Transfers through a registration: RDMA WRITE, READ, SEND and RECV, each waiting for its own
//! completion (matched by a work-request id of its own, so threads sharing a connection never
//! take each other's completions), and the bounce copies around them.
//!
//! Each operation holds its registration live (read-locked) from before it posts until its
//! completion is reaped: the memory cannot be revoked — freed, unmapped — under it. A
//! completion that does not come within [`BridgeOptions::completion_timeout`] is not waited
//! past: the queue pair is moved to the error state, the request's flush is reaped, and only
//! then does the operation return its error. Nothing is released while the NIC may still use it.
//!
//! [`BridgeOptions::completion_timeout`]: crate::BridgeOptions::completion_timeout

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use p2pbridge_gpu::{FlushOutcome, MemoryBackend};
use p2pbridge_verbs::VolatileSlice;
use p2pbridge_verbs::{CompletionQueue, Connection, SendFlags, WorkCompletion};

use crate::bridge::Bridge;
use crate::error::{Error, Result};
use crate::key::RemoteKey;
use crate::registration::{Live, Registered, Registration};

/// Work-request ids of the bridge's own requests: the top bit set, so that they do not meet
/// the small ids applications number their own requests with.
static NEXT_WR_ID: AtomicU64 = AtomicU64::new(1 << 63);

pub(crate) fn next_wr_id() -> u64 {
    NEXT_WR_ID.fetch_add(1, Ordering::Relaxed)
}

/// How long a flushed request's completion may take once its QP is in the error state.
pub(crate) const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// How often a wait for a completion looks at the connection's events (peer gone, device
/// removed, port down): a lost connection fails its operations within this, plus the flush.
const FAULT_POLL: Duration = Duration::from_millis(100);

/// Waits for the completion of `wr_id` on `cq` (of `conn`). If it does not come within
/// `timeout`, or the connection is lost meanwhile ([`Connection::fault`]), moves the QP to the
/// error state and reaps the flush before returning [`Error::CompletionTimeout`] or the
/// connection's loss (`Verbs(ConnectionLost { cause })`); [`Error::DeviceStuck`] if even the
/// flush does not come. Nothing the request names is let go while the NIC may still use it.
pub(crate) fn reap_on(
    conn: &Connection,
    cq: &CompletionQueue,
    wr_id: u64,
    timeout: Duration,
    what: &'static str,
) -> Result<WorkCompletion> {
    let start = std::time::Instant::now();
    let lost = loop {
        let left = timeout.saturating_sub(start.elapsed());
        match cq.wait_wr(wr_id, left.min(FAULT_POLL)) {
            Err(p2pbridge_verbs::Error::Timeout(..)) => {
                if let Some(cause) = conn.fault() {
                    break Some(cause);
                }
                if start.elapsed() >= timeout {
                    break None;
                }
            }
            Err(e @ p2pbridge_verbs::Error::WorkCompletion { .. }) => {
                // The request is done (failed), and an RC queue pair is in the error state now.
                // If the connection went, its event follows the failure closely (a dead peer's
                // memory goes before its rdma_cm id): say that, not just the status.
                return Err(match lost_within(conn, ATTRIBUTE_WAIT) {
                    Some(cause) => p2pbridge_verbs::Error::ConnectionLost { cause }.into(),
                    None => e.into(),
                });
            }
            Ok(wc) => return Ok(wc),
            // Polling itself failed: the request may still be outstanding. Drain it as on a
            // timeout (below) before anything it names is let go.
            Err(_) => break conn.fault(),
        }
    };
    if conn.qp().set_error().is_err() {
        return Err(Error::DeviceStuck { what });
    }
    match cq.wait_wr(wr_id, FLUSH_WAIT) {
        Ok(_) | Err(p2pbridge_verbs::Error::WorkCompletion { .. }) => match lost {
            Some(cause) => Err(p2pbridge_verbs::Error::ConnectionLost { cause }.into()),
            None => Err(Error::CompletionTimeout { what, timeout }),
        },
        // Not reaped (no flush within FLUSH_WAIT, or polling failed): the NIC may still use it.
        Err(_) => Err(Error::DeviceStuck { what }),
    }
}

/// How long a failed completion waits for the connection's loss to show, to name it as the
/// cause. Only the error's wording depends on it: the request is already complete.
const ATTRIBUTE_WAIT: Duration = Duration::from_millis(250);

/// The connection's loss, if it shows within `wait`.
fn lost_within(conn: &Connection, wait: Duration) -> Option<p2pbridge_verbs::Fault> {
    let start = std::time::Instant::now();
    loop {
        if let Some(cause) = conn.fault() {
            return Some(cause);
        }
        if start.elapsed() >= wait {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Refuses to post on a connection known to be lost (its QP is moved to the error state).
pub(crate) fn check_connection(conn: &Connection) -> Result<()> {
    match conn.fault() {
        Some(cause) => {
            let _ = conn.qp().set_error();
            Err(p2pbridge_verbs::Error::ConnectionLost { cause }.into())
        }
        None => Ok(()),
    }
}

/// [`reap_on`] for the send queue.
pub(crate) fn reap(conn: &Connection, wr_id: u64, timeout: Duration) -> Result<WorkCompletion> {
    reap_on(conn, conn.send_cq(), wr_id, timeout, "a memory window bind")
}

impl Bridge {
    /// Reaps `wr_id`; a device that does not even flush keeps the registration's region
    /// registered for ever (leaked), since the NIC may still use it.
    fn finish(
        &self,
        reg: &Registration,
        conn: &Connection,
        cq: &CompletionQueue,
        wr_id: u64,
        timeout: Duration,
        what: &'static str,
    ) -> Result<WorkCompletion> {
        let r = reap_on(conn, cq, wr_id, timeout, what);
        if matches!(r, Err(Error::DeviceStuck { .. })) {
            reg.pin_forever();
        }
        r
    }

    /// Runs `op` on `len` bytes at `offset` of `local` with its registration held live (and,
    /// for bounce registrations, its staging lock held): `op` gets the live state and the
    /// offset in the registration, posts with the id it is given, and this reaps that id's
    /// completion on `cq` before anything is let go.
    #[allow(clippy::too_many_arguments)]
    fn held<R>(
        &self,
        conn: &Connection,
        cq: &CompletionQueue,
        timeout: Duration,
        what: &'static str,
        local: &Registered,
        offset: u64,
        len: u64,
        op: impl FnOnce(&Registration, &Live, u64, u64) -> Result<()>,
        after: impl FnOnce(&Registration, &Live, u64, WorkCompletion) -> Result<R>,
    ) -> Result<R> {
        let at = local.entry_range(offset, len)?;
        check_connection(conn)?;
        let reg = local.handle.value();
        let guard = reg.live()?;
        let live = guard.as_ref().ok_or(Error::Revoked)?;
        let _staging = live.bounce_lock();
        let id = next_wr_id();
        cq.expect(id);
        if let Err(e) = op(reg, live, at, id) {
            cq.unexpect(id);
            return Err(e);
        }
        let wc = self.finish(reg, conn, cq, id, timeout, what)?;
        after(reg, live, at, wc)
    }

    /// RDMA WRITE of `len` bytes at `offset` of `local` to `remote` at `remote_offset`, waiting
    /// for the completion. Bounce registrations copy memory -> staging first.
    pub fn write(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        let rs = remote.slice(remote_offset, len)?;
        let timeout = self.inner.core.completion_timeout;
        let op = |reg: &Registration, live: &Live, at, id| {
            let sl = live.mr.slice(at, len)?;
            stage_in(reg, live, local.addr + offset, at, len)?;
            Ok(conn.qp().post_write(id, &sl, &rs, SendFlags::SIGNALED)?)
        };
        self.held(conn, conn.send_cq(), timeout, "RDMA WRITE", local, offset, len, op, |_, _, _, _| Ok(()))
    }

    /// RDMA READ of `len` bytes from `remote` at `remote_offset` into `local` at `offset`,
    /// waiting for the completion. Bounce registrations copy staging -> memory after.
    pub fn read(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        remote: &RemoteKey,
        remote_offset: u64,
    ) -> Result<()> {
        let rs = remote.slice(remote_offset, len)?;
        let timeout = self.inner.core.completion_timeout;
        let op = |_: &Registration, live: &Live, at, id| {
            Ok(conn.qp().post_read(id, &live.mr.slice(at, len)?, &rs, SendFlags::SIGNALED)?)
        };
        let after = |reg: &Registration, live: &Live, at, _| stage_out(reg, live, local.addr + offset, at, len);
        self.held(conn, conn.send_cq(), timeout, "RDMA READ", local, offset, len, op, after)
    }

    /// SEND of `len` bytes at `offset` of `local` (with immediate data if given), waiting for
    /// the completion. The peer must have a receive posted ([`Bridge::recv`]).
    pub fn send(&self, conn: &Connection, local: &Registered, offset: u64, len: u64, imm: Option<u32>) -> Result<()> {
        let timeout = self.inner.core.completion_timeout;
        let op = |reg: &Registration, live: &Live, at, id| {
            let sl = live.mr.slice(at, len)?;
            stage_in(reg, live, local.addr + offset, at, len)?;
            Ok(conn.qp().post_send(id, &sl, imm, SendFlags::SIGNALED)?)
        };
        self.held(conn, conn.send_cq(), timeout, "SEND", local, offset, len, op, |_, _, _, _| Ok(()))
    }

    /// Posts a receive into `len` bytes at `offset` of `local` and waits up to `timeout` for a
    /// message; returns its length and immediate data. Bounce registrations copy staging ->
    /// memory after.
    ///
    /// If no message comes in time, the connection's queue pair is moved to the error state
    /// (so that the receive can no longer land in the buffer) before [`Error::CompletionTimeout`]
    /// is returned: the connection is then unusable.
    pub fn recv(
        &self,
        conn: &Connection,
        local: &Registered,
        offset: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<(u32, Option<u32>)> {
        let op = |_: &Registration, live: &Live, at, id| Ok(conn.qp().post_recv(id, &live.mr.slice(at, len)?)?);
        let after = |reg: &Registration, live: &Live, at, wc: WorkCompletion| {
            stage_out(reg, live, local.addr + offset, at, u64::from(wc.byte_len).min(len))?;
            Ok((wc.byte_len, wc.imm))
        };
        self.held(conn, conn.recv_cq(), timeout, "RECV", local, offset, len, op, after)
    }

    /// Makes what peers wrote into `reg` visible to its memory's owner: bounce registrations
    /// copy staging -> memory; device memory gets the backend's NIC-write flush.
    pub fn flush(&self, reg: &Registered) -> Result<FlushOutcome> {
        let r = reg.handle.value();
        let guard = r.live()?;
        let live = guard.as_ref().ok_or(Error::Revoked)?;
        if live.mr.staging().is_some() {
            let _staging = live.bounce_lock();
            stage_out(r, live, reg.addr, reg.entry_offset(), reg.len)?;
            return Ok(FlushOutcome::Flushed);
        }
        match &r.backend {
            Some(b) => Ok(b.flush_nic_writes()?),
            None => Ok(FlushOutcome::NotNeeded("host memory: a completion already orders the NIC's writes")),
        }
    }

    /// Before peers RDMA READ a bounce registration: copies memory -> staging. (No-op for
    /// direct registrations.)
    pub fn publish(&self, reg: &Registered) -> Result<()> {
        let r = reg.handle.value();
        let guard = r.live()?;
        let live = guard.as_ref().ok_or(Error::Revoked)?;
        let _staging = live.bounce_lock();
        stage_in(r, live, reg.addr, reg.entry_offset(), reg.len)
    }
}

/// Bounce copies go through a bounded temporary buffer, this many bytes at a time.
const STAGE_CHUNK: usize = 1 << 20;

/// The staging view and the backend of a bounce registration; `None` for direct ones.
fn bounce_parts<'a>(
    reg: &'a Registration,
    live: &'a Live,
) -> Result<Option<(VolatileSlice<'a>, &'a dyn MemoryBackend)>> {
    match (live.mr.staging(), &reg.backend) {
        (None, _) => Ok(None),
        (Some(staging), Some(b)) => Ok(Some((staging, b.as_ref()))),
        // Refused when registering (plain host memory has no backend to copy with): never a no-op.
        (Some(_), None) => Err(Error::InvalidArgument("a bounce registration without a backend to copy with".into())),
    }
}

/// For a bounce registration: copies `len` bytes of the memory at `addr` into its staging
/// buffer at `at` (no-op for direct registrations). `at..at+len` is within the registration
/// (checked by the caller, and again here against the staging buffer).
fn stage_in(reg: &Registration, live: &Live, addr: u64, at: u64, len: u64) -> Result<()> {
    let Some((staging, b)) = bounce_parts(reg, live)? else { return Ok(()) };
    let n = checked_len(at, len, staging.len() as u64)?;
    let mut tmp = vec![0u8; n.min(STAGE_CHUNK)];
    for done in (0..n).step_by(STAGE_CHUNK) {
        let k = (n - done).min(STAGE_CHUNK);
        // SAFETY: the caller holds the registration live, and the allocation's free revokes it
        // first (waiting for that hold), so the memory is valid for the copy.
        unsafe { b.copy_from_addr(addr + done as u64, &mut tmp[..k]) }?;
        // Through the volatile view: a peer holding a key may be writing these bytes.
        staging.subslice(at as usize + done, k).map_err(|_| oob(at, len, staging.len()))?.copy_from(&tmp[..k]);
    }
    Ok(())
}

/// For a bounce registration: copies `len` bytes of its staging buffer at `at` to the memory at
/// `addr` (no-op for direct registrations). Reads the staging bytes by copy, never through a
/// reference: a peer may be writing them.
fn stage_out(reg: &Registration, live: &Live, addr: u64, at: u64, len: u64) -> Result<()> {
    let Some((staging, b)) = bounce_parts(reg, live)? else { return Ok(()) };
    let n = checked_len(at, len, staging.len() as u64)?;
    let mut tmp = vec![0u8; n.min(STAGE_CHUNK)];
    for done in (0..n).step_by(STAGE_CHUNK) {
        let k = (n - done).min(STAGE_CHUNK);
        // A peer with a key may write the staging bytes at any time: they are whatever they
        // were when copied.
        staging.subslice(at as usize + done, k).map_err(|_| oob(at, len, staging.len()))?.copy_to(&mut tmp[..k]);
        // SAFETY: as in `stage_in`: the registration is held live, so the memory is.
        unsafe { b.copy_to_addr(addr + done as u64, &tmp[..k]) }?;
    }
    Ok(())
}

fn oob(offset: u64, len: u64, size: usize) -> Error {
    Error::OutOfBounds { offset, len, size: size as u64 }
}

fn checked_len(at: u64, len: u64, size: u64) -> Result<usize> {
    if at.checked_add(len).is_none_or(|e| e > size) {
        return Err(Error::OutOfBounds { offset: at, len, size });
    }
    usize::try_from(len).map_err(|_| Error::OutOfBounds { offset: at, len, size })
}
