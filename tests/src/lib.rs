//! Support for the integration tests: the `mock-llm` upstream, an
//! in-process gateway with HTTP clients (`l7`), network namespaces and veth
//! topologies the tests create (and delete), the `gateway` binary as a
//! process, and a raw frame sender for floods.

pub mod l7;
pub mod mock;
pub mod netns;
pub mod process;

use std::path::PathBuf;

/// Path of the `gateway` binary built next to the test binary. `cargo xtask
/// test` builds it first; a bare `cargo test` may not.
pub fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/it-<hash> -> target/<profile>/gateway
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("gateway");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p gateway`; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// A unique scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("gw-{tag}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&d).expect("creating a temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A number unique within this process (tests run in parallel threads).
pub fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Makes a directory immutable (`chattr +i`: no file can be made in it,
/// even by root, so a write fails as on a full disk) until dropped.
pub struct Immutable(std::path::PathBuf);

impl Immutable {
    /// `None` where the file system has no such flag (or `chattr` is
    /// missing): `test` is skipped, said as skips are; under `CI=true`
    /// that is a failure.
    pub fn try_new(dir: &std::path::Path, test: &str) -> Option<Immutable> {
        let done = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status();
        match done {
            Ok(s) if s.success() => Some(Immutable(dir.to_owned())),
            other => {
                let why = format!(
                    "chattr +i {} failed ({other:?}): the test needs a file system with the immutable flag",
                    dir.display()
                );
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{test}: {why}");
                }
                gateway::kernel::testrun::skipped(test, &why);
                None
            }
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}
