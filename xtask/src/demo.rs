//! `cargo xtask run`: the demo. Builds the gateway, starts it on
//! config/demo.toml with the XDP program on `lo`, shows `gateway stats` and
//! what to try, and runs until Ctrl-C.

use std::{
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, is_root, root, step};

const CONFIG: &str = "config/demo.toml";

pub fn run() -> Result<()> {
    step("build: gateway (release)");
    util::cargo(&["build", "--release", "-p", "gateway"])?;
    if !is_root() {
        bail!("the demo attaches the XDP program to `lo`, which needs root: run `sudo -E cargo xtask run`");
    }
    let bin = root().join("target/release/gateway");
    let gw = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.current_dir(root()).arg("--config").arg(CONFIG).args(args);
        c
    };
    step("demo: starting the gateway on config/demo.toml");
    let mut daemon = Daemon(gw(&["run"]).spawn().context("starting the gateway")?);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = daemon.0.try_wait()? {
            bail!("the gateway exited during start-up ({status}); see its log above");
        }
        let ok = gw(&["stats"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if ok.is_ok_and(|s| s.success()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the gateway did not become ready within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let g = format!("{} --config {CONFIG}", bin.display());
    println!(
        "\nThe XDP program guards TCP port 8080 on lo (generic mode).\n\
         Try, in another terminal (as root):\n\n\
         \x20 curl -sS --max-time 2 --interface 127.0.0.2 http://127.0.0.1:8080/   # refused: nothing listens yet\n\
         \x20 {g} block add 127.0.0.2 --ttl 1m --comment demo\n\
         \x20 curl -sS --max-time 2 --interface 127.0.0.2 http://127.0.0.1:8080/   # times out: dropped in XDP\n\
         \x20 {g} block list\n\
         \x20 {g} stats\n\
         \x20 {g} top\n\
         \x20 {g} limits set --syn-rate 2 --syn-burst 2\n\n\
         Kernel counters now:\n"
    );
    util::run(&mut gw(&["stats"]))?;
    println!("\nPress Ctrl-C to stop (the program detaches; pinned maps keep the policy).");
    let status = daemon.0.wait()?;
    if !status.success() && status.code().is_some() {
        bail!("the gateway exited with {status}");
    }
    Ok(())
}

/// Stops the daemon if xtask exits early.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}
