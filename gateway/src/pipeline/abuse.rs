//! What L7 learns about abusive clients: auth failures and limit hits per
//! source, counted per cause in a fixed window that starts at the first
//! event (so up to about twice `max` can straddle two windows unbanned). A source is the client's
//! address masked with `xdp.ipv4_prefix` / `xdp.ipv6_prefix`, the same
//! prefix the kernel's SYN limits count by (an IPv6 client is its /64 by
//! default: it holds all of one, and banning its /128 would be evaded by
//! the next address). A source that reaches a rule's `max` within its
//! `window` is reported once for a ban of that prefix (never broader than
//! an IPv4 /24 or an IPv6 /48); the daemon turns it
//! into a kernel blocklist entry that lapses by itself after `ban` (see
//! `daemon::Daemon::ban`).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use gateway_common::cidr::Cidr;

use crate::config::{AbuseRule, Config};

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
    /// What is banned: the source's prefix.
    pub source: Cidr,
    /// The address whose event tripped the rule.
    pub ip: IpAddr,
    pub cause: Cause,
    pub duration: Duration,
}

/// The broadest prefixes a ban covers, whatever the SYN limits aggregate
/// (an `ipv4_prefix` of 8 shares a bucket among millions of clients; a
/// ban of that /8 would refuse them all for one client's abuse).
const MIN_BAN_V4: u8 = 24;
const MIN_BAN_V6: u8 = 48;

/// Sources tracked at most; past this, expired windows are pruned and, if
/// still full, new sources are not tracked (memory stays bounded under a
/// flood of fresh addresses, which the kernel's SYN limits handle).
const MAX_TRACKED: usize = 100_000;

struct Window {
    start: Instant,
    count: u32,
}

/// The rules in force and how sources are grouped; replaced on reload.
struct Rules {
    auth: Option<AbuseRule>,
    rate: Option<AbuseRule>,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

impl Rules {
    fn new(cfg: &Config) -> Rules {
        Rules {
            auth: cfg.abuse.auth_failures.clone(),
            rate: cfg.abuse.rate_limited.clone(),
            ipv4_prefix: cfg.xdp.ipv4_prefix.max(MIN_BAN_V4),
            ipv6_prefix: cfg.xdp.ipv6_prefix.max(MIN_BAN_V6),
        }
    }

    fn get(&self, cause: Cause) -> Option<&AbuseRule> {
        match cause {
            Cause::AuthFailures => self.auth.as_ref(),
            Cause::RateLimited => self.rate.as_ref(),
        }
    }
}

struct Inner {
    rules: Rules,
    windows: HashMap<(Cidr, Cause), Window>,
}

/// Per-source, per-cause counters.
pub struct Tracker {
    inner: Mutex<Inner>,
    bans: tokio::sync::mpsc::UnboundedSender<Ban>,
}

impl Tracker {
    pub fn new(cfg: &Config, bans: tokio::sync::mpsc::UnboundedSender<Ban>) -> Tracker {
        Tracker {
            inner: Mutex::new(Inner {
                rules: Rules::new(cfg),
                windows: HashMap::new(),
            }),
            bans,
        }
    }

    /// Applies a reloaded config. Counts in progress are kept for the rules
    /// that remain while the way sources are grouped stays the same; when a
    /// prefix length changed they are dropped, as they were counted per
    /// prefixes that no longer apply.
    pub fn configure(&self, cfg: &Config) {
        let rules = Rules::new(cfg);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if (g.rules.ipv4_prefix, g.rules.ipv6_prefix) != (rules.ipv4_prefix, rules.ipv6_prefix) {
            g.windows.clear();
        }
        g.windows.retain(|(_, c), _| rules.get(*c).is_some());
        g.rules = rules;
    }

    /// Counts one event from `ip`; reports a ban when the rule trips.
    pub fn record(&self, ip: IpAddr, cause: Cause) {
        self.record_at(ip, cause, Instant::now());
    }

