//! The kernel's job done at accept, for when there is no XDP program
//! (disabled, or it could not load or attach): the blocklist (config, block
//! files, persisted runtime entries and bans) and the per-source connection
//! rate, with the same bucket code the XDP program runs. Also holds
//! bans made while degraded. Costs one lock per accepted connection.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use gateway_common::{bucket, cidr::Cidr, packet::Source, verdict::bucket_key, Limits, SourceKey};

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Blocked,
    RateLimited,
}

/// Sources remembered at most for rate limiting (oldest buckets are reset
/// past this, as the kernel's LRU map would evict them).
const MAX_BUCKETS: usize = 262_144;

/// Prefixes searched by the lengths in use: a lookup costs one hash probe
/// per distinct length, not a scan of every entry (block files hold tens
/// of thousands).
struct Prefixes<V> {
    entries: HashMap<Cidr, V>,
    /// Lengths in use, per family, longest first.
    v4: Vec<u8>,
    v6: Vec<u8>,
}

impl<V> Default for Prefixes<V> {
    fn default() -> Self {
        Prefixes {
            entries: HashMap::new(),
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

impl<V> Prefixes<V> {
    fn from_iter(it: impl IntoIterator<Item = (Cidr, V)>) -> Self {
        let mut p = Prefixes::default();
        for (c, v) in it {
            p.insert(c, v);
        }
        p
    }

    fn insert(&mut self, c: Cidr, v: V) -> Option<V> {
        let lengths = match c {
            Cidr::V4 { .. } => &mut self.v4,
            Cidr::V6 { .. } => &mut self.v6,
        };
        if let Err(i) = lengths.binary_search_by(|l| c.prefix_len().cmp(l)) {
            lengths.insert(i, c.prefix_len());
        }
        self.entries.insert(c, v)
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry covering `ip`, longest first.
    fn covering(&self, ip: IpAddr) -> impl Iterator<Item = (Cidr, &V)> {
        let lengths = match ip {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        };
        lengths.iter().filter_map(move |&len| {
            let c = Cidr::enclosing(ip, len, len);
            self.entries.get(&c).map(|v| (c, v))
        })
    }

    fn retain(&mut self, keep: impl FnMut(&Cidr, &mut V) -> bool) {
        self.entries.retain(keep);
        let (entries, v4, v6) = (&self.entries, &mut self.v4, &mut self.v6);
        for (lengths, v6_family) in [(v4, false), (v6, true)] {
            lengths.retain(|&l| {
                entries
                    .keys()
                    .any(|c| c.prefix_len() == l && matches!(c, Cidr::V6 { .. }) == v6_family)
            });
        }
    }
}

/// Bans between two sweeps of lapsed entries.
const SWEEP_EVERY: usize = 1024;

#[derive(Default)]
struct Inner {
    /// Blocklist entries with their end (`None` = permanent).
    block: Prefixes<Option<Instant>>,
    allow: Prefixes<()>,
    bans_since_sweep: usize,
    limits: Option<Limits>,
    /// Each source key's theoretical arrival time (`bucket`).
    buckets: HashMap<SourceKey, u64>,
    epoch: Option<Instant>,
}

/// Userspace enforcement state; inactive (a no-op) while XDP does the job.
#[derive(Default)]
pub struct Guard {
    inner: Mutex<Inner>,
}

impl Guard {
    /// Enforces a policy's blocklist, allowlist and SYN limits at accept
    /// from now on.
    pub fn enforce(&self, want: &crate::kernel::policy::Desired) {
        let now_ns = crate::kernel::clock::monotonic_ns();
        let now = Instant::now();
        let block = Prefixes::from_iter(want.block.iter().map(|(c, v)| {
            (
                *c,
                (v.expires_ns != 0)
                    .then(|| now + Duration::from_nanos(v.expires_ns.saturating_sub(now_ns))),
            )
        }));
        let allow = Prefixes::from_iter(want.allow.iter().map(|c| (*c, ())));
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.block = block;
        g.allow = allow;
        g.limits = Some(want.limits);
        g.epoch.get_or_insert_with(Instant::now);
    }

    /// Adds a ban (while there is no kernel program to hold it).
    pub fn ban(&self, source: Cidr, duration: Duration) {
        let now = Instant::now();
        let until = now + duration;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // A permanent entry, or one that ends later, stays as it is.
        let keep = match g.block.entries.get(&source) {
            Some(None) => true,
            Some(Some(old)) => *old >= until,
            None => false,
        };
        if !keep {
            g.block.insert(source, Some(until));
        }
        g.bans_since_sweep += 1;
        if g.bans_since_sweep >= SWEEP_EVERY {
            g.bans_since_sweep = 0;
            g.block.retain(|_, until| until.is_none_or(|u| u > now));
        }
    }

    /// Whether a new connection from `ip` may proceed.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.block.is_empty() && g.limits.is_none_or(|l| l.syn_rate == 0) {
            return Ok(());
        }
        if g.allow.covering(ip).next().is_some() {
            return Ok(());
        }
        let now = Instant::now();
        let mut lapsed = None;
        for (c, until) in g.block.covering(ip) {
            match until {
                Some(u) if *u <= now => lapsed = Some(c),
                _ => return Err(Refused::Blocked),
            }
        }
        if let Some(c) = lapsed {
            // Its length stays listed until the next sweep: one probe more.
            g.block.entries.remove(&c);
        }
        let Some(limits) = g.limits else {
            return Ok(());
        };
        if limits.syn_rate == 0 {
            return Ok(());
        }
        let now_ns = g
            .epoch
            .map_or(0, |e| now.duration_since(e).as_nanos() as u64);
        let src = match ip {
            IpAddr::V4(a) => Source::V4(a.octets()),
            IpAddr::V6(a) => Source::V6(a.octets()),
        };
        let key = bucket_key(&src, &limits);
        if g.buckets.len() >= MAX_BUCKETS && !g.buckets.contains_key(&key) {
            g.buckets.clear();
        }
        let admitted = match g.buckets.get_mut(&key) {
            Some(tat) => bucket::take(
                std::cell::Cell::from_mut(tat),
                limits.syn_interval,
                limits.syn_tolerance,
                limits.syn_burst,
                now_ns,
            ),
            None => {
                g.buckets
                    .insert(key, bucket::fresh(limits.syn_interval, now_ns));
                limits.syn_burst > 0
            }
        };
        if admitted {
            Ok(())
        } else {
            Err(Refused::RateLimited)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocklist_allowlist_and_rate_at_accept() {
        let g = Guard::default();
        assert_eq!(
            g.check(ip("203.0.113.9")),
            Ok(()),
            "inactive guard admits all"
        );
        g.enforce(&crate::kernel::policy::Desired {
            block: [(
                "203.0.113.0/24".parse().unwrap(),
                gateway_common::BlockValue::permanent(),
            )]
            .into(),
            allow: ["203.0.113.9".parse().unwrap()].into(),
            limits: Limits::new(1, 2, 0, 32, 64),
            ports: vec![],
        });
        assert_eq!(g.check(ip("203.0.113.1")), Err(Refused::Blocked));
        assert_eq!(g.check(ip("203.0.113.9")), Ok(()), "allowlist wins");
        let src = ip("198.51.100.1");
        assert_eq!(
            (g.check(src), g.check(src), g.check(src)),
            (Ok(()), Ok(()), Err(Refused::RateLimited))
        );
        g.ban("198.51.100.2".parse().unwrap(), Duration::from_secs(60));
        assert_eq!(g.check(ip("198.51.100.2")), Err(Refused::Blocked));
        g.ban(
            "2001:db8:0:5::/64".parse().unwrap(),
            Duration::from_secs(60),
        );
        assert_eq!(g.check(ip("2001:db8:0:5::77")), Err(Refused::Blocked));
        assert_eq!(g.check(ip("2001:db8:0:6::77")), Ok(()));
        g.ban("198.51.100.3".parse().unwrap(), Duration::ZERO);
        assert_eq!(g.check(ip("198.51.100.3")), Ok(()), "a lapsed ban is gone");
    }

    #[test]
    fn large_lists_are_searched_by_prefix_length() {
        let g = Guard::default();
        let mut block: std::collections::BTreeMap<Cidr, gateway_common::BlockValue> = (0
            ..50_000u32)
            .map(|i| {
                let a = std::net::Ipv4Addr::from(0x0a00_0000 + i * 3);
                (
                    Cidr::host(a.into()),
                    gateway_common::BlockValue::permanent(),
                )
            })
            .collect();
        block.insert(
            "198.51.0.0/16".parse().unwrap(),
            gateway_common::BlockValue::permanent(),
        );
        block.insert(
            "2001:db8::/32".parse().unwrap(),
            gateway_common::BlockValue::permanent(),
        );
        g.enforce(&crate::kernel::policy::Desired {
            block,
            allow: ["198.51.7.0/24".parse().unwrap()].into(),
            limits: Limits::new(0, 0, 0, 32, 64),
            ports: vec![],
        });
        assert_eq!(g.check(ip("10.0.0.3")), Err(Refused::Blocked));
        assert_eq!(g.check(ip("10.0.0.4")), Ok(()));
        assert_eq!(g.check(ip("198.51.200.1")), Err(Refused::Blocked));
        assert_eq!(g.check(ip("198.51.7.1")), Ok(()), "allowlisted /24");
        assert_eq!(g.check(ip("2001:db8:1::1")), Err(Refused::Blocked));
        assert_eq!(g.check(ip("2001:db9::1")), Ok(()));
        // A ban inside a permanent block lapses; the block still holds.
        g.ban("198.51.100.0/24".parse().unwrap(), Duration::ZERO);
        assert_eq!(g.check(ip("198.51.100.1")), Err(Refused::Blocked));
        // A ban never shortens a permanent entry, nor a longer ban.
        g.ban("10.0.0.3".parse().unwrap(), Duration::ZERO);
        assert_eq!(g.check(ip("10.0.0.3")), Err(Refused::Blocked));
        g.ban("192.0.2.1".parse().unwrap(), Duration::from_secs(60));
        g.ban("192.0.2.1".parse().unwrap(), Duration::ZERO);
        assert_eq!(g.check(ip("192.0.2.1")), Err(Refused::Blocked));
    }
}
