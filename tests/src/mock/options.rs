//! What a mock does: the server-wide `MockOptions`, the failure and usage
//! modes, their text syntax (shared by the `mock-llm` flags and the
//! `x-mock-*` request headers), and the per-request parameters that the
//! headers override.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderMap;

/// Options of one mock server. `Default` gives a fast, well-behaved
/// upstream: no latency, 16 tokens per completion, usage when asked.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Sent back in every response as `x-mock-name`, so a test behind a
    /// load balancer can tell which upstream answered.
    pub name: String,
    /// Listed by `GET /v1/models`; the first one also stands in for a
    /// request that names no model.
    pub models: Vec<String>,
    /// Wait before sending the response headers (the `/v1/*` routes).
    pub latency: Duration,
    /// Completion tokens per response (a request's `max_tokens` may cut it).
    pub tokens: u32,
    /// Delay between two token chunks of a stream.
    pub interval: Duration,
    pub usage: UsageMode,
    /// Injected into every request on the `/v1/*` POST routes.
    pub fail: Option<Failure>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            name: "mock".to_string(),
            models: vec!["mock-model".to_string()],
            latency: Duration::ZERO,
            tokens: 16,
            interval: Duration::ZERO,
            usage: UsageMode::WhenAsked,
            fail: None,
        }
    }
}

/// When token usage is reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UsageMode {
    /// Like OpenAI: always in a plain response; in a stream only when the
    /// request has `"stream_options": {"include_usage": true}`.
    #[default]
    WhenAsked,
    /// A stream carries the usage chunk even when not asked for.
    Always,
    /// No usage anywhere (an upstream that does not report it).
    Never,
}

impl FromStr for UsageMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "asked" | "when-asked" | "whenasked" => Ok(UsageMode::WhenAsked),
            "always" => Ok(UsageMode::Always),
            "never" => Ok(UsageMode::Never),
            other => Err(format!(
                "usage mode {other:?}: expected asked, always or never"
            )),
        }
    }
}

impl fmt::Display for UsageMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UsageMode::WhenAsked => "asked",
            UsageMode::Always => "always",
            UsageMode::Never => "never",
        })
    }
}

/// A misbehaviour to inject. Text syntax (flag `--fail`, header
/// `x-mock-fail`): an error status (400-599) such as `500`, `503`, `429`,
/// or `reset`, `stall`, `garbage`, `midstream:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Answer with this status and an OpenAI-shaped error body.
    Status(u16),
    /// Close the TCP connection (with a RST) without any response.
    Reset,
    /// Accept the request and never answer; held until the client leaves.
    Stall,
    /// 200 with `content-type: application/json` and a body that is not JSON.
    Garbage,
    /// Send the headers and this many SSE events (for a plain response:
    /// half of the body), then reset the TCP connection.
    MidStreamReset { after_chunks: u32 },
}

impl FromStr for Failure {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "reset" => return Ok(Failure::Reset),
            "stall" => return Ok(Failure::Stall),
            "garbage" => return Ok(Failure::Garbage),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("midstream:") {
            let after_chunks = n
                .parse()
                .map_err(|_| format!("failure {s:?}: midstream:N needs a chunk count"))?;
            return Ok(Failure::MidStreamReset { after_chunks });
        }
        match s.parse::<u16>() {
            Ok(code) if (400..=599).contains(&code) => Ok(Failure::Status(code)),
            _ => Err(format!(
                "failure {s:?}: expected an error status (400-599), reset, stall, garbage or midstream:N"
            )),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "{code}"),
            Failure::Reset => f.write_str("reset"),
            Failure::Stall => f.write_str("stall"),
            Failure::Garbage => f.write_str("garbage"),
            Failure::MidStreamReset { after_chunks } => write!(f, "midstream:{after_chunks}"),
        }
    }
}

/// The behaviour of one request: the server options with the request's
/// `x-mock-*` headers applied.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    pub latency: Duration,
    pub tokens: u32,
    pub interval: Duration,
    /// Delay of a stream's first event after its head.
    pub first_token: Duration,
    pub usage: UsageMode,
    pub fail: Option<Failure>,
}

impl Params {
    /// Applies the override headers; a malformed one is the client's error
    /// (a 400 naming it) rather than silently ignored, so a typo in a test
    /// does not pass unnoticed.
    pub fn from_headers(opts: &MockOptions, headers: &HeaderMap) -> Result<Params, String> {
        let mut p = Params {
            latency: opts.latency,
            tokens: opts.tokens,
            interval: opts.interval,
            first_token: Duration::ZERO,
            usage: opts.usage,
            fail: opts.fail,
        };
        if let Some(v) = header(headers, "x-mock-first-token-ms")? {
            p.first_token = Duration::from_millis(parse_num(v, "x-mock-first-token-ms")?);
        }
        if let Some(v) = header(headers, "x-mock-tokens")? {
            p.tokens = parse_num(v, "x-mock-tokens")?;
        }
        if let Some(v) = header(headers, "x-mock-interval-ms")? {
            p.interval = Duration::from_millis(parse_num(v, "x-mock-interval-ms")?);
        }
        if let Some(v) = header(headers, "x-mock-latency-ms")? {
            p.latency = Duration::from_millis(parse_num(v, "x-mock-latency-ms")?);
        }
        if let Some(v) = header(headers, "x-mock-usage")? {
            p.usage = v.parse().map_err(|e| format!("x-mock-usage: {e}"))?;
        }
        if let Some(v) = header(headers, "x-mock-fail")? {
            // `none` lets one request opt out of a server-wide failure.
            p.fail = match v.trim() {
                "none" | "off" => None,
                v => Some(v.parse().map_err(|e| format!("x-mock-fail: {e}"))?),
            };
        }
        Ok(p)
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| format!("{name}: not visible ASCII")),
    }
}

fn parse_num<T: FromStr>(v: &str, name: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{name}: {v:?} is not a non-negative integer"))
}
