//! The response body on its way back: every upstream frame is forwarded the
//! moment it arrives. On the side, token usage is read from the SSE usage
//! chunk (or the JSON body), the usage chunk is removed when the gateway
//! rather than the client asked for it, idle and total timeouts end a
//! stalled stream with an SSE error event, and when the body ends, fails or
//! is dropped by a departing client, the backend slot is released and the
//! request is logged (dropping the upstream body cancels the upstream
//! request).

use std::{
    future::Future as _,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::{ctx::RequestCtx, usage, Shared};
use crate::upstream::{self, Lease};

pub use crate::upstream::BoxError;

/// Largest JSON answer kept whole to read its `usage` at the end.
const MAX_JSON_KEPT: usize = 64 * 1024;

/// Writes metrics and the access log once, however the body ends.
pub struct Finish {
    pub ctx: RequestCtx,
    pub shared: Arc<Shared>,
    pub lease: Option<Lease>,
    done: bool,
}

impl Finish {
    pub fn new(ctx: RequestCtx, shared: Arc<Shared>, lease: Option<Lease>) -> Finish {
        Finish {
            ctx,
            shared,
            lease,
            done: false,
        }
    }

    fn complete(&mut self, outcome: Option<&'static str>) {
        if self.done {
            return;
        }
        self.done = true;
        if self.ctx.outcome.is_none() {
            self.ctx.outcome = outcome;
        }
        self.ctx.finish(&self.shared.metrics);
        self.lease = None;
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        // Dropped before the end: the client went away.
        self.complete(Some("client_closed"));
    }
}

enum Mode {
    /// text/event-stream: scan events for usage, maybe strip the usage chunk.
    Sse {
        pending: BytesMut,
        strip_usage: bool,
    },
    /// A JSON body: kept (up to `MAX_JSON_KEPT`) to read `usage` from at
    /// the end, the fastest read; a larger one is read as it goes by.
    Json {
        kept: BytesMut,
        scan: Option<Box<usage::JsonUsage>>,
    },
}

pin_project! {
    pub struct ProxyBody {
        #[pin]
        inner: upstream::Incoming,
        // Armed (moved to `idle_at`) only when upstream has nothing: a
        // body that is ready when asked, as a one-piece JSON answer is,
        // registers no timer at all.
        #[pin]
        idle: Sleep,
        // When the wait for the next piece times out: `idle_timeout` after
        // the last one (or the first byte's deadline before it).
        idle_at: Instant,
        #[pin]
        total: Sleep,
        idle_timeout: Duration,
        mode: Mode,
        finish: Finish,
        ended: bool,
    }
}

impl ProxyBody {
    /// `first_data_by`: the first piece of the body may take until then
    /// (the model's `first_byte` from dispatch), even past `idle_timeout`:
    /// vLLM, SGLang and TGI send a stream's head before the request is
    /// scheduled, so its first token is what `first_byte` is about. `now`:
    /// the time, as the caller has just read it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: upstream::Incoming,
        sse: bool,
        strip_usage: bool,
        now: Instant,
        idle_timeout: Duration,
        first_data_by: Instant,
        deadline: Instant,
        finish: Finish,
    ) -> ProxyBody {
        let mode = if sse {
            Mode::Sse {
                pending: BytesMut::new(),
                strip_usage,
            }
        } else {
            Mode::Json {
                kept: BytesMut::new(),
                scan: None,
            }
        };
        let idle_at = (now + idle_timeout).max(first_data_by);
        ProxyBody {
            inner,
            idle: tokio::time::sleep_until(idle_at.into()),
            idle_at,
            total: tokio::time::sleep_until(deadline.into()),
            idle_timeout,
            mode,
            finish,
            ended: false,
        }
    }
}

/// Most of one SSE event held back to find its end (for its `usage`);
/// past this the bytes are forwarded as they are.
const MAX_SSE_EVENT: usize = 1 << 20;

/// Index just past the first complete event (its blank line), if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn ends_at_boundary(b: &[u8]) -> bool {
    b.ends_with(b"\n\n") || b.ends_with(b"\r\n\r\n")
}

