//! IPv4 CIDR blocks without the trie walk: `BLOCK_NET_V4`, an open-addressed
//! table (`crate::host` with the [`Nets`](crate::host::Nets) shape) keyed by
//! prefix length and masked address, searched once per prefix length,
//! longest first.
//!
//! `BLOCK_V4` (the LPM trie) stays the source of truth: userspace writes it
//! first and keeps in the table a copy of the entries of the
//! [`MAX_LENGTHS`] longest prefix lengths in use. A walk of a trie holding
//! 10,000 /24s costs ~90 ns per lookup on the benchmark VM; a table search
//! at the home slot costs a bounds check and a load.
//!
//! Which of the two the program reads is the *descriptor*, one word of
//! `BLOCK_HINT` at [`crate::hint::NETS_V4_INDEX`]: bit 63 ([`TABLE`]) says
//! the table is in use, bits 0-7 how many prefix lengths it holds, bytes 1
//! to 4 those lengths, longest first, and bit 62 ([`TRIE_AFTER`]) that
//! shorter lengths are in use too, held by the trie alone. The program
//! searches the table's lengths in order and stops at the first entry it
//! finds; if none has one and [`TRIE_AFTER`] is set, it walks the trie,
//! whose longest match is then of a shorter length. Either way the longest
//! matching entry decides, as in the trie alone. A descriptor of 0 (no
//! [`TABLE`]) sends every search to the trie: before userspace has built
//! the table, and when an entry found no room in its window or a new
//! length displaced one of the table's, until userspace has rebuilt the
//! table (at the end of the insert that displaced a length; after a full
//! window, the table stays out of use until a rebuild finds room).
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

/// The descriptor for the prefix lengths in use, `lengths` (each below
/// 32, no repeats, any order): the table holds the [`MAX_LENGTHS`] longest,
/// the trie alone the rest. `None` for a length of 32 or more, or a repeat.
pub fn describe(lengths: &[u8]) -> Option<u64> {
    if lengths.iter().any(|l| *l >= 32) {
        return None;
    }
    let mut sorted = [0u8; 32];
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

/// The `i`th length of a descriptor, longest first (`i` < [`count`]).
#[inline(always)]
pub const fn length(d: u64, i: usize) -> u32 {
    ((d >> (8 * (i + 1))) & 0x1f) as u32
}

/// The lengths a descriptor lists, longest first; `None` for the trie.
pub fn lengths(d: u64) -> Option<impl Iterator<Item = u8>> {
    (d & TABLE != 0).then(|| (0..count(d).min(MAX_LENGTHS)).map(move |i| length(d, i) as u8))
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    #[test]
    fn descriptors_list_lengths_longest_first() {
        let d = describe(&[16, 24, 8]).unwrap();
        assert_ne!(d & TABLE, 0);
        assert_eq!(count(d), 3);
        assert_eq!(lengths(d).unwrap().collect::<Vec<_>>(), [24, 16, 8]);
        let empty = describe(&[]).unwrap();
        assert_eq!(lengths(empty).unwrap().count(), 0);
        assert_eq!(lengths(0).map(|l| l.count()), None, "0 is the trie");
        assert_eq!(
            describe(&[0]).map(|d| lengths(d).unwrap().collect::<Vec<_>>()),
            Some([0].into())
        );
    }

    #[test]
    fn the_table_keeps_the_longest_lengths_and_the_trie_the_rest() {
        let d = describe(&[8, 12, 16, 20, 24]).unwrap();
        assert_eq!(lengths(d).unwrap().collect::<Vec<_>>(), [24, 20, 16, 12]);
        assert_ne!(d & TRIE_AFTER, 0);
        assert_eq!(describe(&[8, 12, 16, 20]).unwrap() & TRIE_AFTER, 0);
        assert_eq!(describe(&[32]), None, "hosts live in their own table");
        assert_eq!(describe(&[24, 24]), None);
    }
}
