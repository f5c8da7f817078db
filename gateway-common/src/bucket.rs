//! Token bucket arithmetic for SYN rate limits, shared by the kernel and the
//! userspace tests. Integer only, no division on the per-packet path.
//!
//! Tokens are scaled by [`TOKEN`] (= 1e9) so a refill is `elapsed_ns * rate`
//! with no division: one token per second per unit of rate. Userspace
//! precomputes `fill_ns`, the time an empty bucket takes to fill; any longer
//! gap refills it completely, which also bounds `elapsed * rate` below
//! `burst * TOKEN + rate` and rules out overflow for rates and bursts up to
//! [`MAX_RATE`].

use crate::maps::Bucket;

/// One token in bucket units.
pub const TOKEN: u64 = 1_000_000_000;
/// Largest rate or burst accepted (keeps `burst * TOKEN` far below u64::MAX).
pub const MAX_RATE: u64 = 1_000_000_000;

/// Nanoseconds an empty bucket takes to fill (`burst / rate` seconds,
/// rounded up). 0 when the limit is disabled.
pub const fn fill_ns(rate: u64, burst: u64) -> u64 {
    if rate == 0 {
        return 0;
    }
    (burst * TOKEN).div_ceil(rate)
}

/// A bucket for a source seen for the first time, already charged for the
/// packet that created it.
#[inline(always)]
pub const fn fresh(burst: u64, now_ns: u64) -> Bucket {
    Bucket {
        tokens: (burst * TOKEN).saturating_sub(TOKEN),
        last_ns: now_ns,
    }
}

/// Refills `b` up to `now_ns`, then takes one token. Returns whether the
/// packet is admitted. A rate of 0 admits everything.
#[inline(always)]
pub fn take(b: &mut Bucket, rate: u64, burst: u64, fill_ns: u64, now_ns: u64) -> bool {
    if rate == 0 {
        return true;
    }
    let cap = burst * TOKEN;
    // Clocks never run backwards, but a bucket written by another CPU a
    // moment later than our `now` may look like it; treat that as no time.
    let elapsed = now_ns.saturating_sub(b.last_ns);
    let mut tokens = if elapsed >= fill_ns {
        cap
    } else {
        let t = b.tokens + elapsed * rate;
        if t > cap {
            cap
        } else {
            t
        }
    };
    if elapsed > 0 {
        b.last_ns = now_ns;
    }
    let admitted = tokens >= TOKEN;
    if admitted {
        tokens -= TOKEN;
    }
    b.tokens = tokens;
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let (rate, burst) = (10, 5);
        let fill = fill_ns(rate, burst);
        let mut b = fresh(burst, 0);
        // The fresh bucket already paid for one; four more pass, then empty.
        for i in 0..4 {
            assert!(
                take(&mut b, rate, burst, fill, 0),
                "token {i} of the burst refused"
            );
        }
        assert!(
            !take(&mut b, rate, burst, fill, 0),
            "bucket should be empty"
        );
        // 100 ms at 10/s is exactly one token.
        assert!(take(&mut b, rate, burst, fill, SEC / 10));
        assert!(!take(&mut b, rate, burst, fill, SEC / 10));
        // Half a token is not enough.
        assert!(!take(&mut b, rate, burst, fill, SEC / 10 + SEC / 20));
        assert!(take(&mut b, rate, burst, fill, SEC / 5));
    }

    #[test]
    fn long_idle_refills_to_burst_only() {
        let (rate, burst) = (1, 3);
        let fill = fill_ns(rate, burst);
        let mut b = fresh(burst, 0);
        let later = 1_000_000 * SEC;
        let admitted = (0..10)
            .filter(|_| take(&mut b, rate, burst, fill, later))
            .count();
        assert_eq!(admitted, 3, "an idle bucket holds `burst` tokens, no more");
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let fill = fill_ns(MAX_RATE, MAX_RATE);
        let mut b = fresh(MAX_RATE, 0);
        assert!(take(&mut b, MAX_RATE, MAX_RATE, fill, fill - 1));
        assert!(take(&mut b, MAX_RATE, MAX_RATE, fill, u64::MAX));
        assert!(take(&mut b, 1, 1, fill_ns(1, 1), u64::MAX));
    }

    #[test]
    fn zero_rate_disables() {
        let mut b = Bucket::default();
        assert!((0..100).all(|_| take(&mut b, 0, 0, 0, 5)));
    }

    #[test]
    fn clock_skew_between_cpus_is_harmless() {
        let fill = fill_ns(1, 1);
        let mut b = fresh(2, 100);
        assert!(
            take(&mut b, 1, 2, fill, 50),
            "earlier `now` must not underflow"
        );
        assert_eq!(b.last_ns, 100);
    }
}

/// SYN buckets over plain collections, for code that runs the verdict
/// outside the kernel on one thread (the verdict tests and the packet
/// fuzzer): a bucket per source key, started full, plus the global one.
#[cfg(any(test, feature = "user"))]
#[derive(Default)]
pub struct MemBuckets {
    sources: core::cell::RefCell<std::collections::HashMap<crate::maps::SourceKey, Bucket>>,
    global: core::cell::RefCell<Option<Bucket>>,
}

#[cfg(any(test, feature = "user"))]
impl MemBuckets {
    /// `Tables::take_source`.
    pub fn take_source(
        &self,
        key: &crate::maps::SourceKey,
        l: &crate::maps::Limits,
        now: u64,
    ) -> bool {
        let mut m = self.sources.borrow_mut();
        match m.get_mut(key) {
            Some(b) => take(b, l.syn_rate, l.syn_burst, l.syn_fill_ns, now),
            None => {
                m.insert(*key, fresh(l.syn_burst, now));
                true
            }
        }
    }

    /// `Tables::take_global`.
    pub fn take_global(&self, l: &crate::maps::Limits, now: u64) -> bool {
        let mut g = self.global.borrow_mut();
        match g.as_mut() {
            Some(b) => take(b, l.global_rate, l.global_burst, l.global_fill_ns, now),
            None => {
                *g = Some(fresh(l.global_burst, now));
                true
            }
        }
    }
}
