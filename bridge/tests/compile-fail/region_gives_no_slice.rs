// Memory a NIC or a peer may write is never a plain `&[u8]`: a registered region has no
// `as_slice` (read it through `bytes()`, a volatile view, or `to_vec()`).
use p2pbridge::verbs::{AccessFlags, HostBuffer, ProtectionDomain};

fn spin_on_flag(pd: &ProtectionDomain) -> p2pbridge::verbs::Result<()> {
    let mr = pd.register(HostBuffer::new(4096)?, AccessFlags::remote_rw())?;
    while mr.as_slice()[0] == 0 {}
    Ok(())
}

fn main() {}
