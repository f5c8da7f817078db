//! `cargo xtask bench ...`: each benchmark is a program that prints its
//! numbers and records them, with the command, in docs/benchmarks.md.

mod instructions;
mod l7;
mod load;
mod policies;
mod quick;
mod record;
mod streams;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::util::{self, is_root, step};

#[derive(Subcommand, Clone)]
pub enum Which {
    /// ns/packet of the XDP program via BPF_PROG_TEST_RUN with 100,000
    /// blocklist entries, and the time to load them (needs root).
    Xdp,
    /// The same mock upstream reached directly, through nginx and through
    /// the gateway: peak requests/s (wrk) and latency at a fixed rate.
    L7 {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// N concurrent SSE streams (default 100, 1,000 and 10,000) directly,
    /// through nginx and through the gateway: time to first token, chunk
    /// gaps, proxy memory and CPU.
    Streams {
        /// Stream counts to run.
        #[arg(long, value_delimiter = ',', default_values_t = [100usize, 1000, 10000])]
        counts: Vec<usize>,
        /// Chunks per stream.
        #[arg(long, default_value_t = 200)]
        tokens: u32,
        /// Milliseconds between chunks.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Drop rate of a flood on a veth pair: the XDP program (native mode)
    /// vs an nftables raw-prerouting rule (needs root).
    Veth,
    /// The headline ratios in under two minutes (XDP ns/packet, gateway vs
    /// nginx requests/s, streaming TTFT and memory); nothing recorded.
    Quick,
    /// User-space instructions per proxied request, counted by callgrind:
    /// a figure this shared VM's noise does not move, for before/after
    /// comparisons of request-path changes.
    Instructions {
        /// Seconds of load while counting.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Every balancing policy: selection cost (ns/pick) and requests/s
    /// through the gateway over the same two upstreams.
    Policies {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Xdp => {
            if !is_root() {
                bail!("the XDP benchmark loads a BPF program: run it as root");
            }
            step("bench: xdp (release build)");
            util::cargo(&["bench", "-p", "gateway", "--bench", "xdp"])?;
            let table = std::fs::read_to_string(util::root().join("target/bench/xdp.md"))?;
            record::section(
                "xdp",
                &format!(
                    "## XDP fast path (TestRun)\n\nCommand: `cargo xtask bench xdp` (as root). Machine: {}.\n\n{table}",
                    record::machine()
                ),
            )
        }
        Which::L7 { seconds } => l7::run(seconds),
        Which::Policies { seconds } => policies::run(seconds),
        Which::Quick => quick::run(),
        Which::Instructions { seconds } => instructions::run(seconds),
        Which::Veth => {
            if !is_root() {
                bail!("the veth benchmark creates namespaces and attaches XDP: run it as root");
            }
            step("bench: veth flood, XDP vs nftables (release build)");
            util::cargo(&["bench", "-p", "gateway", "--bench", "veth"])?;
            let table = std::fs::read_to_string(util::root().join("target/bench/veth.md"))?;
            record::section(
                "veth",
                &format!(
                    "## Kernel: a flood on a veth, XDP vs nftables\n\nCommand: `cargo xtask bench veth` (as root). Machine: {}.\n\n{table}",
                    record::machine()
                ),
            )
        }
        Which::Streams {
            counts,
            tokens,
            interval_ms,
        } => streams::bench(&counts, tokens, interval_ms),
    }
}
