//! Why a connection stopped working: rdma_cm events on its id, and the device's asynchronous
//! events (`ibv_get_async_event`), read without blocking whenever a caller asks.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};

use crate::{result, sys};

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
///
/// One per raw `ibv_context` in the process ([`DeviceFaults::of`]): every [`Context`] over the
/// same context (librdmacm hands the same one to every `Context::open` of a device) reads its
/// events into the same record, so that none steals another's. Its descriptor is made
/// non-blocking when the record is made, before any read: a read never blocks while holding
/// the lock.
///
/// [`Context`]: crate::Context
pub(crate) struct DeviceFaults {
    /// The async event descriptor is non-blocking: reads may be made. `false` when `fcntl`
    /// failed: events are then never read (a blocking read could hang the caller).
    readable: bool,
    state: Mutex<FaultState>,
}

/// The records alive, by raw context address.
static RECORDS: Mutex<Vec<(usize, Weak<DeviceFaults>)>> = Mutex::new(Vec::new());

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

/// The values of `enum ibv_event_type` read here, as the integers `RawAsyncEvent` holds.
mod event {
    use crate::sys::ibv_event_type as t;
    pub(super) const QP_FATAL: u32 = t::IBV_EVENT_QP_FATAL as u32;
    pub(super) const QP_REQ_ERR: u32 = t::IBV_EVENT_QP_REQ_ERR as u32;
    pub(super) const QP_ACCESS_ERR: u32 = t::IBV_EVENT_QP_ACCESS_ERR as u32;
    pub(super) const DEVICE_FATAL: u32 = t::IBV_EVENT_DEVICE_FATAL as u32;
    pub(super) const PORT_ACTIVE: u32 = t::IBV_EVENT_PORT_ACTIVE as u32;
    pub(super) const PORT_ERR: u32 = t::IBV_EVENT_PORT_ERR as u32;
}

impl DeviceFaults {
    /// The record of `ctx`'s asynchronous events: the one already made for this context if any
    /// [`Context`](crate::Context) over it is alive, else a new one, whose descriptor is made
    /// non-blocking here.
    ///
    /// # Safety
    /// `ctx` must be a live device context, and stay live while the returned record is used
    /// for it.
    pub(crate) unsafe fn of(ctx: *mut sys::ibv_context) -> Arc<DeviceFaults> {
        let mut records = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
        records.retain(|(_, w)| w.strong_count() > 0);
        if let Some(f) = records.iter().find(|(c, _)| *c == ctx as usize).and_then(|(_, w)| w.upgrade()) {
            return f;
        }
        // SAFETY: the caller's contract; async_fd is the context's event descriptor.
        let fd = unsafe { (*ctx).async_fd };
        const WHAT: &str = "fcntl(O_NONBLOCK) on a device's async event fd";
        // SAFETY: fcntl on a descriptor the context owns; only reads its flags.
        let readable = match unsafe { result::os::fcntl_getfl(fd, WHAT) } {
            // SAFETY: as above; only adds O_NONBLOCK (every reader here copes with EAGAIN).
            Ok(fl) => unsafe { result::os::fcntl_setfl(fd, fl | libc::O_NONBLOCK, WHAT) }.is_ok(),
            Err(_) => false,
        };
        let f = Arc::new(DeviceFaults { readable, state: Mutex::new(FaultState::default()) });
        records.push((ctx as usize, Arc::downgrade(&f)));
        f
    }

    /// Forgets `this` record before its context is closed, where no other [`Context`] over that
    /// context holds it: a context opened later at the same address starts with a record of
    /// its own.
    ///
    /// [`Context`]: crate::Context
    pub(crate) fn release(this: &Arc<DeviceFaults>) {
        let mut records = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock that `of` upgrades under: no new holder can appear meanwhile.
        if Arc::strong_count(this) == 1 {
            records.retain(|(_, w)| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(this)));
        }
    }

    /// Reads every pending asynchronous event of `ctx` (without blocking) and records the
    /// faults among them. Reads nothing where the descriptor could not be made non-blocking.
    ///
    /// # Safety
    /// `ctx` must be a live device context, the one these faults belong to.
    pub(crate) unsafe fn poll(&self, ctx: *mut sys::ibv_context) {
        if !self.readable {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut ev = RawAsyncEvent { element: 0, event_type: 0 };
            // SAFETY: `ev` has the layout of struct ibv_async_event (checked above); the
            // descriptor is non-blocking, so this returns -1 (EAGAIN) when nothing is pending.
            let got = unsafe { result::device::get_async_event(ctx, (&mut ev as *mut RawAsyncEvent).cast()) };
            if got.is_err() {
                return;
            }
            let qp_event = |name| (name, true);
            let (name, is_qp) = match ev.event_type {
                event::QP_FATAL => qp_event("IBV_EVENT_QP_FATAL"),
                event::QP_REQ_ERR => qp_event("IBV_EVENT_QP_REQ_ERR"),
                event::QP_ACCESS_ERR => qp_event("IBV_EVENT_QP_ACCESS_ERR"),
                _ => ("", false),
            };
            if is_qp && ev.element != 0 {
                // SAFETY: for QP events the element is the QP, live until the event is acked.
                let qpn = unsafe { (*(ev.element as *mut sys::ibv_qp)).qp_num };
                st.qps.insert(qpn, name);
            }
            match ev.event_type {
                event::DEVICE_FATAL => st.fatal = true,
                // The element is the port number (an int in the union's first bytes).
                event::PORT_ERR => {
                    st.ports_down.insert(ev.element as u32 as u8);
                }
                event::PORT_ACTIVE => {
                    st.ports_down.remove(&(ev.element as u32 as u8));
                }
                _ => {}
            }
            // SAFETY: acked once, as ibv_get_async_event requires.
            unsafe { result::device::ack_async_event((&mut ev as *mut RawAsyncEvent).cast()) };
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
