//! `send_timeout` for HTTP/2. hyper polls a stream's response body only
//! when the stream has flow-control window for what it already holds, so a
//! client that reads the connection but never opens a stream's window
//! stops the body from being polled, and with it every timer inside it:
//! the stream would hold its backend slot, key permit and upstream request
//! for as long as the connection lives. Each response body is handed to
//! hyper through a [`Watched`] slot; the connection's task looks at the
//! slots on a coarse tick and takes back the body of a stream whose last
//! frame has waited for the client longer than `send_timeout`. Dropping the
//! body cancels the upstream request and frees what it held, and the
//! stream no longer counts as open; hyper's next poll, if the window ever
//! opens, resets the stream. The connection takes no new stream after a
//! cut and is dropped once no stream is open (`serve_h2`): hyper could
//! never finish the cut ones.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::StreamOpen;
use crate::pipeline::{stream::BoxError, ResponseBody};

/// Ticks per `send_timeout`: a stuck stream is let go after 4-5 ticks.
const TICKS: u64 = 4;

/// The slots of one connection's streams, and its tick count.
#[derive(Default)]
pub struct Watch {
    slots: Mutex<Slots>,
    tick: AtomicU64,
}

#[derive(Default)]
struct Slots {
    list: Vec<Weak<Slot>>,
    /// The list's length that makes [`Watch::watched`] drop ended streams
    /// (a busy connection opens many between two ticks).
    prune_at: usize,
}

/// The shortest list pruned between ticks.
const PRUNE_MIN: usize = 64;

struct Slot {
    /// The body, with the stream's place in its connection's count of
    /// open streams: both go when the watch takes the body back.
    body: Mutex<Option<(ResponseBody, StreamOpen)>>,
    /// The tick at which the body last handed hyper a frame that hyper has
    /// not yet come back after (0: hyper is not held up by the client).
    handed: AtomicU64,
}

impl Watch {
    /// How often the connection should call [`Watch::tick`].
    pub fn period(send_timeout: Duration) -> Duration {
        (send_timeout / TICKS as u32).max(Duration::from_millis(10))
    }

    /// Hands `body` to hyper through a slot this watch can take it back
    /// from; the stream counts as open until then, or until hyper is done
    /// with it.
    pub fn watched(self: &Arc<Self>, body: ResponseBody, open: StreamOpen) -> Watched {
        let slot = Arc::new(Slot {
            body: Mutex::new(Some((body, open))),
            handed: AtomicU64::new(0),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.list.len() >= slots.prune_at.max(PRUNE_MIN) {
            slots.list.retain(|w| w.strong_count() > 0);
            slots.prune_at = 2 * slots.list.len();
        }
        slots.list.push(Arc::downgrade(&slot));
        drop(slots);
        Watched {
            slot,
            watch: Arc::clone(self),
        }
    }

    /// One tick: forgets ended streams, and takes back the body of each
    /// stream whose frame has waited on the client for `TICKS` ticks or
    /// more. Returns how many it let go.
    pub fn tick(&self) -> usize {
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        let mut stuck = Vec::new();
        {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.list.retain(|w| match w.upgrade() {
                Some(s) => {
                    let handed = s.handed.load(Ordering::Relaxed);
                    if handed != 0 && now.saturating_sub(handed) > TICKS {
                        stuck.push(s);
                        false
                    } else {
                        true
                    }
                }
                None => false,
            });
        }
        for s in &stuck {
            // Dropped outside the list's lock: this ends the request (its
            // access-log line, the upstream connection, the backend slot).
            let body = s.body.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(body);
        }
        stuck.len()
    }
}

/// A stream's response body as hyper sees it.
pub struct Watched {
    slot: Arc<Slot>,
    watch: Arc<Watch>,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // hyper is back for more: whatever it held has gone to the client.
        this.slot.handed.store(0, Ordering::Relaxed);
        let mut body = this.slot.body.lock().unwrap_or_else(|p| p.into_inner());
        let Some((b, _)) = body.as_mut() else {
            return Poll::Ready(Some(Err(
                "the client took none of its response within the send timeout".into(),
            )));
        };
        let r = Pin::new(b).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(_))) => {
                // At least tick 1, so that 0 keeps meaning "not held".
                let now = this.watch.tick.load(Ordering::Relaxed).max(1);
                this.slot.handed.store(now, Ordering::Relaxed);
            }
            Poll::Ready(_) | Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.peek(|b| b.is_some_and(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        self.peek(|b| b.map_or_else(SizeHint::default, |b| b.size_hint()))
    }
}

impl Watched {
    /// `f` of the body, if the watch has not taken it back.
    fn peek<R>(&self, f: impl FnOnce(Option<&ResponseBody>) -> R) -> R {
        f(self
            .slot
            .body
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(b, _)| b))
    }
}
