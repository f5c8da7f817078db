//! Fault tests: backends that die, stall, return garbage and recover;
//! per-key limits; hostile clients. Each asserts what a client sees and
//! what the gateway reports.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use gateway_tests::{
    l7::{chat, collect, eventually, metric, model_toml, sha256_hex, Client, TestGateway, KEY_A},
    mock::{Failure, MockLlm, MockOptions},
};

async fn mock(name: &str) -> MockLlm {
    MockLlm::start(MockOptions {
        name: name.into(),
        tokens: 4,
        ..MockOptions::default()
    })
    .await
    .unwrap()
}

fn url(gw: &TestGateway) -> String {
    format!("{}/v1/chat/completions", gw.url)
}

/// Chat requests a mock received (health checks are not counted).
fn chat_requests(m: &MockLlm) -> usize {
    m.requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .count()
}

/// Which mock answered.
fn answered_by(r: &gateway_tests::l7::Collected) -> String {
    r.headers
        .get("x-mock-name")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_backends_under_load_fails_no_request() {
    let a = mock("a").await;
    let b = mock("b").await;
    let models = model_toml(
        "m",
        "retries = 2\nretry_budget = { ratio = 0.5, min_per_second = 100 }",
        &[(a.url(), 1, None), (b.url(), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (u, stop, ok) = (url(&gw), Arc::clone(&stop), Arc::clone(&ok));
        clients.push(tokio::spawn(async move {
            let c = Client::http1();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Upstream takes 20 ms, so a kill finds requests waiting.
                let r = c
                    .post(
                        &u,
                        Some(KEY_A),
                        &[("x-mock-latency-ms", "20")],
                        &chat("m", false),
                    )
                    .await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push((r.status, String::from_utf8_lossy(&r.body).into_owned()));
                }
            }
            failures
        }));
    }
    eventually(Duration::from_secs(5), "traffic on both backends", || {
        a.stats().snapshot().completed > 20 && b.stats().snapshot().completed > 20
    })
    .await;
    let before = ok.load(Ordering::Relaxed);
    drop(b); // listener closed, open connections aborted mid-request
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(failures.is_empty(), "clients saw errors: {failures:?}");
    let after = ok.load(Ordering::Relaxed);
    assert!(
        after > before + 50,
        "traffic kept flowing: {before} -> {after}"
    );
    let m = gw.metrics().await;
    let retried = metric(
        &m,
        "gateway_upstream_retries_total",
        r#"model="m",outcome="retried""#,
    );
    assert!(
        retried.unwrap_or(0.0) >= 1.0,
        "the kill was absorbed by retries:\n{m}"
    );
}

/// A stream's head comes before its request is scheduled, so a stream
/// that gets no head within `first_byte` is from a stalled backend and is
/// tried on the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_backend_fails_over_within_the_first_byte_timeout() {
    let stalled = MockLlm::start(MockOptions {
        name: "stalled".into(),
        fail: Some(Failure::Stall),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let good = mock("good").await;
    // Ejection off, so every request may meet the stalled backend.
    let models = model_toml(
        "m",
        "timeouts = { first_byte = \"300ms\" }\noutlier = { consecutive_failures = 0 }",
        &[(stalled.url(), 1, None), (good.url(), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let mut slowest = Duration::ZERO;
    for _ in 0..6 {
        let t = Instant::now();
        let r = c.post(&url(&gw), Some(KEY_A), &[], &chat("m", true)).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(answered_by(&r), "good");
        assert!(
            String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"),
            "a whole stream from the good backend"
        );
    }
    assert!(
        slowest < Duration::from_millis(1200),
        "failover within the first-byte timeout, took {slowest:?}"
    );
    let m = gw.metrics().await;
    let backend = format!(r#"backend="{}",kind="timeout",model="m""#, stalled.url());
    assert!(
        metric(&m, "gateway_upstream_errors_total", &backend).unwrap_or(0.0) >= 1.0,
        "stalls are counted as timeouts:\n{m}"
    );
    assert_eq!(
        stalled.stats().snapshot().in_flight,
        0,
        "the stalled attempts were cancelled upstream"
    );
}

/// A non-stream answer's head comes after its whole generation: one that
/// runs out of `first_byte` may still be generating, and is answered 504
/// rather than generated again on the next backend. A stream whose head
/// is as late is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_stream_answer_past_first_byte_is_not_replayed() {
    let (a, b) = (mock("a").await, mock("b").await);
    let models = model_toml(
        "m",
        "timeouts = { first_byte = \"300ms\" }\nretries = 1\noutlier = { consecutive_failures = 0 }",
        &[(a.url(), 1, None), (b.url(), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let slow = [("x-mock-latency-ms", "1000")];
    let r = c
        .post(&url(&gw), Some(KEY_A), &slow, &chat("m", false))
        .await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        chat_requests(&a) + chat_requests(&b),
        1,
        "a generation that ran out of first_byte is not started again"
    );
    let r = c
        .post(&url(&gw), Some(KEY_A), &slow, &chat("m", true))
        .await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        chat_requests(&a) + chat_requests(&b),
        3,
        "a stream with no head within first_byte is tried on the other backend"
    );
    let m = gw.metrics().await;
    let retried = metric(
        &m,
        "gateway_upstream_retries_total",
        r#"model="m",outcome="retried""#,
    );
    assert_eq!(retried, Some(1.0), "one retry, the stream's:\n{m}");
}

/// A backend that dies after a stream started is never replayed (DESIGN
/// §7): the client gets the events sent before the cut, then the SSE error
/// event, and no `[DONE]`; the other backend never sees the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_midway_ends_with_an_error_event_and_is_not_replayed() {
    let (a, b) = (mock("a").await, mock("b").await);
    let models = model_toml(
        "m",
        "outlier = { consecutive_failures = 0 }",
        &[(a.url(), 1, None), (b.url(), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let cut = [("x-mock-fail", "midstream:3"), ("x-mock-tokens", "8")];
    let r = c.post(&url(&gw), Some(KEY_A), &cut, &chat("m", true)).await;
    assert_eq!(r.status, 200);
    let body = String::from_utf8_lossy(&r.body).to_string();
    let events: Vec<&str> = body.split_terminator("\n\n").collect();
    assert!(
        events.len() == 4 && events[..3].iter().all(|e| e.contains("\"choices\"")),
        "three chunks, then the error: {body}"
    );
    assert!(
        events[3].contains("upstream_stream_error") && !body.contains("[DONE]"),
        "{body}"
    );
    assert_eq!(
        chat_requests(&a) + chat_requests(&b),
        1,
        "a started stream is not replayed"
    );
}

/// A backend that dies in the middle of an event: the client gets the
/// whole events before it and a clean error event, never the error glued
/// onto half an event (a JSON error in the client's SDK), whether or not
/// the gateway strips the usage chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_event_ends_with_a_clean_error_event() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    const WHOLE: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf);
            let half = "data: {\"choices\":[{\"index\":0,\"delta\":{\"con";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{WHOLE}\r\n",
                WHOLE.len()
            );
            let _ = s.flush();
            std::thread::sleep(Duration::from_millis(50));
            let _ = write!(s, "{:x}\r\n{half}\r\n", half.len());
            let _ = s.flush();
            std::thread::sleep(Duration::from_millis(50));
            // Closed without the last chunk: the stream broke.
        }
    });
    let models = model_toml("m", "retries = 0", &[(format!("http://{addr}"), 1, None)]);
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let mut asked = chat("m", true);
    asked["stream_options"] = serde_json::json!({"include_usage": true});
    for (what, req) in [("usage stripped", chat("m", true)), ("usage asked", asked)] {
        let r = c.post(&url(&gw), Some(KEY_A), &[], &req).await;
        assert_eq!(r.status, 200, "{what}");
        let body = String::from_utf8_lossy(&r.body).to_string();
        let (first, rest) = body.split_at(WHOLE.len().min(body.len()));
        assert_eq!(first, WHOLE, "{what}: the whole event first: {body}");
        assert!(
            rest.starts_with("data: {\"error\"") && rest.ends_with("\n\n"),
            "{what}: then a clean error event: {body}"
        );
    }
}

/// A TCP server that answers every connection with bytes that are not HTTP.
fn garbage_server() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"\x00\x01garbage that is not HTTP\r\n\r\n");
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_garbage_gives_502_with_a_clear_message() {
    let addr = garbage_server();
    let models = model_toml("m", "retries = 0", &[(format!("http://{addr}"), 1, None)]);
    let gw = TestGateway::start("", &models).await;
    let r = Client::http1()
        .post(&url(&gw), Some(KEY_A), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "bad_upstream_response");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("invalid response"), "{msg}");
    assert!(
        !msg.contains(&addr.to_string()),
        "no internal detail: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_then_probed_back_into_rotation() {
    let a = mock("a").await;
    let b = mock("b").await;
    a.set_fail(Some(Failure::Status(503)));
    let models = model_toml(
        "m",
        "retries = 1\nretry_budget = { min_per_second = 100 }\n\
         outlier = { consecutive_failures = 3, ejection = \"300ms\", max_ejection = \"1s\" }\n\
         slow_start = \"0s\"",
        &[(a.url(), 1, None), (b.url(), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let healthy = format!(r#"backend="{}",model="m""#, a.url());
    for _ in 0..10 {
        let r = c.post(&url(&gw), Some(KEY_A), &[], &chat("m", false)).await;
        assert_eq!(r.status, 200, "retried on b");
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "gateway_backend_healthy", &healthy),
        Some(0.0),
        "{m}"
    );
    let seen = a.stats().snapshot().requests;
    assert!(
        seen <= 4,
        "ejected after 3 failures, then left alone: {seen}"
    );
    // While ejected, a gets nothing.
    for _ in 0..5 {
        let r = c.post(&url(&gw), Some(KEY_A), &[], &chat("m", false)).await;
        assert_eq!(answered_by(&r), "b");
    }
    a.set_fail(None);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The next request to reach a is its probe; then it shares again.
    let mut by_a = 0;
    for _ in 0..20 {
        let r = c.post(&url(&gw), Some(KEY_A), &[], &chat("m", false)).await;
        assert_eq!(r.status, 200);
        by_a += (answered_by(&r) == "a") as u32;
    }
    assert!(by_a >= 8, "a is back in rotation: {by_a} of 20");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "gateway_backend_healthy", &healthy), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_backend_out_and_back() {
    let a = mock("a").await;
    let b = mock("b").await;
    let models = model_toml(
        "m",
        "health_check = { path = \"/health\", interval = \"50ms\", timeout = \"200ms\", healthy = 2, unhealthy = 2 }\n\
         slow_start = \"0s\"",
        &[(a.url(), 1, None), (b.url(), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let healthy = format!(r#"backend="{}",model="m""#, a.url());
    let probe = |text: &str| metric(text, "gateway_backend_healthy", &healthy);
    a.set_fail(Some(Failure::Status(503)));
    let deadline = Instant::now() + Duration::from_secs(3);
    while probe(&gw.metrics().await) != Some(0.0) {
        assert!(Instant::now() < deadline, "a never marked unhealthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No client request was needed to find out; none reaches a now.
    let before = chat_requests(&a);
    let c = Client::http1();
    for _ in 0..6 {
        let r = c.post(&url(&gw), Some(KEY_A), &[], &chat("m", false)).await;
        assert_eq!((r.status.as_u16(), answered_by(&r)), (200, "b".into()));
    }
    assert_eq!(chat_requests(&a), before);
    a.set_fail(None);
    let deadline = Instant::now() + Duration::from_secs(3);
    while probe(&gw.metrics().await) != Some(1.0) {
        assert!(Instant::now() < deadline, "a never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut by_a = 0;
    for _ in 0..10 {
        let r = c.post(&url(&gw), Some(KEY_A), &[], &chat("m", false)).await;
        by_a += (answered_by(&r) == "a") as u32;
    }
    assert!(by_a >= 4, "a takes its share again: {by_a} of 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_queues_requests_until_a_slot_frees_or_the_deadline() {
    let up = mock("a").await;
    let models = model_toml(
        "m",
        "queue = { size = 1, timeout = \"400ms\" }",
        &[(up.url(), 1, Some(1))],
    );
    let gw = TestGateway::start("", &models).await;
    let u = url(&gw);
    // A request that holds the only slot for `ms`.
    let hold = |ms: &'static str| {
        let u = u.clone();
        tokio::spawn(async move {
            Client::http1()
                .post(
                    &u,
                    Some(KEY_A),
                    &[("x-mock-latency-ms", ms)],
                    &chat("m", false),
                )
                .await
                .status
        })
    };
    let held = hold("250");
    eventually(Duration::from_secs(2), "the slot is taken", || {
        up.stats().snapshot().in_flight == 1
    })
    .await;
    // The second waits for it and is served; the third finds the queue full.
    let queued = {
        let u = u.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = Client::http1()
                .post(&u, Some(KEY_A), &[], &chat("m", false))
                .await;
            (r.status, t.elapsed())
        })
    };
    let shared = &gw.gw.as_ref().unwrap().shared;
    eventually(Duration::from_secs(2), "one request queued", || {
        shared.routes.load().models[0].backends[0]
            .slots()
            .waiting
            .load(Ordering::Relaxed)
            == 1
    })
    .await;
    let full = Client::http1()
        .post(&u, Some(KEY_A), &[], &chat("m", false))
        .await;
    assert_eq!(full.status, 503, "queue of one is taken");
    assert_eq!(full.headers["retry-after"], "1");
    assert_eq!(held.await.unwrap(), 200);
    let (status, waited) = queued.await.unwrap();
    assert_eq!(status, 200, "served once the slot freed");
    assert!(
        waited >= Duration::from_millis(100),
        "it waited: {waited:?}"
    );
    // Nobody frees the slot in time: 503 after the queue timeout.
    let held = hold("2000");
    eventually(Duration::from_secs(2), "the slot is taken again", || {
        up.stats().snapshot().in_flight == 1
    })
    .await;
    let t = Instant::now();
    let r = Client::http1()
        .post(&u, Some(KEY_A), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), "overloaded");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_millis(1500),
        "503 at the queue deadline: {waited:?}"
    );
    assert_eq!(held.await.unwrap(), 200);
}

const KEY_LIMITED: &str = "sk-test-limited";

fn limited_key(limits: &str) -> String {
    format!(
        "[[keys]]\nname = \"limited\"\nsha256 = \"{}\"\n{limits}\n",
        sha256_hex(KEY_LIMITED)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_refuses_with_headers_and_refills() {
    let up = mock("a").await;
    let models =
        model_toml("m", "", &[(up.url(), 1, None)]) + &limited_key("requests_per_minute = 120");
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    // The bucket refills at 2 per second while the burst is sent, so the
    // first refusal comes after 120 requests plus what refilled meanwhile.
    let start = Instant::now();
    let mut admitted = 0u32;
    let mut last = None;
    let r = loop {
        let r = c
            .post(&url(&gw), Some(KEY_LIMITED), &[], &chat("m", false))
            .await;
        if r.status != 200 {
            break r;
        }
        admitted += 1;
        last = Some(r);
        assert!(admitted <= 1000, "never refused");
    };
    let refilled = 2.0 * start.elapsed().as_secs_f64();
    assert!(
        admitted >= 120 && f64::from(admitted) <= 120.0 + refilled + 1.0,
        "{admitted} admitted in {:?}",
        start.elapsed()
    );
    let last = last.unwrap();
    assert_eq!(last.headers["x-ratelimit-limit-requests"], "120");
    assert!(last.headers.contains_key("x-ratelimit-reset-requests"));
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "rate_limit_exceeded");
    assert_eq!(r.headers["retry-after"], "1", "2 per second refill");
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
    // Another key is not affected.
    let other = c.post(&url(&gw), Some(KEY_A), &[], &chat("m", false)).await;
    assert_eq!(other.status, 200);
    // Half a second later one request is allowed again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = c
        .post(&url(&gw), Some(KEY_LIMITED), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 200, "refilled");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_rate_limited_total",
            r#"key="limited",limit="requests""#
        ),
        Some(1.0),
        "{m}"
    );
}

/// The key's limits come before the body (DESIGN: auth, key limits, then
/// the model): requests that fail on their body spend the key's requests
/// too, so a key cannot send failing requests without limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_requests_spend_the_keys_requests_per_minute() {
    let up = mock("a").await;
    let models =
        model_toml("m", "", &[(up.url(), 1, None)]) + &limited_key("requests_per_minute = 3");
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let bad = [
        Bytes::from_static(b"{not json"),
        Bytes::from(chat("no-such-model", false).to_string()),
        Bytes::from_static(b"{\"messages\":[]}"),
    ];
    for (body, status) in bad.into_iter().zip([400, 404, 400]) {
        let r = collect(c.post_raw(&url(&gw), Some(KEY_LIMITED), &[], body).await).await;
        assert_eq!(r.status, status);
    }
    let r = c
        .post(&url(&gw), Some(KEY_LIMITED), &[], &chat("m", false))
        .await;
    assert_eq!(
        r.status, 429,
        "the three failures spent the minute's requests"
    );
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
    // Over the limit, a bad body is refused for the limit, before it is read.
    let r = collect(
        c.post_raw(
            &url(&gw),
            Some(KEY_LIMITED),
            &[],
            Bytes::from_static(b"{not json"),
        )
        .await,
    )
    .await;
    assert_eq!(r.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_reserves_then_settles_with_real_usage() {
    let up = mock("a").await;
    let models =
        model_toml("m", "", &[(up.url(), 1, None)]) + &limited_key("tokens_per_minute = 1000");
    let gw = TestGateway::start("", &models).await;
    let body = |max_tokens: u64| {
        let mut b = chat("m", true);
        b["max_tokens"] = max_tokens.into();
        Bytes::from(b.to_string())
    };
    let c = Client::http1();
    // A slow stream reserving ~800 tokens is open...
    let open = c
        .post_raw(
            &url(&gw),
            Some(KEY_LIMITED),
            &[("x-mock-interval-ms", "100"), ("x-mock-tokens", "4")],
            body(800),
        )
        .await;
    assert_eq!(open.status(), 200);
    // ...so another such request does not fit, while key A is unaffected.
    let r = collect(
        c.post_raw(&url(&gw), Some(KEY_LIMITED), &[], body(800))
            .await,
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert_eq!(r.headers["x-ratelimit-limit-tokens"], "1000");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let other = collect(c.post_raw(&url(&gw), Some(KEY_A), &[], body(800)).await).await;
    assert_eq!(other.status, 200);
    // The stream ends having used ~30 tokens; the rest of its reservation
    // comes back, and the same request now fits.
    let done = collect(open).await;
    assert!(String::from_utf8_lossy(&done.body).contains("[DONE]"));
    let r = collect(
        c.post_raw(&url(&gw), Some(KEY_LIMITED), &[], body(800))
            .await,
    )
    .await;
    assert_eq!(r.status, 200, "settled with the real usage");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_rate_limited_total",
            r#"key="limited",limit="tokens""#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_refuses_while_the_key_is_busy() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]) + &limited_key("max_concurrent = 1");
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let open = c
        .post_raw(
            &url(&gw),
            Some(KEY_LIMITED),
            &[("x-mock-interval-ms", "50"), ("x-mock-tokens", "4")],
            Bytes::from(chat("m", true).to_string()),
        )
        .await;
    let r = c
        .post(&url(&gw), Some(KEY_LIMITED), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "concurrency");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(
        c.post(&url(&gw), Some(KEY_A), &[], &chat("m", false))
            .await
            .status,
        200
    );
    collect(open).await;
    let r = c
        .post(&url(&gw), Some(KEY_LIMITED), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 200, "the slot came back when the stream ended");
}

/// Sends raw bytes, returns what came back until close or `wait`.
fn raw(addr: &str, req: &[u8], wait: Duration) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_cost_nothing() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("header_read_timeout = \"500ms\"", &models).await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let auth = format!("Authorization: Bearer {KEY_A}\r\n");
    let post = move |extra: &str, body: &[u8]| {
        let mut r = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n{auth}Content-Type: application/json\r\n{extra}\r\n"
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let (a, ok_body) = (addr.clone(), br#"{"model":"m"}"#);
    let answers = tokio::task::spawn_blocking(move || {
        let w = Duration::from_secs(3);
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: gw\r\n\r\n", "a".repeat(5000));
        let big_header = format!(
            "GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
            "b".repeat(40_000)
        );
        let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
        let many_headers = format!("GET /healthz HTTP/1.1\r\nHost: gw\r\n{many}\r\n");
        // Both framings: hyper decodes chunked (RFC 9112 6.1) and closes the
        // connection after answering, so the request hidden after the
        // chunked body is never served.
        let mut smuggle = post(
            &format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                ok_body.len() + 8
            ),
            b"",
        );
        smuggle.extend_from_slice(format!("{:x}\r\n", ok_body.len()).as_bytes());
        smuggle.extend_from_slice(ok_body);
        smuggle.extend_from_slice(b"\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n");
        let two_lengths = post("Content-Length: 13\r\nContent-Length: 14\r\n", ok_body);
        let utf8 = post(
            "Content-Length: 21\r\n",
            b"{\"model\":\"m\xff\xfe\",\"x\":1}",
        );
        let array = post("Content-Length: 9\r\n", b"[\"model\"]");
        let deep_body = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(100),
            "]".repeat(100)
        );
        let deep = post(
            &format!("Content-Length: {}\r\n", deep_body.len()),
            deep_body.as_bytes(),
        );
        [
            raw(&a, long_uri.as_bytes(), w),
            raw(&a, big_header.as_bytes(), w),
            raw(&a, many_headers.as_bytes(), w),
            raw(&a, &smuggle, w),
            raw(&a, &two_lengths, w),
            raw(&a, &utf8, w),
            raw(&a, &array, w),
            raw(&a, &deep, w),
        ]
    })
    .await
    .unwrap();
    let expect = [
        ("414", "uri_too_long"),
        ("431", ""),
        ("431", ""),
        ("200", "chat.completion"),
        ("400", ""),
        ("400", "UTF-8"),
        ("400", "missing_model"),
        ("400", "nested deeper"),
    ];
    for (got, (status, text)) in answers.iter().zip(expect) {
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status}")) && got.contains(text),
            "want {status} {text:?}, got: {got}"
        );
    }
    assert_eq!(
        answers[3].matches("HTTP/1.1 ").count(),
        1,
        "one answer, then the connection is closed: {}",
        answers[3]
    );
    assert_eq!(
        up.stats().snapshot().requests,
        1,
        "only the chunked request reached upstream"
    );
    // The header count over HTTP/2 too, where hyper bounds only the size of
    // the header list.
    let (mut send, _conn) = h2_connection(&gw).await;
    let mut many = http::Request::get(format!("{}/healthz", gw.url));
    for i in 0..150 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let r = send
        .send_request(many.body(http_body_util::Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("header_too_large"),
        "{body:?}"
    );
    // Cookies, which HTTP/2 clients send as a field each, count as one.
    let mut cookies = http::Request::get(format!("{}/healthz", gw.url));
    for i in 0..150 {
        cookies = cookies.header("cookie", format!("c{i}=v"));
    }
    let r = send
        .send_request(
            cookies
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A client that connects and says nothing is closed after the header
    // read timeout; so is one that stops halfway through its headers.
    let a = addr.clone();
    let (silent, partial) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let silent = raw(&a, b"", Duration::from_secs(5));
        let silent_for = t.elapsed();
        let t = Instant::now();
        let partial = raw(
            &a,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n",
            Duration::from_secs(5),
        );
        ((silent, silent_for), (partial, t.elapsed()))
    })
    .await
    .unwrap();
    assert!(silent.0.is_empty(), "{}", silent.0);
    assert!(
        silent.1 >= Duration::from_millis(400) && silent.1 < Duration::from_secs(3),
        "{:?}",
        silent.1
    );
    assert!(
        partial.1 >= Duration::from_millis(400) && partial.1 < Duration::from_secs(3),
        "{:?}",
        partial.1
    );
    eventually(Duration::from_secs(2), "no connection left open", || {
        gw.gw
            .as_ref()
            .unwrap()
            .shared
            .per_ip
            .open([127, 0, 0, 1].into())
            == 0
    })
    .await;
}

/// An HTTP/2 connection with no open stream is closed (GOAWAY) after the
/// header read timeout, as an idle HTTP/1.1 keep-alive connection is; a
/// stream that outlasts the timeout is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_and_long_streams_are_not() {
    let up = MockLlm::start(MockOptions {
        tokens: 20,
        interval: Duration::from_millis(100),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("header_read_timeout = \"500ms\"", &models).await;
    // A stream of ~2 s over h2c, four idle timeouts: the connection has a
    // stream open all along.
    let t = Instant::now();
    let r = Client::h2c()
        .post(&url(&gw), Some(KEY_A), &[], &chat("m", true))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert!(
        String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"),
        "the whole stream arrived"
    );
    assert!(
        t.elapsed() > Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    // The client preface and an empty SETTINGS frame, then nothing.
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let (got, took) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .unwrap();
        let t = Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (out, t.elapsed())
    })
    .await
    .unwrap();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "an idle h2 connection closed after {took:?}"
    );
    // Frames: 9-byte headers; a GOAWAY (type 7) came before the close.
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        types.push(got[at + 3]);
        at += 9 + len;
    }
    assert!(types.contains(&7), "frame types sent: {types:?}");
}

/// Each request head on a keep-alive connection gets `header_read_timeout`
/// from the answer before it (one timer per connection, moved forward):
/// a request sent after an earlier deadline passed is served, and a head
/// left unfinished is cut at its own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_keep_alive_request_gets_its_own_head_deadline() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("header_read_timeout = \"500ms\"", &models).await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let (answers, cut_after) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answers = 0;
        // Requests 300 ms apart: the third comes 600 ms after the first
        // answer, past the first head's deadline but within its own.
        for _ in 0..3 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                .unwrap();
            let status = read_answers(&mut s, 1);
            assert_eq!(status, [200], "answer {answers}");
            answers += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        // Half a head, then nothing: cut 500 ms after the last answer.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
        let t = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (answers, t.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(answers, 3);
    assert!(
        cut_after < Duration::from_millis(1500),
        "an unfinished head was cut after {cut_after:?}"
    );
}

/// Reads `n` whole answers (each a head and its Content-Length bytes) from
/// a raw HTTP/1.1 connection and returns their status codes; panics if
/// the connection closes first.
fn read_answers(s: &mut std::net::TcpStream, n: usize) -> Vec<u16> {
    let mut got = Vec::new();
    let mut statuses = Vec::new();
    let mut buf = [0u8; 4096];
    while statuses.len() < n {
        // One whole answer at the front of `got`: its status and length.
        let whole = |got: &[u8]| {
            let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))?
                .trim()
                .parse()
                .ok()?;
            let status = head.get(9..12)?.parse().ok()?;
            (got.len() >= end + len).then_some((status, end + len))
        };
        if let Some((status, used)) = whole(&got) {
            statuses.push(status);
            got.drain(..used);
            continue;
        }
        let k = s.read(&mut buf).unwrap();
        assert!(
            k > 0,
            "closed after {} answers: {statuses:?}",
            statuses.len()
        );
        got.extend_from_slice(&buf[..k]);
    }
    statuses
}

/// A refused request whose small body came with its head does not cost
/// the client its connection: the body is already read, so the next
/// request on it (here pipelined in the same write) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_with_a_whole_body_keeps_its_connection() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("", &models).await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let statuses = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let mut out = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\
             Authorization: Bearer sk-wrong\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        out.push_str("GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n");
        s.write_all(out.as_bytes()).unwrap();
        let first = read_answers(&mut s, 2);
        // And a third request after both answers, on the same connection.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            .unwrap();
        [first, read_answers(&mut s, 1)].concat()
    })
    .await
    .unwrap();
    assert_eq!(statuses, [401, 200, 200]);
    assert_eq!(
        chat_requests(&up),
        0,
        "a refused request reaches no backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slowloris_connections_neither_starve_clients_nor_grow_memory() {
    let up = mock("a").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let body = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = \"@STATE_DIR@\"\n\
         header_read_timeout = \"2s\"\nmax_connections_per_ip = 5000\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [[keys]]\nname = \"team-a\"\nsha256 = \"{}\"\n{}",
        sha256_hex(KEY_A),
        model_toml("m", "", &[(up.url(), 1, None)]),
    );
    let gw =
        tokio::task::spawn_blocking(move || gateway_tests::process::Daemon::start(None, &body))
            .await
            .unwrap()
            .expect("daemon");
    let baseline = gw.rss_kib();
    const N: usize = 1000;
    let dst = format!("127.0.0.1:{port}");
    // Open N connections that send a request head one byte at a time.
    let (attack, opened) = {
        let dst = dst.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut socks: Vec<Option<std::net::TcpStream>> = (0..N)
                .map(|_| {
                    let mut s = std::net::TcpStream::connect(&dst).unwrap();
                    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
                        .unwrap();
                    s.set_nonblocking(true).unwrap();
                    Some(s)
                })
                .collect();
            tx.send(()).unwrap();
            let start = Instant::now();
            // Trickle until the gateway has closed every one (or 15 s).
            while socks.iter().any(Option::is_some) && start.elapsed() < Duration::from_secs(15) {
                for slot in socks.iter_mut() {
                    let Some(s) = slot else { continue };
                    let mut buf = [0u8; 512];
                    let closed = match s.read(&mut buf) {
                        Ok(_) => true, // EOF, or a 408-style answer before the close
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            s.write_all(b"a").is_err()
                        }
                        Err(_) => true,
                    };
                    if closed {
                        *slot = None;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (
                socks.iter().filter(|s| s.is_some()).count(),
                start.elapsed(),
            )
        });
        (t, rx)
    };
    opened.recv().unwrap();
    // Normal clients are served while the slow ones hang on.
    let c = Client::http1();
    let u = format!("http://{dst}/v1/chat/completions");
    let mut peak = baseline;
    for _ in 0..40 {
        let t = Instant::now();
        let r = c.post(&u, Some(KEY_A), &[], &chat("m", false)).await;
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        peak = peak.max(gw.rss_kib());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (left_open, took) = tokio::task::spawn_blocking(move || attack.join().unwrap())
        .await
        .unwrap();
    assert_eq!(left_open, 0, "every slow connection was closed");
    assert!(
        took < Duration::from_secs(6),
        "closed by the 2 s header read timeout, took {took:?}"
    );
    // The measured growth is ~23 MiB (debug build) here; the ceiling leaves room.
    const CEILING_KIB: u64 = 64 * 1024;
    assert!(
        peak - baseline < CEILING_KIB,
        "RSS grew from {baseline} KiB to {peak} KiB with {N} slow connections"
    );
    eprintln!("slowloris: RSS {baseline} KiB -> peak {peak} KiB with {N} connections");
    // Slots were given back: the same address is still served.
    let r = c.post(&u, Some(KEY_A), &[], &chat("m", false)).await;
    assert_eq!(r.status, 200);
}

/// A listener whose accept queue is full: connects to it hang in SYN-SENT,
/// which is how an unreachable host looks.
pub(crate) fn blackhole() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue (backlog 0 still admits one) with connections never accepted.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let f = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if f.connect_timeout(&addr.into(), Duration::from_millis(100))
            .is_err()
        {
            break;
        }
        fillers.push(f.into());
    }
    (s, fillers, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_timeout_answers_or_ends_the_stream_and_frees_the_slot() {
    let up = mock("a").await;
    let (_hole, _fillers, hole) = blackhole();
    let timeouts = "timeouts = { connect = \"200ms\", first_byte = \"300ms\", idle = \"250ms\", total = \"700ms\" }\nqueue = { size = 0 }\nretries = 0";
    let models = model_toml("m", timeouts, &[(up.url(), 1, Some(1))])
        + &model_toml("hole", timeouts, &[(format!("http://{hole}"), 1, Some(1))]);
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let u = url(&gw);
    let free = |name: &'static str| {
        let (c, u) = (Client::http1(), u.clone());
        async move {
            // max_connections = 1 and no queue: this fails unless the slot is back.
            let r = c.post(&u, Some(KEY_A), &[], &chat(name, false)).await;
            assert_eq!(r.status, 200, "the slot of {name} was not released");
        }
    };

    // connect: the SYN is never answered.
    let t = Instant::now();
    let r = c.post(&u, Some(KEY_A), &[], &chat("hole", false)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (504, "upstream_timeout".into())
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(180) && took < Duration::from_secs(1),
        "{took:?}"
    );
    let r = c.post(&u, Some(KEY_A), &[], &chat("hole", false)).await;
    assert_eq!(r.status, 504, "slot released after a connect timeout");

    // first byte: no response head in time.
    let t = Instant::now();
    let r = c
        .post(
            &u,
            Some(KEY_A),
            &[("x-mock-fail", "stall")],
            &chat("m", false),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (504, "upstream_timeout".into())
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    free("m").await;

    // idle: a stream pauses longer than the idle timeout after its start.
    let stream = |interval: &'static str| {
        let (c, u) = (Client::http1(), u.clone());
        async move {
            let t = Instant::now();
            let r = collect(
                c.post_raw(
                    &u,
                    Some(KEY_A),
                    &[("x-mock-interval-ms", interval), ("x-mock-tokens", "20")],
                    Bytes::from(chat("m", true).to_string()),
                )
                .await,
            )
            .await;
            (String::from_utf8_lossy(&r.body).into_owned(), t.elapsed())
        }
    };
    let (body, took) = stream("400").await;
    assert!(
        body.contains("upstream_stream_error") && !body.contains("[DONE]"),
        "{body}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "ended at the idle timeout: {took:?}"
    );
    free("m").await;

    // total: chunks keep coming, but the whole exchange is too long.
    let (body, took) = stream("100").await;
    assert!(
        body.contains("upstream_stream_error") && !body.contains("[DONE]"),
        "{body}"
    );
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_millis(1800),
        "ended at the total timeout: {took:?}"
    );
    free("m").await;
    let m = gw.metrics().await;
    for kind in ["idle_timeout", "total_timeout", "timeout"] {
        let labels = format!(r#"backend="{}",kind="{kind}",model="m""#, up.url());
        assert_eq!(
            metric(&m, "gateway_upstream_errors_total", &labels),
            Some(1.0),
            "{kind}\n{m}"
        );
    }
}

