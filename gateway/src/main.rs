//! `gateway`: the daemon and its command-line interface in one binary.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.

use std::process::ExitCode;

use clap::Parser as _;
use gateway::{cli, error};

// glibc malloc was ~9% of the proxy's CPU under load (perf); mimalloc's
// per-thread free lists suit a request-per-task server. Build without the
// `mimalloc` feature to profile the heap (heaptrack sees only malloc).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(&args);
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(error::exit_code(&e) as u8)
        }
    }
}
