//! The running daemon as the control plane sees it: the config it was
//! started with, the proxy's shared state and the kernel program, and the
//! operations that change them at run time (reload, drain).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use crate::{
    admin::{Handler, Reply, Request},
    config::Config,
    kernel::runtime::Kernel,
    listener::ConnLimits,
    pipeline::abuse::Ban,
    pipeline::{routes::Routes, Shared},
};

pub struct Daemon {
    pub config_path: PathBuf,
    pub config: Mutex<Config>,
    pub shared: Arc<Shared>,
    pub kernel: Mutex<Option<Kernel>>,
    /// Why XDP is not in use although enabled; the guard at accept does its
    /// job meanwhile.
    pub degraded: Option<String>,
    /// Kernel counters already exported, to turn totals into increments.
    pub exported: Mutex<Vec<u64>>,
    /// Held by everything that writes the state file or the policy maps
    /// (CLI commands run here, bans), so no update is lost.
    pub state_writes: Mutex<()>,
    /// Bans in force that the state file does not list yet: its write
    /// failed (a full disk). Kept in the policy that reloads and changes
    /// apply, so they are not lifted as entries the file does not list,
    /// and written to the file as soon as it can be (each sweep).
    pub unsaved: Mutex<Vec<crate::kernel::state::BlockEntry>>,
}

