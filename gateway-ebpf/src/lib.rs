//! Host-side stub: the real programs live in `main.rs`, built for the bpf
//! target by `gateway/build.rs`. This lib target only exists so `gateway` can
//! name this crate as a build dependency.
#![no_std]
