//! CIDR blocks without the trie walk, one table per address family,
//! searched once per prefix length, longest first:
//!
//! - `BLOCK_NET_V4`, an open-addressed table (`crate::host` with the
//!   [`Nets`](crate::host::Nets) shape) keyed by prefix length and masked
//!   address;
//! - `BLOCK_NET_V6` (schema 6), a kernel hash map keyed by [`NetKeyV6`]:
//!   an IPv6 prefix does not fit the 64-bit keys of the open-addressed
//!   table, and a hash lookup of a 24-byte key (~25-30 ns) is still a
//!   fraction of a walk of the IPv6 trie (~130 ns with 5,000 /48s).
//!
//! The LPM tries (`BLOCK_V4`, `BLOCK_V6`) stay the source of truth:
//! userspace writes them first and keeps in the table a copy of the entries
//! of the [`MAX_LENGTHS`] longest prefix lengths in use. A walk of a trie
//! holding 10,000 /24s costs ~90 ns per lookup on the benchmark VM; a table
//! search at the home slot costs a bounds check and a load.
//!
//! Which of the two the program reads is the *descriptor*, one word of
//! `BLOCK_HINT` per family ([`crate::hint::NETS_V4_INDEX`],
//! [`crate::hint::NETS_V6_INDEX`]): bit 63 ([`TABLE`]) says the table is
//! in use, bits 0-7 how many prefix lengths it holds, bytes 1 to 4 those
//! lengths, longest first, and bit 62 ([`TRIE_AFTER`]) that shorter
//! lengths are in use too, held by the trie alone. The program searches
//! the table's lengths in order and stops at the first entry it finds; if
//! none has one and [`TRIE_AFTER`] is set, it walks the trie, whose longest
//! match is then of a shorter length. Either way the longest matching entry
//! decides, as in the trie alone. A descriptor of 0 (no [`TABLE`]) sends
//! every search to the trie: before userspace has built the table, and
//! when an entry found no room or a new length displaced one of the
//! table's, until userspace has rebuilt the table (at the end of the insert
//! that displaced a length; after the table ran out of room, it stays out
//! of use until a rebuild finds room).
//!
//! Userspace keeps the descriptor honest with its order of writes: an entry
//! of a new table length goes into the table before its length goes into
//! the descriptor; a change the table cannot take clears [`TABLE`] before
//! anything else; and the table is rebuilt only while [`TABLE`] is clear.

/// The table is in use.
pub const TABLE: u64 = 1 << 63;
/// Prefix lengths shorter than the table's are in use: a search that finds
/// nothing in the table walks the trie.
pub const TRIE_AFTER: u64 = 1 << 62;
/// Prefix lengths the table holds at most.
pub const MAX_LENGTHS: usize = 4;

/// Prefix lengths of IPv4 CIDR blocks are below this (/32 are hosts).
pub const V4_LIMIT: u8 = 32;
/// Prefix lengths of IPv6 CIDR blocks are below this (/128 are hosts).
pub const V6_LIMIT: u8 = 128;

/// The descriptor for the prefix lengths in use, `lengths` (each below
/// `limit`, [`V4_LIMIT`] or [`V6_LIMIT`], no repeats, any order): the
/// table holds the [`MAX_LENGTHS`] longest, the trie alone the rest.
/// `None` for a length of `limit` or more, or a repeat.
pub fn describe(lengths: &[u8], limit: u8) -> Option<u64> {
    if lengths.len() > V6_LIMIT as usize || lengths.iter().any(|l| *l >= limit) {
        return None;
    }
    let mut sorted = [0u8; V6_LIMIT as usize];
    let sorted = &mut sorted[..lengths.len()];
    sorted.copy_from_slice(lengths);
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let n = sorted.len().min(MAX_LENGTHS);
    let mut d = TABLE | n as u64;
    if sorted.len() > MAX_LENGTHS {
        d |= TRIE_AFTER;
    }
    for (i, l) in sorted[..n].iter().enumerate() {
        d |= (*l as u64) << (8 * (i + 1));
    }
    Some(d)
}

/// How many lengths a descriptor in use lists (0 for the trie: check
/// [`TABLE`] first).
#[inline(always)]
pub const fn count(d: u64) -> usize {
    (d & 0xff) as usize
}

/// The `i`th length of an IPv4 descriptor, longest first (`i` <
/// [`count`]), bounded below 32 for the program's shifts.
#[inline(always)]
pub const fn length(d: u64, i: usize) -> u32 {
    ((d >> (8 * (i + 1))) & 0x1f) as u32
}

/// The `i`th length of an IPv6 descriptor, bounded below 128.
#[inline(always)]
pub const fn length_v6(d: u64, i: usize) -> u32 {
    ((d >> (8 * (i + 1))) & 0x7f) as u32
}

