//! The control plane of a running daemon: hot reload under load, rejected
//! reloads, backend drain, all through the CLI and the admin socket.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use gateway_tests::{
    l7::{chat, eventually, sha256_hex, Client, KEY_A},
    mock::{MockLlm, MockOptions},
    process::Daemon,
};

/// A daemon config with model `m` on backends `a` and `b` (one backend
/// when they are the same: a server is listed once).
fn config(port: u16, a: &str, b: &str, weights: (u32, u32)) -> String {
    let second = if a == b {
        String::new()
    } else {
        format!(
            "[[models.backends]]\nurl = \"{b}\"\nweight = {}\n",
            weights.1
        )
    };
    format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = \"@STATE_DIR@\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [[keys]]\nname = \"team-a\"\nsha256 = \"{key}\"\n\
         [[models]]\nname = \"m\"\n\
         [[models.backends]]\nurl = \"{a}\"\nweight = {}\n{second}",
        weights.0,
        key = sha256_hex(KEY_A),
    )
}

/// Starts a daemon on `body`, off the async runtime (it waits for the
/// daemon to be ready).
async fn start_daemon(body: String) -> Daemon {
    tokio::task::spawn_blocking(move || Daemon::start(None, &body))
        .await
        .unwrap()
        .expect("daemon")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Under systemd (`Type=notify`, dist/gateway.service): the daemon says
/// READY=1 once it serves (so `systemctl start` returns then, and fails for
/// a daemon that exits first), and STOPPING=1 when it starts to drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_tells_systemd_when_it_serves_and_when_it_stops() {
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let dir = gateway_tests::TempDir::new("notify");
    let path = dir.0.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1));
    let env = path.display().to_string();
    let mut gw = tokio::task::spawn_blocking(move || {
        Daemon::start_with_env(None, &body, &[("NOTIFY_SOCKET", &env)])
    })
    .await
    .unwrap()
    .expect("daemon");
    let (gw, said) = tokio::task::spawn_blocking(move || {
        let mut said = Vec::new();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("READY=1 within 10 s");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        gw.terminate();
        let n = sock.recv(&mut buf).expect("STOPPING=1 within 10 s");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        let exit = gw.wait_exit(Duration::from_secs(30));
        (gw, (said, exit))
    })
    .await
    .unwrap();
    let (said, exit) = said;
    assert_eq!(said[0].lines().next(), Some("READY=1"), "{said:?}");
    assert!(said[0].contains("STATUS=serving"), "{said:?}");
    assert_eq!(said[1].lines().next(), Some("STOPPING=1"), "{said:?}");
    // The default drain_timeout (30 s) and 15 s more.
    assert!(said[1].contains("EXTEND_TIMEOUT_USEC=45000000"), "{said:?}");
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_load_fail_no_request() {
    let a = MockLlm::start(MockOptions {
        name: "a".into(),
        tokens: 8,
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let b = MockLlm::start(MockOptions {
        name: "b".into(),
        tokens: 8,
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let body = config(port, &a.url(), &b.url(), (1, 1));
    let gw = start_daemon(body).await;
    let gw = Arc::new(gw);
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");

    // Four clients, streams and plain requests, until told to stop.
    let (ok, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut load = Vec::new();
    for i in 0..4 {
        let (ok, failed, stop, url) = (ok.clone(), failed.clone(), stop.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let c = Client::http1();
            let headers = [("x-mock-interval-ms", "5")];
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .post(&url, Some(KEY_A), &headers, &chat("m", i % 2 == 0))
                    .await;
                let good = r.status == 200 && (i % 2 != 0 || r.body.ends_with(b"data: [DONE]\n\n"));
                if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for n in 0..10u32 {
        let before = ok.load(Ordering::Relaxed);
        let weights = if n % 2 == 0 { (3, 1) } else { (1, 3) };
        let text = std::fs::read_to_string(&gw.config).unwrap();
        let text = rewrite_weights(&text, weights);
        std::fs::write(&gw.config, text).unwrap();
        let g = Arc::clone(&gw);
        let r = tokio::task::spawn_blocking(move || g.cli(&["reload"]))
            .await
            .unwrap();
        assert_eq!(r.code, 0, "reload {n} failed: {}{}", r.stdout, r.stderr);
        eventually(
            Duration::from_secs(5),
            "requests keep completing after a reload",
            || ok.load(Ordering::Relaxed) >= before + 20,
        )
        .await;
    }
    // A broken config is rejected with its problems; the old one serves on.
    let good_config = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, good_config.replace("weight = 3", "weight = 0")).unwrap();
    let g = Arc::clone(&gw);
    let r = tokio::task::spawn_blocking(move || g.cli(&["reload"]))
        .await
        .unwrap();
    assert_eq!(r.code, 2, "a bad config must be rejected: {}", r.stderr);
    assert!(
        r.stderr.contains("models[0].backends["),
        "problems name their TOML path: {}",
        r.stderr
    );
    let before = ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(5),
        "the old config keeps serving",
        || ok.load(Ordering::Relaxed) >= before + 20,
    )
    .await;
    // The CLI still reaches the daemon while the file does not load: it
    // runs on the config it loaded, and the operator is told.
    let g = Arc::clone(&gw);
    let (listed, blocked) = tokio::task::spawn_blocking(move || {
        (
            g.cli(&["backends", "list", "--json"]),
            g.cli(&["block", "add", "192.0.2.77"]),
        )
    })
    .await
    .unwrap();
    for r in [&listed, &blocked] {
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("does not load") && r.stderr.contains("models[0].backends["),
            "{}",
            r.stderr
        );
    }
    assert!(listed.stdout.contains("\"weight\""), "{}", listed.stdout);

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads ({} succeeded)",
        ok.load(Ordering::Relaxed)
    );
    std::fs::write(&gw.config, good_config).unwrap();
}

/// Sets the two backends' weights in a config written by `config`.
fn rewrite_weights(text: &str, (wa, wb): (u32, u32)) -> String {
    let mut n = 0;
    text.lines()
        .map(|l| {
            if l.starts_with("weight = ") {
                n += 1;
                format!("weight = {}", if n == 1 { wa } else { wb })
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_takes_a_backend_out_of_rotation() {
    let a = MockLlm::start(MockOptions {
        name: "a".into(),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let b = MockLlm::start(MockOptions {
        name: "b".into(),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let body = config(port, &a.url(), &b.url(), (1, 1));
    let gw = Arc::new(
        tokio::task::spawn_blocking(move || Daemon::start(None, &body))
            .await
            .unwrap()
            .expect("daemon"),
    );
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let cli = |args: &'static [&'static str]| {
        let g = Arc::clone(&gw);
        tokio::task::spawn_blocking(move || g.cli(args))
    };
    let drain_arg = Box::leak(a.url().into_boxed_str());
    let r = {
        let g = Arc::clone(&gw);
        let url = drain_arg.to_string();
        tokio::task::spawn_blocking(move || g.cli(&["backends", "drain", &url]))
            .await
            .unwrap()
    };
    assert_eq!(r.code, 0, "{}", r.stderr);
    let c = Client::http1();
    for _ in 0..20 {
        let r = c.post(&url, Some(KEY_A), &[], &chat("m", false)).await;
        assert_eq!(
            r.headers["x-mock-name"], "b",
            "a drained backend got a request"
        );
    }
    let list = cli(&["backends", "list", "--json"]).await.unwrap().json();
    let states: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["drained", "active"], "{list}");
    let r = cli(&["backends", "drain", "http://nowhere:1"])
        .await
        .unwrap();
    assert_eq!(r.code, 2, "unknown backend: {}", r.stderr);
    let g = Arc::clone(&gw);
    let url_a = drain_arg.to_string();
    assert_eq!(
        tokio::task::spawn_blocking(move || g.cli(&["backends", "undrain", &url_a]))
            .await
            .unwrap()
            .code,
        0
    );
    let mut saw_a = false;
    for _ in 0..20 {
        saw_a |= c
            .post(&url, Some(KEY_A), &[], &chat("m", false))
            .await
            .headers["x-mock-name"]
            == "a";
    }
    assert!(saw_a, "an undrained backend takes traffic again");

    // A failing backend is ejected after 5 failures in a row (the retries
    // hide them from clients), and the list says so.
    a.set_fail(Some(gateway_tests::mock::Failure::Status(503)));
    for _ in 0..20 {
        let r = c.post(&url, Some(KEY_A), &[], &chat("m", false)).await;
        assert_eq!(r.status, 200, "retried on b");
    }
    let list = cli(&["backends", "list", "--json"]).await.unwrap().json();
    let health: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["health"].as_str().unwrap())
        .collect();
    assert_eq!(health, ["ejected", "healthy"], "{list}");
    let table = cli(&["backends", "list"]).await.unwrap().ok();
    assert!(
        table.contains("HEALTH") && table.contains("ejected"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_xdp_the_daemon_serves_degraded_and_enforces_at_accept() {
    // Native XDP on `lo` is unsupported (and without root nothing loads):
    // either way the daemon must keep serving.
    let port = free_port();
    let body = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = \"@STATE_DIR@\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [xdp]\ninterfaces = [\"lo\"]\nmode = \"driver\"\nprotected_ports = [{port}]\n\
         syn_rate = 5\nsyn_burst = 5\nblock = [\"127.0.0.2/32\"]\npin_dir = \"@PIN_DIR@\"\n"
    );
    let gw = start_daemon(body).await;
    let c = Client::http1();
    let ready = c
        .get(&format!("http://127.0.0.1:{port}/readyz"), None)
        .await;
    assert_eq!(ready.status, 200);
    let degraded = ready.json()["degraded"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        degraded.starts_with("xdp unavailable"),
        "readyz must say why: {}",
        ready.json()
    );
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert_eq!(
        log.matches("degraded mode").count(),
        1,
        "one warning line: {log}"
    );
    // The configured blocklist is enforced at accept: 127.0.0.2 gets no answer.
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let req = "GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let blocked = tokio::task::spawn_blocking(move || {
        gateway_tests::netns::http_status(
            "127.0.0.2".parse().unwrap(),
            dst,
            req,
            Duration::from_secs(1),
        )
    });
    assert_eq!(blocked.await.unwrap(), None, "a blocked source was served");
    // `n` connections in a row from `src`, and how each was answered.
    let burst = move |src: &'static str, n: usize| {
        tokio::task::spawn_blocking(move || {
            (0..n)
                .map(|_| {
                    gateway_tests::netns::http_status(
                        src.parse().unwrap(),
                        dst,
                        req,
                        Duration::from_secs(1),
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    // And the per-source connection rate (burst 5) applies to new connections.
    let statuses = burst("127.0.0.3", 8).await.unwrap();
    assert_eq!(statuses[..5], [Some(200); 5], "{statuses:?}");
    assert!(
        statuses[5..].iter().all(|s| s.is_none()),
        "connections past the burst must be refused: {statuses:?}"
    );
    // `gateway limits` works at accept too: a larger burst for new sources.
    let g = Arc::new(gw);
    let g2 = Arc::clone(&g);
    let (set, shown) = tokio::task::spawn_blocking(move || {
        (
            g2.cli(&["limits", "set", "--syn-burst", "8"]),
            g2.cli(&["limits", "show", "--json"]).json(),
        )
    })
    .await
    .unwrap();
    assert_eq!(set.code, 0, "{}", set.stderr);
    assert_eq!(shown["syn_burst"], 8, "{shown}");
    let first8 = burst("127.0.0.4", 8).await.unwrap();
    assert_eq!(first8, [Some(200); 8], "burst 8 after the change");
    // `gateway stats` still reports, with the L7 half and why XDP is off.
    let stats = tokio::task::spawn_blocking(move || g.cli(&["stats", "--json"]))
        .await
        .unwrap()
        .json();
    assert!(
        stats["xdp"].as_str().unwrap_or("").starts_with("degraded"),
        "{stats}"
    );
    // Health checks are not proxied requests; the summary is there, empty.
    assert!(
        stats["l7"]["requests"].is_object() && stats["l7"]["bans"] == 0,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_streams_then_exits() {
    let up = MockLlm::start(MockOptions {
        name: "a".into(),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1));
    let gw = start_daemon(body).await;
    let stream = open_stream(port, "12").await;
    let reading = tokio::spawn(gateway_tests::l7::collect(stream));
    gw.terminate();
    // New connections are refused once the daemon stops accepting.
    stopped_accepting(port).await;
    // The stream that was open finishes whole.
    let done = reading.await.unwrap();
    let text = String::from_utf8_lossy(&done.body).to_string();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the open stream was cut: {text}"
    );
    let status = exit_status(gw, Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the daemon should exit 0 after draining: {status:?}"
    );
}

/// A stream of `tokens` chunks 100 ms apart through the daemon on `port`,
/// its head received.
async fn open_stream(port: u16, tokens: &str) -> http::Response<hyper::body::Incoming> {
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let headers = [("x-mock-interval-ms", "100"), ("x-mock-tokens", tokens)];
    let stream = Client::http1()
        .post_raw(
            &url,
            Some(KEY_A),
            &headers,
            bytes::Bytes::from(chat("m", true).to_string()),
        )
        .await;
    assert_eq!(stream.status(), 200);
    stream
}

/// Waits (up to 3 s) for a terminated daemon to stop accepting on `port`.
async fn stopped_accepting(port: u16) {
    let addr = format!("127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting 3 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the daemon exited, if it did `within`.
async fn exit_status(mut gw: Daemon, within: Duration) -> Option<std::process::ExitStatus> {
    tokio::task::spawn_blocking(move || gw.wait_exit(within))
        .await
        .unwrap()
}

/// A second SIGTERM ends the drain at once: the daemon exits (cleanly)
/// without waiting for a long stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_drain() {
    drain_cut_short("", 2).await;
}

/// `server.drain_timeout` bounds the drain: a stream longer than it is
/// ended with an error event, and the daemon exits (cleanly) then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_at_drain_timeout() {
    drain_cut_short("drain_timeout = \"500ms\"\n", 1).await;
}

/// Starts a daemon (`server_extra` in its `[server]`) with a 20 s stream
/// open, sends `signals` SIGTERMs, and expects a clean exit within 5 s
/// with the stream cut.
async fn drain_cut_short(server_extra: &str, signals: usize) {
    use http_body_util::BodyExt as _;
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1))
        .replace("[server]\n", &format!("[server]\n{server_extra}"));
    let gw = start_daemon(body).await;
    // 20 s of stream: far past the test's patience.
    let stream = open_stream(port, "200").await;
    let reading =
        tokio::spawn(async move { stream.into_body().collect().await.map(|c| c.to_bytes()) });
    for _ in 0..signals {
        gw.terminate();
        stopped_accepting(port).await;
    }
    let status = exit_status(gw, Duration::from_secs(5)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exits 0 soon after the drain was cut: {status:?}"
    );
    let cut = reading.await.unwrap();
    assert!(
        cut.as_ref()
            .map_or(true, |b| !b.ends_with(b"data: [DONE]\n\n")),
        "the stream was cut, not finished: {cut:?}"
    );
    if signals == 1 {
        // At the drain's end the stream is ended whole, with an error
        // event the client's SDK reads (not a broken body).
        let body = cut.expect("the stream ends cleanly at the drain's end");
        let last = String::from_utf8_lossy(&body);
        let last = last.trim_end().rsplit("\n\n").next().unwrap_or_default();
        assert!(
            last.starts_with("data: {\"error\"") && last.contains("\"gateway_shutdown\""),
            "the stream's last event is the shutdown error: {last}"
        );
    }
}

/// Past `max_connections_per_ip` (per client) or `max_connections` (all
/// clients together) a new connection is closed unanswered; a slot that
/// frees up takes the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_ip_and_in_all_close_the_extra_ones() {
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1)).replace(
        "[server]\n",
        "[server]\nmax_connections_per_ip = 2\nmax_connections = 3\n",
    );
    let gw = start_daemon(body).await;
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let statuses = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        // A connection held open from 127.0.0.<from>, and the start of its
        // first answer.
        let open = |from: u8| {
            let mut s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&std::net::SocketAddr::from(([127, 0, 0, from], 0)).into())
                .unwrap();
            s.connect(&dst.into()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 12];
            let got = s.read(&mut buf).unwrap_or(0);
            (s, std::str::from_utf8(&buf[..got]).unwrap_or("").to_owned())
        };
        let (a, ra) = open(5);
        let (_b, rb) = open(5);
        let (_c, rc) = open(5); // a third from one client
        let (_d, rd) = open(6); // the third in all
        let (_e, re) = open(8); // a fourth in all
        drop(a);
        // The freed slot is seen once the gateway has read the close.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let rf = loop {
            let (_f, rf) = open(8);
            if !rf.is_empty() || std::time::Instant::now() > deadline {
                break rf;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        [ra, rb, rc, rd, re, rf]
    })
    .await
    .unwrap();
    let ok = |s: &str| s.starts_with("HTTP/1.1 200");
    assert!(ok(&statuses[0]) && ok(&statuses[1]), "{statuses:?}");
    assert_eq!(
        statuses[2], "",
        "the third connection from one address must be closed unanswered"
    );
    assert!(
        ok(&statuses[3]),
        "another address is unaffected: {statuses:?}"
    );
    assert_eq!(
        statuses[4], "",
        "a fourth connection in all must be closed unanswered"
    );
    assert!(
        ok(&statuses[5]),
        "a closed connection frees its slot: {statuses:?}"
    );
    drop(gw);
}

/// A reload applies the connection limits (to connections accepted after
/// it) and says which changed settings wait for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_connection_limits_and_names_what_waits_for_a_restart() {
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1))
        .replace("[server]\n", "[server]\nmax_connections_per_ip = 1\n");
    let gw = start_daemon(body).await;
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Connections held open from 127.0.0.7; how each first answered, and
    // how long a silent one took to be closed.
    let probe = move |n: usize| {
        use std::io::{Read as _, Write as _};
        let mut held = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..n {
            let mut s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&std::net::SocketAddr::from(([127, 0, 0, 7], 0)).into())
                .unwrap();
            s.connect(&dst.into()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 12];
            let got = s.read(&mut buf).unwrap_or(0);
            answers.push(std::str::from_utf8(&buf[..got]).unwrap_or("").to_owned());
            held.push(s);
        }
        drop(held);
        let mut silent = std::net::TcpStream::connect(dst).unwrap();
        silent
            .set_read_timeout(Some(Duration::from_millis(2500)))
            .unwrap();
        let start = std::time::Instant::now();
        let closed = matches!(silent.read(&mut [0u8; 1]), Ok(0));
        (answers, closed.then(|| start.elapsed()))
    };
    let (answers, closed) = tokio::task::spawn_blocking(move || probe(2)).await.unwrap();
    assert!(answers[0].starts_with("HTTP/1.1 200"), "{answers:?}");
    assert_eq!(
        answers[1], "",
        "one connection per address before the reload"
    );
    assert_eq!(closed, None, "the 10 s header read timeout applies");

    let text = std::fs::read_to_string(&gw.config).unwrap();
    let changed = text
        .replace(
            "max_connections_per_ip = 1\n",
            "max_connections_per_ip = 3\nheader_read_timeout = \"1s\"\n",
        )
        .replace("state_dir = \"", "state_dir = \"/nonexistent");
    std::fs::write(&gw.config, changed).unwrap();
    let g = Arc::new(gw);
    let g2 = Arc::clone(&g);
    let r = tokio::task::spawn_blocking(move || g2.cli(&["reload"]))
        .await
        .unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("server.state_dir changed: takes effect at the next restart"),
        "{}",
        r.stdout
    );

    let (answers, closed) = tokio::task::spawn_blocking(move || probe(3)).await.unwrap();
    assert!(
        answers.iter().all(|a| a.starts_with("HTTP/1.1 200")),
        "three connections per address after the reload: {answers:?}"
    );
    let closed = closed.expect("a silent connection is closed after the new 1 s timeout");
    assert!(
        closed >= Duration::from_millis(800) && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
    std::fs::write(&g.config, text).unwrap();
}

/// A ban the state file could not take (a full disk) stays in force: a
/// reload, which applies what the file lists, does not lift it, and it is
/// written to the file once the file can be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_that_could_not_be_saved_survives_a_reload_and_is_saved_later() {
    crate::require_root!();
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1)).replace(
        "[metrics]",
        "[abuse]\nauth_failures = { max = 2, window = \"1m\", ban = \"10m\" }\n[metrics]",
    );
    let gw = start_daemon(body).await;
    let g = Arc::new(gw);
    let state = g.config.parent().unwrap().join("state");
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let get = move |key: &str| {
        let req = format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        gateway_tests::netns::http_status(
            "127.0.0.31".parse().unwrap(),
            dst,
            &req,
            Duration::from_secs(1),
        )
    };
    // The state file and its lock exist; then no file can be made beside
    // them, so the next state write fails.
    let g2 = Arc::clone(&g);
    let r = tokio::task::spawn_blocking(move || g2.cli(&["block", "add", "192.0.2.99"]))
        .await
        .unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let Some(frozen) = gateway_tests::Immutable::try_new(&state, module_path!()) else {
        return;
    };
    let banned = tokio::task::spawn_blocking(move || {
        let bad = [get("sk-wrong"), get("sk-wrong")];
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while get(KEY_A).is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        (bad, get(KEY_A))
    })
    .await
    .unwrap();
    assert_eq!(banned, ([Some(401), Some(401)], None), "banned at accept");
    let listed = std::fs::read_to_string(state.join("xdp-state.json")).unwrap();
    assert!(
        !listed.contains("auth_failures"),
        "the write failed: {listed}"
    );

    let g2 = Arc::clone(&g);
    let r = tokio::task::spawn_blocking(move || g2.cli(&["reload"]))
        .await
        .unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let after_reload = tokio::task::spawn_blocking(move || get(KEY_A))
        .await
        .unwrap();
    assert_eq!(after_reload, None, "the reload kept the unsaved ban");

    drop(frozen);
    eventually(
        Duration::from_secs(5),
        "the ban is written to the state file",
        || {
            std::fs::read_to_string(state.join("xdp-state.json"))
                .is_ok_and(|s| s.contains("auth_failures") && s.contains("127.0.0.31"))
        },
    )
    .await;
}

