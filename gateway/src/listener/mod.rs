//! Listening sockets and connections: accept (with a per-client-IP limit on
//! concurrent connections), optional TLS, then HTTP/1.1 (the gateway's own
//! connection, `h1`) or HTTP/2 (hyper's; ALPN over TLS, prior knowledge in
//! clear text), with a header read timeout against slow clients and
//! graceful shutdown. `workers` runs one of these per worker thread.

pub mod balancer;
pub mod guard;
pub mod h1;
mod h2_send;
pub mod limit;
pub mod tls;
pub mod workers;

use std::{
    convert::Infallible,
    future::poll_fn,
    io,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use self::h1::BoxIo;
use crate::metrics::Refusal;
use crate::{http1, pipeline::Shared};

/// One worker's listening sockets and connection settings.
pub struct Listeners {
    pub(crate) sockets: Vec<TcpListener>,
    pub(crate) worker: usize,
}

/// What a client connection may cost: how long it may take to send a
/// request head (and its first byte), and how large that head may be; and
/// how long it may finish when the gateway stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    /// How long a client may leave its response unread (per HTTP/2 stream).
    pub send_timeout: Duration,
    pub max_header_bytes: u32,
    pub max_headers: u32,
    pub drain_timeout: Duration,
    /// `server.keepalive_requests` (0 = no limit).
    pub keepalive_requests: u32,
}

impl ConnLimits {
    pub fn new(s: &crate::config::ServerConfig) -> ConnLimits {
        ConnLimits {
            header_read_timeout: s.header_read_timeout,
            send_timeout: s.send_timeout,
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            drain_timeout: s.drain_timeout,
            keepalive_requests: s.keepalive_requests,
        }
    }
}

impl Listeners {
    /// Serves until `shutdown` fires, then stops accepting and gives open
    /// connections up to `server.drain_timeout` (as last reloaded) to finish.
    pub async fn serve(
        self,
        shared: Arc<Shared>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        // Every connection holds a receiver; `true` asks it to finish its
        // current request and close, and the sender sees when all are gone.
        let (drain_tx, drain_rx) = watch::channel(false);
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
        // The worker balancer's estimate of this worker's load is corrected
        // every second too, not only when a connection closes: a worker
        // whose connections stay open (or that has none) would otherwise
        // keep what the program added for handshakes that never completed.
        let mut full_warning = FullWarning::default();
        let mut publish = tokio::time::interval(LOAD_PUBLISH);
        publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = publish.tick() => {
                    if let Some(b) = shared.balancer.get() {
                        // Accepted but not yet served connections count too.
                        let load = conn_gauge.get().max(0) as usize + rx.len();
                        b.publish(self.worker, load as u32);
                    }
                }
                Some((stream, peer)) = rx.recv() => {
                    // A refusal is counted before the connection closes:
                    // whoever sees the close then sees the count too.
                    if let Err(why) = shared.guard.check(peer.ip()) {
                        if why == guard::Refused::RateLimited {
                            shared.metrics.refused(Refusal::Rate);
                            shared.abuse.record(peer.ip(), crate::pipeline::abuse::Cause::RateLimited);
                        } else {
                            shared.metrics.refused(Refusal::Blocked);
                        }
                        drop(stream);
                        continue;
                    }
                    let slot = match shared.per_ip.acquire(peer.ip()) {
                        Ok(slot) => slot,
                        Err(limit::Full::Client) => {
                            // Over max_connections_per_ip: close at once,
                            // and count it towards a ban.
                            shared.metrics.refused(Refusal::PerIp);
                            shared.abuse.record(peer.ip(), crate::pipeline::abuse::Cause::RateLimited);
                            drop(stream);
                            continue;
                        }
                        Err(limit::Full::All) => {
                            // Over max_connections: close at once; the
                            // open files kept back serve the open ones.
                            shared.metrics.refused(Refusal::Total);
                            drop(stream);
                            full_warning.note(shared.per_ip.max_total());
                            continue;
                        }
                    };
                    if let Some(t) = shared.trust.get() {
                        t.record(peer.ip());
                    }
                    let conn = Conn { peer, slot, gauge: conn_gauge.clone(), worker: self.worker };
                    let limits = **shared.conn_limits.load();
                    spawn_connection(stream, conn, Arc::clone(&shared), limits, drain_rx.clone());
                }
                _ = shutdown.changed() => break,
            }
        }
        for t in accept_tasks {
            t.abort();
        }
        let drain = shared.conn_limits.load().drain_timeout;
        if self.worker == 0 {
            tracing::info!(drain = ?drain, "stopped accepting; draining open connections");
        }
        drop(drain_rx);
        drain_tx.send_replace(true);
        if tokio::time::timeout(drain, drain_tx.closed()).await.is_ok() {
            return;
        }
        // Open streams end with an error event the client's SDK can read,
        // at their next piece, rather than a cut in the middle of the
        // body; the connections that carried them then close. What is
        // still open a moment later is closed as it is.
        shared
            .cut_streams
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let cut_off = tokio::time::timeout(CUT_GRACE, drain_tx.closed())
            .await
            .is_err();
        tracing::warn!(
            worker = self.worker,
            "drain deadline reached; open streams were ended with an error event{}",
            if cut_off {
                ", and the remaining connections closed"
            } else {
                ""
            }
        );
    }
}

