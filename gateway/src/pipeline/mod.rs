//! The request pipeline. Each stage is a module; a request flows:
//!
//! ```text
//!  accept (listener) -> RequestCtx
//!    |- GET /healthz /readyz ............................ answered here
//!    |- auth     key from Bearer / x-api-key, by digest ... 401
//!    |- GET /v1/models .................................. models this key may use
//!    |- GET /v1/models/{id} ............................. one of them
//!    |- POST completions, responses, pooling (`Endpoint`) . 404 / 405
//!    |- request  body within max_body_bytes ............. 413
//!    |           model/stream picked out of the JSON .... 400
//!    |- route    model or alias, key's model globs ...... 404 / 403
//!    |- balance  weighted least connections ............. 503 + Retry-After
//!    |- proxy    upstream request, first-byte timeout ... 502 / 504
//!    '- stream   frames forwarded as they arrive; usage read (and the
//!                usage chunk removed if only the gateway asked for it);
//!                metrics + access log when the body ends or the client leaves
//! ```
//!
//! Every error becomes a response in `ProxyError::response`.

pub mod abuse;
pub mod auth;
pub mod balance;
pub mod ctx;
pub mod form;
pub mod limits;
pub mod proxy;
pub mod request;
pub mod retry;
pub mod routes;
pub mod stream;
pub mod usage;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Full};

use self::{
    ctx::{RequestCtx, RequestId},
    routes::Routes,
    stream::{BoxError, Finish, ProxyBody},
};
use crate::{error::ProxyError, metrics::Metrics};

/// What every connection shares: the current routing table and metrics.
pub struct Shared {
    pub routes: ArcSwap<Routes>,
    pub metrics: Arc<Metrics>,
    /// Whether clients connect over TLS (for X-Forwarded-Proto).
    pub tls: bool,
    /// What /readyz reports besides "serving"; e.g. a degraded kernel path.
    pub ready: ArcSwap<Readiness>,
    /// Open connections per client address, across workers.
    pub per_ip: Arc<crate::listener::limit::PerIp>,
    /// Abuse counters feeding kernel bans.
    pub abuse: abuse::Tracker,
    /// What a client connection may cost; read at accept, so a reload
    /// applies to the connections accepted after it.
    pub conn_limits: ArcSwap<crate::listener::ConnLimits>,
    /// Blocklist, bans and connection rate enforced at accept when there
    /// is no XDP program to do it.
    pub guard: crate::listener::guard::Guard,
    /// The sk_reuseport worker balancer, when it could be loaded.
    pub balancer: std::sync::OnceLock<crate::listener::balancer::Balancer>,
    /// Where accepted sources are recorded for the XDP program, when it runs.
    pub trust: std::sync::OnceLock<crate::kernel::trust::Trust>,
    /// The TLS certificate new connections are served with, when the
    /// listeners terminate TLS; a reload swaps in a renewed one.
    pub tls_certs: std::sync::OnceLock<ArcSwap<tokio_rustls::TlsAcceptor>>,
    /// Set when a stopping gateway's drain runs out: open SSE streams then
    /// end with an error event at their next piece instead of being cut
    /// mid-air.
    pub cut_streams: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// The state for a config; bans the abuse tracker decides go to `bans`.
    pub fn new(
        cfg: &crate::config::Config,
        bans: tokio::sync::mpsc::UnboundedSender<abuse::Ban>,
    ) -> Shared {
        Shared {
            routes: ArcSwap::from_pointee(Routes::new(cfg)),
            metrics: Arc::new(Metrics::new()),
            tls: cfg.server.tls.is_some(),
            ready: ArcSwap::from_pointee(Readiness::default()),
            per_ip: crate::listener::limit::PerIp::new(
                cfg.server.max_connections_per_ip,
                cfg.server.max_connections,
                cfg.xdp.ipv6_prefix,
            ),
            abuse: abuse::Tracker::new(cfg, bans),
            conn_limits: ArcSwap::from_pointee(crate::listener::ConnLimits::new(&cfg.server)),
            guard: Default::default(),
            balancer: std::sync::OnceLock::new(),
            trust: std::sync::OnceLock::new(),
            tls_certs: std::sync::OnceLock::new(),
            cut_streams: Default::default(),
        }
    }
}

/// The state /readyz reports.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    /// Why the gateway is degraded, if it is (it still serves).
    pub degraded: Option<String>,
}

pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

pub(crate) fn full(b: Bytes) -> ResponseBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn json_response(
    status: StatusCode,
    body: Vec<u8>,
    request_id: &RequestId,
) -> Response<ResponseBody> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(proxy::X_REQUEST_ID, request_id.header());
    r
}

/// The client's request id if it is sane, else a new one: a random
/// per-process prefix and a counter, unique without a syscall per request.
pub(crate) fn request_id(headers: &http::HeaderMap) -> RequestId {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    };
    if let Some(v) = crate::http1::find(headers, &proxy::X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        {
            // A share of the head's bytes, not a copy.
            return RequestId::new(v.clone());
        }
    }
    // The prefix's 16 hex digits are written once; each id writes only
    // its counter's.
    static PREFIX: OnceLock<[u8; 16]> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        if getrandom::fill(&mut b).is_err() {
            // No entropy source: time still separates restarts.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            b.copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        }
        hex16(u64::from_le_bytes(b))
    });
    // 32 lowercase hex digits, written without the `fmt` machinery.
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(prefix);
    id[16..].copy_from_slice(&hex16(NEXT.fetch_add(1, Ordering::Relaxed)));
    // One block, counted by reference: the response header and the log
    // share it.
    let bytes = Bytes::from_owner(id);
    // SAFETY: hex digits only, valid in a header value.
    RequestId::new(unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) })
}

/// `n` as 16 lowercase hex digits, a byte (two digits) at a time.
fn hex16(n: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (pair, b) in out.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair[0] = crate::http1::HEX_DIGITS[usize::from(b >> 4)];
        pair[1] = crate::http1::HEX_DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// Response headers a browser's script may read.
const CORS_EXPOSED: &str = "x-request-id, retry-after, x-ratelimit-limit-requests, \
x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, \
x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, x-gateway-group, x-gateway-fallback";

/// A browser's CORS preflight from an allowed origin: answered before any
/// key is asked for (a preflight carries none), for every path.
fn preflight<B>(req: &Request<B>, allowed: HeaderValue) -> Response<ResponseBody> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    // Whatever headers the script sends (the SDKs add their own): keys
    // are checked on the request itself.
    if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

/// Serves one request, whichever connection (the own HTTP/1.1 one, or
/// hyper's HTTP/2) its body comes from. (One async fn: a second one around
/// it would copy this one's large future into its own.)
pub async fn handle<B>(
    shared: Arc<Shared>,
    req: Request<B>,
    client: SocketAddr,
) -> Response<ResponseBody>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let routes = shared.routes.load_full();
    // Only with `server.cors_origins`, and only browsers send `Origin`.
    let cors = if routes.cors.enabled() {
        req.headers()
            .get(header::ORIGIN)
            .and_then(|o| routes.cors.allow(o))
    } else {
        None
    };
    if let Some(allowed) = &cors {
        if req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return preflight(&req, allowed.clone());
        }
    }
    let rid = request_id(req.headers());
    let target = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match (req.method(), target.path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            return json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec(), &rid)
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            let r = shared.ready.load();
            let body = serde_json::json!({ "status": "ready", "degraded": r.degraded });
            return json_response(StatusCode::OK, body.to_string().into_bytes(), &rid);
        }
        _ => {}
    }
    let mut pending = Unanswered {
        ctx: Some(RequestCtx::new(rid, client, req.method().clone(), target)),
        shared: &shared,
    };
    let served = match screen(&req) {
        Ok(()) => serve(&shared, &routes, req, pending.ctx()).await,
        Err(e) => Err(e),
    };
    let mut ctx = pending.answered();
    let mut r = match served {
        Ok(Served::Done(resp)) => {
            ctx.status = resp.status().as_u16();
            ctx.finish(&shared.metrics);
            resp
        }
        Ok(Served::Proxied { head, body }) => Response::from_parts(head, body.body(ctx)),
        Err(e) => {
            let (status, ..) = e.class();
            ctx.status = status.as_u16();
            ctx.outcome = Some(match &e {
                ProxyError::UpstreamConnect(_)
                | ProxyError::UpstreamBadResponse(_)
                | ProxyError::UpstreamTimeout(_)
                | ProxyError::ConnectTimeout(_)
                | ProxyError::AnswerTimeout(_) => "upstream_error",
                _ => "rejected",
            });
            if let Some(cause) = ban_cause(&e) {
                shared.abuse.record(client.ip(), cause);
            }
            if let Some(d) = e.detail() {
                tracing::warn!(request_id = %ctx.request_id, "{e}: {d}");
            }
            ctx.finish(&shared.metrics);
            let (parts, body) = e.response().into_parts();
            let mut r = Response::from_parts(parts, full(body));
            r.headers_mut()
                .insert(proxy::X_REQUEST_ID, ctx.request_id.header());
            r
        }
    };
    if let Some(allowed) = cors {
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        h.append(header::VARY, HeaderValue::from_static("origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSED),
        );
    }
    r
}

