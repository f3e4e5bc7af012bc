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

use std::time::{Duration, Instant};

use p2pbridge_gpu::{CudaBackend, DeviceBuffer, HostBackend, MemoryBackend};

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

struct Pinned(p2pbridge_gpu::PinnedHostBuffer);
impl AsMut<[u8]> for Pinned {
    fn as_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

fn main() {
    let mut max = 256usize << 20;
    let mut secs = 0.3f64;
    let mut it = std::env::args().skip(1);
    let usage = |why: String| -> ! {
        eprintln!("copy_bw: {why}\nusage: copy_bw [--max NMiB] [--seconds S]");
        std::process::exit(2)
    };
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage(format!("{k} needs a value")));
        match k.as_str() {
            "--max" => match v.trim_end_matches("MiB").parse::<usize>() {
                Ok(m) if m > 0 && m <= 1 << 20 => max = m << 20,
                _ => usage(format!("--max {v}: expected a size in MiB such as 256MiB")),
            },
            "--seconds" => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => secs = s,
                _ => usage(format!("--seconds {v}: expected a positive number")),
            },
            _ => usage(format!("unknown argument {k}")),
        }
    }
    let min = Duration::from_secs_f64(secs);
    let r = match CudaBackend::new(0) {
        Ok(gpu) => {
            println!("CUDA device 0: copies through cuMemcpyHtoD/DtoH; ratio to {PCIE5_X16_GBS} GB/s (PCIe Gen5 x16, per direction)");
            let g2 = gpu.clone();
            sweep(&gpu, max, min, &mut |n| {
                g2.alloc_pinned_host(n).ok().map(|p| Box::new(Pinned(p)) as Box<dyn AsMut<[u8]>>)
            })
        }
        Err(e) => {
            println!("CUDA: {e}");
            println!("measuring the host backend instead (memcpy into memfd memory; no pinned/pageable distinction on the host)");
            sweep(&HostBackend::new(), max, min, &mut |_| None)
        }
    };
    if let Err(e) = r {
        eprintln!("copy_bw: {e}");
        std::process::exit(1);
    }
}
