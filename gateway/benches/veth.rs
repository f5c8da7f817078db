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

/// Floods from the generator namespace for `SECONDS`; returns frames sent
/// and the busy CPU seconds.
fn flood(frame: &[u8]) -> Result<(u64, f64, Duration)> {
    enter(GEN)?;
    let ifindex = unsafe { libc::if_nametoindex(c"vg".as_ptr()) };
    if ifindex == 0 {
        bail!("no vg in {GEN}");
    }
    let mut ebpf = loader::load(None)?;
    let tx = loader::bench_tx_program(&mut ebpf)?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let start = Instant::now();
    let busy0 = busy_seconds();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(SECONDS) {
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
    Ok((sent, busy_seconds() - busy0, start.elapsed()))
}

struct Row {
    what: &'static str,
    sent: u64,
    dropped: u64,
    busy: f64,
    elapsed: Duration,
}

fn main() -> Result<()> {
    let topo = Topology::create()?;
    let src = [10, 200, 0, 1];
    let mut frame = Frame::v4(src, [10, 200, 0, 2]).tcp(PORT, TCP_SYN).build();
    frame[0..6].copy_from_slice(&mac(DUT, "vd")?);
    frame[6..12].copy_from_slice(&mac(GEN, "vg")?);
    // The kernel's IP layer checks the header checksum before netfilter
    // sees the packet (XDP does not care); set it so both see the same flood.
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = frame[14..34]
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let home = File::open("/proc/self/ns/net")?;
    let mut rows = Vec::new();

    // 1. The gateway's XDP program on vd, native mode, source blocked.
    enter(DUT)?;
    let mut dut = loader::load(None)?;
    let mut maps = gateway::kernel::maps::KernelMaps::from_ebpf(&mut dut)?;
    maps.set_limits(&Limits::new(1_000_000_000, 1_000_000_000, 0, 32, 64))?;
    maps.set_ports(&[PORT])?;
    maps.block_insert(&Cidr::V4 { addr: src, len: 32 }, BlockValue::permanent())?;
    loader::xdp_program(&mut dut)?
        .attach("vd", XdpMode::Driver)
        .context("attaching XDP to vd in native mode")?;
    let count = |maps: &gateway::kernel::maps::KernelMaps| -> Result<u64> {
        Ok(maps
            .stats()?
            .into_iter()
            .find(|(r, _)| *r == Reason::Blocklist)
            .map_or(0, |(_, c)| c.packets))
    };
    let before = count(&maps)?;
    let (sent, busy, elapsed) = flood(&frame)?;
    rows.push(Row {
        what: "XDP (gateway program, native, blocklist hit)",
        sent,
        dropped: count(&maps)? - before,
        busy,
        elapsed,
    });
    drop(maps);
    drop(dut); // detaches

    // 2. No XDP: GRO gives the veth a NAPI path, nftables drops in raw prerouting.
    let ns = |args: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", DUT];
        v.extend_from_slice(args);
        sh(&v)
    };
    ns(&["ethtool", "-K", "vd", "gro", "on"])?;
    ns(&["nft", "add", "table", "ip", "gwbench"])?;
    ns(&[
        "nft",
        "add chain ip gwbench prerouting { type filter hook prerouting priority raw; }",
    ])?;
    ns(&[
        "nft",
        "add rule ip gwbench prerouting ip saddr 10.200.0.1 counter drop",
    ])?;
    let (sent, busy, elapsed) = flood(&frame)?;
    let link = ns(&["ip", "-s", "link", "show", "vd"])?;
    let listing = ns(&["nft", "list", "chain", "ip", "gwbench", "prerouting"])?;
    let dropped = listing
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no nft counter in {listing}"))?;
    if dropped == 0 {
        bail!("nftables saw nothing; vd: {link}");
    }
    rows.push(Row {
        what: "nftables (raw prerouting drop, GRO on)",
        sent,
        dropped,
        busy,
        elapsed,
    });
    // SAFETY: back to the namespace this thread started in.
    unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
    drop(topo);

    let mut out = format!(
        "Flood: one generator thread, `BPF_PROG_TEST_RUN` live frames (batch {BATCH}) of a 54-byte IPv4 TCP SYN \
         from 10.200.0.1, {SECONDS} s per row. Busy cores: non-idle CPU time over the run (generator and \
         receiver together; the veth peer's receive runs in the sender's softirq) divided by wall time.\n\n\
         | dropper | frames sent | dropped | dropped/s | busy cores | dropped/s per busy core |\n|---|---:|---:|---:|---:|---:|\n"
    );
    for r in &rows {
        let secs = r.elapsed.as_secs_f64();
        let cores = r.busy / secs;
        let pps = r.dropped as f64 / secs;
        println!(
            "{}: {} sent, {} dropped, {:.2} Mpps, {:.2} busy cores",
            r.what,
            r.sent,
            r.dropped,
            pps / 1e6,
            cores
        );
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} M | {:.2} | {:.2} M |\n",
            r.what,
            r.sent,
            r.dropped,
            pps / 1e6,
            cores,
            pps / cores / 1e6
        ));
    }
    let per_core = |r: &Row| r.dropped as f64 / r.busy;
    out.push_str(&format!(
        "\nXDP / nftables, dropped per busy core: **{:.1}x** (target >= 5x; target >= 5 Mpps per core on veth).\n",
        per_core(&rows[0]) / per_core(&rows[1])
    ));
    println!("\n{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("veth.md"), out)?;
    Ok(())
}
