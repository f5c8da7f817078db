//! Map names, keys and values of the kernel fast path (DESIGN.md section 4).
//!
//! Keys are network-order byte arrays so the kernel and userspace cannot
//! disagree about byte order. Every value type is `#[repr(C)]`, `Copy`, built
//! from fixed-width integers with explicit padding, and size-checked at
//! compile time.

/// Layout version of the pinned maps; pinned under `<pin_dir>/v<SCHEMA>/`.
/// Bump whenever a key or value layout below changes.
pub const SCHEMA_VERSION: u32 = 7;

/// Name of the XDP program inside the object.
pub const XDP_PROGRAM: &str = "gateway_xdp";

/// Map names (part of the contract: the CLI opens them by these pin names).
pub mod names {
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const BLOCK_V4: &str = "BLOCK_V4";
    pub const BLOCK_V6: &str = "BLOCK_V6";
    pub const BLOCK_HOST_V4: &str = "BLOCK_HOST_V4";
    pub const BLOCK_HOST_V6: &str = "BLOCK_HOST_V6";
    pub const SYN_BUCKETS: &str = "SYN_BUCKETS";
    pub const SYN_GLOBAL: &str = "SYN_GLOBAL";
    pub const LIMITS: &str = "LIMITS";
    pub const PORTS: &str = "PORTS";
    pub const STATS: &str = "STATS";
    pub const TOP_SOURCES: &str = "TOP_SOURCES";
    /// The blocklist summary (`crate::hint`), since schema 2.
    pub const BLOCK_HINT: &str = "BLOCK_HINT";
    /// Sources that completed a handshake lately, since schema 2.
    pub const SYN_TRUSTED: &str = "SYN_TRUSTED";
    /// The /32 blocks that found no room in `BLOCK_HOST_V4` (an array
    /// since schema 4, see `crate::host`).
    pub const BLOCK_HOST_V4_SPILL: &str = "BLOCK_HOST_V4_SPILL";
    /// A copy of the IPv4 CIDR blocks of `BLOCK_V4` the program searches
    /// per prefix length, since schema 5 (see `crate::nets`).
    pub const BLOCK_NET_V4: &str = "BLOCK_NET_V4";
    /// A copy of the IPv6 CIDR blocks of `BLOCK_V6` the program looks up
    /// per prefix length, since schema 6 (see `crate::nets`).
    pub const BLOCK_NET_V6: &str = "BLOCK_NET_V6";

    /// Every map the XDP program pins, in a stable order.
    pub const ALL: [&str; 17] = [
        ALLOW_V4,
        ALLOW_V6,
        BLOCK_V4,
        BLOCK_V6,
        BLOCK_HOST_V4,
        BLOCK_HOST_V6,
        SYN_BUCKETS,
        SYN_GLOBAL,
        LIMITS,
        PORTS,
        STATS,
        TOP_SOURCES,
        BLOCK_HINT,
        SYN_TRUSTED,
        BLOCK_HOST_V4_SPILL,
        BLOCK_NET_V4,
        BLOCK_NET_V6,
    ];
}

/// Capacities. The LPM tries and the host hashes are sized for large feeds
/// (the benchmark loads 100,000 entries); LPM tries allocate on insert only.
pub mod capacity {
    pub const ALLOW: u32 = 16_384;
    pub const BLOCK_CIDR: u32 = 262_144;
    /// IPv4 /32 blocks; the table has twice as many slots (`crate::host`).
    pub const BLOCK_HOST_V4: u32 = 262_144;
    /// /32 blocks whose table window is full: about one in 10,000 at
    /// `BLOCK_HOST_V4` entries, so this is ample.
    pub const BLOCK_HOST_V4_SPILL: u32 = 16_384;
    pub const BLOCK_HOST_V6: u32 = 131_072;
    /// IPv6 CIDR blocks of the prefix lengths `BLOCK_NET_V6` holds; past
    /// this the program walks the trie for them (see `crate::nets`).
    pub const BLOCK_NET_V6: u32 = 131_072;
    pub const SYN_BUCKETS: u32 = 262_144;
    pub const TOP_SOURCES: u32 = 8_192;
    pub const SYN_TRUSTED: u32 = 65_536;
    /// One slot per TCP port, indexed by the port in host order.
    pub const PORTS: u32 = 65_536;
}

