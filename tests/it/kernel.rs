//! The XDP program on a real interface: a veth pair between two namespaces
//! the test creates, real TCP connects, raw floods, and the CLI against the
//! running program.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gateway_common::packet::{craft::Frame, TCP_SYN};
use gateway_tests::{netns::Topology, process::Daemon};

use crate::require_root;

const PORT: u16 = 8443;
const CONNECT: Duration = Duration::from_millis(700);

fn config(t: &Topology, syn_rate: u32, syn_burst: u32) -> String {
    format!(
        r#"
[server]
# The proxy itself is not under test here; the test's own listener holds
# the protected port.
listen = ["127.0.0.1:0"]
state_dir = "@STATE_DIR@"
[metrics]
listen = "127.0.0.1:0"
[xdp]
interfaces = ["{iface}"]
mode = "auto"
protected_ports = [{PORT}]
syn_rate = {syn_rate}
syn_burst = {syn_burst}
global_syn_rate = 0
pin_dir = "@PIN_DIR@"
"#,
        iface = t.server_if
    )
}

fn start(t: &Topology, syn_rate: u32, syn_burst: u32) -> Daemon {
    Daemon::start(Some(&t.server.path()), &config(t, syn_rate, syn_burst))
        .expect("starting the gateway")
}

#[test]
fn block_add_and_del_take_effect_immediately_v4_and_v6() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let v6 = SocketAddr::new(t.server_v6(), PORT);
    let _l4 = t.listen(v4);
    let _l6 = t.listen(v6);
    let gw = start(&t, 1000, 1000);
    let stats = gw.cli(&["stats", "--json"]).json();
    let mode = stats["attached"]["interfaces"][0]["mode"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        mode == "driver" || mode == "skb",
        "attach mode reported: {stats}"
    );
    assert_eq!(
        stats["xdp"], "attached",
        "the daemon adds its state: {stats}"
    );
    assert!(
        stats["l7"]["open_connections"].is_number(),
        "and the L7 summary: {stats}"
    );

    let (good, bad) = (t.client_v4(2), t.client_v4(3));
    let (good6, bad6) = (t.client_v6(2), t.client_v6(3));
    assert!(
        t.connect(bad, v4, CONNECT),
        "baseline connect from {bad} failed"
    );
    assert!(
        t.connect(bad6, v6, CONNECT),
        "baseline connect from {bad6} failed"
    );

    gw.cli(&["block", "add", &bad.to_string(), "--comment", "it"])
        .ok();
    gw.cli(&["block", "add", &format!("{bad6}/128")]).ok();
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} is blocked but connected"
    );
    assert!(
        !t.connect(bad6, v6, CONNECT),
        "{bad6} is blocked but connected"
    );
    assert!(
        t.connect(good, v4, CONNECT),
        "{good} is not blocked but could not connect"
    );
    assert!(
        t.connect(good6, v6, CONNECT),
        "{good6} is not blocked but could not connect"
    );

    let row = gw.block_entry(&format!("{bad}/32")).expect("entry listed");
    assert_eq!(row["comment"], "it");
    assert!(
        row["hits"].as_u64().unwrap() >= 1,
        "the drop was counted on the entry: {row}"
    );

    gw.cli(&["block", "del", &bad.to_string()]).ok();
    gw.cli(&["block", "del", &format!("{bad6}/128")]).ok();
    assert!(
        t.connect(bad, v4, CONNECT),
        "{bad} still cannot connect after block del"
    );
    assert!(
        t.connect(bad6, v6, CONNECT),
        "{bad6} still cannot connect after block del"
    );
}