/// Asks for a stream of `tokens` tokens with none between them, over a
/// connection with a 4 KiB receive buffer that nothing reads yet: once
/// the socket buffers fill, the gateway waits on this client.
fn long_stream_on_a_small_window(dst: SocketAddr, tokens: u32, extra: &str) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&dst.into()).unwrap();
    let mut s: std::net::TcpStream = s.into();
    let body = chat("m", true).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/json\r\nx-mock-tokens: {tokens}\r\nx-mock-interval-ms: 0\r\n\
         {extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s
}

/// Waits for `up`'s one request to be under way, then for the send
/// timeout (600 ms in the tests that use this) to cancel it.
async fn upstream_cancelled_once_stuck(up: &MockLlm) {
    eventually(Duration::from_secs(3), "the stream is under way", || {
        up.stats().snapshot().in_flight == 1
    })
    .await;
    let t = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the unread stream's upstream request is cancelled",
        || up.stats().snapshot().in_flight == 0,
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "cut after the send timeout: {:?}",
        t.elapsed()
    );
}

/// A request body that stalls gets 408 after `body_read_timeout`, and while
/// it stalls it holds the key's `max_concurrent` slot (taken before the
/// body is read). A client that stops reading its response is cut after
/// `send_timeout`, and the upstream request is cancelled with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_and_unread_responses_are_cut_and_free_their_slots() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]) + &limited_key("max_concurrent = 1");
    let gw = TestGateway::start(
        "body_read_timeout = \"1s\"\nsend_timeout = \"600ms\"",
        &models,
    )
    .await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let a = addr.clone();
    // The stalled request goes first, and has its head read well before
    // anything else is sent with the key.
    let (mut stalled, t) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY_LIMITED}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
        );
        let mut s = std::net::TcpStream::connect(&a).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        (s, t)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The stalled body holds the key's only slot.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = Client::http1()
            .post(&url(&gw), Some(KEY_LIMITED), &[], &chat("m", false))
            .await;
        if r.status == 429 {
            assert_eq!(r.json()["error"]["type"], "concurrency");
            break;
        }
        assert!(Instant::now() < deadline, "never refused: {}", r.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stalled = tokio::task::spawn_blocking(move || {
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut out = Vec::new();
        let _ = stalled.read_to_end(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
    });
    let (answer, took) = stalled.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(5),
        "408 at the body read timeout: {took:?}"
    );
    let r = Client::http1()
        .post(&url(&gw), Some(KEY_LIMITED), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 200, "the slot came back with the 408");

    // A long stream the client never reads: a small receive buffer, and
    // nothing read from it.
    let mut s = long_stream_on_a_small_window(addr.parse().unwrap(), 200_000, "");
    upstream_cancelled_once_stuck(&up).await;
    // The client sees a response that ends without its end.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "{}",
        &got[..got.len().min(200)]
    );
    assert!(!got.contains("[DONE]"), "the stream was cut, not finished");
    let m = gw.metrics().await;
    let in_flight: f64 = m
        .lines()
        .filter(|l| l.starts_with("gateway_backend_in_flight{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(in_flight, 0.0, "{m}");
}

/// A client that stops reading for longer than the model's idle timeout,
/// then reads on, gets its whole stream: the backend sent on, so the stall
/// was the client's, not a stall of the backend's to cut the stream for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pausing_longer_than_idle_is_no_upstream_stall() {
    let up = mock("a").await;
    let models = model_toml(
        "m",
        "timeouts = { idle = \"300ms\" }",
        &[(up.url(), 1, None)],
    );
    let gw = TestGateway::start("send_timeout = \"20s\"", &models).await;
    let dst: SocketAddr = gw.url.trim_start_matches("http://").parse().unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let mut s = long_stream_on_a_small_window(dst, 60_000, "Connection: close\r\n");
        // Read a little, then pause: the ~9 MB the backend sends fill the
        // socket buffers (a few MB) well within the 3 s, after which the
        // gateway waits on this client, ten idle timeouts long. Then read
        // it all.
        let mut first = [0u8; 1024];
        s.read_exact(&mut first).unwrap();
        std::thread::sleep(Duration::from_millis(3000));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        String::from_utf8_lossy(&rest).into_owned()
    })
    .await
    .unwrap();
    assert!(
        !got.contains("upstream_stream_error"),
        "cut as an upstream stall"
    );
    assert!(got.contains("[DONE]"), "the whole stream arrived");
    let m = gw.metrics().await;
    assert!(
        !m.contains("idle_timeout"),
        "no upstream error counted: {m}"
    );
}