/// With `xdp.enabled = false` there is no kernel program, and bans are
/// enforced at accept: also after a restart (they are persisted), while the
/// SYN limits, which the operator chose to go without, are not. `gateway
/// block` works the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_xdp_bans_hold_at_accept_across_a_restart() {
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1)).replace(
        "[metrics]",
        "[abuse]\nauth_failures = { max = 2, window = \"1m\", ban = \"10m\" }\n[metrics]",
    );
    let mut gw = start_daemon(body).await;
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let get = move |src: &str, key: &str| {
        let req = format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        gateway_tests::netns::http_status(src.parse().unwrap(), dst, &req, Duration::from_secs(1))
    };
    let keyless = tokio::task::spawn_blocking(move || {
        // No key at all (a probe, a browser's preflight) is no wrong key.
        let none: Vec<_> = (0..3).map(|_| get("127.0.0.24", "")).collect();
        std::thread::sleep(Duration::from_millis(300));
        (none, get("127.0.0.24", KEY_A))
    })
    .await
    .unwrap();
    assert_eq!(keyless, (vec![Some(401); 3], Some(200)), "not banned");
    let statuses = tokio::task::spawn_blocking(move || {
        let bad = [get("127.0.0.21", "sk-wrong"), get("127.0.0.21", "sk-wrong")];
        // The ban is applied by the daemon right after the second failure.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while get("127.0.0.21", KEY_A).is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        (bad, get("127.0.0.21", KEY_A))
    })
    .await
    .unwrap();
    assert_eq!(statuses, ([Some(401), Some(401)], None), "banned at accept");

    let gw = tokio::task::spawn_blocking(move || {
        gw.stop_process();
        gw.respawn().expect("restarting");
        gw
    })
    .await
    .unwrap();
    let after = tokio::task::spawn_blocking(move || {
        (
            get("127.0.0.21", KEY_A),
            // Many connections from one source: no SYN limit at accept.
            (0..50)
                .map(|_| get("127.0.0.22", KEY_A))
                .filter(|s| *s == Some(200))
                .count(),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        after,
        (None, 50),
        "the ban survived the restart; others pass"
    );

    // The CLI's lists work without a kernel program too: at accept.
    let g = Arc::new(gw);
    let cli = |args: &'static [&'static str]| {
        let g = Arc::clone(&g);
        tokio::task::spawn_blocking(move || g.cli(args))
    };
    let r = cli(&["block", "add", "127.0.0.23"]).await.unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let listed = cli(&["block", "list", "--json"]).await.unwrap().json();
    let cidrs: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["cidr"].as_str())
        .collect();
    assert!(cidrs.contains(&"127.0.0.23/32"), "{listed}");
    let blocked = tokio::task::spawn_blocking(move || get("127.0.0.23", KEY_A))
        .await
        .unwrap();
    assert_eq!(blocked, None, "blocked at accept");
    let r = cli(&["block", "del", "127.0.0.23"]).await.unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = cli(&["limits", "set", "--syn-rate", "5"]).await.unwrap();
    assert!(
        r.code == 2 && r.stderr.contains("xdp.enabled is false"),
        "{}",
        r.stderr
    );
    let r = cli(&["top"]).await.unwrap();
    assert!(
        r.code == 1 && r.stderr.contains("runs without an XDP program"),
        "{}",
        r.stderr
    );
    let served = tokio::task::spawn_blocking(move || get("127.0.0.23", KEY_A))
        .await
        .unwrap();
    assert_eq!(served, Some(200), "unblocked");
}