/// How often a worker writes its exact open-connection count for the
/// worker balancer, besides at each close.
const LOAD_PUBLISH: Duration = Duration::from_secs(1);

/// How long, after the drain ran out, the ended streams have to get their
/// error event out before their connections are closed.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// What a connection holds while it is open: its per-IP slot and its place
/// in the worker's connection count.
struct Conn {
    peer: SocketAddr,
    slot: limit::Slot,
    gauge: prometheus::IntGauge,
    worker: usize,
}

impl Conn {
    /// Counts the connection in (`+1`) or out (`-1`). A connection coming
    /// in was counted for this worker by the sk_reuseport program when it
    /// chose the worker (at the SYN, before any accept, so a burst
    /// spreads); a connection going out publishes the worker's exact count,
    /// which also corrects what the program's estimate missed. The
    /// balancer sees a close before the gauge does.
    fn count(&self, shared: &Shared, delta: i64) {
        if delta < 0 {
            if let Some(b) = shared.balancer.get() {
                b.publish(self.worker, (self.gauge.get() + delta).max(0) as u32);
            }
        }
        self.gauge.add(delta);
    }
}

/// Connections refused at `server.max_connections`, said in the log at
/// most once a minute per worker.
#[derive(Default)]
struct FullWarning {
    refused: u64,
    said: Option<tokio::time::Instant>,
}

impl FullWarning {
    fn note(&mut self, max: u32) {
        self.refused += 1;
        let now = tokio::time::Instant::now();
        if self
            .said
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            tracing::warn!(
                max_connections = max,
                refused = self.refused,
                "new connections refused: server.max_connections are open"
            );
            self.said = Some(now);
            self.refused = 0;
        }
    }
}

/// Streams one HTTP/2 connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Response bytes one HTTP/2 stream may queue for a slow client.
const MAX_SEND_BUF: usize = 64 * 1024;

