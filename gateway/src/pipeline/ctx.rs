//! The request context: created when a request arrives, filled in by each
//! stage, and finished exactly once, when the response body ends, fails or
//! is dropped, which is when metrics and the access log are written.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::HeaderValue;

use super::{limits::Permit, usage::Usage};
use crate::metrics::{Metrics, NONE};

/// A request's id: the client's `x-request-id` when it is sane, else a
/// new one. Held as a header value, so the response's header, the access
/// log and the upstream request share it; none copies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// `value` must be visible ASCII (every caller checked it).
    pub(super) fn new(value: HeaderValue) -> RequestId {
        debug_assert!(value.to_str().is_ok());
        RequestId(value)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.0.as_bytes()).expect("a request id is ASCII")
    }

    /// The id as a header value (a shared reference, not a copy), marked
    /// never to be indexed: an HTTP/2 (HPACK) encoder otherwise adds each
    /// response's new id to its table, where it evicts the fields that do
    /// repeat and lengthens the search of every later id (RFC 7541 7.1.3
    /// allows the mark for any value not worth indexing).
    pub fn header(&self) -> HeaderValue {
        let mut v = self.0.clone();
        v.set_sensitive(true);
        v
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RequestId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

pub struct RequestCtx {
    pub request_id: RequestId,
    pub client: SocketAddr,
    pub method: http::Method,
    /// The request target's path and query (a share of the head's bytes,
    /// not a copy).
    pub target: http::uri::PathAndQuery,
    pub start: Instant,
    pub key: Option<Arc<str>>,
    /// Canonical model name, once routed.
    pub model: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub stream: bool,
    /// When the request was handed to the upstream client.
    pub dispatched: Option<Instant>,
    /// When its last attempt was (the latency a backend is weighed by).
    pub attempt_sent: Option<Instant>,
    /// Time the gateway spent before dispatch and after upstream headers.
    pub overhead: Duration,
    pub first_byte: Option<Instant>,
    /// When the answer's last piece came from upstream, where the body
    /// read the clock for it already; `finish` reads it otherwise.
    pub last_byte: Option<Instant>,
    pub usage: Option<Usage>,
    pub status: u16,
    pub bytes_out: u64,
    /// How the exchange ended when it did not end normally.
    pub outcome: Option<&'static str>,
    /// The key's admission under its limits, settled with the usage at the end.
    pub permit: Option<Permit>,
    /// Upstream attempts made (1 + retries).
    pub attempts: u32,
    /// The traffic group that served it, when the model has groups.
    pub group: Option<Arc<str>>,
}

/// The tokens a finished request is charged against its key's
/// `tokens_per_minute`: its usage when the answer said; nothing when no
/// backend was asked, or one refused it (a 4xx such as vLLM's context
/// length error: no generation ran); else the estimate stands (`None`), as
/// for a stream cut before its usage chunk or a client that left.
fn charged(usage: Option<Usage>, status: u16, dispatched: bool) -> Option<u64> {
    match usage {
        Some(u) => Some(u.prompt + u.completion),
        None if !dispatched || ((400..500).contains(&status) && status != 499) => Some(0),
        None => None,
    }
}

impl RequestCtx {
    pub fn new(
        request_id: RequestId,
        client: SocketAddr,
        method: http::Method,
        target: http::uri::PathAndQuery,
    ) -> RequestCtx {
        RequestCtx {
            request_id,
            client,
            method,
            target,
            start: Instant::now(),
            key: None,
            model: None,
            backend: None,
            stream: false,
            dispatched: None,
            attempt_sent: None,
            overhead: Duration::ZERO,
            first_byte: None,
            last_byte: None,
            usage: None,
            status: 0,
            bytes_out: 0,
            outcome: None,
            permit: None,
            attempts: 0,
            group: None,
        }
    }

    /// Settles the key's token reservation, records metrics and writes the
    /// access log line.
    pub fn finish(&mut self, m: &Metrics) {
        if let Some(mut p) = self.permit.take() {
            p.settle(charged(self.usage, self.status, self.dispatched.is_some()));
        }
        let model = self.model.as_deref().unwrap_or(NONE);
        let key = self.key.as_deref().unwrap_or(NONE);
        // StatusCode keeps the three digits as a static string.
        let status = http::StatusCode::from_u16(self.status).ok();
        let owned;
        let code = match &status {
            Some(c) => c.as_str(),
            None => {
                owned = self.status.to_string();
                owned.as_str()
            }
        };
        let total = self.last_byte.unwrap_or_else(Instant::now) - self.start;
        let ttft = self.first_byte.map(|t| t - self.start);
        m.with_request_series(model, key, code, |series| {
            series.requests().inc();
            if self.model.is_some() {
                series.duration().observe(total.as_secs_f64());
                // A stream's first byte is its first token; a JSON
                // answer's is the whole generation, which `duration` has.
                if let (true, Some(t)) = (self.stream, ttft) {
                    series.ttft().observe(t.as_secs_f64());
                }
            }
            if let Some(u) = self.usage {
                series.prompt_tokens().inc_by(u.prompt);
                series.completion_tokens().inc_by(u.completion);
                if let (true, Some(first)) = (self.stream && u.completion > 1, self.first_byte) {
                    let per =
                        (total - (first - self.start)).as_secs_f64() / (u.completion - 1) as f64;
                    series.tpot().observe(per);
                }
            }
        });
        if self.dispatched.is_some() {
            m.overhead.observe(self.overhead.as_secs_f64());
        }
        if let Some(g) = &self.group {
            m.group_requests.with_label_values(&[model, g, code]).inc();
        }
        crate::access_log::Entry {
            request_id: &self.request_id,
            client: self.client.ip(),
            method: self.method.as_str(),
            path: self.target.path(),
            key,
            model,
            backend: self.backend.as_deref().unwrap_or(NONE),
            status: self.status,
            stream: self.stream,
            bytes: self.bytes_out,
            ttft,
            duration: total,
            prompt_tokens: self.usage.map(|u| u.prompt),
            completion_tokens: self.usage.map(|u| u.completion),
            attempts: self.attempts,
            group: self.group.as_deref(),
            outcome: self.outcome.unwrap_or("ok"),
        }
        .log();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_request_is_charged() {
        let used = Usage {
            prompt: 10,
            completion: 5,
        };
        assert_eq!(charged(Some(used), 200, true), Some(15));
        // Refused upstream, or never sent: nothing generated.
        assert_eq!(charged(None, 400, true), Some(0));
        assert_eq!(charged(None, 503, false), Some(0));
        // Unknown: the estimate stands.
        assert_eq!(charged(None, 200, true), None);
        assert_eq!(charged(None, 499, true), None);
        assert_eq!(charged(None, 504, true), None);
    }
}
