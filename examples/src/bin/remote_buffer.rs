//! Write into a remote GPU (or host) buffer over RDMA and read it back, through the bridge.
//!
//! ```text
//! cargo build --release -p p2pbridge-examples && scripts/softroce target/release/remote_buffer
//! ```
//!
//! Across two machines:
//!
//! ```text
//! server$ remote_buffer --server 192.0.2.10:7471
//! client$ remote_buffer --client 192.0.2.10:7471 --device mlx5_0
//! ```
//!
//! The server allocates a buffer with the best backend it has (CUDA, else host memory),
//! registers it through the bridge — which picks dma-buf, peer memory, ODP, pinned or bounce
//! and says why — and sends the key (address, length, rkey, generation) over the connection.
//! The client writes a pattern into it and says so; the server flushes (NIC writes made
//! visible to the GPU), checks the pattern byte for byte, fills its buffer with a second
//! pattern and says whether the check passed; the client reads the buffer back and checks it.
//! The server then waits for the client to disconnect and exits (after `--clients N` clients,
//! default 1).
//!
//! Exit status: 0 done, every check passed; 1 failed while running (printed as
//! `remote_buffer: ERROR`), a mismatch on either side included; 2 usage error.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use p2pbridge::gpu::{DeviceBuffer, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, ProtectionDomain};
use p2pbridge::{Bridge, Registered};
use p2pbridge_examples::{
    bridged, conn_opts, exit_status, recv_word, run_halves, send_word, Endpoint, Res, EXIT_CODES, SERVE_FOR,
};
use p2pbridge_test_support::fabric::Side;
use p2pbridge_test_support::pattern;

const LEN: usize = 8 << 20;

/// The steps of the protocol, as words sent between the halves.
const WRITTEN: u64 = 1;
const VERIFIED: u64 = 2;
const MISMATCH: u64 = 3;

/// How long a half waits for the other's next step.
const STEP: Duration = Duration::from_secs(120);

/// A client writes into a server's GPU (or host) buffer through the bridge, the server checks
/// it, and the client reads the server's next contents back and checks them.
///
/// With neither --server nor --client it runs both halves across the two Soft-RoCE hosts of
/// scripts/softroce.
#[derive(Parser, Debug)]
#[command(
    name = "remote_buffer",
    version,
    override_usage = "remote_buffer [--server ADDR:PORT [--clients N] | --client ADDR:PORT --device NAME]",
    after_help = EXIT_CODES
)]
struct Args {
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Each side: a backend, a bridge on its PD, a buffer registered through the bridge.
type State = (Arc<dyn MemoryBackend>, Bridge, DeviceBuffer, Registered);

fn client_setup(pd: &ProtectionDomain) -> Res<(State, Vec<u8>)> {
    let (mem, bridge, what) = bridged(pd)?;
    let buf = mem.alloc(LEN)?;
    mem.copy_to_device(&buf, 0, &pattern(LEN, 1))?;
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw())?;
    println!(
        "client: {what}, registered with {} (skipped: {:?})",
        reg.strategy(),
        reg.skipped().iter().map(|(s, r)| format!("{s}: {r}")).collect::<Vec<_>>()
    );
    Ok(((mem, bridge, buf, reg), Vec::new()))
}

fn server_setup(pd: &ProtectionDomain) -> Res<(State, Vec<u8>)> {
    let (mem, bridge, what) = bridged(pd)?;
    let buf = mem.alloc(LEN)?;
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw())?;
    println!("server: {what}, registered with {}", reg.strategy());
    Ok(((mem, bridge, buf, reg), Vec::new()))
}

/// The client half: receive the key, write, wait for the server's check, read back, check.
fn client_half(side: Side<State>) -> Res {
    let (cmem, cbridge, cbuf, creg) = &side.state;
    let conn = &side.conn;
    let key = cbridge.recv_key(conn, STEP)?;
    println!("server's key: addr {:#x}, {} B, rkey {:#x}, generation {}", key.addr, key.len, key.rkey, key.generation);
    if key.len != LEN as u64 {
        return Err(format!("the server's buffer has {} B, not {LEN}: is it this example?", key.len).into());
    }

    let t = std::time::Instant::now();
    cbridge.write(conn, creg, 0, LEN as u64, &key, 0)?;
    let w = t.elapsed();
    send_word(conn, WRITTEN)?;
    match recv_word(conn, STEP)? {
        VERIFIED => println!("RDMA WRITE of {LEN} B in {w:?}: server buffer verified"),
        MISMATCH => return Err("the server's buffer does not hold what the client wrote".into()),
        other => return Err(format!("unexpected message {other} from the server").into()),
    }

    // The server has changed its buffer; the client reads it back over its own.
    let t = std::time::Instant::now();
    cbridge.read(conn, creg, 0, LEN as u64, &key, 0)?;
    let r = t.elapsed();
    cbridge.sync_from_peers(creg)?;
    let mut seen = vec![0u8; LEN];
    cmem.copy_from_device(cbuf, 0, &mut seen)?;
    if seen != pattern(LEN, 2) {
        return Err("the client read back other bytes than the server's buffer holds".into());
    }
    println!("RDMA READ of {LEN} B in {r:?}: client buffer verified");
    Ok(())
}

/// The server half: hand out and send the key, check what the client wrote, change the
/// buffer for the client to read, and wait for the client to disconnect.
fn server_half(side: Side<State>) -> Res {
    let (smem, sbridge, sbuf, sreg) = &side.state;
    let conn = &side.conn;
    // The key is handed out on the server's connection (a memory window bound to its queue
    // pair, where the device has them) and travels over the connection itself.
    let key = sbridge.hand_out(conn, sreg, 0, LEN as u64)?;
    sbridge.send_key(conn, &key)?;
    match recv_word(conn, STEP)? {
        WRITTEN => {}
        other => return Err(format!("unexpected message {other} from the client").into()),
    }
    println!("server flush: {:?}", sbridge.sync_from_peers(sreg)?);
    let mut seen = vec![0u8; LEN];
    smem.copy_from_device(sbuf, 0, &mut seen)?;
    if seen != pattern(LEN, 1) {
        send_word(conn, MISMATCH)?;
        return Err("the server's buffer does not hold what the client wrote".into());
    }
    println!("server: buffer holds the client's pattern ({LEN} B verified)");
    smem.copy_to_device(sbuf, 0, &pattern(LEN, 2))?;
    sbridge.sync_to_peers(sreg)?;
    send_word(conn, VERIFIED)?;
    conn.wait_disconnect(SERVE_FOR)?;
    Ok(())
}

fn run(args: Args) -> Res {
    run_halves(args.endpoint.mode::<Args>(), conn_opts(), client_setup, server_setup, client_half, server_half)?;
    println!("ok");
    Ok(())
}

fn main() -> ExitCode {
    exit_status("remote_buffer", run(Args::parse()))
}
