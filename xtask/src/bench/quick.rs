//! `cargo xtask bench quick`: the headline ratios in under two minutes, to
//! run before and after every performance-related change. Shorter runs
//! than the full benchmarks, so noisier; nginx and the gateway run in
//! alternating rounds and the median ratio is printed, which moves less
//! than any single run (single runs vary about +-20% on this VM). Nothing
//! is recorded in docs/benchmarks.md.

use std::time::Duration;

use anyhow::Result;

use super::{l7, streams};
use crate::util::{self, is_root, root, step};

pub fn run() -> Result<()> {
    let started = std::time::Instant::now();
    let mut lines: Vec<String> = Vec::new();

    if is_root() {
        step("quick: XDP ns/packet (TestRun, 100k entries, 3 x 200k repeats)");
        util::run(
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["bench", "-p", "gateway", "--bench", "xdp"])
                .env("GATEWAY_BENCH_QUICK", "1"),
        )?;
        let table = std::fs::read_to_string(root().join("target/bench/xdp.md"))?;
        for row in table.lines().filter(|l| {
            l.starts_with("| pass: IPv4 TCP ACK, clean")
                || l.starts_with("| block hit: IPv4 exact")
                || l.starts_with("| block hit: IPv4 CIDR (prefix table)")
                || l.starts_with("| SYN path: IPv4 SYN over")
        }) {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            if cells.len() >= 4 {
                lines.push(format!("xdp {:<40} {:>7} ns/packet", cells[0], cells[3]));
            }
        }
    } else {
        lines.push("xdp: skipped (TestRun needs root)".into());
    }

    let bin = util::build_release_bins()?;
    let dir = root().join("target/bench/quick");
    let stack = l7::Stack::start(&bin, &dir, "max_connections_per_ip = 100000")?;
    let (mock, (ngx, ngx_pid), (gw, gw_pid)) = (stack.mock, stack.nginx, stack.gateway);
    let script = dir.join("post.lua");
    l7::post_script(
        &script,
        r#"{"model":"bench-model","messages":[{"role":"user","content":"hello from the benchmark"}]}"#,
    )?;
    let url = |port: u16| format!("http://127.0.0.1:{port}/v1/chat/completions");
    // One direct run for reference, then nginx and the gateway in
    // alternating rounds: a slow spell of this shared VM then lands on
    // both, and the median of the per-round ratios is what moves when the
    // gateway's own cost does. CPU per request is the proxy process's user
    // plus system time over the run.
    step("quick: wrk 3 s against direct");
    let direct = format!("http://{mock}/v1/chat/completions");
    let _ = l7::wrk(&direct, &script, 1)?;
    let direct_rps = l7::wrk(&direct, &script, 3)?.rps;
    let proxies = [("nginx", url(ngx), ngx_pid), ("gateway", url(gw), gw_pid)];
    for (_, u, _) in &proxies {
        let _ = l7::wrk(u, &script, 1)?; // warm pools and caches
    }
    const ROUNDS: usize = 3;
    const SECS: u64 = 3;
    // Per round: (nginx rps, gateway rps, nginx µs CPU/request, gateway µs CPU/request).
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        step(&format!(
            "quick: round {round}/{ROUNDS}: wrk {SECS} s against nginx, then the gateway"
        ));
        let mut r = [0.0; 4];
        for (i, (_, u, pid)) in proxies.iter().enumerate() {
            let cpu0 = streams::usage(*pid).1;
            let w = l7::wrk(u, &script, SECS)?;
            let cpu = streams::usage(*pid).1 - cpu0;
            r[i] = w.rps;
            r[2 + i] = cpu / (w.rps * SECS as f64) * 1e6;
        }
        rounds.push(r);
    }
    let median = |f: &dyn Fn(&[f64; 4]) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r[1] / r[0]))
        .collect();
    lines.push(format!(
        "l7 requests/s (median of {ROUNDS} alternating rounds): direct {direct_rps:.0}, nginx {:.0}, gateway {:.0}: \
         gateway/nginx {:.2}x (rounds: {})",
        median(&|r| r[0]),
        median(&|r| r[1]),
        median(&|r| r[1] / r[0]),
        ratios.join(", ")
    ));
    lines.push(format!(
        "l7 CPU per request (median): nginx {:.1} us, gateway {:.1} us: gateway/nginx {:.2}x",
        median(&|r| r[2]),
        median(&|r| r[3]),
        median(&|r| r[3] / r[2])
    ));

    // Open loop at the target's rate, alternating like the rounds above.
    step("quick: open loop at 1,000 req/s, 3 s each against direct, nginx and the gateway");
    let mut open = Vec::new();
    for (name, u) in [
        ("direct", &direct),
        ("nginx", &proxies[0].1),
        ("gateway", &proxies[1].1),
    ] {
        let l = l7::open_loop(u, 1000, 3)?;
        anyhow::ensure!(
            l.errors() == 0,
            "{name}: {} of {} requests failed",
            l.errors(),
            l.sent
        );
        open.push(l);
    }
    let added = |i: usize, p: f64| (open[i].pct(p) - open[0].pct(p)) / 1e3;
    lines.push(format!(
        "l7 added latency at 1,000 req/s (open loop): p50 nginx {:.2} ms, gateway {:.2} ms; \
         p99 nginx {:.2} ms, gateway {:.2} ms (direct p99 {:.2} ms; machine's worst stall {:.1} ms)",
        added(1, 0.5),
        added(2, 0.5),
        added(1, 0.99),
        added(2, 0.99),
        open[0].pct(0.99) / 1e3,
        open.iter().map(|l| l.worst_stall).fold(0.0, f64::max) / 1e3
    ));

    let mut ttft = Vec::new();
    for (name, u, pid) in [
        ("direct", format!("http://{mock}/v1/chat/completions"), None),
        ("nginx", url(ngx), Some(ngx_pid)),
        ("gateway", url(gw), Some(gw_pid)),
    ] {
        step(&format!("quick: 1,000 streams of 50 chunks via {name}"));
        let before = pid.map(streams::usage);
        let sampler = pid.map(streams::Sampler::start);
        let r = streams::run(&u, Some(l7::KEY), 1000, 50, 20, Duration::from_secs(1))?;
        let peak = sampler.map(streams::Sampler::peak_kib);
        anyhow::ensure!(r.errors == 0, "{name}: {} stream errors", r.errors);
        let per_stream = before
            .zip(peak)
            .map(|(b, p)| p.saturating_sub(b.0) as f64 / 1000.0);
        ttft.push((name, streams::percentile(&r.ttft, 0.99), per_stream));
    }
    for (name, p99, per) in &ttft[1..] {
        lines.push(format!(
            "streams x1000 {name}: added TTFT p99 {:.2} ms, {:.1} KiB RSS per stream",
            (p99 - ttft[0].1) / 1e3,
            per.unwrap_or(f64::NAN)
        ));
    }
    drop(stack);
    println!(
        "\n== bench quick ({:.0} s) ==",
        started.elapsed().as_secs_f64()
    );
    for l in &lines {
        println!("{l}");
    }
    Ok(())
}