/// The POST endpoints routed by the body's `model`, by what the gateway
/// does around them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    /// Chat and text completions: tokens generated; a stream's usage comes
    /// when `stream_options.include_usage` asks for it.
    Completions,
    /// The Responses API (vLLM serves it): tokens generated; usage as
    /// `input_tokens`/`output_tokens`, in a stream's `response.completed`.
    Responses,
    /// Embeddings, scoring, reranking, classification, tokenizing: no
    /// tokens generated (vLLM's pooling and tokenizer endpoints).
    Pooling,
    /// Speech to text (vLLM serves Whisper-class models): a
    /// `multipart/form-data` body with the audio file and a `model` field.
    Audio,
}

impl Endpoint {
    fn of(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/v1/chat/completions" | "/v1/completions" => Endpoint::Completions,
            "/v1/responses" => Endpoint::Responses,
            "/v1/embeddings" | "/v1/rerank" | "/v2/rerank" | "/rerank" | "/v1/score" | "/score"
            | "/pooling" | "/classify" | "/tokenize" | "/detokenize" => Endpoint::Pooling,
            "/v1/audio/transcriptions" | "/v1/audio/translations" => Endpoint::Audio,
            _ => return None,
        })
    }
}

/// Largest upstream error answer read to put it in OpenAI's shape; a
/// larger one is answered with the status alone.
const MAX_UPSTREAM_ERROR_BODY: usize = 64 * 1024;

/// A model as `/v1/models` lists it.
fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({ "id": id, "object": "model", "created": 0, "owned_by": "gateway" })
}

/// What a refusal counts towards in `[abuse]`. A wrong key counts; no key
/// at all does not (a browser's preflight, a probe, a health check behind
/// a shared address). A key's request and token rates count; its
/// `max_concurrent` does not: a batch job that runs more requests at once
/// than its key allows is told to retry, and must not get its address
/// (and every key behind that NAT) banned in the kernel for it.
fn ban_cause(e: &ProxyError) -> Option<abuse::Cause> {
    match e {
        ProxyError::Unauthorized => Some(abuse::Cause::AuthFailures),
        ProxyError::RateLimited { kind, .. } if *kind != limits::Kind::Concurrency => {
            Some(abuse::Cause::RateLimited)
        }
        _ => None,
    }
}

/// A request's context until it is answered. A client that leaves before
/// that (its SDK timed out while the request waited for a backend, or for
/// the response head) drops the handler with it; the request is then
/// still logged and counted, as 499 `client_closed` (nginx's code).
struct Unanswered<'a> {
    ctx: Option<RequestCtx>,
    shared: &'a Shared,
}

impl Unanswered<'_> {
    fn ctx(&mut self) -> &mut RequestCtx {
        self.ctx.as_mut().expect("not answered yet")
    }

    fn answered(mut self) -> RequestCtx {
        self.ctx.take().expect("answered once")
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(mut ctx) = self.ctx.take() {
            ctx.status = 499;
            ctx.outcome = Some("client_closed");
            ctx.finish(&self.shared.metrics);
        }
    }
}

/// Longest request URI accepted (414 beyond).
pub const MAX_URI_BYTES: usize = 4096;

/// Refuses requests whose form alone is hostile: an overlong URI. (Body
/// framing is the connection's, `listener::h1`: differing Content-Length
/// values or a non-chunked Transfer-Encoding get 400, and a request with
/// both Content-Length and Transfer-Encoding is decoded as chunked and its
/// connection closed after the answer, RFC 9112 section 6.1; upstream
/// always gets the gateway's own Content-Length.)
fn screen<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return Err(ProxyError::UriTooLong(MAX_URI_BYTES));
    }
    Ok(())
}