/// One HTTP/2 connection of its own (hyper's client, no pool): requests go
/// on it, and the handle ends when the gateway closes it.
async fn h2_connection(
    gw: &TestGateway,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let addr = gw.url.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (
        send,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

fn h2_chat(
    gw: &TestGateway,
    headers: &[(&str, &str)],
    stream: bool,
) -> http::Request<http_body_util::Full<Bytes>> {
    let mut b = http::Request::post(url(gw))
        .header("authorization", format!("Bearer {KEY_A}"))
        .header("content-type", "application/json");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(http_body_util::Full::new(Bytes::from(
        chat("m", stream).to_string(),
    )))
    .unwrap()
}

/// HTTP/2: a client that reads its connection but never opens a stream's
/// flow-control window stops the gateway from polling that response; after
/// `send_timeout` the stream's upstream request is cancelled anyway. The
/// connection then takes no new stream (GOAWAY) and is closed once its
/// other streams are done: hyper can never finish the cut one, and a
/// client kept a connection (and the cut streams' state) open forever by
/// answering pings. The client's next requests go on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_the_client_never_reads_is_cut_after_the_send_timeout() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("send_timeout = \"600ms\"", &models).await;
    let (mut send, conn) = h2_connection(&gw).await;
    let held = send
        .send_request(h2_chat(
            &gw,
            &[("x-mock-tokens", "200000"), ("x-mock-interval-ms", "0")],
            true,
        ))
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    // Its body is never read: the client's window for it stays shut.
    upstream_cancelled_once_stuck(&up).await;
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the stalled connection is closed after the cut")
        .unwrap();
    drop(held);
    let r = Client::h2c()
        .post(&url(&gw), Some(KEY_A), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.stats().snapshot().in_flight, 0);
}

/// HTTP/2 rapid reset: a client that opens streams and resets them once
/// the gateway has taken them on (h2's own limit counts only resets of
/// streams not yet taken on) has its connection closed when most of at
/// least 200 streams were reset before their answer, within a second of
/// opening (here ~0.1 s). The same number of
/// streams answered in full keeps the connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_resetting_most_streams_is_disconnected() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("", &models).await;

    // Answered in full: 220 requests, 20 at a time.
    let (send, conn) = h2_connection(&gw).await;
    for _ in 0..11 {
        let batch: Vec<_> = (0..20)
            .map(|_| {
                let mut send = send.clone();
                let req = h2_chat(&gw, &[], false);
                tokio::spawn(async move { send.send_request(req).await.unwrap().status() })
            })
            .collect();
        for r in batch {
            assert_eq!(r.await.unwrap(), 200);
        }
    }
    assert!(
        !conn.is_finished(),
        "a client whose streams are answered keeps its connection"
    );

    // Reset: 220 requests whose answers take 2 s, each dropped (RST_STREAM)
    // once the backend has it.
    let (send, conn) = h2_connection(&gw).await;
    let pending: Vec<_> = (0..220)
        .map(|_| {
            let mut send = send.clone();
            let req = h2_chat(&gw, &[("x-mock-latency-ms", "2000")], false);
            tokio::spawn(async move { send.send_request(req).await })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "the backend has the requests",
        || up.stats().snapshot().in_flight >= 200,
    )
    .await;
    for p in pending {
        p.abort();
    }
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the resetting client's connection is closed")
        .unwrap();
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_connections_refused_total",
            r#"reason="http2_resets""#
        ),
        Some(1.0),
        "{m}"
    );
    eventually(
        Duration::from_secs(5),
        "the reset requests are cancelled upstream",
        || up.stats().snapshot().in_flight == 0,
    )
    .await;
}