/// The packaged unit runs the daemon as an unprivileged user with CAP_BPF,
/// CAP_PERFMON, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE only. It attaches
/// (no degraded mode), and the CLI's commands, which the daemon runs for
/// it, find the program without CAP_SYS_ADMIN (which listing the kernel's
/// programs takes), also after a restart on the same pins.
#[test]
fn the_units_user_and_capabilities_run_the_kernel_path() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let _l4 = t.listen(v4);
    let mut gw = Daemon::start_as_service(Some(&t.server.path()), &config(&t, 1000, 1000))
        .expect("starting the gateway as the service user");
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(!log.contains("degraded"), "{log}");
    let stats = gw.cli(&["stats", "--json"]).json();
    assert_eq!(stats["xdp"], "attached", "{stats}");
    let bad = t.client_v4(3);
    assert!(t.connect(bad, v4, CONNECT), "baseline connect from {bad}");
    gw.cli(&["block", "add", &bad.to_string()]).ok();
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} is blocked but connected"
    );
    gw.stop_process();
    gw.respawn().expect("restarting as the service user");
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(!log.contains("degraded"), "{log}");
    assert_eq!(gw.block_cidrs(), [format!("{bad}/32")]);
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} is blocked after the restart"
    );
    gw.cli(&["block", "del", &bad.to_string()]).ok();
    assert!(t.connect(bad, v4, CONNECT), "{bad} connects once unblocked");
}

#[test]
fn cidr_block_and_expiry_in_the_kernel() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let _l = t.listen(v4);
    let gw = start(&t, 1000, 1000);
    let src = t.client_v4(2);
    let net = format!("10.99.{}.0/24", t.n);
    gw.cli(&["block", "add", &net, "--ttl", "2s"]).ok();
    assert!(
        !t.connect(src, v4, CONNECT),
        "{src} inside blocked {net} connected"
    );
    // The kernel lifts the block by itself: poll until it does.
    let start = Instant::now();
    while !t.connect(src, v4, Duration::from_millis(300)) {
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "the 2 s block did not lapse within 6 s"
        );
    }
    let lapsed = start.elapsed();
    assert!(
        lapsed >= Duration::from_millis(500),
        "block lapsed after only {lapsed:?}"
    );
}

/// A timed `block add` of a CIDR the config blocks for good leaves it
/// permanent in the kernel (permanent wins), with a warning.
#[test]
fn a_timed_block_never_shortens_a_permanent_one() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let body = format!("{}block = [\"192.0.2.0/24\"]\n", config(&t, 1000, 1000));
    let gw = Daemon::start(Some(&t.server.path()), &body).expect("starting the gateway");
    let r = gw.cli(&["block", "add", "192.0.2.0/24", "--ttl", "1s"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("blocked permanently by the config"),
        "{}",
        r.stderr
    );
    let row = gw.block_entry("192.0.2.0/24").expect("listed");
    assert!(row["expires_in_secs"].is_null(), "still permanent: {row}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        gw.block_entry("192.0.2.0/24").is_some(),
        "the config's block outlived the ttl"
    );
}

/// CLI commands from many processes at once: none loses another's entry
/// (the daemon runs them one at a time; without one answering, they
/// serialise on the state directory's lock).
#[test]
fn concurrent_cli_changes_are_all_kept() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let gw = start(&t, 1000, 1000);
    let cidrs: Vec<String> = (1..=12).map(|i| format!("198.18.{i}.0/24")).collect();
    std::thread::scope(|s| {
        for c in &cidrs {
            let gw = &gw;
            s.spawn(move || gw.cli(&["block", "add", c]).ok());
        }
    });
    let listed = gw.block_cidrs();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gw.config.parent().unwrap().join("state/xdp-state.json")).unwrap(),
    )
    .unwrap();
    let persisted: Vec<&str> = state["block"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["cidr"].as_str())
        .collect();
    for c in &cidrs {
        assert!(listed.contains(c), "{c} not in the kernel: {listed:?}");
        assert!(
            persisted.contains(&c.as_str()),
            "{c} not persisted: {persisted:?}"
        );
    }
}

