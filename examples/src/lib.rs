//! Helpers shared by the examples: the memory they move, their command line (where the two
//! halves run), connecting those halves, and how a binary reports an error and exits.
//!
//! Every example with a client and a server half runs them
//! - both in one process, across the two Soft-RoCE hosts, when started with no `--server` or
//!   `--client` under `scripts/softroce` ([`Mode::Fabric`]);
//! - as a server alone: `--server ADDR:PORT` ([`Mode::Server`]);
//! - as a client alone: `--client ADDR:PORT --device NAME` ([`Mode::Client`]).
//!
//! The halves are the same functions in every mode: in one process each runs on its own
//! thread with its own connection, exactly as two processes would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pbridge::verbs::{
    AccessFlags, Connection, ConnectionOptions, Context, Error as VerbsError, HostBuffer, Listener, ProtectionDomain,
    SendFlags,
};
use p2pbridge::{Bridge, BridgeOptions};
use p2pbridge_gpu::{CudaBackend, HostBackend, MemoryBackend};
use p2pbridge_test_support::fabric::{Side, SoftRoce};

pub use p2pbridge_test_support::cli::{exit_status, parse_size, Res};

/// The memory the examples move: CUDA device 0 where there is one, else host memory (the
/// host backend), and a line saying which and why.
pub fn pick_backend() -> (Arc<dyn MemoryBackend>, String) {
    match CudaBackend::new(0) {
        Ok(g) => (Arc::new(g), "CUDA device 0".to_string()),
        Err(e) => (Arc::new(HostBackend::new()), format!("host memory (no GPU: {e})")),
    }
}

/// One side of an example: the backend ([`pick_backend`]), a bridge on `pd` that knows it, and
/// the line saying which memory it is.
pub fn bridged(pd: &ProtectionDomain) -> Res<(Arc<dyn MemoryBackend>, Bridge, String)> {
    let (mem, what) = pick_backend();
    let bridge = Bridge::new(pd, vec![mem.clone()], BridgeOptions::default())?;
    Ok((mem, bridge, what))
}

// ---------------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------------

/// The exit codes every example documents: 0 done (and verified), 1 a failure while running
/// (printed as `NAME: error`), 2 a usage error (clap's, printed with the usage).
pub const EXIT_CODES: &str = "Exit status: 0 done, every check passed; 1 failed while running (the error is printed as `NAME: ERROR`); 2 usage error (bad or missing arguments).";

/// Where an example's halves run: `--server`, `--client` and `--device`, flattened into each
/// example's arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct Endpoint {
    /// Serve the server half: listen at ADDR:PORT (an address of an RDMA device on this host;
    /// port 0 picks a free one, printed as "listening on ADDR:PORT")
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "client")]
    pub server: Option<SocketAddr>,
    /// Run the client half against a server listening at ADDR:PORT
    #[arg(long, value_name = "ADDR:PORT", requires = "device")]
    pub client: Option<SocketAddr>,
    /// The RDMA device the client connects through (`ibv_devices`, `p2pbridge probe`)
    #[arg(long, value_name = "NAME", requires = "client")]
    pub device: Option<String>,
    /// With --server: how many clients to serve, one after another, before exiting 0 (0: serve
    /// until killed)
    #[arg(long, value_name = "N", default_value_t = 1, requires = "server")]
    pub clients: u32,
}

/// Where the halves run, from an [`Endpoint`] and the environment.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Both halves in this process: the client on Soft-RoCE host A, the server on host B.
    Fabric(SoftRoce),
    /// The server half alone, listening at `addr`, for `clients` clients (0: for ever).
    Server {
        /// Where to listen.
        addr: SocketAddr,
        /// How many clients to serve.
        clients: u32,
    },
    /// The client half alone, connecting to `addr` through `device`.
    Client {
        /// The server's address.
        addr: SocketAddr,
        /// The local RDMA device.
        device: String,
    },
}