/// A drain is persisted: it holds across a reload that rebuilds the backend
/// (new weight) and across a restart, until undrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_survives_reloads_and_restarts() {
    let (a, b) = (
        MockLlm::start(MockOptions::default()).await.unwrap(),
        MockLlm::start(MockOptions::default()).await.unwrap(),
    );
    let port = free_port();
    let body = config(port, &a.url(), &b.url(), (1, 1));
    let a_url = a.url();
    let states = tokio::task::spawn_blocking(move || {
        let mut gw = Daemon::start(None, &body).expect("daemon");
        let states = |gw: &Daemon| -> Vec<String> {
            let list = gw.cli(&["backends", "list", "--json"]).json();
            list.as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r["url"].as_str().unwrap(),
                        r["state"].as_str().unwrap()
                    )
                })
                .collect()
        };
        let mut seen = Vec::new();
        gw.cli(&["backends", "drain", &a_url]).ok();
        let text = std::fs::read_to_string(&gw.config).unwrap();
        std::fs::write(&gw.config, rewrite_weights(&text, (3, 1))).unwrap();
        gw.cli(&["reload"]).ok();
        seen.push(states(&gw));
        gw.stop_process();
        gw.respawn().expect("restarting");
        seen.push(states(&gw));
        gw.cli(&["backends", "undrain", &a_url]).ok();
        gw.stop_process();
        gw.respawn().expect("restarting");
        seen.push(states(&gw));
        seen
    })
    .await
    .unwrap();
    let (a_url, b_url) = (a.url(), b.url());
    let drained = vec![format!("{a_url} drained"), format!("{b_url} active")];
    let active = vec![format!("{a_url} active"), format!("{b_url} active")];
    assert_eq!(states, [drained.clone(), drained, active]);
}