#[test]
fn syn_flood_is_cut_to_the_rate_and_counters_match() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let _l = t.listen(v4);
    let (rate, burst) = (50u64, 50u64);
    let gw = start(&t, rate as u32, burst as u32);

    let syn_pass0 = gw.counter("syn_pass");
    let syn_rate0 = gw.counter("syn_rate");
    let flooder = t.client_v4(2);
    let std::net::IpAddr::V4(src) = flooder else {
        unreachable!()
    };
    let std::net::IpAddr::V4(dst) = t.server_v4() else {
        unreachable!()
    };
    const N: usize = 20_000;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            Frame::v4(src.octets(), dst.octets())
                .tcp(PORT, TCP_SYN)
                .sport(10_000 + (i % 50_000) as u16)
                .build()
        })
        .collect();
    let veth_drops0 = t.veth_drops();
    let began = Instant::now();
    let sent = t.send_frames(frames).expect("sending the flood");
    let flood_secs = began.elapsed().as_secs_f64();
    assert_eq!(sent, N);

    // While the flooder's bucket is empty, another source still connects.
    let other = t.client_v4(3);
    let mut ok = 0;
    for _ in 0..10 {
        if t.connect(other, v4, CONNECT) {
            ok += 1;
        }
    }
    assert_eq!(
        ok,
        10,
        "a well-behaved source failed {} of 10 connects during the flood",
        10 - ok
    );

    let passed = gw.counter("syn_pass") - syn_pass0;
    let dropped = gw.counter("syn_rate") - syn_rate0;
    // Every SYN that reached XDP is counted exactly once: the flood (less
    // what the veth pair dropped before XDP, by its own counters) plus the
    // 10 connects.
    let lost = t.veth_drops() - veth_drops0;
    assert!(
        lost < N as u64 / 10,
        "the veth dropped {lost} of {N} frames: pace the flood"
    );
    assert_eq!(
        passed + dropped,
        N as u64 - lost + 10,
        "counters do not add up: {passed} passed, {dropped} dropped, {lost} lost in the veth"
    );
    // The flood got its burst plus the refill over its duration, no more.
    let allowance = burst + (rate as f64 * (flood_secs + 0.2)).ceil() as u64 + 10;
    assert!(
        passed <= allowance,
        "{passed} SYNs passed, at most {allowance} allowed (flood took {flood_secs:.2}s)"
    );
    assert!(
        passed >= burst,
        "{passed} SYNs passed, the burst alone is {burst}"
    );

    // `gateway top` names the flooder with exactly the dropped count.
    let top = gw.cli(&["top", "--json"]).json();
    assert_eq!(top[0]["source"], flooder.to_string(), "{top}");
    assert_eq!(top[0]["dropped_packets"].as_u64(), Some(dropped), "{top}");
}

#[test]
fn blocklist_counters_match_what_was_sent() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let gw = start(&t, 1000, 1000);
    let std::net::IpAddr::V4(src) = t.client_v4(3) else {
        unreachable!()
    };
    let std::net::IpAddr::V4(dst) = t.server_v4() else {
        unreachable!()
    };
    gw.cli(&["block", "add", &src.to_string()]).ok();
    let before = gw.counter("blocklist");
    let lost0 = t.veth_drops();
    const N: usize = 5_000;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|_| Frame::v4(src.octets(), dst.octets()).udp(53).build())
        .collect();
    assert_eq!(t.send_frames(frames).unwrap(), N);
    let seen = N as u64 - (t.veth_drops() - lost0);
    assert_eq!(
        gw.counter("blocklist") - before,
        seen,
        "stats must count every dropped frame"
    );
    let list = gw.cli(&["block", "list", "--json"]).json();
    assert_eq!(list[0]["hits"].as_u64(), Some(seen), "{list}");
    let top = gw.cli(&["top", "--json"]).json();
    assert_eq!(top[0]["reason"], "blocklist", "{top}");
}

