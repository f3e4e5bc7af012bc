//! Why a connection stopped working: rdma_cm events on its id, and the device's asynchronous
//! events (`ibv_get_async_event`), read without blocking whenever a caller asks.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::sys;

/// The cause of a connection's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The peer disconnected, or its process died (`RDMA_CM_EVENT_DISCONNECTED`).
    Disconnected,
    /// The RDMA device went away (`RDMA_CM_EVENT_DEVICE_REMOVAL`; `rdma link delete`).
    DeviceRemoval,
    /// The address the connection is bound to changed (`RDMA_CM_EVENT_ADDR_CHANGE`).
    AddrChange,
    /// The device reported a fatal error (`IBV_EVENT_DEVICE_FATAL`).
    DeviceFatal,
    /// The connection's port went down (`IBV_EVENT_PORT_ERR`).
    PortDown {
        /// The port.
        port: u8,
    },
    /// The queue pair hit an error the NIC reported asynchronously (`IBV_EVENT_QP_FATAL`,
    /// `_REQ_ERR`, `_ACCESS_ERR`).
    QpError {
        /// Which event.
        event: &'static str,
    },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Disconnected => write!(f, "the peer disconnected (or its process died)"),
            Fault::DeviceRemoval => write!(f, "the RDMA device was removed"),
            Fault::AddrChange => write!(f, "the connection's address changed"),
            Fault::DeviceFatal => write!(f, "the RDMA device reported a fatal error"),
            Fault::PortDown { port } => write!(f, "port {port} of the RDMA device went down"),
            Fault::QpError { event } => write!(f, "the queue pair failed ({event})"),
        }
    }
}

/// What a device's asynchronous events said so far.
#[derive(Default)]
pub(crate) struct DeviceFaults {
    nonblocking: AtomicBool,
    state: Mutex<FaultState>,
}

#[derive(Default)]
struct FaultState {
    fatal: bool,
    ports_down: BTreeSet<u8>,
    qps: HashMap<u32, &'static str>,
}

/// `struct ibv_async_event` with the event type read as a plain integer: a newer kernel's
/// event number must not be read as a Rust enum value it does not have.
#[repr(C)]
struct RawAsyncEvent {
    element: u64,
    event_type: u32,
}

const _: () = assert!(std::mem::size_of::<RawAsyncEvent>() == std::mem::size_of::<sys::ibv_async_event>());

impl DeviceFaults {
    /// Reads every pending asynchronous event of `ctx` (without blocking) and records the
    /// faults among them.
    ///
    /// # Safety
    /// `ctx` must be a live device context, the one these faults belong to.
    pub(crate) unsafe fn poll(&self, ctx: *mut sys::ibv_context) {
        // SAFETY: the caller's contract; async_fd is the context's event descriptor.
        let fd = unsafe { (*ctx).async_fd };
        if !self.nonblocking.swap(true, Ordering::SeqCst) {
            // SAFETY: fcntl on a descriptor the context owns; only adds O_NONBLOCK.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                if fl >= 0 {
                    libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut ev = RawAsyncEvent { element: 0, event_type: 0 };
            // SAFETY: `ev` has the layout of struct ibv_async_event (checked above); the
            // descriptor is non-blocking, so this returns -1 (EAGAIN) when nothing is pending.
            let rc = unsafe { sys::ibv_get_async_event(ctx, (&mut ev as *mut RawAsyncEvent).cast()) };
            if rc != 0 {
                return;
            }
            let qp_event = |name| (name, true);
            let (name, is_qp) = match ev.event_type {
                1 => qp_event("IBV_EVENT_QP_FATAL"),
                2 => qp_event("IBV_EVENT_QP_REQ_ERR"),
                3 => qp_event("IBV_EVENT_QP_ACCESS_ERR"),
                _ => ("", false),
            };
            if is_qp && ev.element != 0 {
                // SAFETY: for QP events the element is the QP, live until the event is acked.
                let qpn = unsafe { (*(ev.element as *mut sys::ibv_qp)).qp_num };
                st.qps.insert(qpn, name);
            }
            match ev.event_type {
                8 => st.fatal = true,
                // The element is the port number (an int in the union's first bytes).
                10 => {
                    st.ports_down.insert(ev.element as u32 as u8);
                }
                9 => {
                    st.ports_down.remove(&(ev.element as u32 as u8));
                }
                _ => {}
            }
            // SAFETY: acked once, as ibv_get_async_event requires.
            unsafe { sys::ibv_ack_async_event((&mut ev as *mut RawAsyncEvent).cast()) };
        }
    }

    /// The fault recorded for a connection on `port` with QP number `qpn`, if any.
    pub(crate) fn for_qp(&self, qpn: u32, port: u8) -> Option<Fault> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.fatal {
            return Some(Fault::DeviceFatal);
        }
        if st.ports_down.contains(&port) {
            return Some(Fault::PortDown { port });
        }
        st.qps.get(&qpn).map(|&event| Fault::QpError { event })
    }

    /// Forgets a destroyed QP's record (its number may be reused).
    pub(crate) fn forget_qp(&self, qpn: u32) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).qps.remove(&qpn);
    }
}
