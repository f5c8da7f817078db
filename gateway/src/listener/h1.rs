//! The client-facing HTTP/1.1 connection.
//!
//! One task per connection, and no buffer held while it waits: reads go to
//! a stack buffer and only the bytes that arrived are kept, so a connection
//! between requests, or one whose response streams tokens, costs its socket
//! and a few hundred bytes (hyper keeps an 8 KiB read buffer and a write
//! buffer per connection for its whole life).
//!
//! A request:
//! - its head is read within `header_read_timeout` (which also ends idle
//!   keep-alive connections), at most `max_header_bytes` and `max_headers`
//!   (431 beyond); a malformed head gets 400; either way the connection
//!   closes;
//! - its body is framed by RFC 9112 section 6.3: Transfer-Encoding wins
//!   over Content-Length (and the connection closes after the answer),
//!   differing lengths or a final coding other than chunked get 400;
//! - the body is read from the connection only as the pipeline asks for
//!   it, so a request refused before its body (401, 404) never has it
//!   read; `Expect: 100-continue` is answered when the body is first read;
//! - while the pipeline waits on a backend, and while a response streams,
//!   the connection is watched: a client that leaves cancels its request
//!   (and so frees its backend slot);
//! - responses of known length get `content-length`, others are chunked
//!   (or run to the close for an HTTP/1.0 client);
//! - a connection closes after a response when the client asked, when a
//!   request body was left unread, or when the worker is draining; bytes
//!   the client still sends then are read and dropped for a moment so that
//!   its kernel does not reset the connection before the answer is read.

use std::{
    future::{poll_fn, Future as _},
    io,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    sync::{oneshot, watch},
};

use super::ConnLimits;
use crate::{
    http1::{self, Chunked},
    pipeline::{ResponseBody, Shared},
};

/// A client connection, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Header slots on the stack; more (a larger `max_headers`) go on the heap.
const STACK_HEADERS: usize = 128;
/// Response data up to this size is copied next to its framing and head
/// and sent in one write; larger data is written on its own.
const COALESCE: usize = 16 * 1024;
/// After a close with the client still sending: how long, and how much,
/// to read and drop so the answer is not lost to a reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// The connection between requests: the socket and any bytes read past
/// the previous request (a pipelined next one).
pub struct Conn {
    io: BoxIo,
    buf: BytesMut,
    /// The last request body was read to its end.
    body_done: bool,
}

impl Conn {
    /// Splits the first `n` buffered bytes off (a head, or a body that
    /// came with it). When nothing is left, the buffer lets go of their
    /// allocation, so that it goes with the request rather than staying
    /// with the connection as spare capacity.
    fn take_front(&mut self, n: usize) -> Bytes {
        let front = self.buf.split_to(n).freeze();
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        front
    }
}

/// Serves HTTP/1.1 requests on `io` (whose first bytes, already read, are
/// `buf`) until the client closes, an error, or `drain` turns true. The
/// first request's head must be complete by `first_head_by` (the
/// connection's start plus `header_read_timeout`: the wait for its first
/// bytes counts too); each later one gets `header_read_timeout` of its own.
pub async fn serve(
    io: BoxIo,
    buf: BytesMut,
    shared: Arc<Shared>,
    peer: SocketAddr,
    limits: ConnLimits,
    mut drain: watch::Receiver<bool>,
    first_head_by: tokio::time::Instant,
) -> io::Result<()> {
    let mut conn = Conn {
        io,
        buf,
        body_done: true,
    };
    let mut head_by = first_head_by;
    // One timer for every request head of the connection, moved forward
    // for each: a later deadline is one store into a registered timer,
    // where a timer per request cost a registration and a removal each.
    // (A request served for longer than the header timeout, a stream, sees
    // it fire once meanwhile: one spurious wake, then a registration.)
    let mut head_timer = pin!(tokio::time::sleep_until(first_head_by));
    let mut left = limits.keepalive_requests;
    loop {
        // The connection's last request (`server.keepalive_requests`) is
        // answered with `Connection: close`.
        left = left.saturating_sub(1);
        let last = limits.keepalive_requests != 0 && left == 0;
        if head_timer.deadline() != head_by {
            head_timer.as_mut().reset(head_by);
        }
        let timer = head_timer.as_mut();
        match exchange(conn, &shared, peer, &limits, &mut drain, timer, last).await? {
            Next::KeepAlive(c) => {
                conn = c;
                head_by = tokio::time::Instant::now() + limits.header_read_timeout;
            }
            Next::Close(mut c, linger) => {
                // Best effort: the answer has been written already.
                let _ = c.io.shutdown().await;
                if linger {
                    let _ = tokio::time::timeout(LINGER_TIME, discard(&mut c.io)).await;
                }
                return Ok(());
            }
            Next::Gone => return Ok(()),
        }
    }
}