#[test]
fn limits_change_on_the_running_program_and_persist() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let _l = t.listen(v4);
    let mut gw = start(&t, 1000, 1000);
    gw.cli(&["limits", "set", "--syn-rate", "1", "--syn-burst", "2"])
        .ok();
    // Persisted: a restart comes back with the overrides over the config.
    gw.stop_process();
    gw.respawn().expect("restarting");
    let shown = gw.cli(&["limits", "show", "--json"]).json();
    assert_eq!(shown["syn_rate"], 1);
    assert_eq!(shown["overrides"]["syn_burst"], 2);
    let src = t.client_v4(2);
    let results: Vec<bool> = (0..4)
        .map(|_| t.connect(src, v4, Duration::from_millis(300)))
        .collect();
    assert_eq!(
        results[..2],
        [true, true],
        "the burst of 2 should connect: {results:?}"
    );
    assert!(
        results[2..].iter().any(|ok| !ok),
        "beyond the burst connects must be dropped: {results:?}"
    );
    // A reload that changes a limit the override hides says so.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        text.replace("syn_rate = 1000", "syn_rate = 900"),
    )
    .unwrap();
    let said = gw.cli(&["reload"]).ok();
    assert!(
        said.contains("xdp.syn_rate changed to 900, but the runtime override 1"),
        "{said}"
    );
    assert!(!said.contains("xdp.syn_burst"), "{said}");
    gw.cli(&["limits", "set", "--reset"]).ok();
    assert_eq!(
        gw.cli(&["limits", "show", "--json"]).json()["syn_rate"],
        900
    );
    gw.stop_process();
    gw.respawn().expect("restarting");
    assert_eq!(
        gw.cli(&["limits", "show", "--json"]).json()["syn_rate"],
        900,
        "the reset is persisted too"
    );
}

#[test]
fn restart_restores_runtime_blocks_from_state() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let gw = start(&t, 1000, 1000);
    gw.cli(&["block", "add", "192.0.2.0/24", "--comment", "persist me"])
        .ok();
    gw.cli(&["block", "add", "198.51.100.1", "--ttl", "1h"])
        .ok();
    gw.cli(&["block", "add", "2001:db8:7:8::/64"]).ok();
    let written = std::fs::read_to_string(&gw.config).unwrap();
    let state =
        std::fs::read_to_string(gw.config.parent().unwrap().join("state/xdp-state.json")).unwrap();
    drop(gw);
    // A new daemon with the same state dir (and a fresh pin dir).
    let state_dir = restart_state_dir(&written);
    let body = config(&t, 1000, 1000).replace("@STATE_DIR@", &state_dir);
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(format!("{state_dir}/xdp-state.json"), state).unwrap();
    let gw = Daemon::start(Some(&t.server.path()), &body).expect("restarting");
    let cidrs = gw.block_cidrs();
    assert!(
        cidrs.iter().any(|c| c == "192.0.2.0/24") && cidrs.iter().any(|c| c == "198.51.100.1/32"),
        "{cidrs:?}"
    );
    // The restored /24 and /64 are searched in the CIDR tables, not the
    // tries.
    let stats = gw.cli(&["stats", "--json"]).json();
    assert_eq!(
        stats["maps"]["cidr_table"],
        serde_json::json!({"lengths": [24], "trie_after": false}),
        "{stats}"
    );
    assert_eq!(
        stats["maps"]["cidr_table_v6"],
        serde_json::json!({"lengths": [64], "trie_after": false}),
        "{stats}"
    );
    assert!(
        gw.cli(&["stats"])
            .ok()
            .contains("IPv6 CIDR search: table for /64"),
        "the text form names the IPv6 table"
    );
    let row = gw
        .block_entry("198.51.100.1/32")
        .expect("the timed block is listed");
    let ttl = row["expires_in_secs"].as_u64().unwrap();
    assert!(
        (3500..=3600).contains(&ttl),
        "the 1h block kept its deadline: {ttl}s left"
    );
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// The state_dir value of a written config.
fn restart_state_dir(config: &str) -> String {
    let line = config
        .lines()
        .find(|l| l.starts_with("state_dir"))
        .expect("state_dir line");
    let dir = line.split('"').nth(1).expect("quoted state_dir");
    format!("{dir}-restart")
}

/// A gateway that serves on the protected port itself (`gw_addr`), with
/// roomy per-source SYN limits, `xdp_extra` in `[xdp]` and `rest` after it.
fn serving_config(t: &Topology, gw_addr: SocketAddr, xdp_extra: &str, rest: &str) -> String {
    format!(
        r#"
[server]
listen = ["{gw_addr}"]
state_dir = "@STATE_DIR@"
[metrics]
listen = "{metrics}"
[xdp]
interfaces = ["{iface}"]
protected_ports = [{PORT}]
syn_rate = 1000
syn_burst = 1000
pin_dir = "@PIN_DIR@"
{xdp_extra}
{rest}"#,
        iface = t.server_if,
        metrics = metrics_addr(gw_addr),
    )
}

