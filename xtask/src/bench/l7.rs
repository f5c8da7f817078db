//! `cargo xtask bench l7`: one mock upstream (mock-llm, release) reached
//! directly, through nginx (least_conn, keepalive upstream, API-key check
//! by map, worker_processes auto) and through the gateway (auth, routing,
//! weighted least connections, proxy), in the same run on the same machine.
//! Peak requests/s and latency come from wrk (closed loop, 64 connections);
//! the latency the proxy adds comes from open-loop runs (see `load`) at
//! 1,000 requests/s and at half the gateway's peak, so queueing is not
//! hidden.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{load, record};
use crate::util::{self, root, step, wait_for_port, Children};

pub(super) const KEY: &str = "sk-bench-key";
pub(super) const BODY: &str =
    r#"{"model":"bench-model","messages":[{"role":"user","content":"hello from the benchmark"}]}"#;
pub(super) const CONNECTIONS: u32 = 64;

pub(super) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One wrk run: requests/s and latency percentiles (µs).
pub(super) struct Wrk {
    pub rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

pub(super) fn wrk(url: &str, script: &Path, secs: u64) -> Result<Wrk> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!("wrk against {url} failed or saw errors:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec in wrk output")?;
    let pct = |p: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(p))
            .with_context(|| format!("no {p} in wrk output"))?;
        parse_duration_us(line.split_whitespace().nth(1).unwrap_or(""))
    };
    // Printed by the script's done() (wrk --latency stops at 99%).
    let p999 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("p999_us "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    Ok(Wrk {
        rps,
        p50: pct("50%")?,
        p99: pct("99%")?,
        p999,
    })
}

fn parse_duration_us(s: &str) -> Result<f64> {
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        bail!("unknown wrk duration {s:?}")
    };
    Ok(num.parse::<f64>()? * mult)
}

/// Starts a release mock-llm (16-token completions, one worker thread) on
/// a free port; returns its address.
pub(super) fn start_mock(bin: &Path, procs: &mut Children, name: &str) -> Result<SocketAddr> {
    let mut mock = Command::new(bin.join("mock-llm"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--tokens",
            "16",
            "--workers",
            "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting mock-llm")?;
    let mut line = String::new();
    BufReader::new(mock.stdout.take().expect("piped")).read_line(&mut line)?;
    procs.0.push(mock);
    line.trim()
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("mock-llm said {line:?}"))
}

/// The usual bench set-up: mock-llm, nginx and the gateway in front of it,
/// all listening.
pub(super) struct Stack {
    pub procs: Children,
    pub mock: SocketAddr,
    /// (port, pid) of each proxy.
    pub nginx: (u16, u32),
    pub gateway: (u16, u32),
    /// nginx's h2c and TLS ports.
    pub nginx_h2c: u16,
    pub nginx_tls: u16,
}

impl Stack {
    /// `gateway_extra` goes into the gateway's `[server]` table.
    pub fn start(bin: &Path, dir: &Path, gateway_extra: &str) -> Result<Stack> {
        let mut procs = Children::default();
        step("bench: starting mock-llm, nginx and the gateway");
        let mock = start_mock(bin, &mut procs, "bench")?;
        let (ngx, nginx_h2c, nginx_tls) = start_nginx(&dir.join("nginx"), &mut procs, mock)?;
        let ngx_pid = procs.0.last().expect("nginx").id();
        let gw = start_gateway(bin, dir, &mut procs, mock, gateway_extra)?;
        let gw_pid = procs.0.last().expect("gateway").id();
        for p in [ngx, gw] {
            wait_for_port(SocketAddr::from(([127, 0, 0, 1], p)), &mut procs)?;
        }
        Ok(Stack {
            procs,
            mock,
            nginx: (ngx, ngx_pid),
            gateway: (gw, gw_pid),
            nginx_h2c,
            nginx_tls,
        })
    }

    pub fn mock_pid(&self) -> u32 {
        self.procs.0[0].id()
    }
}

