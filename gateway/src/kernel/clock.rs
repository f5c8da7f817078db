//! The two clocks of a ban: the kernel checks expiry against
//! `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`), while the state file stores wall
//! clock time so a ban keeps its deadline across reboots.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The kernel's coarse monotonic clock now, in nanoseconds: exactly what the
/// XDP program reads with `bpf_ktime_get_coarse_ns`, so deadlines computed
/// here compare correctly there.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clock exists since Linux 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall clock now, in milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Kernel expiry (monotonic ns) for a wall-clock deadline; `None` if it passed.
pub fn expiry_ns_from_unix_ms(expires_unix_ms: u64) -> Option<u64> {
    let left = expires_unix_ms.checked_sub(unix_ms()).filter(|l| *l > 0)?;
    Some(monotonic_ns() + left * 1_000_000)
}

/// Time left before a kernel expiry; `None` for permanent entries, zero once lapsed.
pub fn remaining(expires_ns: u64) -> Option<Duration> {
    (expires_ns != 0).then(|| Duration::from_nanos(expires_ns.saturating_sub(monotonic_ns())))
}
