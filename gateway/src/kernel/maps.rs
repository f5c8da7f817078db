//! Typed handles over the XDP program's maps, opened either from a freshly
//! loaded object or from their pins, with the operations the CLI and daemon
//! need. The only code that touches map layouts in userspace.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use gateway_common::{
    bucket, capacity,
    cidr::Cidr,
    hint::{self, Hint, List},
    host, names, nets, v4_mapped, BlockValue, Counter, Limits, Reason, SourceBucket, SourceKey,
    PORT_PROTECTED,
};

use super::{
    host::{HostTable, NetTable},
    nets::{descriptor, CidrStore as _, Side, V6Table},
};

/// Every map of the XDP program.
pub struct KernelMaps {
    allow_v4: LpmTrie<MapData, [u8; 4], u32>,
    allow_v6: LpmTrie<MapData, [u8; 16], u32>,
    block_v4: LpmTrie<MapData, [u8; 4], BlockValue>,
    block_v6: LpmTrie<MapData, [u8; 16], BlockValue>,
    /// `BLOCK_HOST_V4` and its spill map (see `gateway_common::host`).
    host_v4: HostTable,
    /// `BLOCK_NET_V4`: the IPv4 CIDRs of `block_v4` by prefix length (see
    /// `gateway_common::nets`); its descriptor is a word of `hint`.
    net_v4: NetTable,
    /// `BLOCK_NET_V6`: the same for the IPv6 CIDRs of `block_v6`.
    net_v6: V6Table,
    host_v6: HashMap<MapData, [u8; 16], BlockValue>,
    syn_buckets: HashMap<MapData, SourceKey, SourceBucket>,
    limits: Array<MapData, Limits>,
    ports: Array<MapData, u32>,
    stats: PerCpuArray<MapData, Counter>,
    top: HashMap<MapData, SourceKey, u64>,
    /// The list summaries the program reads before any list lookup.
    hint: Array<MapData, u64>,
    /// Sources that completed a handshake lately (see `kernel::trust`).
    trusted: HashMap<MapData, SourceKey, u64>,
    /// Kernel id of STATS, to find the program that uses these maps.
    stats_id: u32,
    /// The pin directory, locked while the blocklist is written: the
    /// daemon and the CLI both write `BLOCK_HOST_V4`, whose slots only
    /// userspace places. `None` for maps no other process can open.
    pin_dir: Option<PathBuf>,
}

/// Counters of one reason, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonCount {
    pub packets: u64,
    pub bytes: u64,
}

/// Entries in the maps userspace fills (for stats and metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct Occupancy {
    pub allow: usize,
    pub block_cidr: usize,
    pub block_host: usize,
    pub syn_buckets: usize,
    pub top_sources: usize,
    pub syn_trusted: usize,
}

fn typed<T>(map: Map, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map)
        .with_context(|| format!("map {name} has an unexpected type (schema mismatch?)"))
}

impl KernelMaps {
    /// Builds the handles from a map source (pins or a loaded object).
    fn build(pin_dir: Option<&Path>, mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        let stats = get(names::STATS)?;
        let stats_id = match &stats {
            Map::PerCpuArray(data) => data.info().context("reading the STATS map info")?.id(),
            _ => anyhow::bail!("map STATS has an unexpected type (schema mismatch?)"),
        };
        let stats: PerCpuArray<MapData, Counter> = typed(stats, names::STATS)?;
        Ok(KernelMaps {
            allow_v4: typed(get(names::ALLOW_V4)?, names::ALLOW_V4)?,
            allow_v6: typed(get(names::ALLOW_V6)?, names::ALLOW_V6)?,
            block_v4: typed(get(names::BLOCK_V4)?, names::BLOCK_V4)?,
            block_v6: typed(get(names::BLOCK_V6)?, names::BLOCK_V6)?,
            host_v4: HostTable::new(get(names::BLOCK_HOST_V4)?, get(names::BLOCK_HOST_V4_SPILL)?)?,
            net_v4: NetTable::new(get(names::BLOCK_NET_V4)?)?,
            net_v6: V6Table(typed(get(names::BLOCK_NET_V6)?, names::BLOCK_NET_V6)?),
            host_v6: typed(get(names::BLOCK_HOST_V6)?, names::BLOCK_HOST_V6)?,
            syn_buckets: typed(get(names::SYN_BUCKETS)?, names::SYN_BUCKETS)?,
            limits: typed(get(names::LIMITS)?, names::LIMITS)?,
            ports: typed(get(names::PORTS)?, names::PORTS)?,
            top: typed(get(names::TOP_SOURCES)?, names::TOP_SOURCES)?,
            hint: typed(get(names::BLOCK_HINT)?, names::BLOCK_HINT)?,
            trusted: typed(get(names::SYN_TRUSTED)?, names::SYN_TRUSTED)?,
            stats,
            stats_id,
            pin_dir: pin_dir.map(Path::to_path_buf),
        })
    }