/// Where `serving_config` serves metrics: beside the proxy, in the test's
/// own namespace, so a client there can scrape them.
fn metrics_addr(gw_addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(gw_addr.ip(), 9464)
}

/// The metrics of a `serving_config` daemon, scraped by `src`.
fn scrape(t: &Topology, src: std::net::IpAddr, gw_addr: SocketAddr) -> String {
    t.http_text(
        src,
        metrics_addr(gw_addr),
        "GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".into(),
        CONNECT,
    )
    .expect("scraping the metrics")
}

#[test]
fn repeated_bad_keys_get_the_source_banned_in_the_kernel() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let gw_addr = SocketAddr::new(t.server_v4(), PORT);
    let body = serving_config(
        &t,
        gw_addr,
        &format!("allow = [\"{}/32\"]", t.client_v4(3)),
        &format!(
            "[abuse]\nauth_failures = {{ max = 3, window = \"1m\", ban = \"3s\" }}\n\
             [[keys]]\nname = \"team-a\"\nsha256 = \"{}\"\n",
            gateway_tests::l7::sha256_hex("sk-good")
        ),
    );
    let gw = Daemon::start(Some(&t.server.path()), &body).expect("starting the gateway");
    let (bad, good) = (t.client_v4(2), t.client_v4(3));
    let req = |key: &str| {
        format!("GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
    };
    for i in 0..3 {
        assert_eq!(
            t.http(bad, gw_addr, req("sk-wrong"), CONNECT),
            Some(401),
            "bad key attempt {i}"
        );
    }
    // The ban is applied by the daemon right after the third failure.
    let start = Instant::now();
    while t.connect(bad, gw_addr, Duration::from_millis(300)) {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{bad} is still allowed to connect after 3 bad keys"
        );
    }
    assert_eq!(
        t.http(good, gw_addr, req("sk-good"), CONNECT),
        Some(200),
        "another client is unaffected"
    );
    // An allowlisted source is never banned, however many bad keys it sends.
    for _ in 0..5 {
        assert_eq!(t.http(good, gw_addr, req("sk-wrong"), CONNECT), Some(401));
    }
    assert_eq!(
        t.http(good, gw_addr, req("sk-good"), CONNECT),
        Some(200),
        "the allowlisted source was banned"
    );
    let row = gw
        .block_entry(&format!("{bad}/32"))
        .expect("the ban is listed");
    assert_eq!(row["cause"], "auth_failures", "{row}");
    assert!(row["expires_in_secs"].as_u64().unwrap() <= 3, "{row}");
    // The metrics say so too: the ban by its cause, the kernel's drops of
    // the banned source (exported every second) and the allowlist's entry
    // (map sizes are exported at start, then every 10 s).
    let start = Instant::now();
    loop {
        let m = scrape(&t, good, gw_addr);
        let value = |series: &str| gateway_tests::l7::metric(&m, series, "");
        let banned = value("gateway_bans_total{cause=\"auth_failures\"}");
        let dropped = value("gateway_xdp_packets_total{reason=\"blocklist\"}");
        let allowed = value("gateway_xdp_map_entries{map=\"ALLOW_V4\"}");
        if banned == Some(1.0) && dropped.is_some_and(|d| d >= 1.0) && allowed == Some(1.0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "bans {banned:?}, blocklist drops {dropped:?}, ALLOW_V4 entries {allowed:?}:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The kernel lifts the ban by itself.
    let start = Instant::now();
    while !t.connect(bad, gw_addr, Duration::from_millis(300)) {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "the 3 s ban did not lapse"
        );
    }
    assert_eq!(t.http(bad, gw_addr, req("sk-good"), CONNECT), Some(200));
    // The daemon knows when its ban lapses and frees the slot then, not at
    // its once-a-minute full sweep.
    let start = Instant::now();
    while gw.cli(&["stats", "--json"]).json()["maps"]["block_host"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the lapsed ban still holds a map slot"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An IPv6 client holds a whole /64 (`xdp.ipv6_prefix`), so its failures
/// add up per /64 and the ban covers it: the next address of the prefix is
/// refused too, while an allowlisted host inside it still passes.
#[test]
fn an_ipv6_client_is_banned_by_its_prefix() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let gw_addr = SocketAddr::new(t.server_v6(), PORT);
    let (bad, neighbour, allowed) = (t.client_v6(2), t.client_v6(4), t.client_v6(3));
    let body = serving_config(
        &t,
        gw_addr,
        &format!("allow = [\"{allowed}/128\"]"),
        &format!(
            "[abuse]\nauth_failures = {{ max = 3, window = \"1m\", ban = \"1m\" }}\n\
             [[keys]]\nname = \"team-a\"\nsha256 = \"{}\"\n",
            gateway_tests::l7::sha256_hex("sk-good")
        ),
    );
    let gw = Daemon::start(Some(&t.server.path()), &body).expect("starting the gateway");
    let req = |key: &str| {
        format!("GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
    };
    // Neighbour discovery for each address first: the first SYN to a
    // fresh IPv6 neighbour can outlast the short connect timeout.
    for src in [bad, neighbour, allowed] {
        let start = Instant::now();
        while !t.connect(src, gw_addr, Duration::from_millis(300)) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{src} cannot reach the gateway"
            );
        }
    }
    // Two failures from one address and one from another of the same /64.
    for src in [bad, bad, neighbour] {
        assert_eq!(t.http(src, gw_addr, req("sk-wrong"), CONNECT), Some(401));
    }
    let start = Instant::now();
    while t.connect(neighbour, gw_addr, Duration::from_millis(300)) {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{neighbour} is still allowed to connect after 3 bad keys from its /64"
        );
    }
    assert!(
        !t.connect(bad, gw_addr, Duration::from_millis(300)),
        "{bad} is in the banned /64"
    );
    assert_eq!(
        t.http(allowed, gw_addr, req("sk-good"), CONNECT),
        Some(200),
        "an allowlisted host inside the banned /64 still passes"
    );
    let prefix = gateway_common::cidr::Cidr::enclosing(bad, 32, 64);
    let row = gw
        .block_entry(&prefix.to_string())
        .unwrap_or_else(|| panic!("{prefix} is listed: {:?}", gw.block_cidrs()));
    assert_eq!(row["cause"], "auth_failures", "{row}");
}

