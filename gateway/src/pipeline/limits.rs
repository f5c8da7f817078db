//! Per-key limits: requests per minute, tokens per minute and requests in
//! flight. Both rates are token buckets that hold a minute's allowance and
//! refill continuously, so a key may burst up to its limit and then goes at
//! the limit's pace.
//!
//! Tokens are reserved at admission (an estimate: prompt bytes / 4, a fixed
//! count per inline image, plus `max_tokens`) and settled with the real usage when the response ends,
//! so a stream cannot overshoot the budget by more than what one request
//! used beyond its estimate; the bucket may go into debt, which later
//! requests wait out.
//!
//! The state outlives reloads (it is carried over by key name), so a reload
//! does not hand every key a fresh minute.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue};

/// Completion tokens assumed for a request without `max_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 1024;
/// Request bytes per prompt token, for the estimate.
const BYTES_PER_TOKEN: u64 = 4;

/// A key's configured limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

impl Limits {
    pub fn any(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || self.max_concurrent.is_some()
    }
}

/// Which limit refused a request (the `limit` label of
/// `gateway_rate_limited_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Concurrency,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
            Kind::Concurrency => "concurrency",
        }
    }
}

/// A refusal: which limit, when to come back, and the headers to send.
#[derive(Debug)]
pub struct Refusal {
    pub kind: Kind,
    pub retry_after: Duration,
    pub headers: RateHeaders,
}

/// `x-ratelimit-*` headers, OpenAI style.
#[derive(Debug, Default)]
pub struct RateHeaders(pub Vec<(HeaderName, HeaderValue)>);

#[derive(Debug)]
struct Bucket {
    level: f64,
}

/// Token bucket with `capacity` = the per-minute limit.
fn refill(b: &mut Bucket, capacity: f64, elapsed: Duration) {
    b.level = (b.level + capacity * elapsed.as_secs_f64() / 60.0).min(capacity);
}

/// How long until `b` holds `need`.
fn wait_for(b: &Bucket, capacity: f64, need: f64) -> Duration {
    if b.level >= need {
        return Duration::ZERO;
    }
    Duration::from_secs_f64((need - b.level) * 60.0 / capacity)
}

#[derive(Debug)]
struct Buckets {
    requests: Bucket,
    tokens: Bucket,
    last: Instant,
}

/// The live state of one key.
#[derive(Debug)]
pub struct KeyState {
    buckets: Mutex<Buckets>,
    in_flight: AtomicU32,
}

impl KeyState {
    pub fn new(limits: &Limits) -> Arc<KeyState> {
        Arc::new(KeyState {
            buckets: Mutex::new(Buckets {
                requests: Bucket {
                    level: limits.requests_per_minute.unwrap_or(0) as f64,
                },
                tokens: Bucket {
                    level: limits.tokens_per_minute.unwrap_or(0) as f64,
                },
                last: Instant::now(),
            }),
            in_flight: AtomicU32::new(0),
        })
    }

    /// Admits a request of an estimated `tokens`, or says why not: both
    /// phases at once ([`KeyState::admit_request`], then
    /// [`KeyState::admit_tokens`]).
    pub fn admit(
        self: &Arc<Self>,
        limits: &Limits,
        tokens: u64,
    ) -> Result<(Permit, RateHeaders), Refusal> {
        let mut permit = self.admit_request(limits)?;
        let headers = self.admit_tokens(&mut permit, limits, tokens)?;
        Ok((permit, headers))
    }

    /// The first phase, before the body is read: a slot in flight and one
    /// of the minute's requests. A request refused later (invalid JSON,
    /// an unknown or forbidden model, too large a body) has still spent
    /// its request, so a key cannot send failing requests without limit.
    pub fn admit_request(self: &Arc<Self>, limits: &Limits) -> Result<Permit, Refusal> {
        if let Some(max) = limits.max_concurrent {
            let was = self.in_flight.fetch_add(1, Ordering::AcqRel);
            if was >= max {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                // The rate headers still tell the client where its
                // per-minute budgets stand, as on every other answer.
                let headers =
                    if limits.requests_per_minute.is_some() || limits.tokens_per_minute.is_some() {
                        headers(limits, &self.refilled(limits))
                    } else {
                        RateHeaders::default()
                    };
                return Err(Refusal {
                    kind: Kind::Concurrency,
                    retry_after: Duration::from_secs(1),
                    headers,
                });
            }
        }
        let permit = Permit {
            state: Arc::clone(self),
            counted: limits.max_concurrent.is_some(),
            took_request: false,
            reserved: 0,
            tpm: limits.tokens_per_minute,
        };
        let Some(rpm) = limits.requests_per_minute else {
            return Ok(permit);
        };
        let mut g = self.refilled(limits);
        let wait = wait_for(&g.requests, rpm as f64, 1.0);
        if !wait.is_zero() {
            let headers = headers(limits, &g);
            drop(g);
            return Err(Refusal {
                kind: Kind::Requests,
                retry_after: wait,
                headers,
            });
        }
        g.requests.level -= 1.0;
        drop(g);
        let mut permit = permit;
        permit.took_request = true;
        Ok(permit)
    }

