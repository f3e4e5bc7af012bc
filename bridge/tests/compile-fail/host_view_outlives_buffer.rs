// A view of a host buffer's bytes borrows the buffer: the buffer cannot be freed (its memory
// unmapped) while the view is alive.
use p2pbridge::gpu::{HostBackend, MemoryBackend, Result};

fn view_after_free(host: &HostBackend) -> Result<()> {
    let buf = host.alloc(4096)?;
    let view = host.bytes(&buf)?;
    buf.free()?;
    let mut b = [0u8; 8];
    view.copy_to(&mut b[..]);
    Ok(())
}

fn main() {}
