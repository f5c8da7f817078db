//! `cargo xtask setup`: idempotent installation of the prerequisites.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{self, in_ci, is_root, output, step};

pub const BPF_LINKER_VERSION: &str = "0.10.4";
/// cargo-fuzz, pinned: 0.13.2 builds with stable Rust 1.95 (`--locked`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// LLVM major of the nightly that bpf-linker 0.10.4 loads.
const EXPECTED_LLVM_MAJOR: &str = "22";
/// Debian packages the tests and benchmarks use.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip (network namespaces for kernel tests)"),
    ("util-linux", "mount"),
    ("bpftool", "inspecting programs and maps"),
    ("xdp-tools", "xdp-trafficgen, xdp-loader"),
    ("nftables", "baseline for kernel benchmarks"),
    (
        "ethtool",
        "GRO on veth for the nftables baseline of bench veth",
    ),
    ("tcpdump", "debugging kernel tests"),
    ("nginx", "L7 benchmark baseline"),
    ("wrk", "HTTP/1.1 load generator"),
    ("nghttp2-client", "h2load, HTTP/2 load generator"),
    ("valgrind", "callgrind, for bench instructions"),
];

pub fn run() -> Result<()> {
    step("setup: prerequisites");
    nightly()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    debian_packages()?;
    python_venv()?;
    eprintln!("setup: done");
    Ok(())
}

fn nightly() -> Result<()> {
    let Some(v) = output("rustc", &["+nightly", "-vV"]) else {
        bail!(
            "the `nightly` Rust toolchain is missing; the eBPF crate needs it: \
             `rustup toolchain install nightly --component rust-src`"
        );
    };
    let llvm = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(EXPECTED_LLVM_MAJOR) {
        eprintln!(
            "setup: WARNING: nightly uses LLVM {llvm}, but bpf-linker {BPF_LINKER_VERSION} is \
             known to work with LLVM {EXPECTED_LLVM_MAJOR}; the eBPF build may fail"
        );
    } else {
        eprintln!("setup: nightly toolchain ok (LLVM {llvm})");
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
    } else {
        eprintln!("setup: adding rust-src to nightly");
        util::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let have = output("bpf-linker", &["--version"]).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (a few minutes, once)");
    util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]),
    )
}

/// cargo-fuzz runs the fuzz targets (`cargo xtask fuzz`, and briefly in
/// `cargo xtask test`); the targets themselves build with nightly.
fn cargo_fuzz() -> Result<()> {
    let have = output("cargo-fuzz", &["--version"]).unwrap_or_default();
    if have.contains(CARGO_FUZZ_VERSION) {
        eprintln!("setup: cargo-fuzz {CARGO_FUZZ_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute or two, once)");
    util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
            "--force",
        ]),
    )
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    }) {
        eprintln!("setup: bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    if !is_root() {
        let msg = "bpffs is not mounted at /sys/fs/bpf and mounting needs root: \
                   `sudo mount -t bpf bpf /sys/fs/bpf`";
        if in_ci() {
            bail!("{msg}");
        }
        eprintln!("setup: NOTE: {msg} (kernel tests will be skipped)");
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    util::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn debian_packages() -> Result<()> {
    if output("dpkg", &["--version"]).is_none() {
        eprintln!(
            "setup: not a Debian system; install by hand: {}",
            names().join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present ({})", names().join(", "));
        return Ok(());
    }
    if !is_root() {
        let msg = format!(
            "missing Debian packages: sudo apt-get install -y {}",
            missing.join(" ")
        );
        if in_ci() {
            bail!("{msg}");
        }
        eprintln!("setup: NOTE: {msg}");
        return Ok(());
    }
    for (p, why) in DEBIAN_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("setup: will install {p}: {why}");
    }
    util::run(Command::new("apt-get").arg("update").arg("-q"))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn names() -> Vec<&'static str> {
    DEBIAN_PACKAGES.iter().map(|(p, _)| *p).collect()
}

/// Where the Python venv for the SDK tests lives (gitignored).
pub const VENV: &str = ".venv";
const REQUIREMENTS: &str = "tests/sdk/requirements.txt";

/// A venv with the official `openai` SDK, pinned in tests/sdk/requirements.txt.
fn python_venv() -> Result<()> {
    let root = util::root();
    let venv = root.join(VENV);
    let python = venv.join("bin/python");
    let reqs = std::fs::read_to_string(root.join(REQUIREMENTS))
        .context("reading tests/sdk/requirements.txt")?;
    let stamp = venv.join(".requirements");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == reqs) {
        eprintln!("setup: Python venv with the openai SDK present ({VENV})");
        return Ok(());
    }
    if output("python3", &["--version"]).is_none() {
        let msg = "python3 is missing: install it (Debian: python3 python3-venv)";
        if in_ci() {
            bail!("{msg}");
        }
        eprintln!("setup: NOTE: {msg}; the SDK test will be skipped");
        return Ok(());
    }
    eprintln!("setup: creating {VENV} with the openai SDK (once)");
    if !python.exists() {
        util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    util::run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-r",
        REQUIREMENTS,
    ]))?;
    std::fs::write(&stamp, reqs).context("recording the installed requirements")?;
    Ok(())
}
