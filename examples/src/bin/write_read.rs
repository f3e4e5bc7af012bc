//! A client writes a buffer into a server's buffer over RDMA, then reads it back.
//!
//! On the Soft-RoCE fabric (both halves in this one process, each in its own host's network
//! namespace):
//!
//! ```text
//! cargo build --release -p p2pbridge-examples
//! scripts/softroce target/release/write_read --size 16MiB
//! ```
//!
//! Across two machines (both with the same `--size`):
//!
//! ```text
//! server$ write_read --server 192.0.2.10:7471 --size 16MiB
//! client$ write_read --client 192.0.2.10:7471 --device mlx5_0 --size 16MiB
//! ```
//!
//! The server registers a buffer for remote read and write and sends its descriptor (address,
//! length, rkey) in rdma_cm's private data; the client RDMA WRITEs a pattern into it, RDMA
//! READs it back and compares byte for byte ("read-back matches: true"). Once the client has
//! disconnected, the server checks that its buffer holds the pattern ("server buffer matches:
//! true"), and exits (after `--clients N` clients, default 1).
//!
//! Exit status: 0 done, every check passed; 1 failed while running (printed as
//! `write_read: ERROR`), a mismatch included; 2 usage error.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use p2pbridge_examples::{conn_opts, exit_status, parse_size, run_halves, Endpoint, Mode, Res, EXIT_CODES, SERVE_FOR};
use p2pbridge_test_support::fabric::Side;
use p2pbridge_test_support::pattern;
use p2pbridge_verbs::{
    AccessFlags, Connection, Error, HostBuffer, MemoryRegion, ProtectionDomain, RemoteBuf, SendFlags,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A client RDMA WRITEs a buffer into a server's buffer, RDMA READs it back, and both check
/// it byte for byte.
///
/// With neither --server nor --client it runs both halves across the two Soft-RoCE hosts of
/// scripts/softroce.
#[derive(Parser, Debug)]
#[command(
    name = "write_read",
    version,
    override_usage = "write_read [--size SIZE] [--server ADDR:PORT [--clients N] | --client ADDR:PORT --device NAME]",
    after_help = EXIT_CODES
)]
struct Args {
    /// Bytes to write and read back (4096, 64KiB, 16MiB, 1GiB); server and client need the same
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    size: usize,
    #[command(flatten)]
    endpoint: Endpoint,
}

/// The seed of the pattern the client writes (and the server checks).
const SEED: u8 = 0x5a;

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1 << 20) as f64
}

/// The client's transfers: write `src` to `remote`, read it back into `back`.
fn write_then_read(
    conn: &Connection,
    src: &MemoryRegion<HostBuffer>,
    back: &MemoryRegion<HostBuffer>,
    remote: RemoteBuf,
) -> Result<(Duration, Duration), Error> {
    let n = src.len();
    let t = Instant::now();
    // SAFETY: `src` is the caller's `Side` state, whose connection (declared first) is
    // dropped — its queue pair destroyed, ending the WRITE — before `src` is.
    unsafe { conn.qp().post_write(1, &src.slice(..)?, &remote.slice(..n)?, SendFlags::SIGNALED) }?;
    conn.send_cq().wait_one(TIMEOUT)?;
    let write = t.elapsed();
    let t = Instant::now();
    // SAFETY: `back` is the caller's `Side` state, whose connection (declared first) is
    // dropped — its queue pair destroyed, ending the READ — before `back` is, whether or not
    // the completion is reaped here.
    unsafe { conn.qp().post_read(2, &back.slice(..)?, &remote.slice(..n)?, SendFlags::SIGNALED) }?;
    conn.send_cq().wait_one(TIMEOUT)?;
    Ok((write, t.elapsed()))
}

/// The client's buffers: the pattern to write, and room to read it back into.
type ClientState = (MemoryRegion<HostBuffer>, MemoryRegion<HostBuffer>);

fn client_setup(pd: &ProtectionDomain, size: usize) -> Res<(ClientState, Vec<u8>)> {
    let src = pd.register(HostBuffer::new(size)?, AccessFlags::LOCAL_WRITE)?;
    src.bytes().copy_from(&pattern(size, SEED)[..]);
    let back = pd.register(HostBuffer::new(size)?, AccessFlags::LOCAL_WRITE)?;
    Ok(((src, back), Vec::new()))
}

/// The server's buffer, registered for remote read and write; its descriptor goes to the
/// client as the accept's private data.
fn server_setup(pd: &ProtectionDomain, size: usize) -> Res<(MemoryRegion<HostBuffer>, Vec<u8>)> {
    let mr = pd.register(HostBuffer::new(size)?, AccessFlags::remote_rw())?;
    let desc = mr.remote().to_bytes().to_vec();
    Ok((mr, desc))
}

/// The client half: write, read back, compare.
fn client_half(side: Side<ClientState>, size: usize) -> Res {
    let remote = RemoteBuf::from_bytes(side.conn.remote_private_data())?;
    println!("server buffer: addr {:#x}, {} B, rkey {:#x}", remote.addr, remote.len, remote.rkey);
    if remote.len != size as u64 {
        return Err(format!(
            "the server's buffer has {} B, this client's --size is {size} B: give both the same --size",
            remote.len
        )
        .into());
    }
    let (src, back) = &side.state;
    let (w, r) = write_then_read(&side.conn, src, back, remote)?;
    println!("RDMA WRITE {size} B in {w:?}: {:.1} MiB/s", mib_per_s(size, w));
    println!("RDMA READ  {size} B in {r:?}: {:.1} MiB/s", mib_per_s(size, r));
    let ok = back.to_vec() == src.to_vec();
    println!("read-back matches: {ok}");
    if !ok {
        return Err("data mismatch: the buffer read back differs from the one written".into());
    }
    Ok(())
}

/// The server half: wait for the client to finish (disconnect), then check the buffer.
fn server_half(side: Side<MemoryRegion<HostBuffer>>, size: usize) -> Res {
    side.conn.wait_disconnect(SERVE_FOR)?;
    let ok = side.state.to_vec() == pattern(size, SEED);
    println!("server buffer matches: {ok}");
    if !ok {
        return Err("data mismatch: the server's buffer does not hold the client's pattern (did the client fail, or run with another --size?)".into());
    }
    Ok(())
}

fn run(args: Args) -> Res {
    let size = args.size;
    let mode = args.endpoint.mode::<Args>();
    if let Mode::Fabric(f) = &mode {
        println!(
            "Soft-RoCE: client {} ({}) -> server {} ({}), kernel {}",
            f.a.device, f.a.addr, f.b.device, f.b.addr, f.kernel
        );
    }
    run_halves(
        mode,
        conn_opts(),
        move |pd| client_setup(pd, size),
        move |pd| server_setup(pd, size),
        |side| client_half(side, size),
        |side| server_half(side, size),
    )?;
    println!("ok");
    Ok(())
}

fn main() -> ExitCode {
    exit_status("write_read", run(Args::parse()))
}
