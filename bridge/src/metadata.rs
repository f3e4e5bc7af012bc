//! Metadata between peers: many keys travel as one blob — exported by one side, loaded by the
//! other (the shape of NIXL's `getLocalMD` / `loadRemoteMD`) — over any channel, or over the
//! connection itself ([`Bridge::send_metadata`] / [`Bridge::recv_metadata`]).
//!
//! ```no_run
//! # use p2pbridge::{Bridge, Metadata, Registered};
//! # fn f(bridge: &Bridge, conn: &p2pbridge::verbs::Connection, blocks: &[Registered]) -> p2pbridge::Result<()> {
//! let mut md = Metadata::new();
//! for (i, reg) in blocks.iter().enumerate() {
//!     md.insert(i as u64, bridge.hand_out(conn, reg, 0, reg.len())?);
//! }
//! bridge.send_metadata(conn, &md)?; // the peer: bridge.recv_metadata(conn, timeout)?.get(7)
//! # Ok(()) }
//! ```
//!
//! Wire form (little-endian): `"P2BM"`, version `1` (u32), the count (u64), then per key its
//! tag (u64) and its [`RemoteKey::to_bytes`] form.

use std::collections::BTreeMap;
use std::time::Duration;

use p2pbridge_verbs::{AccessFlags, Connection, HostBuffer, RemoteBuf, SendFlags};

use crate::completion::{next_wr_id, reap_on, reaped_with, FLUSH_WAIT};
use crate::error::{Error, Result};
use crate::key::RemoteKey;

const MAGIC: [u8; 4] = *b"P2BM";
const VERSION: u32 = 1;
const HEADER: usize = 16;
const ENTRY: usize = 8 + RemoteKey::WIRE_LEN;

/// Keys by tag (a block number, a layer, whatever the application names its buffers by).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    keys: BTreeMap<u64, RemoteKey>,
}

impl Metadata {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the key tagged `tag`.
    pub fn insert(&mut self, tag: u64, key: RemoteKey) -> &mut Self {
        self.keys.insert(tag, key);
        self
    }

    /// The key tagged `tag`.
    pub fn get(&self, tag: u64) -> Option<&RemoteKey> {
        self.keys.get(&tag)
    }

    /// Every (tag, key), by tag.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &RemoteKey)> {
        self.keys.iter().map(|(t, k)| (*t, k))
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The blob (see the module documentation for its form).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + ENTRY * self.keys.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.keys.len() as u64).to_le_bytes());
        for (tag, key) in &self.keys {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&key.to_bytes());
        }
        b
    }

    /// Loads a blob of [`to_bytes`](Self::to_bytes). Anything else — another format, another
    /// version, a truncated or padded blob, a repeated tag — is refused with the reason.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |why: String| Error::InvalidArgument(format!("not p2pbridge metadata: {why}"));
        if b.len() < HEADER || b[..4] != MAGIC {
            return Err(bad(format!("{} bytes without the P2BM header", b.len())));
        }
        let version = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if version != VERSION {
            return Err(bad(format!("version {version}, this library reads version {VERSION}")));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&b[8..16]);
        let count = u64::from_le_bytes(n);
        let want = usize::try_from(count).ok().and_then(|c| c.checked_mul(ENTRY)).and_then(|l| l.checked_add(HEADER));
        if want != Some(b.len()) {
            return Err(bad(format!("{count} keys do not fit in {} bytes", b.len())));
        }
        let mut md = Metadata::new();
        for e in b[HEADER..].chunks_exact(ENTRY) {
            let mut t = [0u8; 8];
            t.copy_from_slice(&e[..8]);
            let tag = u64::from_le_bytes(t);
            if md.keys.insert(tag, RemoteKey::from_bytes(&e[8..])?).is_some() {
                return Err(bad(format!("tag {tag} appears twice")));
            }
        }
        Ok(md)
    }
}

/// The message that announces a blob: its length and where the peer may READ it.
const ANNOUNCE: usize = 8 + RemoteBuf::WIRE_LEN;

/// Gives `bufs` up for ever (leaks them) when `r` says a request naming them was not reaped:
/// the NIC may still use them.
fn keep_if_stuck<T, B>(r: &Result<T>, bufs: B) {
    if matches!(r, Err(Error::DeviceStuck { .. })) {
        std::mem::forget(bufs);
    }
}

/// Metadata rides on the connection's own receives, which the NIC consumes in the order they
/// were posted: a connection taking its receives from a shared queue is refused.
fn check_receives(conn: &Connection) -> Result<()> {
    if conn.srq().is_some() {
        return Err(Error::InvalidArgument(
            "metadata travels on the connection's own receives, and this one takes them from a shared receive queue: \
             send it over another connection or channel (Metadata::to_bytes)"
                .into(),
        ));
    }
    Ok(())
}

