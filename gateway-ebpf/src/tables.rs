//! `gateway_common`'s `Bytes` and `Tables` over the XDP context and the BPF
//! maps. The kernel only reads policy maps; it writes buckets and counters.

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    maps::{lpm_trie::Key, Array},
    programs::XdpContext,
};
use gateway_common::{
    bucket::{self, Taken},
    hint,
    host::{self, HostSlot, Nets, Probe},
    nets::{self, NetKeyV6},
    packet::{Bytes, Source},
    verdict::Tables,
    BlockValue, Limits, SourceKey, PORT_PROTECTED, TRUST_TTL_NS,
};

use crate::maps::*;

/// Packet access for the verifier: every read is checked against
/// `data_end` on the same pointer it dereferences.
pub struct Packet<'a>(pub &'a XdpContext);

impl Bytes for Packet<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let start = self.0.data();
        let end = self.0.data_end();
        // Offsets are capped by the parser; the explicit bound here keeps
        // the verifier's range tracking simple.
        if off > 1024 {
            return None;
        }
        let p = start + off;
        if p + N > end {
            return None;
        }
        // SAFETY: [p, p + N) lies inside the packet (checked above).
        Some(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
    }
}

pub struct Maps;

/// Whether a found blocklist entry is in force; counts the hit if so. The
/// clock is read only for entries that carry an expiry.
#[inline(always)]
fn hit(v: Option<*mut BlockValue>) -> bool {
    let Some(v) = v else { return false };
    if !in_force(v) {
        return false;
    }
    // SAFETY: a pointer into the map value returned by the lookup.
    add(unsafe { &mut (*v).hits }, 1);
    true
}

/// The key of `slot` of a table (volatile: read before the value) and a
/// pointer to the slot.
#[inline(always)]
fn slot(table: &Array<HostSlot>, s: u32) -> Option<(u64, *mut HostSlot)> {
    let p = table.get_ptr_mut(s)?;
    // SAFETY: a pointer to a slot of the array map.
    Some((unsafe { core::ptr::read_volatile(&(*p).key) }, p))
}

/// The value of an IPv4 /32 block of `a`: a search of the open-addressed
/// table, then the spill map if the search saw a full window. Keys are read
/// with volatile loads before their values; userspace writes a value before
/// its key, so a key found here comes with its own value.
#[inline(always)]
pub fn host_v4(a: &[u8; 4]) -> Option<*mut BlockValue> {
    match host::probe(a, |s| slot(&BLOCK_HOST_V4, s)) {
        // SAFETY: as in `slot`.
        Probe::Found(p) => Some(unsafe { &mut (*p).value }),
        Probe::Absent(_) => None,
        Probe::Spill => BLOCK_HOST_V4_SPILL.get_ptr_mut(a),
    }
}

/// Whether a block is in force (not past its expiry). The clock is read
/// only for an entry that carries an expiry.
#[inline(always)]
fn in_force(v: *mut BlockValue) -> bool {
    // SAFETY: a pointer into the map value returned by the lookup; read
    // once, after the key that led here (see `host_v4`).
    let expires_ns = unsafe { core::ptr::read_volatile(&(*v).expires_ns) };
    expires_ns == 0 || now() < expires_ns
}

/// The CIDR block covering `a`: `BLOCK_NET_V4` searched one prefix length
/// at a time, longest first, then, where the table does not answer, the
/// trie, for prefixes up to the length it must still search (all of them
/// when the table is not in use or a search saw a full window; after a
/// table miss, those shorter than the table's, which it holds alone; a
/// trie lookup's key length bounds its match). A lapsed entry does not end
/// the search: a shorter entry in force still blocks the source (a timed
/// ban inside a permanent block). The trie alone cannot do that: while the
/// table is out of use, its longest match decides.
///
/// A BPF function of its own: inlined, the extra register pressure made
/// LLVM spill a pointer as a byte in the parser, which the verifier
/// refuses ("invalid size of register spill").
#[inline(never)]
fn net_v4(a: &[u8; 4]) -> Option<*mut BlockValue> {
    let trie = |max: u32| lpm_ptr(BLOCK_V4.get(Key::new(max, *a)));
    let Some(&d) = BLOCK_HINT.get(hint::NETS_V4_INDEX) else {
        return trie(32);
    };
    if d & nets::TABLE == 0 {
        return trie(32);
    }
    let n = nets::count(d);
    let mut len = 32;
    for i in 0..nets::MAX_LENGTHS {
        if i >= n {
            break;
        }
        len = nets::length(d, i);
        match host::probe_key::<Nets, _>(host::net_key(a, len), |s| slot(&BLOCK_NET_V4, s)) {
            Probe::Found(p) => {
                // SAFETY: as in `slot`.
                let v = unsafe { &mut (*p).value } as *mut BlockValue;
                if in_force(v) {
                    return Some(v);
                }
            }
            Probe::Absent(_) => {}
            Probe::Spill => return trie(len),
        }
    }
    if d & nets::TRIE_AFTER != 0 && len > 0 {
        // Shorter prefixes live in the trie alone.
        return trie(len - 1);
    }
    None
}