/// A streaming server sends its head at once and its first token after
/// queueing and prefill: until that first token, the model's `first_byte`
/// applies, not the shorter `idle`. A first token later than `first_byte`
/// ends the stream with the error event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_first_token_gets_first_byte_not_idle() {
    let up = mock("a").await;
    let models = model_toml(
        "m",
        "timeouts = { first_byte = \"1500ms\", idle = \"300ms\" }\nretries = 0",
        &[(up.url(), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let stream = |first_ms: &'static str| {
        let (c, u) = (c.clone(), url(&gw));
        async move {
            let r = c
                .post(
                    &u,
                    Some(KEY_A),
                    &[("x-mock-first-token-ms", first_ms), ("x-mock-tokens", "3")],
                    &chat("m", true),
                )
                .await;
            String::from_utf8_lossy(&r.body).into_owned()
        }
    };
    let slow_first = stream("1000").await;
    assert!(
        slow_first.contains("[DONE]") && !slow_first.contains("upstream_stream_error"),
        "a first token within first_byte is waited for: {slow_first}"
    );
    let t = Instant::now();
    let too_slow = stream("4000").await;
    assert!(too_slow.contains("upstream_stream_error"), "{too_slow}");
    assert!(
        t.elapsed() >= Duration::from_millis(1400) && t.elapsed() < Duration::from_millis(3500),
        "cut at first_byte: {:?}",
        t.elapsed()
    );
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"kind="first_byte_timeout""#),
        "counted as a first-byte timeout: {m}"
    );
}

