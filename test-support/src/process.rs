//! Child processes in tests: killed and reaped however the test ends ([`KillOnDrop`]), and
//! waited for by what they print ([`Lines`]), never by sleeping.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A child process that is killed and reaped when this guard drops: a test that fails (panics)
/// while the child runs never leaves it behind, waiting for a client for ever.
#[derive(Debug)]
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        KillOnDrop(Some(child))
    }

    /// The child.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child is there until the guard is consumed")
    }

    /// Waits for the child to exit by itself (it is not killed), and returns its status.
    pub fn wait(mut self) -> std::io::Result<ExitStatus> {
        self.child().wait()
    }

    /// Kills the child (if it still runs) and returns its status.
    pub fn kill(mut self) -> std::io::Result<ExitStatus> {
        let _ = self.child().kill();
        self.child().wait()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // Exited already (waited for): both are no-ops then.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The lines a child prints, read on a thread of their own, so that a test can wait for a line
/// with a deadline (and the child never blocks on a full pipe).
#[derive(Debug)]
pub struct Lines {
    rx: Receiver<String>,
    seen: String,
}

impl Lines {
    /// Starts reading `from` (a child's stdout or stderr) line by line.
    pub fn new(from: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { rx, seen: String::new() }
    }

    /// Waits up to `timeout` for the first line for which `want` says `Some`, and returns that.
    /// Fails, with everything read so far, when the output ends (the child exited) or the time
    /// is up first.
    pub fn wait_for<T>(&mut self, timeout: Duration, mut want: impl FnMut(&str) -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if let Some(t) = want(&line) {
                        return Ok(t);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("nothing such within {timeout:?}; the output so far:\n{}", self.seen))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("the output ended first (did the process exit?):\n{}", self.seen))
                }
            }
        }
    }

    /// Everything the child printed: what was read so far, then the rest until its output ends
    /// (call it once the child has exited, or it waits until then).
    pub fn all(mut self) -> String {
        for line in self.rx.iter() {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        self.seen
    }
}

/// Runs `bin` with `args` to completion, outside any Soft-RoCE fabric (`P2PB_SOFTROCE` unset),
/// for tests of a binary's command line.
pub fn run_outside_fabric(bin: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin)
        .args(args)
        .env_remove("P2PB_SOFTROCE")
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"))
}

/// A finished process's status and output, for an assertion's message.
pub fn show_output(o: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts the help convention every binary of the project keeps: `--help` and `-h` exit 0
/// and print a usage line naming `name`, the documented exit codes (`Exit status: 0`), and each
/// of `also`.
pub fn assert_help(name: &str, bin: &str, also: &[&str]) {
    for flag in ["--help", "-h"] {
        let o = run_outside_fabric(bin, &[flag]);
        assert_eq!(o.status.code(), Some(0), "{name} {flag}: {}", show_output(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(&format!("Usage: {name}")), "{name} {flag}: {}", show_output(&o));
        assert!(out.contains("Exit status: 0"), "{name} {flag} documents its exit codes: {}", show_output(&o));
        for a in also {
            assert!(out.contains(a), "{name} {flag} mentions {a}: {}", show_output(&o));
        }
    }
}

/// Asserts that `--version` and `-V` exit 0 and print `name version` (the caller's
/// `env!("CARGO_PKG_VERSION")`).
pub fn assert_version(name: &str, bin: &str, version: &str) {
    for flag in ["--version", "-V"] {
        let o = run_outside_fabric(bin, &[flag]);
        assert_eq!(o.status.code(), Some(0), "{name} {flag}: {}", show_output(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("{name} {version}"), "{name} {flag}");
    }
}

/// Asserts that an unknown flag is a usage error: exit 2, and clap's message naming the flag.
pub fn assert_unknown_flag(name: &str, bin: &str) {
    let o = run_outside_fabric(bin, &["--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{name}: {}", show_output(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-such-flag"), "{name}: {}", show_output(&o));
}
