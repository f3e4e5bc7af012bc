//! What the benchmark binaries share on their command lines: clap parses their arguments
//! (`--help`, `--version`, usage errors exit 2 with the usage), and a failure while running is
//! printed as `NAME: message` (its `Display`, never its `Debug` form) and exits 1.

pub use p2pbridge_test_support::cli::{exit_status, parse_size, Res};
use p2pbridge_test_support::fabric::SoftRoce;

/// The exit codes every benchmark binary documents (in its doc comment and `--help`).
pub const EXIT_CODES: &str = "Exit status: 0 done (figures and targets are reported, not enforced); 1 failed while running (the error is printed as `NAME: ERROR`); 2 usage error (bad or missing arguments, or no Soft-RoCE fabric where one is needed).";

/// A usage error of command `C`: `message` with `C`'s usage on stderr, exit status 2.
pub fn usage_error<C: clap::CommandFactory>(message: impl std::fmt::Display) -> ! {
    C::command().error(clap::error::ErrorKind::ValueValidation, message).exit()
}

/// The Soft-RoCE fabric of `scripts/softroce`; outside it, a usage error of `C` (exit 2)
/// saying `how` to run the binary instead.
pub fn fabric_or_usage_error<C: clap::CommandFactory>(how: &str) -> SoftRoce {
    SoftRoce::from_env().unwrap_or_else(|| {
        C::command()
            .error(clap::error::ErrorKind::MissingRequiredArgument, format!("no Soft-RoCE fabric here: {how}"))
            .exit()
    })
}

/// A whole number of at least 1.
pub fn parse_count(s: &str) -> Result<usize, String> {
    s.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| format!("'{s}' is not a whole number of at least 1"))
}

/// A finite number of seconds greater than 0.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("'{s}' is not a positive number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_seconds_parse_as_documented() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        for bad in ["0", "", "MiB", "-1", "4kb", "1.5MiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_count("7"), Ok(7));
        assert!(parse_count("0").is_err() && parse_count("-1").is_err() && parse_count("1.5").is_err());
        assert_eq!(parse_seconds("0.05"), Ok(0.05));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
