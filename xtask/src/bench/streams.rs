//! A streaming load generator: N concurrent SSE completions, each on its
//! own connection, started evenly over a ramp. For every stream it records
//! the time to the first body chunk (from the moment the request is sent)
//! and the gap between consecutive chunks; and it samples the resident
//! memory and CPU time of the process under test while the streams run.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// What one run of N streams measured.
pub struct StreamRun {
    /// Time to first chunk, microseconds, one per completed stream (sorted).
    pub ttft: Vec<f64>,
    /// Gaps between chunks, microseconds (sorted).
    pub gaps: Vec<f64>,
    pub completed: usize,
    pub errors: usize,
    /// First error seen, to show.
    pub first_error: Option<String>,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `n` streams against `url` (started over `ramp`), each asking for
/// `tokens` chunks `interval_ms` apart (mock-llm's x-mock-* headers).
pub fn run(
    url: &str,
    auth: Option<&str>,
    n: usize,
    tokens: u32,
    interval_ms: u64,
    ramp: Duration,
) -> Result<StreamRun> {
    let uri: hyper::Uri = url.parse().context("stream URL")?;
    let addr = format!(
        "{}:{}",
        uri.host().context("URL host")?,
        uri.port_u16().unwrap_or(80)
    );
    let body = Bytes::from(
        r#"{"model":"bench-model","stream":true,"messages":[{"role":"user","content":"stream please"}]}"#,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let auth = auth.map(str::to_owned);
    rt.block_on(async move {
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let at = start + ramp.mul_f64(i as f64 / n as f64);
            let (addr, uri, body, auth) = (addr.clone(), uri.clone(), body.clone(), auth.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                one(&addr, uri, body, auth.as_deref(), tokens, interval_ms).await
            }));
        }
        let mut out = StreamRun {
            ttft: Vec::with_capacity(n),
            gaps: Vec::with_capacity(n * tokens as usize),
            completed: 0,
            errors: 0,
            first_error: None,
        };
        for t in tasks {
            match t.await {
                Ok(Ok((ttft, gaps))) => {
                    out.completed += 1;
                    out.ttft.push(ttft);
                    out.gaps.extend(gaps);
                }
                Ok(Err(e)) => {
                    out.errors += 1;
                    out.first_error.get_or_insert(format!("{e:#}"));
                }
                Err(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert(e.to_string());
                }
            }
        }
        out.ttft.sort_by(f64::total_cmp);
        out.gaps.sort_by(f64::total_cmp);
        Ok(out)
    })
}

async fn one(
    addr: &str,
    uri: hyper::Uri,
    body: Bytes,
    auth: Option<&str>,
    tokens: u32,
    interval_ms: u64,
) -> Result<(f64, Vec<f64>)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::post(uri.path())
        .header("host", addr)
        .header("content-type", "application/json")
        .header("x-mock-tokens", tokens.to_string())
        .header("x-mock-interval-ms", interval_ms.to_string());
    if let Some(k) = auth {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Full::new(body))?;
    let sent = Instant::now();
    let resp = send.send_request(req).await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let mut body = resp.into_body();
    let mut first = None;
    let mut last = sent;
    let mut gaps = Vec::with_capacity(tokens as usize);
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        match first {
            None => first = Some(now - sent),
            Some(_) => gaps.push((now - last).as_secs_f64() * 1e6),
        }
        last = now;
        done |= memchr_done(data);
    }
    anyhow::ensure!(done, "stream ended without [DONE]");
    Ok((first.context("no body")?.as_secs_f64() * 1e6, gaps))
}

fn memchr_done(b: &[u8]) -> bool {
    b.windows(6).any(|w| w == b"[DONE]")
}

/// Resident memory (KiB) and CPU time (seconds) of a process and its
/// descendants (nginx's workers), read from /proc.
pub fn usage(pid: u32) -> (u64, f64) {
    let t = tree_usage(pid);
    (t.rss_kib, t.user + t.system)
}

/// What a process and its descendants use: resident memory (KiB), and CPU
/// seconds in user space and in the kernel.
pub struct TreeUsage {
    pub rss_kib: u64,
    pub user: f64,
    pub system: f64,
}

