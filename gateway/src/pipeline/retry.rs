//! The retry budget of a model: retries may add at most `ratio` of the
//! model's requests, plus `min_per_second`, so that when a whole fleet
//! fails the gateway does not multiply its load by `1 + retries`.
//!
//! Requests deposit `ratio` of a token; a retry withdraws one. The balance
//! also refills by `min_per_second` and is capped (ten seconds of the floor
//! or 100 retries), so a quiet period cannot save up an unbounded burst.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Instant,
};

use crate::config::RetryBudget;

/// Thousandths of a retry.
const MILLI: u64 = 1000;
/// The balance is capped at this many seconds of the floor...
const CAP_SECONDS: u64 = 10;
/// ...or this many retries, whichever is more.
const MIN_CAP: u64 = 100;

pub struct Budget {
    /// Deposit per request, in thousandths of a retry.
    per_request: u64,
    min_per_second: u64,
    /// Deposits not yet folded into the balance (lock-free for requests).
    deposits: AtomicU64,
    /// (balance in thousandths, last refill).
    balance: Mutex<(u64, Instant)>,
}

impl Budget {
    pub fn new(cfg: &RetryBudget) -> Budget {
        let min_per_second = cfg.min_per_second as u64;
        Budget {
            per_request: (cfg.ratio * MILLI as f64).round() as u64,
            min_per_second,
            deposits: AtomicU64::new(0),
            // Start with one second of the floor: retries work from the start.
            balance: Mutex::new((min_per_second * MILLI, Instant::now())),
        }
    }

    /// A request arrived.
    pub fn deposit(&self) {
        if self.per_request > 0 {
            self.deposits.fetch_add(self.per_request, Ordering::Relaxed);
        }
    }

    /// Whether one retry may go now (and takes it).
    pub fn withdraw(&self) -> bool {
        let mut g = self.balance.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = (now - g.1).as_millis() as u64 * self.min_per_second;
        g.1 = now;
        let deposits = self.deposits.swap(0, Ordering::Relaxed);
        let cap = MILLI * (CAP_SECONDS * self.min_per_second).max(MIN_CAP);
        g.0 = (g.0 + refill + deposits).min(cap);
        if g.0 >= MILLI {
            g.0 -= MILLI;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_follow_the_ratio_when_the_floor_is_zero() {
        let b = Budget::new(&RetryBudget {
            ratio: 0.2,
            min_per_second: 0,
        });
        assert!(!b.withdraw(), "nothing deposited yet");
        let mut granted = 0;
        for _ in 0..100 {
            b.deposit();
            if b.withdraw() {
                granted += 1;
            }
        }
        assert_eq!(granted, 20, "20% of 100 requests");
    }

    #[test]
    fn the_floor_allows_a_few_retries_without_traffic() {
        let b = Budget::new(&RetryBudget {
            ratio: 0.0,
            min_per_second: 3,
        });
        let granted = (0..10).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 3, "one second of the floor at the start");
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert!(b.withdraw(), "refilled at 3/s");
    }
}
