//! The sk_reuseport program: picks the worker socket for each new
//! connection of a SO_REUSEPORT group by live load, not only by hash, so a
//! worker busy with long streams gets fewer new connections. Userspace
//! fills `WORKERS` with the group's socket of each worker; the program
//! counts each connection it sends to a worker in `WORKER_LOAD`, and each
//! worker writes its exact open-connection count there when one closes.

use aya_ebpf::{
    bindings::sk_action,
    macros::{map, sk_reuseport},
    maps::{Array, ReusePortSockArray},
    programs::SkReuseportContext,
};
use gateway_common::reuseport::MAX_WORKERS;

#[map]
static WORKERS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_WORKERS, 0);
#[map]
static WORKER_LOAD: Array<u32> = Array::with_max_entries(MAX_WORKERS, 0);
/// `[0]`: how many workers are in `WORKERS`.
#[map]
static WORKER_COUNT: Array<u32> = Array::with_max_entries(1, 0);

#[sk_reuseport]
pub fn gateway_reuseport(ctx: SkReuseportContext) -> u32 {
    let n = match WORKER_COUNT.get(0) {
        Some(n) if *n > 0 && *n <= MAX_WORKERS => *n,
        // Not configured: let the kernel hash as usual.
        _ => return sk_action::SK_PASS,
    };
    // Start the scan at a hash-chosen worker so ties spread out.
    let start = ctx.hash() % n;
    let mut best = start;
    let mut best_load = u32::MAX;
    for step in 0..MAX_WORKERS {
        if step >= n {
            break;
        }
        let mut i = start + step;
        if i >= n {
            i -= n;
        }
        let load = WORKER_LOAD.get(i).copied().unwrap_or(u32::MAX);
        if load < best_load {
            best_load = load;
            best = i;
        }
    }
    // On failure (a socket gone) the kernel falls back to its hash.
    if WORKERS.select_reuseport(&ctx, best).is_ok() && is_syn(&ctx) {
        // Counted here, at the SYN: a burst of new connections is chosen
        // for before the first is accepted, and would otherwise every one
        // go to the same least-loaded worker. Only a SYN: the program runs
        // for any packet that finds no connection (a stray ACK, a cookie's
        // ACK), and those open nothing. Each worker writes its exact count
        // when a connection closes and every second, which corrects what
        // this missed or added (a handshake that never completed).
        if let Some(load) = WORKER_LOAD.get_ptr_mut(best) {
            // SAFETY: a pointer into the array's value, valid for the
            // program's run. Not atomic (Rust's core has no 32-bit atomics
            // for the BPF target): an add lost to a race on another CPU
            // only makes the estimate less exact until the worker's next
            // write.
            unsafe {
                let v = core::ptr::read_volatile(load);
                core::ptr::write_volatile(load, v.saturating_add(1));
            }
        }
    }
    sk_action::SK_PASS
}

/// Whether the packet is a TCP SYN without ACK (a new connection). The
/// program sees the packet from its transport header on.
#[inline(always)]
fn is_syn(ctx: &SkReuseportContext) -> bool {
    const IPPROTO_TCP: u32 = 6;
    const FLAGS: usize = 13;
    let (data, end) = (ctx.data(), ctx.data_end());
    if ctx.ip_protocol() != IPPROTO_TCP || data + FLAGS + 1 > end {
        return false;
    }
    // SAFETY: within [data, data_end), checked above.
    let flags = unsafe { *((data + FLAGS) as *const u8) };
    flags & 0x12 == 0x02
}
