//! `cargo xtask run`: the demo. Builds the gateway and mock-llm, starts two
//! mock upstreams and the gateway on config/demo.toml (with the XDP program
//! on `lo` when run as root), prints a working streaming `curl` and
//! `gateway stats`, and runs until Ctrl-C.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, is_root, root, step, wait_for_port, Children};

const CONFIG: &str = "config/demo.toml";
const DEMO_KEY: &str = "sk-gw-demo-key-not-a-secret";
const UPSTREAMS: [(&str, &str); 2] = [
    ("upstream-a", "127.0.0.1:18001"),
    ("upstream-b", "127.0.0.1:18002"),
];

pub fn run() -> Result<()> {
    let bin = util::build_release_bins()?;
    let mut children = Children::default();

    step("demo: two mock upstreams");
    for (name, addr) in UPSTREAMS {
        let c = Command::new(bin.join("mock-llm"))
            .args([
                "--listen",
                addr,
                "--name",
                name,
                "--model",
                "mock/demo-model",
                "--tokens",
                "24",
                "--interval-ms",
                "60",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting mock-llm")?;
        children.0.push(c);
        wait_for_port(addr.parse()?, &mut children)?;
        eprintln!("mock-llm {name} on {addr}");
    }

    let config = if is_root() {
        PathBuf::from(CONFIG)
    } else {
        eprintln!("demo: not root, so the XDP program stays off (run `sudo -E cargo xtask run` for the kernel part)");
        let text = std::fs::read_to_string(root().join(CONFIG))?;
        let path = root().join("target/demo/demo-no-xdp.toml");
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(&path, text.replace("enabled = true ", "enabled = false"))?;
        path
    };
    let gw = |args: &[&str]| {
        let mut c = Command::new(bin.join("gateway"));
        c.current_dir(root())
            .arg("--config")
            .arg(&config)
            .args(args);
        c
    };
    step("demo: the gateway on config/demo.toml");
    children
        .0
        .push(gw(&["run"]).spawn().context("starting the gateway")?);
    wait_for_port("127.0.0.1:8080".parse()?, &mut children)?;

    let g = format!(
        "{} --config {}",
        bin.join("gateway").display(),
        rel(&config)
    );
    println!(
        "\nThe gateway serves http://127.0.0.1:8080 with model \"demo-model\" (alias \"gpt-4o-mini\")\n\
         on two mock upstreams, weights 2:1. Demo key: {DEMO_KEY}\n\n\
         Stream a chat completion token by token:\n\n\
         \x20 curl -N http://127.0.0.1:8080/v1/chat/completions \\\n\
         \x20   -H 'Authorization: Bearer {DEMO_KEY}' -H 'Content-Type: application/json' \\\n\
         \x20   -d '{{\"model\":\"demo-model\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\n\
         More to try:\n\
         \x20 curl -s http://127.0.0.1:8080/v1/models -H 'Authorization: Bearer {DEMO_KEY}'\n\
         \x20 curl -s http://127.0.0.1:9090/metrics | grep ^gateway_\n\
         \x20 {g} stats\n\
         \x20 {g} block add 127.0.0.2 --ttl 1m      # then: curl --interface 127.0.0.2 ... times out\n"
    );
    if is_root() {
        util::run(&mut gw(&["stats"]))?;
    }
    println!("\nPress Ctrl-C to stop.");
    let gateway = children.0.last_mut().expect("the gateway was started");
    let status = gateway.wait()?;
    if !status.success() && status.code().is_some() {
        bail!("the gateway exited with {status}");
    }
    Ok(())
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}
