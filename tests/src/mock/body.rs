//! The response body of the mock: a pre-rendered buffer handed to hyper one
//! frame at a time — the whole of it for a plain response, one SSE event
//! per frame for a stream, paced by the token interval. Returning `Pending`
//! between events is what makes hyper flush each one as it is produced.
//! The body owns the request's `Tracker`, so hyper dropping it early (the
//! client went away) is what counts the request as cancelled.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::render::next_event;
use super::stats::{Outcome, Tracker};

pub struct MockBody {
    buf: Bytes,
    pos: usize,
    sse: bool,
    /// Frames handed out so far.
    events: u32,
    /// Events `1..paced` wait `interval` first (the token events after the
    /// first one; the closing events follow the last token at once).
    paced: u32,
    interval: Duration,
    /// The first event waits this long (a server that sends a stream's
    /// head at once and its first token after queueing and prefill).
    first_wait: Duration,
    /// Allocated on the first wait and re-armed after, not once per event.
    sleep: Option<Pin<Box<Sleep>>>,
    sleeping: bool,
    abort: Option<Abort>,
    /// `None` for the mock's own introspection responses, which are not
    /// counted.
    tracker: Option<Tracker>,
}

/// Cut the connection after this many frames: `kill` tells the connection
/// task (see `server.rs`) to reset the socket.
struct Abort {
    after: u32,
    kill: Arc<Notify>,
    fired: bool,
}

impl MockBody {
    /// A body sent as one frame.
    pub fn whole(buf: Bytes, tracker: Option<Tracker>) -> MockBody {
        MockBody {
            buf,
            pos: 0,
            sse: false,
            events: 0,
            paced: 0,
            interval: Duration::ZERO,
            first_wait: Duration::ZERO,
            sleep: None,
            sleeping: false,
            abort: None,
            tracker,
        }
    }

    /// An SSE stream, one event per frame; the first `tokens` events are
    /// `interval` apart.
    pub fn sse(buf: Bytes, tokens: u32, interval: Duration, tracker: Tracker) -> MockBody {
        MockBody {
            sse: true,
            paced: tokens,
            interval,
            ..MockBody::whole(buf, Some(tracker))
        }
    }

    /// The first event waits `wait` after the head.
    pub fn first_after(mut self, wait: Duration) -> MockBody {
        self.first_wait = wait;
        self
    }

    /// Reset the connection after `after` SSE events, never letting the
    /// stream finish: past the last-but-one event it stops there. A plain
    /// body is cut in half: its headers promise the full length and only
    /// the first half arrives.
    pub fn abort_after(mut self, after: u32, kill: Arc<Notify>) -> MockBody {
        let limit = if self.sse {
            count_events(&self.buf).saturating_sub(1)
        } else {
            1
        };
        self.abort = Some(Abort {
            after: after.min(limit),
            kill,
            fired: false,
        });
        self
    }

    fn next_end(&self) -> usize {
        if self.sse {
            next_event(&self.buf, self.pos)
        } else if self.abort.is_some() && self.pos == 0 {
            self.buf.len() / 2
        } else {
            self.buf.len()
        }
    }

    fn poll_interval(&mut self, cx: &mut Context<'_>, interval: Duration) -> Poll<()> {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
        if !self.sleeping {
            sleep.as_mut().reset(Instant::now() + interval);
            self.sleeping = true;
        }
        ready!(sleep.as_mut().poll(cx));
        self.sleeping = false;
        Poll::Ready(())
    }

    /// Tells the connection to reset, once, and never yields again: the
    /// connection task drops this body along with the connection.
    fn fire_abort(&mut self) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(abort) = self.abort.as_mut().filter(|a| !a.fired) {
            abort.fired = true;
            if let Some(t) = self.tracker.as_mut() {
                t.finish(Outcome::Aborted);
            }
            abort.kill.notify_one();
        }
        Poll::Pending
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.pos >= this.buf.len() {
            return Poll::Ready(None);
        }
        if this.abort.as_ref().is_some_and(|a| this.events >= a.after) {
            return this.fire_abort();
        }
        if this.events == 0 && !this.first_wait.is_zero() {
            ready!(this.poll_interval(cx, this.first_wait));
        }
        if this.events >= 1 && this.events < this.paced && !this.interval.is_zero() {
            ready!(this.poll_interval(cx, this.interval));
        }
        let end = this.next_end();
        let frame = this.buf.slice(this.pos..end);
        this.pos = end;
        this.events += 1;
        if this.pos >= this.buf.len() {
            if let Some(t) = this.tracker.as_mut() {
                t.finish(Outcome::Completed);
            }
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            // Unknown, so HTTP/1 streams it chunked as SSE servers do.
            SizeHint::default()
        } else {
            SizeHint::with_exact((self.buf.len() - self.pos) as u64)
        }
    }
}

fn count_events(buf: &[u8]) -> u32 {
    let (mut n, mut pos) = (0, 0);
    while pos < buf.len() {
        pos = next_event(buf, pos);
        n += 1;
    }
    n
}
