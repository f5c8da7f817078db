//! SYN rate limits, shared by the kernel and userspace (the accept guard,
//! the verdict tests and the packet fuzzer). Integer only, no division on
//! the per-packet path.
//!
//! A bucket is GCRA (the "virtual scheduling" form of a token bucket): one
//! u64, its theoretical arrival time (TAT), the time at which the bucket
//! would be full again. A SYN at `now` conforms when `TAT - now` is at
//! most the tolerance, `(burst - 1)` intervals of `1 / rate`; an admitted
//! SYN moves the TAT one interval on (from `now` when the TAT has passed).
//! That is exactly a token bucket of `burst` tokens refilled at `rate` per
//! second, with two properties that matter when CPUs share a bucket:
//!
//! - an admission is one atomic add to the TAT, so no CPU's take is lost
//!   to another's write (a token bucket's refill-and-take is a
//!   read-modify-write of two words, and two CPUs taking from one bucket
//!   let a few per cent more than its burst through);
//! - a refusal writes nothing, so a flood refused on several CPUs does not
//!   bounce the bucket's cache line between them.
//!
//! With N CPUs, a bucket admits at most N - 1 SYNs more than its limit
//! each time it is spent: CPUs that read it at the same moment with one
//! take left all add theirs. Two writes are not adds:
//!
//! - a bucket idle for longer than its tolerance (it is full) restarts
//!   with a store of `now + interval`. CPUs restarting it at the same
//!   moment count one SYN where they admitted one each; a CPU stalled
//!   between its read and its store (its vCPU preempted by the host) can
//!   overwrite the takes other CPUs made meanwhile, at most a burst, once
//!   per such restart. A bucket idle for less moves on by an add of the
//!   time it was idle plus the interval: CPUs racing there charge it more
//!   than they took, never less;
//! - a bucket further ahead than the tolerance, [`SLACK`] intervals and
//!   20 ms (charged twice by such a race, or spent under limits that
//!   changed since; the 20 ms cover a CPU whose clock reading is a jiffy
//!   older than the one that took from it last, which must not take this
//!   for a debt) is set back to exactly spent when it refuses, once, so no
//!   source waits out debts the limits in force would not have let it run
//!   up: a source drained at 1/s with a burst of 1,000 is admitted again
//!   at 100/s after a raise, not 999 s later.
//!
//! Time is counted in sixteenths of a nanosecond ([`SHIFT`]), so the
//! interval of any rate up to [`MAX_RATE`] is within 3.1% (within 0.05% up
//! to 10 million per second); the clock in those units lasts 18 years of
//! uptime.

use crate::maps::SourceBucket;

/// Nanoseconds per second.
pub const SEC_NS: u64 = 1_000_000_000;
/// Bucket time is nanoseconds shifted left by this many bits.
pub const SHIFT: u32 = 4;
/// Largest rate or burst accepted.
pub const MAX_RATE: u64 = 1_000_000_000;
/// Largest tolerance (2^56 bucket units, 52 days; a burst of more than
/// 52 days' worth of the rate is cut there): with the clock capped at 2^63
/// units, a TAT cannot overflow even when 64 CPUs overcharge it at once.
pub const MAX_TOLERANCE: u64 = 1 << 56;
/// How many intervals (plus [`RECENT_NS`]) past its tolerance a bucket may
/// be before a refusal sets it back, and an idle bucket's restart is still
/// an add (module doc).
pub const SLACK: u64 = 64;
/// The kernel's coarse clock moves in jiffies (up to 10 ms): a bucket idle
/// for up to this long past its tolerance restarts with an add.
const RECENT_NS: u64 = 20_000_000;
/// Clock readings above this (in ns; 18 years of uptime) are taken as it.
const MAX_NOW_NS: u64 = (1 << 63) >> SHIFT;

/// The interval between SYNs at `rate` per second, in bucket units
/// (rounded); 0 when the limit is disabled.
pub const fn interval(rate: u64) -> u64 {
    if rate == 0 {
        return 0;
    }
    let rate = if rate > MAX_RATE { MAX_RATE } else { rate };
    ((SEC_NS << SHIFT) + rate / 2) / rate
}