/// A state file that cannot be read costs a ban its persistence, not its
/// enforcement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_holds_when_the_state_file_is_unreadable() {
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1)).replace(
        "[metrics]",
        "[abuse]\nauth_failures = { max = 2, window = \"1m\", ban = \"10m\" }\n[metrics]",
    );
    let gw = start_daemon(body).await;
    let state = gw.config.parent().unwrap().join("state/xdp-state.json");
    std::fs::create_dir_all(state.parent().unwrap()).unwrap();
    std::fs::write(&state, "{ not json").unwrap();
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let get = move |key: &str| {
        let req = format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        gateway_tests::netns::http_status(
            "127.0.0.31".parse().unwrap(),
            dst,
            &req,
            Duration::from_secs(1),
        )
    };
    let (bad, after) = tokio::task::spawn_blocking(move || {
        let bad = [get("sk-wrong"), get("sk-wrong")];
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while get(KEY_A).is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        (bad, get(KEY_A))
    })
    .await
    .unwrap();
    assert_eq!((bad, after), ([Some(401), Some(401)], None));
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(log.contains("not persisted"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{ not json",
        "the unreadable file is left as it was"
    );
}

/// A storm of bans from many sources at once: every one is enforced and
/// persisted (they are applied in batches, one state write per batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_bans_is_applied_in_full() {
    const N: usize = 300;
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1)).replace(
        "[metrics]",
        "[abuse]\nauth_failures = { max = 1, window = \"1m\", ban = \"10m\" }\n[metrics]",
    );
    let gw = start_daemon(body).await;
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let src = |i: usize| format!("127.2.{}.{}", i / 250, i % 250 + 1);
    let get = move |src: String, key: &str| {
        let req = format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        gateway_tests::netns::http_status(src.parse().unwrap(), dst, &req, Duration::from_secs(1))
    };
    let g = Arc::new(gw);
    let g2 = Arc::clone(&g);
    let (refused, persisted) = tokio::task::spawn_blocking(move || {
        for i in 0..N {
            assert_eq!(get(src(i), "sk-wrong"), Some(401));
        }
        let state = g2.config.parent().unwrap().join("state/xdp-state.json");
        let persisted = || -> usize {
            std::fs::read_to_string(&state)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .map_or(0, |v| v["block"].as_array().map_or(0, |a| a.len()))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while persisted() < N && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let refused = (0..N).filter(|i| get(src(*i), KEY_A).is_none()).count();
        (refused, persisted())
    })
    .await
    .unwrap();
    assert_eq!((refused, persisted), (N, N));
}

