//! Builds the eBPF programs (gateway-ebpf) for the bpf target with the
//! nightly toolchain and bpf-linker, so `gateway` can embed the object.
//!
//! Fuzzing builds (`cargo fuzz`, which puts `--cfg fuzzing` and sanitizer
//! flags in RUSTFLAGS) embed an empty object instead: those flags must not
//! reach the bpf target, and the fuzzers never load a program. The kernel
//! loader refuses an empty object with a clear error.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // Cargo exposes the target's `--cfg fuzzing` to build scripts as this.
    println!("cargo:rerun-if-env-changed=CARGO_CFG_FUZZING");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
        let object = std::path::Path::new(&out).join("gateway-xdp");
        return std::fs::write(&object, b"")
            .with_context(|| format!("writing the empty eBPF object {}", object.display()));
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest).join("../gateway-ebpf");
    let root = root.to_str().context("non-UTF-8 path to gateway-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask setup` installs what they need \
         (nightly rust-src and bpf-linker 0.10.4)",
    )
}
