//! The kernel program at run time: started by the daemon (`Kernel`), found
//! and opened by the CLI (`open_running`), and described by a status file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::Ebpf;
use serde::{Deserialize, Serialize};

use super::{clock, loader, maps::KernelMaps, policy};
use crate::{config::Config, error::UsageError};

pub const STATUS_FILE: &str = "xdp-status.json";

/// Where and how the program is attached; written by the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub started_unix_ms: u64,
    pub pin_path: PathBuf,
    pub interfaces: Vec<Attached>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attached {
    pub name: String,
    pub mode: String,
}

impl Status {
    pub fn read(state_dir: &Path) -> Option<Status> {
        let text = std::fs::read_to_string(state_dir.join(STATUS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Opens the maps of the running program for the CLI. Fails with a one-line
/// explanation when nothing runs.
pub fn open_running(cfg: &Config) -> Result<KernelMaps> {
    let pin = cfg.pin_path();
    if !pin.join(gateway_common::names::STATS).exists() {
        bail!(
            "no gateway XDP maps at {}: start the daemon with `gateway run` \
             (or pass the --config it runs with)",
            pin.display()
        );
    }
    let maps = KernelMaps::open_pinned(&pin).map_err(loader::explain)?;
    // Without the right to list programs, a live daemon (whose status file
    // is written once it has attached; this process, when the daemon runs
    // the command for the CLI) or a link pinned to stay attached stands
    // for one.
    let running = loader::program_running(maps.stats_id()).unwrap_or_else(|| {
        Status::read(&cfg.server.state_dir)
            .is_some_and(|s| s.pid == std::process::id() || pid_alive(s.pid))
            || link_pinned(&pin)
    });
    if !running {
        bail!(
            "the gateway XDP program is not attached (its maps are pinned at {} but no \
             program uses them): start it with `gateway run`",
            pin.display()
        );
    }
    // The daemon writes its status file once policy is loaded and the
    // program attached; changing maps before that would race its start-up.
    if Status::read(&cfg.server.state_dir).is_none() {
        bail!(
            "the gateway is still starting (no {} in {} yet): try again in a moment",
            STATUS_FILE,
            cfg.server.state_dir.display()
        );
    }
    Ok(maps)
}

/// The XDP program loaded and attached by the daemon. Dropping it detaches
/// the program; the pinned maps (and so the policy and counters) remain.
pub struct Kernel {
    /// Owns the program and its links.
    _ebpf: Ebpf,
    pub maps: KernelMaps,
    state_dir: PathBuf,
    pub status: Status,
    /// The earliest expiry (monotonic ns) among the entries this daemon
    /// put in the maps, so `sweep` walks the blocklist only when one is due.
    next_expiry_ns: Option<u64>,
    /// When `sweep` walks the blocklist anyway, for entries another process
    /// (the CLI) added with an expiry.
    next_full_sweep: std::time::Instant,
}

/// How often the blocklist is walked for lapsed entries when no expiry
/// this daemon knows of is due. A walk of 100,000 entries costs ~0.2 s of
/// CPU; doing it every second kept an idle daemon 24% busy.
const FULL_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

impl Kernel {
    /// Fails (a usage error) when a live daemon's program uses the maps at
    /// this config's pin path. A program left attached on purpose
    /// (keep_attached) has no live daemon; only a running daemon is in the
    /// way.
    pub fn refuse_if_running(cfg: &Config) -> Result<()> {
        let pin = cfg.pin_path();
        if !pin.join(gateway_common::names::STATS).exists() {
            return Ok(());
        }
        let Ok(maps) = KernelMaps::open_pinned(&pin) else {
            return Ok(());
        };
        let daemon = Status::read(&cfg.server.state_dir).filter(|s| pid_alive(s.pid));
        if daemon.is_some() && loader::program_running(maps.stats_id()) != Some(false) {
            let who = daemon
                .map(|s| format!(" (pid {})", s.pid))
                .unwrap_or_default();
            return Err(UsageError(format!(
                "a gateway XDP program already uses the maps at {}{who}; stop it first",
                pin.display()
            ))
            .into());
        }
        Ok(())
    }

    /// Loads the program, brings the maps to the configured and persisted
    /// policy, then attaches to every interface. Checks everything it can
    /// before touching the kernel.
    pub fn start(cfg: &Config) -> Result<Kernel> {
        let x = &cfg.xdp;
        loader::check_interfaces(&x.interfaces)?;
        let pin = cfg.pin_path();
        loader::check_bpffs(&pin)?;
        Kernel::refuse_if_running(cfg)?;
        let want = policy::load(cfg)?;
        let mut ebpf = loader::load(Some(&pin))?;
        let mut maps = KernelMaps::from_ebpf(&mut ebpf, Some(&pin))?;
        let applied = policy::apply(&mut maps, &want)?;
        tracing::info!(
            blocklist = want.block.len(),
            allowlist = want.allow.len(),
            added = applied.block_added,
            removed = applied.block_removed,
            pin_path = %pin.display(),
            "kernel policy loaded"
        );
        loader::drop_stale_links(&pin, &x.interfaces);
        let mut interfaces = Vec::new();
        for iface in &x.interfaces {
            let mode =
                loader::attach_or_take_over(&mut ebpf, iface, x.mode, &pin, x.keep_attached)?;
            tracing::info!(interface = %iface, mode = %mode, kept = x.keep_attached, "XDP program attached");
            interfaces.push(Attached {
                name: iface.clone(),
                mode,
            });
        }
        let status = Status {
            pid: std::process::id(),
            started_unix_ms: clock::unix_ms(),
            pin_path: pin,
            interfaces,
        };
        std::fs::create_dir_all(&cfg.server.state_dir)
            .with_context(|| format!("creating {}", cfg.server.state_dir.display()))?;
        let status_path = cfg.server.state_dir.join(STATUS_FILE);
        std::fs::write(&status_path, serde_json::to_vec_pretty(&status)?)
            .with_context(|| format!("writing {}", status_path.display()))?;
        Ok(Kernel {
            _ebpf: ebpf,
            maps,
            state_dir: cfg.server.state_dir.clone(),
            status,
            next_expiry_ns: super::maps::earliest_expiry(want.block.values()),
            next_full_sweep: std::time::Instant::now() + FULL_SWEEP,
        })
    }

    /// Brings the maps to a new config's policy (plus the persisted state,
    /// see `policy::load`) by difference; used by reload.
    pub fn reapply(&mut self, want: &policy::Desired) -> Result<()> {
        let applied = policy::apply(&mut self.maps, want)?;
        self.next_expiry_ns = super::maps::earliest_expiry(want.block.values());
        tracing::info!(
            added = applied.block_added,
            removed = applied.block_removed,
            "kernel policy reapplied"
        );
        Ok(())
    }

    /// Adds a blocklist entry (a ban), remembering its expiry for `sweep`.
    pub fn block(
        &mut self,
        cidr: &gateway_common::cidr::Cidr,
        v: gateway_common::BlockValue,
    ) -> Result<()> {
        self.block_many(&[(*cidr, v)])
    }

    /// Adds many blocklist entries with one pass over the hint.
    pub fn block_many(
        &mut self,
        entries: &[(gateway_common::cidr::Cidr, gateway_common::BlockValue)],
    ) -> Result<()> {
        self.maps.block_insert_many(entries)?;
        let next = entries
            .iter()
            .map(|(_, v)| v.expires_ns)
            .filter(|e| *e != 0)
            .min();
        if let Some(e) = next {
            self.next_expiry_ns = Some(self.next_expiry_ns.map_or(e, |t| t.min(e)));
        }
        Ok(())
    }

    /// Frees the slots of lapsed blocklist entries (the kernel already
    /// ignores them) when one is due, or every `FULL_SWEEP` regardless.
    /// Returns how many were removed.
    pub fn sweep(&mut self) -> Result<usize> {
        let now_ns = clock::monotonic_ns();
        let now = std::time::Instant::now();
        if self.next_expiry_ns.is_none_or(|t| t > now_ns) && now < self.next_full_sweep {
            return Ok(0);
        }
        let (gone, next) = self.maps.remove_expired(now_ns)?;
        self.next_expiry_ns = next;
        self.next_full_sweep = now + FULL_SWEEP;
        for c in &gone {
            tracing::info!(cidr = %c, "temporary block lapsed");
        }
        Ok(gone.len())
    }
}

/// Whether process `pid` exists (and is not us).
fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists. EPERM: it
    // exists, as another user's (the service's, seen from an operator).
    pid != std::process::id()
        && (unsafe { libc::kill(pid as i32, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Whether an XDP link is pinned in `pin` (`xdp.keep_attached`).
fn link_pinned(pin: &Path) -> bool {
    std::fs::read_dir(pin).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("link_"))
    })
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.state_dir.join(STATUS_FILE));
    }
}
