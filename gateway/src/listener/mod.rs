//! Listening sockets and connections: accept (with a per-client-IP limit on
//! concurrent connections), optional TLS, then HTTP/1.1 or HTTP/2 (ALPN over
//! TLS, prior knowledge in clear text) served by hyper, with a header read
//! timeout against slow clients and graceful shutdown. `workers` runs one
//! of these per worker thread.

pub mod balancer;
pub mod guard;
pub mod limit;
pub mod tls;
pub mod workers;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::pipeline::Shared;

/// One worker's listening sockets and connection settings.
pub struct Listeners {
    pub(crate) sockets: Vec<TcpListener>,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) header_read_timeout: Duration,
    pub(crate) worker: usize,
}

impl Listeners {
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
        let conn_gauge = shared
            .metrics
            .connections
            .with_label_values(&[&self.worker.to_string()]);
        loop {
            tokio::select! {
                Some((stream, peer)) = rx.recv() => {
                    if let Err(why) = shared.guard.check(peer.ip()) {
                        drop(stream);
                        if why == guard::Refused::RateLimited {
                            shared.abuse.record(peer.ip(), crate::pipeline::abuse::Cause::RateLimited);
                        }
                        continue;
                    }
                    let Some(slot) = shared.per_ip.acquire(peer.ip()) else {
                        // Over max_connections_per_ip: close at once, and
                        // count it towards a ban.
                        drop(stream);
                        shared.abuse.record(peer.ip(), crate::pipeline::abuse::Cause::RateLimited);
                        continue;
                    };
                    let conn = Conn { peer, slot, gauge: conn_gauge.clone(), worker: self.worker };
                    spawn_connection(stream, conn, Arc::clone(&shared), self.tls.clone(), self.header_read_timeout, &graceful);
                }
                _ = shutdown.changed() => break,
            }
        }
        for t in accept_tasks {
            t.abort();
        }
        if self.worker == 0 {
            tracing::info!(drain = ?drain, "stopped accepting; draining open connections");
        }
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                worker = self.worker,
                "drain deadline reached; closing the remaining connections"
            );
        }
    }
}

/// What a connection holds while it is open: its per-IP slot and its place
/// in the worker's connection count.
struct Conn {
    peer: SocketAddr,
    slot: limit::Slot,
    gauge: prometheus::IntGauge,
    worker: usize,
}

impl Conn {
    /// Counts the connection in (`+1`) or out (`-1`). The balancer sees the
    /// new count before the gauge does, so whoever reads the gauge knows
    /// the balancer has it too.
    fn count(&self, shared: &Shared, delta: i64) {
        if let Some(b) = shared.balancer.get() {
            b.publish(self.worker, (self.gauge.get() + delta).max(0) as u32);
        }
        self.gauge.add(delta);
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
    conn: Conn,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let peer = conn.peer;
    conn.count(&shared, 1);
    let counted = Arc::clone(&shared);
    let svc = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(crate::pipeline::handle(shared, req, peer).await) }
    });
    let watcher = graceful.watcher();
    tokio::spawn(async move {
        let result = match tls {
            None => {
                watcher
                    .watch(
                        builder(header_read_timeout)
                            .serve_connection(TokioIo::new(stream), svc)
                            .into_owned(),
                    )
                    .await
            }
            Some(acceptor) => {
                // The graceful watcher covers the HTTP connection only, so
                // the handshake gets its own deadline.
                match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        watcher
                            .watch(
                                builder(header_read_timeout)
                                    .serve_connection(TokioIo::new(s), svc)
                                    .into_owned(),
                            )
                            .await
                    }
                    Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
                    Err(_) => Err("TLS handshake timed out".into()),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, "connection ended: {e}");
        }
        conn.count(&counted, -1);
        drop(conn.slot);
    });
}
