//! The key ledger: keys handed to peers, checked, and revoked at the NIC.
//!
//! Where the device has type 2 memory windows ([`DeviceCaps::mw_type2`]), a registration's
//! memory region is made with local rights and `MW_BIND` only: the region's own rkey reaches
//! nothing. Each hand-out binds a window over exactly the handed-out range, on the queue pair
//! of the connection it is handed to. Its key therefore
//! - reaches that range only, whatever length the peer claims (the NIC checks the window);
//! - works on that connection only (a type 2 window belongs to one QP);
//! - dies at the NIC when the window is deallocated: when the registration is revoked (its
//!   memory freed, unmapped or invalidated), or by [`crate::Bridge::revoke_key`].
//!
//! Without windows the key is the rkey of a region registered over exactly the handed-out
//! range with exactly its rights (the registration's own region has no remote rights; a
//! dma-buf registration's own rkey is its key, handed out whole only, and dies only with the
//! registration); revoking the key, or the registration, deregisters its region, which kills
//! the key at the NIC.
//!
//! The ledger holds a handle on each registration with keys out, so that the cache never
//! evicts memory a peer was given; only an invalidation (the memory going) or
//! [`crate::Bridge::revoke_key`] ends them.
//!
//! [`DeviceCaps::mw_type2`]: p2pbridge_verbs::DeviceCaps

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2pbridge_verbs::{AccessFlags, Connection, HostBuffer, SendFlags};

use crate::bridge::Core;

use crate::cache::Handle;
use crate::completion::{next_wr_id, reap, reap_on, reaped_with};
use crate::error::{Error, Result};
use crate::key::RemoteKey;
use crate::registration::{Bound, Registered, Registration};

/// Keys handed out: (generation, rkey) -> the registration.
#[derive(Default)]
pub(crate) struct KeyLedger {
    handed: Mutex<HashMap<(u64, u32), Handle<Registration>>>,
    /// Window keys by the QP number of the connection they are bound on: revoked when it
    /// closes, through one close hook per connection (not one per key).
    by_conn: Mutex<HashMap<u32, Vec<RemoteKey>>>,
}