// Made once per request and taken apart where it is made: boxing the
// proxied answer would be the allocation `Answer` saves.
#[allow(clippy::large_enum_variant)]
enum Served {
    /// Answered by the gateway itself.
    Done(Response<ResponseBody>),
    /// Proxied: the body takes the context and finishes it.
    Proxied {
        head: http::response::Parts,
        body: Answer,
    },
}

/// A proxied answer's body before it has the request's context: what
/// `ProxyBody` is made of, once the context is handed over.
struct Answer {
    shared: Arc<Shared>,
    upstream: crate::upstream::Incoming,
    lease: crate::upstream::Lease,
    sse: bool,
    strip_usage: bool,
    /// When the upstream's head arrived.
    arrived: Instant,
    timeouts: crate::config::Timeouts,
    /// The request's own deadline (`timeouts.total` from its start).
    deadline: Instant,
}

impl Answer {
    fn body(self, mut ctx: RequestCtx) -> ResponseBody {
        let now = Instant::now();
        ctx.overhead += now - self.arrived;
        let first_data_by = ctx.attempt_sent.unwrap_or(self.arrived) + self.timeouts.first_byte;
        let finish = Finish::new(ctx, self.shared, Some(self.lease));
        ProxyBody::new(
            self.upstream,
            self.sse,
            self.strip_usage,
            now,
            self.timeouts.idle,
            first_data_by,
            self.deadline,
            finish,
        )
        .boxed_unsync()
    }
}

