//! Drop rate of a flood on a veth: the gateway's XDP program (native mode,
//! the source on the blocklist) against the same flood dropped by an
//! nftables rule in the raw prerouting hook.
//!
//! Two namespaces joined by a veth pair (10.200.0.1 -> 10.200.0.2, created
//! here and deleted afterwards). The flood comes from `BPF_PROG_TEST_RUN`
//! in live-frames mode: the `gateway_bench_tx` program sends every frame
//! out of the generator's veth (`XDP_TX`), so the peer receives at the rate
//! one core can produce, with no NIC and no external tool.
//!
//! Run: `cargo xtask bench veth` (root). Prints a table and leaves it in
//! target/bench/veth.md, which xtask records in docs/benchmarks.md.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{xdp::XdpMode, TestRun as _, TestRunAttrs, TestRunOptions};
use gateway::kernel::loader;
use gateway_common::{
    cidr::Cidr,
    packet::{craft::Frame, TCP_SYN},
    BlockValue, Limits, Reason,
};

const GEN: &str = "gwbench-gen";
const DUT: &str = "gwbench-dut";
const SECONDS: u64 = 5;
const PORT: u16 = 8443;
/// Frames per BPF_PROG_TEST_RUN call, and per batch inside it.
const REPEAT: u32 = 1_000_000;
const BATCH: u32 = 64;

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves this thread into a named network namespace.
fn enter(ns: &str) -> Result<()> {
    let f = File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

struct Topology;

impl Topology {
    fn create() -> Result<Topology> {
        Self::delete();
        for ns in [GEN, DUT] {
            sh(&["ip", "netns", "add", ns])?;
        }
        let t = Topology;
        sh(&[
            "ip", "link", "add", "vg", "netns", GEN, "type", "veth", "peer", "name", "vd", "netns",
            DUT,
        ])?;
        sh(&["ip", "-n", GEN, "addr", "add", "10.200.0.1/24", "dev", "vg"])?;
        sh(&["ip", "-n", DUT, "addr", "add", "10.200.0.2/24", "dev", "vd"])?;
        for (ns, dev) in [(GEN, "vg"), (DUT, "vd")] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        // The receiver's work in a NAPI thread of its own (GRO gives the
        // veth a NAPI path without XDP too), pinned away from the generator
        // by `pin_receiver`: what a NIC queue's softirq core does.
        sh(&[
            "ip", "netns", "exec", DUT, "ethtool", "-K", "vd", "gro", "on",
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            DUT,
            "sh",
            "-c",
            "echo 1 > /sys/class/net/vd/threaded",
        ])?;
        Ok(t)
    }

    fn delete() {
        for ns in [GEN, DUT] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        Self::delete();
    }
}

fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = sh(&["ip", "-n", ns, "-o", "link", "show", dev])?;
    let hex = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("no MAC")?;
    let mut m = [0u8; 6];
    for (i, p) in hex.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16)?;
    }
    Ok(m)
}

/// CPU time busy (not idle/iowait) over all CPUs, in seconds.
fn busy_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 5 {
        return 0.0;
    }
    let total: f64 = f.iter().sum();
    (total - f[3] - f[4]) / 100.0
}

/// The CPU the generator runs on, and the receiver's own core (the SYN
/// flood's receiver runs there).
const GEN_CPU: usize = 0;
const RX_CPU: usize = 1;

/// Where the receiver's NAPI thread runs, each dropper measured in both:
/// on a core of its own, as a NIC queue's softirq core would be, and on
/// the generator's core. The generator's frames come from its own page
/// pool; a receiver on another CPU returns each dropped page to that pool
/// across CPUs, under a lock the generator takes too, and on a VM meets it
/// in a paravirtual spinlock's slow path. On the generator's core the
/// return is local, as a NIC's receive queue recycles its pages on its own
/// core; the frame's bytes are then also still in that core's cache, which
/// a NIC's DMA does not give.
const LAYOUTS: [(usize, &str); 2] = [
    (RX_CPU, "Receiver on a core of its own (CPU 1)"),
    (GEN_CPU, "Receiver on the generator's core (CPU 0)"),
];

