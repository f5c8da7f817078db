//! `cargo xtask bench instructions`: how many user-space instructions the
//! gateway executes per proxied request (auth, routing, balancing, the
//! upstream exchange, usage accounting, metrics), counted by callgrind.
//!
//! Requests/s on this 2-core VM moves by +-20% from run to run; an
//! instruction count does not, so this is the figure to compare before and
//! after a change to the request path. It leaves out the kernel's share
//! (the TCP work in `writev`/`recvfrom`, about half of the gateway's CPU
//! time under wrk) and says nothing about cache misses or waiting.
//!
//! The gateway (release) runs under `valgrind --tool=callgrind` in front of
//! the release mock; wrk warms it, the counters are zeroed, wrk drives
//! `seconds` of load over 8 connections, and the counters are dumped. nginx,
//! the peer, is counted the same way after it, as one process, so the two
//! figures come from the same run on the same load. `--access-log` turns
//! both proxies' access logs on; `--h2` drives HTTP/2 clients with h2load
//! (8 connections of 10 streams) instead, against nginx's h2c port.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{l7, record};
use crate::util::{self, root, step, wait_for_port, Children};

/// What the counted load is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// wrk's HTTP/1.1, access logs off.
    Plain,
    /// wrk's HTTP/1.1 with both proxies' access logs on.
    AccessLog,
    /// h2load's HTTP/2 (cleartext, prior knowledge), access logs off.
    Http2,
}

impl Variant {
    fn section(self) -> &'static str {
        match self {
            Variant::Plain => "instructions",
            Variant::AccessLog => "instructions-access",
            Variant::Http2 => "instructions-h2",
        }
    }
}

