//! Sources that completed a TCP handshake lately, told to the XDP program.
//!
//! The global SYN budget is there for floods from spoofed, ever-new sources,
//! and under such a flood it drops a legitimate client's SYN as readily as
//! a forged one. A source the gateway has accepted a connection from is
//! not spoofed (it answered the SYN-ACK), so the workers record it in
//! `SYN_TRUSTED`, and the program lets its SYNs pass once the global budget
//! is spent (its own per-source bucket still applies). Entries lapse
//! `TRUST_TTL_NS` after the last refresh; the map is an LRU.
//!
//! One `bpf()` write per source per `REFRESH`, not per connection: a
//! small table of recent refreshes sits in front of the map.

use std::{collections::HashMap, net::IpAddr, path::Path, sync::Mutex};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use gateway_common::{names, v4_mapped, SourceKey};

use super::clock;

/// How often one source's entry is rewritten at most.
const REFRESH_NS: u64 = 60 * 1_000_000_000;
/// Recent refreshes remembered before the table starts over.
const MAX_RECENT: usize = 65_536;

/// The kernel key of a peer address (v4-mapped IPv6 peers count as IPv4).
pub fn key(ip: IpAddr) -> SourceKey {
    match ip.to_canonical() {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

pub struct Trust {
    inner: Mutex<Inner>,
}

struct Inner {
    map: BpfHashMap<MapData, SourceKey, u64>,
    recent: HashMap<IpAddr, u64>,
    /// Whether a failed write was already logged.
    warned: bool,
}

impl Trust {
    /// Opens `SYN_TRUSTED` among the maps pinned at `pin`.
    pub fn open(pin: &Path) -> Result<Trust> {
        let path = pin.join(names::SYN_TRUSTED);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let map = BpfHashMap::try_from(aya::maps::Map::from_map_data(data)?)
            .context("map SYN_TRUSTED has an unexpected type (schema mismatch?)")?;
        Ok(Trust {
            inner: Mutex::new(Inner {
                map,
                recent: HashMap::new(),
                warned: false,
            }),
        })
    }

    /// Records that `ip` completed a handshake now.
    pub fn record(&self, ip: IpAddr) {
        let now = clock::monotonic_ns();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.recent
            .get(&ip)
            .is_some_and(|t| now.saturating_sub(*t) < REFRESH_NS)
        {
            return;
        }
        if g.recent.len() >= MAX_RECENT {
            g.recent.clear();
        }
        g.recent.insert(ip, now);
        if let Err(e) = g.map.insert(key(ip), now, 0) {
            if !std::mem::replace(&mut g.warned, true) {
                tracing::warn!("cannot record a trusted source in SYN_TRUSTED: {e}");
            }
        }
    }
}
