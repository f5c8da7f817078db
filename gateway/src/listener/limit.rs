//! The per-client-IP limit on concurrent connections
//! (`server.max_connections_per_ip`), shared by all workers. An IPv4 client
//! is its address; an IPv6 client is its prefix of `xdp.ipv6_prefix` bits
//! (/64 by default), as for the SYN limits and bans: it holds the whole
//! prefix, and counting per address would let it open the limit's worth of
//! connections from each of its addresses.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, AtomicU8, Ordering},
        Arc, Mutex,
    },
};

use gateway_common::cidr::Cidr;

/// Open connections per client.
pub struct PerIp {
    /// The limit; 0 = unlimited.
    max: AtomicU32,
    /// The prefix length an IPv6 client is counted by.
    v6_prefix: AtomicU8,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One open connection's claim; released on drop.
pub struct Slot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub fn new(max: u32, v6_prefix: u8) -> Arc<PerIp> {
        Arc::new(PerIp {
            max: AtomicU32::new(max),
            v6_prefix: AtomicU8::new(v6_prefix),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The client `ip` is counted as.
    fn client(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(_) => Cidr::enclosing(ip, 32, self.v6_prefix.load(Ordering::Relaxed)).addr(),
        }
    }

    /// A slot for a new connection from `ip`, or `None` at the limit
    /// (0 = unlimited).
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let ip = self.client(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        let max = self.max.load(Ordering::Relaxed);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: Arc::clone(self),
            ip,
        })
    }

    /// A new limit and IPv6 prefix (a reload): connections already open
    /// stay, counted as they were; a client over the new limit gets no more
    /// until it is under it.
    pub fn set(&self, max: u32, v6_prefix: u8) {
        self.max.store(max, Ordering::Relaxed);
        self.v6_prefix.store(v6_prefix, Ordering::Relaxed);
    }

    /// Connections open from the client of `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let ip = self.client(ip);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Keep the map as small as the set of clients connected now.
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_releases() {
        let l = PerIp::new(2, 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        assert!(l.acquire(a).is_none(), "third connection from a refused");
        assert!(l.acquire(b).is_some(), "b is not limited by a");
        drop(s1);
        assert!(l.acquire(a).is_some(), "a slot came back");
        assert_eq!(
            PerIp::new(0, 64).acquire(a).map(|_| ()),
            Some(()),
            "0 = unlimited"
        );
    }

    #[test]
    fn an_ipv6_client_is_its_prefix() {
        let l = PerIp::new(2, 64);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let _a = l.acquire(ip("2001:db8:0:1::1")).unwrap();
        let _b = l.acquire(ip("2001:db8:0:1::2")).unwrap();
        assert!(
            l.acquire(ip("2001:db8:0:1:ffff::3")).is_none(),
            "a third address of the /64 is the same client"
        );
        assert!(l.acquire(ip("2001:db8:0:2::1")).is_some(), "another /64");
        assert_eq!(l.open(ip("2001:db8:0:1::99")), 2);
        // Per address at /128.
        l.set(2, 128);
        assert!(l.acquire(ip("2001:db8:0:1::5")).is_some());
    }

    #[test]
    fn map_does_not_grow_with_past_clients() {
        let l = PerIp::new(1, 64);
        for i in 0..1000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            drop(l.acquire(ip));
        }
        assert!(l.open.lock().unwrap().is_empty());
    }
}
