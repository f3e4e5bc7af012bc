//! Connection setup through rdma_cm (librdmacm): the active side ([`Connection::connect`])
//! and the passive side ([`Listener`], [`ConnectRequest::accept`]).
//!
//! Each side carries up to 56 bytes (connect) or 196 bytes (accept) of private data: room
//! for a [`RemoteBuf`](crate::RemoteBuf) descriptor, so that a peer learns where to write
//! without any other channel.
//!
//! rdma_cm resolves addresses in the network namespace of the calling thread.

use std::net::{IpAddr, SocketAddr};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use crate::cq::CompletionQueue;
use crate::device::Context;
use crate::error::{Errno, Error, Result};
use crate::pd::ProtectionDomain;
use crate::qp::QueuePair;
use crate::srq::SharedReceiveQueue;
use crate::{library, result, sys};

/// Sizes and limits of a connection's queues, and the private data to send.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Send queue depth (outstanding send-side work requests).
    pub send_depth: u32,
    /// Receive queue depth.
    pub recv_depth: u32,
    /// Largest inline payload asked for.
    pub max_inline: u32,
    /// Outstanding RDMA READs we accept as responder.
    pub responder_resources: u8,
    /// Outstanding RDMA READs we issue as initiator.
    pub initiator_depth: u8,
    /// RNR retries (7 = retry for ever; the default 6 lets a missing receive fail instead of
    /// hang).
    pub rnr_retry_count: u8,
    /// How long each rdma_cm step may take.
    pub timeout: Duration,
    /// Bytes sent to the peer with the connect request or the accept (at most 56 / 196).
    pub private_data: Vec<u8>,
    /// A completion queue to share for send-side completions (many connections, one progress
    /// path); `None`: the connection makes its own, of `send_depth` entries. A shared CQ
    /// needs room for every connection's outstanding requests.
    pub send_cq: Option<Arc<CompletionQueue>>,
    /// As `send_cq`, for receive completions.
    pub recv_cq: Option<Arc<CompletionQueue>>,
    /// A shared receive queue for the connection's receives (posted there, not on the QP).
    pub srq: Option<Arc<SharedReceiveQueue>>,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            send_depth: 256,
            recv_depth: 256,
            max_inline: 64,
            responder_resources: 16,
            initiator_depth: 16,
            rnr_retry_count: 6,
            timeout: Duration::from_secs(10),
            private_data: Vec::new(),
            send_cq: None,
            recv_cq: None,
            srq: None,
        }
    }
}

struct Channel(NonNull<sys::rdma_event_channel>);

impl Channel {
    fn new() -> Result<Self> {
        // The channel is destroyed on drop.
        Ok(Channel(result::cm::create_event_channel()?))
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: destroyed once, after every id on it (CmId holds the channel and destroys
        // its id first).
        unsafe { result::cm::destroy_event_channel(self.0) };
    }
}

/// An rdma_cm id and the channel its events arrive on; destroys QP, id, then channel.
struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    has_qp: bool,
    // Declared last: dropped after the id.
    channel: Channel,
}

// SAFETY: rdma_cm ids may be used from any thread; each is used by one owner at a time.
unsafe impl Send for CmId {}
// SAFETY: shared access only reads the id's fields set at creation (verbs, qp).
unsafe impl Sync for CmId {}

impl CmId {
    fn new(channel: Channel) -> Result<Self> {
        // SAFETY: the channel is live, and outlives the id (CmId's field order).
        let id = unsafe {
            result::cm::create_id(channel.0.as_ptr(), std::ptr::null_mut(), sys::rdma_port_space::RDMA_PS_TCP)
        }?;
        Ok(CmId { id, has_qp: false, channel })
    }

    fn raw(&self) -> *mut sys::rdma_cm_id {
        self.id.as_ptr()
    }

    fn wait(&self, expected: u32, timeout: Duration) -> Result<Event> {
        wait_event(&self.channel, expected, timeout)
    }

