//! Write into a remote GPU (or host) buffer over RDMA and read it back, through the bridge.
//!
//! ```text
//! cargo build --release -p p2pbridge-examples && scripts/softroce target/release/remote_buffer
//! ```
//!
//! The server allocates a buffer with the best backend it has (CUDA, else host memory),
//! registers it through the bridge — which picks dma-buf, peer memory, ODP, pinned or bounce
//! and says why — and sends the key (address, length, rkey, generation) over the connection. The client writes a pattern into it, the server flushes (NIC writes made visible to
//! the GPU) and checks, the client reads it back.

use std::time::Duration;

use p2pbridge::verbs::fabric::SoftRoce;
use p2pbridge::verbs::{AccessFlags, ConnectionOptions};
use p2pbridge_examples::{bridged, pattern, verbs_err};

const LEN: usize = 8 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fabric = SoftRoce::from_env().ok_or("run it under scripts/softroce (two Soft-RoCE hosts)")?;
    // Each side: a backend, a bridge on its PD, a buffer registered through the bridge.
    let (client, server) = fabric.connect_pair(
        ConnectionOptions { timeout: Duration::from_secs(60), rnr_retry_count: 7, ..Default::default() },
        move |pd| {
            let (mem, bridge, what) = bridged(pd)?;
            let buf = mem.alloc(LEN).map_err(verbs_err)?;
            mem.copy_to_device(&buf, 0, &pattern(LEN, 1)).map_err(verbs_err)?;
            let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw()).map_err(verbs_err)?;
            println!(
                "client: {what}, registered with {} (skipped: {:?})",
                reg.strategy(),
                reg.skipped().iter().map(|(s, r)| format!("{s}: {r}")).collect::<Vec<_>>()
            );
            Ok(((mem, bridge, buf, reg), Vec::new()))
        },
        move |pd| {
            let (mem, bridge, what) = bridged(pd)?;
            let buf = mem.alloc(LEN).map_err(verbs_err)?;
            let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw()).map_err(verbs_err)?;
            println!("server: {what}, registered with {}", reg.strategy());
            Ok(((mem, bridge, buf, reg), Vec::new()))
        },
    )?;
    // The key is handed out on the server's connection (a memory window bound to its queue
    // pair, where the device has them) and travels over the connection itself.
    let (_, sbridge, _, sreg) = &server.state;
    let key = sbridge.hand_out(&server.conn, sreg, 0..LEN as u64)?;
    std::thread::scope(|s| -> Result<(), p2pbridge::Error> {
        let sent = s.spawn(|| sbridge.send_key(&server.conn, &key));
        let got = client.state.1.recv_key(&client.conn, Duration::from_secs(60))?;
        sent.join().expect("send_key panicked")?;
        assert_eq!(got, key);
        Ok(())
    })?;
    println!("server's key: addr {:#x}, {} B, rkey {:#x}, generation {}", key.addr, key.len, key.rkey, key.generation);
    let (cmem, cbridge, cbuf, creg) = &client.state;
    let (smem, sbridge, sbuf, sreg) = &server.state;

    let t = std::time::Instant::now();
    cbridge.write(&client.conn, creg, 0, LEN as u64, &key, 0)?;
    let w = t.elapsed();
    println!("server flush: {:?}", sbridge.flush(sreg)?);
    let mut seen = vec![0u8; LEN];
    smem.copy_from_device(sbuf, 0, &mut seen)?;
    if seen != pattern(LEN, 1) {
        return Err("the server's buffer does not hold what the client wrote".into());
    }
    println!("RDMA WRITE of {LEN} B in {w:?}: server buffer verified");

    // The server changes its buffer; the client reads it back over its own.
    smem.copy_to_device(sbuf, 0, &pattern(LEN, 2))?;
    sbridge.publish(sreg)?;
    let t = std::time::Instant::now();
    cbridge.read(&client.conn, creg, 0, LEN as u64, &key, 0)?;
    let r = t.elapsed();
    cbridge.flush(creg)?;
    cmem.copy_from_device(cbuf, 0, &mut seen)?;
    if seen != pattern(LEN, 2) {
        return Err("the client read back other bytes".into());
    }
    println!("RDMA READ of {LEN} B in {r:?}: client buffer verified");
    println!("ok");
    Ok(())
}
