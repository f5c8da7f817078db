//! Backends: pooled clients per backend (the gateway's own HTTP/1.1 client
//! for `http://` URLs, hyper's for HTTP/2 prior knowledge on `h2c://` and
//! for TLS on `https://`), and the in-flight count and health the balancer
//! reads.

pub mod checker;
pub mod ewma;
pub mod h1;
pub mod health;

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use crate::config::BackendConfig;

pub type UpstreamBody = Full<Bytes>;
pub type UpstreamClient = Client<Bounded<HttpsConnector<HttpConnector>>, UpstreamBody>;

/// A connector whose whole connect, the TLS handshake included, must end
/// within `timeouts.connect` (hyper's connector bounds the TCP connect
/// only; a handshake that hangs would hold the request until its
/// `first_byte`). A late one fails as a timed-out connect.
#[derive(Clone)]
pub struct Bounded<C> {
    inner: C,
    within: Duration,
}

impl<C> tower_service::Service<Uri> for Bounded<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = C::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<C::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connect = self.inner.call(uri);
        let within = self.within;
        Box::pin(async move {
            match tokio::time::timeout(within, connect).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection (TCP and TLS) within {within:?}"),
                )) as _),
            }
        })
    }
}

/// How long an idle pooled connection is kept (h2c and https backends).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The same for the own HTTP/1.1 client: under the 5 s keep-alive of
/// uvicorn (vLLM, SGLang) and cpp-httplib (llama.cpp), so a kept connection
/// is given up before the backend closes it, not raced by a request.
const H1_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// TCP keepalive on upstream connections: a peer that vanished without a
/// reset is found after about a minute, not TCP's fifteen.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// HTTP/2 pings to h2c and https backends.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The TCP keepalive of an upstream socket (probes after `KEEPALIVE_IDLE`
/// of silence, every `KEEPALIVE_INTERVAL`).
pub(crate) fn tcp_keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(3)
}

/// One backend server of a model.
pub struct Backend {
    /// The URL as configured: the `backend` label in metrics and logs.
    pub label: Arc<str>,
    /// Scheme (http/https) and authority requests are sent to.
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Path prefix of the URL, without a trailing slash ("" for none).
    prefix: String,
    /// Changed in place by a reload (so pools and health survive it).
    weight: AtomicU32,
    /// Requests in flight at most; 0 = no cap. Changed in place by a
    /// reload, like the weight (so its in-flight count and health carry on).
    max_connections: AtomicU32,
    in_flight: AtomicU32,
    /// Taken out of rotation by `gateway backends drain`: in-flight
    /// requests finish, new ones go elsewhere.
    drained: std::sync::atomic::AtomicBool,
    /// What the backend was built from, to reuse it across reloads.
    spec: (BackendConfig, Duration),
    /// One pool per worker, so a worker's requests use connections driven
    /// by its own runtime (`https://` and `h2c://` backends).
    clients: Vec<UpstreamClient>,
    /// The own HTTP/1.1 client (`http://` backends), pools per worker too.
    h1: Option<h1::Client>,
    /// The pool of the active health checks (on the control runtime).
    pub(crate) probe_client: UpstreamClient,
    /// `Authorization: Bearer <api_key>` for this backend (marked
    /// sensitive), when the config gives one.
    auth: Option<http::HeaderValue>,
    pub health: health::Health,
    /// Latency and error averages (the `latency` policy).
    pub observed: ewma::Observed,
    /// `gateway_backend_requests_total` for this backend, resolved once.
    requests: OnceLock<prometheus::IntCounter>,
    /// The model's admission queue, woken when a slot frees.
    slots: Arc<Slots>,
}

/// Requests of one model waiting for a backend slot (see `pipeline::balance`).
#[derive(Default)]
pub struct Slots {
    pub waiting: AtomicU32,
    /// Waiters that can take only some of the model's slots: any request
    /// of a model with traffic groups, or one that avoids backends it
    /// tried (retries do not queue today, but `acquire` allows for it).
    pub picky: AtomicU32,
    /// The model has more than one traffic group (set at each load).
    grouped: std::sync::atomic::AtomicBool,
    pub freed: tokio::sync::Notify,
}

