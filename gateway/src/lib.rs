//! The gateway as a library: the `gateway` binary is a thin `main` over
//! these modules, and the integration tests and benchmarks use them too.

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod error;
pub mod http1;
pub mod kernel;
pub mod listener;
pub mod metrics;
pub mod pipeline;
pub mod sd_notify;
pub mod server;
pub mod upstream;
