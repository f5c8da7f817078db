//! The IPv4 host blocklist (`BLOCK_HOST_V4`, schema 4): an open-addressed
//! table with linear probing kept in a `BPF_MAP_TYPE_ARRAY`, plus a small
//! hash map (`BLOCK_HOST_V4_SPILL`) for the entries that find no room.
//! `BLOCK_NET_V4` (schema 5, `crate::nets`) is a table of the same kind
//! for IPv4 CIDRs, keyed by prefix length and masked address and with no
//! spill map; [`Shape`] gives each its size, the rest is shared.
//!
//! Why not the kernel's hash map: the verifier inlines an array lookup into
//! a bounds check and an add, so a probe costs a load, where a hash-map
//! lookup hashes the key with jhash and walks a bucket list (~28 ns of the
//! ~78 ns an exact block hit took with 100,000 entries).
//!
//! The table has [`SLOTS`] slots, twice the capacity, so it stays at most
//! half full. An address's home slot is a multiplicative hash of it; the
//! entry sits at the first free slot at most [`MAX_PROBE`] - 1 slots after
//! home. Every slot between home and the entry is taken (the linear-probing
//! invariant), so a search stops at the first empty slot. When all
//! `MAX_PROBE` slots of a window are taken the entry goes to the spill map,
//! and the program looks there only after a search that saw a full window.
//! That keeps a spilled entry findable as long as its window stays full,
//! which removal guarantees: it never empties a slot inside a spilled
//! entry's window; it moves that entry into the slot instead.
//!
//! Removal shifts the entries after the removed one back (no tombstones),
//! so probe lengths stay those of the live entries. Userspace is the only
//! writer of keys and values (the program adds to `hits` only) and writes a
//! slot's value before its key, so a program that sees a key sees its
//! value; while entries shift, each is in at least one slot of its window
//! at every instant. The search ([`probe`]) is shared with the program so
//! the two cannot disagree.

use crate::BlockValue;

/// The size of one open-addressed table: `BLOCK_HOST_V4` ([`Hosts`]) and
/// `BLOCK_NET_V4` ([`Nets`]) share the layout, the keys and the algorithms.
pub trait Shape {
    /// Bits of the slot index.
    const BITS: u32;
    /// Slots in the table.
    const SLOTS: u32 = 1 << Self::BITS;
    /// The slot index mask.
    const MASK: u32 = Self::SLOTS - 1;
}

/// `BLOCK_HOST_V4`: the IPv4 /32 blocks.
pub struct Hosts;
impl Shape for Hosts {
    const BITS: u32 = SLOT_BITS;
}

/// `BLOCK_NET_V4`: the IPv4 CIDR blocks (/0 to /31), a copy of `BLOCK_V4`
/// the program searches one prefix length at a time (see [`crate::nets`]).
pub struct Nets;
impl Shape for Nets {
    const BITS: u32 = NET_SLOT_BITS;
}

/// Bits of the slot index of `BLOCK_HOST_V4`.
pub const SLOT_BITS: u32 = 19;
/// Slots in `BLOCK_HOST_V4` (twice `capacity::BLOCK_HOST_V4`).
pub const SLOTS: u32 = 1 << SLOT_BITS;
/// Bits of the slot index of `BLOCK_NET_V4`.
pub const NET_SLOT_BITS: u32 = 18;
/// Slots in `BLOCK_NET_V4`: room for 131,072 CIDRs at half load; more
/// than fit send the program back to the trie (see [`crate::nets`]).
pub const NET_SLOTS: u32 = 1 << NET_SLOT_BITS;
/// Slots a search looks at: an entry sits at most `MAX_PROBE - 1` slots
/// after its home slot. At half load a window is full for about one
/// address in 10,000; at the benchmark's 100,000 entries, for none.
pub const MAX_PROBE: u32 = 16;

const _: () = assert!(SLOTS == 2 * crate::capacity::BLOCK_HOST_V4);
const _: () = assert!(core::mem::size_of::<HostSlot>() == 24);

/// Marks a used slot's key (an address alone may be 0.0.0.0).
const USED: u64 = 1 << 32;
/// Where a CIDR key keeps its prefix length (0 in every host key).
const LEN_SHIFT: u32 = 40;

/// One slot of `BLOCK_HOST_V4`. `key` is 0 when the slot is free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostSlot {
    pub key: u64,
    pub value: BlockValue,
}

/// The key of a used slot holding `a`.
#[inline(always)]
pub const fn key_of(a: &[u8; 4]) -> u64 {
    USED | u32::from_be_bytes(*a) as u64
}