/// A certificate renewed in place (certbot, an ACME client) is served to
/// new connections after a reload; a pair that does not load rejects the
/// reload and the running certificate keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_renewed_certificate() {
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    let dir = gateway_tests::TempDir::new("tls-reload");
    let (crt, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let issue = || {
        let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        std::fs::write(&crt, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
        c.cert.der().to_vec()
    };
    let old = issue();
    let port = free_port();
    let body = config(port, &up.url(), &up.url(), (1, 1)).replace(
        "state_dir = ",
        &format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}\nstate_dir = ",
            crt.display(),
            key.display()
        ),
    );
    let gw = start_daemon(body).await;
    let gw = Arc::new(gw);
    let url = format!("https://127.0.0.1:{port}/healthz");
    // A fresh client per check: a new connection, a new handshake.
    let status = |ca: Vec<u8>| {
        let url = url.clone();
        async move { Client::tls(&ca).try_status(&url).await }
    };
    assert_eq!(status(old.clone()).await, Ok(http::StatusCode::OK));
    let renewed = issue();
    let g = Arc::clone(&gw);
    let r = tokio::task::spawn_blocking(move || g.cli(&["reload"]))
        .await
        .unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("TLS certificate reloaded"),
        "{}",
        r.stdout
    );
    assert_eq!(status(renewed.clone()).await, Ok(http::StatusCode::OK));
    assert!(
        status(old).await.is_err(),
        "the replaced certificate is no longer served"
    );
    // A half-written renewal: rejected, the certificate loaded stays.
    std::fs::write(&crt, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    let g = Arc::clone(&gw);
    let r = tokio::task::spawn_blocking(move || g.cli(&["reload"]))
        .await
        .unwrap();
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("server.tls.cert"), "{}", r.stderr);
    assert_eq!(status(renewed).await, Ok(http::StatusCode::OK));
    // An expired pair (a renewal that copied the old files back): loaded,
    // as nginx would, and the answer and `check` say what clients will
    // make of it.
    let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.not_before = rcgen::date_time_ymd(2019, 1, 1);
    p.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let k = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&crt, p.self_signed(&k).unwrap().pem()).unwrap();
    std::fs::write(&key, k.serialize_pem()).unwrap();
    for verb in ["reload", "check"] {
        let g = Arc::clone(&gw);
        let r = tokio::task::spawn_blocking(move || g.cli(&[verb]))
            .await
            .unwrap();
        assert_eq!(r.code, 0, "{verb}: {}{}", r.stdout, r.stderr);
        let said = format!("{}{}", r.stdout, r.stderr);
        assert!(
            said.contains("expired") && said.contains("Wed, 01 Jan 2020 00:00:00 GMT"),
            "{verb}: {said}"
        );
    }
}

