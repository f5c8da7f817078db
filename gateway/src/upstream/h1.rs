//! The HTTP/1.1 client for `http://` backends.
//!
//! The request's own task writes the request and reads the response: there
//! is no connection task and no channel between the two, so a proxied
//! request costs no extra task wake-ups. A connection holds no buffer while
//! it waits: reads go to a stack buffer and only the bytes that arrived are
//! copied out, so an open stream costs its socket and a few hundred bytes
//! (hyper's client keeps 8 KiB read and write buffers and a dispatch channel
//! per connection for its whole life).
//!
//! Idle connections are kept per worker (a socket is registered with the
//! runtime that opened it), most recently used first. A kept connection the
//! backend closed while it was idle is noticed when it is taken, or, if the
//! close races the request, by the request failing before any response
//! byte; such a request is sent again on another connection, as nginx does
//! with its upstream keepalive connections.

use std::{
    future::Future,
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

pub use crate::http1::Chunked;
use crate::http1::{self, READ_CHUNK};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    time::Sleep,
};

/// Largest response head accepted (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size go out in the same write as the head.
const COALESCE_BODY: usize = 16 * 1024;
/// Idle connections kept per worker and backend.
const MAX_IDLE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connection closed before a complete response head")]
    Closed,
    /// The response head did not come by the caller's deadline.
    #[error("no response head in time")]
    AnswerTimeout,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

impl Error {
    /// The backend could not be reached at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Resolve { .. } | Error::Connect { .. })
    }

    /// No connection could be made in time (the request was not sent).
    pub fn is_connect_timeout(&self) -> bool {
        matches!(self, Error::ConnectTimeout(_))
    }

    /// The response head did not come by the deadline `send` was given.
    pub fn is_answer_timeout(&self) -> bool {
        matches!(self, Error::AnswerTimeout)
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::ConnectTimeout(_) | Error::AnswerTimeout)
            || matches!(self, Error::Io(e) if e.kind() == io::ErrorKind::TimedOut)
    }

    /// A kept-alive connection turned out to be closed before the backend
    /// sent anything: the request can go again on another connection.
    fn is_stale(&self) -> bool {
        match self {
            Error::Closed => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// How soon after a request is written a kept connection's close counts as
/// the close racing the request (the backend never read it).
const STALE_RACE: Duration = Duration::from_millis(250);

/// Idle connections of one worker to one backend.
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    timeout: Duration,
}

/// A connection to a backend, with the timer that bounds the wait for each
/// response head on it. The timer goes with the connection through the
/// pool: moved to a later deadline, a registered timer takes one store,
/// where a timer per request cost a registration and a removal each. (A
/// timer whose deadline passes while its connection is idle, or reading a
/// body, wakes the task that last waited on it once, for nothing.)
struct Conn {
    stream: TcpStream,
    answer_by: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(stream: TcpStream, answer_by: tokio::time::Instant) -> Conn {
        Conn {
            stream,
            answer_by: Box::pin(tokio::time::sleep_until(answer_by)),
        }
    }
}

/// `io`, unless the answer's deadline (`timer`) passes first.
async fn within<F: Future>(timer: &mut Pin<Box<Sleep>>, io: F) -> Result<F::Output, Error> {
    http1::before(timer.as_mut(), io)
        .await
        .ok_or(Error::AnswerTimeout)
}

struct Idle {
    conn: Conn,
    /// When it went idle, by the coarse monotonic clock (`crate::clock`):
    /// the idle timeout needs no finer time, and a precise read per
    /// request costs more on some VMs.
    since: Duration,
}

impl Pool {
    fn new(timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            timeout,
        }
    }

    /// The most recently used connection that is still open.
    fn take(&self) -> Option<Conn> {
        let now = crate::clock::coarse_monotonic();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut dead = Vec::new();
        while let Some(c) = idle.pop() {
            if now.saturating_sub(c.since) >= self.timeout {
                // The most recent is past the timeout: so are all below it.
                dead.push(c);
                dead.append(&mut idle);
                break;
            }
            if still_open(&c.conn.stream) {
                drop(idle);
                close_aside(dead);
                return Some(c.conn);
            }
            dead.push(c);
        }
        drop(idle);
        close_aside(dead);
        None
    }

    fn put(&self, conn: Conn) {
        let now = crate::clock::coarse_monotonic();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The least recently used sit at the bottom: those past the idle
        // timeout (the backend has most likely closed them) go.
        let expired = idle
            .iter()
            .take_while(|c| now.saturating_sub(c.since) >= self.timeout)
            .count();
        let mut dead: Vec<Idle> = idle.drain(..expired).collect();
        if idle.len() >= MAX_IDLE {
            // Full: the least recently used one goes.
            dead.push(idle.remove(0));
        }
        idle.push(Idle { conn, since: now });
        drop(idle);
        close_aside(dead);
    }

    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Closes connections taken out of a pool off the request path. Each close
/// of a TCP socket sends its FIN, and to a backend on the same host the
/// kernel runs the peer's side of it in the same call: the 320 a burst of
/// 640 streams left in one worker's pool, expiring together, took 8-12 ms
/// to close (`bench l7`), which in line would hold every request on that
/// worker. They go to the blocking pool (one task per batch) when there is
/// a runtime, else close here.
fn close_aside(dead: Vec<Idle>) {
    match dead.len() {
        0 => {}
        1 => drop(dead),
        _ => match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || drop(dead));
            }
            Err(_) => drop(dead),
        },
    }
}