    /// Opens the maps pinned in `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        Self::build(Some(dir), |name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        })
    }

    /// Takes the maps out of a loaded object, pinned in `pin_dir` if given.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf, pin_dir: Option<&Path>) -> Result<Self> {
        Self::build(pin_dir, |name| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        })
    }

    /// Kernel id of the STATS map.
    pub fn stats_id(&self) -> u32 {
        self.stats_id
    }

    /// Adds (or updates) one blocklist entry.
    ///
    /// The hint bits go in before the entry, so the program never skips a
    /// live entry, and again after it, in case a concurrent `hint_rebuild`
    /// (another process) cleared them in between: a rebuild that saw the
    /// entry keeps its bits, one that did not runs before the second set.
    pub fn block_insert(&mut self, cidr: &Cidr, v: BlockValue) -> Result<()> {
        self.block_insert_many(&[(*cidr, v)])
    }

    /// Adds many entries, with two passes over the hint for all of them.
    pub fn block_insert_many(&mut self, entries: &[(Cidr, BlockValue)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let need = Hint::of(entries.iter().map(|(c, _)| c), None);
        // Under the lock, so two writers' read-modify-writes of a hint word
        // cannot undo each other's bits.
        let _lock = self.write_lock()?;
        self.hint_or(&need)?;
        let tables_before = self.descriptors()?;
        for (c, v) in entries {
            self.block_insert_entry(c, *v)?;
        }
        // An entry a CIDR table could not take: rebuild it now rather than
        // leave every search to the trie until the next rebuild of the lists.
        let tables_after = self.descriptors()?;
        if tables_before.0 != 0 && tables_after.0 == 0 {
            self.nets_v4().refill()?;
        }
        if tables_before.1 != 0 && tables_after.1 == 0 {
            self.nets_v6().refill()?;
        }
        self.hint_or(&need)
    }

    /// Holds the pin directory's lock until dropped (see `pin_dir`).
    fn write_lock(&self) -> Result<Option<File>> {
        let Some(dir) = &self.pin_dir else {
            return Ok(None);
        };
        let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", dir.display()));
        }
        Ok(Some(f))
    }

    fn block_insert_entry(&mut self, cidr: &Cidr, v: BlockValue) -> Result<()> {
        let r = match *cidr {
            Cidr::V4 { addr, len: 32 } => {
                return host::insert(&mut self.host_v4, &addr, v)
                    .map(drop)
                    .with_context(|| format!("adding {cidr} to the kernel blocklist"));
            }
            Cidr::V6 { addr, len: 128 } => self.host_v6.insert(addr, v, 0),
            Cidr::V4 { addr, len } => {
                self.block_v4
                    .insert(&Key::new(len.into(), addr), v, 0)
                    .with_context(|| {
                        format!("adding {cidr} to the kernel blocklist (is the map full?)")
                    })?;
                return self
                    .nets_v4()
                    .insert(&addr, len, v)
                    .with_context(|| format!("adding {cidr} to {}", names::BLOCK_NET_V4));
            }
            Cidr::V6 { addr, len } => {
                self.block_v6
                    .insert(&Key::new(len.into(), addr), v, 0)
                    .with_context(|| {
                        format!("adding {cidr} to the kernel blocklist (is the map full?)")
                    })?;
                return self
                    .nets_v6()
                    .insert(&addr, len, v)
                    .with_context(|| format!("adding {cidr} to {}", names::BLOCK_NET_V6));
            }
        };
        r.with_context(|| format!("adding {cidr} to the kernel blocklist (is the map full?)"))
    }

    /// The IPv4 CIDR table with its trie and descriptor.
    fn nets_v4(&mut self) -> Side<'_, [u8; 4], NetTable> {
        Side {
            trie: &mut self.block_v4,
            table: &mut self.net_v4,
            hint: &mut self.hint,
            index: hint::NETS_V4_INDEX,
            limit: nets::V4_LIMIT,
        }
    }

    /// The IPv6 CIDR table with its trie and descriptor.
    fn nets_v6(&mut self) -> Side<'_, [u8; 16], V6Table> {
        Side {
            trie: &mut self.block_v6,
            table: &mut self.net_v6,
            hint: &mut self.hint,
            index: hint::NETS_V6_INDEX,
            limit: nets::V6_LIMIT,
        }
    }

    /// The IPv4 and IPv6 CIDR table descriptors.
    fn descriptors(&self) -> Result<(u64, u64)> {
        Ok((
            descriptor(&self.hint, hint::NETS_V4_INDEX)?,
            descriptor(&self.hint, hint::NETS_V6_INDEX)?,
        ))
    }

    /// Brings both CIDR tables back in line with their tries when the
    /// prefix lengths of `block` (the whole blocklist as the caller knows
    /// it) do not give the descriptors in place (`nets::Side::rebuild`).
    /// Called with the write lock held.
    fn nets_rebuild(&mut self, block: &[&Cidr]) -> Result<()> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for c in block {
            match **c {
                Cidr::V4 { len, .. } if len < nets::V4_LIMIT => v4.push(len),
                Cidr::V6 { len, .. } if len < nets::V6_LIMIT => v6.push(len),
                _ => {}
            }
        }
        self.nets_v4().rebuild(v4)?;
        self.nets_v6().rebuild(v6)
    }

    /// How the program searches IPv4 CIDR blocks: the prefix lengths it
    /// searches in `BLOCK_NET_V4`, longest first, and whether shorter ones
    /// live in the trie alone; `None` while it walks the trie for every
    /// search.
    pub fn cidr_table(&self) -> Result<Option<(Vec<u8>, bool)>> {
        Ok(table_lengths(self.descriptors()?.0))
    }

    /// The same for IPv6 CIDR blocks and `BLOCK_NET_V6`.
    pub fn cidr_table_v6(&self) -> Result<Option<(Vec<u8>, bool)>> {
        Ok(table_lengths(self.descriptors()?.1))
    }

    /// Sets every bit of `need` in the kernel's hint (never clears one).
    fn hint_or(&mut self, need: &Hint) -> Result<()> {
        for (i, want) in need.words.iter().enumerate().filter(|(_, w)| **w != 0) {
            let i = i as u32;
            let cur = self.hint.get(&i, 0).context("reading BLOCK_HINT")?;
            if cur & want != *want {
                self.hint
                    .set(i, cur | want, 0)
                    .context("writing BLOCK_HINT")?;
            }
        }
        Ok(())
    }

    /// Makes the hints exactly those of `block` and `allow` (the whole
    /// lists), which clears the bits of removed entries, and marks them
    /// ready for the program. If any bit was cleared, both lists are read
    /// back and their bits set again, so an entry another process added
    /// meanwhile (bits, entry, bits: see `block_insert`) cannot end up
    /// without its bits.
    pub fn hint_rebuild<'a, 'b>(
        &mut self,
        block: impl IntoIterator<Item = &'a Cidr>,
        allow: impl IntoIterator<Item = &'b Cidr>,
    ) -> Result<()> {
        let block: Vec<&Cidr> = block.into_iter().collect();
        let _lock = self.write_lock()?;
        self.nets_rebuild(&block)?;
        let want = Hint::of(block, allow);
        let mut cleared = false;
        for (i, w) in want.words.iter().enumerate() {
            let i = i as u32;
            let cur = self.hint.get(&i, 0).context("reading BLOCK_HINT")?;
            if cur != *w {
                cleared |= cur & !w != 0;
                self.hint.set(i, *w, 0).context("writing BLOCK_HINT")?;
            }
        }
        if cleared {
            let block: Vec<Cidr> = self.block_entries()?.into_iter().map(|(c, _)| c).collect();
            let allow = self.allow_entries()?;
            self.hint_or(&Hint::of(&block, &allow))?;
        }
        if self
            .hint
            .get(&hint::READY_INDEX, 0)
            .context("reading BLOCK_HINT")?
            != hint::READY
        {
            self.hint
                .set(hint::READY_INDEX, hint::READY, 0)
                .context("writing BLOCK_HINT")?;
        }
        Ok(())
    }

    /// The hint as the kernel holds it, and whether it is marked ready.
    pub fn hint(&self) -> Result<(Hint, bool)> {
        let mut h = Hint::default();
        for (i, w) in h.words.iter_mut().enumerate() {
            *w = self
                .hint
                .get(&(i as u32), 0)
                .context("reading BLOCK_HINT")?;
        }
        let ready = self
            .hint
            .get(&hint::READY_INDEX, 0)
            .context("reading BLOCK_HINT")?
            == hint::READY;
        Ok((h, ready))
    }

    /// The hits the program counted on the `BLOCK_NET_V6` copy of a block
    /// (tests that it searched there).
    #[cfg(test)]
    pub(crate) fn net_v6_hits(&self, addr: &[u8; 16], len: u8) -> u64 {
        self.net_v6.hits(addr, len)
    }

    /// Overwrites one word of the hint (tests of the kernel's use of it).
    #[cfg(test)]
    pub(crate) fn hint_set(&mut self, i: u32, w: u64) -> Result<()> {
        Ok(self.hint.set(i, w, 0)?)
    }

    /// Removes a blocklist entry; `false` if it was not there. Its hint
    /// bits stay (a "maybe" costs only a lookup) until the next
    /// `hint_rebuild`.
    pub fn block_remove(&mut self, cidr: &Cidr) -> Result<bool> {
        let r = match *cidr {
            Cidr::V4 { addr, len: 32 } => {
                let _lock = self.write_lock()?;
                return host::remove(&mut self.host_v4, &addr)
                    .with_context(|| format!("removing {cidr} from the kernel blocklist"));
            }
            Cidr::V6 { addr, len: 128 } => self.host_v6.remove(&addr),
            Cidr::V4 { addr, len } => {
                let _lock = self.write_lock()?;
                self.nets_v4()
                    .remove(&addr, len)
                    .with_context(|| format!("removing {cidr} from {}", names::BLOCK_NET_V4))?;
                self.block_v4.remove(&Key::new(len.into(), addr))
            }
            Cidr::V6 { addr, len } => {
                let _lock = self.write_lock()?;
                self.nets_v6()
                    .remove(&addr, len)
                    .with_context(|| format!("removing {cidr} from {}", names::BLOCK_NET_V6))?;
                self.block_v6.remove(&Key::new(len.into(), addr))
            }
        };
        not_found_is_false(r).with_context(|| format!("removing {cidr} from the kernel blocklist"))
    }

    /// Every blocklist entry with its kernel value.
    pub fn block_entries(&self) -> Result<Vec<(Cidr, BlockValue)>> {
        let mut out = Vec::new();
        for (addr, v) in self.host_v4.entries()? {
            out.push((Cidr::V4 { addr, len: 32 }, v));
        }
        for kv in self.host_v6.iter() {
            let (addr, v) = kv?;
            out.push((Cidr::V6 { addr, len: 128 }, v));
        }
        for kv in self.block_v4.iter() {
            let (k, mut v) = kv?;
            // The program counts a hit where it found the entry.
            v.hits += self.net_v4.hits(&k.data(), k.prefix_len() as u8);
            out.push((
                Cidr::V4 {
                    addr: k.data(),
                    len: k.prefix_len() as u8,
                },
                v,
            ));
        }
        for kv in self.block_v6.iter() {
            let (k, mut v) = kv?;
            v.hits += self.net_v6.hits(&k.data(), k.prefix_len() as u8);
            out.push((
                Cidr::V6 {
                    addr: k.data(),
                    len: k.prefix_len() as u8,
                },
                v,
            ));
        }
        Ok(out)
    }

    /// Adds an allowlist entry: bits, entry, bits, as `block_insert` does.
    pub fn allow_insert(&mut self, cidr: &Cidr) -> Result<()> {
        let mut need = Hint::default();
        need.add(List::Allow, cidr);
        let _lock = self.write_lock()?;
        self.hint_or(&need)?;
        self.allow_insert_entry(cidr)?;
        self.hint_or(&need)
    }

    fn allow_insert_entry(&mut self, cidr: &Cidr) -> Result<()> {
        let r = match *cidr {
            Cidr::V4 { addr, len } => self.allow_v4.insert(&Key::new(len.into(), addr), 1, 0),
            Cidr::V6 { addr, len } => self.allow_v6.insert(&Key::new(len.into(), addr), 1, 0),
        };
        r.with_context(|| format!("adding {cidr} to the kernel allowlist (is the map full?)"))
    }

    pub fn allow_remove(&mut self, cidr: &Cidr) -> Result<bool> {
        let r = match *cidr {
            Cidr::V4 { addr, len } => self.allow_v4.remove(&Key::new(len.into(), addr)),
            Cidr::V6 { addr, len } => self.allow_v6.remove(&Key::new(len.into(), addr)),
        };
        not_found_is_false(r).with_context(|| format!("removing {cidr} from the kernel allowlist"))
    }

    pub fn allow_entries(&self) -> Result<Vec<Cidr>> {
        let mut out = Vec::new();
        for k in self.allow_v4.keys() {
            let k = k?;
            out.push(Cidr::V4 {
                addr: k.data(),
                len: k.prefix_len() as u8,
            });
        }
        for k in self.allow_v6.keys() {
            let k = k?;
            out.push(Cidr::V6 {
                addr: k.data(),
                len: k.prefix_len() as u8,
            });
        }
        Ok(out)
    }

    /// Marks `key` as having completed a handshake at `now_ns` (monotonic).
    pub fn trust(&mut self, key: &SourceKey, now_ns: u64) -> Result<()> {
        self.trusted
            .insert(key, now_ns, 0)
            .context("writing SYN_TRUSTED")
    }

    /// The SYN bucket of a source key, if it has one.
    pub fn syn_bucket(&self, key: &SourceKey) -> Result<Option<SourceBucket>> {
        match self.syn_buckets.get(key, 0) {
            Ok(b) => Ok(Some(b)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading SYN_BUCKETS"),
        }
    }

    /// Current limits; `None` before they were ever written.
    pub fn limits(&self) -> Result<Option<Limits>> {
        let l = self.limits.get(&0, 0).context("reading LIMITS")?;
        Ok((l.syn_interval != 0 || l.global_interval != 0 || l.ipv4_prefix != 0).then_some(l))
    }

    pub fn set_limits(&mut self, l: &Limits) -> Result<()> {
        self.limits.set(0, l, 0).context("writing LIMITS")
    }

    /// Makes exactly `ports` the protected ports.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<()> {
        for port in 0..gateway_common::capacity::PORTS {
            let want = if ports.contains(&(port as u16)) {
                PORT_PROTECTED
            } else {
                0
            };
            if self.ports.get(&port, 0)? != want {
                self.ports.set(port, want, 0).context("writing PORTS")?;
            }
        }
        Ok(())
    }

    pub fn ports(&self) -> Result<Vec<u16>> {
        let mut out = Vec::new();
        for (port, v) in self.ports.iter().enumerate() {
            if v? == PORT_PROTECTED {
                out.push(port as u16);
            }
        }
        Ok(out)
    }

    /// Per-reason counters, summed over CPUs, in `Reason::ALL` order.
    pub fn stats(&self) -> Result<Vec<(Reason, ReasonCount)>> {
        Reason::ALL
            .iter()
            .map(|r| {
                let per_cpu = self.stats.get(&(*r as u32), 0).context("reading STATS")?;
                let sum = per_cpu
                    .iter()
                    .fold(ReasonCount::default(), |a, c| ReasonCount {
                        packets: a.packets + c.packets,
                        bytes: a.bytes + c.bytes,
                    });
                Ok((*r, sum))
            })
            .collect()
    }

    /// The sources with the most dropped packets, most first.
    ///
    /// The kernel credits a source's SYN-limit drops to `TOP_SOURCES` in
    /// batches (`bucket::rank_credit`). Where a source is its own bucket
    /// (the IPv4 prefix is 32, the IPv6 one 128: the default for IPv4), the
    /// refusals its bucket has not credited yet are added here, so its
    /// count is exact; otherwise it trails by less than a batch.
    pub fn top(&self, n: usize) -> Result<Vec<(SourceKey, u64)>> {
        let mut all: Vec<(SourceKey, u64)> = self.top.iter().collect::<Result<_, _>>()?;
        if let Some(l) = self.limits()? {
            for (key, count) in &mut all {
                let v4 = key[..12] == v4_mapped([0; 4])[..12];
                let own_bucket = if v4 {
                    l.ipv4_prefix == 32
                } else {
                    l.ipv6_prefix == 128
                };
                if own_bucket {
                    if let Some(b) = self.syn_bucket(key)? {
                        *count += b.refused - bucket::credited(b.refused);
                    }
                }
            }
        }
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        Ok(all)
    }

    /// The IPv4 host table (tests).
    #[cfg(test)]
    pub fn host_v4(&self) -> &HostTable {
        &self.host_v4
    }

    /// `TOP_SOURCES` as the kernel wrote it, by source key (for tests).
    #[cfg(test)]
    pub fn top_credited(&self) -> Result<Vec<(SourceKey, u64)>> {
        let mut all: Vec<(SourceKey, u64)> = self.top.iter().collect::<Result<_, _>>()?;
        all.sort_unstable();
        Ok(all)
    }

    pub fn occupancy(&self) -> Result<Occupancy> {
        let per_map = self.entries_per_map();
        let n = |names: &[&str]| -> usize {
            per_map
                .iter()
                .filter(|(m, _)| names.contains(m))
                .map(|(_, n)| n)
                .sum()
        };
        Ok(Occupancy {
            allow: n(&[names::ALLOW_V4, names::ALLOW_V6]),
            block_cidr: n(&[names::BLOCK_V4, names::BLOCK_V6]),
            block_host: n(&[names::BLOCK_HOST_V4, names::BLOCK_HOST_V6]),
            syn_buckets: n(&[names::SYN_BUCKETS]),
            top_sources: n(&[names::TOP_SOURCES]),
            syn_trusted: n(&[names::SYN_TRUSTED]),
        })
    }

    /// Entries of each map userspace fills or reads, by its contract name
    /// (`gateway_xdp_map_entries{map}`). `BLOCK_HOST_V4` counts its spill
    /// map too; the CIDR tables, copies of the tries, are not listed.
    ///
    /// Each walk stops at its map's capacity. The kernel restarts a walk
    /// from the first bucket when the key it stands on is deleted, which
    /// under a spoofed flood (an LRU map that turns over every few
    /// milliseconds) happens at nearly every step: an uncapped walk of
    /// `SYN_BUCKETS` would never end, and the daemon's loop (bans, the
    /// expiry sweep, reloads) waits behind it. A capped count of a churning
    /// map reads as full, which is what it is.
    pub fn entries_per_map(&self) -> Vec<(&'static str, usize)> {
        fn upto(keys: impl Iterator, capacity: u32) -> usize {
            keys.take(capacity as usize).count()
        }
        vec![
            (names::ALLOW_V4, upto(self.allow_v4.keys(), capacity::ALLOW)),
            (names::ALLOW_V6, upto(self.allow_v6.keys(), capacity::ALLOW)),
            (
                names::BLOCK_V4,
                upto(self.block_v4.keys(), capacity::BLOCK_CIDR),
            ),
            (
                names::BLOCK_V6,
                upto(self.block_v6.keys(), capacity::BLOCK_CIDR),
            ),
            (names::BLOCK_HOST_V4, self.host_v4.count()),
            (
                names::BLOCK_HOST_V6,
                upto(self.host_v6.keys(), capacity::BLOCK_HOST_V6),
            ),
            (
                names::SYN_BUCKETS,
                upto(self.syn_buckets.keys(), capacity::SYN_BUCKETS),
            ),
            (
                names::TOP_SOURCES,
                upto(self.top.keys(), capacity::TOP_SOURCES),
            ),
            (
                names::SYN_TRUSTED,
                upto(self.trusted.keys(), capacity::SYN_TRUSTED),
            ),
        ]
    }

    /// Removes blocklist entries whose kernel expiry has passed (the kernel
    /// already ignores them; this frees their slots). Returns what it
    /// removed and the earliest expiry among the entries left, if any.
    pub fn remove_expired(&mut self, now_ns: u64) -> Result<(Vec<Cidr>, Option<u64>)> {
        let (expired, live): (Vec<_>, Vec<_>) = self
            .block_entries()?
            .into_iter()
            .partition(|(_, v)| !v.active(now_ns));
        for (c, _) in &expired {
            self.block_remove(c)?;
        }
        if !expired.is_empty() {
            let allow = self.allow_entries()?;
            self.hint_rebuild(live.iter().map(|(c, _)| c), &allow)?;
        }
        let next = earliest_expiry(live.iter().map(|(_, v)| v));
        Ok((expired.into_iter().map(|(c, _)| c).collect(), next))
    }
}

/// A descriptor's table lengths, longest first, and whether shorter ones
/// live in the trie alone; `None` for the trie.
fn table_lengths(d: u64) -> Option<(Vec<u8>, bool)> {
    nets::lengths(d).map(|l| (l.collect(), d & nets::TRIE_AFTER != 0))
}

/// The earliest expiry among `values` (permanent entries have none).
pub fn earliest_expiry<'a>(values: impl IntoIterator<Item = &'a BlockValue>) -> Option<u64> {
    values
        .into_iter()
        .map(|v| v.expires_ns)
        .filter(|e| *e != 0)
        .min()
}

pub(super) fn not_found_is_false(
    r: Result<(), aya::maps::MapError>,
) -> Result<bool, aya::maps::MapError> {
    match r {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