/// The lengths a descriptor lists, longest first; `None` for the trie.
pub fn lengths(d: u64) -> Option<impl Iterator<Item = u8>> {
    (d & TABLE != 0)
        .then(|| (0..count(d).min(MAX_LENGTHS)).map(move |i| (d >> (8 * (i + 1))) as u8))
}

/// The key of an IPv6 prefix in `BLOCK_NET_V6`: the address with the bits
/// past `len` cleared, and the length. Aligned to 8 so the mask is applied
/// a word at a time to the key's own copy of the address (indexing the
/// source address byte by byte made LLVM keep it in single bytes, which
/// the verifier refused).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetKeyV6 {
    pub addr: [u8; 16],
    pub len: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<NetKeyV6>() == 24);

impl NetKeyV6 {
    /// The key of the `len`-bit prefix (`len` < 128) of `a`: any address
    /// inside the prefix gives it.
    #[inline(always)]
    pub fn new(a: &[u8; 16], len: u32) -> NetKeyV6 {
        let len = len & 0x7f;
        let mut k = NetKeyV6 {
            addr: *a,
            len,
            _pad: 0,
        };
        // The words hold the address's bytes in network order, so the
        // masks are byte-swapped (to_be) to clear the same bytes.
        let w = &mut k.addr as *mut [u8; 16] as *mut [u64; 2];
        // SAFETY: `addr` is the first field of an 8-aligned struct, so
        // its 16 bytes are two aligned u64s; any bit pattern is valid.
        unsafe {
            (*w)[0] &= high_bits(len).to_be();
            (*w)[1] &= high_bits(len.saturating_sub(64)).to_be();
        }
        k
    }
}

/// A u64 with its `n` highest bits set (`n` >= 64: all).
#[inline(always)]
const fn high_bits(n: u32) -> u64 {
    if n == 0 {
        0
    } else if n >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - n)
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    #[test]
    fn descriptors_list_lengths_longest_first() {
        let d = describe(&[16, 24, 8], V4_LIMIT).unwrap();
        assert_ne!(d & TABLE, 0);
        assert_eq!(count(d), 3);
        assert_eq!(lengths(d).unwrap().collect::<Vec<_>>(), [24, 16, 8]);
        assert_eq!(
            (0..3).map(|i| length(d, i)).collect::<Vec<_>>(),
            [24, 16, 8]
        );
        let empty = describe(&[], V4_LIMIT).unwrap();
        assert_eq!(lengths(empty).unwrap().count(), 0);
        assert_eq!(lengths(0).map(|l| l.count()), None, "0 is the trie");
        assert_eq!(
            describe(&[0], V4_LIMIT).map(|d| lengths(d).unwrap().collect::<Vec<_>>()),
            Some([0].into())
        );
        let v6 = describe(&[48, 127, 32, 64, 56], V6_LIMIT).unwrap();
        assert_eq!(lengths(v6).unwrap().collect::<Vec<_>>(), [127, 64, 56, 48]);
        assert_eq!(
            (0..4).map(|i| length_v6(v6, i)).collect::<Vec<_>>(),
            [127, 64, 56, 48]
        );
        assert_ne!(v6 & TRIE_AFTER, 0);
    }

    #[test]
    fn the_table_keeps_the_longest_lengths_and_the_trie_the_rest() {
        let d = describe(&[8, 12, 16, 20, 24], V4_LIMIT).unwrap();
        assert_eq!(lengths(d).unwrap().collect::<Vec<_>>(), [24, 20, 16, 12]);
        assert_ne!(d & TRIE_AFTER, 0);
        assert_eq!(
            describe(&[8, 12, 16, 20], V4_LIMIT).unwrap() & TRIE_AFTER,
            0
        );
        assert_eq!(
            describe(&[32], V4_LIMIT),
            None,
            "hosts live in their own table"
        );
        assert_eq!(describe(&[128], V6_LIMIT), None);
        assert_eq!(describe(&[24, 24], V4_LIMIT), None);
        let all: Vec<u8> = (0..128).collect();
        assert!(describe(&all, V6_LIMIT).is_some());
    }

    #[test]
    fn ipv6_keys_clear_the_bits_past_the_prefix() {
        let a = [
            0x20, 0x01, 0x0d, 0xb8, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4,
        ];
        let bits = |k: NetKeyV6| u128::from_be_bytes(k.addr);
        let whole = u128::from_be_bytes(a);
        for len in 0..128u32 {
            let k = NetKeyV6::new(&a, len);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            assert_eq!((bits(k), k.len), (whole & mask, len), "/{len}");
        }
        // Any address inside the prefix gives the same key.
        let mut b = a;
        b[6] ^= 0xff;
        assert_eq!(NetKeyV6::new(&a, 48), NetKeyV6::new(&b, 48));
        assert_ne!(NetKeyV6::new(&a, 56), NetKeyV6::new(&b, 56));
    }
}
