// A view of a region's bytes cannot outlive the region: dropping the region (deregistering,
// then freeing the memory) while the view is alive does not compile.
use p2pbridge::verbs::{AccessFlags, HostBuffer, ProtectionDomain};

fn view_after_drop(pd: &ProtectionDomain) -> p2pbridge::verbs::Result<()> {
    let mr = pd.register(HostBuffer::new(4096)?, AccessFlags::LOCAL_WRITE)?;
    let view = mr.bytes();
    drop(mr);
    let mut b = [0u8; 8];
    view.copy_to(&mut b[..]);
    Ok(())
}

fn main() {}