/// What follows one request.
enum Next {
    KeepAlive(Conn),
    /// Close, lingering first when the client may still be sending.
    Close(Conn, bool),
    /// The client left (or sent nothing more): just drop the socket.
    Gone,
}

/// Reads and drops what the client sends, up to `LINGER_BYTES`.
async fn discard(io: &mut BoxIo) {
    let mut left = LINGER_BYTES;
    while left > 0 {
        match poll_fn(|cx| http1::poll_read_with(io, cx, left, |b| b.len())).await {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// One request and its response.
async fn exchange(
    mut conn: Conn,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    limits: &ConnLimits,
    drain: &mut watch::Receiver<bool>,
    mut head_by: Pin<&mut tokio::time::Sleep>,
    last: bool,
) -> io::Result<Next> {
    // The head first, as `timeout` would: the timer is polled (armed)
    // only while the head is not all there.
    let read = http1::before(head_by.as_mut(), read_head(&mut conn, limits, drain)).await;
    let head = match read {
        Some(Ok(h)) => h,
        Some(Err(HeadError::Closed)) => return Ok(Next::Gone),
        Some(Err(HeadError::Io(e))) => return Err(e),
        None => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request head within the header read timeout",
            ))
        }
        Some(Err(HeadError::Refused(status, why))) => {
            // Answered like any response, then the connection closes.
            let resp = refusal(status, why, peer);
            write_response(&mut conn, resp, false, Version::HTTP_11, false, limits).await?;
            return Ok(Next::Close(conn, true));
        }
    };
    let Head {
        req,
        framing,
        mut keep_alive,
        expect_continue,
    } = head;
    let version = req.version();
    let head_only = req.method() == Method::HEAD;

    // An empty body leaves the connection here; otherwise the body borrows
    // it and gives it back when it ends or is dropped.
    let (req, mut here, mut back) = match framing {
        BodyFraming::Length(0) => (req.map(|()| RequestBody::empty()), Some(conn), None),
        // All of it came with the head (a small POST, in one read): it
        // goes with the request, and the connection stays here, read to
        // the end of the request whether the handler reads the body or not.
        BodyFraming::Length(n) if conn.buf.len() as u64 >= n => {
            let data = conn.take_front(n as usize);
            (
                req.map(|()| RequestBody::whole(Some(data))),
                Some(conn),
                None,
            )
        }
        framing => {
            let (tx, rx) = oneshot::channel();
            conn.body_done = false;
            let body = RequestBody {
                conn: Some(conn),
                back: Some(tx),
                framing,
                continue_100: expect_continue.then_some(0),
                whole: None,
            };
            (req.map(|()| body), None, Some(rx))
        }
    };
    let watch_limit = limits.max_header_bytes as usize;
    // Boxed, and dropped once it has answered: the pipeline's state is
    // large, and a connection streaming its answer, or idle between
    // requests, should not carry room for it.
    let mut handler = boxed(|| crate::pipeline::handle(Arc::clone(shared), req, peer));
    let resp = poll_fn(|cx| {
        if let Poll::Ready(r) = handler.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if let Some(rx) = back.as_mut() {
            if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                here = r.ok();
                back = None;
            }
        }
        if let Some(c) = here.as_mut() {
            if watch_client(c, cx, watch_limit).is_ready() {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await;
    drop(handler);
    let Some(resp) = resp else {
        // The client left while its request was being served.
        return Ok(Next::Gone);
    };
    let mut conn = match (here, back) {
        (Some(c), _) => c,
        (None, Some(mut rx)) => rx.try_recv().map_err(|_| {
            io::Error::other("the request body outlived its handler; closing the connection")
        })?,
        (None, None) => return Ok(Next::Gone),
    };
    let unread = !conn.body_done;
    keep_alive &= conn.body_done && !*drain.borrow() && !last;
    let keep_alive =
        write_response(&mut conn, resp, head_only, version, keep_alive, limits).await?;
    Ok(if keep_alive {
        Next::KeepAlive(conn)
    } else {
        Next::Close(conn, unread)
    })
}

/// `Box::pin(make())`, with the future made in its heap slot: `Box::pin`
/// makes it on the stack and copies all of it (3.6 KiB for the pipeline's,
/// of which only the arguments are set before its first poll).
pub(super) fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let mut slot = Box::<F>::new_uninit();
    slot.write(make());
    // SAFETY: written just above.
    Box::into_pin(unsafe { slot.assume_init() })
}

/// The answer to a request head refused before the pipeline (431, 400),
/// logged like any request.
pub(super) fn refusal(
    status: StatusCode,
    why: &str,
    peer: std::net::SocketAddr,
) -> Response<crate::pipeline::ResponseBody> {
    let body = crate::error::error_body(why, "invalid_request_error", refusal_code(status));
    let mut resp = Response::new(crate::pipeline::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // A fresh id: the head that might have carried one was refused.
    let id = crate::pipeline::request_id(&http::HeaderMap::new());
    resp.headers_mut()
        .insert(crate::pipeline::proxy::X_REQUEST_ID, id.header());
    tracing::info!(
        target: "access",
        request_id = %id,
        client = %peer.ip(),
        status = status.as_u16(),
        outcome = "rejected",
        "{why}"
    );
    resp
}

fn refusal_code(status: StatusCode) -> &'static str {
    if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
        "header_too_large"
    } else {
        "bad_request"
    }
}

/// Reads bytes the client sends while its response is pending, to notice
/// it leaving: `Ready` when it closed or the connection failed. Bytes that
/// arrive (a pipelined request) are kept, up to `limit`; past that the
/// connection is no longer read until the response is done.
fn watch_client(c: &mut Conn, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
    loop {
        if c.buf.len() >= limit {
            return Poll::Pending;
        }
        let buf = &mut c.buf;
        match ready!(http1::poll_read_with(
            &mut c.io,
            cx,
            limit - buf.len(),
            |b| {
                buf.extend_from_slice(b);
                b.len()
            }
        )) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(_) => {}
        }
    }
}