/// The address a slot's key holds; `None` for a free slot.
#[inline(always)]
pub const fn addr_of(key: u64) -> Option<[u8; 4]> {
    if key & USED != 0 {
        Some((key as u32).to_be_bytes())
    } else {
        None
    }
}

/// The key of the `len`-bit prefix of `a` (`len` <= 32; the host bits of
/// `a` are masked off here, so any address inside the prefix gives it).
#[inline(always)]
pub const fn net_key(a: &[u8; 4], len: u32) -> u64 {
    // A u64 shift, so /0 (a shift by 32) is defined: mask 0.
    let mask = (u64::MAX << (32 - (len & 63))) as u32;
    USED | ((len as u64) << LEN_SHIFT) | (u32::from_be_bytes(*a) & mask) as u64
}

/// The prefix a CIDR key holds: address and length.
#[inline(always)]
pub const fn net_of(key: u64) -> Option<([u8; 4], u8)> {
    match addr_of(key) {
        Some(a) => Some((a, (key >> LEN_SHIFT) as u8)),
        None => None,
    }
}

/// The home slot of a key (Fibonacci hashing: neighbouring addresses land
/// far apart; a CIDR key's length moves it, so 10.0.0.0/8 and 10.0.0.0/16
/// start their searches apart). For a host key this is [`home`].
#[inline(always)]
pub fn home_of<S: Shape>(key: u64) -> u32 {
    let len = (key >> LEN_SHIFT) as u32;
    (key as u32)
        .wrapping_add(len.wrapping_mul(0x85EB_CA6B))
        .wrapping_mul(0x9E37_79B1)
        >> (32 - S::BITS)
}

/// The home slot of `a` in `BLOCK_HOST_V4`.
#[inline(always)]
pub fn home(a: &[u8; 4]) -> u32 {
    home_of::<Hosts>(key_of(a))
}

/// The `i`th slot of the window that starts at `home`.
#[inline(always)]
pub fn slot_in<S: Shape>(home: u32, i: u32) -> u32 {
    home.wrapping_add(i) & S::MASK
}

/// Slots from `from` forward to `to`, wrapping.
#[cfg(any(test, feature = "user"))]
#[inline(always)]
fn dist<S: Shape>(from: u32, to: u32) -> u32 {
    to.wrapping_sub(from) & S::MASK
}

/// Where a search for an address ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe<T> {
    /// In the table, at what `read` returned for its slot.
    Found(T),
    /// Not in the table, and not spilled: the free slot that ended the
    /// search, where an insert puts it.
    Absent(T),
    /// Not in the table, and its window is full: look in the spill map.
    Spill,
}

/// The search for `want`. `read(slot)` returns the slot's key and a handle
/// to it; `None` (a lookup the program could not do) sends the search to
/// the spill map, which is never wrong, only slower.
#[inline(always)]
pub fn probe_key<S: Shape, T>(
    want: u64,
    mut read: impl FnMut(u32) -> Option<(u64, T)>,
) -> Probe<T> {
    let h = home_of::<S>(want);
    for i in 0..MAX_PROBE {
        match read(slot_in::<S>(h, i)) {
            Some((k, t)) if k == want => return Probe::Found(t),
            Some((0, t)) => return Probe::Absent(t),
            Some(_) => {}
            None => return Probe::Spill,
        }
    }
    Probe::Spill
}

/// The search for the host `a` in `BLOCK_HOST_V4`.
#[inline(always)]
pub fn probe<T>(a: &[u8; 4], read: impl FnMut(u32) -> Option<(u64, T)>) -> Probe<T> {
    probe_key::<Hosts, T>(key_of(a), read)
}

/// A table and its spill map as userspace writes them.
#[cfg(any(test, feature = "user"))]
pub trait Store {
    type Error;

    fn key(&self, slot: u32) -> u64;
    fn value(&self, slot: u32) -> BlockValue;
    /// Writes `s` into `slot`: the value first, then the key.
    fn publish(&mut self, slot: u32, s: HostSlot);
    /// Replaces the value of a used slot (its key stays).
    fn set_value(&mut self, slot: u32, v: BlockValue);
    /// Frees `slot`.
    fn clear(&mut self, slot: u32);

    fn spill_insert(&mut self, key: u64, v: BlockValue) -> Result<(), Self::Error>;
    /// `false` if `key` was not there.
    fn spill_remove(&mut self, key: u64) -> Result<bool, Self::Error>;
    fn spill_entries(&self) -> Result<std::vec::Vec<(u64, BlockValue)>, Self::Error>;
}

/// Where [`insert`] put an entry.
#[cfg(any(test, feature = "user"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// It was there: its value was replaced.
    Updated,
    /// In a free slot of its window.
    Table,
    /// In the spill map: its window is full.
    Spilled,
}