async fn serve<B>(
    shared: &Arc<Shared>,
    routes: &Routes,
    req: Request<B>,
    ctx: &mut RequestCtx,
) -> Result<Served, ProxyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let key = auth::authenticate(req.headers(), &routes.keys)?;
    ctx.key = Some(Arc::clone(&key.name));
    let path = ctx.target.path();
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/v1/models") => {
            let data: Vec<serde_json::Value> = routes
                .visible_models(key)
                .into_iter()
                .map(model_object)
                .collect();
            let body = serde_json::json!({ "object": "list", "data": data });
            return Ok(Served::Done(json_response(
                StatusCode::OK,
                body.to_string().into_bytes(),
                &ctx.request_id,
            )));
        }
        // `client.models.retrieve(id)`: ids may hold slashes
        // (`meta-llama/Llama-3-70B`), which the SDKs send as they are. A
        // model the key may not use does not exist for it.
        (&Method::GET | &Method::HEAD, p) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            let Some(id) = routes.visible_models(key).into_iter().find(|m| *m == id) else {
                return Err(ProxyError::UnknownModel(id.to_owned()));
            };
            return Ok(Served::Done(json_response(
                StatusCode::OK,
                model_object(id).to_string().into_bytes(),
                &ctx.request_id,
            )));
        }
        (&Method::POST, p) if Endpoint::of(p).is_some() => {}
        (_, p) if p == "/v1/models" || Endpoint::of(p).is_some() => {
            return Err(ProxyError::MethodNotAllowed(path.to_owned()))
        }
        _ => return Err(ProxyError::NotFound(path.to_owned())),
    }
    let endpoint = Endpoint::of(path).expect("matched above");

    // The key's limits come before the body is read (DESIGN: auth, key
    // limits, then the model): a request that fails later has still spent
    // its share of requests_per_minute and holds a max_concurrent slot.
    admit_request(shared, key, ctx)?;

    let (parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // The length the body itself will run to: the declared one, which the
    // HTTP/1.1 reader and hyper's both checked and framed it by (no second
    // lookup and parse of the header).
    let content_length = http_body::Body::size_hint(&body).exact();
    let body = request::read_body(
        body,
        content_length,
        routes.max_body_bytes,
        routes.body_read_timeout,
    )
    .await?;
    let form = match endpoint {
        Endpoint::Audio => {
            let ct = parts.headers.get(header::CONTENT_TYPE);
            Some(form::inspect(&body, ct.map(HeaderValue::as_bytes))?)
        }
        _ => None,
    };
    let json;
    let info = match &form {
        Some(f) => &f.info,
        None => {
            json = request::inspect(&body)?;
            &json
        }
    };
    ctx.stream = info.stream;

    let model = routes
        .model(&info.model)
        .ok_or_else(|| ProxyError::UnknownModel(info.model.clone()))?;
    if !key.allows(model, &info.model) {
        return Err(ProxyError::ModelNotAllowed(info.model.clone()));
    }
    ctx.model = Some(model.name.clone());

    let completes = endpoint != Endpoint::Pooling;
    let rate_headers = admit_tokens(shared, key, &body, info, completes, ctx)?;

    // Ask upstream for stream usage when the client did not; remove it
    // again. (A Responses API stream always ends with its usage.)
    let strip_usage =
        endpoint == Endpoint::Completions && info.stream && info.include_usage != Some(true);
    // The backend knows the model by `upstream_model`, else by its name:
    // an alias the client used is the gateway's, not the backend's.
    let body_for = |m: &routes::Model, body: Bytes| -> Result<Bytes, ProxyError> {
        let upstream_name = m.upstream_model.as_deref().unwrap_or(&m.name);
        Ok(match &form {
            Some(f) => form::upstream_body(body, f, Some(upstream_name)),
            None => request::upstream_body(body, info, Some(upstream_name), strip_usage)?,
        })
    };
    // The client's body is kept for a fallback model only (a second
    // reference to it may cost an allocation).
    let spare = (!model.fallbacks.is_empty()).then(|| body.clone());
    let mut upstream_body = body_for(model, body)?;
    let asked = model;
    let mut model = model;
    // Where the next fallback is looked for in `asked.fallbacks`.
    let mut next_fallback = 0;
    // The first model's own failure, answered if every fallback fails too:
    // the client asked for that model.
    let mut first_error: Option<ProxyError> = None;
    let (resp, lease) = loop {
        // Panic mode (sending to backends health took out) is the last
        // resort: only for the last model there is to try.
        let last = fallback(routes, key, &asked.fallbacks, &mut next_fallback.clone()).is_none();
        let hash = if model.needs_hash() {
            request_hash(&model.hash_on, key, &parts.headers, ctx.client)
        } else {
            0
        };
        let (group, explicit) = model.choose_group(&parts.headers, hash);
        let pick = Pick {
            group,
            explicit,
            hash,
        };
        let sent = send_with_retries(
            shared,
            model,
            pick,
            path_and_query,
            &parts.headers,
            upstream_body,
            ctx,
            last,
        )
        .await;
        if !falls_back(&sent) {
            break sent?;
        }
        let Some(next) = fallback(routes, key, &asked.fallbacks, &mut next_fallback) else {
            match (sent, first_error) {
                // Every model refused: the asked-for model's refusal.
                (Err(_), Some(first)) => {
                    ctx.model = Some(asked.name.clone());
                    return Err(first);
                }
                (sent, _) => break sent?,
            }
        };
        match sent {
            Err(e) if first_error.is_none() && Arc::ptr_eq(model, asked) => first_error = Some(e),
            other => drop(other),
        }
        ctx.backend = None;
        ctx.attempt_sent = None;
        shared
            .metrics
            .fallbacks
            .with_label_values(&[&asked.name, &next.name])
            .inc();
        tracing::debug!(request_id = %ctx.request_id, model = %model.name, fallback = %next.name, "sending to a fallback model");
        model = next;
        ctx.model = Some(model.name.clone());
        ctx.group = None;
        let body = spare.clone().expect("kept when there are fallbacks");
        upstream_body = body_for(model, body)?;
    };
    let arrived = Instant::now();
    let (mut head, upstream) = resp.into_parts();
    let sse = is_event_stream(&head.headers);
    if !sse && !head.status.is_server_error() {
        // A stream's head comes before the backend has scheduled it: its
        // latency sample waits for the first token (`stream::ProxyBody`).
        // A 5xx was counted as a failure already.
        if let Some(sent) = ctx.attempt_sent {
            lease.backend().observed.success(arrived - sent);
        }
    }
    let edited = sse && strip_usage;
    proxy::client_headers(&mut head.headers, &ctx.request_id, edited);
    for (n, v) in rate_headers.0 {
        head.headers.insert(n, v);
    }
    if let Some(g) = &ctx.group {
        if let Ok(v) = HeaderValue::from_str(g) {
            head.headers.insert(GROUP_HEADER, v);
        }
    }
    if !Arc::ptr_eq(model, asked) {
        if let Ok(v) = HeaderValue::from_str(&model.name) {
            head.headers.insert(FALLBACK_HEADER, v);
        }
    }
    head.version = http::Version::HTTP_11;
    ctx.status = head.status.as_u16();
    if !head.status.is_success() && !sse {
        // An error answer (after the retries): read whole, bounded, and put
        // in OpenAI's shape when the backend used its own, so a client's
        // SDK reads every error the same way.
        let read = tokio::time::timeout(
            model.timeouts.idle,
            http_body_util::Limited::new(upstream, MAX_UPSTREAM_ERROR_BODY).collect(),
        )
        .await;
        drop(lease);
        let got = match read {
            Ok(Ok(c)) => c.to_bytes(),
            _ => Bytes::new(),
        };
        let body = crate::error::openai_error(head.status, &got).unwrap_or(got);
        for h in [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONTENT_ENCODING,
        ] {
            head.headers.remove(h);
        }
        head.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        ctx.bytes_out = body.len() as u64;
        return Ok(Served::Done(Response::from_parts(head, full(body))));
    }
    let body = Answer {
        shared: Arc::clone(shared),
        upstream,
        lease,
        sse,
        strip_usage,
        arrived,
        timeouts: model.timeouts.clone(),
        deadline: ctx.start + model.timeouts.total,
    };
    Ok(Served::Proxied { head, body })
}