/// A parsed request head and what it says about the body and connection.
struct Head {
    req: Request<()>,
    framing: BodyFraming,
    keep_alive: bool,
    expect_continue: bool,
}

enum HeadError {
    /// The client closed (or the worker is draining) before a request.
    Closed,
    Io(io::Error),
    /// Answered with this status, then the connection closes.
    Refused(StatusCode, &'static str),
}

/// Reads until a whole head is in `conn.buf`, and parses it.
async fn read_head(
    conn: &mut Conn,
    limits: &ConnLimits,
    drain: &mut watch::Receiver<bool>,
) -> Result<Head, HeadError> {
    let max = limits.max_header_bytes as usize;
    loop {
        // Only the first `max` bytes may hold the head: more may be
        // buffered already (the first read, or a chunked body's read that
        // took in the next pipelined request), and must not let a head
        // past the limit.
        let upto = conn.buf.len().min(max);
        if let Some((len, head)) = parse_head(&conn.buf[..upto], limits.max_headers as usize)? {
            let bytes = conn.take_front(len);
            // SAFETY: `bytes` is the head just parsed, split off unchanged.
            return unsafe { head.into_head(&bytes) };
        }
        if conn.buf.len() > max {
            return Err(HeadError::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head larger than server.max_header_bytes",
            ));
        }
        let cap = max + 1 - conn.buf.len();
        let idle = conn.buf.is_empty();
        let buf = &mut conn.buf;
        let io = &mut conn.io;
        let read = poll_fn(|cx| {
            http1::poll_read_with(io, cx, cap, |b| {
                buf.extend_from_slice(b);
                b.len()
            })
        });
        let n = if idle {
            // Between requests a drain closes the connection at once.
            tokio::select! {
                biased;
                _ = drain.wait_for(|d| *d) => return Err(HeadError::Closed),
                n = read => n,
            }
        } else {
            read.await
        }
        .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(if conn.buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed inside a request head",
                ))
            });
        }
    }
}