/// Adds the host `a` with value `v`, or replaces the value it has.
#[cfg(any(test, feature = "user"))]
pub fn insert<S: Store>(t: &mut S, a: &[u8; 4], v: BlockValue) -> Result<Placed, S::Error> {
    insert_key::<Hosts, S>(t, key_of(a), v)
}

/// Removes the host `a`; `false` if it was in neither the table nor the
/// spill map.
#[cfg(any(test, feature = "user"))]
pub fn remove<S: Store>(t: &mut S, a: &[u8; 4]) -> Result<bool, S::Error> {
    remove_key::<Hosts, S>(t, key_of(a))
}

/// Adds `key` with value `v`, or replaces the value it has.
#[cfg(any(test, feature = "user"))]
pub fn insert_key<Sh: Shape, S: Store>(
    t: &mut S,
    key: u64,
    v: BlockValue,
) -> Result<Placed, S::Error> {
    match probe_key::<Sh, _>(key, |s| Some((t.key(s), s))) {
        Probe::Found(s) => {
            t.set_value(s, v);
            Ok(Placed::Updated)
        }
        Probe::Absent(s) => {
            t.publish(s, HostSlot { key, value: v });
            Ok(Placed::Table)
        }
        Probe::Spill => {
            t.spill_insert(key, v)?;
            Ok(Placed::Spilled)
        }
    }
}

/// Removes `key`; `false` if it was in neither the table nor the spill map.
#[cfg(any(test, feature = "user"))]
pub fn remove_key<Sh: Shape, S: Store>(t: &mut S, key: u64) -> Result<bool, S::Error> {
    let at = match probe_key::<Sh, _>(key, |s| Some((t.key(s), s))) {
        Probe::Found(s) => s,
        Probe::Absent(_) => return Ok(false),
        Probe::Spill => return t.spill_remove(key),
    };
    // Backward shift: move each later entry of the run that may sit at the
    // hole into it. The hole keeps a copy of what was there until it is
    // overwritten, so no search meets a free slot it should not.
    let mut hole = at;
    let mut j = at;
    let mut end = None;
    for _ in 1..Sh::SLOTS {
        j = slot_in::<Sh>(j, 1);
        let k = t.key(j);
        if k == 0 {
            end = Some(j);
            break;
        }
        // The entry at j may move to the hole unless its home lies in
        // (hole, j]: then the hole is before its home.
        let h = home_of::<Sh>(k);
        let d = dist::<Sh>(hole, h);
        let home_after_hole = d != 0 && d <= dist::<Sh>(hole, j);
        if !home_after_hole {
            t.publish(
                hole,
                HostSlot {
                    key: k,
                    value: t.value(j),
                },
            );
            hole = j;
        }
    }
    // Freeing the hole must not open a spilled entry's full window. Such a
    // window holds the hole and MAX_PROBE taken slots, all inside the run
    // of taken slots around the hole (before this removal), so only a run
    // that long needs the spill map read.
    let before = (1..MAX_PROBE)
        .take_while(|i| t.key(hole.wrapping_sub(*i) & Sh::MASK) != 0)
        .count() as u32;
    let after = end.map_or(Sh::SLOTS, |e| dist::<Sh>(hole, e));
    if before + after >= MAX_PROBE {
        let spilled = t.spill_entries()?;
        if let Some((sk, sv)) = spilled
            .into_iter()
            .find(|(sk, _)| dist::<Sh>(home_of::<Sh>(*sk), hole) < MAX_PROBE)
        {
            t.publish(hole, HostSlot { key: sk, value: sv });
            t.spill_remove(sk)?;
            return Ok(true);
        }
    }
    t.clear(hole);
    Ok(true)
}

