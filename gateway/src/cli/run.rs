//! `gateway run`: the daemon. Loads and attaches the kernel fast path (when
//! `[xdp]` is enabled), serves the L7 proxy on its workers, metrics, and the
//! admin socket; reloads the config on SIGHUP or `gateway reload`; keeps
//! the blocklist tidy; and on SIGINT/SIGTERM stops accepting, drains open
//! requests and detaches (the pinned maps, and so the policy, remain).

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{admin, config::Config, daemon::Daemon, kernel::runtime::Kernel, server::Gateway};

/// How often lapsed temporary blocks are swept from the maps.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Bans applied in one go at most (one state write, one hint pass).
const MAX_BAN_BATCH: usize = 4096;

pub fn run(cfg: Config, path: &Path) -> Result<()> {
    raise_fd_limit();
    // The proxy runs on its own worker threads (listener::workers); this
    // runtime only drives signals, metrics, the admin socket and housekeeping.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = rt.block_on(serve(cfg, path));
    // A drain cut by a second signal leaves the workers' stop on the
    // blocking pool: the process exits without waiting for it.
    rt.shutdown_background();
    served
}

/// Every client connection and upstream connection is a file descriptor;
/// the default soft limit (often 1024) would cap an edge proxy far below
/// what it can serve, so the soft limit is raised to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let from = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(from, to = lim.rlim_max, "raised the open-file limit");
        }
    }
}

/// How long a daemon started by systemd waits for what boot may bring up
/// after it (see [`wait_under_systemd`]).
const BOOT_WAIT: Duration = Duration::from_secs(30);