/// How far ahead of `now` a bucket's TAT may be for a SYN to conform:
/// `burst - 1` intervals (a full bucket admits `burst` back to back).
pub const fn tolerance(rate: u64, burst: u64) -> u64 {
    let t = burst.saturating_sub(1).saturating_mul(interval(rate));
    if t > MAX_TOLERANCE {
        MAX_TOLERANCE
    } else {
        t
    }
}

/// `now_ns` (a monotonic clock) in bucket units.
#[inline(always)]
pub const fn clock(now_ns: u64) -> u64 {
    let n = if now_ns > MAX_NOW_NS {
        MAX_NOW_NS
    } else {
        now_ns
    };
    n << SHIFT
}

/// How a bucket's TAT is read and written: plainly where one thread owns
/// it (userspace), with a volatile load and an atomic add in the kernel,
/// where CPUs share it.
pub trait Tat {
    fn load(&self) -> u64;
    fn store(&self, tat: u64);
    fn add(&self, n: u64);
}

impl Tat for core::cell::Cell<u64> {
    #[inline(always)]
    fn load(&self) -> u64 {
        self.get()
    }
    #[inline(always)]
    fn store(&self, tat: u64) {
        self.set(tat)
    }
    #[inline(always)]
    fn add(&self, n: u64) {
        self.set(self.get() + n)
    }
}

/// Takes one SYN from the bucket whose TAT is `tat`, at `now_ns`. Returns
/// whether it is admitted.
#[inline(always)]
pub fn take(tat: &impl Tat, interval: u64, tolerance: u64, burst: u64, now_ns: u64) -> bool {
    if interval == 0 {
        return true;
    }
    if burst == 0 {
        return false;
    }
    let now = clock(now_ns);
    // What CPUs racing on the bucket, or a CPU whose clock reading is a
    // jiffy older than another's, can put it past its tolerance.
    let slack = SLACK * interval + (RECENT_NS << SHIFT);
    let t = tat.load();
    if t <= now {
        let idle = now - t;
        if idle <= tolerance + slack {
            tat.add(idle + interval);
        } else {
            // Full: start again from now.
            tat.store(now + interval);
        }
        true
    } else if t - now <= tolerance {
        tat.add(interval);
        true
    } else {
        if t - now > tolerance + slack {
            // Exactly spent: the next SYN conforms an interval from now.
            tat.store(now + tolerance + interval);
        }
        false
    }
}