impl Daemon {
    /// Re-reads the config file; applies it only if it is valid. Requests
    /// already running keep the routing table they started with.
    pub fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        // Serialised with bans and CLI commands (other processes: the state
        // directory's lock), which write the state file the kernel policy
        // below is read from; and with other reloads, before the file is
        // read, so the last one to read it is the last one applied.
        let _serial = self.state_writes.lock().unwrap_or_else(|p| p.into_inner());
        let new = Config::load(&self.config_path).map_err(|e| {
            e.problems
                .iter()
                .map(|p| {
                    if p.path.is_empty() {
                        p.message.clone()
                    } else {
                        format!("{}: {}", p.path, p.message)
                    }
                })
                .collect::<Vec<_>>()
        })?;
        let mut cfg = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let _lock = crate::kernel::state::lock(&cfg.server.state_dir)
            .map_err(|e| vec![format!("{e:#}")])?;
        let mut new = new;
        let mut notes: Vec<String> = new
            .keep_restart_only(&cfg)
            .into_iter()
            .map(|what| format!("{what} changed: takes effect at the next restart"))
            .collect();
        // A changed SYN limit that a runtime override (`gateway limits
        // set`) hides would look applied while the override stays.
        if let Ok(state) = crate::kernel::state::State::load(&cfg.server.state_dir) {
            let o = &state.limits;
            for (name, old, new, over) in [
                (
                    "xdp.syn_rate",
                    cfg.xdp.syn_rate,
                    new.xdp.syn_rate,
                    o.syn_rate,
                ),
                (
                    "xdp.syn_burst",
                    cfg.xdp.syn_burst,
                    new.xdp.syn_burst,
                    o.syn_burst,
                ),
                (
                    "xdp.global_syn_rate",
                    cfg.xdp.global_syn_rate,
                    new.xdp.global_syn_rate,
                    o.global_syn_rate,
                ),
            ] {
                if let (true, Some(v)) = (old != new, over) {
                    notes.push(format!(
                        "{name} changed to {new}, but the runtime override {v} (`gateway limits set`) stays in force; `gateway limits set --reset` returns to the config's"
                    ));
                }
            }
        }
        // The certificate files are read again (a renewal in place, or new
        // paths): a pair that does not load rejects the reload, and the
        // old certificate keeps serving.
        let certs = match (&new.server.tls, self.shared.tls_certs.get()) {
            (Some(t), Some(_)) => {
                Some(crate::listener::tls::acceptor(t).map_err(|e| vec![format!("{e:#}")])?)
            }
            _ => None,
        };
        if let Some(k) = self
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            // Read in full before any map changes (an unreadable block
            // file stops the reload here)...
            let want = self
                .policy(&new)
                .map_err(|e| vec![format!("loading the kernel policy: {e:#}")])?;
            if let Err(e) = k.reapply(&want) {
                // ...so a failure here is a map write part of the way (a
                // full map): the old policy is put back, as the answer says.
                let mut problems = vec![format!("applying the kernel policy failed: {e:#}")];
                if let Err(e) = self.policy(&cfg).and_then(|old| k.reapply(&old)) {
                    problems.push(format!("restoring the old kernel policy failed: {e:#}"));
                }
                return Err(problems);
            }
        } else if let Err(e) = self.enforce_at_accept(&new) {
            return Err(vec![format!("loading the blocklist: {e:#}")]);
        }
        if let (Some(loaded), Some(current), Some(t)) =
            (certs, self.shared.tls_certs.get(), &new.server.tls)
        {
            notes.extend(loaded.report(t, &self.shared.metrics));
            current.store(Arc::new(loaded.acceptor));
            notes.push("TLS certificate reloaded: new connections get it".into());
        }
        self.shared.abuse.configure(&new);
        self.shared
            .conn_limits
            .store(Arc::new(ConnLimits::new(&new.server)));
        self.shared.per_ip.set(
            new.server.max_connections_per_ip,
            new.server.max_connections,
            new.xdp.ipv6_prefix,
        );
        let old = self.shared.routes.load_full();
        let routes = Arc::new(Routes::reload(&new, Some(&old)));
        self.shared.metrics.forget_removed(&old, &routes);
        self.shared.routes.store(routes);
        if let Err(e) = self.apply_drained(&new.server.state_dir) {
            notes.push(format!("drained backends not restored: {e:#}"));
        }
        notes.push(format!(
            "applied: {} models, {} keys",
            new.models.len(),
            new.keys.len()
        ));
        *cfg = new;
        Ok(notes)
    }

    fn backends(&self) -> serde_json::Value {
        let routes = self.shared.routes.load();
        let rows: Vec<serde_json::Value> = routes
            .models
            .iter()
            .flat_map(|m| {
                m.backends.iter().map(move |b| {
                    let group = m
                        .groups
                        .iter()
                        .find(|g| g.backends.iter().any(|x| Arc::ptr_eq(x, b)))
                        .map(|g| g.name.to_string())
                        .filter(|g| !g.is_empty());
                    serde_json::json!({
                        "model": &*m.name,
                        "group": group,
                        "balance": m.policy().name(),
                        "url": &*b.label,
                        "weight": b.weight(),
                        "in_flight": b.in_flight(),
                        "max_connections": b.max_connections(),
                        "state": if b.drained() { "drained" } else { "active" },
                        "health": b.health.state().name(),
                        "consecutive_failures": b.health.failures(),
                    })
                })
            })
            .collect();
        serde_json::Value::Array(rows)
    }

    /// Drains (or undrains) every backend with this URL. Persisted first
    /// (state_dir), so it survives restarts and reloads that rebuild the
    /// backend; a failure to persist changes nothing.
    fn drain(&self, url: &str, on: bool) -> Reply {
        use crate::kernel::state::{self, State};
        let routes = self.shared.routes.load();
        let want = url.trim_end_matches('/');
        let matching = || {
            routes
                .models
                .iter()
                .flat_map(|m| &m.backends)
                .filter(|b| &*b.label == want)
        };
        if matching().next().is_none() {
            let mut r = Reply::failed(vec![format!(
                "no backend {url:?} (see `gateway backends list`)"
            )]);
            // The operator's mistake (exit 2), not the daemon's.
            r.data = serde_json::json!({ "usage": true });
            return r;
        }
        let _serial = self.state_writes.lock().unwrap_or_else(|p| p.into_inner());
        let state_dir = self.state_dir();
        let persisted = state::lock(&state_dir).and_then(|_lock| {
            let mut s = State::load(&state_dir)?;
            s.drained.retain(|u| u != want);
            if on {
                s.drained.push(want.to_owned());
            }
            s.save(&state_dir)
        });
        if let Err(e) = persisted {
            return Reply::failed(vec![format!("persisting the drain: {e:#}")]);
        }
        let mut hit = 0;
        for b in matching() {
            b.set_drained(on);
            hit += 1;
        }
        tracing::info!(backend = want, drained = on, "backend state changed");
        Reply::ok(serde_json::json!({ "backends": hit }))
    }

    /// Marks the backends drained in the state file as drained in the
    /// routes in use (at start, and after a reload built new backends).
    pub fn apply_drained(&self, state_dir: &std::path::Path) -> anyhow::Result<()> {
        let s = crate::kernel::state::State::load(state_dir)?;
        let routes = self.shared.routes.load();
        for b in routes.models.iter().flat_map(|m| &m.backends) {
            if s.drained.iter().any(|u| **u == *b.label) {
                b.set_drained(true);
            }
        }
        Ok(())
    }
}