/// Under systemd (`$NOTIFY_SOCKET`: the unit's `Type=notify`), waits up to
/// [`BOOT_WAIT`] for `ready` to hold: a VLAN, a bond or a slow driver may
/// come up after `network-online.target`, a block file or certificate may
/// sit on a mount that comes later, and what is missing is a usage error
/// (exit 2), which the unit does not restart. Run by hand, a missing one
/// (a typo) fails at once.
async fn wait_under_systemd(what: &str, ready: impl Fn() -> Result<()>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let deadline = tokio::time::Instant::now() + BOOT_WAIT;
    let mut said = false;
    while let Err(e) = ready() {
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        if !said {
            tracing::warn!("waiting up to {} s for {what}: {e:#}", BOOT_WAIT.as_secs());
            crate::sd_notify::notify(&format!("STATUS=waiting for {what}"));
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The files the config names that must be readable at start: block
/// files and the TLS certificate and key.
fn files_readable(cfg: &Config) -> Result<()> {
    let tls = cfg.server.tls.iter().flat_map(|t| [&t.cert, &t.key]);
    for f in cfg.xdp.block_files.iter().chain(tls) {
        std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
    }
    Ok(())
}

async fn serve(cfg: Config, path: &Path) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    // Before anything is served: another daemon answering on the admin
    // socket (with XDP off or degraded it has no maps to find it by)
    // would have its traffic split with this one, whose listeners share
    // its ports.
    // (With XDP on, the maps say it first, and more precisely.)
    if cfg.xdp.enabled {
        Kernel::refuse_if_running(&cfg)?;
    }
    admin::refuse_if_answering(&cfg.server.admin_socket)?;
    wait_under_systemd("the block files and TLS files to be readable", || {
        files_readable(&cfg)
    })
    .await;
    // A block file that cannot be read is refused, as by `check` and
    // `reload`, rather than taken for an empty feed; so is a state file
    // (the persisted blocks, allowlist, limits and bans) that cannot be
    // read or parsed. Restarting fixes neither: exit 2.
    crate::kernel::policy::load_block_files(&cfg.xdp)
        .map_err(|e| crate::error::UsageError(format!("{e:#}")))?;
    crate::kernel::state::State::load(&cfg.server.state_dir)
        .map_err(|e| crate::error::UsageError(format!("server.state_dir: {e:#}")))?;
    let mut degraded = None;
    let kernel = if cfg.xdp.enabled {
        // A misspelt interface is a config error; anything else that stops
        // XDP (privileges, driver, bpffs) degrades to userspace enforcement.
        wait_under_systemd("xdp.interfaces to appear", || {
            crate::kernel::loader::check_interfaces(&cfg.xdp.interfaces)
        })
        .await;
        crate::kernel::loader::check_interfaces(&cfg.xdp.interfaces)?;
        // Another daemon already running on these maps is no reason to
        // degrade: serving beside it (its listen ports are SO_REUSEPORT)
        // would split its traffic. Exit 2.
        Kernel::refuse_if_running(&cfg)?;
        match Kernel::start(&cfg) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(
                    "XDP unavailable, serving in degraded mode (blocklist and connection limits enforced at accept): {e:#}"
                );
                // A program kept attached (keep_attached, by this start
                // before it failed, or by a previous daemon) would go on
                // enforcing maps this daemon no longer updates: a block
                // removed here would stay in force there. Detached: what
                // is enforced is what the daemon says it enforces.
                crate::kernel::loader::remove_links(
                    &cfg.pin_path(),
                    &[],
                    "detached the kept XDP program: serving degraded, this daemon could not keep its maps up to date",
                );
                degraded = Some(format!("xdp unavailable: {e:#}"));
                None
            }
        }
    } else {
        tracing::info!("xdp.enabled is false: no kernel fast path");
        None
    };
    let mut gateway = Gateway::start(&cfg).await?;
    if kernel.is_some() {
        match crate::kernel::trust::Trust::open(&cfg.pin_path()) {
            Ok(t) => {
                let _ = gateway.shared.trust.set(t);
            }
            Err(e) => {
                tracing::warn!("accepted sources will not bypass the global SYN budget: {e:#}")
            }
        }
    }
    let mut bans = gateway
        .bans
        .take()
        .expect("a fresh gateway has its ban channel");
    let admin_path = cfg.server.admin_socket.clone();
    let daemon = Arc::new(Daemon {
        config_path: path.to_owned(),
        config: Mutex::new(cfg),
        shared: Arc::clone(&gateway.shared),
        kernel: Mutex::new(kernel),
        degraded: degraded.clone(),
        exported: Mutex::new(Vec::new()),
        state_writes: Mutex::new(()),
        unsaved: Mutex::new(Vec::new()),
    });
    {
        let cfg = daemon
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if daemon
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            daemon.enforce_at_accept(&cfg)?;
        }
        daemon.apply_drained(&cfg.server.state_dir)?;
    }
    if let Some(why) = degraded {
        daemon
            .shared
            .ready
            .store(Arc::new(crate::pipeline::Readiness {
                degraded: Some(why),
            }));
    }
    daemon.export_kernel_metrics(true);
    admin::serve(
        admin_path.clone(),
        Arc::clone(&daemon) as Arc<dyn admin::Handler>,
    )
    .await?;
    tracing::info!(pid = std::process::id(), admin = %admin_path.display(), "gateway running");
    crate::sd_notify::notify(&match &daemon.degraded {
        None => "READY=1\nSTATUS=serving".to_owned(),
        Some(why) => format!("READY=1\nSTATUS=serving, degraded: {why}"),
    });

    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                {
                    // Serialised with the CLI's commands (which the daemon
                    // runs under this lock): a sweep that read a lapsed
                    // entry must not delete it after `block add` renewed it.
                    let _serial = daemon.state_writes.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(k) = daemon.kernel.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        if let Err(e) = k.sweep() {
                            tracing::warn!("sweeping lapsed blocks failed: {e:#}");
                        }
                    }
                }
                if !daemon.unsaved.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                    let d = Arc::clone(&daemon);
                    let _ = tokio::task::spawn_blocking(move || d.persist_unsaved()).await;
                }
                // Counters every second; map sizes (a walk) every 10 s.
                ticks += 1;
                daemon.export_kernel_metrics(ticks.is_multiple_of(10));
            }
            Some(ban) = bans.recv() => {
                // Whatever else is queued goes in the same batch: one state
                // write for a storm of bans.
                let mut batch = vec![ban];
                while batch.len() < MAX_BAN_BATCH {
                    match bans.try_recv() {
                        Ok(b) => batch.push(b),
                        Err(_) => break,
                    }
                }
                let d = Arc::clone(&daemon);
                let _ = tokio::task::spawn_blocking(move || d.ban(&batch)).await;
            }
            _ = hup.recv() => {
                let d = Arc::clone(&daemon);
                let _ = tokio::task::spawn_blocking(move || admin::Handler::handle(d.as_ref(), admin::Request::Reload)).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        "shutting down: no new connections; draining open requests (a second signal cuts them)"
    );
    // systemd's stop timeout (TimeoutStopSec) would cut a drain_timeout
    // longer than it: the drain, the cut grace and detaching get theirs.
    let drain = gateway.shared.conn_limits.load().drain_timeout + Duration::from_secs(15);
    crate::sd_notify::notify(&format!(
        "STOPPING=1\nSTATUS=draining open requests\nEXTEND_TIMEOUT_USEC={}",
        drain.as_micros()
    ));
    // A second SIGTERM or Ctrl-C ends the drain at once, as nginx's fast
    // shutdown does; XDP is still detached and the socket removed below.
    tokio::select! {
        _ = gateway.stop() => {}
        _ = term.recv() => tracing::warn!("second signal: open requests are cut"),
        _ = int.recv() => tracing::warn!("second signal: open requests are cut"),
    }
    let _ = std::fs::remove_file(&admin_path);
    if let Some(k) = daemon
        .kernel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        tracing::info!("detaching XDP (pinned maps and policy stay)");
        drop(k);
    }
    Ok(())
}
