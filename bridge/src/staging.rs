//! The bounce registrations' staging copies: peers reach a bounce registration's staging
//! buffer, and these copies carry bytes between it and the memory it stands for.
//! [`Bridge::sync_to_peers`] (memory -> staging, before peers READ) and [`Bridge::sync_from_peers`]
//! (staging -> memory, after peers WROTE) are the user's; SEND and RECV on a bounce
//! registration copy through them too.

use p2pbridge_gpu::{FlushOutcome, MemoryBackend};
use p2pbridge_verbs::VolatileSlice;

use crate::bridge::Bridge;
use crate::error::{Error, Result};
use crate::registration::{Live, Registered, Registration};

impl Bridge {
    /// Makes what peers wrote into `reg` visible to its memory's owner: bounce registrations
    /// copy staging -> memory; device memory gets the backend's NIC-write flush.
    pub fn sync_from_peers(&self, reg: &Registered) -> Result<FlushOutcome> {
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
    pub fn sync_to_peers(&self, reg: &Registered) -> Result<()> {
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
pub(crate) fn bounce_parts<'a>(
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
pub(crate) fn stage_in(reg: &Registration, live: &Live, addr: u64, at: u64, len: u64) -> Result<()> {
    let Some((staging, b)) = bounce_parts(reg, live)? else { return Ok(()) };
    let n = checked_len(at, len, staging.len() as u64)?;
    same_allocation(reg, b, addr, len)?;
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
pub(crate) fn stage_out(reg: &Registration, live: &Live, addr: u64, at: u64, len: u64) -> Result<()> {
    let Some((staging, b)) = bounce_parts(reg, live)? else { return Ok(()) };
    let n = checked_len(at, len, staging.len() as u64)?;
    same_allocation(reg, b, addr, len)?;
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

/// A second guard before a staging copy: `addr..addr+len` is still the allocation `reg` was
/// registered over. (The first is that only memory whose frees wait for the registration's
/// hold is registered safely; memory of `register_foreign` relies on its caller's
/// `report_free`, and this check catches a free that was never reported once its addresses
/// are reused.)
pub(crate) fn same_allocation(reg: &Registration, b: &dyn MemoryBackend, addr: u64, len: u64) -> Result<()> {
    let ok = match (reg.alloc(), b.identify(addr)?) {
        (Some(key), Some(info)) => info.key == key && addr >= info.base && addr - info.base + len <= info.len,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::NotTheRegisteredMemory { addr })
    }
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
