//! Limits on concurrent client connections, shared by all workers: per
//! client (`server.max_connections_per_ip`) and all clients together
//! (`server.max_connections`). An IPv4 client is its address; an IPv6
//! client is its prefix of `xdp.ipv6_prefix` bits (/64 by default), as for
//! the SYN limits and bans: it holds the whole prefix, and counting per
//! address would let it open the limit's worth of connections from each of
//! its addresses.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, AtomicU8, Ordering},
        Arc, Mutex,
    },
};

use gateway_common::cidr::Cidr;

/// Open connections per client, and in all.
pub struct PerIp {
    /// The per-client limit; 0 = unlimited.
    max: AtomicU32,
    /// The limit for all clients together; 0 = unlimited.
    max_total: AtomicU32,
    /// The prefix length an IPv6 client is counted by.
    v6_prefix: AtomicU8,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    by_client: HashMap<IpAddr, u32>,
    total: u32,
}

/// Why a connection gets no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Its client is at `max_connections_per_ip`.
    Client,
    /// All clients together are at `max_connections`.
    All,
}

/// One open connection's claim; released on drop.
pub struct Slot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

/// Open files kept for everything but client connections when
/// `server.max_connections` is not set: a tenth of the limit, at least
/// this many.
const KEEP_FILES: u64 = 1024;

/// The default of `server.max_connections`: the process's open-file limit
/// less a tenth of it (at least 1,024, or half of a limit below 2,048) for
/// upstream connections, health checks, metrics, the admin socket and
/// state files, so that clients alone cannot take every descriptor (then
/// every upstream connect fails, and the CLI cannot reach the daemon).
pub fn auto_max_connections() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        KEEP_FILES * 2
    };
    // A tenth, at least 1,024; half of a limit below 2,048.
    let keep = (files / 10).max(KEEP_FILES.min(files / 2));
    files.saturating_sub(keep).clamp(1, u32::MAX as u64) as u32
}

impl PerIp {
    /// `max_total`: `None` for [`auto_max_connections`].
    pub fn new(max: u32, max_total: Option<u32>, v6_prefix: u8) -> Arc<PerIp> {
        let l = Arc::new(PerIp {
            max: AtomicU32::new(0),
            max_total: AtomicU32::new(0),
            v6_prefix: AtomicU8::new(0),
            open: Mutex::new(Open::default()),
        });
        l.set(max, max_total, v6_prefix);
        l
    }

    /// The client `ip` is counted as.
    fn client(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(_) => Cidr::enclosing(ip, 32, self.v6_prefix.load(Ordering::Relaxed)).addr(),
        }
    }

    /// A slot for a new connection from `ip`, or why there is none.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let ip = self.client(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let max_total = self.max_total.load(Ordering::Relaxed);
        if max_total != 0 && open.total >= max_total {
            return Err(Full::All);
        }
        let n = open.by_client.entry(ip).or_insert(0);
        let max = self.max.load(Ordering::Relaxed);
        if max != 0 && *n >= max {
            return Err(Full::Client);
        }
        *n += 1;
        open.total += 1;
        Ok(Slot {
            owner: Arc::clone(self),
            ip,
        })
    }

    /// New limits and IPv6 prefix (a reload): connections already open
    /// stay, counted as they were; a client over the new limit gets no more
    /// until it is under it.
    pub fn set(&self, max: u32, max_total: Option<u32>, v6_prefix: u8) {
        self.max.store(max, Ordering::Relaxed);
        self.max_total.store(
            max_total.unwrap_or_else(auto_max_connections),
            Ordering::Relaxed,
        );
        self.v6_prefix.store(v6_prefix, Ordering::Relaxed);
    }

    /// The limit for all clients together in force (0 = none).
    pub fn max_total(&self) -> u32 {
        self.max_total.load(Ordering::Relaxed)
    }

    /// Connections open from the client of `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let ip = self.client(ip);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_client
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Keep the map as small as the set of clients connected now.
                open.by_client.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_releases() {
        let l = PerIp::new(2, Some(0), 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        assert_eq!(
            l.acquire(a).err(),
            Some(Full::Client),
            "third connection from a refused"
        );
        assert!(l.acquire(b).is_ok(), "b is not limited by a");
        drop(s1);
        assert!(l.acquire(a).is_ok(), "a slot came back");
        assert_eq!(
            PerIp::new(0, Some(0), 64).acquire(a).map(|_| ()),
            Ok(()),
            "0 = unlimited"
        );
    }

    #[test]
    fn an_ipv6_client_is_its_prefix() {
        let l = PerIp::new(2, Some(0), 64);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let _a = l.acquire(ip("2001:db8:0:1::1")).unwrap();
        let _b = l.acquire(ip("2001:db8:0:1::2")).unwrap();
        assert!(
            l.acquire(ip("2001:db8:0:1:ffff::3")).is_err(),
            "a third address of the /64 is the same client"
        );
        assert!(l.acquire(ip("2001:db8:0:2::1")).is_ok(), "another /64");
        assert_eq!(l.open(ip("2001:db8:0:1::99")), 2);
        // Per address at /128.
        l.set(2, Some(0), 128);
        assert!(l.acquire(ip("2001:db8:0:1::5")).is_ok());
    }

    #[test]
    fn all_clients_together_are_capped_and_reloads_move_the_cap() {
        let l = PerIp::new(2, Some(3), 64);
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        let held: Vec<Slot> = (1..=3).map(|i| l.acquire(ip(i)).unwrap()).collect();
        assert_eq!(l.acquire(ip(4)).err(), Some(Full::All));
        drop(held);
        assert!(l.acquire(ip(4)).is_ok(), "slots came back");
        l.set(2, Some(0), 64);
        let _held: Vec<Slot> = (1..=100).map(|i| l.acquire(ip(i)).unwrap()).collect();
        // The default keeps a tenth of the open-file limit (at least 1,024,
        // or half of a smaller limit) for everything else.
        l.set(2, None, 64);
        assert_eq!(l.max_total(), auto_max_connections());
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let auto = auto_max_connections() as u64;
        let keep = lim.rlim_cur.saturating_sub(auto);
        assert!(
            auto >= 1 && keep >= lim.rlim_cur / 10 && keep >= 1024.min(lim.rlim_cur / 2),
            "{auto} of {}",
            lim.rlim_cur
        );
    }

    #[test]
    fn map_does_not_grow_with_past_clients() {
        let l = PerIp::new(1, Some(0), 64);
        for i in 0..1000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            drop(l.acquire(ip));
        }
        let open = l.open.lock().unwrap();
        assert!(open.by_client.is_empty());
        assert_eq!(open.total, 0);
    }
}