pub fn run(seconds: u64, variant: Variant) -> Result<()> {
    let mut tools = vec!["valgrind", "callgrind_control", "callgrind_annotate"];
    if variant == Variant::Http2 {
        tools.push("h2load");
    }
    for tool in tools {
        if Command::new(tool)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            bail!("{tool} not found: `cargo xtask setup` installs valgrind and h2load");
        }
    }
    let access_log = variant == Variant::AccessLog;
    let bin = util::build_release_bins()?;
    let section = variant.section();
    let dir = root().join("target/bench").join(section);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut procs = Children::default();
    let mock = l7::start_mock(&bin, &mut procs, "bench")?;
    let load = if variant == Variant::Http2 {
        let body = dir.join("body.json");
        std::fs::write(&body, l7::BODY)?;
        Load::H2load(body)
    } else {
        let script = dir.join("post.lua");
        l7::post_script(&script, l7::BODY)?;
        Load::Wrk(script)
    };

    // One worker, as nginx runs one process here: each event loop then
    // batches the same share of the load.
    let (conf, port) = l7::gateway_config(&dir, &format!("http://{mock}"), "workers = 1")?;
    let mut gateway = Command::new(bin.join("gateway"));
    gateway.arg("--config").arg(&conf).arg("run").env(
        "GATEWAY_LOG",
        if access_log {
            "warn,access=info"
        } else {
            "warn"
        },
    );
    let gw = count(
        "the gateway",
        &dir.join("gateway"),
        gateway,
        port,
        &load,
        seconds,
    )?;

    // nginx as the bench's peer, configured as in `bench l7` (least_conn,
    // keepalive upstream, the key checked by a map) but as one process,
    // so that one callgrind counts all of its work.
    let ngx_dir = dir.join("nginx");
    let (ngx_conf, (ngx_port, ngx_h2c, _)) =
        l7::nginx_config(&ngx_dir, mock, "master_process off;\nworker_processes 1;")?;
    if access_log {
        let conf = std::fs::read_to_string(&ngx_conf)?;
        let log = format!("access_log {};", ngx_dir.join("access.log").display());
        anyhow::ensure!(
            conf.contains("access_log off;"),
            "nginx.conf has no access_log line"
        );
        std::fs::write(&ngx_conf, conf.replace("access_log off;", &log))?;
    }
    let mut nginx = Command::new("nginx");
    nginx.arg("-p").arg(&ngx_dir).arg("-c").arg(&ngx_conf);
    let ngx_port = if variant == Variant::Http2 {
        ngx_h2c
    } else {
        ngx_port
    };
    let ngx = count("nginx", &ngx_dir, nginx, ngx_port, &load, seconds)?;
    drop(procs);

    let gw_costs = inclusive_costs(&gw.dump)?;
    let top = top_functions(&gw_costs, gw.total, gw.requests);
    let sha = inclusive_cost(&gw_costs, SHA256).unwrap_or(0) / gw.requests;
    let (gw_clock, ngx_clock) = (calls_into(&gw.dump, CLOCK)?, calls_into(&ngx.dump, CLOCK)?);
    let (gw_alloc, ngx_alloc) = (
        calls_into(&gw.dump, ALLOCATE)?,
        calls_into(&ngx.dump, ALLOCATE)?,
    );
    let (precise_ns, coarse_ns) = clock_read_ns();
    let digest_ns = key_digest_ns();
    let (title, flag, logs, client) = match variant {
        Variant::AccessLog => (
            ", access logs on",
            " --access-log",
            " Both proxies write their access logs: nginx its default `combined` format to a file, the \
             gateway its line (`GATEWAY_LOG=warn,access=info`) to stderr, here /dev/null.",
            "wrk, 8 connections",
        ),
        Variant::Plain => ("", "", " Access logs off on both.", "wrk, 8 connections"),
        Variant::Http2 => (
            ", HTTP/2 clients",
            " --h2",
            " Access logs off on both; the upstream side is HTTP/1.1 for both.",
            "h2load over cleartext HTTP/2 (prior knowledge), 8 connections of 10 concurrent streams",
        ),
    };
    let body = format!(
        "## Instructions per request{title} (callgrind)\n\nCommand: `cargo xtask bench instructions{flag}` (seconds: {seconds}). \
         Machine: {}. Each proxy (the release gateway with one worker; Debian's nginx as one process, otherwise \
         configured as in `bench l7`: least_conn, keepalive upstream, the API key checked by a map) under \
         callgrind in turn, in \
         front of the release mock-llm; {client}, the same 16-token non-stream chat completion as \
         `bench l7`.{logs} User space only: the kernel's TCP work, which both pay alike, is not counted.\n\n\
         | proxy | instructions per proxied request | requests | instructions |\n|---|---:|---:|---:|\n\
         | nginx | {} | {} | {} |\n| gateway | {} | {} | {} |\n\n\
         **Gateway / nginx: {:.2}x the user-space instructions per request.**\n\n\
         Clock reads per request (calls to `clock_gettime` and `gettimeofday`, which callgrind counts as a few \
         instructions each): nginx {:.2}, the gateway {:.2}. On this machine a read costs {precise_ns:.0} ns \
         (`CLOCK_MONOTONIC`; {coarse_ns:.0} ns for `CLOCK_MONOTONIC_COARSE`), timed by this command.\n\n\
         Heap allocations per request (calls to `malloc`, `posix_memalign` and the like from outside the \
         allocator; nginx carves most of a request's memory from per-request pools, which count here as the \
         blocks they take): nginx {:.2}, the gateway {:.2}.\n\n\
         Of the gateway's count, {sha} per request are the SHA-256 of the presented API key (`{SHA256}`; \
         nginx compares the key itself in its map). Under valgrind that digest runs the portable code: \
         valgrind does not offer the CPU's SHA extensions{}, which the gateway uses when they are there. \
         Natively that block takes {digest_ns:.0} ns on this machine, timed by this command; \
         the rest of the gateway's count is {:.2}x nginx's.\n\n\
         The gateway's own functions, inclusive of what they call (the runtime and the code that polls them are outside them):\n\n| function | instructions per request | share |\n|---|---:|---:|\n{top}",
        record::machine(),
        ngx.per_request(),
        ngx.requests,
        ngx.total,
        gw.per_request(),
        gw.requests,
        gw.total,
        gw.per_request() as f64 / ngx.per_request() as f64,
        ngx_clock as f64 / ngx.requests as f64,
        gw_clock as f64 / gw.requests as f64,
        ngx_alloc as f64 / ngx.requests as f64,
        gw_alloc as f64 / gw.requests as f64,
        if sha_extensions() {
            " (this CPU has them)"
        } else {
            " (this CPU has none either)"
        },
        gw.per_request().saturating_sub(sha) as f64 / ngx.per_request() as f64,
    );
    println!("\n{body}");
    record::section(section, &body)
}

/// What callgrind counted over one proxy's measured load.
struct Counted {
    requests: u64,
    total: u64,
    dump: PathBuf,
}

impl Counted {
    fn per_request(&self) -> u64 {
        self.total / self.requests
    }
}

/// The load generator a count runs, with its request body.
enum Load {
    /// wrk, 8 connections, with the POST script at this path.
    Wrk(PathBuf),
    /// h2load, 8 connections x 10 streams, with the body at this path.
    H2load(PathBuf),
}