/// `net_v4` for IPv6: one hash lookup of `BLOCK_NET_V6` per prefix length.
#[inline(never)]
fn net_v6(a: &[u8; 16]) -> Option<*mut BlockValue> {
    let trie = |max: u32| lpm_ptr(BLOCK_V6.get(Key::new(max, *a)));
    let Some(&d) = BLOCK_HINT.get(hint::NETS_V6_INDEX) else {
        return trie(128);
    };
    if d & nets::TABLE == 0 {
        return trie(128);
    }
    let n = nets::count(d);
    let mut len = 128;
    for i in 0..nets::MAX_LENGTHS {
        if i >= n {
            break;
        }
        len = nets::length_v6(d, i);
        if let Some(v) = BLOCK_NET_V6.get_ptr_mut(&NetKeyV6::new(a, len)) {
            if in_force(v) {
                return Some(v);
            }
        }
    }
    if d & nets::TRIE_AFTER != 0 && len > 0 {
        return trie(len - 1);
    }
    None
}

/// Whether the host table and the trie can hold an entry for the source in
/// `slot`: both "yes" until userspace has built the hint.
#[inline(always)]
fn maybe_blocked(base: u32, slot: u32) -> (bool, bool) {
    match (
        BLOCK_HINT.get(hint::READY_INDEX),
        BLOCK_HINT.get(hint::word(base, slot)),
    ) {
        (Some(&hint::READY), Some(w)) => {
            (w & hint::host_bit(slot) != 0, w & hint::net_bit(slot) != 0)
        }
        _ => (true, true),
    }
}

/// Whether the allowlist trie can hold an entry for the source in `slot`:
/// "yes" until userspace has built the hint.
#[inline(always)]
fn maybe_allowed(base: u32, slot: u32) -> bool {
    match (
        BLOCK_HINT.get(hint::READY_INDEX),
        BLOCK_HINT.get(hint::allow_word(base, slot)),
    ) {
        (Some(&hint::READY), Some(w)) => w & hint::allow_bit(slot) != 0,
        _ => true,
    }
}

/// aya-ebpf's `LpmTrie::get` hands out `&V`; the value lives in writable map
/// memory, and the only write through this pointer is the atomic hit count.
#[inline(always)]
fn lpm_ptr(v: Option<&BlockValue>) -> Option<*mut BlockValue> {
    v.map(|v| v as *const BlockValue as *mut BlockValue)
}

/// Atomic add on a value shared by all CPUs.
#[inline(always)]
pub fn add(dst: &mut u64, n: u64) {
    // SAFETY: `dst` is a valid, aligned u64 in a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, n,
        )
    };
}

/// `bpf_map_update_elem` flag: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// A bucket's theoretical arrival time in a map value, shared by the CPUs
/// (`gateway_common::bucket`): read once per SYN, restarted with a plain
/// store, moved on with an atomic add.
struct MapTat(*mut u64);

impl bucket::Tat for MapTat {
    #[inline(always)]
    fn load(&self) -> u64 {
        // SAFETY: the pointer is to an aligned u64 in a map value.
        unsafe { core::ptr::read_volatile(self.0) }
    }
    #[inline(always)]
    fn store(&self, tat: u64) {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(self.0, tat) }
    }
    #[inline(always)]
    fn add(&self, n: u64) {
        // SAFETY: as above.
        add(unsafe { &mut *self.0 }, n)
    }
}

