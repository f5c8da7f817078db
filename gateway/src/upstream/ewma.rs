//! What the `latency` policy knows about a backend: exponentially weighted
//! moving averages of its time to first byte and of its error rate, kept in
//! atomics (a lost update under a race only delays the average by one
//! sample).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Weight of a new latency sample.
const LATENCY_ALPHA: f64 = 0.3;
/// Weight of a new error sample.
const ERROR_ALPHA: f64 = 0.2;

#[derive(Default)]
pub struct Observed {
    /// EWMA of time to first byte, in microseconds (f64 bits); 0 = no sample yet.
    latency_us: AtomicU64,
    /// EWMA of failures (1) and successes (0) (f64 bits).
    errors: AtomicU64,
}

fn update(cell: &AtomicU64, sample: f64, alpha: f64, first_is_sample: bool) {
    let old = f64::from_bits(cell.load(Ordering::Relaxed));
    let new = if first_is_sample && old == 0.0 {
        sample
    } else {
        old + alpha * (sample - old)
    };
    cell.store(new.to_bits(), Ordering::Relaxed);
}

impl Observed {
    /// A response began `ttfb` after dispatch: a JSON answer's head, or a
    /// stream's first token (its head comes before the backend schedules
    /// it).
    pub fn success(&self, ttfb: Duration) {
        update(
            &self.latency_us,
            ttfb.as_secs_f64() * 1e6,
            LATENCY_ALPHA,
            true,
        );
        if self.errors.load(Ordering::Relaxed) != 0 {
            update(&self.errors, 0.0, ERROR_ALPHA, false);
        }
    }

    pub fn failure(&self) {
        update(&self.errors, 1.0, ERROR_ALPHA, false);
    }

    /// Microseconds; 0 before the first sample.
    pub fn latency_us(&self) -> f64 {
        f64::from_bits(self.latency_us.load(Ordering::Relaxed))
    }

    /// Between 0 and 1.
    pub fn error_rate(&self) -> f64 {
        f64::from_bits(self.errors.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_follow_samples() {
        let o = Observed::default();
        assert_eq!(o.latency_us(), 0.0);
        o.success(Duration::from_millis(10));
        assert_eq!(o.latency_us(), 10_000.0, "the first sample is the average");
        for _ in 0..30 {
            o.success(Duration::from_millis(1));
        }
        assert!(o.latency_us() < 1_100.0, "{}", o.latency_us());
        for _ in 0..10 {
            o.failure();
        }
        assert!(o.error_rate() > 0.85, "{}", o.error_rate());
        for _ in 0..30 {
            o.success(Duration::from_millis(1));
        }
        assert!(o.error_rate() < 0.01, "{}", o.error_rate());
    }
}
