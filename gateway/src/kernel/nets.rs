//! The CIDR tables in userspace, one per address family (see
//! `gateway_common::nets`): `BLOCK_NET_V4` (the open-addressed table of
//! `kernel::host`) and `BLOCK_NET_V6` (a kernel hash map), each a copy of
//! the entries of its trie's longest prefix lengths, with its descriptor in
//! `BLOCK_HINT`. [`Side`] keeps a table in line with its trie and its
//! descriptor the same way for both; [`CidrStore`] is what differs.

use anyhow::{Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError},
    Pod,
};
use gateway_common::{
    host::{self, Nets},
    nets::{self, NetKeyV6},
    BlockValue,
};

use super::host::NetTable;

/// One family's CIDR table.
pub trait CidrStore<A> {
    /// Adds the copy of `addr/len`, or replaces its value; `false` when
    /// the table has no room for it.
    fn put(&mut self, addr: &A, len: u8, v: BlockValue) -> Result<bool>;
    /// Removes the copy of `addr/len`, if there is one.
    fn take(&mut self, addr: &A, len: u8) -> Result<()>;
    /// The hits the program counted on the copy of `addr/len`.
    fn hits(&self, addr: &A, len: u8) -> u64;
    /// The entries with hits counted.
    fn counted(&self) -> Result<Vec<(A, u8, u64)>>;
    /// Empties the table. Only while the program does not read it.
    fn clear(&mut self) -> Result<()>;
}

impl CidrStore<[u8; 4]> for NetTable {
    fn put(&mut self, addr: &[u8; 4], len: u8, v: BlockValue) -> Result<bool> {
        host::insert_key::<Nets, _>(self, host::net_key(addr, len.into()), v)?;
        Ok(!self.take_overflow())
    }

    fn take(&mut self, addr: &[u8; 4], len: u8) -> Result<()> {
        host::remove_key::<Nets, _>(self, host::net_key(addr, len.into()))?;
        Ok(())
    }

    fn hits(&self, addr: &[u8; 4], len: u8) -> u64 {
        self.get(host::net_key(addr, len.into()))
            .map_or(0, |v| v.hits)
    }

    fn counted(&self) -> Result<Vec<([u8; 4], u8, u64)>> {
        Ok(self
            .used()
            .filter(|(_, v)| v.hits > 0)
            .filter_map(|(key, v)| host::net_of(key).map(|(a, len)| (a, len, v.hits)))
            .collect())
    }

    fn clear(&mut self) -> Result<()> {
        self.clear_all();
        Ok(())
    }
}

/// `BLOCK_NET_V6`.
pub struct V6Table(pub HashMap<MapData, NetKeyV6, BlockValue>);

impl CidrStore<[u8; 16]> for V6Table {
    fn put(&mut self, addr: &[u8; 16], len: u8, v: BlockValue) -> Result<bool> {
        match self.0.insert(NetKeyV6::new(addr, len.into()), v, 0) {
            Ok(()) => Ok(true),
            // The map is full: the trie answers for the family.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Ok(false)
            }
            Err(e) => Err(e).context("writing BLOCK_NET_V6"),
        }
    }

    fn take(&mut self, addr: &[u8; 16], len: u8) -> Result<()> {
        super::maps::not_found_is_false(self.0.remove(&NetKeyV6::new(addr, len.into())))
            .context("removing from BLOCK_NET_V6")?;
        Ok(())
    }

    fn hits(&self, addr: &[u8; 16], len: u8) -> u64 {
        self.0
            .get(&NetKeyV6::new(addr, len.into()), 0)
            .map_or(0, |v| v.hits)
    }

    fn counted(&self) -> Result<Vec<([u8; 16], u8, u64)>> {
        let mut out = Vec::new();
        for kv in self.0.iter() {
            let (k, v) = kv.context("reading BLOCK_NET_V6")?;
            if v.hits > 0 {
                out.push((k.addr, k.len as u8, v.hits));
            }
        }
        Ok(out)
    }

    fn clear(&mut self) -> Result<()> {
        let keys: Vec<NetKeyV6> = self
            .0
            .keys()
            .collect::<Result<_, _>>()
            .context("reading BLOCK_NET_V6")?;
        for k in keys {
            super::maps::not_found_is_false(self.0.remove(&k)).context("clearing BLOCK_NET_V6")?;
        }
        Ok(())
    }
}

/// The descriptor at `index` of the hint.
pub fn descriptor(hint: &Array<MapData, u64>, index: u32) -> Result<u64> {
    hint.get(&index, 0)
        .context("reading a CIDR table descriptor in BLOCK_HINT")
}

/// One family's trie, table and descriptor, borrowed from `KernelMaps`.
/// Every method that writes runs with the pin directory's write lock held.
pub struct Side<'a, A: Pod, T> {
    pub trie: &'a mut LpmTrie<MapData, A, BlockValue>,
    pub table: &'a mut T,
    pub hint: &'a mut Array<MapData, u64>,
    /// The descriptor's word in the hint.
    pub index: u32,
    /// Prefix lengths of the family's CIDRs are below this.
    pub limit: u8,
}

