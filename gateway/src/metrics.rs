//! Prometheus metrics (DESIGN.md section 8) and the `/metrics` endpoint.
//! Label values come from config names only (model, key and backend names),
//! never from what a client sent, so clients cannot grow the label space.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Label used where a request never reached a model or key.
pub const NONE: &str = "-";

/// Why a client connection was closed unserved
/// (`gateway_connections_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Blocked,
    Rate,
    PerIp,
    Total,
    Http2Resets,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Blocked => "blocked",
            Refusal::Rate => "rate",
            Refusal::PerIp => "per_ip",
            Refusal::Total => "total",
            Refusal::Http2Resets => "http2_resets",
        }
    }
}

pub struct Metrics {
    /// Tells this registry's series apart in the per-thread series cache.
    id: u64,
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttft: HistogramVec,
    pub tpot: HistogramVec,
    pub overhead: Histogram,
    pub tokens: IntCounterVec,
    pub backend_in_flight: IntGaugeVec,
    pub backend_healthy: IntGaugeVec,
    pub upstream_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub queue_waiting: IntGaugeVec,
    pub group_requests: IntCounterVec,
    pub backend_requests: IntCounterVec,
    pub connections: IntGaugeVec,
    /// `gateway_connections_refused_total{reason}`: see [`Refusal`].
    pub connections_refused: IntCounterVec,
    pub bans: IntCounterVec,
    pub xdp_packets: IntCounterVec,
    pub xdp_map_entries: IntGaugeVec,
    /// 1 while the XDP program is attached, 0 when disabled or degraded.
    pub xdp_attached: prometheus::IntGauge,
    /// `gateway_tls_certificate_expiry_timestamp_seconds`: when the served
    /// certificate ends (Unix seconds), for an alert ahead of it.
    pub tls_cert_expiry: prometheus::IntGauge,
}

/// The series a finished request writes, for one (model, key, status
/// code): the request counter at once, the others when first written, so
/// a series appears in `/metrics` only once it has something to show.
struct Cached {
    metrics: u64,
    model: Box<str>,
    key: Box<str>,
    code: Box<str>,
    requests: IntCounter,
    duration: std::cell::OnceCell<Histogram>,
    ttft: std::cell::OnceCell<Histogram>,
    tpot: std::cell::OnceCell<Histogram>,
    prompt_tokens: std::cell::OnceCell<IntCounter>,
    completion_tokens: std::cell::OnceCell<IntCounter>,
}

/// The series of one finished request (see [`Metrics::with_request_series`]).
pub struct RequestSeries<'a> {
    m: &'a Metrics,
    c: &'a Cached,
}

impl RequestSeries<'_> {
    pub fn requests(&self) -> &IntCounter {
        &self.c.requests
    }

    pub fn duration(&self) -> &Histogram {
        let (m, c) = (self.m, self.c);
        c.duration
            .get_or_init(|| m.duration.with_label_values(&[&c.model]))
    }

    pub fn ttft(&self) -> &Histogram {
        let (m, c) = (self.m, self.c);
        c.ttft.get_or_init(|| m.ttft.with_label_values(&[&c.model]))
    }

    pub fn tpot(&self) -> &Histogram {
        let (m, c) = (self.m, self.c);
        c.tpot.get_or_init(|| m.tpot.with_label_values(&[&c.model]))
    }

    pub fn prompt_tokens(&self) -> &IntCounter {
        let (m, c) = (self.m, self.c);
        c.prompt_tokens
            .get_or_init(|| m.tokens.with_label_values(&[&c.model, &c.key, "prompt"]))
    }

    pub fn completion_tokens(&self) -> &IntCounter {
        let (m, c) = (self.m, self.c);
        c.completion_tokens.get_or_init(|| {
            m.tokens
                .with_label_values(&[&c.model, &c.key, "completion"])
        })
    }
}

/// The hash of a cache entry's labels, used as its own map key.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type SeriesCache = std::collections::HashMap<
    u64,
    smallvec::SmallVec<[Cached; 1]>,
    std::hash::BuildHasherDefault<Prehashed>,
>;

/// Entries a thread's series cache holds before it starts over. The label
/// values are config names, so real configs stay far below it.
const SERIES_CACHE_MAX: usize = 4096;