fn set_affinity(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "pinning {pid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// User + system CPU seconds of one task (`/proc/<pid>/stat`); 0 if the
/// file cannot be read.
fn task_cpu_seconds(stat: &str) -> f64 {
    task_cpu(stat).unwrap_or(0.0)
}

/// User + system CPU seconds of one task; `None` once it has exited.
fn task_cpu(stat: &str) -> Option<f64> {
    let s = std::fs::read_to_string(stat).ok()?;
    // Fields after the ")" closing the command name: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    (f.len() == 2).then(|| f.iter().sum::<u64>() as f64 / 100.0)
}

/// The NAPI threads of vd (one per receive queue; re-created when XDP is
/// attached or detached), pinned to `cpu`.
fn pin_receiver(cpu: usize) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with("napi/vd-") {
            set_affinity(pid, cpu)?;
            pids.push(pid);
        }
    }
    if pids.is_empty() {
        bail!("vd has no NAPI thread (threaded NAPI on a veth needs Linux >= 6.0)");
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Frames vd's XDP program dropped, by the veth's own counters (summed
/// over its receive queues).
fn veth_xdp_drops() -> Result<u64> {
    let stats = sh(&["ip", "netns", "exec", DUT, "ethtool", "-S", "vd"])?;
    let drops: Vec<u64> = stats
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| k.starts_with("rx_queue_") && k.ends_with("_xdp_drops"))
        .filter_map(|(_, v)| v.trim().parse().ok())
        .collect();
    if drops.is_empty() {
        bail!("ethtool -S vd shows no xdp_drops counter:\n{stats}");
    }
    Ok(drops.iter().sum())
}

/// CPU seconds of the NAPI threads `pids`; `None` if one has exited.
fn receiver_cpu_seconds(pids: &[i32]) -> Option<f64> {
    pids.iter()
        .map(|p| task_cpu(&format!("/proc/{p}/stat")))
        .sum()
}

/// One flood: frames sent, busy CPU seconds (all cores), the generator
/// thread's own CPU seconds, and the time taken.
struct Flood {
    sent: u64,
    busy: f64,
    generator: f64,
    elapsed: Duration,
}

/// Floods `frame` through the generator program `prog` from the generator
/// namespace, pinned to `GEN_CPU`, until `done` says so.
fn flood(frame: &[u8], prog: &str, done: impl Fn(Duration) -> bool) -> Result<Flood> {
    enter(GEN)?;
    set_affinity(0, GEN_CPU)?;
    // SAFETY: a NUL-terminated interface name.
    let ifindex = unsafe { libc::if_nametoindex(c"vg".as_ptr()) };
    if ifindex == 0 {
        bail!("no vg in {GEN}");
    }
    let mut ebpf = loader::load(None)?;
    let tx = loader::bench_program(&mut ebpf, prog)?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let start = Instant::now();
    let busy0 = busy_seconds();
    let gen0 = task_cpu_seconds("/proc/thread-self/stat");
    let mut sent = 0u64;
    while !done(start.elapsed()) {
        tx.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: REPEAT,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN (live frames)")?;
        sent += REPEAT as u64;
    }
    Ok(Flood {
        sent,
        busy: busy_seconds() - busy0,
        generator: task_cpu_seconds("/proc/thread-self/stat") - gen0,
        elapsed: start.elapsed(),
    })
}

/// One's-complement sum of big-endian 16-bit words.
/// One row of the table: floods `frame` at vd with its receiver pinned,
/// counting the row's drops with `dropped` (a running total, read before
/// and after) and the receiver's CPU time over the flood. The veth
/// re-creates its NAPI threads when a program is attached or detached, and
/// the old ones may still be exiting when a row starts: a row whose set of
/// NAPI threads changed while it ran is run again rather than reported
/// with a CPU time that misses a thread.
fn row(
    what: &'static str,
    frame: &[u8],
    cpu: usize,
    dropped: &impl Fn() -> Result<u64>,
) -> Result<Row> {
    const TRIES: u32 = 3;
    for attempt in 1..=TRIES {
        let rx = pin_receiver(cpu)?;
        let before = dropped()?;
        let rx0 = receiver_cpu_seconds(&rx);
        let run = flood(frame, "gateway_bench_tx", for_seconds)?;
        let count = dropped()? - before;
        let rx1 = receiver_cpu_seconds(&rx);
        if let (Some(rx0), Some(rx1), true) = (rx0, rx1, pin_receiver(cpu)? == rx) {
            return Ok(Row {
                what,
                dropped: count,
                receiver: rx1 - rx0,
                run,
                program_ns: None,
            });
        }
        eprintln!("{what}: vd's NAPI threads changed during the run ({attempt}/{TRIES}); again");
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("{what}: vd's NAPI threads kept changing; no receiver CPU time to report")
}

/// The row of `what` in each of the `LAYOUTS`, with the attached XDP
/// program's own time per frame when there is one (`prog`).
fn rows(
    what: &'static str,
    frame: &[u8],
    prog: Option<&aya::programs::Xdp>,
    dropped: impl Fn() -> Result<u64>,
) -> Result<[Row; 2]> {
    let one = |(cpu, _): (usize, &str)| -> Result<Row> {
        let mut r = row(what, frame, cpu, &dropped)?;
        if let Some(prog) = prog {
            r.program_ns = Some(program_ns(prog, frame)?);
        }
        Ok(r)
    };
    Ok([one(LAYOUTS[0])?, one(LAYOUTS[1])?])
}

/// Nanoseconds per run of the attached program `prog`, from the kernel's
/// BPF run-time statistics over a 1 s flood. The statistics are on only
/// for this pass (`BPF_ENABLE_STATS`, off again when the fd closes): they
/// add two clock reads per run, which the row's own figures must not pay.
fn program_ns(prog: &aya::programs::Xdp, frame: &[u8]) -> Result<f64> {
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS (run time)")?;
    let before = prog.info().context("reading the program's info")?;
    flood(frame, "gateway_bench_tx", |e| e >= Duration::from_secs(1))?;
    let after = prog.info().context("reading the program's info")?;
    let runs = after.run_count() - before.run_count();
    if runs == 0 {
        bail!("the program did not run during the statistics pass");
    }
    Ok((after.run_time() - before.run_time()).as_nanos() as f64 / runs as f64)
}

fn ones_sum(bytes: &[u8], mut sum: u32) -> u32 {
    for w in bytes.chunks(2) {
        sum += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Valid IPv4 header and TCP checksums for a frame without IP options.
fn set_checksums(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let ip = fold(ones_sum(&frame[14..34], 0));
    frame[24..26].copy_from_slice(&ip.to_be_bytes());
    frame[50..52].copy_from_slice(&[0, 0]);
    let tcp_len = (frame.len() - 34) as u32;
    let pseudo = ones_sum(&frame[26..34], 0) + 6 + tcp_len;
    let tcp = fold(ones_sum(&frame[34..], pseudo));
    frame[50..52].copy_from_slice(&tcp.to_be_bytes());
}

fn for_seconds(elapsed: Duration) -> bool {
    elapsed >= Duration::from_secs(SECONDS)
}

/// Legitimate clients under a SYN flood from 65,536 spoofed sources: their
/// connect success rate and latency with the XDP program off (the kernel's
/// SYN cookies alone) and on (per-source and global SYN budgets).
fn syn_flood(home: &File) -> Result<String> {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    const ATTEMPTS: usize = 50;
    /// Below the per-source budget (20/s), so only the flood can refuse them.
    const CLIENT_INTERVAL: Duration = Duration::from_millis(100);
    // The flood's base frame: 10.201.0.1 -> 10.200.0.2:8443 SYN; the
    // generator randomizes the source's low half per frame.
    let mut frame = Frame::v4([10, 201, 0, 1], [10, 200, 0, 2])
        .tcp(PORT, TCP_SYN)
        .build();
    frame[0..6].copy_from_slice(&mac(DUT, "vd")?);
    frame[6..12].copy_from_slice(&mac(GEN, "vg")?);
    set_checksums(&mut frame);
    let ns = |args: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", DUT];
        v.extend_from_slice(args);
        sh(&v)
    };
    // SYN-ACKs to the spoofed sources go back to the generator (and die there).
    ns(&["ip", "route", "add", "10.201.0.0/16", "via", "10.200.0.1"])?;
    let _ = ns(&["nft", "delete", "table", "ip", "gwbench"]);
    let mut table = String::from(
        "| XDP program | flood sent/s | legitimate connects ok | failed attempts (1-based) | connect p50 | connect p99 |\n|---|---:|---:|---|---:|---:|\n",
    );
    for xdp_on in [false, true] {
        let mut dut = None;
        let mut trust = None;
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/gwbench-{}", std::process::id()));
        if xdp_on {
            enter(DUT)?;
            // Pinned, as the daemon runs it, so `Trust` opens the map the
            // same way the workers do.
            let mut e = loader::load(Some(&pin))?;
            let mut maps = gateway::kernel::maps::KernelMaps::from_ebpf(&mut e, None)?;
            // The daemon's defaults: 20/s and 40 burst per source, 50,000/s in all.
            maps.set_limits(&Limits::new(20, 40, 50_000, 32, 64))?;
            maps.set_ports(&[PORT])?;
            maps.hint_rebuild([], [])?;
            loader::xdp_program(&mut e)?
                .attach("vd", XdpMode::Driver)
                .context("attaching XDP to vd in native mode")?;
            pin_receiver(RX_CPU)?;
            trust = Some(gateway::kernel::trust::Trust::open(&pin)?);
            dut = Some((e, maps));
        }
        // A listener on the protected port, accepting and closing; with XDP
        // on it records each accepted peer as the gateway's workers do.
        let stop = Arc::new(AtomicBool::new(false));
        let listener = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<()> {
                enter(DUT)?;
                let l = std::net::TcpListener::bind(("10.200.0.2", PORT))?;
                l.set_nonblocking(true)?;
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((_, peer)) => {
                            if let Some(t) = &trust {
                                t.record(peer.ip());
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
                Ok(())
            })
        };
        if !xdp_on {
            pin_receiver(RX_CPU)?;
        }
        let flooding = Arc::new(AtomicBool::new(true));
        let flooder = {
            let (frame, flooding) = (frame.clone(), Arc::clone(&flooding));
            std::thread::spawn(move || {
                flood(&frame, "gateway_bench_syn", |_| {
                    !flooding.load(Ordering::Relaxed)
                })
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        // Legitimate clients from the generator's real address.
        let client = std::thread::spawn(move || -> Result<Vec<Option<Duration>>> {
            enter(GEN)?;
            let dst = std::net::SocketAddr::from(([10, 200, 0, 2], PORT));
            let mut out = Vec::new();
            for _ in 0..ATTEMPTS {
                let t = Instant::now();
                let ok = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3)).is_ok();
                out.push(ok.then(|| t.elapsed()));
                std::thread::sleep(CLIENT_INTERVAL);
            }
            Ok(out)
        });
        let results = client.join().expect("client thread")?;
        flooding.store(false, Ordering::Relaxed);
        let Flood { sent, elapsed, .. } = flooder.join().expect("flood thread")?;
        stop.store(true, Ordering::Relaxed);
        listener.join().expect("listener thread")?;
        drop(dut);
        let _ = std::fs::remove_dir_all(&pin);
        let failed: Vec<String> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| (i + 1).to_string())
            .collect();
        let mut ok: Vec<Duration> = results.iter().flatten().copied().collect();
        ok.sort();
        let pct = |p: f64| {
            ok.get(((ok.len() as f64 - 1.0) * p).round() as usize)
                .map_or("-".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
        };
        let row = format!(
            "| {} | {:.2} M | {} / {ATTEMPTS} | {} | {} | {} |\n",
            if xdp_on { "on" } else { "off" },
            sent as f64 / elapsed.as_secs_f64() / 1e6,
            ok.len(),
            if failed.is_empty() {
                "-".to_string()
            } else {
                failed.join(", ")
            },
            pct(0.5),
            pct(0.99),
        );
        print!("{row}");
        table.push_str(&row);
    }
    // SAFETY: back to the namespace this thread started in.
    unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
    Ok(format!(
        "\nSYN flood: the same generator with `gateway_bench_syn` (65,536 random sources in 10.201.0.0/16, valid \
         checksums; SYN-ACKs are routed back to the generator namespace), while one client connects {ATTEMPTS} \
         times, 10 per second, from 10.200.0.1 to a listener on 10.200.0.2:{PORT} (3 s timeout each). XDP on: the daemon's \
         default budgets (20 SYN/s, burst 40 per source; 50,000/s in all), and the listener records each accepted \
         peer in `SYN_TRUSTED` as the gateway's workers do, so a client that connected once passes a spent global \
         budget. The kernel's SYN cookies are on in both rows.\n\n{table}"
    ))
}

struct Row {
    what: &'static str,
    run: Flood,
    dropped: u64,
    /// CPU seconds of the receiver's NAPI thread (the dropping core).
    receiver: f64,
    /// The XDP program's own time per frame (kernel BPF statistics).
    program_ns: Option<f64>,
}

/// The table of one layout's rows (the two floors, the gateway's program,
/// nftables, in that order) and the ratios read from it.
fn drop_table(rows: &[&Row], layout: &str) -> String {
    let mut out = String::from(
        "| dropper | frames sent | dropped | dropped/s | receiver core busy | dropped/s per receiver core | busy cores | XDP program's own time per frame |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let secs = r.run.elapsed.as_secs_f64();
        let pps = r.dropped as f64 / secs;
        let rx_busy = r.receiver / secs;
        println!(
            "{} ({layout}): {} sent, {} dropped, {:.2} Mpps, receiver core {:.0}% busy, generator {:.2} CPU s, {:.2} busy cores",
            r.what,
            r.run.sent,
            r.dropped,
            pps / 1e6,
            rx_busy * 100.0,
            r.run.generator,
            r.run.busy / secs
        );
        let own = r.program_ns.map_or("-".into(), |ns| format!("{ns:.0} ns"));
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} M | {:.0}% | {:.2} M | {:.2} | {own} |\n",
            r.what,
            r.run.sent,
            r.dropped,
            pps / 1e6,
            rx_busy * 100.0,
            r.dropped as f64 / r.receiver / 1e6,
            r.run.busy / secs
        ));
    }
    let per_core = |r: &Row| r.dropped as f64 / r.receiver;
    let [floor, lookup, xdp, nft] = [0, 1, 2, 3].map(|i| per_core(rows[i]));
    let ns = |pps: f64| 1e9 / pps;
    out.push_str(&format!(
        "\nXDP / nftables, dropped per receiver-core second: **{:.1}x** (target >= 5x); XDP: **{:.2} Mpps per core** \
         (target >= 5 Mpps per core on veth). Receiver-core time per drop: {:.0} ns for the veth and one read of \
         the source (floor / nftables {:.1}x: no XDP program that reads the source can do better on this veth), \
         {:.0} ns with the search of the blocklist's host table ({:.1}x), \
         {:.0} ns for the gateway's program ({:.0} ns above the lookup floor: parsing, the hint, counters), \
         {:.0} ns for nftables. When the receiver core is not saturated, the generator is the limit and per-core \
         figures extrapolate from the busy share.\n",
        xdp / nft,
        xdp / 1e6,
        ns(floor),
        floor / nft,
        ns(lookup),
        lookup / nft,
        ns(xdp),
        (ns(xdp) - ns(lookup)).max(0.0),
        ns(nft),
    ));
    out
}

fn main() -> Result<()> {
    let topo = Topology::create()?;
    let src = [10, 200, 0, 1];
    let mut frame = Frame::v4(src, [10, 200, 0, 2]).tcp(PORT, TCP_SYN).build();
    frame[0..6].copy_from_slice(&mac(DUT, "vd")?);
    frame[6..12].copy_from_slice(&mac(GEN, "vg")?);
    // The kernel's IP layer checks the header checksum before netfilter
    // sees the packet (XDP does not care); set it so both see the same flood.
    set_checksums(&mut frame);
    let home = File::open("/proc/self/ns/net")?;
    // Per dropper, its row in each of the `LAYOUTS`.
    let mut measured = Vec::new();

    // 0. Two floors, counted by the veth itself: read the source address
    // and drop; and look it up in the blocklist's host table, drop on a hit.
    let blocked = Cidr::V4 { addr: src, len: 32 };
    for (prog, what) in [
        ("gateway_bench_drop", "floor: read the source address, drop"),
        (
            "gateway_bench_lookup",
            "floor: source looked up in the host table, drop",
        ),
    ] {
        enter(DUT)?;
        let mut floor = loader::load(None)?;
        let mut maps = gateway::kernel::maps::KernelMaps::from_ebpf(&mut floor, None)?;
        maps.block_insert(&blocked, BlockValue::permanent())?;
        let xdp = loader::bench_program(&mut floor, prog)?;
        xdp.attach("vd", XdpMode::Driver)
            .with_context(|| format!("attaching {prog} to vd in native mode"))?;
        measured.push(rows(what, &frame, Some(xdp), veth_xdp_drops)?);
    } // each floor detaches when its object drops

    // 1. The gateway's XDP program on vd, native mode, source blocked.
    enter(DUT)?;
    let mut dut = loader::load(None)?;
    let mut maps = gateway::kernel::maps::KernelMaps::from_ebpf(&mut dut, None)?;
    maps.set_limits(&Limits::new(1_000_000_000, 1_000_000_000, 0, 32, 64))?;
    maps.set_ports(&[PORT])?;
    maps.block_insert(&blocked, BlockValue::permanent())?;
    // As the daemon leaves them after applying its policy.
    maps.hint_rebuild([&blocked], [])?;
    let xdp = loader::xdp_program(&mut dut)?;
    xdp.attach("vd", XdpMode::Driver)
        .context("attaching XDP to vd in native mode")?;
    measured.push(rows(
        "XDP (gateway program, native, blocklist hit)",
        &frame,
        Some(xdp),
        || {
            Ok(maps
                .stats()?
                .into_iter()
                .find(|(r, _)| *r == Reason::Blocklist)
                .map_or(0, |(_, c)| c.packets))
        },
    )?);
    drop(maps);
    drop(dut); // detaches

    // 2. No XDP: GRO gives the veth a NAPI path, nftables drops in raw prerouting.
    let ns = |args: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", DUT];
        v.extend_from_slice(args);
        sh(&v)
    };
    ns(&["nft", "add", "table", "ip", "gwbench"])?;
    ns(&[
        "nft",
        "add chain ip gwbench prerouting { type filter hook prerouting priority raw; }",
    ])?;
    ns(&[
        "nft",
        "add rule ip gwbench prerouting ip saddr 10.200.0.1 counter drop",
    ])?;
    let nft = rows(
        "nftables (raw prerouting drop, GRO on)",
        &frame,
        None,
        || {
            let listing = ns(&["nft", "list", "chain", "ip", "gwbench", "prerouting"])?;
            listing
                .split("counter packets ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no nft counter in {listing}"))
        },
    )?;
    if nft.iter().any(|r| r.dropped == 0) {
        let link = ns(&["ip", "-s", "link", "show", "vd"])?;
        bail!("nftables saw nothing; vd: {link}");
    }
    measured.push(nft);
    // SAFETY: back to the namespace this thread started in.
    unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
    let syn = syn_flood(&home)?;
    drop(topo);

    let mut out = format!(
        "Flood: one generator thread on CPU {GEN_CPU}, `BPF_PROG_TEST_RUN` live frames (batch {BATCH}) of a 54-byte \
         IPv4 TCP SYN from 10.200.0.1, {SECONDS} s per row. The receiving veth runs threaded NAPI, so the dropping \
         work is one thread's, as a NIC queue's softirq would be; each dropper runs twice, with that thread pinned \
         to CPU 1 (a core of its own) and to CPU 0 (the generator's core). The generator's frames come from its own \
         page pool: a receiver on the other CPU returns every dropped page across CPUs, under a lock the generator \
         takes too (on this VM a paravirtual spinlock), while on the generator's core the return is local, as a \
         NIC's receive queue recycles its pages on its own core (there the frame's bytes are also still in that \
         core's cache, which a NIC's DMA does not give). Receiver core: the CPU time of vd's NAPI thread \
         over the run, divided by wall time; busy cores: all non-idle CPU time (generator included) divided by wall \
         time; the XDP program's own time per frame: the kernel's BPF run-time statistics over one more second of \
         the same flood, enabled for that second only (they add a clock read per run, which the other columns do \
         not pay).\n"
    );
    for (i, (_, layout)) in LAYOUTS.iter().enumerate() {
        let layout_rows: Vec<&Row> = measured.iter().map(|r| &r[i]).collect();
        out.push_str(&format!("\n**{layout}:**\n\n"));
        out.push_str(&drop_table(&layout_rows, layout));
    }
    out.push_str(&syn);
    println!("\n{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("veth.md"), out)?;
    Ok(())
}
