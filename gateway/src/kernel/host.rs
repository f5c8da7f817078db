//! The open-addressed blocklist tables in userspace: `BLOCK_HOST_V4` (with
//! `BLOCK_HOST_V4_SPILL` through the map syscalls) and `BLOCK_NET_V4` (no
//! spill map: an entry that finds no room sends the program back to the
//! trie, see `gateway_common::nets`), mapped into this process's memory,
//! with the insert and remove algorithms of `gateway_common::host`.
//!
//! The mapping lets slot writes be ordered (value, then key) and lets a
//! walk of all 524,288 slots run at memory speed (a few ms) instead of two
//! syscalls per entry.

use std::{
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use gateway_common::{
    host::{self, HostSlot, Hosts, Nets, Probe, Shape, Store},
    names, BlockValue,
};

/// `BPF_F_MMAPABLE` (linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// One table, `S` giving its size.
pub struct Table<S: Shape> {
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
    base: NonNull<HostSlot>,
    /// The spill map (`BLOCK_HOST_V4` only).
    spill: Option<HashMap<MapData, [u8; 4], BlockValue>>,
    /// An insert found its window full and the table has no spill map.
    overflowed: bool,
    name: &'static str,
    _shape: PhantomData<S>,
}

/// `BLOCK_HOST_V4` and its spill map.
pub type HostTable = Table<Hosts>;
/// `BLOCK_NET_V4`.
pub type NetTable = Table<Nets>;

// SAFETY: the mapping is shared memory that every access goes through as
// atomics (see the `Store` impl); the pointer itself is never reassigned.
unsafe impl<S: Shape> Send for Table<S> {}
// SAFETY: as above.
unsafe impl<S: Shape> Sync for Table<S> {}

impl HostTable {
    pub fn new(table: Map, spill: Map) -> Result<HostTable> {
        let spill = HashMap::try_from(spill).with_context(|| {
            format!(
                "map {} has an unexpected type (schema mismatch?)",
                names::BLOCK_HOST_V4_SPILL
            )
        })?;
        Table::map(table, Some(spill), names::BLOCK_HOST_V4)
    }

    /// Every entry: the table's, then the spill map's.
    pub fn entries(&self) -> Result<Vec<([u8; 4], BlockValue)>> {
        let mut out: Vec<([u8; 4], BlockValue)> = self
            .used()
            .filter_map(|(k, v)| host::addr_of(k).map(|a| (a, v)))
            .collect();
        for (k, v) in self.spill_entries()? {
            out.extend(host::addr_of(k).map(|a| (a, v)));
        }
        Ok(out)
    }

    /// How many entries there are, without collecting them.
    pub fn count(&self) -> usize {
        self.used().count() + self.spill.as_ref().map_or(0, |m| m.keys().count())
    }

    /// What the program finds for `a` (tests).
    #[cfg(test)]
    pub fn lookup(&self, a: &[u8; 4]) -> Result<Option<BlockValue>> {
        let key = host::key_of(a);
        if let Some(v) = self.get(key) {
            return Ok(Some(v));
        }
        Ok(self
            .spill_entries()?
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v))
    }

    /// Entries in the spill map (tests).
    #[cfg(test)]
    pub fn spilled(&self) -> usize {
        self.spill.as_ref().map_or(0, |m| m.keys().count())
    }
}

impl NetTable {
    pub fn new(table: Map) -> Result<NetTable> {
        Table::map(table, None, names::BLOCK_NET_V4)
    }

    /// Whether an insert since the last call found no room.
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    /// Frees every slot. Only while the program does not read the table.
    pub fn clear_all(&mut self) {
        for s in 0..Nets::SLOTS {
            if self.key(s) != 0 {
                self.clear(s);
            }
        }
    }
}