impl KeyLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u32), Handle<Registration>>> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `range` (offsets within `reg`) to the peer at the other end of `conn`, with the
    /// remote rights in `access`.
    pub(crate) fn hand_out(
        &self,
        owner: &Arc<Core>,
        conn: &Connection,
        reg: &Registered,
        range: Range<u64>,
        access: AccessFlags,
    ) -> Result<RemoteKey> {
        let (pd, timeout) = (&owner.pd, owner.completion_timeout);
        if range.start >= range.end {
            return Err(Error::InvalidArgument(format!(
                "cannot hand out the empty or reversed range {}..{}",
                range.start, range.end
            )));
        }
        let len = range.end - range.start;
        let at = reg.entry_range(range.start, len)?;
        let r = reg.handle.value();
        let guard = r.live()?;
        let live = guard.as_ref().ok_or(Error::Revoked)?;
        let rkey = if r.windowed() {
            let remote = access & AccessFlags::REMOTE_ANY;
            // Part of the region: bind over a region of exactly that part, so that providers
            // that bound a window's accesses by its region's range only (rxe) refuse the rest
            // too. Not for dma-buf regions (their memory has no mapping to register by
            // address): there the window's own range is what the NIC checks.
            let whole = at == 0 && len == live.mr.len();
            let region = if whole || r.strategy() == crate::Strategy::DmaBuf {
                None
            } else {
                // SAFETY: it is kept in the registration's window list, whose regions are
                // deregistered before the registration's own.
                Some(unsafe { live.mr.sub_region(at, len) }?)
            };
            // Held until the window is in the list: a revocation deallocates every window of
            // the list, and closes it to later ones, under this lock.
            let mut windows = r.windows();
            if windows.closed {
                return Err(Error::Revoked);
            }
            let mut mw = pd.alloc_mw()?;
            let wr_id = next_wr_id();
            conn.send_cq().expect(wr_id);
            // SAFETY: the window (and its region) go into the registration's list below
            // whatever happens after the post, and revocation deallocates every window of the
            // list before it deregisters any region.
            let posted = unsafe {
                match &region {
                    Some(sub) => conn.qp().post_bind_mw(wr_id, &mw, sub, 0, len, remote).map_err(Error::from),
                    None => live.mr.bind(conn, wr_id, &mw, at, len, remote),
                }
            };
            // Not posted: the window is bound to nothing (dropping it, and the region, is safe).
            let rkey = posted.inspect_err(|_| conn.send_cq().unexpect(wr_id))?;
            let done = reap(conn, wr_id, timeout);
            match &done {
                Ok(_) => conn.qp().bind_completed(&mut mw, rkey),
                // The bind may still happen: its window must never outlive the region under it.
                Err(Error::DeviceStuck { .. }) => r.pin_forever("a window bind the device never completed nor flushed"),
                Err(_) => {}
            }
            windows.list.push(Bound { mw, region });
            drop(windows);
            done?;
            rkey
        } else {
            // Without windows the key is a region's own rkey: a region over exactly this range
            // with exactly these rights (the cached registration may be larger, merged, and
            // hold more rights than this handle asked for), deregistered with the
            // registration, or by `revoke_key`. A dma-buf region has no address to register a
            // part of: its own key only where it is exactly that.
            let (remote, mr_remote) = (access & AccessFlags::REMOTE_ANY, live.mr.access() & AccessFlags::REMOTE_ANY);
            // A region of its own even for the whole registration: revoking the keys (a free,
            // an unmap) then kills it at once, before the registration's own region goes
            // (which waits for operations holding it).
            let whole = at == 0 && len == live.mr.len() && remote == mr_remote;
            if r.strategy() == crate::Strategy::DmaBuf && whole {
                live.mr.rkey()
            } else if r.strategy() == crate::Strategy::DmaBuf {
                return Err(Error::InvalidArgument(
                    "without memory windows a dma-buf registration's key reaches all of it with all its rights: hand out the whole registration, registered with exactly the rights to grant, or use a device with type 2 windows".into(),
                ));
            } else {
                let mut windows = r.windows();
                if windows.closed {
                    return Err(Error::Revoked);
                }
                // SAFETY: kept in the registration's list, deregistered (by revocation) before
                // the registration's own region.
                let exact = unsafe { live.mr.sub_region_with(at, len, AccessFlags::LOCAL_WRITE | remote) }?;
                let rkey = exact.rkey();
                windows.exact.push(exact);
                rkey
            }
        };
        let key = RemoteKey { addr: live.mr.addr() + at, len, rkey, generation: reg.generation() };
        drop(guard);
        let mut handed = self.lock();
        // Keys of revoked registrations are forgotten once the record grows, so that a process
        // that churns buffers does not grow it without bound (amortized O(1)).
        if handed.len() >= 64 && handed.len().is_power_of_two() {
            // (Keys of a leaked registration stay: one may still reach its memory.)
            handed.retain(|_, h| h.value().is_live() || h.value().leaked().is_some());
        }
        handed.insert((key.generation, key.rkey), reg.handle.clone());
        drop(handed);
        if r.windowed() {
            // A window is bound to the connection's QP, which cannot be destroyed while it is:
            // the key goes with the connection.
            let qpn = conn.qp().qp_num();
            let mut by_conn = self.by_conn.lock().unwrap_or_else(|e| e.into_inner());
            let first = !by_conn.contains_key(&qpn);
            let keys = by_conn.entry(qpn).or_default();
            // Keys revoked meanwhile are forgotten as the list grows (amortized O(1)).
            if keys.len() >= 64 && keys.len().is_power_of_two() {
                let handed = self.lock();
                keys.retain(|k| handed.contains_key(&(k.generation, k.rkey)));
            }
            keys.push(key);
            drop(by_conn);
            if first {
                let core = owner.clone();
                conn.on_close(move || core.keys.close_connection(qpn));
            }
        }
        Ok(key)
    }

    /// The connection with QP number `qpn` is closing: revokes every key bound on it.
    fn close_connection(&self, qpn: u32) {
        let keys = self.by_conn.lock().unwrap_or_else(|e| e.into_inner()).remove(&qpn).unwrap_or_default();
        for k in keys {
            let _ = self.revoke(&k);
        }
    }

    /// `Ok` while `key` (handed out by this ledger) still reaches its memory.
    pub(crate) fn check(&self, key: &RemoteKey) -> Result<()> {
        let id = (key.generation, key.rkey);
        // The ledger's lock is not held while the registration's locks are taken: a hand-out
        // holding those (a bind in progress) never stalls the ledger.
        let Some(h) = self.lock().get(&id).cloned() else {
            return Err(Error::StaleKey {
                generation: key.generation,
                why: "not a key this bridge handed out, or one revoked and forgotten since",
            });
        };
        let r = h.value();
        let live = match r.live() {
            Ok(g) => g.as_ref().is_some_and(|l| {
                let w = r.windows();
                w.failed.contains(&key.rkey)
                    || w.list.iter().any(|b| b.mw.rkey() == key.rkey)
                    || w.exact.iter().any(|m| m.rkey() == key.rkey)
                    || (!r.windowed() && r.strategy() == crate::Strategy::DmaBuf && l.mr.rkey() == key.rkey)
            }),
            // Revoked, but a key whose window (or region) could not be deallocated still
            // reaches the memory.
            Err(_) => r.windows().failed.contains(&key.rkey),
        };
        if live {
            return Ok(());
        }
        self.lock().remove(&id);
        Err(Error::StaleKey {
            generation: key.generation,
            why: "its registration was revoked (memory freed, unmapped or invalidated) or the key itself was",
        })
    }

    /// Revokes one key at the NIC (its window deallocated, or its own region deregistered) and
    /// forgets it.
    pub(crate) fn revoke(&self, key: &RemoteKey) -> Result<()> {
        let id = (key.generation, key.rkey);
        let Some(h) = self.lock().get(&id).cloned() else {
            return Err(Error::StaleKey { generation: key.generation, why: "not a live key of this bridge" });
        };
        let r = h.value();
        // Everything under the windows' lock, which a revocation's teardown takes too: a
        // revocation under way has either revoked this key already (the lists are emptied, and
        // closed, under this lock) or waits until this is done, leak included.
        let mut w = r.windows();
        if w.failed.contains(&key.rkey) {
            // Its window (or region) could not be deallocated: it may still reach the memory.
            return Err(Error::Leaked { why: "this key's window or region could not be deallocated" });
        }
        if !r.windowed() {
            if let Some(i) = w.exact.iter().position(|m| m.rkey() == key.rkey) {
                let exact = w.exact.swap_remove(i);
                if let Err(e) = exact.deregister() {
                    // Still registered (a failed deregistration leaks the region itself): the
                    // key stays recorded, as reaching its memory.
                    r.pin_forever("a region over a handed-out range could not be deregistered");
                    w.failed.push(key.rkey);
                    return Err(e.into());
                }
                self.lock().remove(&id);
                return Ok(());
            }
            let own = r.strategy() == crate::Strategy::DmaBuf;
            if w.closed {
                // Revoked with its registration: a key region went with `revoke_keys`; the
                // dma-buf region's own rkey only once its teardown is done (it waits for the
                // operations holding it).
                if own && !r.torn_down() {
                    return Err(Error::Revoked);
                }
                self.lock().remove(&id);
                return Ok(());
            }
            if !own {
                // Another revoke_key of the same key got there first.
                return Err(Error::StaleKey { generation: key.generation, why: "revoked already" });
            }
            // A dma-buf registration's own rkey (handed out whole): it goes with the
            // registration, and stays recorded.
            return Err(Error::InvalidArgument(
                "this key is a dma-buf registration's own rkey (no memory windows: the device lacks them, or BridgeOptions::windows is off): it is revoked with the registration (free or invalidate it)".into(),
            ));
        }
        // Forgotten (below) only once its window is gone: a key whose window could not be
        // deallocated stays recorded, as reaching its memory.
        let forget = || {
            self.lock().remove(&id);
            // Out of its connection's list too: a window's rkey can be reused by a later key of
            // the same registration, which closing this key's connection must not revoke.
            for keys in self.by_conn.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
                keys.retain(|k| (k.generation, k.rkey) != id);
            }
        };
        if let Some(i) = w.list.iter().position(|b| b.mw.rkey() == key.rkey) {
            let b = w.list.swap_remove(i);
            // On failure the window is leaked with the region under it (dealloc does not hand
            // it back): they must then never be deregistered, and the key stays recorded.
            if let Err(e) = b.mw.dealloc() {
                r.pin_forever("a memory window over it could not be deallocated");
                w.failed.push(key.rkey);
                w.keep(b.region);
                return Err(e.into());
            }
            forget();
            if let Some(sub) = b.region {
                if let Err(e) = sub.deregister() {
                    // Still registered: keep the memory under it registered too. (The window
                    // is gone: the key itself is refused.)
                    r.pin_forever("a region under one of its windows could not be deregistered");
                    return Err(e.into());
                }
            }
        } else {
            // Deallocated already (by a revocation, or a revoke_key before this one).
            forget();
        }
        Ok(())
    }

    /// Forgets every key (the bridge is going; its registrations are revoked).
    pub(crate) fn clear(&self) {
        self.lock().clear();
        self.by_conn.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl crate::Bridge {
    /// Hands `len` bytes at `offset` of `reg` to the peer at the other end of `conn`, and
    /// returns the key to send it. The key reaches exactly that range, with the remote rights
    /// `reg` was registered with (not those of a larger cached registration), and is refused
    /// by the NIC once the memory goes or [`Bridge::revoke_key`](Self::revoke_key) is called.
    /// With memory windows ([`Bridge::key_windows`](Self::key_windows)) it works only over
    /// `conn`. Without, it is the rkey of a region registered over exactly that range with
    /// exactly those rights, usable over any connection of the peer's; a dma-buf
    /// registration, which has no address to register a
    /// part of, is then handed out only whole and with its own rights
    /// ([`Error::InvalidArgument`] otherwise).
    ///
    /// Host memory being unmapped by another thread while this runs (its `munmap` not returned
    /// yet) may be mapped anew before the monitor acts: the key's region may then reach the new
    /// memory until the monitor revokes it a moment later, as for a `register_host` racing an
    /// `munmap` (see its docs). An unmap that has returned is acted on before this registers.
    ///
    /// For bounce registrations the key names the staging buffer: the owner calls
    /// [`Bridge::sync_to_peers`](Self::sync_to_peers) before peers read and [`Bridge::sync_from_peers`](Self::sync_from_peers) after they
    /// write.
    pub fn hand_out(&self, conn: &Connection, reg: &Registered, offset: u64, len: u64) -> Result<RemoteKey> {
        let end = offset.checked_add(len).ok_or(Error::OutOfBounds { offset, len, size: reg.len })?;
        // Host memory: an munmap that has returned but is not acted on yet must not leave its
        // registration live for this hand-out, which may register a region over the range
        // (pinning whatever is mapped there now): catch up with the monitor first.
        if reg.handle.value().alloc().is_none() && !crate::uffd::settled() {
            crate::uffd::sync()?;
        }
        let access = reg.access;
        self.inner.core.keys.hand_out(&self.inner.core, conn, reg, offset..end, access)
    }

    /// `Ok` while a key this bridge handed out still reaches its memory; [`Error::StaleKey`]
    /// once it was revoked (memory freed, unmapped or invalidated, or the key revoked).
    pub fn check_key(&self, key: &RemoteKey) -> Result<()> {
        self.inner.core.keys.check(key)
    }

    /// Revokes one key: the NIC refuses it from the moment this returns. Other keys of the same
    /// registration stay valid. Every key can be revoked so, except, without memory windows, a
    /// dma-buf registration's own rkey (refused with [`Error::InvalidArgument`]: it goes with
    /// the registration).
    pub fn revoke_key(&self, key: &RemoteKey) -> Result<()> {
        self.inner.core.keys.revoke(key)
    }

    /// Sends `key` to the peer over `conn` itself (a SEND of its wire form), so that no other
    /// channel is needed. The peer receives it with [`recv_key`](Self::recv_key); its receive
    /// must be posted before the SEND arrives, or the SEND is retried on RNR as
    /// `ConnectionOptions::rnr_retry_count` allows (7: for ever).
    pub fn send_key(&self, conn: &Connection, key: &RemoteKey) -> Result<()> {
        // Filled while it is still ours alone, before the NIC is given it.
        let mut buf = HostBuffer::new(RemoteKey::WIRE_LEN)?;
        buf.as_mut_slice().copy_from_slice(&key.to_bytes());
        let mr = self.inner.core.pd.register(buf, AccessFlags::LOCAL_WRITE)?;
        let slice = mr.slice(..RemoteKey::WIRE_LEN as u64)?;
        let id = next_wr_id();
        conn.send_cq().expect(id);
        // SAFETY: `mr` stays registered until the SEND is reaped, and is leaked where it was not
        // (below).
        unsafe { conn.qp().post_send(id, &slice, None, SendFlags::SIGNALED) }
            .inspect_err(|_| conn.send_cq().unexpect(id))?;
        // `mr` lives until the completion is reaped (or the request flushed); a SEND the
        // device never completed nor flushed keeps it for ever.
        reaped_with(reap_on(conn, conn.send_cq(), id, self.inner.core.completion_timeout, "SEND of a key"), mr)
            .map(drop)
    }

    /// Receives a key the peer sent with [`send_key`](Self::send_key), waiting up to `timeout`.
    /// On timeout the connection's queue pair is moved to the error state (see
    /// [`Bridge::recv`](crate::Bridge::recv)).
    pub fn recv_key(&self, conn: &Connection, timeout: Duration) -> Result<RemoteKey> {
        let mr = self.inner.core.pd.register(HostBuffer::new(RemoteKey::WIRE_LEN)?, AccessFlags::LOCAL_WRITE)?;
        let slice = mr.slice(..)?;
        let id = next_wr_id();
        conn.recv_cq().expect(id);
        // SAFETY: `mr` stays registered until the receive is reaped (`reap_on` returns once it
        // completed or was flushed), and is leaked, never deregistered, where it was not.
        unsafe { conn.qp().post_recv(id, &slice) }.inspect_err(|_| conn.recv_cq().unexpect(id))?;
        let (wc, mr) = reaped_with(reap_on(conn, conn.recv_cq(), id, timeout, "RECV of a key"), mr)?;
        // The receive is complete and no peer has rights on this region: its bytes are settled.
        let bytes = mr.to_vec();
        RemoteKey::from_bytes(&bytes[..(wc.byte_len as usize).min(RemoteKey::WIRE_LEN)])
    }
}
