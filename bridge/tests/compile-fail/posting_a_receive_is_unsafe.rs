// A posted receive (or READ) writes its region whenever a message (or response) comes, long
// after the call, and a WRITE or SEND reads it whenever it goes out: the region must outlive
// the request, which the borrow of one call cannot say. So posting is unsafe, with that
// contract; safe code cannot post.
use p2pbridge::verbs::{AccessFlags, Connection, HostBuffer, ProtectionDomain, RemoteBuf, SendFlags, SharedReceiveQueue};

fn post(pd: &ProtectionDomain, conn: &Connection, srq: &SharedReceiveQueue, remote: RemoteBuf) -> p2pbridge::verbs::Result<()> {
    let mr = pd.register(HostBuffer::new(4096)?, AccessFlags::LOCAL_WRITE)?;
    let local = mr.slice(..)?;
    conn.qp().post_recv(1, &local)?;
    conn.qp().post_read(2, &local, &remote.slice(..)?, SendFlags::SIGNALED)?;
    let _ = conn.qp().post_recv_list(3, &[local]);
    let _ = srq.post_recv_list(4, &[local]);
    conn.qp().post_write(5, &local, &remote.slice(..)?, SendFlags::SIGNALED)?;
    conn.qp().post_send(6, &local, None, SendFlags::SIGNALED)?;
    Ok(())
}

fn main() {}
