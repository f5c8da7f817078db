//! Build orchestration: `cargo xtask setup | build | run | test | bench`.
//!
//! `setup` installs everything the build and the tests need and is run by
//! `run` and `test` first, so a fresh machine needs only these commands.

mod bench;
mod demo;
mod dist;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, demo, test and benchmark the gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites (idempotent): nightly rust-src, bpf-linker,
    /// bpffs mount, Debian packages used by the tests.
    Setup,
    /// Build every crate (release), including the embedded eBPF object.
    Build,
    /// Set up, build and start the demo; prints what to try.
    Run,
    /// Set up, then run lints and every test (kernel tests need root and
    /// are mandatory under CI=true).
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Build the installable Debian package (target/dist/*.deb).
    Dist,
    /// Benchmarks: programs that print numbers and record them in
    /// docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            util::cargo(&["build", "--workspace", "--release"])
        }
        Cmd::Run => {
            setup::run()?;
            demo::run()
        }
        Cmd::Test { no_lint } => {
            setup::run()?;
            test(no_lint)
        }
        Cmd::Dist => {
            setup::run()?;
            dist::run()
        }
        Cmd::Bench { which } => {
            setup::run()?;
            bench::run(which)
        }
    }
}

fn test(no_lint: bool) -> Result<()> {
    if !no_lint {
        util::step("lint: rustfmt");
        util::cargo(&["fmt", "--all", "--", "--check"])?;
        util::step("lint: clippy");
        util::cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    util::step("build: binaries used by the integration tests");
    util::cargo(&["build", "--workspace", "--bins"])?;
    util::step("test: unit, kernel (TestRun) and integration tests");
    util::cargo(&["test", "--workspace", "--no-fail-fast"])?;
    Ok(())
}
