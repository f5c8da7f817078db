//! Runs the real XDP program on crafted frames with `BPF_PROG_TEST_RUN`: no
//! NIC, no pinning, fresh maps per harness. Used by the verdict tests and by
//! `cargo xtask bench xdp`.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::{
    programs::{TestRun as _, TestRunOptions},
    Ebpf,
};
use gateway_common::{Limits, Reason};

use super::{loader, maps::KernelMaps};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// A loaded, unattached copy of the XDP program with its own maps.
pub struct Harness {
    ebpf: Ebpf,
    pub maps: KernelMaps,
}

impl Harness {
    /// Loads the program with `limits` and the given protected ports.
    pub fn new(limits: Limits, ports: &[u16]) -> Result<Harness> {
        let mut ebpf = loader::load(None)?;
        let mut maps = KernelMaps::from_ebpf(&mut ebpf, None)?;
        maps.set_limits(&limits)?;
        maps.set_ports(ports)?;
        // As the daemon runs it: the (empty) blocklist's hint built and trusted.
        maps.hint_rebuild([], [])?;
        Ok(Harness { ebpf, maps })
    }

    /// Runs one frame; returns the XDP action.
    pub fn run(&mut self, frame: &[u8]) -> Result<u32> {
        Ok(self.run_repeat(frame, 1)?.0)
    }

    /// Runs a frame `repeat` times in the kernel; returns the action and the
    /// kernel-measured average time per run.
    pub fn run_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let prog = loader::xdp_program(&mut self.ebpf)?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        Ok((r.return_value, r.duration))
    }

    /// Runs a frame `repeat` times on each of up to `cpus` CPUs at once (a
    /// thread pinned to each, released together), as CPUs receiving one
    /// flood share its buckets. Returns how many CPUs ran it: fewer than
    /// asked where this process may use fewer.
    pub fn run_on_cpus(&mut self, frame: &[u8], repeat: u32, cpus: usize) -> Result<usize> {
        let cpus: Vec<usize> = allowed_cpus()?.into_iter().take(cpus).collect();
        let prog: &aya::programs::Xdp = loader::xdp_program(&mut self.ebpf)?;
        let start = std::sync::Barrier::new(cpus.len());
        std::thread::scope(|s| {
            let runs: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    let start = &start;
                    s.spawn(move || -> Result<()> {
                        let pinned = pin_to_cpu(cpu);
                        start.wait();
                        pinned?;
                        let mut out = vec![0u8; frame.len() + 256];
                        prog.test_run(TestRunOptions {
                            data_in: Some(frame),
                            data_out: Some(&mut out),
                            repeat,
                            ..TestRunOptions::default()
                        })
                        .with_context(|| format!("BPF_PROG_TEST_RUN on CPU {cpu}"))?;
                        Ok(())
                    })
                })
                .collect();
            runs.into_iter()
                .try_for_each(|r| r.join().expect("a test-run thread panicked"))
        })?;
        Ok(cpus.len())
    }

    /// Packets counted under `reason` so far.
    pub fn count(&self, reason: Reason) -> Result<u64> {
        Ok(self
            .maps
            .stats()?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets))
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: `set` is a plain bitmask the kernel fills in; it is read
    // with the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("reading this process's CPUs");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: `set` is a plain bitmask the calls below fill in; the
    // affinity call reads it with its own size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning a test-run thread to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Whether kernel tests can run here. Under `CI=true` they are mandatory, so
/// missing privileges panic; elsewhere the test is skipped with a reason.
pub fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: kernel tests are mandatory under CI=true but this process is not root");
    }
    skipped(
        test,
        "kernel tests need root (CAP_BPF + CAP_NET_ADMIN); run `cargo xtask test` as root",
    );
    false
}

/// Says that `test` was skipped, and why. The test harness hides what a
/// passing test prints, so the reason also goes to the file named by
/// `GATEWAY_TEST_SKIPS`, which `cargo xtask test` sets and sums up after
/// the run: a skip is never silent.
pub fn skipped(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    if let Some(path) = std::env::var_os("GATEWAY_TEST_SKIPS") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}