/// An https backend that accepts the connection but never finishes the TLS
/// handshake fails at `timeouts.connect`, not at `first_byte`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_hangs_fails_at_the_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s); // accepted, never answered
        }
    });
    let models = model_toml(
        "m",
        "timeouts = { connect = \"300ms\", first_byte = \"10s\" }\nretries = 0",
        &[(format!("https://{addr}"), 1, None)],
    );
    let gw = TestGateway::start("", &models).await;
    let t = Instant::now();
    let r = Client::http1()
        .post(&url(&gw), Some(KEY_A), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 504, "{:?}", r.json());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "at the connect timeout, not first_byte: {:?}",
        t.elapsed()
    );
    held.abort();
}

/// An https backend of a private PKI: trusted through its `tls_ca` and only
/// through it, and its answers (read by hyper's client, not the gateway's
/// own HTTP/1.1 one) held to the same rules: a 101 is no answer (502), and
/// a Content-Length beside a chunked body is not passed on to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_with_a_private_ca() {
    let ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let dir = gateway_tests::TempDir::new("private-ca");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let addr = canned_tls_backend(&ca).await;
    let models = |extra: &str| {
        let mut m = model_toml("m", "retries = 0", &[(format!("https://{addr}"), 1, None)]);
        m.push_str(extra);
        m
    };
    let c = Client::http1();
    let ask = |gw: &TestGateway, answer: &'static str| {
        let url = url(gw);
        let c = &c;
        async move {
            collect(
                c.post_raw(
                    &url,
                    Some(KEY_A),
                    &[("x-canned", answer)],
                    Bytes::from(chat("m", false).to_string()),
                )
                .await,
            )
            .await
        }
    };

    // The system's roots do not know the CA.
    let gw = TestGateway::start("", &models("")).await;
    assert_eq!(ask(&gw, "ok").await.status, 502);
    drop(gw);

    let gw = TestGateway::start(
        "",
        &models(&format!("tls_ca = \"{}\"\n", ca_file.display())),
    )
    .await;
    let r = ask(&gw, "ok").await;
    assert_eq!(
        (r.status.as_u16(), r.json()["id"].clone()),
        (200, "canned".into())
    );
    let r = ask(&gw, "101").await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let r = ask(&gw, "both").await;
    assert_eq!(r.status, 200);
    assert_ne!(
        r.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    assert_eq!(r.json()["id"], "canned", "the whole body: {:?}", r.body);
}

