//! The kernel's job done at accept, for when there is no XDP program
//! (disabled, or it could not load or attach): the blocklist (config, block
//! files, persisted runtime entries and bans) and the per-source connection
//! rate, with the same token bucket code the XDP program runs. Also holds
//! bans made while degraded. Costs one lock per accepted connection.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use gateway_common::{
    bucket, cidr::Cidr, packet::Source, verdict::bucket_key, Bucket, Limits, SourceKey,
};

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Blocked,
    RateLimited,
}

/// Sources remembered at most for rate limiting (oldest buckets are reset
/// past this, as the kernel's LRU map would evict them).
const MAX_BUCKETS: usize = 262_144;

#[derive(Default)]
struct Inner {
    /// Blocklist entries with their end (`None` = permanent).
    block: Vec<(Cidr, Option<Instant>)>,
    allow: Vec<Cidr>,
    limits: Option<Limits>,
    buckets: HashMap<SourceKey, Bucket>,
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
        let block = want
            .block
            .iter()
            .map(|(c, v)| {
                (
                    *c,
                    (v.expires_ns != 0)
                        .then(|| now + Duration::from_nanos(v.expires_ns.saturating_sub(now_ns))),
                )
            })
            .collect();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.block = block;
        g.allow = want.allow.iter().copied().collect();
        g.limits = Some(want.limits);
        g.epoch.get_or_insert_with(Instant::now);
    }

    /// Adds a ban (while there is no kernel program to hold it).
    pub fn ban(&self, source: Cidr, duration: Duration) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.block.push((source, Some(Instant::now() + duration)));
    }

    /// Whether a new connection from `ip` may proceed.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.block.is_empty() && g.limits.is_none_or(|l| l.syn_rate == 0) {
            return Ok(());
        }
        if g.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        let now = Instant::now();
        g.block.retain(|(_, until)| until.is_none_or(|u| u > now));
        if g.block.iter().any(|(c, _)| c.contains(ip)) {
            return Err(Refused::Blocked);
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
            Some(b) => bucket::take(
                b,
                limits.syn_rate,
                limits.syn_burst,
                limits.syn_fill_ns,
                now_ns,
            ),
            None => {
                g.buckets
                    .insert(key, bucket::fresh(limits.syn_burst, now_ns));
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

    #[test]
    fn blocklist_allowlist_and_rate_at_accept() {
        let g = Guard::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
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
}
