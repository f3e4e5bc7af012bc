//! A KV-cache style fetch: a server exposes many fixed-size blocks in one registered buffer; a
//! client reads the blocks it wants, by index, into its own device (or host) buffer.
//!
//! ```text
//! cargo build --release -p p2pbridge-examples && scripts/softroce target/release/kv_fetch
//! ```
//!
//! Across two machines:
//!
//! ```text
//! server$ kv_fetch --server 192.0.2.10:7471
//! client$ kv_fetch --client 192.0.2.10:7471 --device mlx5_0
//! ```
//!
//! The server sends the block size in rdma_cm's private data and one key for the whole block
//! pool over the connection; the client computes each block's offset and posts one RDMA READ
//! per block, all in one batch (`fetch`: `Bridge::post`, every block in flight at once), then
//! checks every block byte for byte. (A real serving system would
//! also send which blocks hold which sequence; here the client just picks indices.) The
//! server serves until the client disconnects, and exits (after `--clients N` clients,
//! default 1).
//!
//! Exit status: 0 done, every block verified; 1 failed while running (printed as
//! `kv_fetch: ERROR`), a block that arrived changed included; 2 usage error.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use p2pbridge::gpu::{DeviceBuffer, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, Connection, ProtectionDomain};
use p2pbridge::{Bridge, Registered, RemoteKey};
use p2pbridge_examples::{bridged, conn_opts, exit_status, run_halves, Endpoint, Res, EXIT_CODES, SERVE_FOR};
use p2pbridge_test_support::fabric::Side;
use p2pbridge_test_support::pattern;

const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 256;
const WANTED: [usize; 6] = [3, 200, 17, 42, 5, 255];

/// A client fetches chosen fixed-size blocks from a server's block pool (GPU or host memory)
/// with RDMA READs, and checks each.
///
/// With neither --server nor --client it runs both halves across the two Soft-RoCE hosts of
/// scripts/softroce.
#[derive(Parser, Debug)]
#[command(
    name = "kv_fetch",
    version,
    override_usage = "kv_fetch [--server ADDR:PORT [--clients N] | --client ADDR:PORT --device NAME]",
    after_help = EXIT_CODES
)]
struct Args {
    #[command(flatten)]
    endpoint: Endpoint,
}

/// Each side: a backend, a bridge on its PD, its buffer registered through the bridge.
type State = (Arc<dyn MemoryBackend>, Bridge, DeviceBuffer, Registered);

/// The client's buffer has room for the blocks it wants, side by side.
fn client_setup(pd: &ProtectionDomain) -> Res<(State, Vec<u8>)> {
    let (mem, bridge, what) = bridged(pd)?;
    let buf = mem.alloc(WANTED.len() * BLOCK)?;
    let reg = bridge.register(buf.addr(), (WANTED.len() * BLOCK) as u64, AccessFlags::remote_rw())?;
    println!("client: {what}, {} blocks of room, {}", WANTED.len(), reg.strategy());
    Ok(((mem, bridge, buf, reg), Vec::new()))
}

/// The server's pool: block i holds pattern(BLOCK, i). The block size goes to the client as
/// the accept's private data.
fn server_setup(pd: &ProtectionDomain) -> Res<(State, Vec<u8>)> {
    let (mem, bridge, what) = bridged(pd)?;
    let pool = mem.alloc(BLOCKS * BLOCK)?;
    for i in 0..BLOCKS {
        mem.copy_to_device(&pool, (i * BLOCK) as u64, &pattern(BLOCK, i as u8))?;
    }
    let reg = bridge.register(pool.addr(), (BLOCKS * BLOCK) as u64, AccessFlags::remote_rw())?;
    bridge.sync_to_peers(&reg)?;
    println!("server: {what}, {BLOCKS} blocks of {BLOCK} B, {}", reg.strategy());
    Ok(((mem, bridge, pool, reg), (BLOCK as u32).to_le_bytes().to_vec()))
}

/// The transfers: block `wanted[slot]` of the pool behind `key` into slot `slot` of `reg`, one
/// RDMA READ per block, each waited for.
fn fetch(
    bridge: &Bridge,
    conn: &Connection,
    reg: &Registered,
    key: &RemoteKey,
    block: u64,
    wanted: &[usize],
) -> p2pbridge::Result<()> {
    // One batch: every block's READ in flight at once (chained posts, selective signalling),
    // then one wait for them all.
    let mut batch = p2pbridge::Batch::new();
    for (slot, &b) in wanted.iter().enumerate() {
        batch.read(reg, slot as u64 * block, block, key, b as u64 * block);
    }
    bridge.post(conn, batch)?.wait()
}

/// The client half: the pool's key and block size, the fetch, and every block checked.
fn client_half(side: Side<State>) -> Res {
    let (mem, bridge, buf, reg) = &side.state;
    let conn = &side.conn;
    let key = bridge.recv_key(conn, Duration::from_secs(120))?;
    let block = u32::from_le_bytes(conn.remote_private_data()[..4].try_into()?) as u64;
    if block != BLOCK as u64 || key.len < (BLOCKS * BLOCK) as u64 {
        return Err(format!(
            "the server offers {} B in blocks of {block} B, not {BLOCKS} blocks of {BLOCK} B: is it this example?",
            key.len
        )
        .into());
    }
    let t = std::time::Instant::now();
    fetch(bridge, conn, reg, &key, block, &WANTED)?;
    let el = t.elapsed();
    bridge.sync_from_peers(reg)?;
    let mut got = vec![0u8; BLOCK];
    for (slot, &b) in WANTED.iter().enumerate() {
        mem.copy_from_device(buf, (slot * BLOCK) as u64, &mut got)?;
        if got != pattern(BLOCK, b as u8) {
            return Err(format!("block {b} (slot {slot}) arrived changed").into());
        }
    }
    println!("fetched blocks {WANTED:?} ({} KiB) in {el:?}; all verified", WANTED.len() * BLOCK / 1024);
    Ok(())
}

/// The server half: the pool's key (a memory window over the pool, bound to this
/// connection's queue pair) to the client, then wait for it to disconnect.
fn server_half(side: Side<State>) -> Res {
    let (_, bridge, _, reg) = &side.state;
    let key = bridge.hand_out(&side.conn, reg, 0, (BLOCKS * BLOCK) as u64)?;
    bridge.send_key(&side.conn, &key)?;
    side.conn.wait_disconnect(SERVE_FOR)?;
    Ok(())
}

fn run(args: Args) -> Res {
    run_halves(args.endpoint.mode::<Args>(), conn_opts(), client_setup, server_setup, client_half, server_half)?;
    println!("ok");
    Ok(())
}

fn main() -> ExitCode {
    exit_status("kv_fetch", run(Args::parse()))
}
