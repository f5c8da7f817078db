//! Token bucket arithmetic for SYN rate limits, shared by the kernel and the
//! userspace tests. Integer only, no division on the per-packet path.
//!
//! Tokens are scaled by [`TOKEN`] (= 1e9) so a refill is `elapsed_ns * rate`
//! with no division: one token per second per unit of rate. Userspace
//! precomputes `fill_ns`, the time an empty bucket takes to fill; any longer
//! gap refills it completely, which also bounds `elapsed * rate` below
//! `burst * TOKEN + rate` and rules out overflow for rates and bursts up to
//! [`MAX_RATE`].

use crate::maps::{Bucket, SourceBucket};

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

/// Refused SYNs reach `TOP_SOURCES` in batches of this many (a power of
/// two): a source dropped by its limit shows up with its first refusal, and
/// after that its count trails the bucket's by less than a batch. One
/// `TOP_SOURCES` update per refused SYN cost ~50 ns per packet, a third of
/// the over-the-limit path (`cargo xtask bench xdp`).
pub const RANK_BATCH: u64 = 32;

/// How many refused SYNs to credit to the source's `TOP_SOURCES` count when
/// its bucket refuses its `nth` (1-based): the first one at once, then a
/// whole batch on each `RANK_BATCH`th after it, nothing in between.
#[inline(always)]
pub const fn rank_credit(nth: u64) -> u64 {
    if nth == 1 {
        1
    } else if nth & (RANK_BATCH - 1) == 1 {
        RANK_BATCH
    } else {
        0
    }
}

/// The refusals [`rank_credit`] has credited once a bucket has refused
/// `refused` SYNs (the sum of its credits for 1..=`refused`).
#[inline(always)]
pub const fn credited(refused: u64) -> u64 {
    if refused == 0 {
        0
    } else {
        1 + (refused - 1) / RANK_BATCH * RANK_BATCH
    }
}

/// What a source's bucket said to a SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Admitted,
    /// Refused; `credit` refusals are due to the source's `TOP_SOURCES`
    /// count now ([`rank_credit`]).
    Refused {
        credit: u64,
    },
}

/// A source's bucket for its first SYN, already charged for it, and what it
/// said (it refuses only with a burst of 0).
#[inline(always)]
pub const fn fresh_source(burst: u64, now_ns: u64) -> (SourceBucket, Taken) {
    let admitted = burst > 0;
    let b = SourceBucket {
        bucket: fresh(burst, now_ns),
        refused: !admitted as u64,
    };
    if admitted {
        (b, Taken::Admitted)
    } else {
        (b, Taken::Refused { credit: 1 })
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
    fn refusals_are_credited_in_batches() {
        let mut credited = 0;
        for nth in 1..=1000u64 {
            let c = rank_credit(nth);
            assert!(c == 0 || c == 1 || c == RANK_BATCH, "odd credit {c}");
            credited += c;
            assert!(credited <= nth, "credited {credited} of {nth} refusals");
            assert!(
                nth - credited < RANK_BATCH,
                "{nth} refusals, {credited} credited: more than a batch behind"
            );
            assert_eq!(super::credited(nth), credited, "after {nth} refusals");
            // Exact at every batch boundary.
            if nth == 1 || nth % RANK_BATCH == 1 {
                assert_eq!(credited, nth);
            }
        }
        assert_eq!(super::credited(0), 0);
        assert_eq!(rank_credit(1), 1, "the first refusal ranks at once");
        assert_eq!(rank_credit(2), 0);
        assert_eq!(rank_credit(RANK_BATCH + 1), RANK_BATCH);
    }

    #[test]
    fn fresh_source_refuses_only_without_burst() {
        let (b, t) = fresh_source(3, 7);
        assert_eq!((t, b.refused, b.bucket), (Taken::Admitted, 0, fresh(3, 7)));
        let (b, t) = fresh_source(0, 7);
        assert_eq!((t, b.refused), (Taken::Refused { credit: 1 }, 1));
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

/// [`take`] on a source's bucket with its limits; on a refusal, `count`
/// adds one to `b.refused` and returns the new count (the kernel does it
/// atomically: CPUs may share a source).
#[inline(always)]
pub fn take_source(
    b: &mut SourceBucket,
    l: &crate::maps::Limits,
    now_ns: u64,
    count: impl FnOnce(&mut u64) -> u64,
) -> Taken {
    if take(
        &mut b.bucket,
        l.syn_rate,
        l.syn_burst,
        l.syn_fill_ns,
        now_ns,
    ) {
        Taken::Admitted
    } else {
        Taken::Refused {
            credit: rank_credit(count(&mut b.refused)),
        }
    }
}

/// SYN buckets over plain collections, for code that runs the verdict
/// outside the kernel on one thread (the verdict tests and the packet
/// fuzzer): a bucket per source key, started full, plus the global one.
#[cfg(any(test, feature = "user"))]
#[derive(Default)]
pub struct MemBuckets {
    sources: core::cell::RefCell<std::collections::HashMap<crate::maps::SourceKey, SourceBucket>>,
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
    ) -> Option<Taken> {
        let mut m = self.sources.borrow_mut();
        m.get_mut(key).map(|b| {
            take_source(b, l, now, |n| {
                *n += 1;
                *n
            })
        })
    }

    /// `Tables::add_source`.
    pub fn add_source(
        &self,
        key: &crate::maps::SourceKey,
        l: &crate::maps::Limits,
        now: u64,
    ) -> Taken {
        let (b, t) = fresh_source(l.syn_burst, now);
        self.sources.borrow_mut().insert(*key, b);
        t
    }

    /// Sources with a bucket (tests).
    pub fn sources(&self) -> usize {
        self.sources.borrow().len()
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