/// The next of `names` from `*from` on that names a model the key may use
/// (by its name or any alias); `*from` moves past it.
fn fallback<'r>(
    routes: &'r Routes,
    key: &routes::Key,
    names: &[String],
    from: &mut usize,
) -> Option<&'r Arc<routes::Model>> {
    while let Some(name) = names.get(*from) {
        *from += 1;
        if let Some(m) = routes.model(name) {
            if std::iter::once(&*m.name)
                .chain(m.aliases.iter().map(String::as_str))
                .any(|n| key.allows(m, n))
            {
                return Some(m);
            }
        }
    }
    None
}

/// Whether a model's answer sends the request on to its next fallback: it
/// could not take the request (no backend in rotation, all full), or every
/// backend it tried refused it before generating (a connect error or
/// connect timeout, 429, 502, 503). Not a timeout once the request was
/// sent: the backend may still be generating.
fn falls_back(
    sent: &Result<(Response<crate::upstream::Incoming>, crate::upstream::Lease), ProxyError>,
) -> bool {
    match sent {
        Ok((resp, _)) => matches!(resp.status().as_u16(), 429 | 502 | 503),
        Err(e) => matches!(
            e,
            ProxyError::NoBackend(_)
                | ProxyError::Overloaded { .. }
                | ProxyError::UpstreamConnect(_)
                | ProxyError::ConnectTimeout(_)
        ),
    }
}

/// The first phase of the key's limits: a slot in flight and one of the
/// minute's requests ([`limits::KeyState::admit_request`]).
fn admit_request(
    shared: &Shared,
    key: &routes::Key,
    ctx: &mut RequestCtx,
) -> Result<(), ProxyError> {
    if !key.limits.any() {
        return Ok(());
    }
    let permit = key
        .state
        .admit_request(&key.limits)
        .map_err(|r| refused(shared, key, r))?;
    ctx.permit = Some(permit);
    Ok(())
}

/// The second phase: the body's estimated tokens
/// ([`limits::KeyState::admit_tokens`]), and the `x-ratelimit-*` headers.
fn admit_tokens(
    shared: &Shared,
    key: &routes::Key,
    body: &[u8],
    info: &request::RequestInfo,
    completes: bool,
    ctx: &mut RequestCtx,
) -> Result<limits::RateHeaders, ProxyError> {
    let Some(permit) = ctx.permit.as_mut() else {
        return Ok(limits::RateHeaders::default());
    };
    let estimate = limits::estimate(body.len(), info.media, info.max_tokens, completes);
    key.state
        .admit_tokens(permit, &key.limits, estimate)
        .map_err(|r| refused(shared, key, r))
}

/// A key's limit refused the request: counted, and answered with 429.
fn refused(shared: &Shared, key: &routes::Key, r: limits::Refusal) -> ProxyError {
    shared
        .metrics
        .rate_limited
        .with_label_values(&[&key.name, r.kind.name()])
        .inc();
    ProxyError::RateLimited {
        kind: r.kind,
        retry_after: r.retry_after,
        headers: r.headers,
    }
}