    /// The second phase, once the body is known: reserves its estimated
    /// `tokens` and returns the `x-ratelimit-*` headers. A refusal here
    /// gives the request of the first phase back: the client is told to
    /// wait for tokens, and its retry is the same request.
    pub fn admit_tokens(
        &self,
        permit: &mut Permit,
        limits: &Limits,
        tokens: u64,
    ) -> Result<RateHeaders, Refusal> {
        if limits.requests_per_minute.is_none() && limits.tokens_per_minute.is_none() {
            return Ok(RateHeaders::default());
        }
        let mut g = self.refilled(limits);
        if let Some(tpm) = limits.tokens_per_minute {
            // A request larger than the whole minute's allowance waits
            // for a full bucket rather than forever.
            let need = tokens.min(tpm) as f64;
            let wait = wait_for(&g.tokens, tpm as f64, need);
            if !wait.is_zero() {
                if let (true, Some(rpm)) = (
                    std::mem::take(&mut permit.took_request),
                    limits.requests_per_minute,
                ) {
                    // Never above a full minute's allowance.
                    g.requests.level = (g.requests.level + 1.0).min(rpm as f64);
                }
                return Err(Refusal {
                    kind: Kind::Tokens,
                    retry_after: wait,
                    headers: headers(limits, &g),
                });
            }
            g.tokens.level -= need;
            permit.reserved = need as u64;
        }
        Ok(headers(limits, &g))
    }

    /// The buckets, refilled up to now.
    fn refilled(&self, limits: &Limits) -> std::sync::MutexGuard<'_, Buckets> {
        let mut g = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now - g.last;
        g.last = now;
        if let Some(rpm) = limits.requests_per_minute {
            refill(&mut g.requests, rpm as f64, elapsed);
        }
        if let Some(tpm) = limits.tokens_per_minute {
            refill(&mut g.tokens, tpm as f64, elapsed);
        }
        g
    }

    fn settle(&self, reserved: u64, used: u64, tpm: u64) {
        let mut g = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        g.tokens.level = (g.tokens.level + reserved as f64 - used as f64).min(tpm as f64);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

fn headers(limits: &Limits, g: &Buckets) -> RateHeaders {
    let mut h = Vec::with_capacity(6);
    let mut add = |kind: &str, limit: u64, b: &Bucket| {
        let remaining = b.level.max(0.0).floor() as u64;
        let reset = wait_for(b, limit as f64, limit as f64);
        for (field, value) in [
            ("limit", limit.to_string()),
            ("remaining", remaining.to_string()),
            ("reset", format_reset(reset)),
        ] {
            h.push((
                HeaderName::try_from(format!("x-ratelimit-{field}-{kind}"))
                    .expect("a valid header name"),
                HeaderValue::try_from(value).expect("digits and units"),
            ));
        }
    };
    if let Some(rpm) = limits.requests_per_minute {
        add("requests", rpm, &g.requests);
    }
    if let Some(tpm) = limits.tokens_per_minute {
        add("tokens", tpm, &g.tokens);
    }
    RateHeaders(h)
}

/// OpenAI's reset format: `"1s"`, `"6m0s"`, `"120ms"`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs_f64();
    if s < 60.0 {
        let t = (s * 1000.0).round() / 1000.0;
        return format!("{t}s");
    }
    let m = (s / 60.0).floor() as u64;
    format!("{m}m{}s", (s - m as f64 * 60.0).round() as u64)
}

/// A request's admission: released (and its tokens settled) when the
/// request ends.
#[derive(Debug)]
pub struct Permit {
    state: Arc<KeyState>,
    counted: bool,
    /// Took one of the minute's requests (given back if the tokens refuse).
    took_request: bool,
    reserved: u64,
    tpm: Option<u64>,
}