/// Monotonic time for expiries and buckets. The coarse clock (jiffies
/// resolution, >= 1 ms) costs a fraction of `bpf_ktime_get_ns` (measured
/// 36 ns per call on the benchmark VM) and is plenty for both.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper with no preconditions (kernel >= 5.11).
    unsafe { bpf_ktime_get_coarse_ns() }
}

impl Tables for Maps {
    #[inline(always)]
    fn now(&self) -> u64 {
        now()
    }

    #[inline(always)]
    fn allowed(&self, src: &Source) -> bool {
        match src {
            Source::V4(a) => {
                maybe_allowed(hint::ALLOW_V4_BASE, hint::slot_v4(a))
                    && ALLOW_V4.get(Key::new(32, *a)).is_some()
            }
            Source::V6(a) => {
                maybe_allowed(hint::ALLOW_V6_BASE, hint::slot_v6(a))
                    && ALLOW_V6.get(Key::new(128, *a)).is_some()
            }
        }
    }

    #[inline(always)]
    fn blocked(&self, src: &Source) -> bool {
        // Values are plain integers; a racing userspace update can at worst
        // show the old or the new expiry.
        match src {
            Source::V4(a) => {
                let (host, net) = maybe_blocked(hint::V4_BASE, hint::slot_v4(a));
                (host && hit(host_v4(a))) || (net && hit(net_v4(a)))
            }
            Source::V6(a) => {
                let (host, net) = maybe_blocked(hint::V6_BASE, hint::slot_v6(a));
                (host && hit(BLOCK_HOST_V6.get_ptr_mut(a))) || (net && hit(net_v6(a)))
            }
        }
    }

    #[inline(always)]
    fn protected(&self, port: u16) -> bool {
        matches!(PORTS.get(port as u32), Some(v) if *v == PORT_PROTECTED)
    }

    #[inline(always)]
    fn limits(&self) -> Option<&Limits> {
        LIMITS.get(0)
    }

    #[inline(always)]
    fn take_source(&self, key: &SourceKey, l: &Limits, now: u64) -> Option<Taken> {
        let b = SYN_BUCKETS.get_ptr_mut(key)?;
        // SAFETY: the pointers are into the map value, which CPUs share:
        // the bucket takes with an atomic add (`MapTat`), and so does the
        // refusal count. Two CPUs refusing the same source at once may both
        // read the count after both adds, which blurs its batches of
        // `TOP_SOURCES` credit slightly. (Reading the old value in the add
        // itself needs BPF ISA v3, which bpf-linker's default CPU does not
        // emit.)
        let (tat, refused) = unsafe { (&raw mut (*b).tat, &raw mut (*b).refused) };
        Some(bucket::take_source(&MapTat(tat), l, now, || {
            // SAFETY: `refused` is a valid, aligned u64 in the map value.
            unsafe {
                add(&mut *refused, 1);
                core::ptr::read_volatile(refused)
            }
        }))
    }

    #[inline(always)]
    fn add_source(&self, key: &SourceKey, l: &Limits, now: u64) -> Taken {
        let (b, taken) = bucket::fresh_source(l, now);
        // Only where there is none: another CPU may have made this
        // source's bucket since the lookup missed, and taken from it.
        if SYN_BUCKETS.insert(key, b, BPF_NOEXIST).is_ok() {
            return taken;
        }
        self.take_source(key, l, now).unwrap_or(taken)
    }

    #[inline(always)]
    fn take_global(&self, l: &Limits, now: u64) -> bool {
        match SYN_GLOBAL.get_ptr_mut(0) {
            // A zeroed (never used) bucket is full.
            Some(b) => bucket::take(
                // SAFETY: the pointer is into the map value.
                &MapTat(unsafe { &raw mut (*b).tat }),
                l.global_interval,
                l.global_tolerance,
                l.global_burst,
                now,
            ),
            None => true,
        }
    }

    #[inline(always)]
    fn trusted(&self, key: &SourceKey, now: u64) -> bool {
        // SAFETY: reads a u64 map value.
        matches!(unsafe { SYN_TRUSTED.get(key) }, Some(seen) if now.saturating_sub(*seen) < TRUST_TTL_NS)
    }
}