    /// Checks that the route goes through `pd`'s device context.
    fn check_pd(&self, pd: &ProtectionDomain) -> Result<()> {
        // SAFETY: the id is live; `verbs` is set once an address is resolved or bound.
        let verbs = unsafe { (*self.raw()).verbs };
        if verbs != pd.context().as_raw() {
            let routed = match NonNull::new(verbs) {
                Some(v) => Context::from_cm_context(v).map(|c| c.name().to_string()).unwrap_or_else(|_| "?".into()),
                None => "no device".into(),
            };
            return Err(Error::InvalidArgument(format!(
                "rdma_cm routed this connection through {routed}, but the protection domain belongs to {}: open the device the address belongs to",
                pd.context().name()
            )));
        }
        Ok(())
    }

    /// Creates CQs and an RC QP on the id.
    fn create_qp(
        &mut self,
        pd: &ProtectionDomain,
        opts: &ConnectionOptions,
    ) -> Result<(QueuePair, Arc<CompletionQueue>, Arc<CompletionQueue>)> {
        let cq = |shared: &Option<Arc<CompletionQueue>>, depth: u32| -> Result<Arc<CompletionQueue>> {
            match shared {
                Some(cq) if !cq.on(pd.context()) => Err(Error::InvalidArgument(format!(
                    "a shared completion queue must be on the connection's device ({})",
                    pd.context().name()
                ))),
                Some(cq) => Ok(cq.clone()),
                None => Ok(Arc::new(CompletionQueue::new(pd.context(), depth.max(1))?)),
            }
        };
        let send_cq = cq(&opts.send_cq, opts.send_depth)?;
        let recv_cq = cq(&opts.recv_cq, opts.recv_depth)?;
        if let Some(srq) = &opts.srq {
            if !srq.in_pd(pd) {
                return Err(Error::InvalidArgument(
                    "a shared receive queue must be in the connection's protection domain".into(),
                ));
            }
        }
        // SAFETY: plain old data; every field that matters is set below.
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = send_cq.as_raw();
        attr.recv_cq = recv_cq.as_raw();
        attr.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        attr.cap.max_send_wr = opts.send_depth.max(1);
        attr.cap.max_recv_wr = opts.recv_depth.max(1);
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        attr.cap.max_inline_data = opts.max_inline;
        if let Some(srq) = &opts.srq {
            attr.srq = srq.as_raw();
            attr.cap.max_recv_wr = 0;
        }
        // SAFETY: the id is live and routed through pd's context (checked by the caller); the
        // CQs (and the SRQ) outlive the QP (Connection holds them and destroys the QP first).
        unsafe { result::cm::create_qp(self.raw(), pd.as_raw(), &mut attr) }?;
        self.has_qp = true;
        // SAFETY: rdma_create_qp set id->qp on success.
        let qp = result::ptr("rdma_create_qp", unsafe { (*self.raw()).qp })?;
        // SAFETY: the QP lives until this CmId destroys it, and the Connection keeps both.
        let qp = unsafe { QueuePair::from_raw(qp, pd, attr.cap.max_inline_data, attr.cap.max_send_wr) };
        Ok((qp, send_cq, recv_cq))
    }
}

/// A connection that failed after its QP was made: the QP and the id go first, then the CQs
/// (a CQ that a QP still uses cannot be destroyed, and would leak). Returns `e`.
fn teardown(qp: QueuePair, id: CmId, send_cq: Arc<CompletionQueue>, recv_cq: Arc<CompletionQueue>, e: Error) -> Error {
    drop(qp);
    drop(id);
    drop((send_cq, recv_cq));
    e
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: each is destroyed once, QP before id; the channel outlives the id (field
        // order). rdma_destroy_id waits for this id's unacked events; we ack every event.
        unsafe {
            if self.has_qp {
                result::cm::destroy_qp(self.raw());
            }
            let _ = result::cm::destroy_id(self.id);
        }
    }
}

