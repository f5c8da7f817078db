//! One request: routing, reading the JSON body, recording it, applying the
//! per-request parameters (latency, injected failure) and building the
//! response around a `MockBody`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::Value;

use super::body::MockBody;
use super::options::{Failure, Params, UsageMode};
use super::render::{self, Api, Completion};
use super::server::{ConnCtx, Shared};
use super::stats::{is_recorded_header, Outcome, RecordedRequest, Tracker};

const X_MOCK_NAME: HeaderName = HeaderName::from_static("x-mock-name");
const JSON: &str = "application/json";
/// Larger request bodies get a 413: a mock has no use for them.
const MAX_BODY: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Models,
    Chat,
    Text,
    Embeddings,
    /// `/v1/audio/transcriptions` and `/v1/audio/translations`: a form.
    Audio,
    NotFound,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        match (method, path) {
            (&Method::GET, "/health") => Route::Health,
            (&Method::GET, "/v1/models") => Route::Models,
            (&Method::POST, "/v1/chat/completions") => Route::Chat,
            (&Method::POST, "/v1/completions") => Route::Text,
            (&Method::POST, "/v1/embeddings") => Route::Embeddings,
            (&Method::POST, "/v1/audio/transcriptions" | "/v1/audio/translations") => Route::Audio,
            _ => Route::NotFound,
        }
    }

    fn takes_json(self) -> bool {
        matches!(self, Route::Chat | Route::Text | Route::Embeddings)
    }
}

/// The hyper service of every connection.
pub(crate) async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let shared = &ctx.shared;
    if let Some(what) = req.uri().path().strip_prefix("/mock/") {
        return Ok(introspect(shared, req.method(), what));
    }
    let tracker = Tracker::new(shared.stats.clone());
    Ok(serve(&ctx, req, tracker).await)
}

/// `/mock/stats` and `/mock/requests`: not counted, not logged.
fn introspect(shared: &Shared, method: &Method, what: &str) -> Response<MockBody> {
    let json = match (method, what) {
        (&Method::GET, "stats") => serde_json::to_vec(&shared.stats.snapshot()),
        (&Method::GET, "requests") => serde_json::to_vec(&shared.log.all()),
        _ => return error(shared, StatusCode::NOT_FOUND, "no such mock route", None),
    };
    let json = json.expect("stats and requests serialize");
    respond(
        shared,
        StatusCode::OK,
        JSON,
        MockBody::whole(json.into(), None),
    )
}

async fn serve(ctx: &ConnCtx, req: Request<Incoming>, tracker: Tracker) -> Response<MockBody> {
    let shared = &*ctx.shared;
    let (parts, body) = req.into_parts();
    let route = Route::of(&parts.method, parts.uri.path());
    let mut record = record(&parts, tracker.seq());
    if route == Route::Audio {
        return audio(shared, parts, body, record, tracker).await;
    }
    let summary = if route.takes_json() {
        let json = read_json(body).await;
        let summary = json.as_ref().map_err(Clone::clone).and_then(|v| {
            Summary::of(v, &shared.opts.models).map_err(|m| (StatusCode::BAD_REQUEST, m))
        });
        // Moved, not cloned, into the log once what the response needs is out.
        record.body = json.unwrap_or(Value::Null);
        Some(summary)
    } else {
        None
    };
    shared.log.push(record);
    match (route, summary) {
        (Route::Health, _) => match shared.current_fail() {
            None | Some(Failure::MidStreamReset { .. }) => {
                let ok = MockBody::whole(Bytes::from_static(b"ok"), Some(tracker));
                respond(shared, StatusCode::OK, "text/plain", ok)
            }
            // A stalled server stalls its health endpoint too.
            Some(Failure::Stall) => std::future::pending().await,
            Some(_) => error(
                shared,
                StatusCode::SERVICE_UNAVAILABLE,
                "mock-llm: failing",
                Some(tracker),
            ),
        },
        (Route::Models, _) => models(shared, &parts, tracker).await,
        (route, Some(summary)) => api(ctx, route, &parts, summary, tracker).await,
        _ => error(
            shared,
            StatusCode::NOT_FOUND,
            "unknown route",
            Some(tracker),
        ),
    }
}