impl Load {
    /// Drives about `secs` seconds of load (h2load runs a request count,
    /// see [`H2_RATE`]) at `port`; returns the requests completed.
    fn drive(&self, port: u16, secs: u64) -> Result<u64> {
        let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
        match self {
            Load::Wrk(script) => wrk8(&url, script, secs),
            Load::H2load(body) => h2load8(&url, body, secs * H2_RATE),
        }
    }
}

/// Requests per second of load for h2load, which runs a count rather than
/// a duration (at a deadline it counts the requests in flight as failed):
/// about what either proxy serves under callgrind here.
const H2_RATE: u64 = 1_500;

/// Runs `program` (a proxy listening on 127.0.0.1:`port`) under callgrind
/// with its dumps in `dir`: `load` warms it for 3 s, the counters are
/// zeroed, `load` runs for `seconds`, and the counters are dumped.
fn count(
    name: &str,
    dir: &Path,
    program: Command,
    port: u16,
    load: &Load,
    seconds: u64,
) -> Result<Counted> {
    std::fs::create_dir_all(dir)?;
    step(&format!("bench: starting {name} under callgrind"));
    let mut procs = Children::default();
    procs.0.push(
        Command::new("valgrind")
            .args(["--tool=callgrind", "--dump-instr=no"])
            .arg(format!(
                "--callgrind-out-file={}",
                dir.join("callgrind.out").display()
            ))
            .arg(program.get_program())
            .args(program.get_args())
            .envs(program.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting valgrind")?,
    );
    let pid = procs.0.last().expect("valgrind").id().to_string();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(addr, &mut procs)?;
    step(&format!("bench: warming {name} up (3 s)"));
    let _ = load.drive(port, 3)?;
    callgrind_control(&["-z", &pid])?;
    step(&format!("bench: counting {name} over {seconds} s of load"));
    let requests = load.drive(port, seconds)?;
    callgrind_control(&["-d", &pid])?;
    drop(procs);
    if requests == 0 {
        bail!("no requests completed through {name} under callgrind");
    }
    let dump = newest_dump(dir)?;
    let total = totals(&dump)?;
    Ok(Counted {
        requests,
        total,
        dump,
    })
}

/// One wrk run with 8 connections; returns the requests completed.
fn wrk8(url: &str, script: &Path, secs: u64) -> Result<u64> {
    let out = Command::new("wrk")
        .args(["-t1", "-c8", &format!("-d{secs}s"), "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!("wrk against {url} failed or saw errors:\n{text}");
    }
    text.lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no request count in wrk output")
}

/// One h2load run of `requests` over 8 connections of 10 streams each;
/// returns the requests completed, all of them with a 2xx answer.
fn h2load8(url: &str, body: &Path, requests: u64) -> Result<u64> {
    let (exited_well, text) = l7::post_h2load(&["-c8", "-m10", "-t1"], requests, body, url)?;
    let ok = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("status codes: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    match ok {
        Some(n) if exited_well && n == requests => Ok(n),
        _ => bail!("h2load against {url} failed or saw errors:\n{text}"),
    }
}

fn callgrind_control(args: &[&str]) -> Result<()> {
    let s = Command::new("callgrind_control")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running callgrind_control")?;
    if !s.success() {
        bail!("callgrind_control {args:?} failed");
    }
    Ok(())
}

/// The dump `callgrind_control -d` wrote (`callgrind.out.N`, newest).
fn newest_dump(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("callgrind.out.")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .context("callgrind wrote no dump")
}

/// The event total of a dump (its `totals:` or `summary:` line).
fn totals(dump: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(dump)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .context("no totals in the callgrind dump")
}

/// The gateway's own functions with the most inclusive cost (callees
/// included), as table rows. (This callgrind's self-cost view lumps a
/// zeroed-then-dumped profile into the thread's entry function.)
fn top_functions(inclusive: &str, total: u64, requests: u64) -> String {
    let mut rows = String::new();
    // Lines look like: "12,345 ( 1.23%)  ???:name [/path/binary]".
    for line in inclusive
        .lines()
        .skip_while(|l| !l.contains("file:function"))
        .filter(|l| l.contains("???:gateway::") && !l.contains("spawn_connection"))
        .take(15)
    {
        let Some((count, rest)) = line.trim().split_once(' ') else {
            continue;
        };
        let Ok(n) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        let name = rest.split("???:").nth(1).unwrap_or(rest);
        let name = name.split(" [").next().unwrap_or(name).replace('|', "\\|");
        rows.push_str(&format!(
            "| `{name}` | {} | {:.1}% |\n",
            n / requests,
            n as f64 * 100.0 / total as f64
        ));
    }
    rows
}

/// A dump's functions with their inclusive costs, as
/// `callgrind_annotate --inclusive=yes` prints them.
fn inclusive_costs(dump: &Path) -> Result<String> {
    let out = Command::new("callgrind_annotate")
        .arg("--inclusive=yes")
        .arg(dump)
        .output()
        .context("running callgrind_annotate")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The inclusive cost of the function named `name` (path included, as
/// callgrind names it) in `callgrind_annotate --inclusive=yes` output.
fn inclusive_cost(inclusive: &str, name: &str) -> Option<u64> {
    inclusive.lines().find_map(|line| {
        let (count, rest) = line.trim().split_once(' ')?;
        let function = rest.split_once(':')?.1.split(" [").next()?;
        (function == name)
            .then(|| count.replace(',', "").parse().ok())
            .flatten()
    })
}

/// SHA-256's block function, where the key digest spends its
/// instructions.
const SHA256: &str = "sha2::sha256::compress256";

/// Nanoseconds per call of [`SHA256`] on one block (an API key's digest
/// is one block: a key of up to 55 bytes and its padding) on this
/// machine, from 1,000,000 calls. The function is not generic, so it runs
/// as `sha2` was built (optimized, see the workspace's Cargo.toml), not as
/// this unoptimized xtask is.
fn key_digest_ns() -> f64 {
    use sha2::digest::generic_array::GenericArray;
    const CALLS: u32 = 1_000_000;
    let key = b"sk-bench-0123456789abcdef0123456789abcdef";
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    block[key.len()] = 0x80;
    block[56..].copy_from_slice(&(key.len() as u64 * 8).to_be_bytes());
    let blocks = [GenericArray::from(block)];
    let mut state = [0u32; 8];
    let start = std::time::Instant::now();
    for _ in 0..CALLS {
        sha2::compress256(
            std::hint::black_box(&mut state),
            std::hint::black_box(&blocks),
        );
    }
    start.elapsed().as_nanos() as f64 / CALLS as f64
}

/// Whether this CPU has the SHA extensions (`sha_ni` in /proc/cpuinfo).
fn sha_extensions() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|flag| flag == "sha_ni"))
}

/// The clock's entry points (what `Instant::now()` and nginx's time
/// cache call; glibc resolves `gettimeofday` to `__gettimeofday_syscall`
/// where the vDSO does not serve it).
const CLOCK: &[&str] = &[
    "clock_gettime",
    "__clock_gettime",
    "gettimeofday",
    "__gettimeofday",
    "__gettimeofday_syscall",
];

/// The allocators' entry points: glibc's (nginx) and mimalloc's as Rust's
/// global allocator calls it (the gateway). A `realloc` counts as one
/// allocation: the growth of a buffer costs about what a new one does.
const ALLOCATE: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
    "memalign",
    "aligned_alloc",
    "mi_malloc",
    "mi_malloc_aligned",
    "mi_zalloc_aligned",
    "mi_realloc_aligned",
];

