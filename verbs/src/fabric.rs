//! The Soft-RoCE test fabric that `scripts/softroce` sets up: two hosts, each a network
//! namespace with an rxe device on one end of a veth pair.
//!
//! rdma_cm resolves addresses in the network namespace of the calling thread, so a thread
//! that plays host A calls [`Host::enter`] first (it moves only that thread).
//!
//! ```no_run
//! use p2pbridge_verbs::fabric::SoftRoce;
//! let fabric = SoftRoce::from_env().expect("run under scripts/softroce");
//! let b = fabric.b.clone();
//! let server = std::thread::spawn(move || {
//!     b.enter()?;
//!     // ... Listener::bind((b.addr, 0).into()) ...
//!     Ok::<(), p2pbridge_verbs::Error>(())
//! });
//! # server.join().unwrap()?;
//! # Ok::<(), p2pbridge_verbs::Error>(())
//! ```

use std::net::IpAddr;

use crate::error::{Error, Result};

/// One host of the fabric.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace (a name under /run/netns).
    pub netns: String,
    /// Its IP address (on its rxe device's netdev).
    pub addr: IpAddr,
    /// Its RDMA device.
    pub device: String,
}

impl Host {
    /// Moves the calling thread into this host's network namespace.
    pub fn enter(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.netns);
        let f = std::fs::File::open(&path)
            .map_err(|e| Error::InvalidArgument(format!("cannot open {path}: {e} (is this running under scripts/softroce?)")))?;
        use std::os::fd::AsFd;
        rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
            .map_err(|e| crate::result::verb_error("setns(CLONE_NEWNET)", e.raw_os_error()))
    }
}

/// The two hosts `scripts/softroce` made, read from its environment variables.
#[derive(Debug, Clone)]
pub struct SoftRoce {
    /// Host A (`P2PB_HOST_A`, `P2PB_ADDR_A`, `P2PB_DEV_A`).
    pub a: Host,
    /// Host B (`P2PB_HOST_B`, `P2PB_ADDR_B`, `P2PB_DEV_B`).
    pub b: Host,
    /// The kernel release the fabric runs on (`P2PB_KERNEL`).
    pub kernel: String,
}

impl SoftRoce {
    /// The fabric, when running under `scripts/softroce`; `None` otherwise.
    pub fn from_env() -> Option<Self> {
        let v = |k: &str| std::env::var(k).ok();
        if v("P2PB_SOFTROCE")? != "1" {
            return None;
        }
        let host = |n: &str| -> Option<Host> {
            Some(Host {
                netns: v(&format!("P2PB_HOST_{n}"))?,
                addr: v(&format!("P2PB_ADDR_{n}"))?.parse().ok()?,
                device: v(&format!("P2PB_DEV_{n}"))?,
            })
        };
        Some(SoftRoce { a: host("A")?, b: host("B")?, kernel: v("P2PB_KERNEL").unwrap_or_default() })
    }
}