/// A request head found by httparse: its parts' positions in the bytes.
struct Parsed {
    method: Range,
    target: Range,
    version: Version,
    fields: http1::Fields,
}

type Range = std::ops::Range<usize>;

/// Parses a request head at the start of `buf`; `None` while incomplete.
fn parse_head(buf: &[u8], max_headers: usize) -> Result<Option<(usize, Parsed)>, HeadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut heap;
    let slots: &mut [httparse::Header<'_>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap = vec![httparse::EMPTY_HEADER; max_headers];
        &mut heap
    };
    let mut r = httparse::Request::new(slots);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "more request headers than server.max_headers",
            ))
        }
        Err(_) => {
            return Err(HeadError::Refused(
                StatusCode::BAD_REQUEST,
                "malformed request head",
            ))
        }
    };
    let base = buf.as_ptr() as usize;
    let range = |s: &str| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let (Some(method), Some(target)) = (r.method, r.path) else {
        return Err(HeadError::Refused(
            StatusCode::BAD_REQUEST,
            "malformed request line",
        ));
    };
    Ok(Some((
        len,
        Parsed {
            method: range(method),
            target: range(target),
            version: if r.version == Some(1) {
                Version::HTTP_11
            } else {
                Version::HTTP_10
            },
            fields: http1::fields(buf, r.headers),
        },
    )))
}

impl Parsed {
    /// # Safety
    ///
    /// `bytes` holds the head this was parsed from (or a copy of it),
    /// unchanged: see [`http1::fill_headers`].
    unsafe fn into_head(self, bytes: &Bytes) -> Result<Head, HeadError> {
        let bad = |why| HeadError::Refused(StatusCode::BAD_REQUEST, why);
        let mut req = Request::new(());
        *req.method_mut() =
            Method::from_bytes(&bytes[self.method]).map_err(|_| bad("bad request method"))?;
        *req.uri_mut() = Uri::from_maybe_shared(bytes.slice(self.target))
            .map_err(|_| bad("bad request target"))?;
        *req.version_mut() = self.version;
        // SAFETY: the caller's promise.
        let noted =
            unsafe { http1::fill_headers(req.headers_mut(), bytes, &self.fields) }.map_err(bad)?;
        let h = req.headers();
        let (framing, close) = request_framing(h, noted, self.version).map_err(bad)?;
        let keep_alive = !close
            && match self.version {
                Version::HTTP_11 => !noted.connection_has(h, b"close"),
                _ => noted.connection_has(h, b"keep-alive"),
            };
        let expect_continue = self.version == Version::HTTP_11
            && noted.expect()
            && h.get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        Ok(Head {
            req,
            framing,
            keep_alive,
            expect_continue,
        })
    }
}

/// How a request body is framed, and whether its connection must close
/// after the answer (RFC 9112 sections 6.1 and 6.3).
fn request_framing(
    h: &HeaderMap,
    noted: http1::Noted,
    version: Version,
) -> Result<(BodyFraming, bool), &'static str> {
    if noted.transfer_encoding() {
        // A header that names no coding is invalid, not absent: read as
        // absent, the body would be framed by a Content-Length that a
        // proxy in front may have ignored.
        let Some(last) = http1::tokens(h, header::TRANSFER_ENCODING).last() else {
            return Err("an empty transfer-encoding");
        };
        if version != Version::HTTP_11 {
            return Err("transfer-encoding in an HTTP/1.0 request");
        }
        if !last.eq_ignore_ascii_case(b"chunked") {
            return Err("the final transfer coding is not chunked");
        }
        // With a Content-Length too, the length is ignored and the
        // connection not trusted with another request.
        let both = noted.has_content_length();
        return Ok((BodyFraming::Chunked(Chunked::strict()), both));
    }
    Ok((
        BodyFraming::Length(noted.content_length(h)?.unwrap_or(0)),
        false,
    ))
}

enum BodyFraming {
    /// This many body bytes are still to come.
    Length(u64),
    Chunked(Chunked),
}

