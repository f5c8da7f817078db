//! Coarse clocks, for times that need no better than a few milliseconds.
//!
//! A `CLOCK_*_COARSE` read returns the time of the kernel's last tick from
//! the vDSO without reading the TSC. On virtual machines a TSC read can be
//! slow (the benchmark VM: 38 ns for `Instant::now()`, 48 ns for
//! `SystemTime::now()`, 9 ns for a coarse read), and a proxied request reads
//! the clock a dozen times; the ones that only stamp idle connections or
//! format a `Date` header use these instead.

use std::time::Duration;

fn read(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock ids used here
    // exist on every Linux since 2.6.32, so the call cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Monotonic time (the clock `Instant` reads), as of the last tick: at most
/// one tick (1-10 ms) behind it.
pub fn coarse_monotonic() -> Duration {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

/// Seconds since the Unix epoch, as of the last tick.
pub fn coarse_unix_secs() -> u64 {
    read(libc::CLOCK_REALTIME_COARSE).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// Each coarse clock is its precise one, at most a tick (<= 10 ms)
    /// behind; the bounds allow for a slow, shared test machine.
    #[test]
    fn coarse_clocks_follow_the_precise_ones() {
        let slack = Duration::from_millis(50);
        let coarse = coarse_monotonic();
        let precise = read(libc::CLOCK_MONOTONIC);
        assert!(coarse <= precise, "{coarse:?} ahead of {precise:?}");
        assert!(
            precise - coarse < slack,
            "{coarse:?} far behind {precise:?}"
        );

        let a = coarse_monotonic();
        std::thread::sleep(Duration::from_millis(30));
        let b = coarse_monotonic();
        assert!(b - a >= Duration::from_millis(20), "{a:?} -> {b:?}");
        assert!(b - a < Duration::from_millis(30) + slack, "{a:?} -> {b:?}");

        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let coarse = coarse_unix_secs();
        assert!(
            coarse.abs_diff(unix.as_secs()) <= 1,
            "{coarse} against {unix:?}"
        );
    }
}