impl Daemon {
    /// Without a kernel program, the policy is enforced at accept: the
    /// blocklist (bans included) and allowlist always, the SYN limits only
    /// when XDP should be there and is not (degraded); with XDP disabled in
    /// the config they are the operator's choice to go without.
    /// The policy to enforce: the config's and the state file's
    /// (`policy::load`), and the bans not yet written to the file.
    fn policy(&self, cfg: &Config) -> anyhow::Result<crate::kernel::policy::Desired> {
        let mut want = crate::kernel::policy::load(cfg)?;
        let now = crate::kernel::clock::unix_ms();
        let unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        for e in unsaved.iter() {
            let Some(until) = e.expires_unix_ms.filter(|&t| t > now) else {
                continue;
            };
            let v = gateway_common::BlockValue::until(
                crate::kernel::clock::monotonic_ns() + (until - now) * 1_000_000,
            );
            // A permanent entry, or a longer one, stays as it is.
            let e = want.block.entry(e.cidr).or_insert(v);
            if e.expires_ns != 0 && e.expires_ns < v.expires_ns {
                *e = v;
            }
        }
        Ok(want)
    }

    /// Writes the bans the state file missed to it, once it can be
    /// written; drops those that lapsed meanwhile, and those the file
    /// holds already (for good or for longer).
    pub fn persist_unsaved(&self) {
        use crate::kernel::state::State;
        let _serial = self.state_writes.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.state_dir();
        let now = crate::kernel::clock::unix_ms();
        let pending: Vec<_> = {
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
            unsaved.retain(|e| e.expires_unix_ms.is_some_and(|t| t > now));
            unsaved.clone()
        };
        if pending.is_empty() {
            return;
        }
        let saved = crate::kernel::state::lock(&dir)
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|_lock| {
                let mut state = State::load(&dir)?;
                for e in &pending {
                    let held = state.block.iter().any(|b| {
                        b.cidr == e.cidr
                            && b.expires_unix_ms
                                .is_none_or(|t| e.expires_unix_ms.is_some_and(|u| t >= u))
                    });
                    if !held {
                        state.upsert_block(e.clone());
                    }
                }
                state.save(&dir)
            });
        match saved {
            Ok(()) => {
                tracing::info!(
                    bans = pending.len(),
                    "bans that could not be written before are persisted now"
                );
                self.unsaved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|e| !pending.contains(e));
            }
            Err(e) => tracing::debug!("bans still not persisted: {e:#}"),
        }
    }

    /// `server.state_dir` of the config in force.
    fn state_dir(&self) -> PathBuf {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .server
            .state_dir
            .clone()
    }

    /// The operator's own change to `cidr` (`block add`, `block del`)
    /// replaces a ban of it the state file missed.
    fn forget_unsaved(&self, cidr: &gateway_common::cidr::Cidr) {
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| e.cidr != *cidr);
    }

    pub fn enforce_at_accept(&self, cfg: &Config) -> anyhow::Result<()> {
        let mut want = self.policy(cfg)?;
        if self.degraded.is_none() {
            let l = want.limits;
            want.limits = gateway_common::Limits::new(0, 0, 0, l.ipv4_prefix, l.ipv6_prefix);
        }
        self.shared.guard.enforce(&want);
        Ok(())
    }

    /// Enforces bans from the abuse tracker, each on its source's prefix
    /// (see `pipeline::abuse`): kernel blocklist entries that lapse by
    /// themselves (or userspace bans at accept without XDP), persisted with
    /// their cause so they survive a restart. A batch costs one read and
    /// one write of the state file and one pass over the kernel's hint, so
    /// a storm of bans from many sources does not cost a state write each.
    /// An allowlisted address is never banned, and allowlisted hosts inside
    /// a banned prefix still pass.
    pub fn ban(&self, bans: &[Ban]) {
        use gateway_common::BlockValue;

        use crate::kernel::{
            clock,
            state::{BlockEntry, State},
        };
        let _serial = self.state_writes.lock().unwrap_or_else(|p| p.into_inner());
        let cfg = self.config.lock().unwrap_or_else(|p| p.into_inner());
        // A state that cannot be read or written (a full disk, a corrupt
        // file) costs the bans their persistence, not their enforcement:
        // the kernel entries lapse by themselves.
        let lock = crate::kernel::state::lock(&cfg.server.state_dir);
        let mut state = match lock
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|_| State::load(&cfg.server.state_dir))
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("{} ban(s) not persisted: {e:#}", bans.len());
                None
            }
        };
        let now = clock::unix_ms();
        let now_ns = clock::monotonic_ns();
        let mut enforce = Vec::with_capacity(bans.len());
        for b in bans {
            let runtime = state.as_ref().map_or(&[][..], |s| &s.allow[..]);
            if cfg
                .xdp
                .allow
                .iter()
                .chain(runtime)
                .any(|c| c.contains(b.ip))
            {
                tracing::info!(ip = %b.ip, cause = b.cause.name(), "not banning an allowlisted source");
                continue;
            }
            let cidr = b.source;
            // Already blocked for good (config or a permanent runtime
            // entry): a timed ban would shorten it.
            let permanent = cfg.xdp.block.contains(&cidr)
                || state.as_ref().is_some_and(|s| {
                    s.block
                        .iter()
                        .any(|e| e.cidr == cidr && e.expires_unix_ms.is_none())
                });
            if permanent {
                tracing::info!(source = %cidr, cause = b.cause.name(), "not banning a source blocked permanently");
                continue;
            }
            let entry = BlockEntry {
                cidr,
                expires_unix_ms: Some(now + b.duration.as_millis() as u64),
                cause: b.cause.name().into(),
                comment: Some("banned by the gateway for L7 abuse".into()),
                added_unix_ms: now,
            };
            if let Some(state) = &mut state {
                state.upsert_block(entry.clone());
            }
            enforce.push((
                b,
                BlockValue::until(now_ns + b.duration.as_nanos() as u64),
                entry,
            ));
        }
        if enforce.is_empty() {
            return;
        }
        // Enforced first, then persisted: a ban takes effect before the
        // state file's write, and what the file lists is enforced.
        let enforced = match self
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(k) => {
                let entries: Vec<_> = enforce.iter().map(|(b, v, _)| (b.source, *v)).collect();
                k.block_many(&entries)
                    .map_err(|e| {
                        tracing::error!("banning {} source(s) in the kernel: {e:#}", entries.len())
                    })
                    .is_ok()
            }
            None => {
                for (b, _, _) in &enforce {
                    self.shared.guard.ban(b.source, b.duration);
                }
                true
            }
        };
        let saved = match &state {
            Some(state) => match state.save(&cfg.server.state_dir) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("persisting {} ban(s): {e:#}", enforce.len());
                    false
                }
            },
            None => false,
        };
        if enforced && !saved {
            // In force, but not in the file: kept so a reload does not
            // lift them, and written when the file can be.
            self.unsaved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(enforce.iter().map(|(_, _, e)| e.clone()));
        }
        if !enforced {
            return;
        }
        for (b, _, _) in &enforce {
            self.shared
                .metrics
                .bans
                .with_label_values(&[b.cause.name()])
                .inc();
            tracing::warn!(source = %b.source, ip = %b.ip, cause = b.cause.name(), ban = ?b.duration, "source banned");
        }
    }
}