/// What we keep of an rdma_cm event (it is acked before we return).
struct Event {
    id: *mut sys::rdma_cm_id,
    private_data: Vec<u8>,
}

fn event_name(e: u32) -> String {
    match result::cm::event_str(e) {
        Some(name) => name.to_string_lossy().into_owned(),
        None => format!("event {e}"),
    }
}

/// One event of `ch`, as copied out before it was acked.
struct RawEvent {
    kind: u32,
    status: i32,
    id: *mut sys::rdma_cm_id,
    private_data: Vec<u8>,
}

/// The next event of `ch` if one comes within `timeout` (zero: only one already there).
fn next_event(ch: &Channel, timeout: Duration) -> Result<Option<RawEvent>> {
    // SAFETY: the channel is live; its fd is valid while it is.
    let fd = unsafe { (*ch.0.as_ptr()).fd };
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        match result::os::poll(std::slice::from_mut(&mut pfd), ms, "poll(rdma_cm channel)") {
            Err(Error::Verb { errno: Errno(libc::EINTR), .. }) => continue,
            Err(e) => return Err(e),
            Ok(0) => return Ok(None),
            Ok(_) => break,
        }
    }
    // SAFETY: the channel is live and has an event ready; it is acked below.
    let ev = unsafe { result::cm::get_cm_event(ch.0.as_ptr()) }?;
    // SAFETY: the event is valid until acked; we copy what we need first.
    let (kind, status, id, private_data) = unsafe {
        let e = ev.as_ref();
        let conn = e.param.conn;
        let pd = if conn.private_data.is_null() || conn.private_data_len == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(conn.private_data.cast::<u8>(), conn.private_data_len as usize).to_vec()
        };
        (e.event, e.status, e.id, pd)
    };
    // SAFETY: acked once; nothing refers to it afterwards.
    let _ = unsafe { result::cm::ack_cm_event(ev) };
    Ok(Some(RawEvent { kind, status, id, private_data }))
}

fn wait_event(ch: &Channel, expected: u32, timeout: Duration) -> Result<Event> {
    let expected_name: &'static str = match expected {
        sys::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED => "RDMA_CM_EVENT_ADDR_RESOLVED",
        sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED => "RDMA_CM_EVENT_ROUTE_RESOLVED",
        sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST => "RDMA_CM_EVENT_CONNECT_REQUEST",
        sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED => "RDMA_CM_EVENT_ESTABLISHED",
        sys::rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED => "RDMA_CM_EVENT_DISCONNECTED",
        _ => "an rdma_cm event",
    };
    let Some(RawEvent { kind, status, id, private_data }) = next_event(ch, timeout)? else {
        return Err(Error::Timeout(timeout, expected_name));
    };
    if kind != expected {
        use sys::rdma_cm_event_type as t;
        let hint = match kind {
            t::RDMA_CM_EVENT_ADDR_ERROR => Some(
                "no RDMA device can reach that address from this network namespace (check `rdma link`, `ip route`)",
            ),
            t::RDMA_CM_EVENT_ROUTE_ERROR => Some("no route to the peer through an RDMA device"),
            t::RDMA_CM_EVENT_UNREACHABLE => Some("the peer did not answer: is a server listening there?"),
            t::RDMA_CM_EVENT_REJECTED => Some("the peer rejected the request, or nothing listens on that port"),
            t::RDMA_CM_EVENT_CONNECT_ERROR => Some("the connection failed while being set up"),
            _ => None,
        };
        return Err(Error::CmEvent { expected: expected_name, got: event_name(kind), status, hint });
    }
    Ok(Event { id, private_data })
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; zeroed is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn conn_param(opts: &ConnectionOptions, max_private: usize) -> Result<sys::rdma_conn_param> {
    if opts.private_data.len() > max_private {
        return Err(Error::InvalidArgument(format!(
            "private data of {} bytes exceeds rdma_cm's {max_private}-byte limit",
            opts.private_data.len()
        )));
    }
    Ok(sys::rdma_conn_param {
        private_data: if opts.private_data.is_empty() { std::ptr::null() } else { opts.private_data.as_ptr().cast() },
        private_data_len: opts.private_data.len() as u8,
        responder_resources: opts.responder_resources,
        initiator_depth: opts.initiator_depth,
        flow_control: 1,
        retry_count: 7,
        rnr_retry_count: opts.rnr_retry_count.min(7),
        srq: 0,
        qp_num: 0,
    })
}