impl crate::Bridge {
    /// Sends `md` over `conn` itself: a small SEND says where the blob is, the peer RDMA READs
    /// it ([`recv_metadata`](Self::recv_metadata)) and SENDs back that it is done, and only
    /// then does the blob's buffer go. The peer's receive must be posted before the SEND
    /// arrives, or the SEND is retried on RNR as `ConnectionOptions::rnr_retry_count` allows
    /// (7: for ever).
    ///
    /// Receives are taken in the order they were posted: exchange metadata before posting
    /// receives of your own on the connection ([`Bridge::post_recvs`](crate::Bridge::post_recvs)), or the peer's message
    /// lands in one of yours.
    pub fn send_metadata(&self, conn: &Connection, md: &Metadata) -> Result<()> {
        check_receives(conn)?;
        let blob = md.to_bytes();
        let timeout = self.inner.core.completion_timeout;
        let pd = &self.inner.core.pd;
        // Everything is allocated and registered before anything is posted. Each buffer is
        // filled while it is still ours alone, before the NIC (or the peer) is given it.
        let mut buf = HostBuffer::new(blob.len())?;
        buf.as_mut_slice().copy_from_slice(&blob);
        let mr = pd.register(buf, AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_READ)?;
        let done = pd.register(HostBuffer::new(8)?, AccessFlags::LOCAL_WRITE)?;
        let mut msg = HostBuffer::new(ANNOUNCE)?;
        msg.as_mut_slice()[..8].copy_from_slice(&(blob.len() as u64).to_le_bytes());
        let whole = RemoteBuf { addr: mr.addr(), len: mr.len(), rkey: mr.rkey() };
        msg.as_mut_slice()[8..].copy_from_slice(&whole.to_bytes());
        let msg = pd.register(msg, AccessFlags::LOCAL_WRITE)?;
        let (done_slice, msg_slice) = (done.slice(..)?, msg.slice(..)?);
        // The peer's "done" may come as soon as our announcement lands: its receive goes first.
        let done_id = next_wr_id();
        conn.recv_cq().expect(done_id);
        // SAFETY: `done` stays registered until this receive is reaped (below: completed, or
        // flushed after the error state), and is kept for ever where it was not
        // (`keep_if_stuck`).
        unsafe { conn.qp().post_recv(done_id, &done_slice) }.inspect_err(|_| conn.recv_cq().unexpect(done_id))?;
        let id = next_wr_id();
        conn.send_cq().expect(id);
        // SAFETY: `msg` stays registered until the SEND is reaped (`reap_on`), and is kept for
        // ever where it was not (`keep_if_stuck`).
        let sent = match unsafe { conn.qp().post_send(id, &msg_slice, None, SendFlags::SIGNALED) } {
            Ok(()) => reap_on(conn, conn.send_cq(), id, timeout, "SEND of a metadata announcement"),
            Err(e) => {
                conn.send_cq().unexpect(id);
                Err(e.into())
            }
        };
        // `mr` (the blob) stays registered until the peer says it has read it, or the receive
        // of its answer is flushed (the connection then errored: nobody reads it any more).
        let r = match sent {
            Ok(_) => reap_on(conn, conn.recv_cq(), done_id, timeout, "RECV of the peer's metadata receipt"),
            // The SEND was not reaped: every buffer stays the NIC's.
            Err(e @ Error::DeviceStuck { .. }) => Err(e),
            Err(e) => {
                // The answer's receive is still posted: flush it before its buffer goes.
                let _ = conn.qp().set_error();
                reap_on(conn, conn.recv_cq(), done_id, FLUSH_WAIT, "RECV of the peer's metadata receipt").and(Err(e))
            }
        };
        keep_if_stuck(&r, (mr, done, msg));
        r.map(|_| ())
    }

