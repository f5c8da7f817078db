//! Builds the eBPF programs (gateway-ebpf) for the bpf target with the
//! nightly toolchain and bpf-linker, so `gateway` can embed the object.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
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