/// The TAT of a bucket made for a SYN it admits at `now_ns`.
#[inline(always)]
pub const fn fresh(interval: u64, now_ns: u64) -> u64 {
    clock(now_ns) + interval
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
pub const fn fresh_source(l: &crate::maps::Limits, now_ns: u64) -> (SourceBucket, Taken) {
    let admitted = l.syn_burst > 0;
    let b = SourceBucket {
        tat: fresh(l.syn_interval, now_ns),
        refused: !admitted as u64,
    };
    if admitted {
        (b, Taken::Admitted)
    } else {
        (b, Taken::Refused { credit: 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// A bucket as userspace holds it.
    struct B {
        tat: core::cell::Cell<u64>,
        rate: u64,
        burst: u64,
    }

    impl B {
        /// A bucket made for a SYN at `now`, charged for it.
        fn fresh(rate: u64, burst: u64, now: u64) -> B {
            B {
                tat: core::cell::Cell::new(fresh(interval(rate), now)),
                rate,
                burst,
            }
        }

        fn take(&self, now: u64) -> bool {
            take(
                &self.tat,
                interval(self.rate),
                tolerance(self.rate, self.burst),
                self.burst,
                now,
            )
        }
    }

    #[test]
    fn burst_then_rate() {
        let b = B::fresh(10, 5, 0);
        // The fresh bucket already paid for one; four more pass, then empty.
        for i in 0..4 {
            assert!(b.take(0), "token {i} of the burst refused");
        }
        assert!(!b.take(0), "bucket should be empty");
        // 100 ms at 10/s is exactly one token.
        assert!(b.take(SEC / 10));
        assert!(!b.take(SEC / 10));
        // Half a token is not enough.
        assert!(!b.take(SEC / 10 + SEC / 20));
        assert!(b.take(SEC / 5));
    }

    #[test]
    fn long_idle_refills_to_burst_only() {
        let b = B::fresh(1, 3, 0);
        let later = 1_000_000 * SEC;
        let admitted = (0..10).filter(|_| b.take(later)).count();
        assert_eq!(admitted, 3, "an idle bucket holds `burst` tokens, no more");
        // A zeroed bucket (the kernel's global one before its first SYN)
        // is full.
        let b = B {
            tat: core::cell::Cell::new(0),
            rate: 1,
            burst: 3,
        };
        assert_eq!((0..10).filter(|_| b.take(5)).count(), 3);
    }

    #[test]
    fn a_flood_gets_the_burst_then_the_rate() {
        // One SYN every millisecond for 10 s against 10/s, burst 5: the
        // burst, then one per 100 ms.
        for (rate, burst) in [(10, 5), (3, 1), (200, 20), (7, 7)] {
            let b = B::fresh(rate, burst, 0);
            let admitted = 1 + (1..10_000u64).filter(|ms| b.take(ms * 1_000_000)).count() as u64;
            let want = burst + rate * 10;
            assert!(
                admitted.abs_diff(want) <= 1,
                "{rate}/s burst {burst}: {admitted} admitted in 10 s, want {want}"
            );
        }
    }

    #[test]
    fn intervals_are_close_to_the_rate() {
        for rate in [
            1,
            3,
            7,
            1_000,
            12_345,
            1_000_000,
            10_000_000,
            33_333_333,
            969_696_970,
            MAX_RATE,
        ] {
            let i = interval(rate);
            let err = (i * rate).abs_diff(SEC << SHIFT) as f64 / (SEC << SHIFT) as f64;
            let bound = if rate <= 10_000_000 { 0.0005 } else { 0.031 };
            assert!(err <= bound, "{rate}/s: interval {i}, error {err}");
        }
        assert_eq!(interval(0), 0);
        assert_eq!(interval(2 * MAX_RATE), interval(MAX_RATE));
    }

    /// A CPU that read the bucket before other CPUs wrote it: its load
    /// returns what it saw, its writes land on the bucket as it is now.
    struct Late<'a> {
        seen: u64,
        tat: &'a core::cell::Cell<u64>,
    }

    impl Tat for Late<'_> {
        fn load(&self) -> u64 {
            self.seen
        }
        fn store(&self, tat: u64) {
            self.tat.set(tat)
        }
        fn add(&self, n: u64) {
            self.tat.set(self.tat.get() + n)
        }
    }

    /// Four CPUs read the bucket at `now`, then each takes from it.
    fn race(b: &B, now: u64) -> usize {
        let seen = b.tat.get();
        let cpu = Late { seen, tat: &b.tat };
        let (i, tol) = (interval(b.rate), tolerance(b.rate, b.burst));
        (0..4).filter(|_| take(&cpu, i, tol, b.burst, now)).count()
    }

    #[test]
    fn cpus_racing_on_a_bucket_never_take_more_than_they_count() {
        // At the edge: one take left, four CPUs see it and all take. The
        // bucket counts all four, so it refuses for the next three
        // intervals.
        let b = B::fresh(10, 5, 0);
        for _ in 0..3 {
            assert!(b.take(0));
        }
        assert_eq!(race(&b, 0), 4);
        assert!(!b.take(SEC / 10 * 3));
        assert!(b.take(SEC / 10 * 4));

        // A busy bucket's TAT just passed (burst 1, so every admission is
        // a restart): four CPUs racing there are all counted, and more.
        let b = B::fresh(10, 1, 0);
        let now = SEC / 10 + 1_000;
        assert_eq!(race(&b, now), 4);
        for later in [now + SEC / 10 * 3, now + SEC / 10 * 3 + SEC / 20] {
            assert!(!b.take(later), "counted fewer than 4 takes at {later}");
        }

        // Such a race can overcharge a bucket far past its tolerance (here
        // idle 80 ms past it, restarted four times over): the first
        // refusal sets it back to spent, so the source waits an interval,
        // not the overcharge.
        let b = B::fresh(1_000, 10, 0);
        let now = 90 * 1_000_000;
        assert_eq!(race(&b, now), 4);
        assert!(b.tat.get() > clock(now) + 3 * clock(80_000_000));
        assert!(!b.take(now));
        assert_eq!(
            b.tat.get(),
            clock(now) + tolerance(1_000, 10) + interval(1_000)
        );
        assert!(b.take(now + 1_000_000));
    }

    #[test]
    fn a_raised_limit_applies_to_a_spent_bucket_at_once() {
        // Spent at 1/s with a burst of 1,000 (ahead by 999 s)...
        let b = B::fresh(1, 1_000, 0);
        assert_eq!((0..2_000).filter(|_| b.take(0)).count(), 999);
        // ... then 100/s: refused now, admitted 10 ms later.
        let b = B { rate: 100, ..b };
        assert!(!b.take(SEC / 1_000));
        assert!(b.take(SEC / 100 + SEC / 1_000));
        // A lowered burst: spent under the old one, it is spent under the
        // new one, no more.
        let b = B::fresh(10, 1_000, 0);
        assert_eq!((0..2_000).filter(|_| b.take(0)).count(), 999);
        let b = B { burst: 2, ..b };
        assert!(!b.take(0));
        assert!(b.take(SEC / 10));
        assert!(!b.take(SEC / 10));
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        // Debug builds check every add here.
        for (rate, burst) in [(MAX_RATE, MAX_RATE), (1, MAX_RATE), (1, 1), (MAX_RATE, 1)] {
            let b = B::fresh(rate, burst, u64::MAX);
            for now in [0, 1, u64::MAX - 1, u64::MAX] {
                for _ in 0..3 {
                    b.take(now);
                }
            }
        }
        assert_eq!(tolerance(1, MAX_RATE), MAX_TOLERANCE);
        let b = B::fresh(MAX_RATE, MAX_RATE, 0);
        assert!(b.take(u64::MAX));
    }

    #[test]
    fn zero_rate_disables_and_zero_burst_refuses() {
        let b = B::fresh(0, 0, 0);
        assert!((0..100).all(|_| b.take(5)));
        let b = B {
            tat: core::cell::Cell::new(0),
            rate: 5,
            burst: 0,
        };
        assert!((0..100).all(|n| !b.take(n * SEC)));
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
        let l = crate::maps::Limits::new(5, 3, 0, 32, 64);
        let (b, t) = fresh_source(&l, 7);
        assert_eq!(
            (t, b.refused, b.tat),
            (Taken::Admitted, 0, fresh(interval(5), 7))
        );
        let l = crate::maps::Limits::new(5, 0, 0, 32, 64);
        let (b, t) = fresh_source(&l, 7);
        assert_eq!((t, b.refused), (Taken::Refused { credit: 1 }, 1));
    }

    #[test]
    fn clock_skew_between_cpus_is_harmless() {
        // A CPU whose clock reads a little behind the one that wrote the
        // bucket sees less time passed, nothing worse.
        let b = B::fresh(1, 3, 100);
        assert!(b.take(50), "earlier `now` must not underflow");
        assert_eq!(b.tat.get(), clock(100) + 2 * interval(1));
        assert!(!b.take(50));
    }
}

/// [`take`] on a source's bucket (its TAT) with its limits; on a refusal,
/// `count` adds one to the bucket's refusals and returns the new count
/// (the kernel does it atomically: CPUs may share a source).
#[inline(always)]
pub fn take_source(
    tat: &impl Tat,
    l: &crate::maps::Limits,
    now_ns: u64,
    count: impl FnOnce() -> u64,
) -> Taken {
    if take(tat, l.syn_interval, l.syn_tolerance, l.syn_burst, now_ns) {
        Taken::Admitted
    } else {
        Taken::Refused {
            credit: rank_credit(count()),
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
    /// A zero TAT is a full bucket, as in the kernel's zeroed array.
    global: core::cell::Cell<u64>,
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
            let refused = &mut b.refused;
            take_source(core::cell::Cell::from_mut(&mut b.tat), l, now, || {
                *refused += 1;
                *refused
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
        let (b, t) = fresh_source(l, now);
        self.sources.borrow_mut().insert(*key, b);
        t
    }

    /// Sources with a bucket (tests).
    pub fn sources(&self) -> usize {
        self.sources.borrow().len()
    }

    /// `Tables::take_global`.
    pub fn take_global(&self, l: &crate::maps::Limits, now: u64) -> bool {
        take(
            &self.global,
            l.global_interval,
            l.global_tolerance,
            l.global_burst,
            now,
        )
    }
}