/// How often [`Connection::fault`] reads the connection's events at most (by the coarse
/// clock, [`Coarse`](crate::Coarse): at most once a tick where a tick is longer).
pub const FAULT_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// Largest private data on a connect request (RC over IB/RoCE).
pub const MAX_CONNECT_PRIVATE_DATA: usize = 56;
/// Largest private data on an accept.
pub const MAX_ACCEPT_PRIVATE_DATA: usize = 196;

/// A connected RC queue pair with its completion queues, set up through rdma_cm.
///
/// Dropping it disconnects and destroys the QP, the CQs and the rdma_cm id, in that order.
pub struct Connection {
    qp: QueuePair,
    // Destroys the QP and the id; must drop before the CQs.
    id: CmId,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    /// Its shared receive queue, kept while the QP lives.
    srq: Option<Arc<SharedReceiveQueue>>,
    pd: ProtectionDomain,
    remote_private_data: Vec<u8>,
    /// Run before the QP is destroyed (see [`Connection::on_close`]).
    on_close: std::sync::Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    /// The port the connection runs on.
    port: u8,
    /// Why the connection was lost, once known (see [`Connection::fault`]).
    fault: std::sync::Mutex<Option<crate::Fault>>,
    /// `fault` holds a loss: answered under its lock from then on.
    faulted: std::sync::atomic::AtomicBool,
    /// When the events are next due to be read ([`Coarse::nanos`](crate::Coarse::nanos));
    /// calls before then with no loss known answer `None` without taking the lock.
    fault_due: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("qp", &self.qp).field("device", &self.pd.context().name()).finish()
    }
}

impl Connection {
    /// Connects to a [`Listener`] at `dst`, through the device `pd` belongs to.
    ///
    /// ```no_run
    /// use p2pbridge_verbs::{Connection, ConnectionOptions, Context, ProtectionDomain};
    /// let pd = ProtectionDomain::new(&Context::open("rxe_a")?)?;
    /// let conn = Connection::connect(&pd, "10.77.0.2:7471".parse().unwrap(), &ConnectionOptions::default())?;
    /// let theirs = p2pbridge_verbs::RemoteBuf::from_bytes(conn.remote_private_data())?;
    /// # Ok::<(), p2pbridge_verbs::Error>(())
    /// ```
    pub fn connect(pd: &ProtectionDomain, dst: SocketAddr, opts: &ConnectionOptions) -> Result<Connection> {
        library::rdmacm()?;
        let param = conn_param(opts, MAX_CONNECT_PRIVATE_DATA)?;
        let mut id = CmId::new(Channel::new()?)?;
        let ms = i32::try_from(opts.timeout.as_millis()).unwrap_or(i32::MAX);
        let (mut dst_ss, _) = to_sockaddr(&dst);
        // SAFETY: the id is live; `dst_ss` holds a valid sockaddr of its family.
        unsafe {
            result::cm::resolve_addr(
                id.raw(),
                std::ptr::null_mut(),
                (&mut dst_ss as *mut libc::sockaddr_storage).cast(),
                ms,
            )
        }?;
        id.wait(sys::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED, opts.timeout)?;
        // SAFETY: the id's address is resolved.
        unsafe { result::cm::resolve_route(id.raw(), ms) }?;
        id.wait(sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED, opts.timeout)?;
        id.check_pd(pd)?;
        let (qp, send_cq, recv_cq) = id.create_qp(pd, opts)?;
        let mut param = param;
        let established = (|| {
            // SAFETY: the id is routed and has a QP; `param` and its private data outlive the call.
            unsafe { result::cm::connect(id.raw(), &mut param) }?;
            id.wait(sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED, opts.timeout)
        })();
        match established {
            Ok(ev) => Ok(Connection::assemble(qp, id, send_cq, recv_cq, opts.srq.clone(), pd, ev.private_data)),
            Err(e) => Err(teardown(qp, id, send_cq, recv_cq, e)),
        }
    }

