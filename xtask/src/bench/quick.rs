//! `cargo xtask bench quick`: the headline ratios in under two minutes, to
//! run before and after every performance-related change. Shorter runs
//! than the full benchmarks, so noisier (about +-20% on this VM); nothing
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
            l.starts_with("| pass: IPv4")
                || l.starts_with("| block hit: IPv4 exact")
                || l.starts_with("| SYN path: IPv4 SYN over")
        }) {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            if cells.len() >= 4 {
                lines.push(format!("xdp {:<38} {:>7} ns/packet", cells[0], cells[3]));
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
    let mut rps = Vec::new();
    for (name, u) in [
        ("direct", format!("http://{mock}/v1/chat/completions")),
        ("nginx", url(ngx)),
        ("gateway", url(gw)),
    ] {
        step(&format!("quick: wrk 4 s against {name}"));
        let _ = l7::wrk(&u, &script, 1)?;
        rps.push((name, l7::wrk(&u, &script, 4)?.rps));
    }
    lines.push(format!(
        "l7 requests/s: direct {:.0}, nginx {:.0}, gateway {:.0}: gateway/nginx {:.2}x",
        rps[0].1,
        rps[1].1,
        rps[2].1,
        rps[2].1 / rps[1].1
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
