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