impl<A: Pod + PartialEq, T: CidrStore<A>> Side<'_, A, T> {
    pub fn descriptor(&self) -> Result<u64> {
        descriptor(self.hint, self.index)
    }

    fn set_descriptor(&mut self, d: u64) -> Result<()> {
        self.hint
            .set(self.index, d, 0)
            .context("writing a CIDR table descriptor in BLOCK_HINT")
    }

    /// Copies a CIDR block, already in the trie, into the table while the
    /// program searches the table: into the table, then (for a new table
    /// length) into the descriptor. A block shorter than the table's
    /// lengths, when they are all taken, stays in the trie alone (the
    /// descriptor says so). An entry the table cannot take (a length that
    /// belongs among the table's, no room) sends the program to the trie;
    /// the caller then rebuilds the table (`refill`).
    pub fn insert(&mut self, addr: &A, len: u8, v: BlockValue) -> Result<()> {
        let d = self.descriptor()?;
        let Some(table) = nets::lengths(d) else {
            return Ok(());
        };
        let mut table: Vec<u8> = table.collect();
        let new_length = !table.contains(&len);
        if new_length && table.len() >= nets::MAX_LENGTHS {
            if table.last().is_some_and(|shortest| len < *shortest) {
                return match d & nets::TRIE_AFTER {
                    0 => self.set_descriptor(d | nets::TRIE_AFTER),
                    _ => Ok(()),
                };
            }
            return self.to_trie();
        }
        // The trie holds the entry's own hit count (see `block_entries`).
        let v = BlockValue { hits: 0, ..v };
        if !self.table.put(addr, len, v)? {
            return self.to_trie();
        }
        if new_length {
            table.push(len);
            let d = nets::describe(&table, self.limit).context("a prefix length out of range")?;
            self.set_descriptor(d)?;
        }
        Ok(())
    }

    /// Removes the table's copy of a block, if the program reads the table.
    pub fn remove(&mut self, addr: &A, len: u8) -> Result<()> {
        if nets::lengths(self.descriptor()?).is_some() {
            self.table.take(addr, len)?;
        }
        Ok(())
    }

    /// Sends the program to the trie and empties the table, whose hit
    /// counts go to the trie's values first: while the descriptor says
    /// "trie", the table is empty (or, after a process died filling it,
    /// holds entries no search reads until the next rebuild empties it).
    pub fn to_trie(&mut self) -> Result<()> {
        if self.descriptor()? != 0 {
            self.set_descriptor(0)?;
            // A program that read the old descriptor finishes its search
            // within microseconds (XDP runs to completion under RCU).
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        for (addr, len, hits) in self.table.counted()? {
            let k = Key::new(len.into(), addr);
            match self.trie.get(&k, 0) {
                Ok(mut v) => {
                    v.hits += hits;
                    self.trie.insert(&k, v, 0).context("writing a CIDR trie")?;
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("reading a CIDR trie"),
            }
        }
        self.table.clear()
    }

    /// Brings the table back in line with the trie when the prefix lengths
    /// `want` (of the whole blocklist as the caller knows it) do not give
    /// the descriptor in place. Does nothing in the common case.
    pub fn rebuild(&mut self, mut want: Vec<u8>) -> Result<()> {
        want.sort_unstable();
        want.dedup();
        if nets::describe(&want, self.limit) == Some(self.descriptor()?) {
            return Ok(());
        }
        self.refill()
    }

    /// The program goes to the trie, the table is rebuilt from the trie
    /// (the truth, whatever another process added meanwhile) with the
    /// entries of its longest lengths, and the program comes back to the
    /// table unless an entry found no room.
    pub fn refill(&mut self) -> Result<()> {
        self.to_trie()?;
        let mut trie: Vec<(A, u8, BlockValue)> = Vec::new();
        for kv in self.trie.iter() {
            let (k, v) = kv.context("reading a CIDR trie")?;
            trie.push((k.data(), k.prefix_len() as u8, v));
        }
        let mut lengths: Vec<u8> = trie.iter().map(|(_, len, _)| *len).collect();
        lengths.sort_unstable();
        lengths.dedup();
        let d = nets::describe(&lengths, self.limit)
            .context("a CIDR trie holds a prefix as long as a host's")?;
        let table: Vec<u8> = nets::lengths(d).into_iter().flatten().collect();
        for (addr, len, v) in trie.iter().filter(|(_, len, _)| table.contains(len)) {
            let v = BlockValue { hits: 0, ..*v };
            if !self.table.put(addr, *len, v)? {
                // Too crowded for the table: the trie, with the table empty.
                return self.table.clear();
            }
        }
        self.set_descriptor(d)
    }
}