impl Daemon {
    /// Publishes the kernel counters (and, when `occupancy`, the map sizes,
    /// which walks the maps) as `gateway_xdp_*` metrics.
    pub fn export_kernel_metrics(&self, occupancy: bool) {
        let m = &self.shared.metrics;
        let kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        let Some(k) = kernel.as_ref() else {
            m.xdp_attached.set(0);
            return;
        };
        m.xdp_attached.set(1);
        if let Ok(stats) = k.maps.stats() {
            let mut last = self.exported.lock().unwrap_or_else(|p| p.into_inner());
            last.resize(stats.len(), 0);
            for ((reason, c), seen) in stats.iter().zip(last.iter_mut()) {
                // Pinned counters outlive the daemon; export what is new.
                let delta = if c.packets >= *seen {
                    c.packets - *seen
                } else {
                    c.packets
                };
                m.xdp_packets
                    .with_label_values(&[reason.name()])
                    .inc_by(delta);
                *seen = c.packets;
            }
        }
        if occupancy {
            for (map, n) in k.maps.entries_per_map() {
                m.xdp_map_entries.with_label_values(&[map]).set(n as i64);
            }
        }
    }
}

impl Daemon {
    /// Runs a CLI command in the daemon, serialized with its own state
    /// writes, and returns what the CLI would have printed.
    fn cli(&self, args: Vec<String>) -> Reply {
        use clap::Parser as _;
        let parsed = match crate::cli::Cli::try_parse_from(
            std::iter::once("gateway".to_owned()).chain(args),
        ) {
            Ok(c) => c,
            Err(e) => return Reply::failed(vec![e.to_string()]),
        };
        let stats_json = match &parsed.command {
            crate::cli::Command::Stats(f) => Some(f.json),
            _ => None,
        };
        let lists = {
            use crate::cli::{AllowCmd, BlockCmd, Command, LimitsCmd};
            matches!(
                parsed.command,
                Command::Block(BlockCmd::Add { .. } | BlockCmd::Del { .. })
                    | Command::Allow(AllowCmd::Add { .. } | AllowCmd::Del { .. })
                    | Command::Limits(LimitsCmd::Set(_))
            )
        };
        let blocked = match &parsed.command {
            crate::cli::Command::Block(
                crate::cli::BlockCmd::Add { cidr, .. } | crate::cli::BlockCmd::Del { cidr },
            ) => Some(*cidr),
            _ => None,
        };
        let no_kernel = self
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _serial = self.state_writes.lock().unwrap_or_else(|p| p.into_inner());
        let cfg = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let result = crate::cli::local(
            &cfg,
            parsed.command,
            &mut crate::cli::output::Io {
                out: &mut out,
                err: &mut err,
            },
            no_kernel,
        );
        if let (Some(cidr), Ok(())) = (&blocked, &result) {
            self.forget_unsaved(cidr);
        }
        // Without a kernel program the lists and limits are enforced at
        // accept, from the state a changing command wrote.
        let result = match result {
            Ok(()) if lists && no_kernel => self.enforce_at_accept(&cfg),
            r => r,
        };
        // Without a kernel program, stats still has the L7 half to show.
        let result = if stats_json.is_some() && no_kernel {
            Ok(())
        } else {
            result
        };
        if let (Some(json), Ok(())) = (stats_json, &result) {
            self.append_l7_stats(json, no_kernel, &mut out);
        }
        let code = match &result {
            Ok(()) => 0,
            Err(e) => {
                err.extend_from_slice(format!("error: {e:#}\n").as_bytes());
                crate::error::exit_code(e)
            }
        };
        Reply::ok(serde_json::json!({
            "code": code,
            "stdout": String::from_utf8_lossy(&out),
            "stderr": String::from_utf8_lossy(&err),
        }))
    }
}

