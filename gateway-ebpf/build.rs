//! Makes cargo rebuild the eBPF object when bpf-linker changes, and fails
//! early with a fix when it is missing.
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!(
            "bpf-linker is not installed: run `cargo xtask setup` \
             (or `cargo install bpf-linker --version 0.10.4 --locked`)"
        ),
    }
}
