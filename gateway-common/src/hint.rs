//! The block hint: a one-bit-per-slot summary of the blocklist that lets
//! the XDP program skip both blocklist lookups (the host hash and the LPM
//! trie walk) for the common case, a source that nothing blocked is near.
//!
//! Each address family has 65,536 slots. An IPv4 source's slot is its /16;
//! an IPv6 source's slot is its /32 folded to 16 bits. Every slot has two
//! bits: "a host entry may cover this slot" and "a CIDR entry may cover
//! this slot". The XDP program reads one word, and looks in the host hash
//! only if the host bit is set, in the trie only if the CIDR bit is set.
//!
//! The hint may say "maybe" wrongly (a stale bit after a removal, two /32s
//! folding to one slot), which only costs the lookup it would have done
//! anyway; it must never say "no" for a blocked source. Userspace keeps that
//! true by setting bits before inserting an entry (and again after, see
//! `gateway::kernel::maps`), and by clearing bits only in a rebuild from the
//! whole blocklist. The kernel trusts the hint only once userspace has
//! built it and written [`READY`] to [`READY_INDEX`]; until then (or if the
//! lookup fails) every source gets both lookups, as before.
//!
//! Layout of the `BLOCK_HINT` array of u64 words: 2,048 words for IPv4, then
//! 2,048 for IPv6, then the ready word. Slot `s` of a family lives in word
//! `base + s / 32`: the host bit is `s % 32`, the CIDR bit is `32 + s % 32`.

#[cfg(any(test, feature = "user"))]
use crate::cidr::Cidr;

/// Words per address family (65,536 slots, 32 per word).
pub const FAMILY_WORDS: u32 = 2048;
/// First word of the IPv4 slots.
pub const V4_BASE: u32 = 0;
/// First word of the IPv6 slots.
pub const V6_BASE: u32 = FAMILY_WORDS;
/// The word that says the hint is built and may be trusted.
pub const READY_INDEX: u32 = 2 * FAMILY_WORDS;
/// Entries of the `BLOCK_HINT` array.
pub const ENTRIES: u32 = READY_INDEX + 1;
/// The value of the ready word once the hint is built ("gwhint", v1).
pub const READY: u64 = 0x6777_6869_6e74_0001;

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

/// The hint as userspace builds it, one u64 per array entry (the ready word
/// excluded).
#[cfg(any(test, feature = "user"))]
#[derive(Clone, PartialEq, Eq)]
pub struct Hint {
    pub words: std::vec::Vec<u64>,
}

/// The set bits, as (word, bits): the whole vector is 4,096 words.
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

#[cfg(any(test, feature = "user"))]
impl Hint {
    /// The hint of exactly `entries`.
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a Cidr>) -> Hint {
        let mut h = Hint::default();
        for c in entries {
            h.add(c);
        }
        h
    }

    /// Sets every bit a packet covered by `cidr` can land on.
    pub fn add(&mut self, cidr: &Cidr) {
        for_each_bit(cidr, |w, bit| self.words[w as usize] |= bit);
    }

    /// The words `cidr` needs, with the bits it needs in each (ascending).
    pub fn marks(cidr: &Cidr) -> std::vec::Vec<(u32, u64)> {
        let mut out: std::vec::Vec<(u32, u64)> = std::vec::Vec::new();
        for_each_bit(cidr, |w, bit| match out.last_mut() {
            Some((last, m)) if *last == w => *m |= bit,
            _ => out.push((w, bit)),
        });
        out.sort_unstable_by_key(|(w, _)| *w);
        out.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 |= b.1;
                true
            } else {
                false
            }
        });
        out
    }

    /// Whether the hint lets a lookup of `src` reach the host hash and the
    /// trie, as the kernel reads it: (host, CIDR).
    pub fn maybe(&self, src: &crate::packet::Source) -> (bool, bool) {
        let (base, slot) = match src {
            crate::packet::Source::V4(a) => (V4_BASE, slot_v4(a)),
            crate::packet::Source::V6(a) => (V6_BASE, slot_v6(a)),
        };
        let w = self.words[word(base, slot) as usize];
        (w & host_bit(slot) != 0, w & net_bit(slot) != 0)
    }
}

/// Calls `f(word, bit)` for every bit `cidr` needs set.
#[cfg(any(test, feature = "user"))]
fn for_each_bit(cidr: &Cidr, mut f: impl FnMut(u32, u64)) {
    match *cidr {
        Cidr::V4 { addr, len: 32 } => {
            let s = slot_v4(&addr);
            f(word(V4_BASE, s), host_bit(s));
        }
        Cidr::V4 { addr, len } => {
            // A prefix of 16 bits or more sits in one slot; a shorter one
            // covers 2^(16 - len) consecutive slots.
            let first = slot_v4(&addr);
            let count = 1u32 << 16u8.saturating_sub(len);
            for s in first..first + count {
                f(word(V4_BASE, s), net_bit(s));
            }
        }
        Cidr::V6 { addr, len: 128 } => {
            let s = slot_v6(&addr);
            f(word(V6_BASE, s), host_bit(s));
        }
        Cidr::V6 { addr, len } if len >= 16 => {
            // The /32 prefixes it covers: one, or 2^(32 - len) of them.
            let first = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
            let count = 1u32 << 32u8.saturating_sub(len);
            for i in 0..count {
                let s = fold(first.wrapping_add(i));
                f(word(V6_BASE, s), net_bit(s));
            }
        }
        Cidr::V6 { .. } => {
            // Shorter than /16: every slot.
            for s in 0..1u32 << 16 {
                f(word(V6_BASE, s), net_bit(s));
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
            let h = Hint::of([&c]);
            for _ in 0..20 {
                let src = inside(&c, &mut r);
                let (host, net) = h.maybe(&src);
                assert!(
                    if c.is_host() { host } else { net },
                    "{c} covers {src:?}, the hint says (host {host}, cidr {net})"
                );
            }
        }
    }

    #[test]
    fn an_unrelated_source_is_skipped() {
        let block: Vec<Cidr> = ["45.1.2.3", "80.0.1.0/24", "2a01::5", "2a02:0:1::/48"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let h = Hint::of(&block);
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
        let h = Hint::of([&"10.0.0.0/8".parse::<Cidr>().unwrap()]);
        let set: u32 = h.words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, 256, "a /8 spans 256 /16 slots");
        let all = Hint::of([&"::/0".parse::<Cidr>().unwrap()]);
        let v6: u32 = all.words[V6_BASE as usize..]
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
            let h = Hint::of([&c]);
            for _ in 0..100 {
                assert!(h.maybe(&inside(&c, &mut r)).1, "{c}");
            }
        }
    }

    #[test]
    fn marks_match_add() {
        let mut r = Rng(7);
        for _ in 0..500 {
            let c = random_cidr(&mut r);
            let mut h = Hint::default();
            for (w, m) in Hint::marks(&c) {
                h.words[w as usize] |= m;
            }
            assert!(h == Hint::of([&c]), "{c}");
            let words: Vec<u32> = Hint::marks(&c).iter().map(|(w, _)| *w).collect();
            assert!(words.windows(2).all(|p| p[0] < p[1]), "one entry per word");
        }
    }
}