impl Daemon {
    /// Adds the L7 summary (and, without a kernel program, why) to the
    /// output of `gateway stats`.
    fn append_l7_stats(&self, json: bool, no_kernel: bool, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let l7 = self.shared.metrics.summary();
        let xdp = match (&self.degraded, no_kernel) {
            (Some(why), _) => format!("degraded: {why}"),
            (None, true) => "disabled".to_owned(),
            (None, false) => "attached".to_owned(),
        };
        if json {
            let mut v: serde_json::Value =
                serde_json::from_slice(out).unwrap_or_else(|_| serde_json::json!({}));
            v["l7"] = l7;
            v["xdp"] = xdp.into();
            *out = serde_json::to_vec_pretty(&v).expect("JSON values encode");
            out.push(b'\n');
        } else {
            let _ = writeln!(out, "\nXDP: {xdp}");
            let _ = writeln!(
                out,
                "L7: requests {}, tokens {} prompt + {} completion, {} open connections, {} bans",
                l7["requests"],
                l7["tokens"]["prompt"],
                l7["tokens"]["completion"],
                l7["open_connections"],
                l7["bans"]
            );
        }
    }
}

impl Handler for Daemon {
    fn handle(&self, req: Request) -> Reply {
        match req {
            Request::Reload => match self.reload() {
                Ok(notes) => {
                    tracing::info!("config reloaded: {}", notes.join("; "));
                    Reply::ok(serde_json::json!({ "notes": notes }))
                }
                Err(problems) => {
                    tracing::warn!(
                        "reload rejected, the old config keeps serving: {}",
                        problems.join("; ")
                    );
                    Reply::failed(problems)
                }
            },
            Request::Backends => Reply::ok(self.backends()),
            Request::Drain { url, on } => self.drain(&url, on),
            Request::Cli { args } => self.cli(args),
        }
    }
}