impl Mode {
    /// Processes one upstream chunk; returns what to send the client now.
    fn feed(&mut self, chunk: Bytes, ctx: &mut RequestCtx) -> Bytes {
        match self {
            Mode::Json { kept, scan } => {
                match scan {
                    Some(scan) => scan.feed(&chunk),
                    None if kept.len() + chunk.len() <= MAX_JSON_KEPT => {
                        kept.extend_from_slice(&chunk)
                    }
                    None => {
                        // Too large to keep (an embeddings batch can be tens
                        // of MB): read the rest as it goes by.
                        let mut s = Box::<usage::JsonUsage>::default();
                        s.feed(kept);
                        s.feed(&chunk);
                        *kept = BytesMut::new();
                        *scan = Some(s);
                    }
                }
                chunk
            }
            Mode::Sse {
                pending,
                strip_usage,
            } => {
                // Fast path: whole events with no usage in them pass untouched.
                if pending.is_empty()
                    && ends_at_boundary(&chunk)
                    && !usage::has_usage_object(&chunk)
                {
                    return chunk;
                }
                pending.extend_from_slice(&chunk);
                let mut out = BytesMut::new();
                while let Some(end) = event_end(pending) {
                    let ev = pending.split_to(end);
                    if let Some(u) = usage::from_sse_event(&ev) {
                        ctx.usage = Some(u.usage);
                        if *strip_usage && u.usage_only {
                            continue;
                        }
                    }
                    out.extend_from_slice(&ev);
                }
                if pending.len() > MAX_SSE_EVENT {
                    // No event end in sight (a backend that frames events
                    // otherwise, or one huge event): pass it on unread
                    // rather than hold the stream back in memory.
                    out.extend_from_slice(pending);
                    pending.clear();
                }
                // Whole events only, also when nothing is removed: a stream
                // that fails mid-event then ends with a clean error event,
                // not one glued onto half an event (which a client's JSON
                // parser chokes on). A partial event is of no use to the
                // client before its end arrives anyway.
                out.freeze()
            }
        }
    }

    /// At the end of the body: whatever is still held, and the JSON usage.
    fn flush(&mut self, ctx: &mut RequestCtx) -> Option<Bytes> {
        match self {
            Mode::Json { kept, scan } => {
                let read = match scan {
                    Some(scan) => scan.finish(),
                    None => usage::from_json(kept),
                };
                ctx.usage = read.or(ctx.usage);
                None
            }
            Mode::Sse { pending, .. } => {
                let rest = std::mem::take(pending);
                (!rest.is_empty()).then(|| rest.freeze())
            }
        }
    }
}

/// Why a stream ended when the gateway's drain ran out.
const SHUTDOWN: &str = "shutdown";

const SHUTDOWN_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the gateway is shutting down; the response is incomplete\",\"type\":\"server_error\",\"param\":null,\"code\":\"gateway_shutdown\"}}\n\n";