fn spawn_connection(
    stream: TcpStream,
    conn: Conn,
    shared: Arc<Shared>,
    limits: ConnLimits,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    // The certificate of the moment: a reload's renewed one from the next
    // connection on.
    let tls: Option<Arc<TlsAcceptor>> = shared.tls_certs.get().map(|c| c.load_full());
    let peer = conn.peer;
    conn.count(&shared, 1);
    tokio::spawn(async move {
        let result = match tls {
            None => serve_client(Box::new(stream), false, &shared, peer, limits, drain).await,
            // Boxed: a TLS handshake's state is large, and plain
            // connections should not reserve room for it.
            Some(acceptor) => {
                Box::pin(async {
                    // The handshake has its own deadline.
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => {
                            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve_client(Box::new(s), h2, &shared, peer, limits, drain).await
                        }
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
        conn.count(&shared, -1);
        drop(conn.slot);
    });
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one client connection: HTTP/2 when ALPN chose it or the client
/// opens with the HTTP/2 preface, HTTP/1.1 otherwise.
async fn serve_client(
    mut io: BoxIo,
    alpn_h2: bool,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    limits: ConnLimits,
    drain: watch::Receiver<bool>,
) -> Result<(), crate::pipeline::stream::BoxError> {
    let mut buf = BytesMut::new();
    // A client that connects and stays silent is closed after the header
    // read timeout, before any protocol is chosen; the same deadline holds
    // for its first request head, so a slow first byte does not double it.
    let head_by = tokio::time::Instant::now() + limits.header_read_timeout;
    let h2 = alpn_h2
        || tokio::time::timeout_at(head_by, sniff(&mut io, &mut buf))
            .await
            .map_err(|_| "client sent nothing within the header read timeout")??;
    if h2 {
        // Boxed: hyper's HTTP/2 connection state is larger than an
        // HTTP/1.1 connection's, which should not carry room for it.
        Box::pin(serve_h2(io, buf.freeze(), shared, peer, limits, drain)).await
    } else {
        Ok(h1::serve(io, buf, Arc::clone(shared), peer, limits, drain, head_by).await?)
    }
}

/// Reads until the first bytes either are or cannot be the HTTP/2 preface.
async fn sniff(io: &mut BoxIo, buf: &mut BytesMut) -> io::Result<bool> {
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        let got = poll_fn(|cx| {
            http1::poll_read_with(io, cx, http1::READ_CHUNK, |b| {
                buf.extend_from_slice(b);
                b.len()
            })
        })
        .await?;
        if got == 0 {
            return Ok(false);
        }
    }
}

/// How many streams of an HTTP/2 connection are open, and since when none
/// has been; how many it opened, and how many of those the client reset
/// before their answer.
struct H2Activity {
    open: std::sync::atomic::AtomicUsize,
    /// When the last stream ended, by the coarse monotonic clock
    /// (`crate::clock`), in nanoseconds: a stamp per stream, checked
    /// against a timeout of seconds.
    idle_since: AtomicU64,
    opened: AtomicU64,
    reset_early: AtomicU64,
    /// Told when the resets pass [`reset_flood`].
    flood: tokio::sync::Notify,
    /// Told when `server.keepalive_requests` streams were opened.
    enough: tokio::sync::Notify,
}

/// Streams an HTTP/2 connection must have opened before its resets are
/// judged, and the share of them reset before their answer that closes it.
/// A client that opens streams and resets them once the server accepted
/// them (so h2's own limit on resets of streams not yet accepted never
/// sees them) makes the gateway start work it throws away, at the rate of
/// its round trips; Envoy closes such a connection at the same share.
const RESET_FLOOD_MIN: u64 = 200;

fn reset_flood(opened: u64, reset_early: u64) -> bool {
    opened >= RESET_FLOOD_MIN && 2 * reset_early > opened
}

/// How soon after it opened a stream reset before its answer counts:
/// Envoy's `premature_reset_min_stream_lifetime`. A client whose own
/// timeout gives up on a slow answer resets later than this.
const RESET_EARLY: Duration = Duration::from_secs(1);

/// A stream's request until its answer is ready: dropped before that (the
/// client reset the stream) within [`RESET_EARLY`], it counts as reset
/// early.
struct Answering<'a> {
    activity: &'a H2Activity,
    opened: tokio::time::Instant,
    answered: bool,
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        if self.answered || self.opened.elapsed() >= RESET_EARLY {
            return;
        }
        let a = self.activity;
        let reset = a.reset_early.fetch_add(1, Ordering::Relaxed) + 1;
        if reset_flood(a.opened.load(Ordering::Relaxed), reset) {
            a.flood.notify_one();
        }
    }
}

/// The coarse monotonic clock in nanoseconds.
fn coarse_nanos() -> u64 {
    crate::clock::coarse_monotonic().as_nanos() as u64
}

/// One open stream; its end (the response body dropped) is counted.
struct StreamOpen(Arc<H2Activity>);

impl StreamOpen {
    fn new(a: &Arc<H2Activity>) -> StreamOpen {
        a.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StreamOpen(Arc::clone(a))
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0
            .idle_since
            .store(coarse_nanos(), std::sync::atomic::Ordering::Relaxed);
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An HTTP/2 connection, served by hyper, drained gracefully (GOAWAY, then
/// open streams finish) when `drain` turns true, or once it has had no
/// open stream for `header_read_timeout`: the idle keep-alive limit of an
/// HTTP/1.1 connection (hyper's server has none for HTTP/2, and its pings
/// only find dead peers).
async fn serve_h2(
    io: BoxIo,
    read: Bytes,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    limits: ConnLimits,
    mut drain: watch::Receiver<bool>,
) -> Result<(), crate::pipeline::stream::BoxError> {
    let shared = Arc::clone(shared);
    let activity = Arc::new(H2Activity {
        open: Default::default(),
        idle_since: AtomicU64::new(coarse_nanos()),
        opened: AtomicU64::new(0),
        reset_early: AtomicU64::new(0),
        flood: tokio::sync::Notify::new(),
        enough: tokio::sync::Notify::new(),
    });
    let keepalive_requests = u64::from(limits.keepalive_requests);
    let watch = Arc::new(h2_send::Watch::default());
    let max_headers = limits.max_headers as usize;
    let svc = {
        let activity = Arc::clone(&activity);
        let watch = Arc::clone(&watch);
        let shared = Arc::clone(&shared);
        hyper::service::service_fn(move |req| {
            let shared = Arc::clone(&shared);
            let open = StreamOpen::new(&activity);
            if activity.opened.fetch_add(1, Ordering::Relaxed) + 1 == keepalive_requests {
                activity.enough.notify_one();
            }
            let activity = Arc::clone(&activity);
            let watch = Arc::clone(&watch);
            // Boxed: hyper spawns each stream as a task holding this
            // future, and the runtime moves a task's future by value when
            // it spawns it and when it finishes (~4 KiB each time, the
            // pipeline's future inline); a box moves as a pointer.
            h1::boxed(move || async move {
                let mut answering = Answering {
                    activity: &activity,
                    opened: tokio::time::Instant::now(),
                    answered: false,
                };
                let head_only = req.method() == http::Method::HEAD;
                // HTTP/1.1 counts header fields as it parses; hyper's
                // HTTP/2 server bounds only the header list's size. A
                // browser sends each cookie as a field of its own over
                // HTTP/2 (RFC 9113 8.2.3): they count as the one field
                // they are over HTTP/1.1.
                let fields = |h: &http::HeaderMap| {
                    let cookies = h.get_all(http::header::COOKIE).iter().count();
                    h.len() - cookies.saturating_sub(1)
                };
                let mut r =
                    if req.headers().len() > max_headers && fields(req.headers()) > max_headers {
                        h1::refusal(
                            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "more request headers than server.max_headers",
                            peer,
                        )
                    } else {
                        crate::pipeline::handle(shared, req, peer).await
                    };
                if head_only {
                    // hyper's HTTP/2 server sends whatever body it is given,
                    // and DATA on a HEAD answer is a protocol error.
                    r = without_body(r).await;
                }
                answering.answered = true;
                // The stream stays open until its response body is done,
                // or the send timeout takes the body back from hyper.
                Ok::<_, Infallible>(r.map(|b| watch.watched(b, open)))
            })
        })
    };
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // What one stream may queue for a client that reads slowly (h2's
        // default is 400 KiB): a token stream never gets near it.
        .max_send_buf_size(MAX_SEND_BUF)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let mut conn = pin!(b.serve_connection(TokioIo::new(Prefixed { read, io }), svc));
    let idle = limits.header_read_timeout;
    let mut check = tokio::time::Instant::now() + idle;
    // The send timeout's tick (see `h2_send`).
    let period = h2_send::Watch::period(limits.send_timeout);
    let mut next_tick = tokio::time::Instant::now() + period;
    let drained = loop {
        tokio::select! {
            // The connection's end first: a client that leaves with streams
            // in flight drops them all at once, which is no reset flood.
            biased;
            r = conn.as_mut() => return Ok(r?),
            _ = drain.wait_for(|d| *d) => break true,
            _ = activity.flood.notified() => {
                tracing::warn!(
                    client = %peer.ip(),
                    opened = activity.opened.load(Ordering::Relaxed),
                    reset = activity.reset_early.load(Ordering::Relaxed),
                    "HTTP/2 connection closed: the client reset most of its streams before their answer"
                );
                shared.metrics.refused(Refusal::Http2Resets);
                shared.abuse.record(peer.ip(), crate::pipeline::abuse::Cause::RateLimited);
                return Ok(());
            }
            // The connection served its share: GOAWAY, the open streams
            // finish, and the client opens a new connection (which may go
            // to another worker).
            _ = activity.enough.notified() => break true,
            _ = tokio::time::sleep_until(check.min(next_tick)) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= next_tick {
            next_tick = now + period;
            let cut = watch.tick();
            if cut > 0 {
                // The connection takes no new stream, and closes once the
                // others are done.
                tracing::info!(client = %peer.ip(), streams = cut, "HTTP/2 streams cut: the client took none of their response within the send timeout; the connection takes no new stream");
                break true;
            }
            if now < check {
                continue;
            }
        }
        let open = activity.open.load(std::sync::atomic::Ordering::Relaxed);
        let since = activity.idle_since.load(Ordering::Relaxed);
        let idled = Duration::from_nanos(coarse_nanos().saturating_sub(since));
        if open == 0 && idled >= idle {
            break false;
        }
        // Look again once the connection could have been idle that long
        // (with streams open, that long after now).
        check = tokio::time::Instant::now()
            + if open == 0 {
                idle.saturating_sub(idled)
            } else {
                idle
            };
    };
    conn.as_mut().graceful_shutdown();
    if drained {
        // Open streams finish (more may be cut meanwhile). Streams cut for
        // the send timeout never do: hyper holds them, waiting for window.
        // Once no other stream is open, hyper gets a send timeout to write
        // out what it holds, and the connection is then dropped, which
        // ends the cut streams.
        let mut flushed_by = None;
        loop {
            let wake = flushed_by.unwrap_or(next_tick).min(next_tick);
            tokio::select! {
                biased;
                r = conn.as_mut() => return Ok(r?),
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = tokio::time::Instant::now();
            if flushed_by.is_some_and(|t| now >= t) {
                return Ok(());
            }
            if now >= next_tick {
                next_tick = now + period;
                watch.tick();
            }
            if flushed_by.is_none() && activity.open.load(Ordering::Relaxed) == 0 {
                flushed_by = Some(now + limits.send_timeout);
            }
        }
    }
    // Idle: GOAWAY, then hyper waits for the client to acknowledge a ping
    // before it closes. A client that never does is cut after one more
    // timeout; no stream was open.
    match tokio::time::timeout(idle, conn.as_mut()).await {
        Ok(r) => Ok(r?),
        Err(_) => Ok(()),
    }
}

/// The answer to a HEAD request: its head, with the length its body would
/// have had, and no body. The body is polled once before it goes, so a
/// proxied one ends as complete rather than as abandoned.
async fn without_body(
    r: http::Response<crate::pipeline::ResponseBody>,
) -> http::Response<crate::pipeline::ResponseBody> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    let (mut parts, mut body) = r.into_parts();
    if let Some(n) = body.size_hint().exact() {
        parts
            .headers
            .entry(http::header::CONTENT_LENGTH)
            .or_insert_with(|| http::HeaderValue::from(n));
    }
    let _ = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
    drop(body);
    let empty = http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    http::Response::from_parts(parts, empty)
}

/// A connection whose first bytes were read already (to choose the
/// protocol): they are read again before the socket.
struct Prefixed {
    read: Bytes,
    io: BoxIo,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
