//! A KV-cache style fetch: a server exposes many fixed-size blocks in one registered buffer; a
//! client reads the blocks it wants, by index, into its own device (or host) buffer.
//!
//! ```text
//! cargo build --release -p p2pbridge-examples && scripts/softroce target/release/kv_fetch
//! ```
//!
//! The server sends one key for the whole block pool and the block size in rdma_cm's private
//! data; the client computes each block's offset and posts one RDMA READ per block. (A real
//! serving system would also send which blocks hold which sequence; here the client just
//! picks indices.)

use std::time::Duration;

use p2pbridge::verbs::fabric::SoftRoce;
use p2pbridge::verbs::{AccessFlags, ConnectionOptions};
use p2pbridge_examples::{bridged, pattern, verbs_err};

const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 256;
const WANTED: [usize; 6] = [3, 200, 17, 42, 5, 255];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fabric = SoftRoce::from_env().ok_or("run it under scripts/softroce (two Soft-RoCE hosts)")?;
    let (client, server) = fabric.connect_pair(
        ConnectionOptions { timeout: Duration::from_secs(60), ..Default::default() },
        move |pd| {
            // The client's buffer has room for the blocks it wants, side by side.
            let (mem, bridge, what) = bridged(pd)?;
            let buf = mem.alloc(WANTED.len() * BLOCK).map_err(verbs_err)?;
            let reg = bridge
                .register(buf.addr(), (WANTED.len() * BLOCK) as u64, AccessFlags::remote_rw())
                .map_err(verbs_err)?;
            println!("client: {what}, {} blocks of room, {}", WANTED.len(), reg.strategy());
            Ok(((mem, bridge, buf, reg), Vec::new()))
        },
        move |pd| {
            // The server's pool: block i holds pattern(BLOCK, i).
            let (mem, bridge, what) = bridged(pd)?;
            let pool = mem.alloc(BLOCKS * BLOCK).map_err(verbs_err)?;
            for i in 0..BLOCKS {
                mem.copy_to_device(&pool, (i * BLOCK) as u64, &pattern(BLOCK, i as u32)).map_err(verbs_err)?;
            }
            let reg =
                bridge.register(pool.addr(), (BLOCKS * BLOCK) as u64, AccessFlags::remote_rw()).map_err(verbs_err)?;
            bridge.publish(&reg).map_err(verbs_err)?;
            println!("server: {what}, {BLOCKS} blocks of {BLOCK} B, {}", reg.strategy());
            Ok(((mem, bridge, pool, reg), (BLOCK as u32).to_le_bytes().to_vec()))
        },
    )?;
    // The pool's key: a memory window over the pool, bound to the server's queue pair.
    let (_, sbridge, _, sreg) = &server.state;
    let key = sbridge.hand_out(&server.conn, sreg, 0..(BLOCKS * BLOCK) as u64)?;
    let block = u32::from_le_bytes(client.conn.remote_private_data()[..4].try_into()?) as u64;
    let (mem, bridge, buf, reg) = &client.state;
    let t = std::time::Instant::now();
    for (slot, &b) in WANTED.iter().enumerate() {
        bridge.read(&client.conn, reg, slot as u64 * block, block, &key, b as u64 * block)?;
    }
    let el = t.elapsed();
    bridge.flush(reg)?;
    let mut got = vec![0u8; BLOCK];
    for (slot, &b) in WANTED.iter().enumerate() {
        mem.copy_from_device(buf, (slot * BLOCK) as u64, &mut got)?;
        if got != pattern(BLOCK, b as u32) {
            return Err(format!("block {b} (slot {slot}) arrived changed").into());
        }
    }
    println!("fetched blocks {WANTED:?} ({} KiB) in {el:?}; all verified", WANTED.len() * BLOCK / 1024);
    println!("ok");
    Ok(())
}
