//! The list hints: one-bit-per-slot summaries of the blocklist and the
//! allowlist that let the XDP program skip their lookups (the host table
//! searches and the LPM trie walks) for the common case, a source no entry
//! is near.
//!
//! Each address family has 65,536 slots. An IPv4 source's slot is its /16;
//! an IPv6 source's slot is its /32 folded to 16 bits. For the blocklist
//! every slot has two bits: "a host entry may cover this slot" and "a CIDR
//! entry may cover this slot", so the program reads one word and looks in
//! the host table only if the host bit is set, in the trie only if the CIDR
//! bit is set. For the allowlist (consulted only before a drop) a slot has
//! one bit.
//!
//! A hint may say "maybe" wrongly (a stale bit after a removal, two /32s
//! folding to one slot), which only costs the lookup it would have done
//! anyway; it must never say "no" for a listed source. Userspace keeps that
//! true by setting bits before inserting an entry (and again after, see
//! `gateway::kernel::maps`), and by clearing bits only in a rebuild from the
//! whole lists. The kernel trusts the hints only once userspace has built
//! them and written [`READY`] to [`READY_INDEX`]; until then (or if a
//! lookup fails) every source gets every lookup, as before.
//!
//! Layout of the `BLOCK_HINT` array of u64 words: 2,048 blocklist words for
//! IPv4, 2,048 for IPv6, 1,024 allowlist words for IPv4, 1,024 for IPv6,
//! then the ready word and the descriptors of `BLOCK_NET_V4` and
//! `BLOCK_NET_V6` (`crate::nets`).
//! Blocklist slot `s` of a family lives in word
//! `base + s / 32`: the host bit is `s % 32`, the CIDR bit `32 + s % 32`.
//! Allowlist slot `s` is bit `s % 64` of word `base + s / 64`.

#[cfg(any(test, feature = "user"))]
use crate::cidr::Cidr;

/// Blocklist words per address family (65,536 slots, 32 per word).
pub const FAMILY_WORDS: u32 = 2048;
/// Allowlist words per address family (65,536 slots, 64 per word).
pub const ALLOW_FAMILY_WORDS: u32 = 1024;
/// First blocklist word of the IPv4 slots.
pub const V4_BASE: u32 = 0;
/// First blocklist word of the IPv6 slots.
pub const V6_BASE: u32 = FAMILY_WORDS;
/// First allowlist word of the IPv4 slots.
pub const ALLOW_V4_BASE: u32 = 2 * FAMILY_WORDS;
/// First allowlist word of the IPv6 slots.
pub const ALLOW_V6_BASE: u32 = ALLOW_V4_BASE + ALLOW_FAMILY_WORDS;
/// The word that says the hints are built and may be trusted.
pub const READY_INDEX: u32 = ALLOW_V6_BASE + ALLOW_FAMILY_WORDS;
/// The descriptor of `BLOCK_NET_V4` (`crate::nets`): which prefix lengths
/// the program searches there, or 0 for the trie.
pub const NETS_V4_INDEX: u32 = READY_INDEX + 1;
/// The descriptor of `BLOCK_NET_V6` (`crate::nets`), since schema 6.
pub const NETS_V6_INDEX: u32 = NETS_V4_INDEX + 1;
/// Entries of the `BLOCK_HINT` array.
pub const ENTRIES: u32 = NETS_V6_INDEX + 1;
/// The value of the ready word once the hints are built ("gwhint", v2).
pub const READY: u64 = 0x6777_6869_6e74_0002;

/// The slot of an IPv4 address: its /16.
#[inline(always)]
pub const fn slot_v4(a: &[u8; 4]) -> u32 {
    ((a[0] as u32) << 8) | a[1] as u32
}

/// The slot of an IPv6 address: its /32 folded to 16 bits.
#[inline(always)]
pub const fn slot_v6(a: &[u8; 16]) -> u32 {
    fold(u32::from_be_bytes([a[0], a[1], a[2], a[3]]))
}

#[inline(always)]
const fn fold(prefix32: u32) -> u32 {
    (prefix32 >> 16) ^ (prefix32 & 0xffff)
}

/// The word index of slot `slot` in the family starting at `base`.
#[inline(always)]
pub const fn word(base: u32, slot: u32) -> u32 {
    base + slot / 32
}

/// The "host entry may cover it" bit of `slot` in its word.
#[inline(always)]
pub const fn host_bit(slot: u32) -> u64 {
    1 << (slot % 32)
}

/// The "CIDR entry may cover it" bit of `slot` in its word.
#[inline(always)]
pub const fn net_bit(slot: u32) -> u64 {
    1 << (32 + slot % 32)
}

/// The allowlist word index of `slot` in the family starting at `base`.
#[inline(always)]
pub const fn allow_word(base: u32, slot: u32) -> u32 {
    base + slot / 64
}

