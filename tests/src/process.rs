//! The `gateway` binary as a test subject: a daemon started inside a test
//! namespace with its own config, pin directory and state directory, and CLI
//! invocations against it.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{gateway_bin, TempDir};

/// A running `gateway run`, stopped (SIGTERM) on drop.
pub struct Daemon {
    child: Child,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    /// The daemon's stderr (its log).
    pub log: PathBuf,
    netns: Option<String>,
    /// Run as the packaged service runs it (see `start_as_service`).
    service: Option<PathBuf>,
    /// Environment given to the process beyond the test's own.
    env: Vec<(String, String)>,
    _dir: TempDir,
}

/// The packaged unit's user and capabilities (dist/gateway.service): an
/// unprivileged user (nobody here) with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN
/// and CAP_NET_BIND_SERVICE, and no others, not even in the bounding set.
const SERVICE_UID: u32 = 65534;
const SERVICE_CAPS: &str = "+bpf,+perfmon,+net_admin,+net_bind_service";

/// The result of one CLI call.
pub struct Cli {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cli {
    fn from(o: Output) -> Cli {
        Cli {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(self) -> String {
        assert_eq!(
            self.code, 0,
            "gateway failed: {}{}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    /// Asserts success and parses stdout as JSON.
    #[track_caller]
    pub fn json(self) -> serde_json::Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }
}

impl Daemon {
    /// Starts the daemon inside network namespace `netns` (a /run/netns
    /// path) with `config_body` plus the test's own state and pin dirs.
    pub fn start(netns: Option<&str>, config_body: &str) -> Result<Daemon> {
        Daemon::start_with(netns, config_body, false, &[])
    }

    /// As [`Daemon::start`], with `env` set for the process.
    pub fn start_with_env(
        netns: Option<&str>,
        config_body: &str,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        Daemon::start_with(netns, config_body, false, env)
    }

    /// Starts the daemon as the packaged unit does: as an unprivileged
    /// user with the unit's capabilities only (through `setpriv`), its pin
    /// directory made and handed to that user first, as the unit's
    /// `ExecStartPre` does. The binary is copied where that user can run it.
    pub fn start_as_service(netns: Option<&str>, config_body: &str) -> Result<Daemon> {
        Daemon::start_with(netns, config_body, true, &[])
    }

    fn start_with(
        netns: Option<&str>,
        config_body: &str,
        service: bool,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = TempDir::new("daemon");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/gwtest-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        let config = dir.0.join("gateway.toml");
        let state_dir = dir.0.join("state");
        // Each daemon gets its own admin socket next to its state.
        let admin = dir.0.join("admin.sock");
        let body = config_body
            .replace(
                "state_dir = \"@STATE_DIR@\"",
                &format!(
                    "state_dir = \"{}\"\nadmin_socket = \"{}\"",
                    state_dir.display(),
                    admin.display()
                ),
            )
            .replace("@STATE_DIR@", &state_dir.display().to_string())
            .replace("@PIN_DIR@", &pin_dir.display().to_string());
        std::fs::write(&config, body)?;
        let service = if service {
            use std::os::unix::fs::PermissionsExt as _;
            let bin = dir.0.join("gateway");
            std::fs::copy(gateway_bin(), &bin).context("copying the gateway binary")?;
            std::fs::create_dir_all(&pin_dir)
                .with_context(|| format!("creating {}", pin_dir.display()))?;
            for p in [&dir.0, &pin_dir] {
                std::os::unix::fs::chown(p, Some(SERVICE_UID), Some(SERVICE_UID))
                    .with_context(|| format!("chown {}", p.display()))?;
            }
            std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755))?;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))?;
            Some(bin)
        } else {
            None
        };
        // A log file, not a pipe: nobody drains a pipe while the test runs,
        // and a daemon blocked on a full pipe stops serving.
        let log = dir.0.join("gateway.log");
        std::fs::File::create(&log).context("creating the daemon's log file")?;
        let child = run_command(&config, &log, netns, service.as_deref(), &env)?
            .spawn()
            .context("starting gateway run")?;
        let mut d = Daemon {
            netns: netns.map(str::to_owned),
            child,
            config,
            pin_dir,
            log,
            service,
            env,
            _dir: dir,
        };
        d.wait_ready()?;
        Ok(d)
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process (SIGTERM) but keeps its config, state and pins.
    pub fn stop_process(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    /// Starts the daemon again with the same config, state and pins.
    pub fn respawn(&mut self) -> Result<()> {
        self.child = run_command(
            &self.config,
            &self.log,
            self.netns.as_deref(),
            self.service.as_deref(),
            &self.env,
        )?
        .spawn()
        .context("restarting gateway run")?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let err = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("gateway run exited during start-up ({status}): {err}");
            }
            // The daemon opens its admin socket last, once the kernel part
            // is attached (or degraded) and the proxy listens.
            if self.cli(&["backends", "list", "--json"]).code == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("gateway run did not become ready in 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a CLI command against this daemon's config (from the test's own
    /// namespace: pinned maps are reachable from any).
    /// The daemon's resident memory, from /proc, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    pub fn cli(&self, args: &[&str]) -> Cli {
        let out = Command::new(gateway_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("running the gateway CLI");
        Cli::from(out)
    }

    /// The CLI run in the daemon's network namespace (where its interfaces
    /// are, for `gateway check`).
    pub fn cli_in_netns(&self, args: &[&str]) -> Cli {
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("--config").arg(&self.config).args(args);
        if let Some(ns) = self.netns.clone() {
            // SAFETY: `enter` only makes the setns system call.
            unsafe {
                cmd.pre_exec(move || crate::netns::enter(&ns));
            }
        }
        Cli::from(cmd.output().expect("running the gateway CLI"))
    }

    /// The CIDRs of `gateway block list --json`, in its order.
    pub fn block_cidrs(&self) -> Vec<String> {
        let list = self.cli(&["block", "list", "--json"]).json();
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["cidr"].as_str().map(str::to_owned))
            .collect()
    }

    /// The `gateway block list --json` row of `cidr`, if listed.
    pub fn block_entry(&self, cidr: &str) -> Option<serde_json::Value> {
        let list = self.cli(&["block", "list", "--json"]).json();
        list.as_array()?.iter().find(|r| r["cidr"] == cidr).cloned()
    }

    /// Kernel counter of `reason` from `gateway stats --json`.
    pub fn counter(&self, reason: &str) -> u64 {
        let v = self.cli(&["stats", "--json"]).json();
        v["reasons"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["reason"] == reason))
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or_else(|| panic!("no counter {reason} in {v}"))
    }
}

/// `gateway run` with a daemon's config, log and namespace; for a service
/// start, the copied binary run through `setpriv` as the unit's user.
fn run_command(
    config: &Path,
    log: &Path,
    netns: Option<&str>,
    service: Option<&Path>,
    env: &[(String, String)],
) -> Result<Command> {
    let log = std::fs::OpenOptions::new().append(true).open(log)?;
    let mut cmd = match service {
        Some(bin) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={SERVICE_UID}"))
                .arg(format!("--regid={SERVICE_UID}"))
                .arg("--clear-groups")
                .arg(format!("--inh-caps={SERVICE_CAPS}"))
                .arg(format!("--ambient-caps={SERVICE_CAPS}"))
                .arg(format!("--bounding-set=-all,{SERVICE_CAPS}"))
                .arg(bin);
            c
        }
        None => Command::new(gateway_bin()),
    };
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(ns) = netns.map(str::to_owned) {
        // SAFETY: setns is async-signal-safe; it only moves the child.
        unsafe {
            cmd.pre_exec(move || crate::netns::enter(&ns));
        }
    }
    Ok(cmd)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for e in entries.flatten() {
                if let Ok(inner) = std::fs::read_dir(e.path()) {
                    for f in inner.flatten() {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

/// Runs the CLI with an explicit config path and no daemon.
pub fn cli_with(config: &std::path::Path, args: &[&str]) -> Cli {
    let out = Command::new(gateway_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("running the gateway CLI");
    Cli::from(out)
}