    /// Receives metadata the peer sent with [`send_metadata`](Self::send_metadata), waiting
    /// up to `timeout` for its announcement (on timeout the connection's queue pair is moved
    /// to the error state, as in [`Bridge::recv`](crate::Bridge::recv)). Blobs over `max_len`
    /// bytes are refused (and the peer is not told: its `send_metadata` times out). As for
    /// `send_metadata`, no receive of your own may be posted on the connection before it.
    pub fn recv_metadata(&self, conn: &Connection, timeout: Duration, max_len: usize) -> Result<Metadata> {
        check_receives(conn)?;
        let pd = &self.inner.core.pd;
        let t = self.inner.core.completion_timeout;
        let msg = pd.register(HostBuffer::new(ANNOUNCE)?, AccessFlags::LOCAL_WRITE)?;
        let slice = msg.slice(..)?;
        let id = next_wr_id();
        conn.recv_cq().expect(id);
        // SAFETY: `msg` stays registered until the receive is reaped (`reap_on` returns once it
        // completed or was flushed), and is leaked where it was not (below).
        unsafe { conn.qp().post_recv(id, &slice) }.inspect_err(|_| conn.recv_cq().unexpect(id))?;
        let (wc, msg) =
            reaped_with(reap_on(conn, conn.recv_cq(), id, timeout, "RECV of a metadata announcement"), msg)?;
        // Complete, and no peer has rights on this region: its bytes are settled.
        let m = msg.to_vec();
        if (wc.byte_len as usize) < ANNOUNCE {
            return Err(Error::InvalidArgument(format!("a metadata announcement of {} bytes", wc.byte_len)));
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&m[..8]);
        let len = u64::from_le_bytes(l);
        let at = RemoteBuf::from_bytes(&m[8..])?;
        if len > max_len as u64 || len > at.len || len > u64::from(u32::MAX) || len == 0 {
            return Err(Error::InvalidArgument(format!(
                "the peer's metadata is {len} bytes (limit {max_len}, its buffer {} bytes)",
                at.len
            )));
        }
        let dst = pd.register(HostBuffer::new(len as usize)?, AccessFlags::LOCAL_WRITE)?;
        let ack = pd.register(HostBuffer::new(8)?, AccessFlags::LOCAL_WRITE)?;
        let (dst_slice, ack_slice) = (dst.slice(..)?, ack.slice(..)?);
        let remote = p2pbridge_verbs::RemoteSlice { addr: at.addr, len: len as u32, rkey: at.rkey };
        let rid = next_wr_id();
        conn.send_cq().expect(rid);
        // SAFETY: `dst` stays registered until the READ is reaped (`reap_on` returns once it
        // completed or was flushed), and is leaked where it was not (below).
        unsafe { conn.qp().post_read(rid, &dst_slice, &remote, SendFlags::SIGNALED) }
            .inspect_err(|_| conn.send_cq().unexpect(rid))?;
        if let Err(e) = reap_on(conn, conn.send_cq(), rid, t, "RDMA READ of the peer's metadata") {
            if matches!(e, Error::DeviceStuck { .. }) {
                // Not reaped: the NIC may still write `dst`.
                std::mem::forget((dst, ack));
            }
            return Err(e);
        }
        // The READ is complete and this region grants no remote rights: its bytes are settled.
        let md = Metadata::from_bytes(&dst.to_vec());
        // Tell the peer it may let its blob go, whether or not it made sense to us.
        let aid = next_wr_id();
        conn.send_cq().expect(aid);
        // SAFETY: `ack` stays registered until the SEND is reaped (`reap_on`), and is kept for
        // ever where it was not (`keep_if_stuck`).
        unsafe { conn.qp().post_send(aid, &ack_slice, None, SendFlags::SIGNALED) }
            .inspect_err(|_| conn.send_cq().unexpect(aid))?;
        let r = reap_on(conn, conn.send_cq(), aid, t, "SEND of a metadata receipt");
        keep_if_stuck(&r, ack);
        r?;
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> RemoteKey {
        let mut b = [0u8; RemoteKey::WIRE_LEN];
        b[..RemoteBuf::WIRE_LEN].copy_from_slice(&RemoteBuf { addr: 0x1000 * i, len: 4096, rkey: i as u32 }.to_bytes());
        b[RemoteBuf::WIRE_LEN..].copy_from_slice(&(i + 7).to_le_bytes());
        RemoteKey::from_bytes(&b).unwrap()
    }

    #[test]
    fn metadata_round_trips_and_refuses_what_is_not_it() {
        let mut md = Metadata::new();
        for i in 0..1000 {
            md.insert(i * 3, key(i));
        }
        let b = md.to_bytes();
        assert_eq!(b.len(), HEADER + 1000 * ENTRY);
        let back = Metadata::from_bytes(&b).unwrap();
        assert_eq!(back, md);
        assert_eq!(back.get(30), Some(&key(10)));
        assert_eq!(Metadata::from_bytes(&Metadata::new().to_bytes()).unwrap().len(), 0);
        // Truncated, padded, another version, a count that overflows, a repeated tag.
        assert!(Metadata::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(Metadata::from_bytes(&[b.as_slice(), &[0]].concat()).is_err());
        let mut v2 = b.clone();
        v2[4] = 2;
        assert!(Metadata::from_bytes(&v2).is_err());
        let mut huge = b.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Metadata::from_bytes(&huge).is_err());
        let mut twice = b[..HEADER + 2 * ENTRY].to_vec();
        twice[8..16].copy_from_slice(&2u64.to_le_bytes());
        let first_tag = twice[HEADER..HEADER + 8].to_vec();
        twice[HEADER + ENTRY..HEADER + ENTRY + 8].copy_from_slice(&first_tag);
        assert!(Metadata::from_bytes(&twice).unwrap_err().to_string().contains("twice"));
        for n in 0..64 {
            let _ = Metadata::from_bytes(&b[..n]); // never panics
        }
    }
}
