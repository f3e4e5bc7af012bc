//! Peer processes for the fault tests: the test binary runs itself again, in a child process,
//! with one `role_*` entry selected, so that a peer can be killed as a real peer process is
//! (and, for the link tests, so that a process holding a device can let it go by exiting).
#![allow(dead_code, unused_imports)] // each test binary uses its own part

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pbridge::gpu::{HostBackend, MemoryBackend};
use p2pbridge::verbs::{AccessFlags, ConnectionOptions, Context, Listener, ProtectionDomain};
use p2pbridge::{Bridge, BridgeOptions};
use p2pbridge_test_support::fabric::SoftRoce;

/// Where a role process writes what it has to say (its port, its result).
pub const OUT_ENV: &str = "P2PB_ROLE_OUT";
/// Bytes each peer registers and hands out.
pub const LEN: usize = 16 << 20;

pub fn fabric() -> SoftRoce {
    SoftRoce::from_env().expect("this test needs the Soft-RoCE fabric: run it through scripts/test or scripts/softroce")
}

pub fn opts() -> ConnectionOptions {
    ConnectionOptions { timeout: Duration::from_secs(30), rnr_retry_count: 7, ..Default::default() }
}

pub use p2pbridge_test_support::pattern;

/// Writes `text` to the role's output file, all at once (a rename).
pub fn say(text: &str) {
    let out = std::env::var(OUT_ENV).expect("a role process, started with P2PB_ROLE_OUT set");
    std::fs::write(format!("{out}.tmp"), text).unwrap();
    std::fs::rename(format!("{out}.tmp"), &out).unwrap();
}

/// The peer role: accepts one connection on host B, registers `LEN` bytes, sends the client a
/// key for them over the connection, then waits to be killed. Says the port it listens on.
pub fn serve_until_killed() {
    let fab = fabric();
    fab.b.enter().unwrap();
    let l = Listener::bind((fab.b.addr, 0).into()).unwrap();
    say(&l.local_addr().port().to_string());
    let req = l.get_request(Duration::from_secs(60)).unwrap();
    let pd = ProtectionDomain::new(&Context::open(&req.device_name().unwrap()).unwrap()).unwrap();
    let conn = req.accept(&pd, &opts()).unwrap();
    let mem = HostBackend::new();
    let bridge = Bridge::new(&pd, vec![Arc::new(mem.clone())], BridgeOptions::default()).unwrap();
    let buf = mem.alloc(LEN).unwrap();
    let reg = bridge.register(buf.addr(), LEN as u64, AccessFlags::remote_rw()).unwrap();
    let key = bridge.hand_out(&conn, &reg, 0, LEN as u64).unwrap();
    bridge.send_key(&conn, &key).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A role process: this test binary running only `role`, with `env` set.
pub struct Role {
    pub child: Child,
    out: std::path::PathBuf,
}

impl Role {
    pub fn start(role: &str, tag: &str, env: &[(&str, String)]) -> Role {
        let out = std::env::temp_dir().join(format!("p2pb-role-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&out);
        // Its output goes to a file of its own: interleaved with this test's, it would split
        // the harness's "test NAME ... ok" lines that scripts/test reads.
        let log = std::fs::File::create(out.with_extension("log")).expect("create the role's log file");
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", role, "--nocapture", "--test-threads=1"])
            .env(OUT_ENV, &out)
            .stdout(log.try_clone().expect("dup the log file"))
            .stderr(log)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap_or_else(|e| panic!("start the {role} process: {e}"));
        Role { child, out }
    }

    /// The role's own output (its log file), for a failure's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.out.with_extension("log")).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// What the role said, waiting up to `wait` for it.
    pub fn heard(&self, wait: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&self.out) {
                return s;
            }
            assert!(t.elapsed() < wait, "the role process said nothing within {wait:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts a peer process and returns it with the address it listens on.
pub fn start_peer(fab: &SoftRoce, tag: &str) -> (Child, std::net::SocketAddr) {
    let r = Role::start("role_peer_serves_until_killed", tag, &[]);
    let port: u16 = r.heard(Duration::from_secs(60)).trim().parse().unwrap();
    (r.child, (fab.b.addr, port).into())
}

pub fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}