/// Whether an idle connection shows no sign of the peer having closed it or
/// sent something unasked. Costs no system call unless the socket became
/// readable while idle.
fn still_open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Where a backend is and how to reach it, with one pool per worker.
pub struct Client {
    /// Host as written in the URL (brackets removed for IPv6), for DNS.
    host: String,
    port: u16,
    /// The address when the host is an IP literal (no lookup then).
    ip: Option<IpAddr>,
    /// The `Host` header: the URL's authority.
    authority: String,
    connect_timeout: Duration,
    pools: Vec<Arc<Pool>>,
    /// Which of a name's addresses new connections try first, in turn: a
    /// name with several (DNS round robin, a headless Service) spreads its
    /// connections over them rather than all going to the first.
    next_addr: std::sync::atomic::AtomicUsize,
}

impl Client {
    pub fn new(
        authority: &http::uri::Authority,
        connect_timeout: Duration,
        idle_timeout: Duration,
        workers: usize,
    ) -> Client {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Client {
            ip: host.parse().ok(),
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            connect_timeout,
            pools: (0..workers.max(1))
                .map(|_| Arc::new(Pool::new(idle_timeout)))
                .collect(),
            next_addr: Default::default(),
        }
    }

    /// The calling worker's pool.
    fn pool(&self) -> &Arc<Pool> {
        &self.pools[crate::listener::workers::current() % self.pools.len()]
    }

    /// Idle connections across the workers' pools.
    pub fn idle(&self) -> usize {
        self.pools.iter().map(|p| p.idle()).sum()
    }