impl Slots {
    /// One slot freed. While every waiter can take any slot, it goes to
    /// the one that has waited longest (FIFO: `notify_one` wakes in order,
    /// and a woken request that goes away passes its wake-up on). When
    /// some waiter can take only some slots, every waiter looks again: a
    /// wake-up handed to one whose backends are still full would be lost
    /// to the one that could use the slot. Requests register before they
    /// look (`balance::Balancer::acquire`), so none misses a wake-up.
    pub fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            if self.fifo() {
                self.freed.notify_one();
            } else {
                self.freed.notify_waiters();
            }
        }
    }

    /// Any number of slots may have opened (a cap raised, a backend back
    /// in rotation): every waiter looks again.
    pub fn wake_all(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Whether every waiter can take any slot, so they are served in order.
    pub fn fifo(&self) -> bool {
        !self.grouped.load(Ordering::Relaxed) && self.picky.load(Ordering::SeqCst) == 0
    }

    pub fn grouped(&self) -> bool {
        self.grouped.load(Ordering::Relaxed)
    }

    pub fn set_grouped(&self, grouped: bool) {
        if self.grouped.swap(grouped, Ordering::Relaxed) != grouped {
            self.wake_all();
        }
    }
}

impl Backend {
    pub fn new(
        cfg: &BackendConfig,
        connect_timeout: Duration,
        workers: usize,
        slots: Arc<Slots>,
    ) -> Backend {
        let h2c = cfg.url.scheme_str() == Some("h2c");
        let scheme = if cfg.url.scheme_str() == Some("https") {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        let authority = cfg
            .url
            .authority()
            .cloned()
            .expect("validated: backend URLs have a host");
        let prefix = cfg.url.path().trim_end_matches('/').to_owned();
        let own_h1 = !h2c && scheme == http::uri::Scheme::HTTP;
        let h1 = own_h1
            .then(|| h1::Client::new(&authority, connect_timeout, H1_POOL_IDLE_TIMEOUT, workers));
        let client = || {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(connect_timeout));
            http.set_nodelay(true);
            http.set_keepalive(Some(KEEPALIVE_IDLE));
            http.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
            http.enforce_http(false);
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls_client_config(cfg.tls_ca.as_ref()).as_ref().clone())
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            let connector = Bounded {
                inner: connector,
                within: connect_timeout,
            };
            let mut b = Client::builder(TokioExecutor::new());
            // An HTTP/2 connection carries every stream of the worker: a
            // peer gone without a reset (a pod removed, NAT state lost) is
            // found by pings, not after each request's first_byte.
            b.pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_keep_alive_interval(Some(H2_PING_INTERVAL))
                .http2_keep_alive_timeout(H2_PING_TIMEOUT)
                .http2_keep_alive_while_idle(true);
            if h2c {
                b.http2_only(true);
            }
            b.build(connector)
        };
        Backend {
            label: cfg.url.to_string().trim_end_matches('/').into(),
            scheme,
            authority,
            prefix,
            weight: AtomicU32::new(cfg.weight),
            max_connections: AtomicU32::new(cfg.max_connections.unwrap_or(0)),
            in_flight: AtomicU32::new(0),
            drained: std::sync::atomic::AtomicBool::new(false),
            spec: (cfg.clone(), connect_timeout),
            clients: if own_h1 {
                Vec::new()
            } else {
                (0..workers.max(1)).map(|_| client()).collect()
            },
            h1,
            probe_client: client(),
            auth: cfg.api_key.as_ref().and_then(|k| {
                let mut v = http::HeaderValue::from_str(&format!("Bearer {}", k.0)).ok()?;
                v.set_sensitive(true);
                Some(v)
            }),
            health: health::Health::default(),
            observed: ewma::Observed::default(),
            requests: OnceLock::new(),
            slots,
        }
    }

    /// The upstream URI for a client request path (`/v1/chat/completions`).
    pub fn uri(&self, path_and_query: &str) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(if self.prefix.is_empty() {
                path_and_query.to_owned()
            } else {
                [self.prefix.as_str(), path_and_query].concat()
            })
            .build()
            .expect("a valid base and a valid request path")
    }

    /// The upstream path for a client request path: the URL's prefix
    /// joined to it.
    pub fn path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        if self.prefix.is_empty() {
            path_and_query.into()
        } else {
            [self.prefix.as_str(), path_and_query].concat().into()
        }
    }

    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// The own HTTP/1.1 client, for `http://` backends.
    pub fn h1(&self) -> Option<&h1::Client> {
        self.h1.as_ref()
    }

    /// The calling worker's hyper pool (`https://` and `h2c://` backends).
    pub fn client(&self) -> &UpstreamClient {
        &self.clients[crate::listener::workers::current() % self.clients.len()]
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the balancer may consider it at all: not drained, not at
    /// its connection cap (health is asked separately).
    pub fn available(&self) -> bool {
        !self.drained() && !self.full()
    }

    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    pub fn set_drained(&self, on: bool) {
        if self.drained.swap(on, Ordering::Relaxed) != on {
            // Waiting requests look again: for its slots, or (drained) to
            // learn whether any backend is left.
            self.slots.wake_all();
        }
    }

    /// Counts an upstream attempt in `gateway_backend_requests_total`.
    pub fn count_request(&self, metrics: &crate::metrics::Metrics, model: &str) {
        self.requests
            .get_or_init(|| {
                metrics
                    .backend_requests
                    .with_label_values(&[model, &*self.label])
            })
            .inc();
    }

    /// The model's admission queue.
    pub fn slots(&self) -> &Arc<Slots> {
        &self.slots
    }

    /// Whether a reload may keep this backend (same URL and settings; the
    /// weight may change), so its in-flight count, pools, health and drain
    /// state carry over. A `tls_ca` whose file changed (a rotated CA) is
    /// another backend: its pools are built anew with the new roots.
    pub fn same_spec(&self, cfg: &BackendConfig, connect_timeout: Duration) -> bool {
        let (c, t) = &self.spec;
        c.url == cfg.url
            && c.api_key == cfg.api_key
            && c.tls_ca == cfg.tls_ca
            && *t == connect_timeout
    }

    /// The `Authorization` value the backend wants, if any.
    pub fn auth(&self) -> Option<&http::HeaderValue> {
        self.auth.as_ref()
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, w: u32) {
        self.weight.store(w, Ordering::Relaxed);
    }

    /// The cap on requests in flight, if any.
    pub fn max_connections(&self) -> Option<u32> {
        Some(self.max_connections.load(Ordering::Relaxed)).filter(|m| *m != 0)
    }

    /// A reload's new cap; requests waiting for a slot look again when it
    /// changed (a reload that keeps it leaves the queue's order alone).
    pub fn set_max_connections(&self, m: Option<u32>) {
        let old = self.max_connections.swap(m.unwrap_or(0), Ordering::Relaxed);
        if old != m.unwrap_or(0) {
            self.slots.wake_all();
        }
    }

    /// Whether the backend is at its connection cap.
    pub fn full(&self) -> bool {
        let m = self.max_connections.load(Ordering::Relaxed);
        m != 0 && self.in_flight() >= m
    }

    /// Counts one more request in flight until the lease is dropped.
    /// `probe`: the request is the half-open probe of an ejected backend.
    pub fn lease(self: &Arc<Self>, probe: bool) -> Lease {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if probe {
            self.health.claim_probe();
        }
        Lease {
            backend: Arc::clone(self),
            probe,
            reported: false,
        }
    }
}