const STREAM_ERROR_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the upstream stream failed or stalled; the response is incomplete\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_stream_error\"}}\n\n";

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        loop {
            // The upstream is asked before the idle timer: a client that
            // stopped reading for a while leaves data waiting upstream,
            // which is no stall of the backend's. Idle is a wait on
            // upstream that found nothing for that long. The timers are
            // polled (registered) only when upstream has nothing; what it
            // has is checked against the total deadline by the clock.
            let (polled, now) = match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(f) => {
                    let now = Instant::now();
                    if this.total.deadline() <= now.into() {
                        (Err("total_timeout"), now)
                    } else {
                        (Ok(f), now)
                    }
                }
                Poll::Pending => {
                    if this.total.as_mut().poll(cx).is_ready() {
                        (Err("total_timeout"), Instant::now())
                    } else {
                        let at = (*this.idle_at).into();
                        if this.idle.deadline() != at {
                            this.idle.as_mut().reset(at);
                        }
                        if this.idle.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        let kind = if this.finish.ctx.first_byte.is_none() {
                            "first_byte_timeout"
                        } else {
                            "idle_timeout"
                        };
                        (Err(kind), Instant::now())
                    }
                }
            };
            let failure = match polled {
                Err(kind) => Some(kind),
                Ok(polled) => match polled {
                    Some(Ok(frame)) => {
                        let frame = match frame.into_data() {
                            Ok(data) => data,
                            // Trailers: pass through.
                            Err(frame) => return Poll::Ready(Some(Ok(frame))),
                        };
                        *this.idle_at = now + *this.idle_timeout;
                        let ctx = &mut this.finish.ctx;
                        if ctx.first_byte.is_none() {
                            ctx.first_byte = Some(now);
                            // A stream's first token: the latency the
                            // `latency` policy weighs its backend by.
                            let ok = ctx.status < 500;
                            if let (Mode::Sse { .. }, Some(l), Some(sent), true) =
                                (&*this.mode, &this.finish.lease, ctx.attempt_sent, ok)
                            {
                                l.backend().observed.success(now - sent);
                            }
                        }
                        let ctx = &mut this.finish.ctx;
                        let mut out = this.mode.feed(frame, ctx);
                        // A body of known length may never be polled again
                        // once its last byte is out (hyper stops there), so
                        // finish with the last frame rather than after it.
                        if this.inner.is_end_stream() {
                            *this.ended = true;
                            this.finish.ctx.last_byte = Some(now);
                            if let Some(tail) = this.mode.flush(&mut this.finish.ctx) {
                                let mut joined = BytesMut::from(&out[..]);
                                joined.extend_from_slice(&tail);
                                out = joined.freeze();
                            }
                            this.finish.ctx.bytes_out += out.len() as u64;
                            this.finish.complete(None);
                            return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out))));
                        }
                        // A stopping gateway's drain ran out: the stream
                        // ends after this piece with the shutdown event (no
                        // fault of the backend's; dropping the upstream
                        // body cancels the generation). One relaxed load per
                        // piece, no lock: a stream that sends nothing in the
                        // grace after the deadline is cut with its
                        // connection instead.
                        if matches!(this.mode, Mode::Sse { .. })
                            && this.finish.shared.cut_streams.load(Ordering::Relaxed)
                        {
                            *this.ended = true;
                            let mut joined = BytesMut::from(&out[..]);
                            joined.extend_from_slice(SHUTDOWN_EVENT);
                            this.finish.ctx.bytes_out += joined.len() as u64;
                            this.finish.complete(Some(SHUTDOWN));
                            return Poll::Ready(Some(Ok(Frame::data(joined.freeze()))));
                        }
                        if out.is_empty() {
                            continue;
                        }
                        ctx.bytes_out += out.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Some(Err(_)) => Some("stream"),
                    None => {
                        *this.ended = true;
                        let tail = this.mode.flush(&mut this.finish.ctx);
                        this.finish.complete(None);
                        return Poll::Ready(tail.map(|t| Ok(Frame::data(t))));
                    }
                },
            };
            // The upstream failed or stalled after the response started:
            // never replayed; SSE clients get an error event, then the end.
            let kind = failure.expect("set above");
            *this.ended = true;
            let f = &mut this.finish;
            let model = f.ctx.model.as_deref().unwrap_or_default();
            let backend = f.ctx.backend.as_deref().unwrap_or_default();
            f.shared
                .metrics
                .upstream_errors
                .with_label_values(&[model, backend, kind])
                .inc();
            // The request's own time running out is no fault of the
            // backend's to eject it for (a long generation is not a
            // failure); a stall or a broken stream is.
            if kind != "total_timeout" {
                if let Some(l) = f.lease.as_mut() {
                    l.report(false);
                    // A stream that never got to its first token left no
                    // latency sample: the `latency` policy sees an error.
                    l.backend().observed.failure();
                }
            }
            f.complete(Some(kind));
            return match this.mode {
                Mode::Sse { .. } => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                    STREAM_ERROR_EVENT,
                ))))),
                Mode::Json { .. } => Poll::Ready(Some(Err(format!("upstream {kind}").into()))),
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.mode {
            // Removing the usage chunk changes the length.
            Mode::Sse {
                strip_usage: true, ..
            } => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RequestCtx {
        RequestCtx::new(
            super::super::request_id(&http::HeaderMap::new()),
            "127.0.0.1:1".parse().unwrap(),
            http::Method::POST,
            http::uri::PathAndQuery::from_static("/"),
        )
    }

    const USAGE: &[u8] =
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";

    #[test]
    fn strips_the_usage_chunk_only_when_asked() {
        let mut c = ctx();
        let mut m = Mode::Sse {
            pending: BytesMut::new(),
            strip_usage: true,
        };
        let a = m.feed(
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"),
            &mut c,
        );
        assert!(a.starts_with(b"data: {\"choices\""));
        let b = m.feed(Bytes::from_static(USAGE), &mut c);
        assert!(b.is_empty(), "usage chunk must be removed: {b:?}");
        assert_eq!(
            c.usage,
            Some(usage::Usage {
                prompt: 3,
                completion: 4
            })
        );
        let d = m.feed(Bytes::from_static(b"data: [DONE]\n\n"), &mut c);
        assert_eq!(&d[..], b"data: [DONE]\n\n");

        let mut c = ctx();
        let mut keep = Mode::Sse {
            pending: BytesMut::new(),
            strip_usage: false,
        };
        assert_eq!(&keep.feed(Bytes::from_static(USAGE), &mut c)[..], USAGE);
        assert!(c.usage.is_some());
    }

    #[test]
    fn events_split_across_chunks() {
        let mut c = ctx();
        let mut m = Mode::Sse {
            pending: BytesMut::new(),
            strip_usage: true,
        };
        let (a, b) = USAGE.split_at(20);
        assert!(m.feed(Bytes::copy_from_slice(a), &mut c).is_empty());
        let mut tail = b.to_vec();
        tail.extend_from_slice(b"data: [DONE]\r\n\r\n");
        let out = m.feed(Bytes::from(tail), &mut c);
        assert_eq!(&out[..], b"data: [DONE]\r\n\r\n");
        assert_eq!(c.usage.map(|u| u.completion), Some(4));
    }

    #[test]
    fn a_stream_without_event_ends_is_not_held_back() {
        let mut c = ctx();
        let mut m = Mode::Sse {
            pending: BytesMut::new(),
            strip_usage: true,
        };
        // CR-only line ends: no event end the gateway recognises.
        let piece = Bytes::from(b"data: {\"choices\":[]}\r\r".repeat(1024));
        let mut held = 0;
        let mut sent = 0;
        for _ in 0..(2 * MAX_SSE_EVENT / piece.len()) {
            sent += m.feed(piece.clone(), &mut c).len();
            held = match &m {
                Mode::Sse { pending, .. } => pending.len(),
                Mode::Json { .. } => unreachable!(),
            };
            assert!(held <= MAX_SSE_EVENT + piece.len(), "{held}");
        }
        assert!(sent > 0, "forwarded once the cap was reached");
        assert_eq!(sent + held, 2 * MAX_SSE_EVENT / piece.len() * piece.len());
    }

    /// A JSON answer larger than what is kept whole (an embeddings batch)
    /// still has its usage read, and is not kept.
    #[test]
    fn a_large_json_answer_has_its_usage_read_as_it_goes_by() {
        let mut c = ctx();
        let mut m = Mode::Json {
            kept: BytesMut::new(),
            scan: None,
        };
        let mut body = br#"{"data":[{"embedding":""#.to_vec();
        body.extend(std::iter::repeat_n(b'A', 4 * MAX_JSON_KEPT));
        body.extend_from_slice(br#""}],"usage":{"prompt_tokens":512,"total_tokens":512}}"#);
        for part in body.chunks(16 * 1024) {
            assert_eq!(&m.feed(Bytes::copy_from_slice(part), &mut c)[..], part);
            let Mode::Json { kept, .. } = &m else {
                unreachable!()
            };
            assert!(kept.len() <= MAX_JSON_KEPT);
        }
        assert!(m.flush(&mut c).is_none());
        assert_eq!(
            c.usage,
            Some(usage::Usage {
                prompt: 512,
                completion: 0
            })
        );
    }

    #[test]
    fn json_usage_read_at_the_end() {
        let mut c = ctx();
        let mut m = Mode::Json {
            kept: BytesMut::new(),
            scan: None,
        };
        let body = br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        for part in body.chunks(7) {
            assert_eq!(&m.feed(Bytes::copy_from_slice(part), &mut c)[..], part);
        }
        assert!(m.flush(&mut c).is_none());
        assert_eq!(
            c.usage,
            Some(usage::Usage {
                prompt: 1,
                completion: 2
            })
        );
    }
}