/// A wrk script POSTing `body` with the bench key.
pub(super) fn post_script(path: &Path, body: &str) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"Bearer {KEY}\"\n\
             done = function(summary, latency, requests)\n  io.write(string.format(\"p999_us %d\\n\", latency:percentile(99.9)))\nend\n"
        ),
    )?;
    Ok(())
}

/// A self-signed ECDSA P-256 certificate for 127.0.0.1 in `dir`: (cert, key).
pub(super) fn test_cert(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() {
        util::run(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stderr(Stdio::null()),
        )?;
    }
    Ok((cert, key))
}

/// Starts nginx (worker_processes auto, least_conn, keepalive upstream,
/// the API key checked by a map, no buffering) in front of `upstream`;
/// serving plain HTTP/1.1, h2c (prior knowledge) and TLS (h2 and HTTP/1.1
/// by ALPN) on ports of their own; returns (plain, h2c, TLS).
pub(super) fn start_nginx(
    dir: &Path,
    procs: &mut Children,
    upstream: SocketAddr,
) -> Result<(u16, u16, u16)> {
    let (conf, ports) = nginx_config(dir, upstream, "worker_processes auto;")?;
    procs.0.push(
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .spawn()
            .context("starting nginx (cargo xtask setup installs it)")?,
    );
    Ok(ports)
}

/// Writes the benches' nginx configuration (see [`start_nginx`]) into
/// `dir`, with `processes` as its process directives; returns its path and
/// the (plain, h2c, TLS) ports.
pub(super) fn nginx_config(
    dir: &Path,
    upstream: SocketAddr,
    processes: &str,
) -> Result<(std::path::PathBuf, (u16, u16, u16))> {
    std::fs::create_dir_all(dir)?;
    let (cert, key) = test_cert(&dir.join("tls"))?;
    let (port, h2c, tls) = (free_port()?, free_port()?, free_port()?);
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "{processes}\nworker_rlimit_nofile 65536;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 30000; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               map $http_authorization $key_ok {{ default 0; \"Bearer {KEY}\" 1; }}\n\
               upstream llm {{ least_conn; server {upstream}; keepalive 128; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    listen 127.0.0.1:{h2c} http2;\n    listen 127.0.0.1:{tls} ssl http2;\n\
                   ssl_certificate {cert};\n    ssl_certificate_key {key};\n    location / {{\n      if ($key_ok = 0) {{ return 401; }}\n\
                   proxy_pass http://llm;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
                   proxy_buffering off;\n    }}\n  }}\n}}\n",
            d = dir.display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )?;
    Ok((conf, (port, h2c, tls)))
}

/// CPU seconds per 10,000 requests.
struct Cpu10k {
    user: f64,
    system: f64,
}

impl Cpu10k {
    fn total(&self) -> f64 {
        self.user + self.system
    }
}