/// Whether a response is a stream of server-sent events.
fn is_event_stream(h: &http::HeaderMap) -> bool {
    crate::http1::find(h, &header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Response header naming the traffic group that served a request.
pub const GROUP_HEADER: &str = "x-gateway-group";

/// Names the model that served a request its own model sent on to a
/// fallback.
pub const FALLBACK_HEADER: &str = "x-gateway-fallback";

/// Where a request may go: its traffic group, whether the client chose it
/// (no fallback to another group then), and its attribute hash.
#[derive(Clone, Copy)]
struct Pick {
    group: usize,
    explicit: bool,
    hash: u64,
}

/// The hash of the request attribute the model balances or splits on.
fn request_hash(
    on: &crate::config::HashOn,
    key: &routes::Key,
    headers: &http::HeaderMap,
    client: SocketAddr,
) -> u64 {
    use crate::config::HashOn;
    let ip;
    let input: &[u8] = match on {
        HashOn::Key => key.name.as_bytes(),
        HashOn::ClientIp => {
            ip = match client.ip() {
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(a) => a.octets(),
            };
            &ip
        }
        HashOn::Header(h) => headers.get(h).map_or(key.name.as_bytes(), |v| v.as_bytes()),
    };
    balance::hash_parts(&[input])
}

/// Leases a backend in the request's group; when that group has none in
/// rotation and the client did not name it, in another group.
async fn acquire(
    model: &routes::Model,
    pick: &mut Pick,
    tried: &balance::Tried,
    deadline: Instant,
    allow_panic: bool,
) -> Result<(usize, crate::upstream::Lease), ProxyError> {
    let g = &model.groups[pick.group];
    // Panic mode inside the queue only where it would come next anyway:
    // no other traffic group to try first.
    let panic_in_queue = allow_panic && (pick.explicit || model.groups.len() == 1);
    let first = g
        .balancer
        .acquire(
            &model.name,
            &g.backends,
            tried,
            pick.hash,
            &model.queue,
            deadline,
            panic_in_queue,
        )
        .await;
    let Err(ProxyError::NoBackend(_)) = first else {
        return first;
    };
    // No backend of the group is in rotation: another group's, for a
    // split request (not one that named its group)...
    if !pick.explicit && model.groups.len() > 1 {
        for (i, other) in model.groups.iter().enumerate() {
            if i == pick.group {
                continue;
            }
            if let Ok(p) = other.balancer.pick(&other.backends, &[], pick.hash) {
                pick.group = i;
                return Ok(p);
            }
        }
    }
    // ...else panic mode: the group's backends that health took out (not
    // while a fallback model remains to be tried).
    if !allow_panic {
        return first;
    }
    match g.balancer.pick_in_panic(&g.backends, tried, pick.hash) {
        Ok(p) => Ok(p),
        Err(balance::NoPick::Full) => Err(ProxyError::Overloaded {
            model: model.name.to_string(),
            retry_after_secs: routes::OVERLOADED_RETRY_AFTER.as_secs() as u32,
        }),
        Err(balance::NoPick::NoneHealthy) => first,
    }
}

/// Sends the request to a backend, and again to another one of its group
/// (up to the model's `retries`, within its retry budget and total
/// timeout) when the attempt failed before any response byte: connect
/// errors, resets, first-byte timeouts, garbage, and 502/503/429 answers.
/// The last attempt's outcome is what the client gets.
#[allow(clippy::too_many_arguments)]
async fn send_with_retries(
    shared: &Shared,
    model: &routes::Model,
    mut pick: Pick,
    path_and_query: &str,
    headers: &http::HeaderMap,
    body: Bytes,
    ctx: &mut RequestCtx,
    allow_panic: bool,
) -> Result<(Response<crate::upstream::Incoming>, crate::upstream::Lease), ProxyError> {
    let deadline = ctx.start + model.timeouts.total;
    model.retry_budget.deposit();
    let mut tried = balance::Tried::new();
    let (mut index, mut lease) = acquire(model, &mut pick, &tried, deadline, allow_panic).await?;
    // This model's attempts (`ctx.attempts` counts a fallback's too).
    let mut attempts = 0;
    let group = &model.groups[pick.group];
    if model.groups.len() > 1 {
        ctx.group = Some(Arc::clone(&group.name));
    }
    loop {
        tried.push(index);
        ctx.attempts += 1;
        attempts += 1;
        let backend = Arc::clone(lease.backend());
        backend.count_request(&shared.metrics, &model.name);
        ctx.backend = Some(Arc::clone(&backend.label));
        let result = proxy::send(
            &backend,
            path_and_query,
            headers,
            body.clone(),
            ctx,
            shared.tls,
            model.timeouts.first_byte,
            deadline,
        )
        .await;
        let retryable = match &result {
            Ok(r) => {
                let status = r.status();
                let ok = !status.is_server_error();
                lease.report(ok);
                // A usable answer's latency is sampled where its kind is
                // known: at the head of a JSON answer (`serve`), at the
                // first token of a stream (`stream::ProxyBody`).
                if !ok {
                    backend.observed.failure();
                }
                matches!(status.as_u16(), 429 | 502 | 503)
            }
            Err(e) => {
                lease.report(false);
                backend.observed.failure();
                let kind = match e {
                    ProxyError::UpstreamTimeout(_)
                    | ProxyError::ConnectTimeout(_)
                    | ProxyError::AnswerTimeout(_) => "timeout",
                    ProxyError::UpstreamConnect(_) => "connect",
                    _ => "bad_response",
                };
                shared
                    .metrics
                    .upstream_errors
                    .with_label_values(&[&*model.name, &backend.label, kind])
                    .inc();
                // A non-stream answer's head comes after its whole
                // generation: one that ran out of `first_byte` may still
                // be generating. Sending it to the next backend would
                // double the work exactly when backends are slow (a retry
                // storm), so only a stream's (whose head comes before it
                // is scheduled) is tried again.
                !matches!(e, ProxyError::AnswerTimeout(_)) || ctx.stream
            }
        };
        if !retryable || attempts > model.retries || Instant::now() >= deadline {
            return result.map(|r| (r, lease));
        }
        // Another backend, at once (no queueing for a retry), or none.
        let Ok(next) = group.balancer.pick(&group.backends, &tried, pick.hash) else {
            return result.map(|r| (r, lease));
        };
        if !model.retry_budget.withdraw() {
            shared
                .metrics
                .retries
                .with_label_values(&[&model.name, "budget_exhausted"])
                .inc();
            return result.map(|r| (r, lease));
        }
        shared
            .metrics
            .retries
            .with_label_values(&[&model.name, "retried"])
            .inc();
        match &result {
            Ok(r) => {
                tracing::debug!(request_id = %ctx.request_id, backend = %backend.label, status = r.status().as_u16(), "retrying on another backend")
            }
            Err(e) => {
                tracing::debug!(request_id = %ctx.request_id, backend = %backend.label, "retrying on another backend: {e}: {}", e.detail().unwrap_or(""))
            }
        }
        (index, lease) = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_count_towards_a_ban() {
        let limited = |kind| ProxyError::RateLimited {
            kind,
            retry_after: std::time::Duration::from_secs(1),
            headers: limits::RateHeaders::default(),
        };
        assert_eq!(
            ban_cause(&ProxyError::Unauthorized),
            Some(abuse::Cause::AuthFailures)
        );
        assert_eq!(ban_cause(&ProxyError::MissingKey), None);
        for kind in [limits::Kind::Requests, limits::Kind::Tokens] {
            assert_eq!(
                ban_cause(&limited(kind)),
                Some(abuse::Cause::RateLimited),
                "{kind:?}"
            );
        }
        assert_eq!(ban_cause(&limited(limits::Kind::Concurrency)), None);
        assert_eq!(ban_cause(&ProxyError::MissingModel), None);
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_unique() {
        let empty = http::HeaderMap::new();
        let (a, b) = (request_id(&empty), request_id(&empty));
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{id}"
            );
        }
        assert_ne!(a, b);
        for n in [0, 9, 0xa, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(hex16(n), format!("{n:016x}").as_bytes());
        }
        assert_eq!(a[..16], b[..16], "one per-process prefix");
        // A counter after it (other tests take ids in between).
        assert!(
            u64::from_str_radix(&b[16..], 16).unwrap() > u64::from_str_radix(&a[16..], 16).unwrap()
        );
        // A sane client id is kept; a hostile one is replaced.
        let mut h = http::HeaderMap::new();
        h.insert(
            proxy::X_REQUEST_ID,
            HeaderValue::from_static("req-42.a:b_c"),
        );
        assert_eq!(request_id(&h), "req-42.a:b_c");
        h.insert(proxy::X_REQUEST_ID, HeaderValue::from_static("a b"));
        assert_eq!(request_id(&h).len(), 32);
    }
}
