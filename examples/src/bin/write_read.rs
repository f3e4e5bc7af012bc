//! A client writes a buffer into a server's buffer over RDMA, then reads it back.
//!
//! On the Soft-RoCE fabric (both sides in this one process, each in its own host's network
//! namespace):
//!
//! ```text
//! cargo build --release -p p2pbridge-examples
//! scripts/softroce target/release/write_read --size 16MiB
//! ```
//!
//! Across two machines:
//!
//! ```text
//! server$ write_read --server 192.0.2.10:7471 --size 16MiB
//! client$ write_read --client 192.0.2.10:7471 --device mlx5_0 --size 16MiB
//! ```
//!
//! The server registers a buffer for remote read and write and sends its descriptor (address,
//! length, rkey) in rdma_cm's private data; the client RDMA WRITEs a pattern into it, the
//! server (or, in one process, the example itself) checks it, the client RDMA READs it back
//! and compares.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use p2pbridge_verbs::fabric::SoftRoce;
use p2pbridge_verbs::{
    AccessFlags, Connection, ConnectionOptions, Context, Error, HostBuffer, Listener, MemoryRegion, ProtectionDomain,
    RemoteBuf, SendFlags,
};

const TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    size: usize,
    server: Option<SocketAddr>,
    client: Option<SocketAddr>,
    device: Option<String>,
}

fn parse_size(s: &str) -> Option<usize> {
    let (num, mul) = match s {
        s if s.ends_with("GiB") => (&s[..s.len() - 3], 1 << 30),
        s if s.ends_with("MiB") => (&s[..s.len() - 3], 1 << 20),
        s if s.ends_with("KiB") => (&s[..s.len() - 3], 1 << 10),
        s => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mul).filter(|&n| n > 0)
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { size: 16 << 20, server: None, client: None, device: None };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--size" => a.size = parse_size(&v()?).ok_or("--size: a positive size such as 4096, 64KiB, 16MiB")?,
            "--server" => a.server = Some(v()?.parse().map_err(|e| format!("--server: {e}"))?),
            "--client" => a.client = Some(v()?.parse().map_err(|e| format!("--client: {e}"))?),
            "--device" => a.device = Some(v()?),
            "-h" | "--help" => {
                return Err(String::from(
                    "usage: write_read [--size N] [--server IP:PORT | --client IP:PORT --device NAME]",
                ))
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect()
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1 << 20) as f64
}

/// The client's half: write `src` to `remote`, read it back into `back`.
fn write_then_read(
    conn: &Connection,
    src: &MemoryRegion<HostBuffer>,
    back: &MemoryRegion<HostBuffer>,
    remote: RemoteBuf,
) -> Result<(Duration, Duration), Error> {
    let n = src.len();
    let t = Instant::now();
    conn.qp().post_write(1, &src.slice(..)?, &remote.slice(..n)?, SendFlags::SIGNALED)?;
    conn.send_cq().wait_one(TIMEOUT)?;
    let write = t.elapsed();
    let t = Instant::now();
    conn.qp().post_read(2, &back.slice(..)?, &remote.slice(..n)?, SendFlags::SIGNALED)?;
    conn.send_cq().wait_one(TIMEOUT)?;
    Ok((write, t.elapsed()))
}

fn report(size: usize, write: Duration, read: Duration) {
    println!("RDMA WRITE {size} B in {write:?}: {:.1} MiB/s", mib_per_s(size, write));
    println!("RDMA READ  {size} B in {read:?}: {:.1} MiB/s", mib_per_s(size, read));
}

fn client_buffers(
    pd: &ProtectionDomain,
    size: usize,
) -> Result<(MemoryRegion<HostBuffer>, MemoryRegion<HostBuffer>), Error> {
    let src = pd.register(HostBuffer::new(size)?, AccessFlags::LOCAL_WRITE)?;
    src.bytes().copy_from(&pattern(size)[..]);
    let back = pd.register(HostBuffer::new(size)?, AccessFlags::LOCAL_WRITE)?;
    Ok((src, back))
}

