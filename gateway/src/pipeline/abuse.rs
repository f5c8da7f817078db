//! What L7 learns about abusive clients: auth failures and limit hits per
//! source address, counted in a sliding window per cause. A source that
//! reaches a rule's `max` within its `window` is reported once for a ban;
//! the daemon turns that into a kernel blocklist entry that lapses by
//! itself after `ban` (see `daemon::Daemon::ban`).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::config::{AbuseConfig, AbuseRule};

/// Why a source is banned; the `cause` label of `gateway_bans_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    AuthFailures,
    RateLimited,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::AuthFailures => "auth_failures",
            Cause::RateLimited => "rate_limited",
        }
    }
}

/// A source to ban, for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ban {
    pub ip: IpAddr,
    pub cause: Cause,
    pub duration: Duration,
}

/// Sources tracked at most; past this, expired windows are pruned and, if
/// still full, new sources are not tracked (memory stays bounded under a
/// flood of fresh addresses, which the kernel's SYN limits handle).
const MAX_TRACKED: usize = 100_000;

struct Window {
    start: Instant,
    count: u32,
}

/// Per-source, per-cause counters.
pub struct Tracker {
    auth: Option<AbuseRule>,
    rate: Option<AbuseRule>,
    windows: Mutex<HashMap<(IpAddr, Cause), Window>>,
    bans: tokio::sync::mpsc::UnboundedSender<Ban>,
}

impl Tracker {
    pub fn new(cfg: &AbuseConfig, bans: tokio::sync::mpsc::UnboundedSender<Ban>) -> Tracker {
        Tracker {
            auth: cfg.auth_failures.clone(),
            rate: cfg.rate_limited.clone(),
            windows: Mutex::new(HashMap::new()),
            bans,
        }
    }

    fn rule(&self, cause: Cause) -> Option<&AbuseRule> {
        match cause {
            Cause::AuthFailures => self.auth.as_ref(),
            Cause::RateLimited => self.rate.as_ref(),
        }
    }

    /// Counts one event from `ip`; reports a ban when the rule trips.
    pub fn record(&self, ip: IpAddr, cause: Cause) {
        self.record_at(ip, cause, Instant::now());
    }

    fn record_at(&self, ip: IpAddr, cause: Cause, now: Instant) {
        let Some(rule) = self.rule(cause) else { return };
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= MAX_TRACKED && !w.contains_key(&(ip, cause)) {
            w.retain(|(_, c), v| {
                self.rule(*c)
                    .is_some_and(|r| now.duration_since(v.start) < r.window)
            });
            if w.len() >= MAX_TRACKED {
                return;
            }
        }
        let e = w.entry((ip, cause)).or_insert(Window {
            start: now,
            count: 0,
        });
        if now.duration_since(e.start) >= rule.window {
            *e = Window {
                start: now,
                count: 0,
            };
        }
        e.count += 1;
        if e.count == rule.max {
            // Report once per window; a new window starts after the ban.
            w.remove(&(ip, cause));
            let _ = self.bans.send(Ban {
                ip,
                cause,
                duration: rule.ban,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(max: u32) -> (Tracker, tokio::sync::mpsc::UnboundedReceiver<Ban>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rule = AbuseRule {
            max,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(900),
        };
        (
            Tracker::new(
                &AbuseConfig {
                    auth_failures: Some(rule),
                    rate_limited: None,
                },
                tx,
            ),
            rx,
        )
    }

    #[test]
    fn bans_once_at_the_threshold_within_the_window() {
        let (t, mut rx) = tracker(3);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let now = Instant::now();
        t.record_at(ip, Cause::AuthFailures, now);
        t.record_at(ip, Cause::AuthFailures, now);
        assert!(rx.try_recv().is_err());
        t.record_at(ip, Cause::AuthFailures, now);
        let ban = rx.try_recv().expect("third failure bans");
        assert_eq!(
            (ban.ip, ban.cause, ban.duration),
            (ip, Cause::AuthFailures, Duration::from_secs(900))
        );
        // Another source and a cause without a rule are unaffected.
        t.record_at("198.51.100.8".parse().unwrap(), Cause::AuthFailures, now);
        t.record_at(ip, Cause::RateLimited, now);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn the_window_slides() {
        let (t, mut rx) = tracker(2);
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let now = Instant::now();
        t.record_at(ip, Cause::AuthFailures, now);
        t.record_at(ip, Cause::AuthFailures, now + Duration::from_secs(61));
        assert!(
            rx.try_recv().is_err(),
            "failures a window apart do not add up"
        );
        t.record_at(ip, Cause::AuthFailures, now + Duration::from_secs(62));
        assert!(rx.try_recv().is_ok());
    }
}
