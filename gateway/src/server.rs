//! The L7 gateway assembled: routing table, metrics endpoint and listeners,
//! started from a config. Used by `gateway run` and by the tests in-process.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    config::Config,
    listener::workers::{self, Workers},
    metrics,
    pipeline::Shared,
};
use anyhow::Result;

/// A running gateway.
pub struct Gateway {
    pub shared: Arc<Shared>,
    pub addrs: Vec<SocketAddr>,
    pub metrics_addr: SocketAddr,
    /// Ban requests from the abuse tracker, for the daemon to enforce.
    pub bans: Option<tokio::sync::mpsc::UnboundedReceiver<crate::pipeline::abuse::Ban>>,
    workers: Workers,
    /// Active health checks; stopped with the gateway.
    checker: AbortOnDrop,
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Gateway {
    /// Binds everything (every worker's sockets, TLS, metrics), then serves:
    /// the proxy on its worker threads, metrics on the current runtime.
    pub async fn start(cfg: &Config) -> Result<Gateway> {
        install_crypto_provider();
        let (ban_tx, bans) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(cfg, ban_tx));
        let checker = AbortOnDrop(tokio::spawn(crate::upstream::checker::run(Arc::clone(
            &shared,
        ))));
        let tls = cfg
            .server
            .tls
            .as_ref()
            .map(crate::listener::tls::acceptor)
            .transpose()
            // The files the config names: fixing them is the operator's.
            .map_err(|e| crate::error::UsageError(format!("{e:#}")))?;
        let n = workers::count(cfg.server.workers);
        let sockets = workers::bind(&cfg.server.listen, n)?;
        let addrs: Vec<SocketAddr> = sockets[0]
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        let balancer = if n > 1 {
            match crate::listener::balancer::Balancer::attach(&sockets) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("worker balancer unavailable, new connections are spread by hash only: {e:#}");
                    None
                }
            }
        } else {
            None
        };
        let refresh = {
            let shared = Arc::clone(&shared);
            Arc::new(move || refresh_gauges(&shared)) as Arc<dyn Fn() + Send + Sync>
        };
        let metrics_addr =
            metrics::serve(cfg.metrics.listen, Arc::clone(&shared.metrics), refresh).await?;
        if let Some(b) = balancer {
            let _ = shared.balancer.set(b);
        }
        if let (Some(tls), Some(t)) = (tls, &cfg.server.tls) {
            tls.report(t, &shared.metrics);
            let _ = shared
                .tls_certs
                .set(arc_swap::ArcSwap::from_pointee(tls.acceptor));
        }
        let workers = Workers::start(sockets, Arc::clone(&shared))?;
        for a in &addrs {
            tracing::info!(addr = %a, tls = cfg.server.tls.is_some(), workers = n, "listening");
        }
        tracing::info!(addr = %metrics_addr, "metrics on /metrics");
        Ok(Gateway {
            shared,
            addrs,
            metrics_addr,
            bans: Some(bans),
            workers,
            checker,
        })
    }

    /// Stops accepting, lets open connections finish (up to the drain
    /// deadline), and returns when they have.
    pub async fn stop(self) {
        drop(self.checker);
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    }
}

/// Backend gauges are set on every scrape from the live counts.
fn refresh_gauges(shared: &Shared) {
    let routes = shared.routes.load();
    for m in &routes.models {
        for b in &m.backends {
            let labels = [&*m.name, &*b.label];
            shared
                .metrics
                .backend_in_flight
                .with_label_values(&labels)
                .set(b.in_flight() as i64);
            shared
                .metrics
                .backend_healthy
                .with_label_values(&labels)
                .set(b.health.state().healthy() as i64);
        }
        if let Some(b) = m.backends.first() {
            shared
                .metrics
                .queue_waiting
                .with_label_values(&[&*m.name])
                .set(b.slots().waiting.load(std::sync::atomic::Ordering::Relaxed) as i64);
        }
    }
}

/// rustls needs a process-wide crypto provider for parts that do not take
/// one explicitly; ring is the one compiled in.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