#[test]
fn accepted_sources_connect_through_a_spent_global_syn_budget() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let gw_addr = SocketAddr::new(t.server_v4(), PORT);
    let body = serving_config(&t, gw_addr, "global_syn_rate = 1", "");
    let gw = Daemon::start(Some(&t.server.path()), &body).expect("starting the gateway");
    let (known, stranger, flooder) = (t.client_v4(2), t.client_v4(3), t.client_v4(4));
    // One completed handshake makes `known` trusted; the global budget of
    // 1 SYN/s takes this first connect.
    assert!(t.connect(known, gw_addr, CONNECT), "the first connect");
    let start = Instant::now();
    while gw.cli(&["stats", "--json"]).json()["maps"]["syn_trusted"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the accepted source was never recorded as trusted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A flood spends the budget (the flooder's own bucket is large).
    let std::net::IpAddr::V4(src) = flooder else {
        unreachable!()
    };
    let std::net::IpAddr::V4(dst) = t.server_v4() else {
        unreachable!()
    };
    let frames: Vec<Vec<u8>> = (0..200u16)
        .map(|i| {
            Frame::v4(src.octets(), dst.octets())
                .tcp(PORT, TCP_SYN)
                .sport(20_000 + i)
                .build()
        })
        .collect();
    let global0 = gw.counter("syn_global");
    t.send_frames(frames).expect("sending the flood");
    assert!(
        gw.counter("syn_global") > global0,
        "the flood did not spend the global budget"
    );
    // Less than a token has come back since: a new source's SYN is dropped,
    // the known source connects every time.
    assert!(
        !t.connect(stranger, gw_addr, Duration::from_millis(500)),
        "a stranger connected through a spent global budget"
    );
    for i in 0..10 {
        assert!(
            t.connect(known, gw_addr, CONNECT),
            "trusted connect {i} failed"
        );
    }
}

/// A daemon with `keep_attached` on `t`, and a client address it blocks
/// (checked against the listener at `v4`).
fn kept_with_a_block(t: &Topology, v4: SocketAddr) -> (Daemon, std::net::IpAddr) {
    let body = config(t, 1000, 1000).replace(
        "pin_dir = \"@PIN_DIR@\"",
        "pin_dir = \"@PIN_DIR@\"\nkeep_attached = true",
    );
    let gw = Daemon::start(Some(&t.server.path()), &body).expect("starting the gateway");
    let bad = t.client_v4(3);
    gw.cli(&["block", "add", &bad.to_string()]).ok();
    assert!(!t.connect(bad, v4, CONNECT), "{bad} is blocked");
    (gw, bad)
}

/// A daemon that cannot start its kernel path (here: its state directory
/// takes no new file, so the status file cannot be written) serves
/// degraded, enforcing the blocklist at accept. A program kept attached by
/// the daemon before would go on enforcing maps nobody updates (a block
/// removed with the CLI stayed in force there): it is detached.
#[test]
fn a_degraded_start_detaches_the_kept_program() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let _l = t.listen(v4);
    let (mut gw, bad) = kept_with_a_block(&t, v4);
    gw.stop_process();
    assert!(
        !t.connect(bad, v4, CONNECT),
        "the kept program still drops {bad}"
    );

    let state = gw.config.parent().unwrap().join("state");
    let Some(frozen) = gateway_tests::Immutable::try_new(&state, module_path!()) else {
        return;
    };
    gw.respawn().expect("restarting the gateway");
    drop(frozen);
    let stats = gw.cli(&["stats", "--json"]).json();
    assert!(
        stats["xdp"]
            .as_str()
            .is_some_and(|d| d.starts_with("degraded: xdp unavailable")),
        "serving degraded: {stats}"
    );
    let link = gw
        .pin_dir
        .join(format!("v{}", gateway_common::SCHEMA_VERSION))
        .join(format!("link_{}", t.server_if));
    assert!(
        !link.exists(),
        "the kept link is unpinned: {}",
        link.display()
    );
    gw.cli(&["block", "del", &bad.to_string()]).ok();
    assert!(
        t.connect(bad, v4, CONNECT),
        "{bad} is no longer blocked anywhere"
    );
}