    fn record_at(&self, ip: IpAddr, cause: Cause, now: Instant) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { rules, windows: w } = &mut *g;
        let Some(rule) = rules.get(cause) else { return };
        let source = Cidr::enclosing(ip, rules.ipv4_prefix, rules.ipv6_prefix);
        if w.len() >= MAX_TRACKED && !w.contains_key(&(source, cause)) {
            w.retain(|(_, c), v| {
                rules
                    .get(*c)
                    .is_some_and(|r| now.duration_since(v.start) < r.window)
            });
            if w.len() >= MAX_TRACKED {
                return;
            }
        }
        let e = w.entry((source, cause)).or_insert(Window {
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
        // At or past `max`: a reload may have lowered it below a count.
        if e.count >= rule.max {
            // Report once per window; a new window starts after the ban.
            w.remove(&(source, cause));
            let _ = self.bans.send(Ban {
                source,
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

    fn config(extra: &str) -> Config {
        let text = format!(
            "[abuse]\nauth_failures = {{ max = 3, window = \"1m\", ban = \"15m\" }}\n{extra}"
        );
        Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn tracker(cfg: &Config) -> (Tracker, tokio::sync::mpsc::UnboundedReceiver<Ban>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Tracker::new(cfg, tx), rx)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bans_once_at_the_threshold_within_the_window() {
        let (t, mut rx) = tracker(&config(""));
        let ip = ip("198.51.100.7");
        let now = Instant::now();
        t.record_at(ip, Cause::AuthFailures, now);
        t.record_at(ip, Cause::AuthFailures, now);
        assert!(rx.try_recv().is_err());
        t.record_at(ip, Cause::AuthFailures, now);
        let ban = rx.try_recv().expect("third failure bans");
        assert_eq!(
            ban,
            Ban {
                source: Cidr::host(ip),
                ip,
                cause: Cause::AuthFailures,
                duration: Duration::from_secs(900)
            }
        );
        // Another source and a cause without a rule are unaffected.
        t.record_at("198.51.100.8".parse().unwrap(), Cause::AuthFailures, now);
        t.record_at(ip, Cause::RateLimited, now);
        t.record_at(ip, Cause::AuthFailures, now);
        assert!(rx.try_recv().is_err(), "the window started again");
    }

    #[test]
    fn the_window_slides() {
        let (t, mut rx) = tracker(&config(""));
        let ip = ip("2001:db8::1");
        let now = Instant::now();
        t.record_at(ip, Cause::AuthFailures, now);
        t.record_at(ip, Cause::AuthFailures, now + Duration::from_secs(61));
        t.record_at(ip, Cause::AuthFailures, now + Duration::from_secs(62));
        assert!(
            rx.try_recv().is_err(),
            "failures a window apart do not add up"
        );
        t.record_at(ip, Cause::AuthFailures, now + Duration::from_secs(63));
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn an_ipv6_client_is_counted_and_banned_per_prefix() {
        let (t, mut rx) = tracker(&config(""));
        let now = Instant::now();
        // A client rotating through its /64 adds up there...
        for a in ["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:7:ffff::9"] {
            t.record_at(ip(a), Cause::AuthFailures, now);
        }
        let ban = rx.try_recv().expect("three failures in one /64 ban it");
        assert_eq!(ban.source, "2001:db8:0:7::/64".parse().unwrap());
        assert_eq!(ban.ip, ip("2001:db8:0:7:ffff::9"));
        // ...and its neighbour /64s are sources of their own.
        for a in ["2001:db8:0:8::1", "2001:db8:0:9::1", "2001:db8:0:a::1"] {
            t.record_at(ip(a), Cause::AuthFailures, now);
        }
        assert!(rx.try_recv().is_err());

        // The prefixes are the SYN limits' (xdp.ipv4_prefix, xdp.ipv6_prefix).
        let (t, mut rx) = tracker(&config(
            "[xdp]\nenabled = false\nipv4_prefix = 24\nipv6_prefix = 128\n",
        ));
        for a in ["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:7::3"] {
            t.record_at(ip(a), Cause::AuthFailures, now);
        }
        assert!(rx.try_recv().is_err(), "per address at /128");
        for a in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
            t.record_at(ip(a), Cause::AuthFailures, now);
        }
        let ban = rx.try_recv().expect("three failures in one /24");
        assert_eq!(ban.source, "203.0.113.0/24".parse().unwrap());

        // Never broader than a /24 or a /48, whatever the SYN buckets share.
        let (t, mut rx) = tracker(&config(
            "[xdp]\nenabled = false\nipv4_prefix = 8\nipv6_prefix = 16\n",
        ));
        for a in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
            t.record_at(ip(a), Cause::AuthFailures, now);
        }
        assert_eq!(
            rx.try_recv().unwrap().source,
            "203.0.113.0/24".parse().unwrap()
        );
        for a in ["2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:1:4::1"] {
            t.record_at(ip(a), Cause::AuthFailures, now);
        }
        assert_eq!(
            rx.try_recv().unwrap().source,
            "2001:db8:1::/48".parse().unwrap()
        );
    }

    #[test]
    fn a_reload_applies_new_rules_and_prefixes() {
        let (t, mut rx) = tracker(&config(""));
        let now = Instant::now();
        let a = ip("198.51.100.7");
        t.record_at(a, Cause::AuthFailures, now);
        t.record_at(a, Cause::RateLimited, now);
        assert!(rx.try_recv().is_err(), "no rule for rate_limited yet");

        // A new rule takes effect; counts of a kept rule carry over.
        let cfg = config("rate_limited = { max = 2, window = \"1m\", ban = \"5m\" }\n");
        t.configure(&cfg);
        t.record_at(a, Cause::RateLimited, now);
        t.record_at(a, Cause::AuthFailures, now);
        assert!(rx.try_recv().is_err());
        t.record_at(a, Cause::RateLimited, now);
        assert_eq!(rx.try_recv().unwrap().cause, Cause::RateLimited);
        t.record_at(a, Cause::AuthFailures, now);
        let ban = rx.try_recv().expect("the auth count survived the reload");
        assert_eq!(
            (ban.cause, ban.duration),
            (Cause::AuthFailures, Duration::from_secs(900))
        );

        // A removed rule stops counting.
        t.configure(&Config::parse("").unwrap_or_else(|p| panic!("{p:?}")));
        for _ in 0..5 {
            t.record_at(a, Cause::AuthFailures, now);
        }
        assert!(rx.try_recv().is_err(), "no rule, no ban");

        // A changed prefix groups sources anew.
        t.configure(&config(""));
        t.record_at(ip("2001:db8::1"), Cause::AuthFailures, now);
        t.record_at(ip("2001:db8::2"), Cause::AuthFailures, now);
        t.configure(&config("[xdp]\nenabled = false\nipv6_prefix = 48\n"));
        t.record_at(ip("2001:db8::3"), Cause::AuthFailures, now);
        assert!(rx.try_recv().is_err(), "counted per /48 from zero");
        t.record_at(ip("2001:db8:0:1::1"), Cause::AuthFailures, now);
        t.record_at(ip("2001:db8:0:2::1"), Cause::AuthFailures, now);
        assert_eq!(
            rx.try_recv().unwrap().source,
            "2001:db8::/48".parse().unwrap()
        );
    }
}
