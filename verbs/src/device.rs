//! RDMA devices, opened contexts, ports and GIDs.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::caps::DeviceCaps;
use crate::error::{Error, Result};
use crate::{library, result, sys};

/// The names of the RDMA devices on this host (`ibv_get_device_list`).
///
/// ```no_run
/// for name in p2pbridge_verbs::device_names()? {
///     println!("{name}");
/// }
/// # Ok::<(), p2pbridge_verbs::Error>(())
/// ```
pub fn device_names() -> Result<Vec<String>> {
    library::ibverbs()?;
    // The list is freed below with ibv_free_device_list.
    let (list, n) = result::device::get_device_list()?;
    let mut names = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: the list holds `n` valid device pointers.
        let dev = unsafe { *list.as_ptr().add(i) };
        names.push(device_name(dev));
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { result::device::free_device_list(list) };
    Ok(names)
}

fn device_name(dev: *mut sys::ibv_device) -> String {
    // SAFETY: `dev` is a live ibv_device; the name is copied out before this returns.
    match unsafe { result::device::get_device_name(dev) } {
        Some(name) => name.to_string_lossy().into_owned(),
        None => String::from("?"),
    }
}

/// Where a context came from, which decides how it is released.
enum Origin {
    /// `ibv_open_device`: closed with `ibv_close_device`.
    Verbs,
    /// librdmacm's own context for the device (`rdma_get_devices`), shared with every
    /// `rdma_cm_id` routed through that device; the list is freed, the context stays
    /// librdmacm's.
    Cm(NonNull<*mut sys::ibv_context>),
}

pub(crate) struct ContextInner {
    ctx: NonNull<sys::ibv_context>,
    name: String,
    origin: Origin,
    /// What the device's asynchronous events said.
    pub(crate) faults: Arc<crate::fault::DeviceFaults>,
}

// SAFETY: libibverbs contexts may be used from any thread (rdma-core documents its verbs as
// thread-safe); the raw pointers here are only handed to verbs.
unsafe impl Send for ContextInner {}
// SAFETY: as above; no interior state is touched outside verbs.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        crate::fault::DeviceFaults::release(&self.faults);
        match self.origin {
            Origin::Verbs => {
                // SAFETY: we opened this context and no PD, CQ or MR outlives it (they hold an Arc).
                let _ = unsafe { result::device::close_device(self.ctx) };
            }
            // SAFETY: the list came from rdma_get_devices and is freed once.
            Origin::Cm(list) => unsafe { result::device::rdma_free_devices(list) },
        }
    }
}

/// An open RDMA device (`struct ibv_context`).
///
/// Where librdmacm is present, the context is librdmacm's own for that device, so protection
/// domains and memory regions made from it can be used on connections that rdma_cm routes
/// through the same device.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("name", &self.inner.name).finish()
    }
}