    /// The queue pair: post work requests here.
    pub fn qp(&self) -> &QueuePair {
        &self.qp
    }

    /// Completions of send-side work (WRITE, READ, SEND).
    pub fn send_cq(&self) -> &CompletionQueue {
        &self.send_cq
    }

    /// Completions of receives.
    pub fn recv_cq(&self) -> &CompletionQueue {
        &self.recv_cq
    }

    /// The shared receive queue its receives are posted to, if it has one.
    pub fn srq(&self) -> Option<&SharedReceiveQueue> {
        self.srq.as_deref()
    }

    /// The protection domain.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// The private data the peer sent with its request or accept. rdma_cm may pad it with
    /// zeros to the transport's maximum.
    pub fn remote_private_data(&self) -> &[u8] {
        &self.remote_private_data
    }

    /// Waits for the peer to disconnect (`RDMA_CM_EVENT_DISCONNECTED`); another loss
    /// ([`fault`](Self::fault)) is returned as [`Error::ConnectionLost`].
    pub fn wait_disconnect(&self, timeout: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            match self.fault() {
                Some(crate::Fault::Disconnected) => return Ok(()),
                Some(cause) => return Err(Error::ConnectionLost { cause }),
                None => {}
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout(timeout, "RDMA_CM_EVENT_DISCONNECTED"));
            }
            std::thread::sleep(Duration::from_millis(5).min(timeout));
        }
    }

    /// Why the connection is lost, or `None` while it is not known to be: reads the rdma_cm
    /// events of its id (DISCONNECTED, DEVICE_REMOVAL, ADDR_CHANGE) and the device's
    /// asynchronous events (device fatal, its port down, its QP failed) without blocking.
    /// Once lost, always lost: a new connection is needed.
    ///
    /// The events are read at most every [`FAULT_CHECK_INTERVAL`] (a read is a system call);
    /// calls in between answer from the last read.
    pub fn fault(&self) -> Option<crate::Fault> {
        use std::sync::atomic::Ordering;
        use sys::rdma_cm_event_type as t;
        // This runs on every post and poll: the coarse clock, and no lock while nothing is due.
        let now = crate::Coarse::now();
        if !self.faulted.load(Ordering::Acquire) && now.nanos() < self.fault_due.load(Ordering::Acquire) {
            return None;
        }
        let mut f = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_some() || now.nanos() < self.fault_due.load(Ordering::Acquire) {
            return *f; // a loss known, or another caller read the events meanwhile
        }
        self.fault_due.store(now.after(FAULT_CHECK_INTERVAL).nanos(), Ordering::Release);
        // No loss known yet (answered above otherwise): read every pending event, keeping the
        // first that means one.
        while let Ok(Some(ev)) = next_event(&self.id.channel, Duration::ZERO) {
            let cause = match ev.kind {
                t::RDMA_CM_EVENT_DISCONNECTED => Some(crate::Fault::Disconnected),
                t::RDMA_CM_EVENT_DEVICE_REMOVAL => Some(crate::Fault::DeviceRemoval),
                t::RDMA_CM_EVENT_ADDR_CHANGE => Some(crate::Fault::AddrChange),
                _ => None,
            };
            if f.is_none() {
                *f = cause;
            }
        }
        if f.is_none() {
            *f = self.pd.context().fault_for(self.qp.qp_num(), self.port);
        }
        if f.is_some() {
            self.faulted.store(true, Ordering::Release);
        }
        *f
    }
}