    /// Sends one request; returns once the response head has arrived. The
    /// body is read as the returned `Body` is polled; the connection goes
    /// back to the pool when the body has been read to its end. The
    /// response head must come by `answer_by` (connecting and writing the
    /// request included), or the request fails with
    /// [`Error::AnswerTimeout`].
    pub async fn send(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &(impl HeadFields + ?Sized),
        body: Bytes,
        answer_by: tokio::time::Instant,
    ) -> Result<Response<Body>, Error> {
        let mut wire = encode_head(method, path_and_query, &self.authority, headers, &body);
        let separate_body = body.len() > COALESCE_BODY;
        if !separate_body {
            wire.extend_from_slice(&body);
        }
        let no_body = *method == Method::HEAD;
        let pool = self.pool();
        // A kept connection the backend has just closed fails before any
        // response byte: try another kept one, then a new connection.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let pooled = if attempt <= 2 { pool.take() } else { None };
            let (mut conn, reused) = match pooled {
                Some(c) => (c, true),
                None => match tokio::time::timeout_at(answer_by, self.connect()).await {
                    Ok(stream) => (Conn::new(stream?, answer_by), false),
                    Err(_) => return Err(Error::AnswerTimeout),
                },
            };
            if conn.answer_by.deadline() != answer_by {
                conn.answer_by.as_mut().reset(answer_by);
            }
            let Conn {
                stream,
                answer_by: timer,
            } = &mut conn;
            let sent = within(timer, async {
                stream.write_all(&wire).await?;
                if separate_body {
                    stream.write_all(&body).await?;
                }
                Ok::<_, io::Error>(())
            })
            .await?;
            // Only a kept connection can have been closed under us. (The
            // coarse clock: the race's window is hundreds of milliseconds.)
            let sent_at = reused.then(crate::clock::coarse_monotonic);
            let write_failed = sent.is_err();
            let result = match sent {
                Ok(()) => read_head(conn, no_body, Arc::clone(pool)).await,
                Err(e) => Err(Error::Io(e)),
            };
            match result {
                // The close raced the request: the backend had closed the
                // kept connection before it could read it. Once the
                // backend has had the request for longer, it may have
                // acted on it, and it is not sent again here (the retry
                // policy and budget decide, and count it).
                Err(e)
                    if reused
                        && e.is_stale()
                        && (write_failed
                            || sent_at.is_some_and(|t| {
                                crate::clock::coarse_monotonic().saturating_sub(t) < STALE_RACE
                            })) =>
                {
                    tracing::debug!(backend = %self.authority, "kept connection was closed: {e}; sending again");
                }
                r => return r,
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, Error> {
        let addrs: Vec<SocketAddr> = match self.ip {
            Some(ip) => vec![SocketAddr::new(ip, self.port)],
            None => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|source| Error::Resolve {
                    host: self.host.clone(),
                    source,
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(Error::Resolve {
                host: self.host.clone(),
                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            });
        }
        let mut addrs = addrs;
        if addrs.len() > 1 {
            let first = self
                .next_addr
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let n = addrs.len();
            addrs.rotate_left(first % n);
        }
        // Each address gets an equal share of what is left of the timeout.
        let deadline = Instant::now() + self.connect_timeout;
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / (addrs.len() - i) as u32;
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    let _ = socket2::SockRef::from(&s).set_tcp_keepalive(&super::tcp_keepalive());
                    return Ok(s);
                }
                Ok(Err(source)) => {
                    last = Some(Error::Connect {
                        addr: *addr,
                        source,
                    })
                }
                Err(_) => last = Some(Error::ConnectTimeout(addr.to_string())),
            }
        }
        Err(last.expect("at least one address was tried"))
    }
}

/// The header fields of a request head, written as they go on the wire:
/// `name: value\r\n` each (the host field excluded: the client writes it).
pub trait HeadFields {
    /// Bytes `write_fields` is expected to write, to size the buffer.
    fn fields_len(&self) -> usize;
    fn write_fields(&self, w: &mut Vec<u8>);
}

impl HeadFields for HeaderMap {
    fn fields_len(&self) -> usize {
        self.iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum()
    }

    fn write_fields(&self, w: &mut Vec<u8>) {
        for (n, v) in self {
            field(w, n.as_str().as_bytes(), v.as_bytes());
        }
    }
}

/// One `name: value\r\n` line.
#[inline]
pub fn field(w: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    w.extend_from_slice(name);
    w.extend_from_slice(b": ");
    w.extend_from_slice(value);
    w.extend_from_slice(b"\r\n");
}