#[test]
fn keep_attached_protects_while_the_daemon_restarts() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let _l = t.listen(v4);
    let (mut gw, bad) = kept_with_a_block(&t, v4);

    gw.stop_process();
    // No daemon: the program stays attached with its maps.
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} got through while the daemon was down"
    );
    assert!(
        t.connect(t.client_v4(2), v4, CONNECT),
        "other traffic still flows"
    );

    gw.respawn().expect("restarting the gateway");
    let stats = gw.cli(&["stats", "--json"]).json();
    assert_eq!(
        stats["attached"]["interfaces"][0]["mode"], "kept",
        "the new daemon took the link over: {stats}"
    );
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} is still blocked after the restart"
    );
    gw.cli(&["block", "del", &bad.to_string()]).ok();
    assert!(
        t.connect(bad, v4, CONNECT),
        "the new program enforces the live maps"
    );

    // An upgrade across a map schema: the link sits in an older schema's
    // directory (moved there to play the old version), and the new daemon
    // takes it over and pins it under its own schema.
    gw.cli(&["block", "add", &bad.to_string()]).ok();
    gw.stop_process();
    let schema = gateway_common::SCHEMA_VERSION;
    let pins = gw.pin_dir.clone();
    let link = |v: u32| {
        pins.join(format!("v{v}"))
            .join(format!("link_{}", t.server_if))
    };
    std::fs::create_dir_all(pins.join(format!("v{}", schema - 1))).unwrap();
    std::fs::rename(link(schema), link(schema - 1)).expect("moving the pinned link");
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} got through with the link pinned elsewhere"
    );
    gw.respawn().expect("restarting the gateway");
    let stats = gw.cli(&["stats", "--json"]).json();
    assert_eq!(
        stats["attached"]["interfaces"][0]["mode"], "kept",
        "{stats}"
    );
    assert!(link(schema).exists() && !link(schema - 1).exists());
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} is blocked by the new daemon's program"
    );
}

