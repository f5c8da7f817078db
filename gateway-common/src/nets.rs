//! IPv4 CIDR blocks without the trie walk: `BLOCK_NET_V4`, an open-addressed
//! table (`crate::host` with the [`Nets`](crate::host::Nets) shape) keyed by
//! prefix length and masked address, searched once per prefix length in
//! use, longest first.
//!
//! `BLOCK_V4` (the LPM trie) stays the source of truth: userspace writes it
//! first and keeps the table a copy. A walk of a trie holding 10,000 /24s
//! costs ~90 ns per lookup on the benchmark VM; a table search at the home
//! slot costs a bounds check and a load. Blocklists in the field use few
//! prefix lengths, so the program searches at most [`MAX_LENGTHS`] of them;
//! beyond that, or when an entry finds no room in its window, userspace
//! sends the program back to the trie.
//!
//! Which of the two the program reads is the *descriptor*, one word of
//! `BLOCK_HINT` at [`crate::hint::NETS_V4_INDEX`]: bit 63 ([`TABLE`]) says the
//! table holds every IPv4 CIDR of the trie, bits 0-7 how many prefix
//! lengths are in use, and bytes 1 to 4 those lengths, longest first. The
//! search stops at the first length that has an entry for the source: the
//! longest matching entry decides, as in the trie.
//!
//! Userspace keeps the descriptor honest with its order of writes: an entry
//! of a new length goes into the table before its length goes into the
//! descriptor; a change the table cannot take clears [`TABLE`] before
//! anything else; and the table is rebuilt only while [`TABLE`] is clear.

/// The table holds every IPv4 CIDR block of `BLOCK_V4`.
pub const TABLE: u64 = 1 << 63;
/// Prefix lengths the program searches at most.
pub const MAX_LENGTHS: usize = 4;

/// The descriptor for a table in use with `lengths` (at most
/// [`MAX_LENGTHS`], each below 32, no repeats); `None` when there are too
/// many lengths for the program to search.
pub fn describe(lengths: &[u8]) -> Option<u64> {
    if lengths.len() > MAX_LENGTHS || lengths.iter().any(|l| *l >= 32) {
        return None;
    }
    let mut sorted = [0u8; MAX_LENGTHS];
    sorted[..lengths.len()].copy_from_slice(lengths);
    sorted[..lengths.len()].sort_unstable_by(|a, b| b.cmp(a));
    if sorted[..lengths.len()].windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let mut d = TABLE | lengths.len() as u64;
    for (i, l) in sorted[..lengths.len()].iter().enumerate() {
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
    fn too_many_or_bad_lengths_mean_the_trie() {
        assert_eq!(describe(&[8, 12, 16, 20, 24]), None);
        assert_eq!(describe(&[32]), None, "hosts live in their own table");
        assert_eq!(describe(&[24, 24]), None);
    }
}