/// The allowlist bit of `slot` in its word.
#[inline(always)]
pub const fn allow_bit(slot: u32) -> u64 {
    1 << (slot % 64)
}

/// Both hints as userspace builds them, one u64 per array entry (the ready
/// word excluded).
#[cfg(any(test, feature = "user"))]
#[derive(Clone, PartialEq, Eq)]
pub struct Hint {
    pub words: std::vec::Vec<u64>,
}

/// The set bits, as (word, bits): the whole vector is 6,144 words.
#[cfg(any(test, feature = "user"))]
impl core::fmt::Debug for Hint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_map()
            .entries(self.words.iter().enumerate().filter(|(_, w)| **w != 0))
            .finish()
    }
}

#[cfg(any(test, feature = "user"))]
impl Default for Hint {
    fn default() -> Self {
        Hint {
            words: std::vec![0; READY_INDEX as usize],
        }
    }
}

/// Which list a hint bit stands for.
#[cfg(any(test, feature = "user"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Block,
    Allow,
}

#[cfg(any(test, feature = "user"))]
impl Hint {
    /// The hints of exactly these blocklist and allowlist entries.
    pub fn of<'a, 'b>(
        block: impl IntoIterator<Item = &'a Cidr>,
        allow: impl IntoIterator<Item = &'b Cidr>,
    ) -> Hint {
        let mut h = Hint::default();
        for c in block {
            h.add(List::Block, c);
        }
        for c in allow {
            h.add(List::Allow, c);
        }
        h
    }

    /// Sets every bit a packet covered by `cidr` in `list` can land on.
    pub fn add(&mut self, list: List, cidr: &Cidr) {
        for_each_bit(list, cidr, |w, bit| self.words[w as usize] |= bit);
    }

    /// Whether the blocklist hint lets a lookup of `src` reach the host
    /// hash and the trie, as the kernel reads it: (host, CIDR).
    pub fn maybe(&self, src: &crate::packet::Source) -> (bool, bool) {
        let (base, slot) = match src {
            crate::packet::Source::V4(a) => (V4_BASE, slot_v4(a)),
            crate::packet::Source::V6(a) => (V6_BASE, slot_v6(a)),
        };
        let w = self.words[word(base, slot) as usize];
        (w & host_bit(slot) != 0, w & net_bit(slot) != 0)
    }

    /// Whether the allowlist hint lets a lookup of `src` reach the trie.
    pub fn maybe_allowed(&self, src: &crate::packet::Source) -> bool {
        let (base, slot) = match src {
            crate::packet::Source::V4(a) => (ALLOW_V4_BASE, slot_v4(a)),
            crate::packet::Source::V6(a) => (ALLOW_V6_BASE, slot_v6(a)),
        };
        self.words[allow_word(base, slot) as usize] & allow_bit(slot) != 0
    }
}

