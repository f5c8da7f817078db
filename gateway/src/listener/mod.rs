//! Listening sockets and connections: accept, optional TLS, then HTTP/1.1 or
//! HTTP/2 (ALPN over TLS, prior knowledge in clear text) served by hyper,
//! with a header read timeout against slow clients and graceful shutdown.

pub mod tls;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::{config::Config, pipeline::Shared};

/// Bound listening sockets, ready to serve.
pub struct Listeners {
    sockets: Vec<TcpListener>,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
}

impl Listeners {
    /// Binds every `server.listen` address (and loads TLS) before anything
    /// is served, so configuration problems surface at start-up.
    pub async fn bind(cfg: &Config) -> Result<Listeners> {
        let tls = cfg.server.tls.as_ref().map(tls::acceptor).transpose()?;
        let mut sockets = Vec::new();
        for addr in &cfg.server.listen {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr} (server.listen): in use, or a privileged port without CAP_NET_BIND_SERVICE?"))?;
            sockets.push(l);
        }
        Ok(Listeners {
            sockets,
            tls,
            header_read_timeout: cfg.server.header_read_timeout,
        })
    }

    /// The bound addresses (a configured port 0 becomes the real port).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` fires, then stops accepting and gives open
    /// connections up to `drain` to finish.
    pub async fn serve(
        self,
        shared: Arc<Shared>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        drain: Duration,
    ) {
        let graceful = GracefulShutdown::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(TcpStream, SocketAddr)>(1024);
        let mut accept_tasks = Vec::new();
        for l in self.sockets {
            let tx = tx.clone();
            accept_tasks.push(tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok(c) => {
                            if tx.send(c).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        drop(tx);
        loop {
            tokio::select! {
                Some((stream, peer)) = rx.recv() => {
                    spawn_connection(stream, peer, Arc::clone(&shared), self.tls.clone(), self.header_read_timeout, &graceful);
                }
                _ = shutdown.changed() => break,
            }
        }
        for t in accept_tasks {
            t.abort();
        }
        tracing::info!(drain = ?drain, "stopped accepting; draining open connections");
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline reached; closing the remaining connections");
        }
    }
}

fn builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let svc = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(crate::pipeline::handle(shared, req, peer).await) }
    });
    match tls {
        None => {
            let conn = builder(header_read_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            });
        }
        Some(acceptor) => {
            // The handshake happens on the connection's own task; the
            // graceful watcher cannot cover it, so it has its own timeout.
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(header_read_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
                let conn = builder(header_read_timeout)
                    .serve_connection(TokioIo::new(tls), svc)
                    .into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            });
        }
    }
}
