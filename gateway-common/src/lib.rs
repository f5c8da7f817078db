//! Types and pure logic shared by the kernel programs (`gateway-ebpf`), the
//! userspace daemon/CLI (`gateway`) and the fuzzers.
//!
//! Everything here is `no_std`, allocation-free and `#[repr(C)]` where it
//! crosses the kernel boundary, so both sides agree on every byte.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate std;

pub mod bucket;
pub mod cidr;
pub mod hint;
pub mod host;
pub mod maps;
pub mod nets;
pub mod packet;
pub mod reuseport;
pub mod verdict;

pub use maps::*;
