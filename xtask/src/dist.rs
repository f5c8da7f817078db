//! `cargo xtask dist`: an installable Debian package with the release
//! binary, the systemd unit, the annotated config (a conffile, so upgrades
//! keep the operator's edits) and the README.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::util::{self, root, step};

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(to.parent().expect("a file has a parent"))?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub fn run() -> Result<()> {
    step("dist: release build");
    util::cargo(&["build", "--release", "-p", "gateway", "--bin", "gateway"])?;
    let r = root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let name = format!("gateway_{version}_{arch}");
    let stage = r.join("target/dist").join(&name);
    let _ = fs::remove_dir_all(&stage);
    step(&format!("dist: staging {name}"));
    copy(
        &r.join("target/release/gateway"),
        &stage.join("usr/bin/gateway"),
        0o755,
    )?;
    copy(
        &r.join("dist/gateway.service"),
        &stage.join("lib/systemd/system/gateway.service"),
        0o644,
    )?;
    copy(
        &r.join("config/gateway.toml"),
        &stage.join("etc/gateway/gateway.toml"),
        0o640,
    )?;
    copy(
        &r.join("README.md"),
        &stage.join("usr/share/doc/gateway/README.md"),
        0o644,
    )?;
    copy(
        &r.join("dist/postinst"),
        &stage.join("DEBIAN/postinst"),
        0o755,
    )?;
    copy(&r.join("dist/prerm"), &stage.join("DEBIAN/prerm"), 0o755)?;
    fs::write(
        stage.join("DEBIAN/conffiles"),
        "/etc/gateway/gateway.toml\n",
    )?;
    let size_kb = fs::metadata(stage.join("usr/bin/gateway"))?.len() / 1024;
    fs::write(
        stage.join("DEBIAN/control"),
        format!(
            "Package: gateway\nVersion: {version}\nArchitecture: {arch}\nMaintainer: gateway developers <gateway@localhost>\n\
             Installed-Size: {size_kb}\nDepends: adduser, libc6\nRecommends: bpftool\nSection: net\nPriority: optional\n\
             Description: XDP-accelerated edge gateway for self-hosted LLM APIs\n \
             An XDP packet filter (blocklists, SYN rate limits) and an LLM-aware reverse\n \
             proxy (API keys, model routing, streaming, token accounting) in one binary.\n"
        ),
    )?;
    let out = r.join("target/dist").join(format!("{name}.deb"));
    util::run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(&stage)
            .arg(&out),
    )?;
    util::run(Command::new("dpkg-deb").arg("--info").arg(&out))?;
    println!("\n{}", out.display());
    Ok(())
}
