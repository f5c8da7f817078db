//! The kernel half of the gateway in userspace: loading and attaching the XDP
//! program (`loader`), typed access to its maps (`maps`, with the IPv4 host
//! table in `host` and the CIDR tables in `nets`), the policy that
//! config and state ask for (`policy`), its persistence (`state`), and the
//! sources userspace vouches for (`trust`).

pub mod clock;
pub mod host;
pub mod loader;
pub mod maps;
pub mod nets;
pub mod policy;
pub mod runtime;
pub mod state;
pub mod trust;

pub mod testrun;

#[cfg(test)]
mod testrun_tests;
