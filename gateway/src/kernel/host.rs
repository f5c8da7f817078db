//! The IPv4 host blocklist in userspace: `BLOCK_HOST_V4` mapped into this
//! process's memory, `BLOCK_HOST_V4_SPILL` through the map syscalls, and
//! the insert and remove algorithms of `gateway_common::host` over both.
//!
//! The mapping lets slot writes be ordered (value, then key) and lets a
//! walk of all 524,288 slots run at memory speed (a few ms) instead of two
//! syscalls per entry.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use gateway_common::{
    host::{self, HostSlot, Store},
    names, BlockValue,
};

/// `BPF_F_MMAPABLE` (linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

pub struct HostTable {
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
    base: NonNull<HostSlot>,
    spill: HashMap<MapData, [u8; 4], BlockValue>,
}

// SAFETY: the mapping is shared memory that every access goes through as
// atomics (see the `Store` impl); the pointer itself is never reassigned.
unsafe impl Send for HostTable {}
// SAFETY: as above.
unsafe impl Sync for HostTable {}

const LEN: usize = host::SLOTS as usize * size_of::<HostSlot>();

impl HostTable {
    pub fn new(table: Map, spill: Map) -> Result<HostTable> {
        let Map::Array(map) = table else {
            bail!(
                "map {} has an unexpected type (schema mismatch?)",
                names::BLOCK_HOST_V4
            );
        };
        let info = map.info().context("reading the BLOCK_HOST_V4 map info")?;
        if info.value_size() as usize != size_of::<HostSlot>()
            || info.max_entries() != host::SLOTS
            || info.map_flags() & BPF_F_MMAPABLE == 0
        {
            bail!(
                "map {} has an unexpected layout (schema mismatch?)",
                names::BLOCK_HOST_V4
            );
        }
        // SAFETY: a fresh shared mapping of the whole array (value size and
        // entries checked above); the kernel keeps it valid until munmap.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .context("mapping BLOCK_HOST_V4 into memory");
        }
        let base = NonNull::new(p.cast::<HostSlot>()).context("mmap returned null")?;
        let spill = HashMap::try_from(spill).with_context(|| {
            format!(
                "map {} has an unexpected type (schema mismatch?)",
                names::BLOCK_HOST_V4_SPILL
            )
        })?;
        Ok(HostTable {
            _map: map,
            base,
            spill,
        })
    }

    /// The three u64 words of `slot`: key, expires_ns, hits.
    fn words(&self, slot: u32) -> [&AtomicU64; 3] {
        assert!(slot < host::SLOTS);
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

    /// Every entry: the table's, then the spill map's.
    pub fn entries(&self) -> Result<Vec<([u8; 4], BlockValue)>> {
        let mut out: Vec<([u8; 4], BlockValue)> = (0..host::SLOTS)
            .filter_map(|s| host::addr_of(self.key(s)).map(|a| (a, self.value(s))))
            .collect();
        out.extend(self.spill_entries()?);
        Ok(out)
    }

    /// How many entries there are, without collecting them.
    pub fn count(&self) -> usize {
        let table = (0..host::SLOTS).filter(|s| self.key(*s) != 0).count();
        table + self.spill.keys().count()
    }

    /// What the program finds for `a` (tests).
    #[cfg(test)]
    pub fn lookup(&self, a: &[u8; 4]) -> Result<Option<BlockValue>> {
        use gateway_common::host::Probe;
        Ok(match host::probe(a, |s| Some((self.key(s), s))) {
            Probe::Found(s) => Some(self.value(s)),
            Probe::Absent(_) => None,
            Probe::Spill => match self.spill.get(a, 0) {
                Ok(v) => Some(v),
                Err(aya::maps::MapError::KeyNotFound) => None,
                Err(e) => return Err(e.into()),
            },
        })
    }

    /// Entries in the spill map (tests).
    #[cfg(test)]
    pub fn spilled(&self) -> usize {
        self.spill.keys().count()
    }
}

impl Store for HostTable {
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

    fn spill_insert(&mut self, a: &[u8; 4], v: BlockValue) -> Result<()> {
        self.spill.insert(a, v, 0).with_context(|| {
            format!(
                "adding {} to {} (is it full?)",
                std::net::Ipv4Addr::from(*a),
                names::BLOCK_HOST_V4_SPILL
            )
        })
    }

    fn spill_remove(&mut self, a: &[u8; 4]) -> Result<bool> {
        super::maps::not_found_is_false(self.spill.remove(a)).with_context(|| {
            format!(
                "removing {} from {}",
                std::net::Ipv4Addr::from(*a),
                names::BLOCK_HOST_V4_SPILL
            )
        })
    }

    fn spill_entries(&self) -> Result<Vec<([u8; 4], BlockValue)>> {
        self.spill
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", names::BLOCK_HOST_V4_SPILL))
    }
}

impl Drop for HostTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), LEN) };
    }
}
