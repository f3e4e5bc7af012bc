//! Waiting for the bridge's own completions: work-request ids of its own, and a wait that never
//! gives up while the NIC may still use a buffer.
//!
//! A completion that does not come within [`BridgeOptions::completion_timeout`] is not waited
//! past: the queue pair is moved to the error state, the request's flush is reaped, and only
//! then is the error returned. A lost connection ([`Connection::fault`]) is noticed within
//! [`FAULT_POLL`] of the loss. Nothing is released while the NIC may still use it.
//!
//! [`BridgeOptions::completion_timeout`]: crate::BridgeOptions::completion_timeout

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use p2pbridge_verbs::{CompletionQueue, Connection, WorkCompletion};

use crate::error::{Error, Result};

/// Work-request ids of the bridge's own requests: the top bit set, so that they do not meet
/// the small ids applications number their own requests with.
static NEXT_WR_ID: AtomicU64 = AtomicU64::new(1 << 63);

pub(crate) fn next_wr_id() -> u64 {
    next_wr_ids(1)
}

/// The first of `n` consecutive fresh work-request ids.
pub(crate) fn next_wr_ids(n: u64) -> u64 {
    NEXT_WR_ID.fetch_add(n, Ordering::Relaxed)
}

/// `r`, the reap of a request over `bufs`, with `bufs` given back where it was reaped (or
/// failed otherwise: the NIC is done with them). Where the device neither completed nor
/// flushed it (`DeviceStuck`), the NIC may still use them: they are given up for ever (leaked,
/// never deregistered).
pub(crate) fn reaped_with<T, B>(r: Result<T>, bufs: B) -> Result<(T, B)> {
    match r {
        Err(e @ Error::DeviceStuck { .. }) => {
            std::mem::forget(bufs);
            Err(e)
        }
        r => r.map(|v| (v, bufs)),
    }
}

/// How long a flushed request's completion may take once its QP is in the error state.
pub(crate) const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// How often a wait for a completion looks at the connection's events (peer gone, device
/// removed, port down): a lost connection fails its operations within this, plus the flush.
pub(crate) const FAULT_POLL: Duration = Duration::from_millis(100);

/// Waits for the completion of `wr_id` on `cq` (of `conn`). If it does not come within
/// `timeout`, or the connection is lost meanwhile ([`Connection::fault`]), moves the QP to the
/// error state and reaps the flush before returning [`Error::CompletionTimeout`] or the
/// connection's loss (`Verbs(ConnectionLost { cause })`); [`Error::DeviceStuck`] if even the
/// flush does not come. Nothing the request names is let go while the NIC may still use it.
///
/// The id stays marked awaited (`CompletionQueue::expect`) across the waits, so that no other
/// waiter on a shared CQ takes its completion, and the mark ends once it is reaped; a request
/// given up as stuck keeps its mark.
pub(crate) fn reap_on(
    conn: &Connection,
    cq: &CompletionQueue,
    wr_id: u64,
    timeout: Duration,
    what: &'static str,
) -> Result<WorkCompletion> {
    cq.expect(wr_id);
    let r = reap_marked(conn, cq, wr_id, timeout, what);
    if !matches!(r, Err(Error::DeviceStuck { .. })) {
        cq.unexpect(wr_id);
    }
    r
}

fn reap_marked(
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
pub(crate) const ATTRIBUTE_WAIT: Duration = Duration::from_millis(250);

/// The connection's loss, if it shows within `wait`.
pub(crate) fn lost_within(conn: &Connection, wait: Duration) -> Option<p2pbridge_verbs::Fault> {
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