/// A speech-to-text answer, as vLLM gives it for a Whisper model. The form
/// is recorded as its text (lossy), so a test can see the fields that
/// reached the backend; the answer names the body's size.
async fn audio(
    shared: &Shared,
    parts: Parts,
    body: Incoming,
    mut record: RecordedRequest,
    tracker: Tracker,
) -> Response<MockBody> {
    let multipart = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data; boundary="));
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    record.body = Value::String(String::from_utf8_lossy(&bytes).into_owned());
    shared.log.push(record);
    if !multipart {
        let m = "mock-llm: audio takes multipart/form-data";
        return error(shared, StatusCode::BAD_REQUEST, m, Some(tracker));
    }
    let answer = serde_json::json!({
        "text": format!("mock transcription of {} bytes", bytes.len()),
        "usage": {"type": "tokens", "input_tokens": 20, "output_tokens": 6, "total_tokens": 26},
    });
    let body = MockBody::whole(answer.to_string().into(), Some(tracker));
    respond(shared, StatusCode::OK, JSON, body)
}

async fn models(shared: &Shared, parts: &Parts, tracker: Tracker) -> Response<MockBody> {
    let params = match Params::from_headers(&shared.opts, &parts.headers) {
        Ok(p) => p,
        Err(m) => return error(shared, StatusCode::BAD_REQUEST, &m, Some(tracker)),
    };
    tokio::time::sleep(params.latency).await;
    let body = MockBody::whole(shared.models.clone(), Some(tracker));
    respond(shared, StatusCode::OK, JSON, body)
}

/// The three POST endpoints, failures included.
async fn api(
    ctx: &ConnCtx,
    route: Route,
    parts: &Parts,
    summary: Result<Summary, (StatusCode, String)>,
    mut tracker: Tracker,
) -> Response<MockBody> {
    let shared = &*ctx.shared;
    let mut params = match Params::from_headers(&shared.opts, &parts.headers) {
        Ok(p) => p,
        Err(m) => return error(shared, StatusCode::BAD_REQUEST, &m, Some(tracker)),
    };
    if !parts.headers.contains_key("x-mock-fail") {
        params.fail = shared.current_fail();
    }
    if !parts.headers.contains_key("x-mock-latency-ms") {
        params.latency = shared.current_latency();
    }
    if !parts.headers.contains_key("x-mock-first-token-ms") {
        params.first_token = shared.current_first_token();
    }
    let summary = match summary {
        Ok(s) => s,
        Err((status, m)) => return error(shared, status, &m, Some(tracker)),
    };
    if !params.latency.is_zero() {
        tokio::time::sleep(params.latency).await;
    }
    match params.fail {
        Some(Failure::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let m = format!("mock-llm: injected failure {code}");
            return error(shared, status, &m, Some(tracker));
        }
        Some(Failure::Garbage) => {
            let body = MockBody::whole(Bytes::from_static(b"this is not json"), Some(tracker));
            return respond(shared, StatusCode::OK, JSON, body);
        }
        Some(Failure::Reset) => {
            tracker.finish(Outcome::Aborted);
            ctx.kill.notify_one();
            // The connection task drops this future with the connection.
            return std::future::pending().await;
        }
        // Held with the tracker: the client leaving drops both (cancelled).
        Some(Failure::Stall) => return std::future::pending().await,
        Some(Failure::MidStreamReset { .. }) | None => {}
    }
    let resp = match route {
        Route::Embeddings => embeddings(shared, &summary, params, tracker),
        _ => completion(shared, route, &summary, params, tracker),
    };
    match params.fail {
        Some(Failure::MidStreamReset { after_chunks }) => {
            resp.map(|b| b.abort_after(after_chunks, ctx.kill.clone()))
        }
        _ => resp,
    }
}

