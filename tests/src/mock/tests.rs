//! Tests of the mock through a raw hyper client, over HTTP/1.1 and h2c:
//! what the endpoints answer, that streams are paced and flushed event by
//! event, and that the counters see client disconnects and injected
//! failures.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

const BOTH: [Proto; 2] = [Proto::H1, Proto::H2];

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One client connection to the mock.
struct Client {
    addr: SocketAddr,
    proto: Proto,
    sender: Sender,
    conn: JoinHandle<()>,
}

impl Client {
    async fn connect(addr: SocketAddr, proto: Proto) -> Client {
        let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (sender, conn) = match proto {
            Proto::H1 => {
                let (s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
                (Sender::H1(s), tokio::spawn(async move { drop(c.await) }))
            }
            Proto::H2 => {
                let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
                (Sender::H2(s), tokio::spawn(async move { drop(c.await) }))
            }
        };
        Client {
            addr,
            proto,
            sender,
            conn,
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> hyper::Result<Response<Incoming>> {
        // h2 needs the scheme and authority in the URI; HTTP/1 a Host.
        let uri = match self.proto {
            Proto::H1 => path.to_string(),
            Proto::H2 => format!("http://{}{path}", self.addr),
        };
        let mut req = Request::builder().method(method).uri(uri);
        if self.proto == Proto::H1 {
            req = req.header("host", self.addr.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let req = req.body(Full::new(body)).unwrap();
        // An HTTP/1 connection takes a moment after a response to be ready
        // for the next request.
        match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> Response<Incoming> {
        self.send("POST", path, headers, Some(body)).await.unwrap()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

async fn body_json(resp: Response<Incoming>) -> Value {
    serde_json::from_slice(&body_bytes(resp).await).unwrap()
}

/// Polls `cond` until it holds; fails after a generous deadline.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The SSE events of a body with the time each one was complete.
async fn read_events(resp: Response<Incoming>) -> Vec<(Instant, String)> {
    let mut body = resp.into_body();
    let (mut events, mut pending) = (Vec::new(), String::new());
    while let Some(frame) = body.frame().await {
        let now = Instant::now();
        if let Ok(data) = frame.unwrap().into_data() {
            pending.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = pending.find("\n\n") {
                events.push((now, pending[..end].to_string()));
                pending.drain(..end + 2);
            }
        }
    }
    assert!(pending.is_empty(), "trailing partial event {pending:?}");
    events
}

/// The JSON of each `data:` event but the closing `[DONE]`, which must be last.
fn event_json(events: &[(Instant, String)]) -> Vec<Value> {
    let (last, rest) = events.split_last().expect("no events");
    assert_eq!(last.1, "data: [DONE]");
    rest.iter()
        .map(|(_, e)| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect()
}

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-test",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say three words"},
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_chat_has_content_and_usage() {
    let mock = MockLlm::start(MockOptions {
        name: "up-a".into(),
        tokens: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    for proto in BOTH {
        let mut c = Client::connect(mock.addr(), proto).await;
        let resp = c.post("/v1/chat/completions", &[], chat(false)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-mock-name"], "up-a");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v = body_json(resp).await;
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-test");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "tok1 tok2 tok3 ");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        // "be brief" + "say three words": the roles do not count.
        let usage = json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8});
        assert_eq!(v["usage"], usage);
    }
    eventually("2 completed", || mock.stats().snapshot().completed == 2).await;
    let s = mock.stats().snapshot();
    assert_eq!((s.requests, s.cancelled, s.in_flight), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_chunks_arrive_as_they_are_produced() {
    let opts = MockOptions {
        tokens: 5,
        interval: Duration::from_millis(50),
        ..Default::default()
    };
    let mock = MockLlm::start(opts).await.unwrap();
    for proto in BOTH {
        let mut c = Client::connect(mock.addr(), proto).await;
        let resp = c.post("/v1/chat/completions", &[], chat(true)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let events = read_events(resp).await;
        let chunks = event_json(&events);
        assert_eq!(chunks.len(), 6, "5 tokens and the finish chunk: {chunks:?}");
        // Four 50 ms gaps between five tokens: had the body been buffered,
        // everything would arrive at once.
        let spread = events[4].0 - events[0].0;
        assert!(
            spread >= Duration::from_millis(150),
            "{proto:?}: tokens over {spread:?}"
        );
        let first = &chunks[0]["choices"][0];
        assert_eq!(
            first["delta"],
            json!({"role": "assistant", "content": "tok1 "})
        );
        assert_eq!(first["finish_reason"], Value::Null);
        assert_eq!(
            chunks[4]["choices"][0]["delta"],
            json!({"content": "tok5 "})
        );
        assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["model"], "gpt-test");
            assert_eq!(c["id"], chunks[0]["id"]);
            assert!(c.get("usage").is_none(), "usage not asked for: {c}");
        }
    }
    eventually("2 completed", || mock.stats().snapshot().completed == 2).await;
}

/// The usage chunk of a stream, if there is one: `choices` empty, `usage` set.
async fn stream_usage(
    c: &mut Client,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> Option<Value> {
    let events = read_events(c.post(path, headers, body).await).await;
    let chunks = event_json(&events);
    let last = chunks.last().unwrap();
    last.get("usage").map(|u| {
        assert_eq!(last["choices"], json!([]));
        u.clone()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_chunk_follows_the_usage_mode() {
    let mock = MockLlm::start(MockOptions::default()).await.unwrap();
    let mut c = Client::connect(mock.addr(), Proto::H1).await;
    let mut asked = chat(true);
    asked["stream_options"] = json!({"include_usage": true});
    let chat_path = "/v1/chat/completions";
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21});

    assert_eq!(
        stream_usage(&mut c, chat_path, &[], asked.clone()).await,
        Some(usage.clone())
    );
    assert_eq!(stream_usage(&mut c, chat_path, &[], chat(true)).await, None);
    let always = [("x-mock-usage", "always")];
    assert_eq!(
        stream_usage(&mut c, chat_path, &always, chat(true)).await,
        Some(usage)
    );
    let never = [("x-mock-usage", "never")];
    assert_eq!(stream_usage(&mut c, chat_path, &never, asked).await, None);
    let plain = body_json(c.post(chat_path, &never, chat(false)).await).await;
    assert!(plain.get("usage").is_none(), "{plain}");

    // max_tokens cuts the answer, as OpenAI says: finish_reason "length".
    let text = json!({"model": "m", "prompt": "one two", "stream": true,
        "max_tokens": 2, "stream_options": {"include_usage": true}});
    let events = read_events(c.post("/v1/completions", &[], text).await).await;
    let chunks = event_json(&events);
    assert_eq!(chunks.len(), 4, "{chunks:?}");
    assert_eq!(chunks[1]["choices"][0]["text"], "tok2 ");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    let usage = json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4});
    assert_eq!(chunks[3]["usage"], usage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_endpoints_answer_like_openai() {
    let mock = MockLlm::start(MockOptions {
        models: vec!["a".into(), "b".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = Client::connect(mock.addr(), Proto::H2).await;

    let text = json!({"model": "m", "prompt": "hi there", "max_tokens": 1});
    let v = body_json(c.post("/v1/completions", &[], text).await).await;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok1 ");
    assert_eq!(v["usage"]["total_tokens"], 3);

    let emb = json!({"model": "e", "input": ["one", "two words"]});
    let v = body_json(c.post("/v1/embeddings", &[], emb).await).await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(v["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));

    let v = body_json(c.send("GET", "/v1/models", &[], None).await.unwrap()).await;
    let ids: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("a"), json!("b")]);
    assert_eq!(v["data"][0]["owned_by"], "mock");

    let health = c.send("GET", "/health", &[], None).await.unwrap();
    assert_eq!(body_bytes(health).await, "ok");

    let resp = c.send("GET", "/v1/nope", &[], None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        body_json(resp).await["error"]["type"],
        "invalid_request_error"
    );

    let bad = c
        .send("POST", "/v1/chat/completions", &[], None)
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad = body_json(bad).await;
    assert_eq!(bad["error"]["param"], Value::Null);
    assert!(bad["error"]["message"]
        .as_str()
        .unwrap()
        .contains("parse the JSON"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_status_and_garbage() {
    let mock = MockLlm::start(MockOptions::default()).await.unwrap();
    for proto in BOTH {
        let mut c = Client::connect(mock.addr(), proto).await;
        for code in [500u16, 503, 429] {
            let code_s = code.to_string();
            let fail = [("x-mock-fail", code_s.as_str())];
            let resp = c.post("/v1/chat/completions", &fail, chat(true)).await;
            assert_eq!(resp.status().as_u16(), code);
            assert_eq!(resp.headers()["x-mock-name"], "mock");
            let v = body_json(resp).await;
            assert!(v["error"]["message"].as_str().unwrap().contains(&code_s));
        }
        let garbage = [("x-mock-fail", "garbage")];
        let resp = c
            .post("/v1/embeddings", &garbage, json!({"input": "x"}))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_bytes(resp).await, "this is not json");
        let typo = [("x-mock-fail", "sometimes")];
        let resp = c.post("/v1/chat/completions", &typo, chat(false)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
    // A server-wide failure, and a request opting out of it.
    let failing = MockLlm::start(MockOptions {
        fail: Some(Failure::Status(502)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = Client::connect(failing.addr(), Proto::H1).await;
    let resp = c.post("/v1/completions", &[], json!({"prompt": "x"})).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let resp = c
        .post(
            "/v1/completions",
            &[("x-mock-fail", "none")],
            json!({"prompt": "x"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_closes_the_connection_without_a_response() {
    let mock = MockLlm::start(MockOptions::default()).await.unwrap();
    for proto in BOTH {
        let mut c = Client::connect(mock.addr(), proto).await;
        let reset = [("x-mock-fail", "reset")];
        let err = c
            .send("POST", "/v1/chat/completions", &reset, Some(chat(false)))
            .await;
        assert!(err.is_err(), "{proto:?}: got a response: {err:?}");
        // The connection is gone: the next request on it fails too.
        let next = c.send("GET", "/health", &[], None).await;
        assert!(next.is_err(), "{proto:?}: connection survived the reset");
    }
    // A RST, not a FIN: a raw read sees the connection reset.
    let mut raw = tokio::net::TcpStream::connect(mock.addr()).await.unwrap();
    let req = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-mock-fail: reset\r\n\
               content-length: 2\r\n\r\n{}";
    raw.write_all(req.as_bytes()).await.unwrap();
    let read = raw.read(&mut [0u8; 64]).await;
    let reset = std::io::ErrorKind::ConnectionReset;
    assert_eq!(read.map_err(|e| e.kind()), Err(reset));
    eventually("3 aborted", || mock.stats().snapshot().aborted == 3).await;
    let s = mock.stats().snapshot();
    assert_eq!((s.completed, s.cancelled, s.in_flight), (0, 0, 0));
    assert_eq!(mock.requests().len(), 3, "reset requests are still logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn midstream_reset_sends_some_events_then_cuts() {
    let mock = MockLlm::start(MockOptions::default()).await.unwrap();
    for proto in BOTH {
        let mut c = Client::connect(mock.addr(), proto).await;
        let cut = [("x-mock-fail", "midstream:3")];
        let resp = c.post("/v1/chat/completions", &cut, chat(true)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut got = String::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got.push_str(std::str::from_utf8(&f.into_data().unwrap()).unwrap()),
                Some(Err(e)) => break e,
                None => panic!("{proto:?}: the stream finished: {got:?}"),
            }
        };
        assert_eq!(
            got.matches("\n\n").count(),
            3,
            "{proto:?}: {got:?} then {err}"
        );
        // A plain response is cut in half, short of its content-length.
        let mut c = Client::connect(mock.addr(), proto).await;
        let resp = c.post("/v1/chat/completions", &cut, chat(false)).await;
        assert!(resp.into_body().collect().await.is_err());
    }
    eventually("4 aborted", || mock.stats().snapshot().aborted == 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_midstream_counts_as_cancelled() {
    let opts = MockOptions {
        tokens: 100,
        interval: Duration::from_millis(20),
        ..Default::default()
    };
    let mock = MockLlm::start(opts).await.unwrap();
    for (i, proto) in BOTH.into_iter().enumerate() {
        let mut c = Client::connect(mock.addr(), proto).await;
        let resp = c.post("/v1/chat/completions", &[], chat(true)).await;
        let mut body = resp.into_body();
        for _ in 0..2 {
            body.frame().await.unwrap().unwrap();
        }
        assert_eq!(mock.stats().snapshot().in_flight, 1);
        drop(body);
        if proto == Proto::H1 {
            // HTTP/1 can only cancel by closing the connection.
            drop(c);
            let cancelled = || mock.stats().snapshot().cancelled == i as u64 + 1;
            eventually("cancelled after close", cancelled).await;
        } else {
            // h2 resets just the stream; the connection stays usable.
            let cancelled = || mock.stats().snapshot().cancelled == i as u64 + 1;
            eventually("cancelled after RST_STREAM", cancelled).await;
            let ok = c.send("GET", "/health", &[], None).await.unwrap();
            assert_eq!(ok.status(), StatusCode::OK);
        }
    }
    eventually("nothing in flight", || {
        mock.stats().snapshot().in_flight == 0
    })
    .await;
    let s = mock.stats().snapshot();
    assert_eq!((s.cancelled, s.max_in_flight), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_is_cancelled_when_the_client_leaves() {
    let mock = MockLlm::start(MockOptions {
        fail: Some(Failure::Stall),
        ..Default::default()
    })
    .await
    .unwrap();
    for proto in BOTH {
        let mut c = Client::connect(mock.addr(), proto).await;
        {
            // Kept alive past the timeout: dropping it would be the client
            // leaving (h2 resets the stream).
            let req = c.send("POST", "/v1/chat/completions", &[], Some(chat(false)));
            tokio::pin!(req);
            let waited = tokio::time::timeout(Duration::from_millis(200), &mut req).await;
            assert!(waited.is_err(), "{proto:?}: a stalled request was answered");
            assert_eq!(mock.stats().snapshot().in_flight, 1, "{proto:?}");
        }
        drop(c);
        eventually("stall cancelled", || mock.stats().snapshot().in_flight == 0).await;
    }
    assert_eq!(mock.stats().snapshot().cancelled, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_logged_with_selected_headers() {
    let mock = MockLlm::start(MockOptions::default()).await.unwrap();
    let mut c = Client::connect(mock.addr(), Proto::H1).await;
    let headers = [
        ("authorization", "Bearer sk-test"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-test-case", "log"),
        ("x-unrelated", "dropped"),
    ];
    body_bytes(
        c.post("/v1/chat/completions?x=1", &headers, chat(false))
            .await,
    )
    .await;
    body_bytes(c.send("GET", "/mock/stats", &[], None).await.unwrap()).await;
    let log = mock.requests();
    assert_eq!(log.len(), 1, "introspection is not logged: {log:?}");
    let r = &log[0];
    assert_eq!(
        (r.seq, r.method.as_str(), r.path.as_str()),
        (1, "POST", "/v1/chat/completions")
    );
    assert_eq!(r.query.as_deref(), Some("x=1"));
    assert_eq!(r.version, "HTTP/1.1");
    assert_eq!(r.header("authorization"), Some("Bearer sk-test"));
    assert_eq!(r.header("x-forwarded-for"), Some("10.0.0.1"));
    assert_eq!(r.header("x-test-case"), Some("log"));
    assert_eq!(r.header("host"), Some(mock.addr().to_string().as_str()));
    assert_eq!(r.header("x-unrelated"), None);
    assert_eq!(r.body, chat(false));

    let over_http = body_json(c.send("GET", "/mock/requests", &[], None).await.unwrap()).await;
    assert_eq!(over_http[0]["headers"]["x-test-case"], "log");
    let stats = body_json(c.send("GET", "/mock/stats", &[], None).await.unwrap()).await;
    assert_eq!(stats["requests"], 1);
}

#[test]
fn start_blocking_serves_sync_callers() {
    use std::io::{Read, Write};
    let mock = MockLlm::start_blocking(MockOptions::default());
    let mut s = std::net::TcpStream::connect(mock.addr()).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nok"), "{resp}");
    assert_eq!(mock.stats().snapshot().requests, 1);
}

#[test]
fn failure_and_usage_syntax_round_trips() {
    for text in ["500", "429", "reset", "stall", "garbage", "midstream:3"] {
        let f: Failure = text.parse().unwrap();
        assert_eq!(f.to_string(), text);
    }
    assert_eq!(
        "midstream:7".parse(),
        Ok(Failure::MidStreamReset { after_chunks: 7 })
    );
    for bad in ["200", "99", "midstream:", "midstream:x", "explode"] {
        assert!(bad.parse::<Failure>().is_err(), "{bad}");
    }
    for text in ["asked", "always", "never"] {
        assert_eq!(text.parse::<UsageMode>().unwrap().to_string(), text);
    }
    assert!("sometimes".parse::<UsageMode>().is_err());
}

#[test]
fn stream_events_split_where_they_were_rendered() {
    let c = render::Completion {
        api: render::Api::Chat,
        seq: 7,
        created: 1,
        model_json: "\"m\\n\"",
        prompt_tokens: 1,
        completion_tokens: 2,
        finish_reason: "stop",
        usage: true,
    };
    let buf = c.render_stream();
    let mut ends = vec![];
    let mut pos = 0;
    while pos < buf.len() {
        pos = render::next_event(&buf, pos);
        ends.push(pos);
    }
    // 2 tokens, finish, usage, [DONE]
    assert_eq!(ends.len(), 5);
    assert!(buf.ends_with(b"data: [DONE]\n\n"));
    let plain: Value = serde_json::from_slice(&c.render()).unwrap();
    assert_eq!(plain["model"], "m\n");
    assert_eq!(plain["id"], "chatcmpl-mock-7");
}