impl Context {
    /// Opens the device called `name` (as `ibv_devices` lists it).
    ///
    /// ```no_run
    /// let ctx = p2pbridge_verbs::Context::open("rxe0")?;
    /// println!("{} max_mr_size={}", ctx.name(), ctx.caps()?.max_mr_size);
    /// # Ok::<(), p2pbridge_verbs::Error>(())
    /// ```
    pub fn open(name: &str) -> Result<Self> {
        library::ibverbs()?;
        if let Some(ctx) = Self::open_from_cm(name) {
            return Ok(ctx);
        }
        // The list is freed before returning.
        let (list, n) = result::device::get_device_list()?;
        let mut present = Vec::new();
        let mut found = None;
        for i in 0..n {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.as_ptr().add(i) };
            let dn = device_name(dev);
            if dn == name {
                // SAFETY: `dev` is a live device from the list; opening it before the list is
                // freed is what rdma-core requires.
                found = Some(unsafe { result::device::open_device(dev) });
            }
            present.push(dn);
        }
        // SAFETY: freed once; opened contexts stay valid after the list is freed.
        unsafe { result::device::free_device_list(list) };
        match found {
            Some(ctx) => {
                let ctx = ctx?;
                // SAFETY: a context we just opened, live while the `ContextInner` holding both is.
                let faults = unsafe { crate::fault::DeviceFaults::of(ctx.as_ptr()) };
                Ok(Context {
                    inner: Arc::new(ContextInner { ctx, name: name.to_string(), origin: Origin::Verbs, faults }),
                })
            }
            None => Err(Error::NoSuchDevice { name: name.to_string(), present }),
        }
    }

    /// The context librdmacm uses for `name`, if librdmacm is present and knows the device.
    fn open_from_cm(name: &str) -> Option<Self> {
        library::rdmacm().ok()?;
        // The list is kept (and freed) by the Context.
        let (list, n) = result::device::rdma_get_devices().ok()?;
        for i in 0..n {
            // SAFETY: the list holds `n` context pointers.
            let ctx = unsafe { *list.as_ptr().add(i) };
            // SAFETY: librdmacm's contexts are open and their `device` is valid.
            if !ctx.is_null() && device_name(unsafe { (*ctx).device }) == name {
                let ctx = NonNull::new(ctx)?;
                // SAFETY: librdmacm's context stays open while the list is held, which the
                // `ContextInner` holding both does.
                let faults = unsafe { crate::fault::DeviceFaults::of(ctx.as_ptr()) };
                return Some(Context {
                    inner: Arc::new(ContextInner { ctx, name: name.to_string(), origin: Origin::Cm(list), faults }),
                });
            }
        }
        // SAFETY: the list came from rdma_get_devices and is freed once.
        unsafe { result::device::rdma_free_devices(list) };
        None
    }

    /// Wraps a context that librdmacm handed out (a cm_id's `verbs`), keeping the cm list
    /// alive so the context is not released under us.
    pub(crate) fn from_cm_context(ctx: NonNull<sys::ibv_context>) -> Result<Self> {
        // SAFETY: a cm_id's verbs context is open and its device valid.
        let name = device_name(unsafe { (*ctx.as_ptr()).device });
        match Self::open_from_cm(&name) {
            Some(c) if c.inner.ctx == ctx => Ok(c),
            _ => Err(Error::InvalidArgument(format!(
                "rdma_cm routed through {name}, whose context is not in rdma_get_devices()"
            ))),
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Reads the device's pending asynchronous events (without blocking) and returns the
    /// fault, if any, that concerns a connection on `port` whose QP number is `qpn`.
    pub(crate) fn fault_for(&self, qpn: u32, port: u8) -> Option<crate::Fault> {
        // SAFETY: the context is live while `self` is; the faults are this context's.
        unsafe { self.inner.faults.poll(self.inner.ctx.as_ptr()) };
        self.inner.faults.for_qp(qpn, port)
    }

    /// The raw context, for the `sys` layer.
    pub fn as_raw(&self) -> *mut sys::ibv_context {
        self.inner.ctx.as_ptr()
    }

    /// The device's capabilities (`ibv_query_device_ex`).
    pub fn caps(&self) -> Result<DeviceCaps> {
        DeviceCaps::query(self)
    }

    /// The attributes of port `port` (1-based).
    pub fn port(&self, port: u8) -> Result<PortInfo> {
        // SAFETY: ibv_port_attr is plain old data; all-zero is a valid value.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `attr` is a valid out-pointer of the right size.
        unsafe { result::device::query_port(self.as_raw(), port, &mut attr) }?;
        Ok(PortInfo {
            port,
            state: PortState::from_raw(attr.state),
            active_mtu: mtu_bytes(attr.active_mtu),
            max_mtu: mtu_bytes(attr.max_mtu),
            link_layer: match attr.link_layer {
                sys::IBV_LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
                sys::IBV_LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
                _ => LinkLayer::Unspecified,
            },
            gid_table_len: attr.gid_tbl_len.max(0) as u32,
            max_msg_size: attr.max_msg_sz,
        })
    }

    /// The valid entries of the GID table of every port (`ibv_query_gid_table`).
    pub fn gids(&self) -> Result<Vec<GidEntry>> {
        let caps = self.caps()?;
        let mut total = 0usize;
        for p in 1..=caps.phys_port_cnt {
            total += self.port(p)?.gid_table_len as usize;
        }
        // SAFETY: ibv_gid_entry is plain old data; all-zero is valid.
        let mut entries: Vec<sys::ibv_gid_entry> = vec![unsafe { std::mem::zeroed() }; total.max(1)];
        // SAFETY: the context is open; `entries` has room for `entries.len()` entries.
        let n = unsafe { result::device::query_gid_table(self.as_raw(), &mut entries) }?;
        Ok(entries[..n]
            .iter()
            .map(|e| GidEntry {
                // SAFETY: every bit pattern of the 16-byte union is a valid [u8; 16].
                gid: unsafe { e.gid.raw },
                index: e.gid_index,
                port: e.port_num,
                kind: match e.gid_type {
                    sys::IBV_GID_TYPE_IB => GidKind::Ib,
                    sys::IBV_GID_TYPE_ROCE_V1 => GidKind::RoceV1,
                    sys::IBV_GID_TYPE_ROCE_V2 => GidKind::RoceV2,
                    _ => GidKind::Other,
                },
                ifindex: e.ndev_ifindex,
            })
            .collect())
    }
}

fn mtu_bytes(m: sys::ibv_mtu::Type) -> u32 {
    use sys::ibv_mtu as mtu;
    match m {
        mtu::IBV_MTU_256 => 256,
        mtu::IBV_MTU_512 => 512,
        mtu::IBV_MTU_1024 => 1024,
        mtu::IBV_MTU_2048 => 2048,
        mtu::IBV_MTU_4096 => 4096,
        _ => 0,
    }
}

/// A port's logical state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// IBV_PORT_DOWN
    Down,
    /// IBV_PORT_INIT
    Init,
    /// IBV_PORT_ARMED
    Armed,
    /// IBV_PORT_ACTIVE
    Active,
    /// IBV_PORT_ACTIVE_DEFER
    ActiveDefer,
    /// IBV_PORT_NOP or a value this crate does not know.
    Other(u32),
}