impl Endpoint {
    /// The mode asked for. With neither `--server` nor `--client`, the Soft-RoCE fabric of
    /// `scripts/softroce`; outside it, a usage error: printed with `C`'s usage, exit status 2.
    pub fn mode<C: clap::CommandFactory>(&self) -> Mode {
        match (self.server, self.client, &self.device) {
            (Some(addr), _, _) => Mode::Server { addr, clients: self.clients },
            (None, Some(addr), Some(device)) => Mode::Client { addr, device: device.clone() },
            _ => match SoftRoce::from_env() {
                Some(f) => Mode::Fabric(f),
                None => C::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "give --server ADDR:PORT or --client ADDR:PORT --device NAME, or run with neither under scripts/softroce (two Soft-RoCE hosts)",
                    )
                    .exit(),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting the halves
// ---------------------------------------------------------------------------------------------

/// The connection options of the examples: rdma_cm steps may take a minute (an emulated guest
/// is slow), and a SEND waits for the peer's receive for as long as it takes (RNR retry 7),
/// since the halves post their receives only when they get there.
pub fn conn_opts() -> ConnectionOptions {
    ConnectionOptions { timeout: Duration::from_secs(60), rnr_retry_count: 7, ..Default::default() }
}

/// A set-up closure: given the side's protection domain, before connecting, it returns the
/// side's state and the private data to send with the connect request or the accept.
pub trait Setup<T>: Fn(&ProtectionDomain) -> Res<(T, Vec<u8>)> + Send + Sync + 'static {}
impl<T, F: Fn(&ProtectionDomain) -> Res<(T, Vec<u8>)> + Send + Sync + 'static> Setup<T> for F {}

/// Runs an example in `mode`: the client half (`client`, on a connection set up with
/// `client_setup`) and/or the server half (`server`, once per client, each on a connection set
/// up with `server_setup`).
///
/// In [`Mode::Fabric`] both run at once, each on its own thread; the client's connection is
/// dropped (disconnected) when its half returns, which is what ends a server half waiting for
/// [`Connection::wait_disconnect`].
pub fn run_halves<C: Send + 'static, S: Send + 'static>(
    mode: Mode,
    opts: ConnectionOptions,
    client_setup: impl Setup<C>,
    server_setup: impl Setup<S>,
    client: impl FnOnce(Side<C>) -> Res,
    mut server: impl FnMut(Side<S>) -> Res + Send,
) -> Res {
    match mode {
        Mode::Fabric(fabric) => {
            let (c, s) = fabric.connect_pair(opts, client_setup, server_setup)?;
            std::thread::scope(|scope| {
                let srv = scope.spawn(move || server(s));
                let cr = client(c);
                let sr = srv.join().unwrap_or_else(|_| Err("the server half panicked".into()));
                match (cr, sr) {
                    (Ok(()), Ok(())) => Ok(()),
                    (Err(e), Ok(())) => Err(format!("client: {e}").into()),
                    (Ok(()), Err(e)) => Err(format!("server: {e}").into()),
                    (Err(ce), Err(se)) => Err(format!("client: {ce}; server: {se}").into()),
                }
            })
        }
        Mode::Server { addr, clients } => serve(addr, clients, &opts, server_setup, server),
        Mode::Client { addr, device } => client(connect(addr, &device, opts, client_setup)?),
    }
}

/// Listens at `addr` and serves `clients` clients (0: for ever), one after another: for each,
/// `setup` on a protection domain of the device the request arrived on, accept, `serve_one`.
pub fn serve<S>(
    addr: SocketAddr,
    clients: u32,
    opts: &ConnectionOptions,
    setup: impl Setup<S>,
    mut serve_one: impl FnMut(Side<S>) -> Res,
) -> Res {
    let listener = Listener::bind(addr)?;
    println!("listening on {}", listener.local_addr());
    let mut served = 0u32;
    while clients == 0 || served < clients {
        let req = match listener.get_request(Duration::from_secs(3600)) {
            Err(VerbsError::Timeout(..)) => continue,
            r => r?,
        };
        let dev = req.device_name().ok_or("a connection request on an unknown device")?;
        let pd = ProtectionDomain::new(&Context::open(&dev)?)?;
        let (state, private_data) = setup(&pd)?;
        let conn = req.accept(&pd, &ConnectionOptions { private_data, ..opts.clone() })?;
        served += 1;
        println!("client {served} connected through {dev}");
        serve_one(Side { conn, pd, state })?;
        println!("client {served} done");
    }
    Ok(())
}

/// Connects to a server at `addr` through `device`, after `setup` on the device's protection
/// domain.
pub fn connect<C>(addr: SocketAddr, device: &str, opts: ConnectionOptions, setup: impl Setup<C>) -> Res<Side<C>> {
    let pd = ProtectionDomain::new(&Context::open(device)?)?;
    let (state, private_data) = setup(&pd)?;
    let conn = Connection::connect(&pd, addr, &ConnectionOptions { private_data, ..opts })?;
    println!("connected to {addr} through {device}");
    Ok(Side { conn, pd, state })
}

/// How long a server half waits for its client to disconnect.
pub const SERVE_FOR: Duration = Duration::from_secs(24 * 3600);

// ---------------------------------------------------------------------------------------------
// Small messages between the halves
// ---------------------------------------------------------------------------------------------

/// Work request ids of [`send_word`] and [`recv_word`]: their own range, so that they never
/// take the bridge's completions (or it theirs) on the shared completion queues.
static NEXT_WR: AtomicU64 = AtomicU64::new(0x4558_414d_0000_0000);

/// Waits up to `timeout` for the completion of `id` on `cq`, failing early if the connection
/// is lost.
fn reap(conn: &Connection, send: bool, id: u64, timeout: Duration) -> Res<p2pbridge::verbs::WorkCompletion> {
    let cq = if send { conn.send_cq() } else { conn.recv_cq() };
    let start = Instant::now();
    loop {
        match cq.wait_wr(id, Duration::from_millis(100)) {
            Err(VerbsError::Timeout(..)) => {
                if let Some(cause) = conn.fault() {
                    return Err(VerbsError::ConnectionLost { cause }.into());
                }
                if start.elapsed() >= timeout {
                    // The request may still be outstanding: stop the queue pair so that it can
                    // no longer touch the buffer this function's caller is about to drop.
                    let _ = conn.qp().set_error();
                    let _ = cq.wait_wr(id, Duration::from_secs(5));
                    return Err(format!("no message from the peer within {timeout:?}").into());
                }
            }
            r => return Ok(r?),
        }
    }
}

/// Sends one 8-byte message (a step of an example's protocol) to the peer, which takes it
/// with [`recv_word`].
pub fn send_word(conn: &Connection, word: u64) -> Res {
    let mut buf = HostBuffer::new(8)?;
    buf.as_mut_slice().copy_from_slice(&word.to_le_bytes());
    let mr = conn.pd().register(buf, AccessFlags::LOCAL_WRITE)?;
    let id = NEXT_WR.fetch_add(1, Ordering::Relaxed);
    conn.send_cq().expect(id);
    // SAFETY: `mr` stays registered until the SEND is reaped, and is leaked (never
    // deregistered) where `reap` fails, since the SEND may then still be outstanding.
    if let Err(e) = unsafe { conn.qp().post_send(id, &mr.slice(..)?, None, SendFlags::SIGNALED) } {
        conn.send_cq().unexpect(id);
        return Err(e.into());
    }
    if let Err(e) = reap(conn, true, id, Duration::from_secs(3600)) {
        std::mem::forget(mr);
        return Err(e);
    }
    Ok(())
}

/// Waits up to `timeout` for the peer's next [`send_word`] message.
pub fn recv_word(conn: &Connection, timeout: Duration) -> Res<u64> {
    let mr = conn.pd().register(HostBuffer::new(8)?, AccessFlags::LOCAL_WRITE)?;
    let id = NEXT_WR.fetch_add(1, Ordering::Relaxed);
    conn.recv_cq().expect(id);
    // SAFETY: `mr` stays registered until the receive is reaped, and is leaked (never
    // deregistered) where `reap` fails, since the receive may then still be outstanding.
    if let Err(e) = unsafe { conn.qp().post_recv(id, &mr.slice(..)?) } {
        conn.recv_cq().unexpect(id);
        return Err(e.into());
    }
    let wc = match reap(conn, false, id, timeout) {
        Ok(wc) => wc,
        Err(e) => {
            std::mem::forget(mr);
            return Err(e);
        }
    };
    if wc.byte_len != 8 {
        return Err(format!("a message of {} bytes, not 8: is the peer this example?", wc.byte_len).into());
    }
    let b = mr.to_vec();
    Ok(u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
}