/// Calls `f(word, bit)` for every bit `cidr` needs set in `list`'s hint.
#[cfg(any(test, feature = "user"))]
fn for_each_bit(list: List, cidr: &Cidr, mut f: impl FnMut(u32, u64)) {
    let v6 = matches!(cidr, Cidr::V6 { .. });
    let mut mark = |slot: u32| match (list, v6) {
        (List::Allow, false) => f(allow_word(ALLOW_V4_BASE, slot), allow_bit(slot)),
        (List::Allow, true) => f(allow_word(ALLOW_V6_BASE, slot), allow_bit(slot)),
        (List::Block, false) if cidr.is_host() => f(word(V4_BASE, slot), host_bit(slot)),
        (List::Block, false) => f(word(V4_BASE, slot), net_bit(slot)),
        (List::Block, true) if cidr.is_host() => f(word(V6_BASE, slot), host_bit(slot)),
        (List::Block, true) => f(word(V6_BASE, slot), net_bit(slot)),
    };
    match *cidr {
        Cidr::V4 { addr, len } => {
            // A prefix of 16 bits or more sits in one slot; a shorter one
            // covers 2^(16 - len) consecutive slots.
            let first = slot_v4(&addr);
            let count = 1u32 << 16u8.saturating_sub(len);
            for s in first..first + count {
                mark(s);
            }
        }
        Cidr::V6 { addr, len } if len >= 16 => {
            // The /32 prefixes it covers: one, or 2^(32 - len) of them.
            let first = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
            let count = 1u32 << 32u8.saturating_sub(len);
            for i in 0..count {
                mark(fold(first.wrapping_add(i)));
            }
        }
        Cidr::V6 { .. } => {
            // Shorter than /16: every slot.
            for s in 0..1u32 << 16 {
                mark(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Source;
    use std::vec::Vec;

    /// xorshift64*, deterministic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn mask(addr: &mut [u8], len: u8) {
        for (i, b) in addr.iter_mut().enumerate() {
            let keep = (len as usize).saturating_sub(i * 8).min(8);
            *b &= !(0xffu16 >> keep) as u8;
        }
    }

    /// A random address inside `cidr`.
    fn inside(cidr: &Cidr, r: &mut Rng) -> Source {
        fn fill(addr: &mut [u8], len: u8, r: &mut Rng) {
            for (i, b) in addr.iter_mut().enumerate() {
                let keep = (len as usize).saturating_sub(i * 8).min(8);
                let free = (0xffu16 >> keep) as u8;
                *b = (*b & !free) | (r.next() as u8 & free);
            }
        }
        match *cidr {
            Cidr::V4 { mut addr, len } => {
                fill(&mut addr, len, r);
                Source::V4(addr)
            }
            Cidr::V6 { mut addr, len } => {
                fill(&mut addr, len, r);
                Source::V6(addr)
            }
        }
    }

    fn random_cidr(r: &mut Rng) -> Cidr {
        let bytes = r.next().to_be_bytes();
        if r.next().is_multiple_of(2) {
            let len = (r.next() % 33) as u8;
            let mut addr = [bytes[0], bytes[1], bytes[2], bytes[3]];
            mask(&mut addr, len);
            Cidr::V4 { addr, len }
        } else {
            let len = (r.next() % 129) as u8;
            let mut addr = [0u8; 16];
            addr[..8].copy_from_slice(&bytes);
            addr[8..].copy_from_slice(&r.next().to_be_bytes());
            mask(&mut addr, len);
            Cidr::V6 { addr, len }
        }
    }

    #[test]
    fn never_says_no_for_a_covered_address() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3_000 {
            let c = random_cidr(&mut r);
            let h = Hint::of([&c], None);
            let a = Hint::of(None, [&c]);
            for _ in 0..20 {
                let src = inside(&c, &mut r);
                let (host, net) = h.maybe(&src);
                assert!(
                    if c.is_host() { host } else { net },
                    "{c} covers {src:?}, the hint says (host {host}, cidr {net})"
                );
                assert!(a.maybe_allowed(&src), "{c} allows {src:?}");
            }
        }
    }

    #[test]
    fn an_unrelated_source_is_skipped() {
        let block: Vec<Cidr> = ["45.1.2.3", "80.0.1.0/24", "2a01::5", "2a02:0:1::/48"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let h = Hint::of(&block, None);
        assert_eq!(h.maybe(&Source::V4([10, 0, 0, 1])), (false, false));
        assert_eq!(h.maybe(&Source::V4([45, 1, 9, 9])), (true, false));
        assert_eq!(h.maybe(&Source::V4([80, 0, 200, 1])), (false, true));
        let v6: [u8; 16] = "2001:db8::1"
            .parse::<core::net::Ipv6Addr>()
            .unwrap()
            .octets();
        assert_eq!(h.maybe(&Source::V6(v6)), (false, false));
        // Only the slot bits of these four entries are set.
        let set: u32 = h.words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, 4);
    }

    #[test]
    fn short_prefixes_cover_every_slot_they_span() {
        let h = Hint::of([&"10.0.0.0/8".parse::<Cidr>().unwrap()], None);
        let set: u32 = h.words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, 256, "a /8 spans 256 /16 slots");
        let all = Hint::of([&"::/0".parse::<Cidr>().unwrap()], None);
        let v6: u32 = all.words[V6_BASE as usize..ALLOW_V4_BASE as usize]
            .iter()
            .map(|w| w.count_ones())
            .sum();
        assert_eq!(v6, 65_536, "::/0 covers every IPv6 slot");
    }

    #[test]
    fn the_top_of_the_address_space() {
        for c in ["255.254.0.0/15", "ffff::/16", "ffff:fff0::/28"] {
            let c: Cidr = c.parse().unwrap();
            let mut r = Rng(3);
            let h = Hint::of([&c], None);
            for _ in 0..100 {
                assert!(h.maybe(&inside(&c, &mut r)).1, "{c}");
            }
        }
    }

    #[test]
    fn the_lists_have_separate_bits() {
        let c: Cidr = "198.51.100.0/24".parse().unwrap();
        let src = Source::V4([198, 51, 100, 7]);
        let block = Hint::of([&c], None);
        let allow = Hint::of(None, [&c]);
        assert_eq!(
            (block.maybe(&src), block.maybe_allowed(&src)),
            ((false, true), false)
        );
        assert_eq!(
            (allow.maybe(&src), allow.maybe_allowed(&src)),
            ((false, false), true)
        );
        let set = |h: &Hint| h.words.iter().map(|w| w.count_ones()).sum::<u32>();
        assert_eq!((set(&block), set(&allow)), (1, 1));
        assert_eq!(Hint::of([&c], [&c]).words.len(), READY_INDEX as usize);
    }
}