/// A request body read from the client connection as it is polled. It
/// holds the connection while the request is read and gives it back to
/// the connection's task when it ends or is dropped. A body that came
/// whole with its head is just its bytes.
pub struct RequestBody {
    conn: Option<Conn>,
    back: Option<oneshot::Sender<Conn>>,
    framing: BodyFraming,
    /// `Some(bytes written)` while `100 Continue` is owed to the client.
    continue_100: Option<usize>,
    /// All of the body, read with the head.
    whole: Option<Bytes>,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl RequestBody {
    fn empty() -> RequestBody {
        RequestBody::whole(None)
    }

    fn whole(data: Option<Bytes>) -> RequestBody {
        RequestBody {
            conn: None,
            back: None,
            framing: BodyFraming::Length(0),
            continue_100: None,
            whole: data,
        }
    }

    /// Hands the connection back; `done` when the body was read whole.
    fn give_back(&mut self, done: bool) {
        if let (Some(mut c), Some(tx)) = (self.conn.take(), self.back.take()) {
            c.body_done = done;
            if c.buf.is_empty() {
                // Let the request's bytes go with the request, not stay
                // (as spare capacity) with a connection that streams on.
                c.buf = BytesMut::new();
            }
            let _ = tx.send(c);
        }
        self.framing = BodyFraming::Length(0);
    }

    /// The next piece of body out of bytes already read, if any.
    fn decode(&mut self) -> Result<Option<Bytes>, io::Error> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(None);
        };
        match &mut self.framing {
            BodyFraming::Length(rem) => {
                let take = (*rem).min(c.buf.len() as u64) as usize;
                let data = c.buf.split_to(take).freeze();
                *rem -= take as u64;
                if *rem == 0 {
                    self.give_back(true);
                }
                Ok((!data.is_empty()).then_some(data))
            }
            BodyFraming::Chunked(ch) => {
                let mut out = BytesMut::new();
                let used = ch
                    .decode(&c.buf, &mut |d| out.extend_from_slice(d))
                    .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
                c.buf.advance(used);
                if ch.is_done() {
                    self.give_back(true);
                }
                Ok((!out.is_empty()).then(|| out.freeze()))
            }
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.give_back(false);
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(d) = this.whole.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        loop {
            match this.decode() {
                Ok(Some(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(None) => {}
                Err(e) => {
                    this.give_back(false);
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(c) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(sent) = this.continue_100.as_mut() {
                while *sent < CONTINUE.len() {
                    *sent += ready!(Pin::new(&mut c.io).poll_write(cx, &CONTINUE[*sent..]))?;
                }
                ready!(Pin::new(&mut c.io).poll_flush(cx))?;
                this.continue_100 = None;
            }
            let cap = match this.framing {
                BodyFraming::Length(rem) => rem.min(http1::READ_CHUNK as u64) as usize,
                BodyFraming::Chunked(_) => http1::READ_CHUNK,
            };
            let buf = &mut c.buf;
            let n = match ready!(http1::poll_read_with(&mut c.io, cx, cap, |b| {
                buf.extend_from_slice(b);
                b.len()
            })) {
                Ok(n) => n,
                Err(e) => {
                    this.give_back(false);
                    return Poll::Ready(Some(Err(e)));
                }
            };
            if n == 0 {
                this.give_back(false);
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed before the end of the request body",
                ))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() && self.whole.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.framing) {
            (None, _) => SizeHint::with_exact(self.whole.as_ref().map_or(0, |d| d.len() as u64)),
            (Some(_), BodyFraming::Length(n)) => SizeHint::with_exact(*n),
            (Some(_), BodyFraming::Chunked(_)) => SizeHint::default(),
        }
    }
}

/// `HTTP/1.1 <code> <reason>\r\n`.
fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The end of a response head: date, framing and connection headers.
struct ResponseHead {
    out: Vec<u8>,
    keep_alive: bool,
}

impl ResponseHead {
    fn new(out: Vec<u8>, keep_alive: bool) -> ResponseHead {
        ResponseHead { out, keep_alive }
    }

    fn length(&mut self, n: u64) {
        self.out.extend_from_slice(b"content-length: ");
        self.out.extend_from_slice(http1::decimal(n, &mut [0; 20]));
        self.out.extend_from_slice(b"\r\n");
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(b"date: ");
        date::now(|d| self.out.extend_from_slice(d));
        self.out.extend_from_slice(if self.keep_alive {
            b"\r\n\r\n".as_slice()
        } else {
            b"\r\nconnection: close\r\n\r\n".as_slice()
        });
        self.out
    }
}

/// How a response body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OutFraming {
    /// This many bytes still to send.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, unknown length).
    Close,
    /// Nothing goes out (HEAD, 204, 304).
    None,
}

/// Headers the connection decides, never copied from a response.
fn connection_level(name: &header::HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_LENGTH
        || name == "keep-alive"
        || name == header::DATE
}

/// What waiting on the response body turned up.
enum Step {
    Frame(Option<Result<Frame<Bytes>, crate::pipeline::stream::BoxError>>),
    /// The body has nothing right now: send what is buffered.
    Flush,
    /// The client closed the connection.
    Gone,
}

/// Writes a response; returns whether the connection may carry another
/// request.
async fn write_response(
    conn: &mut Conn,
    resp: Response<ResponseBody>,
    head_only: bool,
    version: Version,
    mut keep_alive: bool,
    limits: &ConnLimits,
) -> io::Result<bool> {
    let watch_limit = limits.max_header_bytes as usize;
    let within = limits.send_timeout;
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    // Room for the head, and (below) for a body short enough to go with it
    // in the same write, so the buffer does not grow, and copy, once it
    // comes. The same pass notes the declared length.
    let mut len = 128;
    let mut noted = http1::Noted::default();
    for (n, v) in &parts.headers {
        len += n.as_str().len() + v.len() + 4;
        noted.note(n, v.as_bytes());
    }
    let declared = noted.content_length(&parts.headers).ok().flatten();
    let length = declared.or_else(|| body.size_hint().exact());
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut framing = match length {
        _ if no_body || head_only => OutFraming::None,
        Some(n) => OutFraming::Length(n),
        None if version == Version::HTTP_11 => OutFraming::Chunked,
        None => OutFraming::Close,
    };
    if framing == OutFraming::Close {
        keep_alive = false;
    }
    if let OutFraming::Length(n) = framing {
        if n <= COALESCE as u64 {
            len += n as usize;
        }
    }
    let mut out = Vec::with_capacity(len);
    status_line(&mut out, status);
    for (n, v) in &parts.headers {
        if connection_level(n) {
            continue;
        }
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut head = ResponseHead::new(out, keep_alive);
    match framing {
        OutFraming::Length(n) => head.length(n),
        OutFraming::Chunked => head
            .out
            .extend_from_slice(b"transfer-encoding: chunked\r\n"),
        OutFraming::None if !no_body => {
            if let Some(n) = length {
                head.length(n);
            }
        }
        _ => {}
    }
    if version == Version::HTTP_10 && keep_alive {
        head.out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    let mut out = head.finish();
    if framing == OutFraming::None {
        // Polled once, so a body that has nothing to send (a 204, an
        // answer to HEAD) ends as complete rather than as abandoned.
        let _ = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        drop(body);
        send(&mut conn.io, &out, within).await?;
        return Ok(keep_alive);
    }
    loop {
        let step = poll_fn(|cx| {
            if let Poll::Ready(f) = Pin::new(&mut body).poll_frame(cx) {
                return Poll::Ready(Step::Frame(f));
            }
            if !out.is_empty() {
                return Poll::Ready(Step::Flush);
            }
            watch_client(conn, cx, watch_limit).map(|()| Step::Gone)
        })
        .await;
        match step {
            Step::Flush => {
                send(&mut conn.io, &out, within).await?;
                // Nothing is held while the stream waits for its next piece.
                out = Vec::new();
            }
            Step::Gone => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "client closed during the response",
                ))
            }
            Step::Frame(None) => {
                match framing {
                    OutFraming::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    // Shorter than announced: the client can only tell by
                    // the close.
                    OutFraming::Length(n) if n > 0 => keep_alive = false,
                    _ => {}
                }
                send(&mut conn.io, &out, within).await?;
                return Ok(keep_alive);
            }
            Step::Frame(Some(Err(e))) => {
                // Sent so far, then a close without the end of the body,
                // so the client sees the response cut short.
                send(&mut conn.io, &out, within).await?;
                tracing::debug!("response body failed: {e}");
                return Ok(false);
            }
            Step::Frame(Some(Ok(frame))) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers: not sent over HTTP/1.1
                };
                if data.is_empty() {
                    continue;
                }
                if let OutFraming::Length(left) = &mut framing {
                    if data.len() as u64 > *left {
                        // Longer than announced: cut, and close after.
                        data.truncate(*left as usize);
                        keep_alive = false;
                    }
                    *left -= data.len() as u64;
                }
                if framing == OutFraming::Chunked {
                    out.extend_from_slice(format_hex(data.len(), &mut [0; 16]));
                    out.extend_from_slice(b"\r\n");
                }
                if data.len() <= COALESCE {
                    out.extend_from_slice(&data);
                } else {
                    send(&mut conn.io, &out, within).await?;
                    out.clear();
                    send(&mut conn.io, &data, within).await?;
                }
                if framing == OutFraming::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
                // A body that keeps coming (a fast backend, or one the
                // client fell behind) is written as it goes, not gathered.
                if out.len() >= COALESCE {
                    send(&mut conn.io, &out, within).await?;
                    out.clear();
                }
            }
        }
    }
}