/// Runs h2load with `args` (connections, streams, threads) for `requests`
/// POSTs of `body` with the bench key to `url`; returns whether it exited
/// well, and its output.
pub(super) fn post_h2load(
    args: &[&str],
    requests: u64,
    body: &Path,
    url: &str,
) -> Result<(bool, String)> {
    let out = Command::new("h2load")
        .args(args)
        .args(["-n", &requests.to_string(), "-d"])
        .arg(body)
        .args([
            "-H",
            "content-type: application/json",
            "-H",
            &format!("authorization: Bearer {KEY}"),
            url,
        ])
        .output()
        .context("running h2load (cargo xtask setup installs nghttp2-client)")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// One h2load run of `requests` (HTTP/2, 64 connections x 10 streams):
/// requests/s and mean request time (µs). A count rather than a duration:
/// h2load counts the requests in flight at a deadline as errors.
fn h2load(url: &str, body: &Path, requests: u64) -> Result<(f64, f64)> {
    let (ok, text) = post_h2load(&["-c64", "-m10", "-t1"], requests, body, url)?;
    let failed = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" failed")))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(1);
    if !ok || failed != 0 || !text.contains("2xx") {
        bail!("h2load against {url} failed:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim().strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .context("no req/s in h2load output")?;
    let mean = text
        .lines()
        .find(|l| l.trim_start().starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .map_or(Ok(f64::NAN), parse_duration_us)?;
    Ok((rps, mean))
}

/// The LiteLLM release the comparison installs (into target/bench, not the
/// test venv: it is large and only the benchmark needs it).
const LITELLM_VERSION: &str = "1.106.2";

/// Starts the LiteLLM proxy with two deployments of `upstream` and the
/// bench key as master key, installing it first if needed; returns its port.
fn start_litellm(dir: &Path, procs: &mut Children, upstream: SocketAddr) -> Result<u16> {
    std::fs::create_dir_all(dir)?;
    let venv = root().join("target/bench/litellm-venv");
    let bin = venv.join("bin/litellm");
    let version = Command::new(venv.join("bin/pip"))
        .args(["show", "litellm"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains(&format!("Version: {LITELLM_VERSION}"))
        })
        .unwrap_or(false);
    if !version {
        step(&format!(
            "bench: installing LiteLLM {LITELLM_VERSION} into {} (once, ~2 minutes)",
            venv.display()
        ));
        util::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        util::run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet"])
                .arg(format!("litellm[proxy]=={LITELLM_VERSION}")),
        )?;
    }
    let port = free_port()?;
    let deployment = format!(
        "  - model_name: bench-model\n    litellm_params:\n      model: openai/bench-model\n      \
         api_base: http://{upstream}/v1\n      api_key: unused\n"
    );
    let conf = dir.join("litellm.yaml");
    std::fs::write(
        &conf,
        format!(
            "model_list:\n{deployment}{deployment}general_settings:\n  master_key: {KEY}\n\
             litellm_settings:\n  drop_params: true\n"
        ),
    )?;
    procs.0.push(
        Command::new(bin)
            .arg("--config")
            .arg(&conf)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting litellm")?,
    );
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), procs)?;
    Ok(port)
}

/// Starts the gateway (release) with one model, `bench-model`, on
/// `upstream`, plus `server_extra` in `[server]`; returns its port.
pub(super) fn start_gateway(
    bin: &Path,
    dir: &Path,
    procs: &mut Children,
    upstream: SocketAddr,
    server_extra: &str,
) -> Result<u16> {
    start_gateway_to(bin, dir, procs, &format!("http://{upstream}"), server_extra)
}

/// Like `start_gateway`, with the backend URL given (e.g. `h2c://...`).
pub(super) fn start_gateway_to(
    bin: &Path,
    dir: &Path,
    procs: &mut Children,
    upstream: &str,
    server_extra: &str,
) -> Result<u16> {
    let (conf, port) = gateway_config(dir, upstream, server_extra)?;
    procs.0.push(
        Command::new(bin.join("gateway"))
            .arg("--config")
            .arg(&conf)
            .arg("run")
            .env("GATEWAY_LOG", "warn")
            .spawn()
            .context("starting the gateway")?,
    );
    Ok(port)
}

/// Writes the bench gateway's config in `dir`: one model, `bench-model`,
/// on `upstream`; returns its path and the port it listens on. Its
/// `keepalive_requests` is nginx's in [`nginx_config`]: h2load does not
/// reopen a connection that the server closes (GOAWAY) after its share.
pub(super) fn gateway_config(
    dir: &Path,
    upstream: &str,
    server_extra: &str,
) -> Result<(std::path::PathBuf, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let conf = dir.join("gateway.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = \"{d}/state\"\nadmin_socket = \"{d}/admin.sock\"\nkeepalive_requests = 1000000\n{server_extra}\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [[keys]]\nname = \"bench\"\nsha256 = \"{digest}\"\n\
             [[models]]\nname = \"bench-model\"\n[[models.backends]]\nurl = \"{upstream}\"\n",
            d = dir.display(),
            digest = sha256_hex(KEY)?,
        ),
    )?;
    Ok((conf, port))
}