impl<S: Shape> Table<S> {
    fn map(
        table: Map,
        spill: Option<HashMap<MapData, [u8; 4], BlockValue>>,
        name: &'static str,
    ) -> Result<Table<S>> {
        let Map::Array(map) = table else {
            bail!("map {name} has an unexpected type (schema mismatch?)");
        };
        let info = map
            .info()
            .with_context(|| format!("reading the {name} map info"))?;
        if info.value_size() as usize != size_of::<HostSlot>()
            || info.max_entries() != S::SLOTS
            || info.map_flags() & BPF_F_MMAPABLE == 0
        {
            bail!("map {name} has an unexpected layout (schema mismatch?)");
        }
        // SAFETY: a fresh shared mapping of the whole array (value size and
        // entries checked above); the kernel keeps it valid until munmap.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} into memory"));
        }
        let base = NonNull::new(p.cast::<HostSlot>()).context("mmap returned null")?;
        Ok(Table {
            _map: map,
            base,
            spill,
            overflowed: false,
            name,
            _shape: PhantomData,
        })
    }

    const LEN: usize = S::SLOTS as usize * size_of::<HostSlot>();

    /// The value the table (not its spill map) holds under `key`.
    pub fn get(&self, key: u64) -> Option<BlockValue> {
        match host::probe_key::<S, _>(key, |s| Some((self.key(s), s))) {
            Probe::Found(s) => Some(self.value(s)),
            _ => None,
        }
    }

    /// Every used slot's key and value.
    pub fn used(&self) -> impl Iterator<Item = (u64, BlockValue)> + '_ {
        (0..S::SLOTS).filter_map(|s| {
            let k = self.key(s);
            (k != 0).then(|| (k, self.value(s)))
        })
    }

    /// The three u64 words of `slot`: key, expires_ns, hits.
    fn words(&self, slot: u32) -> [&AtomicU64; 3] {
        assert!(slot < S::SLOTS);
        // SAFETY: `slot` is inside the mapping; `HostSlot` is three aligned
        // u64s (repr(C), size-checked in gateway_common), and the kernel
        // side touches them only with word-sized loads, stores and adds.
        unsafe {
            let s = self.base.as_ptr().add(slot as usize);
            [
                AtomicU64::from_ptr(&raw mut (*s).key),
                AtomicU64::from_ptr(&raw mut (*s).value.expires_ns),
                AtomicU64::from_ptr(&raw mut (*s).value.hits),
            ]
        }
    }
}

impl<S: Shape> Store for Table<S> {
    type Error = anyhow::Error;

    fn key(&self, slot: u32) -> u64 {
        self.words(slot)[0].load(Ordering::Acquire)
    }

    fn value(&self, slot: u32) -> BlockValue {
        let [_, expires, hits] = self.words(slot);
        BlockValue {
            expires_ns: expires.load(Ordering::Relaxed),
            hits: hits.load(Ordering::Relaxed),
        }
    }

    fn publish(&mut self, slot: u32, s: HostSlot) {
        let [key, expires, hits] = self.words(slot);
        expires.store(s.value.expires_ns, Ordering::Relaxed);
        hits.store(s.value.hits, Ordering::Relaxed);
        key.store(s.key, Ordering::Release);
    }

    fn set_value(&mut self, slot: u32, v: BlockValue) {
        let [_, expires, hits] = self.words(slot);
        hits.store(v.hits, Ordering::Relaxed);
        expires.store(v.expires_ns, Ordering::Release);
    }

    fn clear(&mut self, slot: u32) {
        let [key, expires, hits] = self.words(slot);
        key.store(0, Ordering::Release);
        expires.store(0, Ordering::Relaxed);
        hits.store(0, Ordering::Relaxed);
    }

    fn spill_insert(&mut self, key: u64, v: BlockValue) -> Result<()> {
        let (Some(spill), Some(a)) = (&mut self.spill, host::addr_of(key)) else {
            self.overflowed = true;
            return Ok(());
        };
        spill.insert(a, v, 0).with_context(|| {
            format!(
                "adding {} to {} (is it full?)",
                std::net::Ipv4Addr::from(a),
                names::BLOCK_HOST_V4_SPILL
            )
        })
    }

    fn spill_remove(&mut self, key: u64) -> Result<bool> {
        let (Some(spill), Some(a)) = (&mut self.spill, host::addr_of(key)) else {
            return Ok(false);
        };
        super::maps::not_found_is_false(spill.remove(&a)).with_context(|| {
            format!(
                "removing {} from {}",
                std::net::Ipv4Addr::from(a),
                names::BLOCK_HOST_V4_SPILL
            )
        })
    }

    fn spill_entries(&self) -> Result<Vec<(u64, BlockValue)>> {
        let Some(spill) = &self.spill else {
            return Ok(Vec::new());
        };
        spill
            .iter()
            .map(|kv| kv.map(|(a, v)| (host::key_of(&a), v)))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading the spill map of {}", self.name))
    }
}

impl<S: Shape> Drop for Table<S> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::LEN) };
    }
}
