//! The XDP entry point: decide, count, act.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use gateway_common::{verdict::decide, Counter};

use crate::{
    maps::{STATS, TOP_SOURCES},
    tables::{add, host_v4, Maps, Packet},
};

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    let v = decide(&Packet(&ctx), &Maps);
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(c) = STATS.get_ptr_mut(v.reason as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        let c: &mut Counter = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += len;
    }
    if !v.drop() {
        return xdp_action::XDP_PASS;
    }
    if let Some((src, credit)) = v.ranked() {
        match TOP_SOURCES.get_ptr_mut(&src) {
            // SAFETY: pointer into the map value returned by the lookup.
            Some(n) => add(unsafe { &mut *n }, credit),
            None => {
                let _ = TOP_SOURCES.insert(&src, credit, 0);
            }
        }
    }
    xdp_action::XDP_DROP
}

/// Benchmark traffic generator, never attached: run with
/// `BPF_PROG_TEST_RUN` in live-frames mode on a veth, every frame is sent
/// out again (`XDP_TX`), so `cargo xtask bench veth` can flood the peer at
/// line rate without a NIC or an external tool.
#[xdp]
pub fn gateway_bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Benchmark floor, attached only by `cargo xtask bench veth`: reads the
/// IPv4 source address, the least any filter by source must do, and drops
/// the frame (passes frames too short to hold one). Its drop rate is what
/// the veth driver plus that one read cost per frame: the ceiling for any
/// such XDP program on the veth.
#[xdp]
pub fn gateway_bench_drop(ctx: XdpContext) -> u32 {
    match bench_saddr(&ctx) {
        Some(a) if a != [0; 4] => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// The second benchmark floor: the source address looked up in
/// `BLOCK_HOST_V4` (the table search, then the spill map), dropped on a
/// hit. What a drop costs with the host lookup and nothing else.
#[xdp]
pub fn gateway_bench_lookup(ctx: XdpContext) -> u32 {
    match bench_saddr(&ctx) {
        Some(a) if host_v4(&a).is_some() => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// The IPv4 source address of an untagged Ethernet frame, unchecked.
#[inline(always)]
fn bench_saddr(ctx: &XdpContext) -> Option<[u8; 4]> {
    const SADDR: usize = 14 + 12;
    let start = ctx.data();
    if start + SADDR + 4 > ctx.data_end() {
        return None;
    }
    // SAFETY: [start + SADDR, start + SADDR + 4) is inside the frame (checked above).
    Some(unsafe { core::ptr::read_volatile((start + SADDR) as *const [u8; 4]) })
}

/// Benchmark SYN flood from many sources, never attached: like
/// `gateway_bench_tx`, but each frame (an IPv4 TCP SYN without IP options)
/// leaves with a random low half of its source address, the IP and TCP
/// checksums updated to match (RFC 1624), so the receiver's stack accepts
/// it as a real SYN from one of 65,536 sources.
#[xdp]
pub fn gateway_bench_syn(ctx: XdpContext) -> u32 {
    const SADDR_LOW: usize = 14 + 14; // Ethernet + offset of saddr's low half
    const IP_CSUM: usize = 14 + 10;
    const TCP_CSUM: usize = 14 + 20 + 16;
    let start = ctx.data();
    if start + TCP_CSUM + 2 > ctx.data_end() {
        return xdp_action::XDP_TX;
    }
    let p = start as *mut u8;
    // SAFETY: every offset below is under TCP_CSUM + 2, checked above.
    unsafe {
        let new = aya_ebpf::helpers::generated::bpf_get_prandom_u32() as u16;
        let old = u16::from_be_bytes([*p.add(SADDR_LOW), *p.add(SADDR_LOW + 1)]);
        let [hi, lo] = new.to_be_bytes();
        *p.add(SADDR_LOW) = hi;
        *p.add(SADDR_LOW + 1) = lo;
        csum_replace(p.add(IP_CSUM), old, new);
        csum_replace(p.add(TCP_CSUM), old, new);
    }
    xdp_action::XDP_TX
}

/// HC' = ~(~HC + ~m + m') over the big-endian checksum at `at`.
///
/// # Safety
/// `at` and `at + 1` are inside the packet.
#[inline(always)]
unsafe fn csum_replace(at: *mut u8, old: u16, new: u16) {
    let hc = u16::from_be_bytes([*at, *at.add(1)]);
    let mut sum = (!hc) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let [a, b] = (!(sum as u16)).to_be_bytes();
    *at = a;
    *at.add(1) = b;
}
