//! Build orchestration: `cargo xtask setup | build | run | test | fuzz | bench`.
//!
//! `setup` installs everything the build and the tests need and is run by
//! `run` and `test` first, so a fresh machine needs only these commands.

mod bench;
mod demo;
mod dist;
mod fuzz;
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
    /// cargo-fuzz, bpffs mount, Debian packages used by the tests.
    Setup,
    /// Build every crate (release), including the embedded eBPF object.
    Build,
    /// Set up, build and start the demo; prints what to try.
    Run,
    /// Set up, then run lints, every test and a short pass of every fuzz
    /// target (kernel tests need root and are mandatory under CI=true).
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Run the fuzz targets (fuzz/, cargo-fuzz with nightly); a crash
    /// fails and names the file holding the input.
    Fuzz {
        /// Seconds per target (libFuzzer's -max_total_time; 0 would mean
        /// forever, so it is refused).
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS,
              value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        /// Targets to run (default: all).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        targets: Vec<String>,
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
        Cmd::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz::run(&targets, seconds)
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
        // fuzz/ is its own workspace, outside `--all`.
        util::cargo(&["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])?;
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
    // Tests that cannot run here (not root, no venv) name themselves in
    // this file; the harness would hide what they print.
    let skips = util::root().join("target/test-skips.txt");
    let _ = std::fs::remove_file(&skips);
    std::env::set_var("GATEWAY_TEST_SKIPS", &skips);
    let tested = util::cargo(&["test", "--workspace", "--no-fail-fast"]);
    if let Ok(text) = std::fs::read_to_string(&skips) {
        let mut by_line = std::collections::BTreeMap::<&str, usize>::new();
        for l in text.lines() {
            *by_line.entry(l).or_default() += 1;
        }
        let n: usize = by_line.values().sum();
        eprintln!(
            "note: {n} test{} skipped (counted as passed without running):",
            if n == 1 { " was" } else { "s were" }
        );
        for (l, count) in by_line {
            eprintln!("  {count} x {l}");
        }
    }
    tested?;
    // A smoke pass over the seeds and a little beyond; `cargo xtask fuzz`
    // is the long run.
    fuzz::run(&[], fuzz::TEST_SECONDS)
}
