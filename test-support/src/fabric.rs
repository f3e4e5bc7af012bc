//! The Soft-RoCE test fabric that `scripts/softroce` sets up: two hosts, each a network
//! namespace with an rxe device on one end of a veth pair.
//!
//! rdma_cm resolves addresses in the network namespace of the calling thread, so a thread
//! that plays host A calls [`Host::enter`] first (it moves only that thread).
//!
//! ```no_run
//! use p2pbridge_test_support::fabric::SoftRoce;
//! let fabric = SoftRoce::from_env().expect("run under scripts/softroce");
//! let b = fabric.b.clone();
//! let server = std::thread::spawn(move || -> Result<(), p2pbridge_test_support::fabric::BoxError> {
//!     b.enter()?;
//!     // ... Listener::bind((b.addr, 0).into())? ...
//!     Ok(())
//! });
//! # server.join().unwrap()?;
//! # Ok::<(), p2pbridge_test_support::fabric::BoxError>(())
//! ```

use std::net::IpAddr;

use p2pbridge_verbs::{Connection, ConnectionOptions, Context, Listener, ProtectionDomain};

/// Any error, which can cross threads: what the set-up closures of
/// [`SoftRoce::connect_pair`] and the fabric's own steps return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One host of the fabric.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace (a name under /run/netns); empty: the caller's own.
    pub netns: String,
    /// Its IP address (on its rxe device's netdev).
    pub addr: IpAddr,
    /// Its RDMA device.
    pub device: String,
}

impl Host {
    /// Moves the calling thread into this host's network namespace (nothing to do when it has
    /// none).
    pub fn enter(&self) -> std::io::Result<()> {
        if self.netns.is_empty() {
            return Ok(());
        }
        let path = format!("/run/netns/{}", self.netns);
        let f = std::fs::File::open(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open {path}: {e} (is this running under scripts/softroce?)"))
        })?;
        use std::os::fd::AsFd;
        rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network)).map_err(
            |e| {
                let e = std::io::Error::from(e);
                std::io::Error::new(e.kind(), format!("setns(CLONE_NEWNET) into {path}: {e}"))
            },
        )
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

/// One connected side of a [`SoftRoce::connect_pair`]: its connection, its protection
/// domain, and what its set-up closure returned.
pub struct Side<T> {
    /// The connection.
    pub conn: Connection,
    /// The side's protection domain (on its host's device).
    pub pd: ProtectionDomain,
    /// What the set-up made (memory regions, ...).
    pub state: T,
}

impl SoftRoce {
    /// Connects a client on host A to a server on host B over rdma_cm.
    ///
    /// Each set-up closure runs on its host's thread with the side's protection domain, before
    /// connecting, and returns its state and the private data to send the other side (a
    /// [`RemoteBuf`](p2pbridge_verbs::RemoteBuf) descriptor, typically), or any error (`?`
    /// converts them all). The connections are returned to the caller's thread: once
    /// connected, a QP is not bound to a namespace.
    pub fn connect_pair<C, S>(
        &self,
        opts: ConnectionOptions,
        client_setup: impl FnOnce(&ProtectionDomain) -> Result<(C, Vec<u8>), BoxError> + Send + 'static,
        server_setup: impl FnOnce(&ProtectionDomain) -> Result<(S, Vec<u8>), BoxError> + Send + 'static,
    ) -> Result<(Side<C>, Side<S>), BoxError>
    where
        C: Send + 'static,
        S: Send + 'static,
    {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        // The client says when its set-up is done, so the server's timed wait for the request
        // does not include it (registering and filling large buffers can take a while).
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (b, sopts) = (self.b.clone(), opts.clone());
        let timeout = opts.timeout;
        let server = std::thread::spawn(move || -> Result<Side<S>, BoxError> {
            b.enter()?;
            let pd = ProtectionDomain::new(&Context::open(&b.device)?)?;
            let (state, private_data) = server_setup(&pd)?;
            let listener = Listener::bind((b.addr, 0).into())?;
            let _ = port_tx.send(listener.local_addr());
            ready_rx.recv().map_err(|_| "the client side failed before connecting")?;
            let req = listener.get_request(timeout)?;
            let conn = req.accept(&pd, &ConnectionOptions { private_data, ..sopts })?;
            Ok(Side { conn, pd, state })
        });
        let a = self.a.clone();
        let client = std::thread::spawn(move || -> Result<Side<C>, BoxError> {
            a.enter()?;
            let pd = ProtectionDomain::new(&Context::open(&a.device)?)?;
            let (state, private_data) = client_setup(&pd)?;
            let dst = port_rx.recv().map_err(|_| "the server side failed before listening")?;
            let _ = ready_tx.send(());
            let conn = Connection::connect(&pd, dst, &ConnectionOptions { private_data, ..opts })?;
            Ok(Side { conn, pd, state })
        });
        let panicked = |who: &str| -> BoxError { format!("the {who} thread panicked").into() };
        let c = client.join().unwrap_or_else(|_| Err(panicked("client")));
        let s = server.join().unwrap_or_else(|_| Err(panicked("server")));
        match (c, s) {
            (Ok(c), Ok(s)) => Ok((c, s)),
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => Err(e),
            (Err(ce), Err(se)) => Err(format!("client: {ce}; server: {se}").into()),
        }
    }
}

/// How many objects of `kind` ("mr", "cq", "qp", "pd", ...) the kernel holds for `device`, from
/// `rdma resource show` (iproute2): for tests that check nothing leaked.
pub fn kernel_count(device: &str, kind: &str) -> Result<usize, BoxError> {
    let out = std::process::Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .map_err(|e| format!("rdma resource show: {e} (install iproute2)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("{device}:")))
        .ok_or_else(|| format!("no {device} in `rdma resource show`: {text}"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == kind {
            if let Some(n) = words.next().and_then(|n| n.parse().ok()) {
                return Ok(n);
            }
        }
    }
    Err(format!("no {kind} count in `{line}`").into())
}

/// A command that runs `program` as on a host without rdma-core: libibverbs.so.1 and
/// librdmacm.so.1 are hidden from it by bind-mounting /dev/null over them in a private mount
/// namespace (`unshare -m`, or `unshare -r -m` when not root), so the dynamic loader fails as
/// where they are not installed. Where rdma-core really is absent, it is the plain command.
/// For tests of the "no RDMA here" paths.
pub fn without_rdma_core(program: &str) -> std::process::Command {
    let libs: Vec<String> = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("libibverbs.so.1 ") || l.contains("librdmacm.so.1 "))
        .filter_map(|l| l.rsplit("=> ").next().map(|p| p.trim().to_string()))
        .filter_map(|p| std::fs::canonicalize(&p).ok().map(|c| c.to_string_lossy().into_owned()))
        .collect();
    if libs.is_empty() {
        return std::process::Command::new(program);
    }
    let mut script = String::from("set -e; ");
    for l in &libs {
        script.push_str(&format!("mount --bind /dev/null '{l}'; "));
    }
    script.push_str("exec \"$0\" \"$@\"");
    let mut cmd = std::process::Command::new("unshare");
    if !rustix::process::geteuid().is_root() {
        cmd.arg("-r");
    }
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, program]);
    cmd
}