/// The request line and headers (the caller sets `content-length`).
fn encode_head(
    method: &Method,
    path_and_query: &str,
    authority: &str,
    headers: &(impl HeadFields + ?Sized),
    body: &[u8],
) -> Vec<u8> {
    let mut len =
        method.as_str().len() + path_and_query.len() + authority.len() + 32 + headers.fields_len();
    if body.len() <= COALESCE_BODY {
        len += body.len();
    }
    let mut w = Vec::with_capacity(len);
    w.extend_from_slice(method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(path_and_query.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    w.extend_from_slice(authority.as_bytes());
    w.extend_from_slice(b"\r\n");
    headers.write_fields(&mut w);
    w.extend_from_slice(b"\r\n");
    w
}

/// Reads and parses the response head (skipping 1xx interim responses).
async fn read_head(
    mut conn: Conn,
    no_body: bool,
    pool: Arc<Pool>,
) -> Result<Response<Body>, Error> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Some((head_len, parsed)) = parse_head(&buf)? {
            let head = buf.split_to(head_len).freeze();
            // SAFETY: `head` is the head just parsed, split off unchanged.
            let (mut resp, noted) = unsafe { parsed.into_response(&head) }?;
            let status = resp.status();
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::Invalid("unexpected 101 Switching Protocols"));
                }
                continue;
            }
            let (framing, keep_alive) = framing(&resp, noted, no_body)?;
            if !matches!(framing, Framing::Length(_)) {
                // A Content-Length beside Transfer-Encoding does not frame
                // this body; passed on, it would frame the client's.
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
            let body = Body {
                conn: Some(conn),
                pool,
                framing,
                keep_alive,
                leftover: buf.freeze(),
            };
            let (parts, ()) = resp.into_parts();
            return Ok(Response::from_parts(parts, body.settle()));
        }
        if buf.len() >= MAX_HEAD {
            return Err(Error::Invalid("response head larger than 64 KiB"));
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(buf.len().max(4096));
        }
        if within(&mut conn.answer_by, conn.stream.read_buf(&mut buf)).await?? == 0 {
            return Err(if buf.is_empty() {
                Error::Closed
            } else {
                Error::Invalid("connection closed inside the response head")
            });
        }
    }
}

/// What `inspect_head` found.
#[doc(hidden)]
pub struct HeadSummary {
    pub len: usize,
    pub status: u16,
    /// `None`: chunked; `u64::MAX`: until the close.
    pub body: Option<u64>,
    pub keep_alive: bool,
}

/// For the fuzzer: parses a response head at the start of `buf` as one read
/// from a backend would be, and decides its framing.
#[doc(hidden)]
pub fn inspect_head(buf: &[u8]) -> Result<Option<HeadSummary>, Error> {
    let Some((len, parsed)) = parse_head(buf)? else {
        return Ok(None);
    };
    // SAFETY: a copy of the head just parsed.
    let (resp, noted) = unsafe { parsed.into_response(&Bytes::copy_from_slice(&buf[..len])) }?;
    let (f, keep) = framing(&resp, noted, false)?;
    let body = match f {
        Framing::Length(n) => Some(n),
        Framing::Chunked(_) => None,
        Framing::Eof | Framing::Done => Some(u64::MAX),
    };
    Ok(Some(HeadSummary {
        len,
        status: resp.status().as_u16(),
        body,
        keep_alive: keep,
    }))
}

/// A parsed head: where its parts are inside the head bytes.
struct Parsed {
    version: Version,
    status: u16,
    headers: http1::Fields,
}

/// Parses a response head at the start of `buf`; `None` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Parsed)>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut slots);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Invalid("more than 100 response headers"))
        }
        Err(_) => return Err(Error::Invalid("malformed response head")),
    };
    Ok(Some((
        len,
        Parsed {
            version: if r.version == Some(1) {
                Version::HTTP_11
            } else {
                Version::HTTP_10
            },
            status: r.code.unwrap_or(0),
            headers: http1::fields(buf, r.headers),
        },
    )))
}

impl Parsed {
    /// The response, its header values sharing the head's bytes.
    ///
    /// # Safety
    ///
    /// `head` holds the head this was parsed from (or a copy of it),
    /// unchanged: see [`http1::fill_headers`].
    unsafe fn into_response(self, head: &Bytes) -> Result<(Response<()>, http1::Noted), Error> {
        let mut resp = Response::new(());
        *resp.status_mut() =
            StatusCode::from_u16(self.status).map_err(|_| Error::Invalid("bad status code"))?;
        *resp.version_mut() = self.version;
        // SAFETY: the caller's promise.
        let noted = unsafe { http1::fill_headers(resp.headers_mut(), head, &self.headers) }
            .map_err(Error::Invalid)?;
        Ok((resp, noted))
    }
}

