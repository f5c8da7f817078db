//! Sockets and connections: binds the listener, accepts, and serves each
//! connection with hyper's auto builder (HTTP/1.1 and h2c prior knowledge
//! on one port). Each connection gets a `kill` signal through which a
//! request can have the whole TCP connection reset (`reset`, `midstream:N`):
//! hyper has no way to drop a connection from inside a service, so the task
//! that owns it does.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::options::MockOptions;
use super::render;
use super::stats::{MockStats, RequestLog};

/// What every request of one mock shares.
pub(crate) struct Shared {
    pub opts: MockOptions,
    /// The `x-mock-name` value, validated once.
    pub name: HeaderValue,
    /// The `/v1/models` body, rendered once.
    pub models: Bytes,
    pub stats: Arc<MockStats>,
    pub log: RequestLog,
    /// The failure injected into every request now (`MockLlm::set_fail`);
    /// starts as `opts.fail`.
    pub fail: std::sync::Mutex<Option<super::Failure>>,
    /// The latency of every request now (`MockLlm::set_latency`).
    pub latency: std::sync::Mutex<Duration>,
    /// The delay of every stream's first chunk now
    /// (`MockLlm::set_first_token`).
    pub first_token: std::sync::Mutex<Duration>,
}

impl Shared {
    pub fn current_fail(&self) -> Option<super::Failure> {
        *self.fail.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current_latency(&self) -> Duration {
        *self.latency.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current_first_token(&self) -> Duration {
        *self.first_token.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    pub fn new(opts: MockOptions) -> anyhow::Result<Shared> {
        let name = HeaderValue::from_str(&opts.name)
            .map_err(|_| anyhow::anyhow!("mock name {:?} is not a header value", opts.name))?;
        Ok(Shared {
            models: render::models(&opts.models),
            name,
            fail: std::sync::Mutex::new(opts.fail),
            latency: std::sync::Mutex::new(opts.latency),
            first_token: std::sync::Mutex::new(Duration::ZERO),
            opts,
            stats: Arc::default(),
            log: RequestLog::default(),
        })
    }
}

/// What the requests of one connection share.
pub(crate) struct ConnCtx {
    pub shared: Arc<Shared>,
    /// Notified by a request that wants this connection reset.
    pub kill: Arc<Notify>,
}

/// How long a killed connection still runs so that what it already
/// produced (the events before a `midstream:N` cut) reaches the socket.
const FLUSH_GRACE: Duration = Duration::from_millis(10);

/// A non-blocking listener with a deep backlog, so a benchmark's burst of
/// connects is not refused by the mock.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Accepts until the task is aborted. The connections live in a `JoinSet`
/// owned by this task, so aborting it aborts them all.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let builder = Arc::new(builder());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_conn(stream, shared.clone(), builder.clone()));
                }
                Err(e) => {
                    // Out of descriptors or a connection reset while queued:
                    // back off a little instead of spinning.
                    tracing::debug!("mock-llm: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set does not grow forever.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // No header timeout: it needs a timer, and a mock should wait for as
    // slow a client as a test makes.
    b.http1().keep_alive(true).header_read_timeout(None);
    // Benchmarks multiplex many streams over few h2 connections.
    b.http2().max_concurrent_streams(100_000);
    b
}

async fn serve_conn(
    stream: TcpStream,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    // SSE events are small writes that must leave at once.
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    let kill = Arc::new(Notify::new());
    let ctx = Arc::new(ConnCtx {
        shared,
        kill: kill.clone(),
    });
    let service = service_fn(move |req| super::handler::handle(ctx.clone(), req));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let killed = tokio::select! {
        res = &mut conn => {
            if let Err(e) = res {
                tracing::debug!("mock-llm: connection: {e}");
            }
            false
        }
        () = kill.notified() => true,
    };
    if killed {
        let _ = tokio::time::timeout(FLUSH_GRACE, &mut conn).await;
        reset_on_close(fd);
    }
    // `conn` drops here and closes the socket: with a RST if killed.
}

/// Makes closing the socket send a RST instead of a FIN (SO_LINGER 0), as a
/// crashed or overloaded upstream does.
fn reset_on_close(fd: RawFd) {
    // SAFETY: `fd` is the socket of the connection future that the caller
    // still owns and drops only after this returns, so it is open and is
    // not reused for another file while borrowed here.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    if let Err(e) = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO)) {
        tracing::debug!("mock-llm: SO_LINGER: {e}");
    }
}
