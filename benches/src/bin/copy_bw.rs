//! Host<->device copy bandwidth, 4 KiB to 256 MiB, from pinned and pageable host memory: the
//! ceiling of the bounce-buffer path.
//!
//! ```text
//! cargo run --release -p p2pbridge-benches --bin copy_bw [-- --max 256MiB --seconds 0.3]
//! ```
//!
//! With a CUDA GPU it measures `cuMemcpyHtoD`/`DtoH` and prints the ratio to PCIe Gen5 x16's
//! 63 GB/s per direction. Without one it says so and measures the host backend instead
//! (memcpy into memfd memory: what a CPU-only node's bounce path costs).
//!
//! Exit status: 0 done; 1 a failure while running (printed as `copy_bw: ERROR`); 2 a usage
//! error.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use p2pbridge_benches::cli::{exit_status, parse_seconds, Res, EXIT_CODES};
use p2pbridge_gpu::{CudaBackend, DeviceBuffer, HostBackend, MemoryBackend};

/// Host<->device copy bandwidth, 4 KiB to --max, from pinned and pageable host memory (CUDA
/// device 0; without a GPU, the host backend)
#[derive(Parser, Debug)]
#[command(name = "copy_bw", version, after_help = EXIT_CODES)]
struct Args {
    /// The largest copy, in MiB (256 or 256MiB)
    #[arg(long, value_name = "NMiB", default_value = "256MiB", value_parser = parse_mib)]
    max: usize,
    /// The least time per measurement, in seconds
    #[arg(long, value_name = "S", default_value = "0.3", value_parser = parse_seconds)]
    seconds: f64,
}

/// A size in MiB, with or without the `MiB` suffix (1 to 1048576), in bytes.
fn parse_mib(v: &str) -> Result<usize, String> {
    match v.trim_end_matches("MiB").parse::<usize>() {
        Ok(m) if m > 0 && m <= 1 << 20 => Ok(m << 20),
        _ => Err(format!("'{v}' is not a size in MiB such as 256MiB")),
    }
}

const PCIE5_X16_GBS: f64 = 63.0;

fn measure(min: Duration, mut op: impl FnMut()) -> f64 {
    op(); // warm up (first touch, TLB, lazy pinning)
    let mut n = 0u32;
    let t = Instant::now();
    while t.elapsed() < min || n < 3 {
        op();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn row(size: usize, label: &str, h2d: f64, d2h: f64, pcie: bool) {
    if pcie {
        println!(
            "{size:>10} {label:<9} H2D {h2d:>7.2} GB/s ({:>5.3} of PCIe5 x16)  D2H {d2h:>7.2} GB/s ({:>5.3})",
            h2d / PCIE5_X16_GBS,
            d2h / PCIE5_X16_GBS
        );
    } else {
        println!("{size:>10} {label:<9} H2D {h2d:>7.2} GB/s  D2H {d2h:>7.2} GB/s");
    }
}

fn sweep(
    backend: &dyn MemoryBackend,
    max: usize,
    min: Duration,
    pinned: &mut dyn FnMut(usize) -> Option<Box<dyn AsMut<[u8]>>>,
) -> p2pbridge_gpu::Result<()> {
    let pcie = backend.kind() == p2pbridge_gpu::BackendKind::Cuda;
    let mut size = 4096;
    while size <= max {
        let dev: DeviceBuffer = backend.alloc(size)?;
        let mut pageable = vec![1u8; size];
        let h2d = measure(min, || backend.copy_to_device(&dev, 0, &pageable).expect("copy to device"));
        let d2h = measure(min, || backend.copy_from_device(&dev, 0, &mut pageable).expect("copy from device"));
        row(size, "pageable", gbs(size, h2d), gbs(size, d2h), pcie);
        if let Some(mut p) = pinned(size) {
            let buf = (*p).as_mut();
            let h2d = measure(min, || backend.copy_to_device(&dev, 0, buf).expect("copy to device"));
            let d2h = measure(min, || backend.copy_from_device(&dev, 0, buf).expect("copy from device"));
            row(size, "pinned", gbs(size, h2d), gbs(size, d2h), pcie);
        }
        size *= 4;
    }
    Ok(())
}

struct Pinned(p2pbridge_gpu::PinnedHostSlice<u8>);
impl AsMut<[u8]> for Pinned {
    fn as_mut(&mut self) -> &mut [u8] {
        // Only the event of a copy queued on it can fail this wait, and copies here are synchronous.
        self.0.as_mut_slice().unwrap_or_else(|e| panic!("pinned host memory: {e}"))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    exit_status("copy_bw", run(&args))
}

fn run(args: &Args) -> Res {
    let (max, min) = (args.max, Duration::from_secs_f64(args.seconds));
    match CudaBackend::new(0) {
        Ok(gpu) => {
            println!("CUDA device 0: copies through cuMemcpyHtoD/DtoH; ratio to {PCIE5_X16_GBS} GB/s (PCIe Gen5 x16, per direction)");
            let g2 = gpu.clone();
            sweep(&gpu, max, min, &mut |n| {
                g2.alloc_pinned_host(n).ok().map(|p| Box::new(Pinned(p)) as Box<dyn AsMut<[u8]>>)
            })?;
        }
        Err(e) => {
            println!("CUDA: {e}");
            println!("measuring the host backend instead (memcpy into memfd memory; no pinned/pageable distinction on the host)");
            sweep(&HostBackend::new(), max, min, &mut |_| None)?;
        }
    }
    Ok(())
}