impl Permit {
    /// Replaces the estimate with the real usage (when it is known).
    pub fn settle(&mut self, used: Option<u64>) {
        if let (Some(tpm), Some(used)) = (self.tpm.take(), used) {
            self.state.settle(self.reserved, used, tpm);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.counted {
            self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Tokens an inline image or audio clip (a `data:` URL) is reserved as:
/// models see a few hundred to a few thousand, not its base64 length / 4
/// (a 1 MB image would reserve 260k tokens, more than a whole minute of a
/// typical key). The real usage settles it.
pub const TOKENS_PER_MEDIA: u64 = 1024;

/// The token estimate of a request body.
pub fn estimate(
    body_len: usize,
    media: super::request::Media,
    max_tokens: Option<u64>,
    completes: bool,
) -> u64 {
    let text = body_len.saturating_sub(media.bytes) as u64;
    let prompt = (text / BYTES_PER_TOKEN)
        .saturating_add(u64::from(media.count).saturating_mul(TOKENS_PER_MEDIA));
    let completion = if completes {
        max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE)
    } else {
        0
    };
    prompt.saturating_add(completion).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(h: &'a RateHeaders, name: &str) -> &'a str {
        h.0.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn requests_per_minute_bursts_then_refuses() {
        let l = Limits {
            requests_per_minute: Some(3),
            ..Default::default()
        };
        let s = KeyState::new(&l);
        let mut permits = Vec::new();
        for left in ["2", "1", "0"] {
            let (p, h) = s.admit(&l, 1).unwrap();
            assert_eq!(header(&h, "x-ratelimit-remaining-requests"), left);
            assert_eq!(header(&h, "x-ratelimit-limit-requests"), "3");
            permits.push(p);
        }
        let r = s.admit(&l, 1).unwrap_err();
        assert_eq!(r.kind, Kind::Requests);
        assert!(
            r.retry_after > Duration::from_secs(19) && r.retry_after <= Duration::from_secs(20),
            "{:?}",
            r.retry_after
        );
        assert_eq!(header(&r.headers, "x-ratelimit-remaining-requests"), "0");
    }

    #[test]
    fn tokens_are_reserved_then_settled() {
        let l = Limits {
            tokens_per_minute: Some(1000),
            ..Default::default()
        };
        let s = KeyState::new(&l);
        let (mut p, h) = s.admit(&l, 600).unwrap();
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), "400");
        let r = s.admit(&l, 600).unwrap_err();
        assert_eq!(r.kind, Kind::Tokens);
        // The request used only 100: 500 come back.
        p.settle(Some(100));
        let (_p2, h) = s.admit(&l, 600).unwrap();
        assert!(
            header(&h, "x-ratelimit-remaining-tokens")
                .parse::<u64>()
                .unwrap()
                >= 300,
            "{h:?}"
        );
    }

    #[test]
    fn overuse_becomes_debt() {
        let l = Limits {
            tokens_per_minute: Some(60_000),
            ..Default::default()
        };
        let s = KeyState::new(&l);
        let (mut p, _) = s.admit(&l, 10).unwrap();
        p.settle(Some(90_000));
        let r = s.admit(&l, 10).unwrap_err();
        // 30,010 tokens short at 1,000/s.
        assert!(
            r.retry_after > Duration::from_secs(29),
            "{:?}",
            r.retry_after
        );
    }

    #[test]
    fn concurrency_is_released_on_drop() {
        let l = Limits {
            max_concurrent: Some(2),
            ..Default::default()
        };
        let s = KeyState::new(&l);
        let a = s.admit(&l, 1).unwrap();
        let _b = s.admit(&l, 1).unwrap();
        assert_eq!(s.admit(&l, 1).unwrap_err().kind, Kind::Concurrency);
        drop(a);
        assert!(s.admit(&l, 1).is_ok());
        assert_eq!(s.in_flight(), 1, "the permit of the last admit was dropped");
    }

    #[test]
    fn a_request_refused_for_tokens_gives_its_request_back() {
        let l = Limits {
            requests_per_minute: Some(2),
            tokens_per_minute: Some(100),
            ..Default::default()
        };
        let s = KeyState::new(&l);
        let mut first = s.admit_request(&l).unwrap();
        s.admit_tokens(&mut first, &l, 80).unwrap();
        let mut p = s.admit_request(&l).unwrap();
        assert_eq!(
            s.admit_request(&l).unwrap_err().kind,
            Kind::Requests,
            "both requests of the minute are spent"
        );
        let r = s.admit_tokens(&mut p, &l, 80).unwrap_err();
        assert_eq!(r.kind, Kind::Tokens, "80 tokens is more than the 20 left");
        assert_eq!(header(&r.headers, "x-ratelimit-remaining-requests"), "1");
        assert!(s.admit_request(&l).is_ok(), "the refused one came back");
    }

    #[test]
    fn a_request_that_fails_after_admission_has_spent_its_request() {
        let l = Limits {
            requests_per_minute: Some(1),
            ..Default::default()
        };
        let s = KeyState::new(&l);
        // Say its body was invalid JSON: the permit is dropped unused.
        drop(s.admit_request(&l).unwrap());
        assert_eq!(s.admit_request(&l).unwrap_err().kind, Kind::Requests);
    }

    #[test]
    fn a_concurrency_refusal_carries_the_rate_headers() {
        let l = Limits {
            requests_per_minute: Some(10),
            max_concurrent: Some(1),
            ..Default::default()
        };
        let s = KeyState::new(&l);
        let _held = s.admit_request(&l).unwrap();
        let r = s.admit_request(&l).unwrap_err();
        assert_eq!(r.kind, Kind::Concurrency);
        assert_eq!(header(&r.headers, "x-ratelimit-limit-requests"), "10");
        assert_eq!(header(&r.headers, "x-ratelimit-remaining-requests"), "9");
    }

    #[test]
    fn inline_media_is_estimated_per_item_not_by_its_bytes() {
        use crate::pipeline::request::Media;
        let image = Media {
            count: 1,
            bytes: 1_000_000,
        };
        assert_eq!(
            estimate(1_000_400, image, Some(10), true),
            400 / BYTES_PER_TOKEN + TOKENS_PER_MEDIA + 10
        );
        assert_eq!(estimate(400, Media::default(), None, false), 100);
    }

    #[test]
    fn reset_format() {
        assert_eq!(format_reset(Duration::from_millis(120)), "120ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