fn completion(
    shared: &Shared,
    route: Route,
    s: &Summary,
    params: Params,
    tracker: Tracker,
) -> Response<MockBody> {
    let tokens = s.max_tokens.map_or(params.tokens, |m| m.min(params.tokens));
    let usage = match params.usage {
        UsageMode::Never => false,
        UsageMode::Always => true,
        // A plain response always has usage; a stream only when asked.
        UsageMode::WhenAsked => !s.stream || s.include_usage,
    };
    let c = Completion {
        api: if route == Route::Chat {
            Api::Chat
        } else {
            Api::Text
        },
        seq: tracker.seq(),
        created: unix_now(),
        model_json: &s.model_json,
        prompt_tokens: s.prompt_tokens,
        completion_tokens: tokens,
        finish_reason: if tokens < params.tokens {
            "length"
        } else {
            "stop"
        },
        usage,
    };
    if !s.stream {
        return respond(
            shared,
            StatusCode::OK,
            JSON,
            MockBody::whole(c.render(), Some(tracker)),
        );
    }
    let body = MockBody::sse(c.render_stream(), tokens, params.interval, tracker)
        .first_after(params.first_token);
    let mut resp = respond(shared, StatusCode::OK, "text/event-stream", body);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn embeddings(
    shared: &Shared,
    s: &Summary,
    params: Params,
    tracker: Tracker,
) -> Response<MockBody> {
    let usage = params.usage != UsageMode::Never;
    let buf = render::embeddings(&s.model_json, s.inputs, s.prompt_tokens, usage);
    respond(
        shared,
        StatusCode::OK,
        JSON,
        MockBody::whole(buf, Some(tracker)),
    )
}

/// What the response needs from a request body.
#[derive(Debug)]
struct Summary {
    /// The requested model as a JSON string literal, echoed back verbatim.
    model_json: String,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u32>,
    prompt_tokens: u32,
    /// Embeddings to return.
    inputs: usize,
}

impl Summary {
    fn of(v: &Value, models: &[String]) -> Result<Summary, String> {
        let obj = v
            .as_object()
            .ok_or("the request body must be a JSON object")?;
        // A request without a model gets the first configured one, to keep
        // minimal test requests short.
        let model = obj
            .get("model")
            .and_then(Value::as_str)
            .or(models.first().map(String::as_str))
            .unwrap_or("mock-model");
        let max_tokens = obj
            .get("max_tokens")
            .or_else(|| obj.get("max_completion_tokens"))
            .and_then(Value::as_u64)
            .map(|m| m.min(u32::MAX as u64) as u32);
        let words: usize = ["messages", "prompt", "input"]
            .iter()
            .filter_map(|k| obj.get(*k))
            .map(words)
            .sum();
        Ok(Summary {
            model_json: serde_json::to_string(model).expect("a string serializes"),
            stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: obj
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_tokens,
            prompt_tokens: words.clamp(1, u32::MAX as usize) as u32,
            inputs: embedding_inputs(obj.get("input")),
        })
    }
}

/// The prompt-token estimate: whitespace-separated words of the text parts
/// (message `content`, content-part `text`, prompt and input strings), and
/// one per pre-tokenized integer. Roles and other fields do not count.
fn words(v: &Value) -> usize {
    match v {
        Value::String(s) => s.split_whitespace().count(),
        Value::Number(_) => 1,
        Value::Array(a) => a.iter().map(words).sum(),
        Value::Object(o) => ["content", "text"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(words)
            .sum(),
        _ => 0,
    }
}

/// One embedding per element of an `input` array, except that an array of
/// integers is one pre-tokenized input.
fn embedding_inputs(input: Option<&Value>) -> usize {
    match input {
        Some(Value::Array(a)) if !a.iter().all(Value::is_number) || a.is_empty() => a.len(),
        _ => 1,
    }
}

async fn read_json(body: Incoming) -> Result<Value, (StatusCode, String)> {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let m = format!("request body over {MAX_BODY} bytes");
            return Err((StatusCode::PAYLOAD_TOO_LARGE, m));
        }
        Err(e) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let m = format!("We could not parse the JSON body of your request. ({e})");
        (StatusCode::BAD_REQUEST, m)
    })
}

fn record(parts: &Parts, seq: u64) -> RecordedRequest {
    let mut headers = std::collections::BTreeMap::new();
    for (name, value) in &parts.headers {
        if !is_recorded_header(name.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v: &mut String| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    RecordedRequest {
        seq,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        version: format!("{:?}", parts.version),
        authority: parts.uri.authority().map(|a| a.to_string()),
        headers,
        body: Value::Null,
    }
}

fn respond(
    shared: &Shared,
    status: StatusCode,
    content_type: &'static str,
    body: MockBody,
) -> Response<MockBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(X_MOCK_NAME, shared.name.clone());
    resp
}

fn error(
    shared: &Shared,
    status: StatusCode,
    message: &str,
    tracker: Option<Tracker>,
) -> Response<MockBody> {
    let body = MockBody::whole(render::error(status.as_u16(), message), tracker);
    respond(shared, status, JSON, body)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