pub fn run(secs: u64) -> Result<()> {
    let bin = util::build_release_bins()?;
    let dir = root().join("target/bench/l7");
    let mut stack = Stack::start(&bin, &dir, "")?;
    let (mock_addr, (ngx_port, ngx_pid), (gw_port, gw_pid)) =
        (stack.mock, stack.nginx, stack.gateway);

    let script = dir.join("post.lua");
    post_script(&script, BODY)?;
    let litellm_port = start_litellm(&dir.join("litellm"), &mut stack.procs, mock_addr)?;
    let litellm_pid = stack.procs.0.last().expect("litellm").id();
    // The mock's own usage stands for the direct row.
    let pids = [stack.mock_pid(), ngx_pid, gw_pid, litellm_pid];
    let targets = [
        ("direct", format!("http://{mock_addr}/v1/chat/completions")),
        (
            "nginx",
            format!("http://127.0.0.1:{ngx_port}/v1/chat/completions"),
        ),
        (
            "gateway",
            format!("http://127.0.0.1:{gw_port}/v1/chat/completions"),
        ),
        (
            "litellm",
            format!("http://127.0.0.1:{litellm_port}/v1/chat/completions"),
        ),
    ];
    let mut peak = Vec::new();
    for ((name, url), pid) in targets.iter().zip(pids) {
        step(&format!(
            "bench: wrk -t1 -c{CONNECTIONS} -d{secs}s against {name}"
        ));
        let _ = wrk(url, &script, 2)?; // warm up pools and caches
        let before = super::streams::tree_usage(pid);
        let sampler = super::streams::Sampler::start(pid);
        let w = wrk(url, &script, secs)?;
        let rss = sampler.peak_kib();
        let after = super::streams::tree_usage(pid);
        let per_10k = |s: f64| s / (w.rps * secs as f64) * 10_000.0;
        let cpu = Cpu10k {
            user: per_10k(after.user - before.user),
            system: per_10k(after.system - before.system),
        };
        println!(
            "{name}: {:.0} req/s, p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, {:.2} CPU s per 10k ({:.2} user, {:.2} system), peak RSS {} KiB",
            w.rps,
            w.p50,
            w.p99,
            w.p999,
            cpu.total(),
            cpu.user,
            cpu.system,
            rss
        );
        peak.push((*name, w, cpu, rss));
    }
    let protocols = protocol_rows(&bin, &dir, &mut stack, secs)?;
    let half = (peak[2].1.rps / 2.0) as u64;
    let mut fixed = Vec::new();
    for rate in [1000, half] {
        // LiteLLM cannot sustain these rates; its peak row says so.
        let mut runs: Runs = targets[..3]
            .iter()
            .map(|(name, _)| (*name, load::Latencies::default()))
            .collect();
        // Alternating rounds, pooled: a slow spell of this shared VM then
        // lands on every target instead of on one.
        let round_secs = secs.div_ceil(OPEN_LOOP_ROUNDS);
        for round in 1..=OPEN_LOOP_ROUNDS {
            for ((name, url), (_, pooled)) in targets.iter().zip(&mut runs) {
                step(&format!(
                    "bench: open loop at {rate} req/s, round {round}/{OPEN_LOOP_ROUNDS}, against {name}"
                ));
                pooled.merge(open_loop(url, rate, round_secs)?);
            }
        }
        for (name, l) in &runs {
            println!(
                "{name}: p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, {} errors of {}, worst stall {:.0} us",
                l.pct(0.5),
                l.pct(0.99),
                l.pct(0.999),
                l.errors(),
                l.sent,
                l.worst_stall
            );
        }
        fixed.push((rate, runs));
    }
    report(secs, &peak, &fixed, &protocols)
}

/// (protocol, nginx (req/s, latency µs), gateway (req/s, latency µs), latency kind).
type ProtoRow = (&'static str, (f64, f64), (f64, f64), &'static str);

