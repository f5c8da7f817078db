//! The XDP entry point: decide, count, act.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use gateway_common::{verdict::decide, Counter};

use crate::{
    maps::{STATS, TOP_SOURCES},
    tables::{add, Maps, Packet},
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
    if let Some(src) = v.source {
        match TOP_SOURCES.get_ptr_mut(&src) {
            // SAFETY: pointer into the map value returned by the lookup.
            Some(n) => add(unsafe { &mut *n }, 1),
            None => {
                let _ = TOP_SOURCES.insert(&src, 1u64, 0);
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
