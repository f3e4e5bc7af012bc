// A `Vec<u8>` cannot be registered: it owns its bytes through a pointer that promises they do
// not change behind it, and the NIC writes them. Registered memory is raw memory (HostBuffer).
use p2pbridge::verbs::{AccessFlags, ProtectionDomain};

fn register_a_vec(pd: &ProtectionDomain) -> p2pbridge::verbs::Result<()> {
    let _mr = pd.register(vec![0u8; 4096], AccessFlags::remote_rw())?;
    Ok(())
}

fn main() {}