/// HTTP/2 clients and TLS termination: the same request through nginx and
/// the gateway over h2c, TLS with HTTP/1.1 and TLS with h2.
fn protocol_rows(bin: &Path, dir: &Path, stack: &mut Stack, secs: u64) -> Result<Vec<ProtoRow>> {
    let body = dir.join("body.json");
    std::fs::write(&body, BODY)?;
    let (cert, key) = test_cert(&dir.join("nginx/tls"))?;
    let gw_tls = start_gateway(
        bin,
        &dir.join("tls"),
        &mut stack.procs,
        stack.mock,
        &format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        ),
    )?;
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], gw_tls)), &mut stack.procs)?;
    let path = "/v1/chat/completions";
    let url = |scheme: &str, port: u16| format!("{scheme}://127.0.0.1:{port}{path}");
    let script = dir.join("post.lua");
    let mut rows = Vec::new();
    // About `secs` seconds at the gateway's HTTP/1.1 rate.
    let requests = secs * 25_000;
    let h2 = |u: &str| -> Result<(f64, f64)> {
        let _ = h2load(u, &body, 10_000)?;
        h2load(u, &body, requests)
    };
    let h1 = |u: &str| -> Result<(f64, f64)> {
        let _ = wrk(u, &script, 1)?;
        let w = wrk(u, &script, secs)?;
        Ok((w.rps, w.p99))
    };
    step("bench: HTTP/2 cleartext (h2load -c64 -m10) against nginx and the gateway");
    rows.push((
        "HTTP/2 cleartext, h2load -c64 -m10",
        h2(&url("http", stack.nginx_h2c))?,
        h2(&url("http", stack.gateway.0))?,
        "mean",
    ));
    step("bench: TLS with HTTP/1.1 (wrk) against nginx and the gateway");
    rows.push((
        "TLS 1.3, HTTP/1.1, wrk -c64",
        h1(&url("https", stack.nginx_tls))?,
        h1(&url("https", gw_tls))?,
        "p99",
    ));
    step("bench: TLS with HTTP/2 (h2load) against nginx and the gateway");
    rows.push((
        "TLS 1.3, HTTP/2, h2load -c64 -m10",
        h2(&url("https", stack.nginx_tls))?,
        h2(&url("https", gw_tls))?,
        "mean",
    ));
    for (p, n, g, _) in &rows {
        println!("{p}: nginx {:.0} req/s, gateway {:.0} req/s", n.0, g.0);
    }
    Ok(rows)
}

type Runs<'a> = Vec<(&'a str, load::Latencies)>;

/// The bench's chat completion, with its key, POSTed to `url` at `rate`
/// per second for `secs` seconds by the open-loop generator.
pub(super) fn open_loop(url: &str, rate: u64, secs: u64) -> Result<load::Latencies> {
    let auth = format!("Bearer {KEY}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    load::run(url, &headers, BODY, rate, secs)
}

/// Rounds of the open-loop runs, each a third of the run's seconds.
const OPEN_LOOP_ROUNDS: u64 = 3;

type Peak<'a> = (&'a str, Wrk, Cpu10k, u64);

