//! `mock-llm`: runs one OpenAI-compatible mock upstream (see
//! `gateway_tests::mock`) for the demo and the benchmarks. Prints
//! `mock-llm listening on ADDR` once bound and serves until SIGINT or
//! SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use gateway_tests::mock::{Failure, MockLlm, MockOptions, UsageMode};
use tokio::signal::unix::{signal, SignalKind};

/// An OpenAI-compatible mock LLM server (HTTP/1.1 and h2c on one port).
/// Requests can override these settings with x-mock-tokens,
/// x-mock-interval-ms, x-mock-latency-ms, x-mock-fail and x-mock-usage.
#[derive(Debug, Parser)]
#[command(name = "mock-llm", version)]
struct Cli {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Sent in every response as the x-mock-name header.
    #[arg(long, default_value = "mock")]
    name: String,
    /// A model listed by /v1/models (repeatable; default mock-model).
    #[arg(long = "model", value_name = "NAME")]
    models: Vec<String>,
    /// Delay before the response headers.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    latency_ms: u64,
    /// Completion tokens per response.
    #[arg(long, default_value_t = 16)]
    tokens: u32,
    /// Delay between two stream token chunks.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    interval_ms: u64,
    /// When usage is reported: asked, always or never.
    #[arg(long, default_value_t = UsageMode::WhenAsked)]
    usage: UsageMode,
    /// Fail every /v1/* POST: an error status (e.g. 500, 503, 429), reset,
    /// stall, garbage or midstream:N.
    #[arg(long, value_name = "FAILURE")]
    fail: Option<Failure>,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

impl Cli {
    fn options(self) -> MockOptions {
        let defaults = MockOptions::default();
        MockOptions {
            listen: self.listen,
            name: self.name,
            models: if self.models.is_empty() {
                defaults.models
            } else {
                self.models
            },
            latency: Duration::from_millis(self.latency_ms),
            tokens: self.tokens,
            interval: Duration::from_millis(self.interval_ms),
            usage: self.usage,
            fail: self.fail,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.workers {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build()?.block_on(serve(cli.options()))
}

async fn serve(opts: MockOptions) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mock = MockLlm::start(opts).await?;
    // Scripts wait for this line to learn the port: flush it at once even
    // when stdout is a pipe.
    let mut out = std::io::stdout().lock();
    writeln!(out, "mock-llm listening on {}", mock.addr())?;
    out.flush()?;
    drop(out);
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    drop(mock);
    Ok(())
}