impl PortState {
    fn from_raw(v: sys::ibv_port_state::Type) -> Self {
        use sys::ibv_port_state as s;
        match v {
            s::IBV_PORT_DOWN => PortState::Down,
            s::IBV_PORT_INIT => PortState::Init,
            s::IBV_PORT_ARMED => PortState::Armed,
            s::IBV_PORT_ACTIVE => PortState::Active,
            s::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            o => PortState::Other(o),
        }
    }
}

/// The link layer under a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// InfiniBand.
    InfiniBand,
    /// Ethernet (RoCE, iWARP).
    Ethernet,
    /// Not reported.
    Unspecified,
}

/// What `ibv_query_port` says of a port.
#[derive(Debug, Clone)]
pub struct PortInfo {
    /// The port number (1-based).
    pub port: u8,
    /// Logical state; RDMA needs `Active`.
    pub state: PortState,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// Largest MTU in bytes.
    pub max_mtu: u32,
    /// The link layer.
    pub link_layer: LinkLayer,
    /// Length of the GID table.
    pub gid_table_len: u32,
    /// Largest message size.
    pub max_msg_size: u32,
}

/// The kind of a GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    /// InfiniBand.
    Ib,
    /// RoCE v1.
    RoceV1,
    /// RoCE v2 (UDP/IP).
    RoceV2,
    /// Something else.
    Other,
}

/// One valid entry of a port's GID table.
#[derive(Debug, Clone)]
pub struct GidEntry {
    /// The GID, network order.
    pub gid: [u8; 16],
    /// Its index in the table.
    pub index: u32,
    /// Its port.
    pub port: u32,
    /// Its kind.
    pub kind: GidKind,
    /// The netdev it belongs to (RoCE).
    pub ifindex: u32,
}

impl GidEntry {
    /// The GID as an IPv6 address (RoCE GIDs of IPv4 addresses are v4-mapped).
    pub fn as_ipv6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::from(self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_enum_maps_to_bytes() {
        assert_eq!(mtu_bytes(1), 256);
        assert_eq!(mtu_bytes(3), 1024);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(mtu_bytes(0), 0);
        assert_eq!(mtu_bytes(9), 0);
    }
}
