//! The L7 proxy against mock-llm: error statuses, balancing, streaming,
//! usage accounting, cancellation, TLS/h2 and metrics.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_tests::{
    l7::{chat, collect, eventually, metric, model_toml, Client, TestGateway, KEY_A, KEY_B},
    mock::{MockLlm, MockOptions},
};
use http_body_util::BodyExt as _;

async fn mock(name: &str) -> MockLlm {
    MockLlm::start(MockOptions {
        name: name.into(),
        ..MockOptions::default()
    })
    .await
    .expect("mock")
}

fn url(g: &TestGateway, path: &str) -> String {
    format!("{}{path}", g.url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status() {
    let up = mock("a").await;
    let models = model_toml("m", "queue = { size = 0 }", &[(up.url(), 1, Some(1))])
        + &model_toml(
            "dead",
            "timeouts = { connect = \"300ms\" }",
            &[("http://127.0.0.1:9".into(), 1, None)],
        )
        + &model_toml(
            "slow",
            "timeouts = { first_byte = \"300ms\" }",
            &[(up.url(), 1, None)],
        );
    let g = TestGateway::start("max_body_bytes = 2048", &models).await;
    let c = Client::http1();
    let chat_url = url(&g, "/v1/chat/completions");

    let r = c.post(&chat_url, None, &[], &chat("m", false)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (401, "invalid_api_key")
    );
    let r = c
        .post(&chat_url, Some("sk-nope"), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 401);
    let r = c.post(&chat_url, Some(KEY_B), &[], &chat("m", false)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (403, "model_not_allowed")
    );
    let r = c
        .post(&chat_url, Some(KEY_A), &[], &chat("nonexistent", false))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (404, "model_not_found")
    );
    let r = collect(
        c.post_raw(
            &chat_url,
            Some(KEY_A),
            &[],
            Bytes::from_static(b"{\"model\": "),
        )
        .await,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (400, "invalid_json")
    );
    let r = c
        .post(
            &chat_url,
            Some(KEY_A),
            &[],
            &serde_json::json!({"messages": []}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (400, "missing_model")
    );
    let big = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let r = c.post(&chat_url, Some(KEY_A), &[], &big).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (413, "request_too_large")
    );
    let r = c.get(&url(&g, "/v1/nothing"), Some(KEY_A)).await;
    assert_eq!(r.status, 404);
    let r = c.get(&chat_url, Some(KEY_A)).await;
    assert_eq!(r.status, 405);
    // 502: nothing listens on the backend's port.
    let r = c
        .post(&chat_url, Some(KEY_A), &[], &chat("dead", false))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (502, "upstream_unreachable")
    );
    // 504: the backend stalls past the first-byte timeout.
    let t = Instant::now();
    let r = c
        .post(
            &chat_url,
            Some(KEY_A),
            &[("x-mock-fail", "stall")],
            &chat("slow", false),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (504, "upstream_timeout")
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "504 took {:?}",
        t.elapsed()
    );
    // 503: the only backend (max_connections = 1) is busy with a stream.
    let hold = c
        .post_raw(
            &chat_url,
            Some(KEY_A),
            &[("x-mock-interval-ms", "100"), ("x-mock-tokens", "30")],
            Bytes::from(chat("m", true).to_string()),
        )
        .await;
    assert_eq!(hold.status(), 200);
    let r = c.post(&chat_url, Some(KEY_A), &[], &chat("m", false)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (503, "overloaded")
    );
    assert_eq!(r.headers["retry-after"], "1");
    drop(hold);
    // Every error body is OpenAI-shaped and carries a request id.
    let e = r.json();
    assert!(
        e["error"]["message"].is_string()
            && e["error"]["type"].is_string()
            && e["error"]["param"].is_null()
    );
    assert!(r.headers.contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_distribution_follows_weights() {
    let (a, b) = (mock("a").await, mock("b").await);
    let g = TestGateway::start(
        "",
        &model_toml("m", "", &[(a.url(), 3, None), (b.url(), 1, None)]),
    )
    .await;
    let c = Client::http1();
    let n = 1000;
    let mut to_a = 0;
    for _ in 0..n {
        let r = c
            .post(
                &url(&g, "/v1/chat/completions"),
                Some(KEY_A),
                &[("x-mock-tokens", "1")],
                &chat("m", false),
            )
            .await;
        assert_eq!(r.status, 200);
        if r.headers["x-mock-name"] == "a" {
            to_a += 1;
        }
    }
    let share = to_a as f64 / n as f64;
    assert!(
        (share - 0.75).abs() <= 0.05,
        "backend a (weight 3 of 4) got {to_a} of {n} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_prefers_the_idle_backend() {
    let (a, b) = (mock("a").await, mock("b").await);
    let g = TestGateway::start(
        "",
        &model_toml("m", "", &[(a.url(), 1, None), (b.url(), 1, None)]),
    )
    .await;
    let c = Client::http1();
    let chat_url = url(&g, "/v1/chat/completions");
    // Two slow streams: with equal weights, one lands on each backend.
    let slow = [("x-mock-interval-ms", "200"), ("x-mock-tokens", "50")];
    let s1 = c
        .post_raw(
            &chat_url,
            Some(KEY_A),
            &slow,
            Bytes::from(chat("m", true).to_string()),
        )
        .await;
    let s2 = c
        .post_raw(
            &chat_url,
            Some(KEY_A),
            &slow,
            Bytes::from(chat("m", true).to_string()),
        )
        .await;
    assert_ne!(
        s1.headers()["x-mock-name"],
        s2.headers()["x-mock-name"],
        "one stream on each backend"
    );
    // A third stream on `a` only: end the one on `b`.
    let (keep, release) = if s1.headers()["x-mock-name"] == "a" {
        (s1, s2)
    } else {
        (s2, s1)
    };
    drop(release);
    eventually(Duration::from_secs(3), "b's stream cancelled", || {
        b.stats().snapshot().in_flight == 0
    })
    .await;
    // Now a holds one stream and b none: every new request goes to b.
    for i in 0..10 {
        let r = c
            .post(
                &chat_url,
                Some(KEY_A),
                &[("x-mock-tokens", "1")],
                &chat("m", false),
            )
            .await;
        assert_eq!(
            r.headers["x-mock-name"], "b",
            "request {i} went to the busy backend"
        );
    }
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_chunks_arrive_incrementally() {
    let up = mock("a").await;
    let g = TestGateway::start("", &model_toml("m", "", &[(up.url(), 1, None)])).await;
    let c = Client::http1();
    let t0 = Instant::now();
    let r = c
        .post_raw(
            &url(&g, "/v1/chat/completions"),
            Some(KEY_A),
            &[("x-mock-interval-ms", "150"), ("x-mock-tokens", "6")],
            Bytes::from(chat("m", true).to_string()),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut body = r.into_body();
    let mut arrivals = Vec::new();
    let mut text = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.expect("stream frame").into_data() {
            arrivals.push(t0.elapsed());
            text.extend_from_slice(&d);
        }
    }
    let text = String::from_utf8(text).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"usage\":{"),
        "usage chunk leaked to a client that did not ask: {text}"
    );
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    assert!(
        first < Duration::from_millis(600),
        "first chunk only after {first:?}: buffered?"
    );
    assert!(
        last - first >= Duration::from_millis(600),
        "chunks came together ({first:?}..{last:?}): buffered?"
    );
    assert!(
        arrivals.len() >= 6,
        "{} frames for 6 tokens",
        arrivals.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_counted_with_and_without_include_usage() {
    let up = mock("a").await;
    let g = TestGateway::start(
        "",
        &model_toml("m", "upstream_model = \"org/m-v1\"", &[(up.url(), 1, None)]),
    )
    .await;
    let c = Client::http1();
    let chat_url = url(&g, "/v1/chat/completions");
    let tok = [("x-mock-tokens", "5")];

    let r = c
        .post(&chat_url, Some(KEY_A), &tok, &chat("m", false))
        .await;
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    let r = c.post(&chat_url, Some(KEY_A), &tok, &chat("m", true)).await;
    assert_eq!(r.status, 200);
    let s = String::from_utf8_lossy(&r.body).to_string();
    assert!(s.ends_with("data: [DONE]\n\n"), "a whole stream: {s}");
    assert!(
        !s.contains("\"usage\":{"),
        "stripped usage chunk reached the client: {s}"
    );
    let mut asked = chat("m", true);
    asked["stream_options"] = serde_json::json!({"include_usage": true});
    let r = c.post(&chat_url, Some(KEY_A), &tok, &asked).await;
    let s = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        s.contains("\"usage\":{"),
        "the client asked for usage and did not get it: {s}"
    );

    // Upstream saw the rewritten model and, for both streams, include_usage.
    let reqs = up.requests();
    assert!(
        reqs.iter().all(|q| q.body["model"] == "org/m-v1"),
        "upstream_model rewrite: {:?}",
        reqs[0].body
    );
    assert_eq!(reqs[1].body["stream_options"]["include_usage"], true);
    // And never the client's key; with the client address and a request id.
    for q in &reqs {
        assert_eq!(q.header("authorization"), None);
        assert_eq!(q.header("x-forwarded-for"), Some("127.0.0.1"));
        assert!(q.header("x-request-id").is_some_and(|id| id.len() >= 16));
    }
    let m = g.metrics().await;
    let completion = metric(
        &m,
        "gateway_tokens_total",
        "key=\"team-a\",kind=\"completion\",model=\"m\"",
    );
    assert_eq!(completion, Some(15.0), "3 responses x 5 tokens:\n{m}");
    assert!(
        metric(
            &m,
            "gateway_tokens_total",
            "key=\"team-a\",kind=\"prompt\",model=\"m\""
        )
        .unwrap_or(0.0)
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_upstream_and_frees_the_slot() {
    let up = mock("a").await;
    let g = TestGateway::start("", &model_toml("m", "", &[(up.url(), 1, Some(1))])).await;
    let c = Client::http1();
    let chat_url = url(&g, "/v1/chat/completions");
    let r = c
        .post_raw(
            &chat_url,
            Some(KEY_A),
            &[("x-mock-interval-ms", "100"), ("x-mock-tokens", "100")],
            Bytes::from(chat("m", true).to_string()),
        )
        .await;
    let mut body = r.into_body();
    let first = body.frame().await.expect("a first chunk").expect("ok");
    assert!(first.is_data());
    drop(body);
    cancelled_and_slot_free(&up, &g).await;
}

/// The mock saw its request cancelled, the model's single slot serves
/// again, and the backend counts nothing in flight.
async fn cancelled_and_slot_free(up: &MockLlm, g: &TestGateway) {
    eventually(
        Duration::from_secs(3),
        "the mock sees the request cancelled",
        || up.stats().snapshot().cancelled == 1,
    )
    .await;
    let r = Client::http1()
        .post(
            &url(g, "/v1/chat/completions"),
            Some(KEY_A),
            &[("x-mock-tokens", "1")],
            &chat("m", false),
        )
        .await;
    assert_eq!(
        r.status,
        200,
        "slot not released: {}",
        String::from_utf8_lossy(&r.body)
    );
    let m = g.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_backend_in_flight",
            &format!("backend=\"{}\",model=\"m\"", up.url())
        ),
        Some(0.0),
        "{m}"
    );
}

/// A client that gives up while the backend has not answered yet (a long
/// prompt, a queue on the backend) cancels the upstream request too, so
/// the backend stops working for nobody and the slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_before_the_first_byte_cancels_upstream() {
    let up = mock("a").await;
    let g = TestGateway::start("", &model_toml("m", "", &[(up.url(), 1, Some(1))])).await;
    let addr = g.url.trim_start_matches("http://").to_owned();
    let body = chat("m", false).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {KEY_A}\r\n\
         x-mock-latency-ms: 10000\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(3),
        "the request reaches the mock",
        || up.stats().snapshot().in_flight == 1,
    )
    .await;
    drop(s);
    cancelled_and_slot_free(&up, &g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_tls_and_alpn_h2() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    // Clear text HTTP/2 with prior knowledge.
    let g = TestGateway::start("", &models).await;
    let r = Client::h2c()
        .post(
            &url(&g, "/v1/chat/completions"),
            Some(KEY_A),
            &[],
            &chat("m", true),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert!(String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"));

    // TLS with a certificate made for the test; ALPN picks h2.
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("test cert");
    let dir = gateway_tests::TempDir::new("tls");
    let (crt, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        crt.display(),
        key.display()
    );
    let g = TestGateway::start(&tls, &models).await;
    assert!(g.url.starts_with("https://"));
    let c = Client::tls(cert.cert.der());
    let r = c
        .post(
            &url(&g, "/v1/chat/completions"),
            Some(KEY_A),
            &[],
            &chat("m", false),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2, "ALPN should pick h2");
    assert_eq!(
        up.requests().last().unwrap().header("x-forwarded-proto"),
        Some("https")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_backends_and_models_list() {
    let up = mock("a").await;
    let h2 = up.url().replace("http://", "h2c://");
    let models = model_toml("m", "aliases = [\"gpt-x\"]", &[(h2, 1, None)])
        + &model_toml("other-1", "", &[(up.url(), 1, None)]);
    let g = TestGateway::start("", &models).await;
    let c = Client::http1();
    let r = c
        .post(
            &url(&g, "/v1/chat/completions"),
            Some(KEY_A),
            &[],
            &chat("gpt-x", false),
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = up.requests().last().unwrap().clone();
    assert_eq!(seen.version, "HTTP/2.0", "h2c:// backends speak HTTP/2");
    assert_eq!(
        seen.body["model"], "m",
        "the backend is asked for the model's name, not the client's alias"
    );
    let ids = |r: &gateway_tests::l7::Collected| -> Vec<String> {
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = ids(&c.get(&url(&g, "/v1/models"), Some(KEY_A)).await);
    assert_eq!(all, ["m", "gpt-x", "other-1"]);
    let b = ids(&c.get(&url(&g, "/v1/models"), Some(KEY_B)).await);
    assert_eq!(b, ["other-1"], "team-b sees only what it may use");
    // One model (`client.models.retrieve`), by name or alias; one the key
    // may not use does not exist for it.
    let r = c.get(&url(&g, "/v1/models/gpt-x"), Some(KEY_A)).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["id"].clone()),
        (200, "gpt-x".into())
    );
    assert_eq!(r.json()["object"], "model");
    let r = c.get(&url(&g, "/v1/models/m"), Some(KEY_B)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (404, "model_not_found".into())
    );
    let r = c.get(&url(&g, "/v1/models/nope"), Some(KEY_A)).await;
    assert_eq!(r.status, 404);
    assert_eq!(c.get(&url(&g, "/v1/models"), None).await.status, 401);
    assert_eq!(c.get(&url(&g, "/healthz"), None).await.status, 200);
    assert_eq!(c.get(&url(&g, "/readyz"), None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reflect_traffic() {
    let up = mock("a").await;
    let g = TestGateway::start("", &model_toml("m", "", &[(up.url(), 1, None)])).await;
    let c = Client::http1();
    for _ in 0..3 {
        c.post(
            &url(&g, "/v1/chat/completions"),
            Some(KEY_A),
            &[],
            &chat("m", true),
        )
        .await;
    }
    c.post(
        &url(&g, "/v1/chat/completions"),
        Some("bad"),
        &[],
        &chat("m", true),
    )
    .await;
    c.post(
        &url(&g, "/v1/embeddings"),
        Some(KEY_A),
        &[],
        &serde_json::json!({"model": "m", "input": ["a b", "c"]}),
    )
    .await;
    let m = g.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_http_requests_total",
            "code=\"200\",key=\"team-a\",model=\"m\""
        ),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "gateway_http_requests_total",
            "code=\"401\",key=\"-\",model=\"-\""
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "gateway_time_to_first_token_seconds_count",
            "model=\"m\""
        ),
        Some(3.0),
        "the three streams; the embeddings answer is no stream: {m}"
    );
    assert_eq!(
        metric(
            &m,
            "gateway_http_request_duration_seconds_count",
            "model=\"m\""
        ),
        Some(4.0)
    );
    assert_eq!(metric(&m, "gateway_overhead_seconds_count", ""), Some(4.0));
    assert!(
        metric(
            &m,
            "gateway_time_per_output_token_seconds_count",
            "model=\"m\""
        )
        .unwrap_or(0.0)
            >= 3.0
    );
    assert!(
        !m.contains("bad") && !m.contains(KEY_A),
        "a client's key must never appear in metrics"
    );
}

/// Open connections per worker, from `gateway_connections{worker}`.
async fn per_worker(g: &TestGateway) -> [u64; 2] {
    let m = g.metrics().await;
    [0, 1].map(|w| {
        metric(&m, "gateway_connections", &format!("worker=\"{w}\"")).unwrap_or(0.0) as u64
    })
}

/// Opens one connection and returns it with the worker that accepted it.
async fn connect_and_locate(g: &TestGateway, addr: &str) -> (tokio::net::TcpStream, usize) {
    let before = per_worker(g).await;
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = per_worker(g).await;
        // The balancer counted the connection when it chose the worker,
        // before the gauge shows it, so once it is visible here the
        // balancer has it.
        if let Some(w) = (0..2).find(|&w| now[w] > before[w]) {
            return (s, w);
        }
        assert!(
            Instant::now() < deadline,
            "no worker counted the connection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_take_new_connections_by_load() {
    crate::require_root!();
    let up = mock("a").await;
    let g = TestGateway::start("workers = 2", &model_toml("m", "", &[(up.url(), 1, None)])).await;
    let addr = g.url.trim_start_matches("http://").to_owned();
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(connect_and_locate(&g, &addr).await);
    }
    let on =
        |w: usize, c: &[(tokio::net::TcpStream, usize)]| c.iter().filter(|(_, x)| *x == w).count();
    let (a, b) = (on(0, &conns), on(1, &conns));
    assert!(
        a.abs_diff(b) <= 2,
        "20 connections should split evenly across 2 workers, got {a}/{b}"
    );
    // Empty worker 1; worker 0 keeps its connections (a busy worker).
    conns.retain(|(_, w)| *w == 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while per_worker(&g).await[1] != 0 {
        assert!(
            Instant::now() < deadline,
            "worker 1 did not see its connections close"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut fresh = Vec::new();
    for _ in 0..6 {
        fresh.push(connect_and_locate(&g, &addr).await);
    }
    let to_idle = on(1, &fresh);
    assert!(
        to_idle >= 5,
        "the idle worker should take the new connections, got {to_idle} of 6"
    );
    // A burst: every connection is sent to a worker before the first is
    // accepted (and its worker's load published). They still spread.
    drop((conns, fresh));
    let deadline = Instant::now() + Duration::from_secs(3);
    while per_worker(&g).await != [0, 0] {
        assert!(Instant::now() < deadline, "the connections did not close");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst: Vec<_> = (0..40)
        .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr.clone())))
        .collect();
    let mut held = Vec::new();
    for c in burst {
        held.push(c.await.unwrap().expect("connect"));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let split = loop {
        let now = per_worker(&g).await;
        if now[0] + now[1] == 40 {
            break now;
        }
        assert!(Instant::now() < deadline, "not all counted: {now:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        split[0].abs_diff(split[1]) <= 4,
        "a burst of 40 herded onto one worker: {split:?}"
    );
}

/// A client that leaves before its answer starts (its SDK timed out while
/// the backend thought) is still logged and counted: 499, as nginx does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_before_its_answer_is_counted_as_499() {
    use std::io::Write as _;
    let up = mock("a").await;
    let g = TestGateway::start("", &model_toml("m", "", &[(up.url(), 1, None)])).await;
    let addr = g.url.trim_start_matches("http://").to_owned();
    let s = tokio::task::spawn_blocking(move || {
        let body = chat("m", false).to_string();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY_A}\r\n\
             x-mock-latency-ms: 3000\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(3),
        "the request reached the backend",
        || up.stats().snapshot().in_flight == 1,
    )
    .await;
    drop(s); // gone before the answer
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = g.metrics().await;
        let abandoned = metric(
            &m,
            "gateway_http_requests_total",
            "code=\"499\",key=\"team-a\",model=\"m\"",
        );
        if abandoned == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no 499 counted: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(
        Duration::from_secs(3),
        "the upstream request is cancelled",
        || up.stats().snapshot().in_flight == 0,
    )
    .await;
}

/// HEAD is answered without a body over both protocols (over HTTP/2 a body
/// on a HEAD answer is a protocol error the client resets the stream for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_get_heads_over_http1_and_http2() {
    let up = mock("a").await;
    let g = TestGateway::start("", &model_toml("m", "", &[(up.url(), 1, None)])).await;
    for c in [Client::http1(), Client::h2c()] {
        for (path, key) in [
            ("/healthz", None),
            ("/readyz", None),
            ("/v1/models", Some(KEY_A)),
        ] {
            let mut b = http::Request::head(url(&g, path));
            if let Some(k) = key {
                b = b.header("authorization", format!("Bearer {k}"));
            }
            let r = collect(c.send(b.body(Default::default()).unwrap()).await).await;
            assert_eq!(r.status, 200, "{path} over {:?}", r.version);
            assert!(r.body.is_empty(), "{path} over {:?}", r.version);
            let len: usize = r.headers["content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(len > 0, "the length of the body a GET would get");
        }
    }
}

/// A backend with `api_key` gets its own key (vLLM's `--api-key`), never
/// the client's; a backend without one gets no credentials at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_gets_its_own_api_key_and_never_the_clients() {
    let (keyed, open) = (mock("keyed").await, mock("open").await);
    let models = format!(
        "[[models]]\nname = \"k\"\n[[models.backends]]\nurl = \"{}\"\napi_key = \"up-secret-1\"\n",
        keyed.url()
    ) + &model_toml("o", "", &[(open.url(), 1, None)]);
    let g = TestGateway::start("", &models).await;
    let c = Client::http1();
    for m in ["k", "o"] {
        let r = c
            .post(
                &url(&g, "/v1/chat/completions"),
                Some(KEY_A),
                &[],
                &chat(m, false),
            )
            .await;
        assert_eq!(r.status, 200, "{m}");
    }
    let seen = |m: &MockLlm| {
        m.requests()
            .last()
            .unwrap()
            .header("authorization")
            .map(str::to_owned)
    };
    assert_eq!(seen(&keyed).as_deref(), Some("Bearer up-secret-1"));
    assert_eq!(seen(&open), None);
}

/// (path, body) of each request a canned backend was sent.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A canned answer: path, status line, content type, body.
type Canned = (&'static str, &'static str, &'static str, &'static str);

/// A backend that answers every request with a canned response by path
/// (chunked, so it reads as one stream or one JSON body) and records the
/// bodies it was sent.
fn canned_backend(answers: &'static [Canned]) -> (String, Seen) {
    use std::io::{BufRead as _, Read as _, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let mut r = std::io::BufReader::new(s);
            let (mut line, mut len) = (String::new(), 0usize);
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split(' ').nth(1).unwrap_or("").to_owned();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            log.lock()
                .unwrap()
                .push((path.clone(), String::from_utf8_lossy(&body).into_owned()));
            let (status, ctype, text) = answers
                .iter()
                .find(|(p, ..)| *p == path)
                .map(|(_, s, c, t)| (*s, *c, *t))
                .unwrap_or(("200 OK", "application/json", "{}"));
            let mut s = r.into_inner();
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{text}\r\n0\r\n\r\n",
                text.len()
            );
        }
    });
    (url, seen)
}

/// The Responses API (vLLM serves it) and the pooling endpoints are routed
/// by the body's `model` like chat: a Responses stream's usage (in its
/// `response.completed` event, as `input_tokens`/`output_tokens`) is
/// counted, and no `stream_options` is added to it, which that API does
/// not take; a rerank generates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_and_pooling_endpoints_are_routed() {
    const STREAM: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"total_tokens\":13}}}\n\n";
    const RERANK: &str = r#"{"id":"r","results":[{"index":0,"relevance_score":0.9}],"usage":{"prompt_tokens":6,"total_tokens":6}}"#;
    let (url, seen) = canned_backend(&[
        ("/v1/responses", "200 OK", "text/event-stream", STREAM),
        ("/v1/rerank", "200 OK", "application/json", RERANK),
    ]);
    let g = TestGateway::start("", &model_toml("m", "", &[(url, 1, None)])).await;
    let c = Client::http1();
    let r = c
        .post(
            &format!("{}/v1/responses", g.url),
            Some(KEY_A),
            &[],
            &serde_json::json!({"model": "m", "input": "hi", "stream": true}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        STREAM,
        "passed through whole"
    );
    let r = c
        .post(
            &format!("{}/v1/rerank", g.url),
            Some(KEY_A),
            &[],
            &serde_json::json!({"model": "m", "query": "q", "documents": ["a"]}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["results"][0]["index"].clone()),
        (200, 0.into())
    );
    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].0, "/v1/responses");
    assert!(!sent[0].1.contains("stream_options"), "{}", sent[0].1);
    let m = g.metrics().await;
    let tokens = |kind: &str| {
        metric(
            &m,
            "gateway_tokens_total",
            &format!("key=\"team-a\",kind=\"{kind}\",model=\"m\""),
        )
    };
    assert_eq!(
        (tokens("prompt"), tokens("completion")),
        (Some(15.0), Some(4.0)),
        "9 + 6 prompt tokens, 4 generated:\n{m}"
    );
    let r = c.get(&format!("{}/v1/responses", g.url), Some(KEY_A)).await;
    assert_eq!(r.status, 405);
}

/// Speech to text (`/v1/audio/transcriptions`, `/v1/audio/translations`)
/// is routed by the form's `model` field: renamed to the backend's
/// `upstream_model` with the audio passed byte for byte, its usage
/// counted, and a body that is no form, or names no model the key may use,
/// refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_forms_are_routed_by_their_model_field() {
    let up = mock("a").await;
    let g = TestGateway::start(
        "",
        &model_toml(
            "whisper",
            "upstream_model = \"openai/whisper-large-v3\"",
            &[(up.url(), 1, None)],
        ),
    )
    .await;
    let c = Client::http1();
    let form = |model: &str, audio: &[u8]| {
        let mut b = format!(
            "--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
        )
        .into_bytes();
        b.extend_from_slice(audio);
        b.extend_from_slice(b"\r\n--b0undary--\r\n");
        Bytes::from(b)
    };
    let ct = [("content-type", "multipart/form-data; boundary=b0undary")];
    let audio: Vec<u8> = b"RIFF"
        .iter()
        .copied()
        .chain((0..=127u8).cycle().take(30_000))
        .collect();
    let sent = form("whisper", &audio);
    for path in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        let r = gateway_tests::l7::collect(
            c.post_raw(&url(&g, path), Some(KEY_A), &ct, sent.clone())
                .await,
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        let want = sent.len() - "whisper".len() + "openai/whisper-large-v3".len();
        assert_eq!(
            r.json()["text"],
            format!("mock transcription of {want} bytes")
        );
    }
    let got = up.requests();
    assert_eq!(got.len(), 2);
    let upstream = got[0].body.as_str().expect("recorded as text");
    assert_eq!(
        upstream.as_bytes(),
        &form("openai/whisper-large-v3", &audio)[..],
        "the model renamed, the rest byte for byte"
    );
    let m = g.metrics().await;
    let tokens = |kind: &str| {
        metric(
            &m,
            "gateway_tokens_total",
            &format!("key=\"team-a\",kind=\"{kind}\",model=\"whisper\""),
        )
    };
    assert_eq!(
        (tokens("prompt"), tokens("completion")),
        (Some(40.0), Some(12.0)),
        "{m}"
    );

    let refused = |model: &'static str, ct: &'static str| {
        let c = &c;
        let url = url(&g, "/v1/audio/transcriptions");
        async move {
            let headers = [("content-type", ct)];
            let r = c
                .post_raw(&url, Some(KEY_A), &headers, form(model, b"x"))
                .await;
            let r = gateway_tests::l7::collect(r).await;
            (r.status.as_u16(), r.error_code())
        }
    };
    let form_ct = "multipart/form-data; boundary=b0undary";
    assert_eq!(
        refused("whisper", "application/json").await,
        (400, "invalid_form".into())
    );
    assert_eq!(
        refused("whisper", "multipart/form-data; boundary=other").await,
        (400, "invalid_form".into())
    );
    assert_eq!(
        refused("nope", form_ct).await,
        (404, "model_not_found".into())
    );
    assert_eq!(
        up.requests().len(),
        2,
        "no refused form reached the backend"
    );
}

/// With `server.cors_origins`, a browser's preflight from an allowed
/// origin is answered before any key is asked for, and every answer to that
/// origin (errors too, so a script can read them) carries
/// `Access-Control-Allow-Origin`; other origins, and requests with no
/// `Origin` (an SDK), get no CORS headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_the_allowed_browser_origins() {
    let up = mock("a").await;
    let g = TestGateway::start(
        "cors_origins = [\"https://chat.example\"]",
        &model_toml("m", "", &[(up.url(), 1, None)]),
    )
    .await;
    let c = Client::http1();
    let chat_url = url(&g, "/v1/chat/completions");
    let preflight = |origin: &'static str| {
        http::Request::options(&chat_url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os",
            )
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let r = collect(c.send(preflight("https://chat.example")).await).await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://chat.example"
    );
    assert_eq!(
        r.headers["access-control-allow-headers"],
        "authorization, content-type, x-stainless-os"
    );
    assert!(r.headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let r = collect(c.send(preflight("https://evil.example")).await).await;
    assert_eq!(r.status, 401, "not an allowed origin: no preflight answer");
    assert!(!r.headers.contains_key("access-control-allow-origin"));

    let origin = [("origin", "https://chat.example")];
    let r = c
        .post(&chat_url, Some(KEY_A), &origin, &chat("m", false))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://chat.example"
    );
    assert!(r.headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("x-request-id"));
    let r = c
        .post(&chat_url, Some("sk-wrong"), &origin, &chat("m", false))
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://chat.example"
    );
    let r = c.post(&chat_url, Some(KEY_A), &[], &chat("m", false)).await;
    assert!(!r.headers.contains_key("access-control-allow-origin"));
}