/// A link left attached (`keep_attached`) is renewed when its interface was
/// made again (a driver reload: the old link is dead), and dropped when its
/// interface left the config (its program, whose maps nobody updates any
/// more, no longer runs there).
#[test]
fn kept_links_of_remade_or_removed_interfaces_are_renewed_or_dropped() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let v4 = SocketAddr::new(t.server_v4(), PORT);
    let extra = format!("gwx{}", t.n);
    t.server
        .ip(&[
            "link",
            "add",
            &extra,
            "type",
            "veth",
            "peer",
            "name",
            &format!("gwy{}", t.n),
        ])
        .unwrap();
    t.server.ip(&["link", "set", &extra, "up"]).unwrap();
    let both = config(&t, 1000, 1000)
        .replace(
            "pin_dir = \"@PIN_DIR@\"",
            "pin_dir = \"@PIN_DIR@\"\nkeep_attached = true",
        )
        .replace(
            &format!("interfaces = [\"{}\"]", t.server_if),
            &format!("interfaces = [\"{}\", \"{extra}\"]", t.server_if),
        );
    let mut gw = Daemon::start(Some(&t.server.path()), &both).expect("starting the gateway");
    let link = |iface: &str| {
        gw.pin_dir
            .join(format!("v{}", gateway_common::SCHEMA_VERSION))
            .join(format!("link_{iface}"))
    };
    let (server_link, extra_link) = (link(&t.server_if), link(&extra));
    assert!(server_link.exists() && extra_link.exists());
    gw.stop_process();
    // The protected interface is made again; the extra one leaves the config.
    t.rewire().expect("making the veth pair again");
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, text.replace(&format!(", \"{extra}\""), "")).unwrap();
    let _l = t.listen(v4);
    gw.respawn().expect("restarting the gateway");
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(!log.contains("degraded"), "{log}");
    assert!(log.contains("attaching afresh"), "{log}");
    let stats = gw.cli(&["stats", "--json"]).json();
    assert_eq!(stats["xdp"], "attached", "{stats}");
    let bad = t.client_v4(3);
    gw.cli(&["block", "add", &bad.to_string()]).ok();
    assert!(
        !t.connect(bad, v4, CONNECT),
        "{bad} is blocked on the new interface"
    );
    assert!(server_link.exists(), "the fresh link is pinned");
    assert!(!extra_link.exists(), "the removed interface's link is gone");
    let shown = std::process::Command::new("ip")
        .args(["-n", &t.server.name, "-d", "link", "show", "dev", &extra])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(!shown.contains("xdp"), "still attached to {extra}: {shown}");
}

/// A second daemon on the same config (the same maps) refuses to start,
/// exit 2, rather than serve in degraded mode beside the first (whose
/// SO_REUSEPORT listen ports it would share, splitting its traffic).
#[test]
fn a_second_daemon_on_the_same_maps_refuses_to_start() {
    use std::os::unix::process::CommandExt as _;
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let gw = start(&t, 1000, 1000);
    let ns = t.server.path();
    let mut second = std::process::Command::new(gateway_tests::gateway_bin());
    second
        .arg("--config")
        .arg(&gw.config)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: `enter` only makes the setns system call.
    unsafe {
        second.pre_exec(move || gateway_tests::netns::enter(&ns));
    }
    let mut child = second.spawn().expect("starting a second daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second daemon kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("already uses the maps"), "{err}");
    assert_eq!(
        gw.cli(&["stats", "--json"]).json()["xdp"],
        "attached",
        "the first one still runs"
    );
}
