//! Balancing policies, canary splits and A/B groups through a running
//! gateway: what share each backend gets, what sticks, what the client
//! and the metrics are told, and what a reload changes.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use gateway::{config::Config, pipeline::routes::Routes};
use gateway_tests::{
    l7::{chat, collect, metric, Client, TestGateway, KEY_A},
    mock::{MockLlm, MockOptions},
};

async fn mock(name: &str) -> MockLlm {
    MockLlm::start(MockOptions {
        name: name.into(),
        tokens: 2,
        ..MockOptions::default()
    })
    .await
    .unwrap()
}

fn model(extra: &str, backends: &[(&MockLlm, u32, &str)]) -> String {
    let mut s = format!("[[models]]\nname = \"m\"\n{extra}\n");
    for (m, w, group) in backends {
        s.push_str(&format!(
            "[[models.backends]]\nurl = \"{}\"\nweight = {w}\n",
            m.url()
        ));
        if !group.is_empty() {
            s.push_str(&format!("group = \"{group}\"\n"));
        }
    }
    s
}

/// Sends `n` requests one after another; counts answers per mock name.
async fn spread(gw: &TestGateway, n: usize, headers: &[(&str, &str)]) -> (usize, usize) {
    let c = Client::http1();
    let url = format!("{}/v1/chat/completions", gw.url);
    let (mut a, mut b) = (0, 0);
    for _ in 0..n {
        let r = c.post(&url, Some(KEY_A), headers, &chat("m", false)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        match r.headers["x-mock-name"].to_str().unwrap() {
            "a" => a += 1,
            _ => b += 1,
        }
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_spreads_as_documented() {
    let a = mock("a").await;
    let b = mock("b").await;
    // (policy, expected share of a with weights 3:1, tolerance)
    let cases = [
        ("weighted_least_connections", 0.75, 0.02),
        ("weighted_round_robin", 0.75, 0.02),
        ("round_robin", 0.5, 0.02),
        ("random", 0.75, 0.08),
        ("power_of_two", 0.75, 0.08),
    ];
    for (policy, share, tol) in cases {
        let gw = TestGateway::start(
            "",
            &model(
                &format!("balance = \"{policy}\""),
                &[(&a, 3, ""), (&b, 1, "")],
            ),
        )
        .await;
        let (na, nb) = spread(&gw, 400, &[]).await;
        let got = na as f64 / (na + nb) as f64;
        assert!(
            (got - share).abs() <= tol,
            "{policy}: a got {got:.3} of the requests, want {share} +- {tol}"
        );
        let m = gw.metrics().await;
        let per = metric(
            &m,
            "gateway_backend_requests_total",
            &format!(r#"backend="{}",model="m""#, a.url()),
        );
        assert_eq!(per, Some(na as f64), "{policy}: per-backend metric");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_session_on_one_backend() {
    let a = mock("a").await;
    let b = mock("b").await;
    let gw = TestGateway::start(
        "",
        &model(
            "balance = \"consistent_hash\"\nhash_on = \"header:x-session-id\"",
            &[(&a, 1, ""), (&b, 1, "")],
        ),
    )
    .await;
    let c = Client::http1();
    let url = format!("{}/v1/chat/completions", gw.url);
    let mut on_a = 0;
    for s in 0..60 {
        let session = format!("session-{s}");
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = c
                .post(
                    &url,
                    Some(KEY_A),
                    &[("x-session-id", &session)],
                    &chat("m", false),
                )
                .await;
            seen.push(r.headers["x-mock-name"].to_str().unwrap().to_owned());
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{session}: {seen:?}");
        on_a += (seen[0] == "a") as usize;
    }
    assert!(
        (15..=45).contains(&on_a),
        "sessions spread over both: {on_a} of 60 on a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_policy_avoids_a_slow_backend_and_returns_to_it() {
    let a = mock("a").await;
    let b = mock("b").await;
    b.set_latency(Duration::from_millis(40));
    let gw = TestGateway::start(
        "",
        &model("balance = \"latency\"", &[(&a, 1, ""), (&b, 1, "")]),
    )
    .await;
    // Within 20 requests both are measured; after that b gets little.
    spread(&gw, 20, &[]).await;
    let (_, slow) = spread(&gw, 200, &[]).await;
    assert!(slow < 30, "the slow backend got {slow} of 200");
    b.set_latency(Duration::ZERO);
    // Its exploration share measures it again; then it shares evenly. How
    // soon depends on both latencies' averages, which a loaded machine
    // blurs: a window of 200 must see it back within 2,000 requests.
    spread(&gw, 300, &[]).await;
    let mut windows = Vec::new();
    for _ in 0..10 {
        let (_, recovered) = spread(&gw, 200, &[]).await;
        windows.push(recovered);
        if recovered > 60 {
            break;
        }
    }
    assert!(
        windows.last().is_some_and(|r| *r > 60),
        "the recovered backend's share of each 200: {windows:?}"
    );
}

/// Streaming servers send the head before they schedule the request, so
/// the latency policy weighs a backend by its streams' first token: one
/// whose first tokens come late gets little, though its heads come at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_policy_weighs_streams_by_their_first_token() {
    let a = mock("a").await;
    let b = mock("b").await;
    b.set_first_token(Duration::from_millis(300));
    let gw = TestGateway::start(
        "",
        &model("balance = \"latency\"", &[(&a, 1, ""), (&b, 1, "")]),
    )
    .await;
    let c = Client::http1();
    let url = format!("{}/v1/chat/completions", gw.url);
    let mut on_b = 0;
    for i in 0..120 {
        let r = c
            .post(
                &url,
                Some(KEY_A),
                &[("x-mock-tokens", "2")],
                &chat("m", true),
            )
            .await;
        assert_eq!(r.status, 200);
        if i >= 20 && r.headers["x-mock-name"] == "b" {
            on_b += 1;
        }
    }
    assert!(on_b < 25, "the late-first-token backend got {on_b} of 100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_is_sticky_per_user_and_ab_header_picks_the_group() {
    let stable = mock("a").await;
    let canary = mock("b").await;
    let gw = TestGateway::start(
        "",
        &model(
            "groups = { stable = 80, canary = 20 }\nhash_on = \"header:x-user\"\ngroup_header = \"x-test-group\"",
            &[(&stable, 1, "stable"), (&canary, 1, "canary")],
        ),
    )
    .await;
    let c = Client::http1();
    let url = format!("{}/v1/chat/completions", gw.url);
    let mut canaries = 0;
    for u in 0..200 {
        let user = format!("user-{u}");
        let mut groups = Vec::new();
        for _ in 0..2 {
            let r = c
                .post(&url, Some(KEY_A), &[("x-user", &user)], &chat("m", false))
                .await;
            let g = r.headers["x-gateway-group"].to_str().unwrap().to_owned();
            let served_by = r.headers["x-mock-name"].to_str().unwrap();
            assert_eq!(served_by, if g == "canary" { "b" } else { "a" });
            groups.push(g);
        }
        assert_eq!(groups[0], groups[1], "{user} flipped between versions");
        canaries += (groups[0] == "canary") as usize;
    }
    assert!(
        (20..=60).contains(&canaries),
        "about 20% on the canary: {canaries} of 200"
    );
    // A/B: the header decides, for everyone.
    for u in 0..20 {
        let user = format!("user-{u}");
        let r = c
            .post(
                &url,
                Some(KEY_A),
                &[("x-user", &user), ("x-test-group", "canary")],
                &chat("m", false),
            )
            .await;
        assert_eq!(r.headers["x-gateway-group"], "canary");
        assert_eq!(r.headers["x-mock-name"], "b");
    }
    let m = gw.metrics().await;
    let count = |g: &str| {
        metric(
            &m,
            "gateway_group_requests_total",
            &format!(r#"code="200",group="{g}",model="m""#),
        )
        .unwrap_or(0.0) as usize
    };
    assert_eq!(count("canary"), canaries * 2 + 20, "{m}");
    assert_eq!(count("stable"), (200 - canaries) * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_applies_to_new_requests_only() {
    let a = mock("a").await;
    let b = mock("b").await;
    let text = |wa: u32, wb: u32| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[keys]]\nname = \"team-a\"\nsha256 = \"{}\"\n{}",
            gateway_tests::l7::sha256_hex(KEY_A),
            model(
                "balance = \"weighted_round_robin\"",
                &[(&a, wa, ""), (&b, wb, "")]
            )
        )
    };
    let gw = TestGateway::start(
        "",
        &model(
            "balance = \"weighted_round_robin\"",
            &[(&a, 1, ""), (&b, 1, "")],
        ),
    )
    .await;
    let (na, nb) = spread(&gw, 100, &[]).await;
    assert_eq!((na, nb), (50, 50));
    // A stream is open on one backend while the weights change.
    let c = Client::http1();
    let url = format!("{}/v1/chat/completions", gw.url);
    let open = c
        .post_raw(
            &url,
            Some(KEY_A),
            &[("x-mock-interval-ms", "30"), ("x-mock-tokens", "10")],
            Bytes::from(chat("m", true).to_string()),
        )
        .await;
    let shared = &gw.gw.as_ref().unwrap().shared;
    let cfg = Config::parse(&text(4, 1)).unwrap();
    let old = shared.routes.load_full();
    shared
        .routes
        .store(Arc::new(Routes::reload(&cfg, Some(&old))));
    let (na, nb) = spread(&gw, 100, &[]).await;
    assert_eq!((na, nb), (80, 20), "new requests follow the new weights");
    let done = collect(open).await;
    assert!(
        String::from_utf8_lossy(&done.body).contains("[DONE]"),
        "the open stream finished undisturbed"
    );
}

/// A model that cannot take a request sends it on to its `fallbacks`, in
/// order, skipping those the key may not use: when its backends are down
/// (connect refused) or refuse it (503). The client is told which model
/// served it (`x-gateway-fallback`), the backend gets that model's name,
/// and the tokens count for it. A timeout is not fallen back from: the
/// backend may still be generating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_models_take_what_a_model_cannot() {
    use gateway_tests::l7::{model_toml, KEY_B};
    let small = mock("small").await;
    let other = mock("other").await;
    let refusing = mock("refusing").await;
    refusing.set_fail(Some(gateway_tests::mock::Failure::Status(503)));
    let slow = mock("slow").await;
    slow.set_latency(Duration::from_secs(2));
    let down = "http://127.0.0.1:1".to_owned();
    let (_hole, _fillers, hole) = crate::resilience::blackhole();
    let failing = mock("failing").await;
    failing.set_fail(Some(gateway_tests::mock::Failure::Status(500)));
    let fallbacks = "retries = 0\nfallbacks = [\"small-alias\", \"other-small\"]";
    let models = [
        model_toml("other-big", fallbacks, &[(down.clone(), 1, None)]),
        // A host that does not answer SYNs: the connect timeout.
        model_toml(
            "holed",
            "retries = 0\ntimeouts = { connect = \"200ms\" }\nfallbacks = [\"small\"]",
            &[(format!("http://{hole}"), 1, None)],
        ),
        // Its only backend is ejected after one failure.
        model_toml(
            "ejected",
            "retries = 0\noutlier = { consecutive_failures = 1, ejection = \"60s\" }\nfallbacks = [\"small\"]",
            &[(failing.url(), 1, None)],
        ),
        // The fallback's own retry: the refusing backend first (its
        // weight), then the other.
        model_toml("first-down", "retries = 0\nfallbacks = [\"two\"]", &[(down.clone(), 1, None)]),
        model_toml(
            "two",
            "retries = 1\nbalance = \"weighted_round_robin\"",
            &[(refusing.url(), 100, None), (small.url(), 1, None)],
        ),
        model_toml("refused", fallbacks, &[(refusing.url(), 1, None)]),
        model_toml(
            "slow",
            "retries = 0\ntimeouts = { first_byte = \"300ms\" }\nfallbacks = [\"small\"]",
            &[(slow.url(), 1, None)],
        ),
        model_toml(
            "small",
            "aliases = [\"small-alias\"]",
            &[(small.url(), 1, None)],
        ),
        model_toml("other-small", "", &[(other.url(), 1, None)]),
        model_toml("lonely", "retries = 0", &[(down, 1, None)]),
    ]
    .concat();
    let gw = TestGateway::start("", &models).await;
    let c = Client::http1();
    let ask = |key: &'static str, model: &'static str| {
        let c = &c;
        let url = format!("{}/v1/chat/completions", gw.url);
        async move { c.post(&url, Some(key), &[], &chat(model, false)).await }
    };
    let served = |r: &gateway_tests::l7::Collected| {
        r.headers
            .get("x-gateway-fallback")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    // Down: team-a goes to the first fallback; team-b, which may use only
    // `other-*`, to the second.
    let r = ask(KEY_A, "other-big").await;
    assert_eq!((r.status.as_u16(), served(&r)), (200, Some("small".into())));
    let r = ask(KEY_B, "other-big").await;
    assert_eq!(
        (r.status.as_u16(), served(&r)),
        (200, Some("other-small".into()))
    );
    // Refused with 503.
    let r = ask(KEY_A, "refused").await;
    assert_eq!((r.status.as_u16(), served(&r)), (200, Some("small".into())));
    // What the backends were asked for: the serving model's own name.
    let sent = small.requests();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|q| q.body["model"] == "small"), "{sent:?}");
    assert_eq!(other.requests()[0].body["model"], "other-small");
    // A timeout is no refusal: 504, and no second generation elsewhere.
    let r = ask(KEY_A, "slow").await;
    assert_eq!((r.status.as_u16(), served(&r)), (504, None));
    assert_eq!(small.requests().len(), 2);
    // No fallbacks: the model's own error.
    let r = ask(KEY_A, "lonely").await;
    assert_eq!((r.status.as_u16(), served(&r)), (502, None));
    // A connect timeout: the request never reached the backend.
    let r = ask(KEY_A, "holed").await;
    assert_eq!((r.status.as_u16(), served(&r)), (200, Some("small".into())));
    // A 500 is the backend's answer (no fallback); then, with its only
    // backend ejected, the fallback comes before panic mode would send
    // the request to the ejected one again.
    let r = ask(KEY_A, "ejected").await;
    assert_eq!((r.status.as_u16(), served(&r)), (500, None));
    let r = ask(KEY_A, "ejected").await;
    assert_eq!((r.status.as_u16(), served(&r)), (200, Some("small".into())));
    // The fallback retries as its own `retries` allow.
    let r = ask(KEY_A, "first-down").await;
    assert_eq!((r.status.as_u16(), served(&r)), (200, Some("two".into())));

    let m = gw.metrics().await;
    let fell = |from: &str, to: &str| {
        metric(
            &m,
            "gateway_fallbacks_total",
            &format!("fallback=\"{to}\",model=\"{from}\""),
        )
    };
    assert_eq!(fell("other-big", "small"), Some(1.0), "{m}");
    assert_eq!(fell("other-big", "other-small"), Some(1.0), "{m}");
    assert_eq!(fell("refused", "small"), Some(1.0), "{m}");
    assert_eq!(fell("slow", "small"), None, "{m}");
    assert_eq!(
        metric(
            &m,
            "gateway_http_requests_total",
            "code=\"200\",key=\"team-a\",model=\"small\""
        ),
        Some(4.0),
        "counted for the model that served them (other-big, refused, holed, ejected): {m}"
    );
}
