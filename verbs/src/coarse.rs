//! A cheap monotonic clock for checks made in polling loops.

use std::time::Duration;

/// A reading of the coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: the kernel's tick count,
/// read through the vDSO without the time-stamp counter), for checks made on every call of a
/// polling loop (rate limits, stall checks), where the precise clock's cost shows.
/// A reading lags the precise clock by up to one tick (1-10 ms), so a duration between two
/// readings is within one tick of the truth: [`since`](Self::since) takes the tick off, so
/// that a timeout compared with it never fires early. That holds while the kernel updates the
/// coarse clock every tick; were an update late by more (a virtual machine descheduled at that
/// moment), a duration could be overstated by the excess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Coarse(Duration);

impl Coarse {
    /// The clock now.
    pub fn now() -> Self {
        Coarse(duration(rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse)))
    }

    /// How long from `earlier` to `self` at least: the difference less one tick.
    pub fn since(self, earlier: Coarse) -> Duration {
        self.0.saturating_sub(earlier.0).saturating_sub(coarse_tick())
    }

    /// `self + d`.
    pub fn after(self, d: Duration) -> Self {
        Coarse(self.0.saturating_add(d))
    }

    /// The reading in nanoseconds since the clock's start (boot), for keeping in an atomic.
    pub fn nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The coarse clock's resolution (a tick).
fn coarse_tick() -> Duration {
    static TICK: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| duration(rustix::time::clock_getres(rustix::time::ClockId::MonotonicCoarse)))
}

/// A `timespec` of the monotonic clock (a reading since boot, or a resolution: never
/// negative) as a `Duration`.
fn duration(t: rustix::time::Timespec) -> Duration {
    Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    #[cfg_attr(miri, ignore = "reads the clock with a raw system call (rustix), which Miri cannot run")]
    fn coarse_durations_never_overstate_and_lag_by_at_most_two_ticks() {
        // The coarse readings lie inside the precise ones, so the truth between them is at
        // most the precise span.
        let i0 = Instant::now();
        let c0 = Coarse::now();
        std::thread::sleep(Duration::from_millis(50));
        let c1 = Coarse::now();
        let i1 = Instant::now();
        let coarse = c1.since(c0);
        assert!(coarse <= i1 - i0, "coarse {coarse:?} > precise {:?}", i1 - i0);
        assert!(coarse + 2 * coarse_tick() >= Duration::from_millis(50), "coarse {coarse:?}, tick {:?}", coarse_tick());
        assert!(c0.after(Duration::from_secs(1)) > c0);
        assert_eq!(c0.after(Duration::from_nanos(7)).nanos(), c0.nanos() + 7);
    }
}
