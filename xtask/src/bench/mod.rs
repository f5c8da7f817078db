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
    /// nginx requests/s, latency added at 1,000 requests/s, streaming TTFT
    /// and memory); nothing recorded.
    Quick,
    /// User-space instructions per proxied request, counted by callgrind:
    /// a figure this shared VM's noise does not move, for before/after
    /// comparisons of request-path changes.
    Instructions {
        /// Seconds of load while counting.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// With both proxies writing their access logs (nginx's `combined`
        /// to a file, the gateway's line to stderr), recorded as a section
        /// of its own.
        #[arg(long)]
        access_log: bool,
        /// HTTP/2 clients (h2load, 8 connections x 10 streams, cleartext)
        /// instead of wrk's HTTP/1.1, recorded as a section of its own.
        #[arg(long, conflicts_with = "access_log")]
        h2: bool,
    },
    /// Request-body inspection (what the gateway reads of each body before
    /// routing it) against a full JSON parse, for bodies of 1 KiB to 4 MiB.
    Body,
    /// Every balancing policy: selection cost (ns/pick) and requests/s
    /// through the gateway over the same two upstreams.
    Policies {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

/// Runs the bench program `name` (`gateway/benches/<name>.rs`), which
/// leaves its table in target/bench/<name>.md, and records the table in
/// docs/benchmarks.md under `title`, after the command, the machine and
/// `about`.
fn bench_program(name: &str, what: &str, title: &str, root_note: &str, about: &str) -> Result<()> {
    step(&format!("bench: {what} (release build)"));
    util::cargo(&["bench", "-p", "gateway", "--bench", name])?;
    let table = std::fs::read_to_string(util::root().join(format!("target/bench/{name}.md")))?;
    record::section(
        name,
        &format!(
            "## {title}\n\nCommand: `cargo xtask bench {name}`{root_note}. Machine: {}.{about}\n\n{table}",
            record::machine()
        ),
    )
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Xdp => {
            if !is_root() {
                bail!("the XDP benchmark loads a BPF program: run it as root");
            }
            bench_program("xdp", "xdp", "XDP fast path (TestRun)", " (as root)", "")
        }
        Which::Body => bench_program(
            "body",
            "request-body inspection",
            "Request bodies: inspection vs a full parse",
            "",
            " Chat-completion bodies of 2 KiB messages (prose with escaped quotes and newlines and \
             some non-ASCII text), best of 7 rounds of ~50 ms, one thread. `inspect` is what the \
             gateway runs on every request body before routing it: the UTF-8 check, the \
             nesting-depth scan and a validating serde pass that keeps only `model`, `stream`, \
             `stream_options` and the token caps.",
        ),
        Which::L7 { seconds } => l7::run(seconds),
        Which::Policies { seconds } => policies::run(seconds),
        Which::Quick => quick::run(),
        Which::Instructions {
            seconds,
            access_log,
            h2,
        } => instructions::run(
            seconds,
            if h2 {
                instructions::Variant::Http2
            } else if access_log {
                instructions::Variant::AccessLog
            } else {
                instructions::Variant::Plain
            },
        ),
        Which::Veth => {
            if !is_root() {
                bail!("the veth benchmark creates namespaces and attaches XDP: run it as root");
            }
            bench_program(
                "veth",
                "veth flood, XDP vs nftables",
                "Kernel: a flood on a veth, XDP vs nftables",
                " (as root)",
                "",
            )
        }
        Which::Streams {
            counts,
            tokens,
            interval_ms,
        } => streams::bench(&counts, tokens, interval_ms),
    }
}