/// FNV-1a of a registry id and label values: the cache's labels are config
/// names (no client picks them), so a fast hash with no secret will do.
fn label_hash(id: u64, labels: [&str; 3]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = 0xcbf2_9ce4_8422_2325 ^ id;
    for l in labels {
        for &b in l.as_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
        // A byte no label value holds ends each value: ("ab", "c") and
        // ("a", "bc") hash apart.
        h = (h ^ 0xff).wrapping_mul(PRIME);
    }
    h
}

thread_local! {
    static SERIES: std::cell::RefCell<SeriesCache> = Default::default();
}

fn buckets(v: &[f64]) -> Vec<f64> {
    v.to_vec()
}

impl Metrics {
    /// Counts a connection closed unserved.
    pub fn refused(&self, why: Refusal) {
        self.connections_refused
            .with_label_values(&[why.name()])
            .inc();
    }

    /// Runs `f` with the series of a finished request. They are resolved
    /// through each vector's label hash once per worker thread and label
    /// set, then kept: a request's five label lookups cost one hash of its
    /// labels here.
    pub fn with_request_series<R>(
        &self,
        model: &str,
        key: &str,
        code: &str,
        f: impl FnOnce(RequestSeries<'_>) -> R,
    ) -> R {
        let hash = label_hash(self.id, [model, key, code]);
        SERIES.with_borrow_mut(|cache| {
            let same = |c: &Cached| {
                c.metrics == self.id && &*c.model == model && &*c.key == key && &*c.code == code
            };
            let found = cache.get(&hash).and_then(|b| b.iter().position(same));
            let i = match found {
                Some(i) => i,
                None => {
                    if cache.len() >= SERIES_CACHE_MAX {
                        cache.clear();
                    }
                    let bucket = cache.entry(hash).or_default();
                    bucket.push(Cached {
                        metrics: self.id,
                        model: model.into(),
                        key: key.into(),
                        code: code.into(),
                        requests: self.requests.with_label_values(&[model, key, code]),
                        duration: Default::default(),
                        ttft: Default::default(),
                        tpot: Default::default(),
                        prompt_tokens: Default::default(),
                        completion_tokens: Default::default(),
                    });
                    bucket.len() - 1
                }
            };
            let c = &cache[&hash][i];
            f(RequestSeries { m: self, c })
        })
    }

    /// Stops exporting the gauges of backends and models a reload removed
    /// (`before` -> `after`): a gauge keeps its last value, so a removed
    /// backend would otherwise report itself unhealthy, or busy, forever.
    /// Counters stay: they are totals, and a rate over them falls to 0.
    pub fn forget_removed(
        &self,
        before: &crate::pipeline::routes::Routes,
        after: &crate::pipeline::routes::Routes,
    ) {
        let kept: std::collections::HashSet<(&str, &str)> = after
            .models
            .iter()
            .flat_map(|m| m.backends.iter().map(|b| (&*m.name, &*b.label)))
            .collect();
        for m in &before.models {
            for b in &m.backends {
                let labels = [&*m.name, &*b.label];
                if !kept.contains(&(labels[0], labels[1])) {
                    let _ = self.backend_in_flight.remove_label_values(&labels);
                    let _ = self.backend_healthy.remove_label_values(&labels);
                }
            }
            if !after.models.iter().any(|n| n.name == m.name) {
                let _ = self.queue_waiting.remove_label_values(&[&*m.name]);
            }
        }
    }

    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let single_gauge = |name: &str, help: &str| {
            let g = prometheus::IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], b: &[f64]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets(b)), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let requests = counter(
            "gateway_http_requests_total",
            "Requests by model, key and status code.",
            &["model", "key", "code"],
        );
        let duration = histogram(
            "gateway_http_request_duration_seconds",
            "Time from request arrival to the end of the response body.",
            &["model"],
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0,
            ],
        );
        let ttft = histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request arrival to the first response body byte from upstream, for streamed responses.",
            &["model"],
            &[
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
            ],
        );
        let tpot = histogram(
            "gateway_time_per_output_token_seconds",
            "Streaming time per completion token after the first.",
            &["model"],
            &[
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
            ],
        );
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_overhead_seconds",
                "Time the gateway itself adds: request arrival to upstream dispatch, plus upstream response headers to client response.",
            )
            .buckets(buckets(&[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05])),
        )
        .expect("valid metric");
        registry
            .register(Box::new(overhead.clone()))
            .expect("unique metric");
        let tokens = counter(
            "gateway_tokens_total",
            "Tokens by model, key and kind (prompt, completion).",
            &["model", "key", "kind"],
        );
        let backend_in_flight = gauge(
            "gateway_backend_in_flight",
            "Requests in flight per backend.",
            &["model", "backend"],
        );
        let backend_healthy = gauge(
            "gateway_backend_healthy",
            "1 if the backend takes traffic.",
            &["model", "backend"],
        );
        let upstream_errors = counter(
            "gateway_upstream_errors_total",
            "Failed upstream exchanges by kind: before the answer (connect, timeout, bad_response) or partway through it (stream, first_byte_timeout, idle_timeout, total_timeout).",
            &["model", "backend", "kind"],
        );
        let retries = counter(
            "gateway_upstream_retries_total",
            "Requests retried on another backend (outcome=retried), or not retried because the retry budget was spent (outcome=budget_exhausted).",
            &["model", "outcome"],
        );
        let fallbacks = counter(
            "gateway_fallbacks_total",
            "Requests sent on to a fallback model because their model could not take them (model: the one asked for).",
            &["model", "fallback"],
        );
        let rate_limited = counter(
            "gateway_rate_limited_total",
            "Requests refused with 429 by a per-key limit (requests, tokens, concurrency).",
            &["key", "limit"],
        );
        let queue_waiting = gauge(
            "gateway_queue_waiting",
            "Requests waiting for a backend slot, per model.",
            &["model"],
        );
        let group_requests = counter(
            "gateway_group_requests_total",
            "Requests of models with traffic groups (canary, A/B), by group and status code.",
            &["model", "group", "code"],
        );
        let backend_requests = counter(
            "gateway_backend_requests_total",
            "Upstream attempts per backend (retries included): how a balancing policy spreads load.",
            &["model", "backend"],
        );
        let connections = gauge(
            "gateway_connections",
            "Open client connections per worker.",
            &["worker"],
        );
        let connections_refused = counter(
            "gateway_connections_refused_total",
            "Client connections closed at accept, or HTTP/2 connections closed for abuse, by reason: \
             blocked (the blocklist, enforced at accept without XDP), rate (the SYN rate at accept without XDP), \
             per_ip (max_connections_per_ip), total (max_connections), http2_resets (most streams reset early).",
            &["reason"],
        );
        let bans = counter(
            "gateway_bans_total",
            "Sources banned in the kernel for L7 abuse, by cause.",
            &["cause"],
        );
        let xdp_packets = counter(
            "gateway_xdp_packets_total",
            "Packets the XDP program saw, by verdict reason.",
            &["reason"],
        );
        let xdp_map_entries = gauge(
            "gateway_xdp_map_entries",
            "Entries in the XDP program's maps.",
            &["map"],
        );
        let xdp_attached = single_gauge(
            "gateway_xdp_attached",
            "1 while the XDP program is attached.",
        );
        let tls_cert_expiry = single_gauge(
            "gateway_tls_certificate_expiry_timestamp_seconds",
            "When the served TLS certificate chain stops being valid: its first certificate to end (Unix seconds; 0 without TLS or when it cannot be read).",
        );
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Metrics {
            tls_cert_expiry,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            xdp_packets,
            xdp_map_entries,
            xdp_attached,
            bans,
            connections,
            connections_refused,
            registry,
            requests,
            duration,
            ttft,
            tpot,
            overhead,
            tokens,
            backend_in_flight,
            backend_healthy,
            upstream_errors,
            retries,
            fallbacks,
            rate_limited,
            queue_waiting,
            group_requests,
            backend_requests,
        }
    }

    /// Totals for `gateway stats`: requests by status class, tokens, bans
    /// and open connections, summed over all label values.
    pub fn summary(&self) -> serde_json::Value {
        let mut requests = std::collections::BTreeMap::<String, u64>::new();
        let (mut prompt, mut completion, mut bans, mut connections) = (0u64, 0u64, 0u64, 0i64);
        for fam in self.registry.gather() {
            for m in fam.get_metric() {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_owned())
                };
                let value = m.get_counter().get_value() as u64;
                match fam.name() {
                    "gateway_http_requests_total" => {
                        let class = label("code")
                            .and_then(|c| c.chars().next())
                            .map_or("other".into(), |c| format!("{c}xx"));
                        *requests.entry(class).or_default() += value;
                    }
                    "gateway_tokens_total" => match label("kind").as_deref() {
                        Some("prompt") => prompt += value,
                        _ => completion += value,
                    },
                    "gateway_bans_total" => bans += value,
                    "gateway_connections" => connections += m.get_gauge().get_value() as i64,
                    _ => {}
                }
            }
        }
        serde_json::json!({
            "requests": requests,
            "tokens": { "prompt": prompt, "completion": completion },
            "bans": bans,
            "open_connections": connections,
        })
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Connections the metrics listener serves at once; more are closed.
const MAX_SCRAPERS: usize = 64;
/// How long a metrics connection may take to send a request head, and stay
/// idle between requests.
const SCRAPE_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics` on `addr` until the process ends. Runs on its own
/// task so scrapes never wait behind proxy traffic.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr} (metrics.listen)"))?;
    let local = listener.local_addr()?;
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let metrics = Arc::clone(&metrics);
            let before = Arc::clone(&before_scrape);
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let metrics = Arc::clone(&metrics);
                    let before = Arc::clone(&before);
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            before();
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(metrics.encode())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                        };
                        Ok::<_, Infallible>(resp.expect("static response parts"))
                    }
                });
                // A connection that sends no (complete) request head for
                // this long, idle between scrapes included, is closed.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(SCRAPE_HEAD_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.encode()).unwrap()
    }

    #[test]
    fn a_reload_stops_the_gauges_of_removed_backends_and_models() {
        use crate::{config::Config, pipeline::routes::Routes};
        let cfg =
            |models: &str| Routes::new(&Config::parse(models).unwrap_or_else(|p| panic!("{p:?}")));
        let before = cfg(
            "[[models]]\nname = \"a\"\n[[models.backends]]\nurl = \"http://10.0.0.1:8000\"\n\
             [[models.backends]]\nurl = \"http://10.0.0.2:8000\"\n\
             [[models]]\nname = \"b\"\n[[models.backends]]\nurl = \"http://10.0.0.3:8000\"\n",
        );
        let after =
            cfg("[[models]]\nname = \"a\"\n[[models.backends]]\nurl = \"http://10.0.0.1:8000\"\n");
        let m = Metrics::new();
        for model in &before.models {
            m.queue_waiting.with_label_values(&[&model.name]).set(1);
            for b in &model.backends {
                m.backend_healthy
                    .with_label_values(&[&model.name, &b.label])
                    .set(0);
            }
        }
        m.forget_removed(&before, &after);
        let t = text(&m);
        let healthy: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("gateway_backend_healthy{"))
            .collect();
        assert_eq!(healthy.len(), 1, "{t}");
        assert!(healthy[0].contains("10.0.0.1"), "{t}");
        assert!(t.contains(r#"gateway_queue_waiting{model="a"} 1"#), "{t}");
        assert!(!t.contains(r#"gateway_queue_waiting{model="b"}"#), "{t}");
    }

    #[test]
    fn request_series_are_per_registry_and_appear_when_written() {
        let (a, b) = (Metrics::new(), Metrics::new());
        for _ in 0..3 {
            a.with_request_series("m", "k", "200", |s| s.requests().inc());
        }
        b.with_request_series("m", "k", "200", |s| {
            s.requests().inc();
            s.ttft().observe(0.25);
        });
        a.with_request_series("m", "k", "500", |s| s.requests().inc());
        let (ta, tb) = (text(&a), text(&b));
        assert!(
            ta.contains(r#"gateway_http_requests_total{code="200",key="k",model="m"} 3"#),
            "{ta}"
        );
        assert!(ta.contains(r#"gateway_http_requests_total{code="500",key="k",model="m"} 1"#));
        assert!(
            tb.contains(r#"gateway_http_requests_total{code="200",key="k",model="m"} 1"#),
            "{tb}"
        );
        // Series are created on their first write only.
        assert!(
            !ta.contains("gateway_time_to_first_token_seconds_count"),
            "{ta}"
        );
        assert!(
            tb.contains(r#"gateway_time_to_first_token_seconds_count{model="m"} 1"#),
            "{tb}"
        );
        assert!(!tb.contains("gateway_tokens_total"), "{tb}");
    }
}
