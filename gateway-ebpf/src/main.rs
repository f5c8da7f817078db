//! The kernel fast path: an XDP program that drops blocked sources and
//! rate-limits new connections (TCP SYN) per source before the stack sees them.
//!
//! The decision itself is `gateway_common::verdict::decide`, shared with the
//! userspace tests and fuzzers; this crate supplies the BPF maps behind it
//! (`maps.rs`), the bounds-checked packet access (`tables.rs`) and the
//! counting. No per-packet logging.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The bpf target has no atomic read-modify-write in `core::sync::atomic`;
// the intrinsic lowers to the BPF atomic add instruction.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod reuseport;
#[cfg(target_arch = "bpf")]
mod tables;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host builds (clippy, `cargo build --workspace`) get an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