/// Addresses whose home slot is `h` (< [`SLOTS`]), for tests that crowd a
/// window: the hash is a bijection on u32, so this walks its inverse.
#[cfg(any(test, feature = "user"))]
pub fn homed_at(h: u32) -> impl Iterator<Item = [u8; 4]> {
    // 0x9E3779B1 * 0x0E8B2F51 == 1 (mod 2^32).
    const INV: u32 = 0x0E8B_2F51;
    (0..1u32 << (32 - SLOT_BITS)).map(move |low| {
        ((h << (32 - SLOT_BITS)) | low)
            .wrapping_mul(INV)
            .to_be_bytes()
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, vec, vec::Vec};

    use super::*;

    /// A table in memory, with a spill map, as tests use.
    struct Mem {
        slots: Vec<HostSlot>,
        spill: BTreeMap<u64, BlockValue>,
    }

    impl Mem {
        fn new() -> Mem {
            Mem::sized(SLOTS)
        }

        fn sized(n: u32) -> Mem {
            Mem {
                slots: vec![HostSlot::default(); n as usize],
                spill: BTreeMap::new(),
            }
        }

        /// What the program would find for `a`.
        fn lookup(&self, a: &[u8; 4]) -> Option<BlockValue> {
            self.lookup_key::<Hosts>(key_of(a))
        }

        fn lookup_key<S: Shape>(&self, key: u64) -> Option<BlockValue> {
            match probe_key::<S, _>(key, |s| Some((self.slots[s as usize].key, s))) {
                Probe::Found(s) => Some(self.slots[s as usize].value),
                Probe::Absent(_) => None,
                Probe::Spill => self.spill.get(&key).copied(),
            }
        }

        fn used(&self) -> usize {
            self.slots.iter().filter(|s| s.key != 0).count()
        }
    }

    impl Store for Mem {
        type Error = ();
        fn key(&self, s: u32) -> u64 {
            self.slots[s as usize].key
        }
        fn value(&self, s: u32) -> BlockValue {
            self.slots[s as usize].value
        }
        fn publish(&mut self, s: u32, slot: HostSlot) {
            self.slots[s as usize] = slot;
        }
        fn set_value(&mut self, s: u32, v: BlockValue) {
            self.slots[s as usize].value = v;
        }
        fn clear(&mut self, s: u32) {
            self.slots[s as usize] = HostSlot::default();
        }
        fn spill_insert(&mut self, key: u64, v: BlockValue) -> Result<(), ()> {
            self.spill.insert(key, v);
            Ok(())
        }
        fn spill_remove(&mut self, key: u64) -> Result<bool, ()> {
            Ok(self.spill.remove(&key).is_some())
        }
        fn spill_entries(&self) -> Result<Vec<(u64, BlockValue)>, ()> {
            Ok(self.spill.iter().map(|(k, v)| (*k, *v)).collect())
        }
    }

    fn homed_at(h: u32, n: usize) -> Vec<[u8; 4]> {
        let out: Vec<[u8; 4]> = super::homed_at(h).take(n).collect();
        assert!(out.iter().all(|a| home(a) == h));
        out
    }

    fn v(n: u64) -> BlockValue {
        BlockValue::until(n)
    }

    #[test]
    fn keys_round_trip_and_mark_use() {
        for a in [[0, 0, 0, 0], [10, 0, 0, 1], [255; 4]] {
            assert_ne!(key_of(&a), 0, "a used slot never looks free");
            assert_eq!(addr_of(key_of(&a)), Some(a));
        }
        assert_eq!(addr_of(0), None);
        assert_eq!(0x9E37_79B1u32.wrapping_mul(0x0E8B_2F51), 1);
    }

    #[test]
    fn insert_update_remove() {
        let mut t = Mem::new();
        let a = [203, 0, 113, 7];
        assert_eq!(insert(&mut t, &a, v(5)), Ok(Placed::Table));
        assert_eq!(t.lookup(&a), Some(v(5)));
        assert_eq!(insert(&mut t, &a, v(9)), Ok(Placed::Updated));
        assert_eq!(t.lookup(&a), Some(v(9)));
        assert_eq!(t.used(), 1);
        assert_eq!(remove(&mut t, &a), Ok(true));
        assert_eq!(t.lookup(&a), None);
        assert_eq!(remove(&mut t, &a), Ok(false));
        assert_eq!(t.used(), 0);
    }

    #[test]
    fn a_full_window_spills_and_removal_brings_the_spill_back() {
        let mut t = Mem::new();
        let h = SLOTS - 5; // the window wraps around the end
        let addrs = homed_at(h, MAX_PROBE as usize + 3);
        for (i, a) in addrs.iter().enumerate() {
            let want = if i < MAX_PROBE as usize {
                Placed::Table
            } else {
                Placed::Spilled
            };
            assert_eq!(insert(&mut t, a, v(i as u64)), Ok(want), "{i}");
        }
        assert_eq!(t.spill.len(), 3);
        for (i, a) in addrs.iter().enumerate() {
            assert_eq!(t.lookup(a), Some(v(i as u64)), "{i}");
        }
        // Each removal from the window pulls one spilled entry in.
        for (n, a) in addrs[..4].iter().enumerate() {
            assert_eq!(remove(&mut t, a), Ok(true));
            assert_eq!(t.lookup(a), None);
            assert_eq!(t.spill.len(), 2usize.saturating_sub(n));
            for (i, b) in addrs.iter().enumerate().skip(n + 1) {
                assert_eq!(t.lookup(b), Some(v(i as u64)), "{i} after removing {n}");
            }
        }
        assert_eq!(t.used(), MAX_PROBE as usize - 1);
    }

    #[test]
    fn removal_shifts_back_only_entries_that_may_move() {
        let mut t = Mem::new();
        // Two entries homed at 100, one homed at 101 that lands at 102.
        let at100 = homed_at(100, 2);
        let at101 = homed_at(101, 1);
        for a in at100.iter().chain(&at101) {
            insert(&mut t, a, v(1)).unwrap();
        }
        assert_eq!(t.key(102), key_of(&at101[0]));
        remove(&mut t, &at100[0]).unwrap();
        // at100[1] moves to 100; at101[0] moves to 101 (its home), not 100.
        assert_eq!(t.key(100), key_of(&at100[1]));
        assert_eq!(t.key(101), key_of(&at101[0]));
        assert_eq!(t.key(102), 0);
    }

    /// Random adds and removes, checked against a plain map after each step,
    /// with addresses crowded onto few home slots so windows fill and spill.
    #[test]
    fn random_operations_match_a_map() {
        let mut t = Mem::new();
        let mut model: BTreeMap<[u8; 4], BlockValue> = BTreeMap::new();
        let mut pool = Vec::new();
        for h in [0, 7, 9, 20, SLOTS - 3, SLOTS - 1] {
            pool.extend(homed_at(h, 24));
        }
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut spilled_seen = false;
        for step in 0..20_000u64 {
            let a = pool[(next() % pool.len() as u64) as usize];
            if next() % 3 == 0 {
                assert_eq!(remove(&mut t, &a), Ok(model.remove(&a).is_some()));
            } else {
                insert(&mut t, &a, v(step)).unwrap();
                model.insert(a, v(step));
            }
            spilled_seen |= !t.spill.is_empty();
            if step % 64 == 0 {
                for b in &pool {
                    assert_eq!(t.lookup(b), model.get(b).copied(), "step {step}");
                }
                assert_eq!(t.used() + t.spill.len(), model.len(), "step {step}");
            }
        }
        assert!(spilled_seen, "the pool is crowded enough to spill");
    }

    #[test]
    fn net_keys_mask_the_host_bits_and_keep_the_length() {
        let a = [10, 1, 2, 3];
        assert_eq!(net_of(net_key(&a, 24)), Some(([10, 1, 2, 0], 24)));
        assert_eq!(net_of(net_key(&a, 8)), Some(([10, 0, 0, 0], 8)));
        assert_eq!(net_of(net_key(&a, 0)), Some(([0; 4], 0)));
        assert_eq!(net_of(net_key(&a, 31)), Some(([10, 1, 2, 2], 31)));
        // The same network at two lengths: two keys, two homes.
        let (k8, k16) = (net_key(&[10, 0, 0, 0], 8), net_key(&[10, 0, 0, 0], 16));
        assert_ne!(k8, k16);
        assert_ne!(home_of::<Nets>(k8), home_of::<Nets>(k16));
        // A host key's home is the host table's hash of its address.
        assert_eq!(home_of::<Hosts>(key_of(&a)), home(&a));
        assert!(home_of::<Nets>(k8) < NET_SLOTS);
    }

    /// The CIDR table with random adds and removes of prefixes of a few
    /// lengths inside one /8 (many keys differ only in their length),
    /// checked against a plain map.
    #[test]
    fn net_table_random_operations_match_a_map() {
        let mut t = Mem::sized(NET_SLOTS);
        let mut model: BTreeMap<u64, BlockValue> = BTreeMap::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut keys = Vec::new();
        for _ in 0..3000 {
            let r = next();
            let a = [10, (r >> 8) as u8, (r >> 16) as u8, (r >> 24) as u8];
            keys.push(net_key(&a, [8, 16, 20, 24, 31][(r % 5) as usize]));
        }
        for step in 0..30_000u64 {
            let k = keys[(next() % keys.len() as u64) as usize];
            if next() % 3 == 0 {
                assert_eq!(
                    remove_key::<Nets, _>(&mut t, k),
                    Ok(model.remove(&k).is_some())
                );
            } else {
                insert_key::<Nets, _>(&mut t, k, v(step)).unwrap();
                model.insert(k, v(step));
            }
            if step % 500 == 0 {
                for k in &keys {
                    assert_eq!(
                        t.lookup_key::<Nets>(*k),
                        model.get(k).copied(),
                        "step {step}"
                    );
                }
            }
        }
        assert_eq!(t.used() + t.spill.len(), model.len());
    }
}
