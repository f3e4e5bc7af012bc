//! What the command-line binaries of the examples and the benches share: the error type of a
//! run, its exit status (`NAME: message` through `Display`, exit 1), and size arguments.

use std::process::ExitCode;

/// Any error, which can cross threads: what the binaries' runs return.
pub type Res<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The exit status for `r`: 0 for `Ok`; for an error, prints `name: error` (its `Display`,
/// with any cause its message does not already say) on stderr and returns 1.
pub fn exit_status(name: &str, r: Res) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                let s = c.to_string();
                if !msg.contains(&s) {
                    msg.push_str(": ");
                    msg.push_str(&s);
                }
                cause = c.source();
            }
            eprintln!("{name}: {msg}");
            ExitCode::from(1)
        }
    }
}

/// A size: bytes, or with a `KiB`, `MiB` or `GiB` suffix (64, 4KiB, 256MiB); not 0.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let (num, mul) = match s {
        s if s.ends_with("GiB") => (&s[..s.len() - 3], 1 << 30),
        s if s.ends_with("MiB") => (&s[..s.len() - 3], 1 << 20),
        s if s.ends_with("KiB") => (&s[..s.len() - 3], 1 << 10),
        s => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{s}' is not a positive size such as 64, 4KiB, 256MiB"))
}
