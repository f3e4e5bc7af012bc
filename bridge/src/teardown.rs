//! Teardowns deferred past holders: the monitor's revocations never wait for a registration's
//! holders (a `Transfer`, `Receives` or `LocalGuard` on it, however long they are kept).
//!
//! When the monitor sees memory go, each registration over it has its keys revoked at the NIC
//! at once ([`Registration::revoke_keys`]: windows deallocated, no new hold given). Where an
//! operation still holds the registration, the rest — deregistering the region — is handed to
//! a thread of its own, which waits for the holders and finishes (such holds are rare: an
//! operation in flight on memory being unmapped). So one held registration delays only its
//! own region's deregistration, never another's revocation or teardown, and a holder may call
//! [`Bridge::register_host`](crate::Bridge::register_host) or
//! [`Bridge::sync_monitor`](crate::Bridge::sync_monitor) without waiting for itself.
//!
//! Until then the region stays registered: pinned memory keeps the old pages, which is where
//! operations still in flight on it land, never memory mapped at those addresses since.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

use crate::cache::Handle;
use crate::registration::Registration;

static QUEUE: OnceLock<Mutex<Sender<Handle<Registration>>>> = OnceLock::new();

/// Revokes `reg` now if nothing holds it; else revokes its keys now and hands the rest to the
/// teardown thread. Returns the revocation's result where it finished here.
pub(crate) fn revoke_without_waiting(reg: Handle<Registration>) -> crate::Result<()> {
    match reg.value().try_revoke() {
        Some(r) => r,
        None => {
            // Once per registration: a later unmap over the same (retired, still held) entry
            // finds it again, and must not start another thread.
            if reg.value().defer_once() {
                defer(reg);
            }
            Ok(())
        }
    }
}

/// Hands `reg` to a thread of its own, which revokes it once its holders let go: one held
/// registration (a guard kept for long, or forgotten) never delays another's teardown. Where
/// no thread can be started, it goes to the shared teardown thread (started on first use);
/// where even that cannot be, it is revoked here (waiting).
fn defer(reg: Handle<Registration>) {
    let own = std::sync::Arc::new(Mutex::new(Some(reg)));
    let theirs = own.clone();
    let spawned = std::thread::Builder::new().name("p2pbridge-teardown".into()).spawn(move || {
        if let Some(reg) = theirs.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if let Err(e) = reg.value().revoke() {
                tracing::error!("a deferred revocation failed: {e}");
            }
        }
    });
    if spawned.is_ok() {
        return;
    }
    // The closure never ran: the registration is still ours.
    let Some(reg) = own.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    let q = QUEUE.get_or_init(|| {
        let (tx, rx) = channel::<Handle<Registration>>();
        let spawned = std::thread::Builder::new().name("p2pbridge-teardown".into()).spawn(move || {
            for reg in rx {
                if let Err(e) = reg.value().revoke() {
                    tracing::error!("a deferred revocation failed: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the teardown thread ({e}): revocations wait for holders");
        }
        Mutex::new(tx)
    });
    let sent = q.lock().unwrap_or_else(|e| e.into_inner()).send(reg);
    if let Err(std::sync::mpsc::SendError(reg)) = sent {
        if let Err(e) = reg.value().revoke() {
            tracing::error!("a revocation failed: {e}");
        }
    }
}
