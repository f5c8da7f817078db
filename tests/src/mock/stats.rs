//! What a mock saw: the counters (`MockStats`), the bounded log of received
//! requests (`RecordedRequest`), and the `Tracker` that follows one request
//! from arrival until its response body is finished or dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// How many requests the log keeps (the most recent ones).
pub const LOG_CAPACITY: usize = 256;

/// Counters of one mock. Requests to its own `/mock/*` introspection routes
/// are not counted, so a test that polls them does not disturb what it
/// measures.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Every request received.
    pub requests: AtomicU64,
    /// Responses whose body was fully handed to the connection.
    pub completed: AtomicU64,
    /// Responses abandoned because the client went away first (while the
    /// mock waited, stalled or streamed): a gateway that cancels its
    /// upstream request on a client disconnect makes this go up.
    pub cancelled: AtomicU64,
    /// Connections the mock cut itself (`reset`, `midstream:N`).
    pub aborted: AtomicU64,
    /// Requests received and not yet completed, cancelled or aborted.
    pub in_flight: AtomicU64,
    /// The highest `in_flight` seen.
    pub max_in_flight: AtomicU64,
}

/// A copy of the counters at one moment (also the `/mock/stats` JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub aborted: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
}

impl MockStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Relaxed),
            completed: self.completed.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            aborted: self.aborted.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            max_in_flight: self.max_in_flight.load(Relaxed),
        }
    }
}

/// One received request, as a gateway test wants to check it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordedRequest {
    /// The request's number (1-based, also in the response `id`).
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`: tells which protocol a gateway used.
    pub version: String,
    /// The URI authority (HTTP/2 `:authority`); HTTP/1 has `host` instead.
    pub authority: Option<String>,
    /// The headers a gateway is expected to set, strip or forward
    /// (see `is_recorded_header`), by lower-case name; repeated ones are
    /// joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body; `Null` when there was none or it was not JSON.
    pub body: serde_json::Value,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Whether a header goes into the log: credentials, proxy headers,
/// hop-by-hop headers, and any `x-test-*` marker a test sends.
pub(crate) fn is_recorded_header(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "x-api-key"
            | "x-request-id"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "host"
            | "connection"
            | "te"
            | "upgrade"
    ) || name.starts_with("x-test-")
}

/// The last `LOG_CAPACITY` requests. A plain mutex: it is held only to push
/// or copy, far shorter than anything else a request does.
#[derive(Debug, Default)]
pub(crate) struct RequestLog(Mutex<VecDeque<RecordedRequest>>);

impl RequestLog {
    pub fn push(&self, r: RecordedRequest) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(r);
    }

    pub fn all(&self) -> Vec<RecordedRequest> {
        let log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }
}

/// How a request ended, decided when its `Tracker` is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not finished: dropping it now means the client went away.
    Pending,
    Completed,
    Aborted,
}

/// Follows one request: counted in on creation, and counted out exactly
/// once on drop. It travels from the handler into the response body, so
/// whichever of them hyper drops first — because the client left — is
/// counted as cancelled without any extra signalling.
#[derive(Debug)]
pub(crate) struct Tracker {
    stats: Arc<MockStats>,
    outcome: Outcome,
    seq: u64,
}

impl Tracker {
    pub fn new(stats: Arc<MockStats>) -> Tracker {
        let seq = stats.requests.fetch_add(1, Relaxed) + 1;
        let now = stats.in_flight.fetch_add(1, Relaxed) + 1;
        stats.max_in_flight.fetch_max(now, Relaxed);
        Tracker {
            stats,
            outcome: Outcome::Pending,
            seq,
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let counter = match self.outcome {
            Outcome::Pending => &self.stats.cancelled,
            Outcome::Completed => &self.stats.completed,
            Outcome::Aborted => &self.stats.aborted,
        };
        counter.fetch_add(1, Relaxed);
        self.stats.in_flight.fetch_sub(1, Relaxed);
    }
}
