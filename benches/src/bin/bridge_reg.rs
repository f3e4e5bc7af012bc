//! Cold registration cost through the bridge, 4 KiB to 1 GiB, per strategy the device
//! supports (pinned host, ODP), with the cache-hit cost beside it for scale.
//!
//! ```text
//! cargo build --release -p p2pbridge-benches && scripts/softroce --mem 6144 target/release/bridge_reg
//! ```
//! (Any RDMA device works: `--device NAME`; under scripts/softroce it uses host A's.)

use std::sync::Arc;
use std::time::Instant;

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{fabric::SoftRoce, AccessFlags, Context, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions, Policy, Strategy};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = match args.iter().position(|a| a == "--device") {
        Some(i) => args.get(i + 1).cloned().unwrap_or_default(),
        None => match SoftRoce::from_env() {
            Some(f) => f.a.device,
            None => {
                eprintln!("bridge_reg: give --device NAME, or run under scripts/softroce");
                std::process::exit(2)
            }
        },
    };
    let run = || -> p2pbridge::Result<()> {
        let pd = ProtectionDomain::new(&Context::open(&device)?)?;
        let mem = HostBackend::new();
        println!("cold registration through the bridge on {device} (register + first lookup; then a cache hit)");
        for strategy in [Strategy::PinnedHost, Strategy::Odp] {
            let bridge = Bridge::new(
                &pd,
                vec![Arc::new(mem.clone())],
                BridgeOptions { policy: Policy::default().require(strategy), ..Default::default() },
            )?;
            let mut size = 4096usize;
            while size <= 1 << 30 {
                let buf = mem.alloc(size)?;
                if strategy == Strategy::PinnedHost {
                    // Fault the pages in first: the cost measured is the registration's.
                    mem.copy_to_device(&buf, 0, &vec![1u8; size])?;
                }
                let t = Instant::now();
                let reg = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
                let cold = t.elapsed();
                let t = Instant::now();
                let hit = bridge.register(buf.addr(), buf.len(), AccessFlags::remote_rw())?;
                let warm = t.elapsed();
                println!("  {strategy:<7} {size:>11} B: cold {cold:>12.2?}  hit {warm:>9.2?}");
                drop((reg, hit));
                let t = Instant::now();
                drop(buf); // notice -> invalidate -> deregister -> unmap
                println!("  {strategy:<7} {size:>11} B: free-to-invalidated (with deregistration) {:.2?}", t.elapsed());
                size *= 4;
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("bridge_reg: {e}");
        std::process::exit(1);
    }
}
