//! `cargo xtask bench policies`: what each balancing policy costs. The
//! selection cost in ns per pick comes from the `balance` micro-benchmark
//! (gateway/benches/balance.rs); requests/s through the gateway comes from
//! wrk against one model per policy, all over the same two mock-llm
//! upstreams, in one gateway process and one run.

use std::{net::SocketAddr, process::Command};

use anyhow::{Context as _, Result};

use super::{l7, record};
use crate::util::{self, root, step, wait_for_port, Children};

/// The policy names, as `balance = "..."` takes them.
const POLICIES: [&str; 7] = [
    "weighted_least_connections",
    "round_robin",
    "weighted_round_robin",
    "random",
    "power_of_two",
    "consistent_hash",
    "latency",
];

pub fn run(secs: u64) -> Result<()> {
    step("bench: selection cost per policy (release build)");
    util::cargo(&["bench", "-p", "gateway", "--bench", "balance"])?;
    let cost_table = std::fs::read_to_string(root().join("target/bench/balance.md"))?;
    let cost: Vec<(String, String)> = cost_table
        .lines()
        .skip(2)
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells.len() == 2).then(|| (cells[0].to_owned(), cells[1].to_owned()))
        })
        .collect();

    let bin = util::build_release_bins()?;
    let dir = root().join("target/bench/policies");
    std::fs::create_dir_all(&dir)?;
    let mut procs = Children::default();
    step("bench: starting two mock-llm upstreams and the gateway");
    let a = l7::start_mock(&bin, &mut procs, "a")?;
    let b = l7::start_mock(&bin, &mut procs, "b")?;
    let port = l7::free_port()?;
    let mut conf = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = \"{d}/state\"\nadmin_socket = \"{d}/admin.sock\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [[keys]]\nname = \"bench\"\nsha256 = \"{digest}\"\n",
        d = dir.display(),
        digest = l7::sha256_hex(l7::KEY)?,
    );
    for p in POLICIES {
        conf.push_str(&format!(
            "[[models]]\nname = \"{p}\"\nbalance = \"{p}\"\n\
             [[models.backends]]\nurl = \"http://{a}\"\nweight = 2\n\
             [[models.backends]]\nurl = \"http://{b}\"\nweight = 1\n"
        ));
    }
    let conf_path = dir.join("gateway.toml");
    std::fs::write(&conf_path, conf)?;
    procs.0.push(
        Command::new(bin.join("gateway"))
            .arg("--config")
            .arg(&conf_path)
            .arg("run")
            .env("GATEWAY_LOG", "warn")
            .spawn()
            .context("starting the gateway")?,
    );
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), &mut procs)?;

    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let mut rows = Vec::new();
    for p in POLICIES {
        step(&format!(
            "bench: wrk -t1 -c{} -d{secs}s, balance = {p}",
            l7::CONNECTIONS
        ));
        let script = dir.join(format!("{p}.lua"));
        l7::post_script(
            &script,
            &format!(
                r#"{{"model":"{p}","messages":[{{"role":"user","content":"hello from the benchmark"}}]}}"#
            ),
        )?;
        let _ = l7::wrk(&url, &script, 2)?;
        let w = l7::wrk(&url, &script, secs)?;
        let ns = cost
            .iter()
            .find(|(n, _)| n == p)
            .map_or("?".to_owned(), |(_, v)| v.clone());
        println!("{p}: {:.0} req/s, {ns} ns/pick", w.rps);
        rows.push((p, w.rps, ns));
    }
    let base = rows[0].1;
    let mut out = format!(
        "## Balancing policies\n\nCommand: `cargo xtask bench policies` (seconds per run: {secs}). Machine: {}. \
         Selection cost: `gateway/benches/balance.rs`, one thread, 4 backends with weights 1-4 and some \
         requests in flight, a pick plus the release of its slot. Requests/s: wrk -t1 -c{} against one \
         gateway serving one model per policy over the same two mock-llm upstreams (weights 2:1, \
         16-token non-stream completions); the generator, the gateway and the mocks share the 2 cores.\n\n\
         | policy | ns/pick | requests/s | vs weighted_least_connections |\n|---|---:|---:|---:|\n",
        record::machine(),
        l7::CONNECTIONS,
    );
    for (p, rps, ns) in &rows {
        out.push_str(&format!("| {p} | {ns} | {rps:.0} | {:.2}x |\n", rps / base));
    }
    println!("\n{out}");
    record::section("policies", &out)
}