/// Why the XDP program passed or dropped a packet: the index into `STATS`.
/// Every packet is counted under exactly one reason, so the counters add up
/// to the packets the program saw.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// IP traffic that matched no rule.
    Pass = 0,
    /// Source is allowlisted, and that saved it from a drop (a block or a
    /// spent SYN budget): the allowlist is consulted only on the way to a
    /// drop, so an allowlisted source's ordinary packets count as `Pass`.
    Allowlist = 1,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): never touched.
    NotIp = 2,
    /// IP header too short to read the addresses: passed, the kernel's IP
    /// layer discards it anyway.
    Unparsed = 3,
    /// Non-first fragment: address checks only, then passed.
    Fragment = 4,
    /// TCP SYN to a protected port that the buckets admitted.
    SynPass = 5,
    /// Dropped: source in the blocklist.
    Blocklist = 6,
    /// Dropped: the source's SYN bucket is empty.
    SynRate = 7,
    /// Dropped: the global SYN budget is empty.
    SynGlobal = 8,
    /// Dropped: invalid IP/TCP header aimed at a protected port.
    Malformed = 9,
}

impl Reason {
    pub const COUNT: u32 = 10;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Pass,
        Reason::Allowlist,
        Reason::NotIp,
        Reason::Unparsed,
        Reason::Fragment,
        Reason::SynPass,
        Reason::Blocklist,
        Reason::SynRate,
        Reason::SynGlobal,
        Reason::Malformed,
    ];

    /// Stable label used by the CLI, JSON output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Pass => "pass",
            Reason::Allowlist => "allowlist",
            Reason::NotIp => "not_ip",
            Reason::Unparsed => "unparsed",
            Reason::Fragment => "fragment",
            Reason::SynPass => "syn_pass",
            Reason::Blocklist => "blocklist",
            Reason::SynRate => "syn_rate",
            Reason::SynGlobal => "syn_global",
            Reason::Malformed => "malformed",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::Blocklist | Reason::SynRate | Reason::SynGlobal | Reason::Malformed
        )
    }
}

/// Value of the blocklist maps (`BLOCK_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockValue {
    /// `CLOCK_MONOTONIC` time (ns) at which the entry lapses; 0 = permanent.
    /// Checked by the kernel, so bans expire without userspace.
    pub expires_ns: u64,
    /// Packets this entry dropped, counted by the kernel with an atomic add
    /// on the value it already looked up (no extra map access per drop).
    pub hits: u64,
}

impl BlockValue {
    pub const fn permanent() -> Self {
        BlockValue {
            expires_ns: 0,
            hits: 0,
        }
    }

    pub const fn until(expires_ns: u64) -> Self {
        BlockValue {
            expires_ns,
            hits: 0,
        }
    }

    #[inline(always)]
    pub const fn active(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// The global SYN budget (`SYN_GLOBAL[0]`, schema 7): its bucket's
/// theoretical arrival time, in [`crate::bucket`] units. Zero (never used)
/// is a full bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat: u64,
}

/// `SYN_BUCKETS` values (schema 7): a source key's bucket (its theoretical
/// arrival time, [`crate::bucket`]) and how many of its SYNs the bucket
/// refused. The refusals reach `TOP_SOURCES` in batches
/// ([`crate::bucket::rank_credit`]), so a flooding source costs one
/// `TOP_SOURCES` update per batch instead of one per dropped SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceBucket {
    pub tat: u64,
    /// SYNs refused since the bucket was created.
    pub refused: u64,
}

/// Runtime limits (`LIMITS[0]`), written by userspace, read per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// New connections per second per source; 0 disables the per-source limit.
    pub syn_rate: u64,
    /// Per-source bucket depth (SYNs accepted back to back).
    pub syn_burst: u64,
    /// Derived: [`crate::bucket::interval`] of `syn_rate`.
    pub syn_interval: u64,
    /// Derived: [`crate::bucket::tolerance`] of `syn_rate` and `syn_burst`.
    pub syn_tolerance: u64,
    /// SYNs per second from all sources together; 0 disables the budget.
    pub global_rate: u64,
    /// Global bucket depth.
    pub global_burst: u64,
    /// Derived, as for the per-source bucket.
    pub global_interval: u64,
    pub global_tolerance: u64,
    /// Mask applied to an IPv6 source to form its bucket key (from ipv6_prefix).
    pub v6_mask: [u8; 16],
    /// Mask applied to an IPv4 source to form its bucket key (from ipv4_prefix).
    pub v4_mask: [u8; 4],
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub _pad: [u8; 2],
}