fn report(secs: u64, peak: &[Peak], fixed: &[(u64, Runs)], protocols: &[ProtoRow]) -> Result<()> {
    let (nginx_rps, gw_rps, litellm_rps) = (peak[1].1.rps, peak[2].1.rps, peak[3].1.rps);
    let mut out = format!(
        "## L7 proxy: direct vs nginx vs gateway vs LiteLLM\n\nCommand: `cargo xtask bench l7` (seconds per run: {secs}). \
         Machine: {}. One mock-llm upstream (release, 1 worker thread, 16-token non-stream chat \
         completions); the load generator, the proxy and the mock share the machine's 2 cores, and \
         run-to-run variation on this VM is about 20%.\n\n\
         LiteLLM {LITELLM_VERSION} runs its proxy (`litellm --config`, one uvicorn worker) with two deployments \
         of the same mock and a master key. CPU is the target process's user + system time (nginx: master and \
         workers; direct: the mock) during the peak run, per 10,000 requests, as total (user + system); peak RSS is sampled every 100 ms.\n\n\
         Peak (wrk -t1 -c{CONNECTIONS}, closed loop):\n\n| target | requests/s | p50 | p99 | p99.9 | CPU s / 10k requests (user + system) | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|\n",
        record::machine()
    );
    for (name, w, cpu, rss) in peak {
        out.push_str(&format!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ({:.2} + {:.2}) | {:.1} MiB |\n",
            w.rps,
            w.p50 / 1e3,
            w.p99 / 1e3,
            w.p999 / 1e3,
            cpu.total(),
            cpu.user,
            cpu.system,
            *rss as f64 / 1024.0
        ));
    }
    out.push_str(&format!(
        "\nGateway / nginx throughput: **{:.2}x** (target >= 1.2). Gateway / LiteLLM: **{:.0}x** (target >= 50).\n",
        gw_rps / nginx_rps,
        gw_rps / litellm_rps
    ));
    let (ngx_cpu, gw_cpu) = (&peak[1].2, &peak[2].2);
    let budget = ngx_cpu.total() / 1.2;
    out.push_str(&format!(
        "\nWhat 1.2x would take: on the same cores, 1.2x nginx's requests/s needs the gateway to spend at most \
         {budget:.2} CPU s per 10k requests (nginx's {:.2} / 1.2; less still, since the generator and the mock \
         share the cores). Its kernel time alone, the two sockets' TCP work that nginx pays too ({:.2} s for \
         nginx), is {:.2} s, which leaves {:.2} s for user space: now {:.2} s, nginx's own is {:.2} s.\n",
        ngx_cpu.total(),
        ngx_cpu.system,
        gw_cpu.system,
        (budget - gw_cpu.system).max(0.0),
        gw_cpu.user,
        ngx_cpu.user,
    ));
    out.push_str(
        "\nHTTP/2 clients and TLS termination (ECDSA P-256 certificate; upstream is plain HTTP/1.1 in every case):\n\n\
         | protocol | nginx requests/s | gateway requests/s | gateway / nginx | nginx latency | gateway latency |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (p, n, g, kind) in protocols {
        out.push_str(&format!(
            "| {p} | {:.0} | {:.0} | {:.2}x | {:.2} ms {kind} | {:.2} ms {kind} |\n",
            n.0,
            g.0,
            g.0 / n.0,
            n.1 / 1e3,
            g.1 / 1e3
        ));
    }
    for (rate, runs) in fixed {
        out.push_str(&format!(
            "\nOpen loop at {rate} requests/s over 32 connections ({OPEN_LOOP_ROUNDS} alternating rounds, \
             pooled), latency from each request's scheduled start:\n\n\
             | target | p50 | p99 | p99.9 | added p50 vs direct | added p99 vs direct | errors | machine's worst stall |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        let direct = &runs[0].1;
        for (name, l) in runs {
            let added = |p: f64| {
                if *name == "direct" {
                    "-".into()
                } else {
                    format!("{:.2} ms", (l.pct(p) - direct.pct(p)) / 1e3)
                }
            };
            out.push_str(&format!(
                "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} | {} | {:.1} ms |\n",
                l.pct(0.5) / 1e3,
                l.pct(0.99) / 1e3,
                l.pct(0.999) / 1e3,
                added(0.5),
                added(0.99),
                l.errors(),
                l.worst_stall / 1e3
            ));
        }
        if direct.pct(0.99) > 5_000.0 {
            out.push_str(
                "\nAt this rate even the direct baseline queues: the generator and the mock saturate the \
                 2 cores, so these figures measure the machine, not the proxy.\n",
            );
        }
    }
    out.push_str(
        "\nThe last column is the longest one of the generator's watcher threads (one pinned to each \
         CPU, sleeping 2 ms at a time beside the load) woke late during that target's runs: a stall \
         of that CPU, which every request in flight there then carries whatever it was sent to.\n\
         \nTarget: added p99 <= 0.5 ms at 1,000 requests/s.\n",
    );
    println!("\n{out}");
    record::section("l7", &out)
}

pub(super) fn sha256_hex(s: &str) -> Result<String> {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("piped").write_all(s.as_bytes())?;
            c.wait_with_output()
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned())
}
