//! The maps of the XDP program. Names, key and value layouts are the
//! contract in `gateway_common::maps`; userspace pins them by name.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray},
};
use gateway_common::{
    capacity, host, host::HostSlot, nets::NetKeyV6, BlockValue, Bucket, Counter, Limits, Reason,
    SourceBucket, SourceKey,
};

#[map]
pub static ALLOW_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(capacity::ALLOW, 0);
#[map]
pub static ALLOW_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(capacity::ALLOW, 0);

#[map]
pub static BLOCK_V4: LpmTrie<[u8; 4], BlockValue> =
    LpmTrie::with_max_entries(capacity::BLOCK_CIDR, 0);
#[map]
pub static BLOCK_V6: LpmTrie<[u8; 16], BlockValue> =
    LpmTrie::with_max_entries(capacity::BLOCK_CIDR, 0);

/// Bits per address slot saying whether a blocklist or allowlist lookup
/// can hit (`gateway_common::hint`).
#[map]
pub static BLOCK_HINT: Array<u64> = Array::with_max_entries(gateway_common::hint::ENTRIES, 0);

/// Exact IPv4 blocks (/32): an open-addressed table (`gateway_common::host`)
/// that userspace writes through a memory mapping.
#[map]
pub static BLOCK_HOST_V4: Array<HostSlot> = Array::with_max_entries(host::SLOTS, BPF_F_MMAPABLE);
/// The /32 blocks whose window in `BLOCK_HOST_V4` is full.
#[map]
pub static BLOCK_HOST_V4_SPILL: HashMap<[u8; 4], BlockValue> =
    HashMap::with_max_entries(capacity::BLOCK_HOST_V4_SPILL, 0);
/// IPv4 CIDR blocks (below /32), a copy of `BLOCK_V4` searched per prefix
/// length (`gateway_common::nets`), written by userspace through a mapping.
#[map]
pub static BLOCK_NET_V4: Array<HostSlot> = Array::with_max_entries(host::NET_SLOTS, BPF_F_MMAPABLE);
/// IPv6 CIDR blocks (below /128), a copy of `BLOCK_V6` looked up per
/// prefix length (`gateway_common::nets`).
#[map]
pub static BLOCK_NET_V6: HashMap<NetKeyV6, BlockValue> =
    HashMap::with_max_entries(capacity::BLOCK_NET_V6, 0);
/// Exact IPv6 blocks (/128): one hash lookup instead of a trie walk.
#[map]
pub static BLOCK_HOST_V6: HashMap<[u8; 16], BlockValue> =
    HashMap::with_max_entries(capacity::BLOCK_HOST_V6, 0);

#[map]
pub static SYN_BUCKETS: LruHashMap<SourceKey, SourceBucket> =
    LruHashMap::with_max_entries(capacity::SYN_BUCKETS, 0);
/// Source key -> when userspace last saw it complete a handshake (ktime ns).
#[map]
pub static SYN_TRUSTED: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(capacity::SYN_TRUSTED, 0);
#[map]
pub static SYN_GLOBAL: Array<Bucket> = Array::with_max_entries(1, 0);

#[map]
pub static LIMITS: Array<Limits> = Array::with_max_entries(1, 0);
#[map]
pub static PORTS: Array<u32> = Array::with_max_entries(capacity::PORTS, 0);

#[map]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
#[map]
pub static TOP_SOURCES: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(capacity::TOP_SOURCES, 0);