/// Calls into any of `names` in a dump, from outside them and outside the
/// allocators' own internals: the call counts of their callers, from
/// `callgrind_annotate --tree=caller`, whose blocks list a function's
/// callers ("<" lines, each with its call count as "(N x)") above the
/// function ("*" line), blocks separated by blank lines.
fn calls_into(dump: &Path, names: &[&str]) -> Result<u64> {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--tree=caller", "--threshold=100"])
        .arg(dump)
        .output()
        .context("running callgrind_annotate")?;
    Ok(count_calls(&String::from_utf8_lossy(&out.stdout), names))
}

fn count_calls(tree: &str, names: &[&str]) -> u64 {
    // "file:function[@version] (N x) [object]" or "file:function [object]"
    // after the marker: the file and the function's name.
    let function = |line: &str, marker: &str| -> Option<(String, String)> {
        let (_, rest) = line.split_once(marker)?;
        let (file, name) = rest.trim_start().split_once(':')?;
        let end = name
            .find(" (")
            .or_else(|| name.find(" ["))
            .unwrap_or(name.len());
        let name = name[..end].trim();
        let name = name.split_once('@').map_or(name, |(n, _)| n);
        Some((file.to_owned(), name.to_owned()))
    };
    // An entry point calling another (glibc's `realloc` of nothing calls
    // `malloc`), or the allocator's own code calling one, is not a new call.
    let internal = |(file, f): &(String, String)| {
        names.contains(&f.as_str())
            || f.starts_with("mi_")
            || f.starts_with("_mi_")
            || file.contains("/malloc/")
    };
    let mut calls = 0;
    for block in tree.split("\n\n") {
        let target = block
            .lines()
            .find_map(|l| function(l, "*  "))
            .is_some_and(|(_, f)| names.contains(&f.as_str()));
        if !target {
            continue;
        }
        for line in block.lines().filter(|l| l.contains("< ")) {
            if function(line, "< ").is_some_and(|f| internal(&f)) {
                continue;
            }
            let count = line
                .rsplit_once("x)")
                .and_then(|(head, _)| head.rsplit_once(" ("))
                .and_then(|(_, n)| n.replace(',', "").parse::<u64>().ok());
            calls += count.unwrap_or(0);
        }
    }
    calls
}