/// A response body from upstream, from whichever client carried it.
pub enum Incoming {
    H1(h1::Body),
    Hyper(hyper::body::Incoming),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Incoming::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Incoming::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Incoming::H1(b) => b.is_end_stream(),
            Incoming::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Incoming::H1(b) => b.size_hint(),
            Incoming::Hyper(b) => b.size_hint(),
        }
    }
}

/// A request's claim on a backend slot; released on drop, so an error, a
/// finished response and a client disconnect all free it.
pub struct Lease {
    backend: Arc<Backend>,
    probe: bool,
    reported: bool,
}

impl Lease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Tells the backend's health how the request went: `true` for a
    /// usable response, `false` for a connect error, reset, timeout or 5xx.
    /// Later reports of the same lease only count failures (a stream that
    /// breaks after a good start).
    pub fn report(&mut self, ok: bool) {
        if self.reported && ok {
            return;
        }
        let probe = self.probe && !self.reported;
        self.reported = true;
        let was_up = self.backend.health.is_up();
        self.backend.health.report(ok, probe, &self.backend.label);
        if was_up != self.backend.health.is_up() {
            // Ejected, or back after its probe: requests waiting for a
            // slot look again (for another backend, to learn that none is
            // left, or at this one).
            self.backend.slots.wake_all();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.backend.health.abandon_probe();
        }
        // SeqCst with the waiter's fence (`balance::Balancer::acquire`):
        // either it sees this slot free, or this sees it waiting.
        self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.backend.slots.wake();
    }
}

/// TLS settings for an https backend: its `tls_ca` when it has one, else
/// the system's root certificates.
fn tls_client_config(ca: Option<&crate::config::TrustedCa>) -> Arc<rustls::ClientConfig> {
    if let Some(ca) = ca {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(ca.certs.iter().cloned());
        return Arc::new(client_config(roots));
    }
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!("loading system root certificates: {e}");
            }
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                tracing::warn!(
                    "no system root certificates found: https backends will fail TLS verification"
                );
            }
            Arc::new(client_config(roots))
        })
        .clone()
}

fn client_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // ALPN is left empty: the connector offers h2/http1.1 itself.
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}