pub fn tree_usage(pid: u32) -> TreeUsage {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        pids.extend(children(pids[i]));
        i += 1;
    }
    let tick = 100.0; // USER_HZ
    let mut t = TreeUsage {
        rss_kib: 0,
        user: 0.0,
        system: 0.0,
    };
    for p in pids {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            t.rss_kib += s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the command (which may hold spaces) start at ')'.
            let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 (1-based); rest starts at field 3.
            if f.len() > 13 {
                t.user += f[11].parse::<f64>().unwrap_or(0.0) / tick;
                t.system += f[12].parse::<f64>().unwrap_or(0.0) / tick;
            }
        }
    }
    t
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
            if rest.split_whitespace().nth(1) == Some(&pid.to_string()) {
                out.push(p);
            }
        }
    }
    out
}

/// Samples `usage(pid)` every 100 ms on a thread until stopped; returns
/// the peak RSS.
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(usage(pid).0);
                std::thread::sleep(Duration::from_millis(100));
            }
            peak.max(usage(pid).0)
        });
        Sampler { stop, thread }
    }

    pub fn peak_kib(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Lets this process and its children open `n` files: the soft limit is
/// raised to the hard one, and as root both to `n`.
pub fn raise_nofile(n: u64) {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = libc::rlimit {
            rlim_cur: n.max(lim.rlim_cur),
            rlim_max: n.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// CPU time all cores spent busy (not idle or waiting on I/O), seconds,
/// from /proc/stat: with the run's wall time, how saturated the machine was.
fn busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / 100.0 // USER_HZ
}

/// One row of the streaming table.
struct Row {
    target: &'static str,
    streams: usize,
    run: StreamRun,
    /// Peak RSS minus idle RSS, KiB (None for direct: no proxy).
    rss_growth: Option<u64>,
    peak_rss: Option<u64>,
    cpu: Option<f64>,
    /// Busy cores of the whole machine over the run (generator, proxy and
    /// mock together).
    busy_cores: f64,
}

/// `cargo xtask bench streams`: N concurrent SSE streams through nginx and
/// the gateway, and directly, over one mock-llm.
pub fn bench(counts: &[usize], tokens: u32, interval_ms: u64) -> Result<()> {
    use super::{l7, record};
    use crate::util::{self, root, step, wait_for_port};
    use std::net::SocketAddr;

    raise_nofile(65536);
    let bin = util::build_release_bins()?;
    let dir = root().join("target/bench/streams");
    let l7::Stack {
        mut procs,
        mock,
        nginx: (ngx, ngx_pid),
        gateway: (gw, gw_pid),
        ..
    } = l7::Stack::start(&bin, &dir, "max_connections_per_ip = 100000")?;
    // The same gateway with one multiplexed HTTP/2 connection per worker
    // to the upstream: one file descriptor per stream instead of two.
    let gw2 = l7::start_gateway_to(
        &bin,
        &dir.join("h2c"),
        &mut procs,
        &format!("h2c://{mock}"),
        "max_connections_per_ip = 100000",
    )?;
    let gw2_pid = procs.0.last().expect("gateway").id();
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], gw2)), &mut procs)?;
    let targets: [(&'static str, String, Option<u32>); 4] = [
        ("direct", format!("http://{mock}/v1/chat/completions"), None),
        (
            "nginx",
            format!("http://127.0.0.1:{ngx}/v1/chat/completions"),
            Some(ngx_pid),
        ),
        (
            "gateway",
            format!("http://127.0.0.1:{gw}/v1/chat/completions"),
            Some(gw_pid),
        ),
        (
            "gateway, h2c upstream",
            format!("http://127.0.0.1:{gw2}/v1/chat/completions"),
            Some(gw2_pid),
        ),
    ];
    let mut rows = Vec::new();
    for &n in counts {
        // Start the streams over a second per thousand (at least one).
        let ramp = Duration::from_millis((n as u64).max(1000));
        for (name, url, pid) in &targets {
            step(&format!(
                "bench: {n} streams of {tokens} chunks every {interval_ms} ms via {name}"
            ));
            let before = pid.map(usage);
            let sampler = pid.map(Sampler::start);
            let (busy0, t0) = (busy_seconds(), std::time::Instant::now());
            let run = run(url, Some(l7::KEY), n, tokens, interval_ms, ramp)?;
            let busy_cores = (busy_seconds() - busy0) / t0.elapsed().as_secs_f64();
            let peak = sampler.map(Sampler::peak_kib);
            let after = pid.map(usage);
            println!(
                "{name} x{n}: {} ok, {} errors, ttft p50 {:.2} ms p99 {:.2} ms, gap p99 {:.2} ms, {busy_cores:.2} busy cores{}",
                run.completed,
                run.errors,
                percentile(&run.ttft, 0.5) / 1e3,
                percentile(&run.ttft, 0.99) / 1e3,
                percentile(&run.gaps, 0.99) / 1e3,
                run.first_error
                    .as_deref()
                    .map(|e| format!(" (first error: {e})"))
                    .unwrap_or_default()
            );
            rows.push(Row {
                target: name,
                streams: n,
                rss_growth: before.zip(peak).map(|(b, p)| p.saturating_sub(b.0)),
                peak_rss: peak,
                cpu: before.zip(after).map(|(b, a)| a.1 - b.1),
                busy_cores,
                run,
            });
        }
    }
    let ms = |us: f64| format!("{:.2}", us / 1e3);
    let mut out = format!(
        "## Streaming: concurrent SSE streams\n\nCommand: `cargo xtask bench streams`. Machine: {}. Each stream is one \
         connection asking mock-llm (release, 1 worker thread) for {tokens} chunks {interval_ms} ms apart; the \
         streams start evenly over max(1 s, N ms). Time to first token (TTFT) is from sending the request to the \
         first body chunk; gaps are between consecutive chunks. \"added\" is the difference to direct at the same \
         N. RSS growth is the proxy's peak resident memory during the run minus its resident memory before it \
         (nginx: master and workers). The generator, the proxy and the mock share the 2 cores; \"busy\" is the cores the \
         whole machine kept busy during the run (of 2): at {} streams ({} chunks/s) the machine itself is the \
         bottleneck for every target, direct included. This VM caps a \
         process at 20,000 open files (the hard limit cannot be raised here), so a single-process proxy with \
         HTTP/1.1 upstreams, which needs two descriptors per stream, cannot hold 10,000 streams; the \
         \"h2c upstream\" gateway multiplexes its upstream streams over one connection per worker.\n\n\
         | streams | target | ok / errors | TTFT p50 (ms) | TTFT p99 (ms) | added TTFT p99 | gap p50 | gap p99 | added gap p99 | RSS growth | per stream | peak RSS | CPU s | busy |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        record::machine(),
        counts.iter().max().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0) as u64 * 1000 / interval_ms.max(1),
    );
    for r in &rows {
        let direct = rows
            .iter()
            .find(|d| d.target == "direct" && d.streams == r.streams)
            .expect("direct row");
        let added = |f: fn(&StreamRun) -> f64| {
            if r.target == "direct" {
                "-".to_owned()
            } else {
                ms(f(&r.run) - f(&direct.run))
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            r.streams,
            r.target,
            r.run.completed,
            r.run.errors,
            ms(percentile(&r.run.ttft, 0.5)),
            ms(percentile(&r.run.ttft, 0.99)),
            added(|x| percentile(&x.ttft, 0.99)),
            ms(percentile(&r.run.gaps, 0.5)),
            ms(percentile(&r.run.gaps, 0.99)),
            added(|x| percentile(&x.gaps, 0.99)),
            r.rss_growth
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            r.rss_growth.map_or("-".into(), |k| format!(
                "{:.1} KiB",
                k as f64 / r.streams as f64
            )),
            r.peak_rss
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            r.cpu.map_or("-".into(), |c| format!("{c:.1}")),
            r.busy_cores,
        ));
    }
    out.push_str(
        "\nTargets: 10,000 concurrent streams within 150 MB RSS; added TTFT p99 <= 1 ms at 1,000 streams.\n",
    );
    println!("\n{out}");
    record::section("streams", &out)
}