/// Nanoseconds per read of `CLOCK_MONOTONIC` (what `Instant::now()`
/// reads) and of `CLOCK_MONOTONIC_COARSE` on this machine, from 2,000,000
/// reads of each, less the same loop without the read (xtask is built
/// without optimizations).
fn clock_read_ns() -> (f64, f64) {
    let per_iteration = |clock: Option<libc::clockid_t>| {
        const READS: u32 = 2_000_000;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let start = std::time::Instant::now();
        for _ in 0..READS {
            if let Some(clock) = clock {
                // SAFETY: `ts` is a valid timespec to write.
                unsafe { libc::clock_gettime(clock, &mut ts) };
            }
            std::hint::black_box(&mut ts);
        }
        start.elapsed().as_nanos() as f64 / READS as f64
    };
    let bare = per_iteration(None);
    (
        (per_iteration(Some(libc::CLOCK_MONOTONIC)) - bare).max(0.0),
        (per_iteration(Some(libc::CLOCK_MONOTONIC_COARSE)) - bare).max(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks as `callgrind_annotate --tree=caller` prints them.
    const TREE: &str = "\
  1,000 ( 1.00%)  < ???:ngx_memalign (300x) [/usr/sbin/nginx]
  1,000 ( 1.00%)  *  ./malloc/./malloc/malloc.c:posix_memalign [/usr/lib/libc.so.6]

  2,000 ( 2.00%)  < ./malloc/./malloc/malloc.c:_mid_memalign.constprop.0 (300x) [/usr/lib/libc.so.6]
  1,000 ( 1.00%)  < ???:ngx_alloc (200x) [/usr/sbin/nginx]
  3,000 ( 3.00%)  *  ./malloc/./malloc/malloc.c:malloc [/usr/lib/libc.so.6]

  5,000 ( 5.00%)  < ???:gateway::pipeline::serve::{{closure}} (1,500x) [/gateway]
  5,000 ( 5.00%)  < ???:mi_realloc_aligned (7x) [/gateway]
  9,000 ( 9.00%)  *  ???:mi_malloc_aligned [/gateway]

  4,000 ( 4.00%)  < ???:std::time::Instant::now (40x) [/gateway]
  4,000 ( 4.00%)  *  ./time/../sysdeps/unix/sysv/linux/clock_gettime.c:clock_gettime@@GLIBC_2.17 [/usr/lib/libc.so.6]

  1,000 ( 1.00%)  < ???:ngx_time_update (5x) [/usr/sbin/nginx]
  1,000 ( 1.00%)  *  ./time/../sysdeps/unix/sysv/linux/gettimeofday.c:__gettimeofday_syscall [/usr/lib/libc.so.6]

  1,000 ( 1.00%)  < ???:gateway::clock::coarse (10x) [/gateway]
  1,000 ( 1.00%)  *  ???:gateway::clock::clock_gettime_like [/gateway]
";

    #[test]
    fn counts_calls_from_outside_the_allocators() {
        // posix_memalign 300 + malloc from ngx_alloc 200 (not the 300
        // from glibc's own memalign) + 1,500 from the gateway (not the 7
        // from mimalloc's realloc).
        assert_eq!(count_calls(TREE, ALLOCATE), 2000);
    }

    #[test]
    fn finds_a_functions_inclusive_cost_by_exact_name() {
        let costs = "\
--------------------------------------------------------------------------------
Ir                      file:function
--------------------------------------------------------------------------------
1,234,567 (50.00%)  ???:gateway::pipeline::auth::authenticate [/gateway]
  987,654 (40.00%)  ???:sha2::sha256::compress256 [/gateway]
    1,000 ( 0.01%)  ???:sha2::sha256::compress256_soft [/gateway]
";
        assert_eq!(inclusive_cost(costs, SHA256), Some(987_654));
        assert_eq!(inclusive_cost(costs, "sha2::sha256"), None);
    }

    #[test]
    fn counts_clock_reads_by_exact_name() {
        assert_eq!(count_calls(TREE, CLOCK), 45);
    }
}