/// A TLS server (HTTP/1.1 only) with a certificate for 127.0.0.1 that
/// answers each request by its `x-canned` header: `ok`, `101` (an
/// unasked-for protocol switch), or `both` (Content-Length: 5 beside a
/// chunked body).
async fn canned_tls_backend(cert: &rcgen::CertifiedKey) -> SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = Vec::new();
                let head_end = loop {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let field = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                };
                let len: usize = field("content-length:")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                const BODY: &str = r#"{"id":"canned","object":"chat.completion","choices":[]}"#;
                let answer = match field("x-canned:").as_deref() {
                    Some("101") => {
                        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n"
                            .to_owned()
                    }
                    Some("both") => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{BODY}\r\n0\r\n\r\n",
                        BODY.len()
                    ),
                    _ => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
                        BODY.len()
                    ),
                };
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Connections closed unserved at accept are counted by reason, so an
/// operator can alert on a gateway that is full (`total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_refused_at_accept_are_counted_by_reason() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("max_connections_per_ip = 1\nmax_connections = 2", &models).await;
    let dst: SocketAddr = gw.url.trim_start_matches("http://").parse().unwrap();
    let answers = tokio::task::spawn_blocking(move || {
        // A connection held open from 127.0.0.<from>, and the start of its
        // first answer ("" when it was closed unanswered).
        let open = |from: u8| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, from], 0)).into())
                .unwrap();
            s.connect(&dst.into()).unwrap();
            let mut s: std::net::TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 12];
            let n = s.read(&mut buf).unwrap_or(0);
            (s, String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let (_a, a) = open(41);
        let (_b, b) = open(41); // a second from one client
        let (_c, c) = open(42);
        let (_d, d) = open(43); // a third in all
        [a, b, c, d]
    })
    .await
    .unwrap();
    let ok = |s: &str| s.starts_with("HTTP/1.1 200");
    assert!(ok(&answers[0]) && ok(&answers[2]), "{answers:?}");
    assert_eq!(
        (answers[1].as_str(), answers[3].as_str()),
        ("", ""),
        "{answers:?}"
    );
    let m = gw.metrics().await;
    for reason in ["per_ip", "total"] {
        assert_eq!(
            metric(
                &m,
                "gateway_connections_refused_total",
                &format!(r#"reason="{reason}""#)
            ),
            Some(1.0),
            "{reason}\n{m}"
        );
    }
}

/// `server.keepalive_requests` over HTTP/2: once a connection has opened
/// that many streams it gets a GOAWAY, its streams finish, and it closes;
/// the client goes on over a new connection (which may reach another
/// worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_closes_after_its_share_of_requests() {
    let up = mock("a").await;
    let models = model_toml("m", "", &[(up.url(), 1, None)]);
    let gw = TestGateway::start("keepalive_requests = 3", &models).await;
    let (mut send, conn) = h2_connection(&gw).await;
    for _ in 0..3 {
        let r = send.send_request(h2_chat(&gw, &[], false)).await.unwrap();
        assert_eq!(r.status(), 200);
        http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection is closed after its third stream")
        .unwrap();
    let r = Client::h2c()
        .post(&url(&gw), Some(KEY_A), &[], &chat("m", false))
        .await;
    assert_eq!(r.status, 200);
}