/// How the body's end is found (RFC 9112 section 6.3), and whether the
/// connection may carry another request after it.
fn framing(
    resp: &Response<()>,
    noted: http1::Noted,
    no_body: bool,
) -> Result<(Framing, bool), Error> {
    let h = resp.headers();
    let mut keep_alive = resp.version() == Version::HTTP_11 && !noted.connection_has(h, b"close");
    let status = resp.status().as_u16();
    if no_body || status == 204 || status == 304 {
        return Ok((Framing::Length(0), keep_alive));
    }
    let coding = match noted.transfer_encoding() {
        true => http1::tokens(h, header::TRANSFER_ENCODING).last(),
        false => None,
    };
    if let Some(last) = coding {
        if noted.has_content_length() {
            // Both: the length is ignored, and the connection not trusted.
            keep_alive = false;
        }
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            (Framing::Chunked(Chunked::default()), keep_alive)
        } else {
            (Framing::Eof, false)
        });
    }
    let len = noted.content_length(h).map_err(Error::Invalid)?;
    Ok(match len {
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::Eof, false),
    })
}

enum Framing {
    /// This many body bytes are still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    Eof,
    Done,
}

/// A response body read straight from the backend connection.
pub struct Body {
    /// `None` once the body has ended.
    conn: Option<Conn>,
    pool: Arc<Pool>,
    framing: Framing,
    keep_alive: bool,
    /// Bytes read with the head that belong to the body.
    leftover: Bytes,
}

impl Body {
    /// Ends an empty body at once, so its connection is free again.
    fn settle(mut self) -> Body {
        if matches!(self.framing, Framing::Length(0)) && self.leftover.is_empty() {
            self.framing = Framing::Done;
            self.release(true);
        }
        self
    }

    /// The body has ended: the connection goes back to the pool when the
    /// backend left it clean and reusable.
    fn release(&mut self, clean: bool) {
        if let Some(c) = self.conn.take() {
            if clean && self.keep_alive {
                self.pool.put(c);
            }
        }
    }

    /// Turns raw body bytes into data, advancing the framing.
    fn decode(&mut self, input: &[u8]) -> Result<Option<Bytes>, io::Error> {
        let invalid = |m: &'static str| io::Error::new(io::ErrorKind::InvalidData, m);
        match &mut self.framing {
            Framing::Length(rem) => {
                let take = (*rem).min(input.len() as u64) as usize;
                *rem -= take as u64;
                let clean = take == input.len();
                let data = Bytes::copy_from_slice(&input[..take]);
                if *rem == 0 {
                    self.framing = Framing::Done;
                    self.release(clean);
                }
                Ok(Some(data))
            }
            Framing::Chunked(c) => {
                let mut out = BytesMut::new();
                let used = c
                    .decode(input, &mut |d| out.extend_from_slice(d))
                    .map_err(invalid)?;
                if c.is_done() {
                    self.framing = Framing::Done;
                    self.release(used == input.len());
                }
                Ok((!out.is_empty()).then(|| out.freeze()))
            }
            Framing::Eof => Ok(Some(Bytes::copy_from_slice(input))),
            Framing::Done => Ok(None),
        }
    }

    /// At end of file: fine only for a body that runs to the close.
    fn at_eof(&mut self) -> Result<(), io::Error> {
        self.conn = None;
        match std::mem::replace(&mut self.framing, Framing::Done) {
            Framing::Eof | Framing::Done => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed the connection before the end of the body",
            )),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if matches!(this.framing, Framing::Done) {
                return Poll::Ready(None);
            }
            if !this.leftover.is_empty() {
                let input = std::mem::take(&mut this.leftover);
                // A length-delimited body read whole with the head: no copy.
                if let Framing::Length(rem) = &mut this.framing {
                    if input.len() as u64 <= *rem {
                        *rem -= input.len() as u64;
                        if *rem == 0 {
                            this.framing = Framing::Done;
                            this.release(true);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(input))));
                    }
                }
                match this.decode(&input) {
                    Ok(Some(d)) if !d.is_empty() => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(_) => continue,
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Never read past this response.
            let cap = match this.framing {
                Framing::Length(rem) => rem.min(READ_CHUNK as u64) as usize,
                _ => READ_CHUNK,
            };
            let mut raw = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut raw[..cap]);
            match Pin::new(&mut conn.stream).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(this.at_eof().err().map(Err));
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    // SAFETY: `poll_read` initialized the first `n` bytes.
                    let read = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), n) };
                    match this.decode(read) {
                        Ok(Some(d)) if !d.is_empty() => {
                            return Poll::Ready(Some(Ok(Frame::data(d))))
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            this.conn = None;
                            this.framing = Framing::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