impl Connection {
    fn assemble(
        qp: QueuePair,
        id: CmId,
        send_cq: Arc<CompletionQueue>,
        recv_cq: Arc<CompletionQueue>,
        srq: Option<Arc<SharedReceiveQueue>>,
        pd: &ProtectionDomain,
        remote_private_data: Vec<u8>,
    ) -> Self {
        // SAFETY: the id is live; port_num is set once the route is resolved.
        let port = unsafe { (*id.raw()).port_num };
        Connection {
            qp,
            id,
            send_cq,
            recv_cq,
            srq,
            pd: pd.clone(),
            remote_private_data,
            on_close: Default::default(),
            port,
            fault: Default::default(),
            faulted: Default::default(),
            fault_due: Default::default(),
        }
    }

    /// Runs `f` when the connection is dropped, before its queue pair is destroyed: for
    /// objects bound to the QP (type 2 memory windows) that must go first. Callbacks run in
    /// the order they were added.
    pub fn on_close(&self, f: impl FnOnce() + Send + 'static) {
        self.on_close.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(f));
    }

    /// How many [`on_close`](Self::on_close) callbacks are waiting (diagnostics: a library
    /// that adds one per operation instead of one per connection shows here).
    pub fn close_hooks(&self) -> usize {
        self.on_close.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for f in std::mem::take(&mut *self.on_close.lock().unwrap_or_else(|e| e.into_inner())) {
            f();
        }
        self.pd.context().inner.faults.forget_qp(self.qp.qp_num());
        // SAFETY: the id is live; disconnecting an already disconnected id only fails.
        let _ = unsafe { result::cm::disconnect(self.id.raw()) };
    }
}

/// A passive rdma_cm id listening for connections.
pub struct Listener {
    id: CmId,
    addr: SocketAddr,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("addr", &self.addr).finish()
    }
}

impl Listener {
    /// Binds to `addr` (an address of an RDMA device in this thread's network namespace;
    /// port 0 picks a free one) and listens.
    pub fn bind(addr: SocketAddr) -> Result<Listener> {
        library::rdmacm()?;
        let id = CmId::new(Channel::new()?)?;
        let (mut ss, _) = to_sockaddr(&addr);
        // SAFETY: the id is live; `ss` holds a valid sockaddr.
        unsafe { result::cm::bind_addr(id.raw(), (&mut ss as *mut libc::sockaddr_storage).cast()) }?;
        // SAFETY: the id is bound.
        unsafe { result::cm::listen(id.raw(), 16) }?;
        // SAFETY: the id is bound, so route.addr's source holds the bound sockaddr (the shim
        // has no rdma_get_src_port); sin_port and sin6_port sit at the same offset.
        let port = u16::from_be(unsafe { (*id.raw()).route.addr.src_addr_union.src_sin.sin_port });
        Ok(Listener { id, addr: SocketAddr::new(addr.ip(), port) })
    }

    /// The bound address, with the port chosen when 0 was asked for.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The IP address it listens on.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    /// Waits up to `timeout` for the next connection request. The request borrows the
    /// listener: until accepted (or rejected) its id lives on the listener's event channel.
    pub fn get_request(&self, timeout: Duration) -> Result<ConnectRequest<'_>> {
        let ev = self.id.wait(sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST, timeout)?;
        let id = result::ptr("rdma_get_cm_event (connect request id)", ev.id)?;
        Ok(ConnectRequest { id: Some(id), private_data: ev.private_data, _listener: std::marker::PhantomData })
    }
}

/// A connection request a [`Listener`] received: accept or reject it (dropping rejects).
/// The accepted [`Connection`] no longer depends on the listener.
pub struct ConnectRequest<'l> {
    id: Option<NonNull<sys::rdma_cm_id>>,
    private_data: Vec<u8>,
    _listener: std::marker::PhantomData<&'l Listener>,
}