fn on_fabric(fabric: SoftRoce, size: usize) -> Result<(), Error> {
    println!(
        "Soft-RoCE: client {} ({}) -> server {} ({}), kernel {}",
        fabric.a.device, fabric.a.addr, fabric.b.device, fabric.b.addr, fabric.kernel
    );
    let opts = ConnectionOptions { timeout: TIMEOUT, ..Default::default() };
    let (client, server) = fabric.connect_pair(
        opts,
        move |pd| Ok((client_buffers(pd, size)?, Vec::new())),
        move |pd| {
            let mr = pd.register(HostBuffer::new(size)?, AccessFlags::remote_rw())?;
            let desc = mr.remote().to_bytes().to_vec();
            Ok((mr, desc))
        },
    )?;
    let remote = RemoteBuf::from_bytes(client.conn.remote_private_data())?;
    println!("server buffer: addr {:#x}, {} B, rkey {:#x}", remote.addr, remote.len, remote.rkey);
    let (src, back) = &client.state;
    let (w, r) = write_then_read(&client.conn, src, back, remote)?;
    let server_ok = server.state.to_vec() == src.to_vec();
    let back_ok = back.to_vec() == src.to_vec();
    report(size, w, r);
    println!("server buffer matches: {server_ok}; read-back matches: {back_ok}");
    if server_ok && back_ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument("data mismatch".into()))
    }
}

fn serve(addr: SocketAddr, size: usize) -> Result<(), Error> {
    let listener = Listener::bind(addr)?;
    println!("listening on {}", listener.local_addr());
    let req = listener.get_request(Duration::from_secs(3600))?;
    let dev = req.device_name().ok_or_else(|| Error::InvalidArgument("request on an unknown device".into()))?;
    let pd = ProtectionDomain::new(&Context::open(&dev)?)?;
    let mr = pd.register(HostBuffer::new(size)?, AccessFlags::remote_rw())?;
    let opts =
        ConnectionOptions { private_data: mr.remote().to_bytes().to_vec(), timeout: TIMEOUT, ..Default::default() };
    let conn = req.accept(&pd, &opts)?;
    println!("client connected on {dev}; waiting for it to finish");
    conn.wait_disconnect(Duration::from_secs(3600))?;
    let ok = mr.to_vec() == pattern(size).as_slice();
    println!("buffer holds the client's pattern: {ok}");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument("data mismatch".into()))
    }
}

fn connect(addr: SocketAddr, device: &str, size: usize) -> Result<(), Error> {
    let pd = ProtectionDomain::new(&Context::open(device)?)?;
    let (src, back) = client_buffers(&pd, size)?;
    let conn = Connection::connect(&pd, addr, &ConnectionOptions { timeout: TIMEOUT, ..Default::default() })?;
    let remote = RemoteBuf::from_bytes(conn.remote_private_data())?;
    if remote.len < size as u64 {
        return Err(Error::InvalidArgument(format!("the server's buffer has {} B, fewer than --size", remote.len)));
    }
    let (w, r) = write_then_read(&conn, &src, &back, remote)?;
    report(size, w, r);
    let ok = back.to_vec() == src.to_vec();
    println!("read-back matches: {ok}");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument("data mismatch".into()))
    }
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("write_read: {e}");
        std::process::exit(2)
    });
    let r = match (args.server, args.client, SoftRoce::from_env()) {
        (Some(a), None, _) => serve(a, args.size),
        (None, Some(a), _) => match &args.device {
            Some(d) => connect(a, d, args.size),
            None => Err(Error::InvalidArgument("--client needs --device NAME (see p2pb-devices)".into())),
        },
        (None, None, Some(f)) => on_fabric(f, args.size),
        (None, None, None) => Err(Error::InvalidArgument(
            "no Soft-RoCE fabric here: run `scripts/softroce target/release/write_read`, or give --server/--client"
                .into(),
        )),
        (Some(_), Some(_), _) => Err(Error::InvalidArgument("--server and --client exclude each other".into())),
    };
    if let Err(e) = r {
        eprintln!("write_read: {e}");
        std::process::exit(1);
    }
}
