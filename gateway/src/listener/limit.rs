//! The per-client-IP limit on concurrent connections
//! (`server.max_connections_per_ip`), shared by all workers.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
};

/// Open connections per client address.
pub struct PerIp {
    /// The limit; 0 = unlimited.
    max: AtomicU32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One open connection's claim; released on drop.
pub struct Slot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub fn new(max: u32) -> Arc<PerIp> {
        Arc::new(PerIp {
            max: AtomicU32::new(max),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `ip`, or `None` at the limit
    /// (0 = unlimited).
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
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

    /// A new limit (a reload): connections already open stay; a source
    /// over the new limit gets no more until it is under it.
    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
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
        let l = PerIp::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        assert!(l.acquire(a).is_none(), "third connection from a refused");
        assert!(l.acquire(b).is_some(), "b is not limited by a");
        drop(s1);
        assert!(l.acquire(a).is_some(), "a slot came back");
        assert_eq!(
            PerIp::new(0).acquire(a).map(|_| ()),
            Some(()),
            "0 = unlimited"
        );
    }

    #[test]
    fn map_does_not_grow_with_past_clients() {
        let l = PerIp::new(1);
        for i in 0..1000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            drop(l.acquire(ip));
        }
        assert!(l.open.lock().unwrap().is_empty());
    }
}