/// A backend's error in its own shape (TGI's) reaches the client in
/// OpenAI's, with its status and message; one in OpenAI's shape passes as
/// it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_reach_the_client_in_openai_shape() {
    const TGI: &str = r#"{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096","error_type":"validation"}"#;
    const OPENAI: &str = r#"{"error":{"message":"no such adapter","type":"invalid_request_error","param":"model","code":"adapter_not_found"}}"#;
    let (url, _) = canned_backend(&[
        (
            "/v1/chat/completions",
            "422 Unprocessable Entity",
            "application/json",
            TGI,
        ),
        (
            "/v1/completions",
            "404 Not Found",
            "application/json",
            OPENAI,
        ),
    ]);
    let g = TestGateway::start("", &model_toml("m", "retries = 0", &[(url, 1, None)])).await;
    let c = Client::http1();
    let r = c
        .post(
            &self::url(&g, "/v1/chat/completions"),
            Some(KEY_A),
            &[],
            &chat("m", false),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.headers["content-type"], "application/json");
    let e = r.json();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Input validation error"),
        "{e}"
    );
    assert_eq!(e["error"]["type"], "validation");
    let r = c
        .post(
            &self::url(&g, "/v1/completions"),
            Some(KEY_A),
            &[],
            &serde_json::json!({"model": "m", "prompt": "hi"}),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(String::from_utf8_lossy(&r.body), OPENAI, "passed as it is");
}