// SAFETY: the request's id is owned by this value alone until accepted or rejected; the
// listener it borrows is Sync (its id is only read).
unsafe impl Send for ConnectRequest<'_> {}

impl ConnectRequest<'_> {
    /// The private data the client sent (possibly zero-padded).
    pub fn private_data(&self) -> &[u8] {
        &self.private_data
    }

    /// The device the request arrived on.
    pub fn device_name(&self) -> Option<String> {
        let id = self.id?;
        // SAFETY: the id is live until accepted or rejected.
        let verbs = NonNull::new(unsafe { (*id.as_ptr()).verbs })?;
        Context::from_cm_context(verbs).ok().map(|c| c.name().to_string())
    }

    /// Accepts with a QP in `pd` (which must be on the device the request arrived on), sending
    /// `opts.private_data` back.
    pub fn accept(mut self, pd: &ProtectionDomain, opts: &ConnectionOptions) -> Result<Connection> {
        let param = conn_param(opts, MAX_ACCEPT_PRIVATE_DATA)?;
        let raw = self.id.take().ok_or_else(|| Error::InvalidArgument("request already used".into()))?;
        let channel = Channel::new()?;
        // SAFETY: `raw` is a live id whose CONNECT_REQUEST event is acked; moving it to its
        // own channel lets the connection outlive the listener.
        if let Err(e) = unsafe { result::cm::migrate_id(raw.as_ptr(), channel.0.as_ptr()) } {
            // SAFETY: still ours; reject and destroy it once.
            unsafe {
                let _ = result::cm::reject(raw.as_ptr());
                let _ = result::cm::destroy_id(raw);
            }
            return Err(e);
        }
        let mut id = CmId { id: raw, has_qp: false, channel };
        if let Err(e) = id.check_pd(pd) {
            // SAFETY: the id is live and not yet accepted.
            let _ = unsafe { result::cm::reject(id.raw()) };
            return Err(e);
        }
        let (qp, send_cq, recv_cq) = id.create_qp(pd, opts)?;
        let mut param = param;
        let established = (|| {
            // SAFETY: the id has a QP; `param` and its data outlive the call.
            unsafe { result::cm::accept(id.raw(), &mut param) }?;
            id.wait(sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED, opts.timeout)
        })();
        match established {
            Ok(_) => {
                let private = std::mem::take(&mut self.private_data);
                Ok(Connection::assemble(qp, id, send_cq, recv_cq, opts.srq.clone(), pd, private))
            }
            Err(e) => Err(teardown(qp, id, send_cq, recv_cq, e)),
        }
    }

    /// Rejects the request.
    pub fn reject(mut self) {
        self.reject_now();
    }

    fn reject_now(&mut self) {
        if let Some(id) = self.id.take() {
            // SAFETY: the id is live and ours; rejected and destroyed once.
            unsafe {
                let _ = result::cm::reject(id.as_ptr());
                let _ = result::cm::destroy_id(id);
            }
        }
    }
}

impl Drop for ConnectRequest<'_> {
    fn drop(&mut self) {
        self.reject_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_conversion_keeps_port_and_address() {
        let a: SocketAddr = "10.77.0.2:7471".parse().unwrap();
        let (ss, len) = to_sockaddr(&a);
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in>());
        // SAFETY: written as a sockaddr_in above.
        let sin: libc::sockaddr_in = unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
        assert_eq!(sin.sin_family as i32, libc::AF_INET);
        assert_eq!(u16::from_be(sin.sin_port), 7471);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [10, 77, 0, 2]);
    }

    #[test]
    fn oversized_private_data_is_refused() {
        let opts = ConnectionOptions { private_data: vec![0; 57], ..Default::default() };
        assert!(matches!(conn_param(&opts, MAX_CONNECT_PRIVATE_DATA), Err(Error::InvalidArgument(_))));
        assert!(conn_param(&opts, MAX_ACCEPT_PRIVATE_DATA).is_ok());
    }
}
