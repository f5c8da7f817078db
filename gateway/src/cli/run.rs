//! `gateway run`: the daemon. Loads and attaches the kernel fast path (when
//! `[xdp]` is enabled), serves the L7 proxy and metrics, keeps the
//! blocklist tidy, and on SIGINT/SIGTERM stops accepting, drains open
//! requests and detaches (the pinned maps, and so the policy, remain).

use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::{config::Config, kernel::runtime::Kernel, server::Gateway};

/// How often lapsed temporary blocks are swept from the maps.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub fn run(cfg: &Config) -> Result<()> {
    // The proxy runs on its own worker threads (listener::workers); this
    // runtime only drives signals, metrics and housekeeping.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: &Config) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut kernel = if cfg.xdp.enabled {
        Some(Kernel::start(cfg)?)
    } else {
        tracing::info!("xdp.enabled is false: no kernel fast path");
        None
    };
    let gateway = Gateway::start(cfg).await?;
    tracing::info!(pid = std::process::id(), "gateway running");

    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                if let Some(k) = kernel.as_mut() {
                    if let Err(e) = k.sweep() {
                        tracing::warn!("sweeping lapsed blocks failed: {e:#}");
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: no new connections; draining open requests");
    gateway.stop().await;
    if kernel.is_some() {
        tracing::info!("detaching XDP (pinned maps and policy stay)");
    }
    drop(kernel);
    Ok(())
}