/// Writes `bytes` to the client and flushes, failing when the client takes
/// none of it for `within` (nginx's `send_timeout`: the time between two
/// writes that make progress, so a slow reader that keeps reading is not
/// cut): a client that stops reading would otherwise hold its backend
/// slot, key permit and upstream connection for as long as TCP keeps the
/// connection. A timer is armed only when the socket is full: most writes
/// complete at once.
async fn send(io: &mut BoxIo, bytes: &[u8], within: Duration) -> io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = at_once_or_within(io.write(rest), within).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
    at_once_or_within(io.flush(), within).await
}

/// `op`'s result: polled once without a timer, then given `within`.
async fn at_once_or_within<T>(
    op: impl std::future::Future<Output = io::Result<T>>,
    within: Duration,
) -> io::Result<T> {
    let mut op = pin!(op);
    if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(op.as_mut().poll(cx))).await {
        return r;
    }
    tokio::time::timeout(within, op).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took none of its response within the send timeout",
        ))
    })
}

/// `n` in lowercase hex, written into `buf`.
fn format_hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = http1::HEX_DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The `Date` header value, formatted once a second per thread. The
/// second comes from the coarse clock: a precise read costs several times
/// as much on some VMs, for a value of one-second resolution (at worst the
/// previous second for a tick after it ends).
mod date {
    use std::{
        cell::RefCell,
        time::{Duration, SystemTime},
    };

    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub fn now(with: impl FnOnce(&[u8])) {
        let secs = crate::clock::coarse_unix_secs();
        CACHE.with_borrow_mut(|(at, text)| {
            if *at != secs {
                *at = secs;
                *text = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            }
            with(text.as_bytes());
        });
    }
}

/// For the fuzzer: parses a request head at the start of `buf` and decides
/// its framing; `Ok(None)` while incomplete, `Err(status)` when refused.
#[doc(hidden)]
pub fn inspect_head(buf: &[u8], max_headers: usize) -> Result<Option<RequestSummary>, u16> {
    let refused = |e| match e {
        HeadError::Refused(s, _) => s.as_u16(),
        _ => 0,
    };
    let Some((len, parsed)) = parse_head(buf, max_headers).map_err(refused)? else {
        return Ok(None);
    };
    // SAFETY: a copy of the head just parsed.
    let head =
        unsafe { parsed.into_head(&Bytes::copy_from_slice(&buf[..len])) }.map_err(refused)?;
    Ok(Some(RequestSummary {
        len,
        body: match head.framing {
            BodyFraming::Length(n) => Some(n),
            BodyFraming::Chunked(_) => None,
        },
        keep_alive: head.keep_alive,
    }))
}

/// What `inspect_head` found.
#[doc(hidden)]
pub struct RequestSummary {
    pub len: usize,
    /// `None`: chunked.
    pub body: Option<u64>,
    pub keep_alive: bool,
}

#[cfg(test)]
mod tests;
