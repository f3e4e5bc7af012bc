// A slice for work requests borrows its region: it cannot be posted after the region is gone.
use p2pbridge::verbs::{AccessFlags, Connection, HostBuffer, ProtectionDomain, RemoteBuf, SendFlags};

fn post_after_drop(pd: &ProtectionDomain, conn: &Connection, remote: RemoteBuf) -> p2pbridge::verbs::Result<()> {
    let mr = pd.register(HostBuffer::new(4096)?, AccessFlags::LOCAL_WRITE)?;
    let local = mr.slice(..)?;
    drop(mr);
    // SAFETY: (would be none: the region is gone; the borrow checker refuses it first)
    unsafe { conn.qp().post_read(1, &local, &remote.slice(..)?, SendFlags::SIGNALED) }
}

fn main() {}