impl Limits {
    /// Builds limits with the derived fields filled in. Rates and bursts are
    /// clamped to [`crate::bucket::MAX_RATE`] so the kernel arithmetic cannot
    /// overflow.
    pub fn new(
        syn_rate: u64,
        syn_burst: u64,
        global_rate: u64,
        ipv4_prefix: u8,
        ipv6_prefix: u8,
    ) -> Self {
        use crate::bucket::{interval, tolerance, MAX_RATE};
        let syn_rate = if syn_rate > MAX_RATE {
            MAX_RATE
        } else {
            syn_rate
        };
        let syn_burst = if syn_burst > MAX_RATE {
            MAX_RATE
        } else {
            syn_burst
        };
        let global_rate = if global_rate > MAX_RATE {
            MAX_RATE
        } else {
            global_rate
        };
        // The global budget holds one second's worth of SYNs.
        let global_burst = global_rate;
        let ipv4_prefix = if ipv4_prefix > 32 { 32 } else { ipv4_prefix };
        let ipv6_prefix = if ipv6_prefix > 128 { 128 } else { ipv6_prefix };
        let mut v4_mask = [0u8; 4];
        prefix_mask(&mut v4_mask, ipv4_prefix);
        let mut v6_mask = [0u8; 16];
        prefix_mask(&mut v6_mask, ipv6_prefix);
        Limits {
            syn_rate,
            syn_burst,
            syn_interval: interval(syn_rate),
            syn_tolerance: tolerance(syn_rate, syn_burst),
            global_rate,
            global_burst,
            global_interval: interval(global_rate),
            global_tolerance: tolerance(global_rate, global_burst),
            v6_mask,
            v4_mask,
            ipv4_prefix,
            ipv6_prefix,
            _pad: [0; 2],
        }
    }
}

/// Sets the first `prefix` bits of `mask` and clears the rest.
pub fn prefix_mask(mask: &mut [u8], prefix: u8) {
    let mut left = prefix as usize;
    for b in mask.iter_mut() {
        *b = match left {
            0 => 0,
            1..=7 => 0xffu8 << (8 - left),
            _ => 0xff,
        };
        left = left.saturating_sub(8);
    }
}

/// Per-reason counter (`STATS`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// A source address as the kernel keys it: IPv4 is stored v4-mapped
/// (`::ffff:a.b.c.d`) so IPv4 and IPv6 keys never collide.
pub type SourceKey = [u8; 16];

/// The v4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> SourceKey {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// How long a source stays trusted (`SYN_TRUSTED`) after userspace last
/// saw it complete a TCP handshake: past the global SYN budget, its SYNs
/// still pass (its own bucket still applies).
pub const TRUST_TTL_NS: u64 = 10 * 60 * 1_000_000_000;

/// Value of `PORTS[port]`: non-zero when the port is protected.
pub const PORT_PROTECTED: u32 = 1;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made of integers and byte
    // arrays with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for BlockValue {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for SourceBucket {}
    unsafe impl aya::Pod for Limits {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for crate::host::HostSlot {}
    unsafe impl aya::Pod for crate::nets::NetKeyV6 {}
}

const _: () = assert!(core::mem::size_of::<BlockValue>() == 16);
const _: () = assert!(core::mem::size_of::<Bucket>() == 8);
const _: () = assert!(core::mem::size_of::<SourceBucket>() == 16);
const _: () = assert!(core::mem::size_of::<Limits>() == 88);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_prefix() {
        let mut m = [0u8; 16];
        prefix_mask(&mut m, 64);
        assert_eq!(
            m,
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut m = [0u8; 4];
        prefix_mask(&mut m, 20);
        assert_eq!(m, [0xff, 0xff, 0xf0, 0]);
        prefix_mask(&mut m, 0);
        assert_eq!(m, [0; 4]);
    }

    #[test]
    fn reason_indices_are_dense() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} is out of place", r.name());
        }
    }
}