/// The access log: one line per answered request in the daemon's log (its
/// stderr), with the request's id, key, model, status and tokens, as text
/// without colour codes in a file, or as JSON; `GATEWAY_LOG=warn` turns it
/// off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_writes_one_access_line_per_request() {
    let up = MockLlm::start(MockOptions::default()).await.unwrap();
    for (level, format, lines) in [
        ("info", "text", 3),
        ("info", "json", 3),
        ("warn", "text", 0),
    ] {
        let port = free_port();
        let body = config(port, &up.url(), &up.url(), (1, 1));
        let env = [("GATEWAY_LOG", level), ("GATEWAY_LOG_FORMAT", format)];
        let gw = tokio::task::spawn_blocking(move || Daemon::start_with_env(None, &body, &env))
            .await
            .unwrap()
            .expect("daemon");
        let c = Client::http1();
        let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = c.post(&url, Some(KEY_A), &[], &chat("m", false)).await;
            assert_eq!(r.status, 200);
            ids.push(r.headers["x-request-id"].to_str().unwrap().to_owned());
        }
        // Once the daemon has drained and exited, every line is written
        // (and the lines that must not be are not).
        let (gw, exit) = tokio::task::spawn_blocking(move || {
            let mut gw = gw;
            gw.terminate();
            let exit = gw.wait_exit(Duration::from_secs(30));
            (gw, exit)
        })
        .await
        .unwrap();
        assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
        let log = std::fs::read_to_string(&gw.log).unwrap();
        let got: Vec<&str> = log
            .lines()
            .filter(|l| match format {
                "json" => l.contains(r#""target":"access""#),
                _ => l.contains(" INFO access: "),
            })
            .collect();
        assert_eq!(got.len(), lines, "{log}");
        for (line, id) in got.iter().zip(&ids) {
            if format == "json" {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["request_id"], id.as_str(), "{line}");
                assert_eq!(
                    (
                        &v["key"],
                        &v["model"],
                        &v["status"],
                        &v["completion_tokens"]
                    ),
                    (&"team-a".into(), &"m".into(), &200.into(), &16.into()),
                    "{line}"
                );
                continue;
            }
            for want in [
                format!(" request_id={id} "),
                " client=127.0.0.1 method=POST path=/v1/chat/completions ".into(),
                " key=\"team-a\" model=\"m\" ".into(),
                " status=200 stream=false ".into(),
                " completion_tokens=16 attempts=1 outcome=\"ok\"".into(),
            ] {
                assert!(line.contains(&want), "{want:?} not in {line}");
            }
        }
        assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    }
}
