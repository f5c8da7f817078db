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
    pub(crate) limits: ConnLimits,
    pub(crate) worker: usize,
}

/// What a client connection may cost: how long it may take to send a
/// request head (and its first byte), and how large that head may be.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: u32,
    pub max_headers: u32,
}

impl ConnLimits {
    pub fn new(s: &crate::config::ServerConfig) -> ConnLimits {
        ConnLimits {
            header_read_timeout: s.header_read_timeout,
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
        }
    }
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
                    if let Some(t) = shared.trust.get() {
                        t.record(peer.ip());
                    }
                    let conn = Conn { peer, slot, gauge: conn_gauge.clone(), worker: self.worker };
                    spawn_connection(stream, conn, Arc::clone(&shared), self.tls.clone(), self.limits, &graceful);
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

/// Streams one HTTP/2 connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 256;

fn builder(limits: ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The header read timeout also ends idle keep-alive connections. The
    // read buffer's ceiling is what bounds a request head (431 beyond);
    // bodies stream through it in chunks.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes as usize)
        .max_headers(limits.max_headers as usize)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

fn spawn_connection(
    stream: TcpStream,
    conn: Conn,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    graceful: &GracefulShutdown,
) {
    let header_read_timeout = limits.header_read_timeout;
    let _ = stream.set_nodelay(true);
    let peer = conn.peer;
    conn.count(&shared, 1);
    let counted = Arc::clone(&shared);
    let svc = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(crate::pipeline::handle(shared, req, peer).await) }
    });
    let watcher = graceful.watcher();
    // HTTP over plain TCP or TLS: the same serving, two stream types.
    macro_rules! serve_http {
        ($io:expr) => {
            watcher
                .watch(
                    builder(limits)
                        .serve_connection(
                            TokioIo::new(FirstByte::new($io, header_read_timeout)),
                            svc,
                        )
                        .into_owned(),
                )
                .await
        };
    }
    tokio::spawn(async move {
        let result = match tls {
            None => serve_http!(stream),
            // Boxed: a TLS connection's state is larger (the task of a plain
            // one went from 4,632 to 2,224 bytes), and plain connections
            // should not reserve room for it.
            Some(acceptor) => {
                Box::pin(async move {
                    // The graceful watcher covers the HTTP connection only,
                    // so the handshake gets its own deadline.
                    match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_http!(s),
                        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                })
                .await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, "connection ended: {e}");
        }
        conn.count(&counted, -1);
        drop(conn.slot);
    });
}

pin_project_lite::pin_project! {
    /// A client connection that must send its first byte within a
    /// deadline. hyper's header read timeout starts only once it knows the
    /// protocol, so a client that connects and stays silent would
    /// otherwise hold its connection (and slot) forever.
    struct FirstByte<IO> {
        #[pin]
        io: IO,
        deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<IO> FirstByte<IO> {
    fn new(io: IO, within: Duration) -> FirstByte<IO> {
        FirstByte {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<IO: tokio::io::AsyncRead> tokio::io::AsyncRead for FirstByte<IO> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::{future::Future as _, task::Poll};
        let this = self.project();
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        if let Some(d) = this.deadline.as_mut() {
            match r {
                Poll::Ready(Ok(())) if buf.filled().len() > before => *this.deadline = None,
                Poll::Pending if d.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client sent nothing within the header read timeout",
                    )));
                }
                _ => {}
            }
        }
        r
    }
}

impl<IO: tokio::io::AsyncWrite> tokio::io::AsyncWrite for FirstByte<IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
