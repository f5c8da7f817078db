//! `gateway block ...` and `gateway allow ...`: runtime changes to the
//! kernel lists, persisted in state_dir so they survive restarts.
//!
//! Every change is validated first and persisted before the map is touched;
//! if the map update fails the previous state file is restored, so an error
//! changes nothing.
//!
//! Without a kernel program (XDP disabled or unavailable), the daemon runs
//! these commands against [`AtAccept`]: the change is persisted and the
//! daemon then enforces the whole policy at accept again.

use anyhow::{Context as _, Result};
use gateway_common::{cidr::Cidr, BlockValue};
use serde::Serialize;

use super::{output, output::Io, AllowCmd, BlockCmd};
use crate::{
    config::Config,
    error::UsageError,
    kernel::{
        clock,
        maps::KernelMaps,
        runtime::open_running,
        state::{self, BlockEntry, State},
    },
};

/// Where the lists are enforced.
pub trait Lists {
    fn block_insert(&mut self, cidr: &Cidr, v: BlockValue) -> Result<()>;
    fn block_remove(&mut self, cidr: &Cidr) -> Result<bool>;
    fn block_entries(&self) -> Result<Vec<(Cidr, BlockValue)>>;
    fn allow_insert(&mut self, cidr: &Cidr) -> Result<()>;
    fn allow_remove(&mut self, cidr: &Cidr) -> Result<bool>;
    fn allow_entries(&self) -> Result<Vec<Cidr>>;
}

impl Lists for KernelMaps {
    fn block_insert(&mut self, cidr: &Cidr, v: BlockValue) -> Result<()> {
        KernelMaps::block_insert(self, cidr, v)
    }
    fn block_remove(&mut self, cidr: &Cidr) -> Result<bool> {
        KernelMaps::block_remove(self, cidr)
    }
    fn block_entries(&self) -> Result<Vec<(Cidr, BlockValue)>> {
        KernelMaps::block_entries(self)
    }
    fn allow_insert(&mut self, cidr: &Cidr) -> Result<()> {
        KernelMaps::allow_insert(self, cidr)
    }
    fn allow_remove(&mut self, cidr: &Cidr) -> Result<bool> {
        KernelMaps::allow_remove(self, cidr)
    }
    fn allow_entries(&self) -> Result<Vec<Cidr>> {
        KernelMaps::allow_entries(self)
    }
}

/// The lists without a kernel program: the policy the config and the state
/// file give. Changes live in the state file alone (the commands persist
/// them); the daemon enforces them at accept after the command.
pub struct AtAccept(pub Config);

impl Lists for AtAccept {
    fn block_insert(&mut self, _: &Cidr, _: BlockValue) -> Result<()> {
        Ok(())
    }
    fn block_remove(&mut self, _: &Cidr) -> Result<bool> {
        Ok(true)
    }
    fn block_entries(&self) -> Result<Vec<(Cidr, BlockValue)>> {
        Ok(crate::kernel::policy::load(&self.0)?
            .block
            .into_iter()
            .collect())
    }
    fn allow_insert(&mut self, _: &Cidr) -> Result<()> {
        Ok(())
    }
    fn allow_remove(&mut self, _: &Cidr) -> Result<bool> {
        Ok(true)
    }
    fn allow_entries(&self) -> Result<Vec<Cidr>> {
        Ok(crate::kernel::policy::load(&self.0)?
            .allow
            .into_iter()
            .collect())
    }
}

/// The lists of the running program, or `at_accept`'s when there is none.
fn open(cfg: &Config, at_accept: bool) -> Result<Box<dyn Lists>> {
    if at_accept {
        return Ok(Box::new(AtAccept(cfg.clone())));
    }
    Ok(Box::new(open_running(cfg)?))
}

/// Applies `change` to the state, persists it, then runs `apply` on the
/// maps; restores the old state file if `apply` fails.
fn persist_then_apply(
    cfg: &Config,
    state: State,
    changed: State,
    apply: impl FnOnce() -> Result<()>,
) -> Result<()> {
    changed.save(&cfg.server.state_dir)?;
    if let Err(e) = apply() {
        state
            .save(&cfg.server.state_dir)
            .context("restoring the previous state after a failure")?;
        return Err(e);
    }
    Ok(())
}

pub fn block(cfg: &Config, cmd: BlockCmd, io: &mut Io, at_accept: bool) -> Result<()> {
    match cmd {
        BlockCmd::Add { cidr, ttl, comment } => {
            let mut maps = open(cfg, at_accept)?;
            let _lock = state::lock(&cfg.server.state_dir)?;
            let state = State::load(&cfg.server.state_dir)?;
            let now = clock::unix_ms();
            let entry = BlockEntry {
                cidr,
                expires_unix_ms: ttl.map(|t| now + t.as_millis() as u64),
                cause: "manual".into(),
                comment,
                added_unix_ms: now,
            };
            let mut changed = state.clone();
            changed.upsert_block(entry);
            let mut permanent_elsewhere = false;
            persist_then_apply(cfg, state, changed, || {
                // The kernel gets what the whole policy says for the entry,
                // so a timed entry never shortens a permanent one of the
                // config (xdp.block, block files): permanent wins.
                let want = crate::kernel::policy::load(cfg)?;
                let value = want.block.get(&cidr).copied().unwrap_or_else(|| {
                    BlockValue::until(
                        ttl.map_or(0, |t| clock::monotonic_ns() + t.as_nanos() as u64),
                    )
                });
                permanent_elsewhere = ttl.is_some() && value.expires_ns == 0;
                maps.block_insert(&cidr, value)
            })?;
            if permanent_elsewhere {
                writeln!(io.err, "warning: {cidr} is blocked permanently by the config; it stays blocked after the ttl")?;
            }
            if let Some(a) = maps.allow_entries()?.into_iter().find(|a| covers(a, &cidr)) {
                writeln!(io.err, "warning: {cidr} is inside allowlisted {a}; the allowlist wins until it is removed")?;
            }
            match ttl {
                Some(t) => writeln!(
                    io.out,
                    "blocked {cidr} for {}",
                    crate::config::duration::format(t)
                )?,
                None => writeln!(io.out, "blocked {cidr}")?,
            }
            Ok(())
        }
        BlockCmd::Del { cidr } => {
            let mut maps = open(cfg, at_accept)?;
            let _lock = state::lock(&cfg.server.state_dir)?;
            let state = State::load(&cfg.server.state_dir)?;
            let in_maps = maps.block_entries()?.iter().any(|(c, _)| *c == cidr);
            let mut changed = state.clone();
            let in_state = changed.remove_block(&cidr);
            if !in_maps && !in_state {
                return Err(UsageError(format!(
                    "{cidr} is not in the blocklist (see `gateway block list`)"
                ))
                .into());
            }
            // The daemon rebuilds its policy from the config at every
            // reload (and, without XDP, right after this command): an
            // entry the config lists cannot be removed here, only there.
            if from_config(cfg, &cidr) {
                let also = if in_state {
                    " (it was also blocked here: run this again after the reload)"
                } else {
                    ""
                };
                return Err(UsageError(format!(
                    "{cidr} comes from the config (xdp.block or xdp.block_files) and stays \
                     blocked while it is listed there: remove it there and run `gateway \
                     reload`{also}; to let it through meanwhile, `gateway allow add {cidr}`"
                ))
                .into());
            }
            persist_then_apply(cfg, state, changed, || maps.block_remove(&cidr).map(|_| ()))?;
            writeln!(io.out, "unblocked {cidr}")?;
            Ok(())
        }
        BlockCmd::List(f) => {
            let maps = open(cfg, at_accept)?;
            let rows = block_rows(cfg, maps.as_ref())?;
            if f.json {
                writeln!(io.out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                let mut t = vec![["CIDR", "EXPIRES IN", "HITS", "CAUSE", "SOURCE", "COMMENT"]
                    .map(String::from)
                    .to_vec()];
                for r in &rows {
                    t.push(vec![
                        r.cidr.clone(),
                        output::remaining(r.expires_in_secs.map(std::time::Duration::from_secs)),
                        r.hits.to_string(),
                        r.cause.clone(),
                        r.source.into(),
                        r.comment.clone().unwrap_or_default(),
                    ]);
                }
                output::table(io, &t)?;
                writeln!(io.err, "{} entries", rows.len())?;
            }
            Ok(())
        }
    }
}

/// A blocklist entry as `block list` shows it.
#[derive(Serialize)]
pub struct BlockRow {
    pub cidr: String,
    /// `None` = permanent.
    pub expires_in_secs: Option<u64>,
    pub cause: String,
    /// "runtime" (CLI, bans) or "config" (xdp.block, block_files).
    pub source: &'static str,
    /// Packets this entry dropped since it was added.
    pub hits: u64,
    pub comment: Option<String>,
}

fn block_rows(cfg: &Config, maps: &dyn Lists) -> Result<Vec<BlockRow>> {
    let state = State::load(&cfg.server.state_dir)?;
    let now = clock::monotonic_ns();
    let mut entries = maps.block_entries()?;
    entries.sort_by_key(|(c, _)| *c);
    Ok(entries
        .into_iter()
        .filter(|(_, v)| v.active(now))
        .map(|(c, v)| {
            let meta = state.block.iter().find(|e| e.cidr == c);
            BlockRow {
                cidr: c.to_string(),
                expires_in_secs: clock::remaining(v.expires_ns).map(|d| d.as_secs()),
                cause: meta.map_or_else(|| "config".into(), |m| m.cause.clone()),
                source: if meta.is_some() { "runtime" } else { "config" },
                hits: v.hits,
                comment: meta.and_then(|m| m.comment.clone()),
            }
        })
        .collect())
}

fn covers(outer: &Cidr, inner: &Cidr) -> bool {
    outer.prefix_len() <= inner.prefix_len() && outer.contains(inner.addr())
}

fn from_config(cfg: &Config, cidr: &Cidr) -> bool {
    cfg.xdp.block.contains(cidr)
        || crate::kernel::policy::load_block_files(&cfg.xdp)
            .is_ok_and(|(files, _)| files.contains(cidr))
}

pub fn allow(cfg: &Config, cmd: AllowCmd, io: &mut Io, at_accept: bool) -> Result<()> {
    match cmd {
        AllowCmd::Add { cidr } => {
            let mut maps = open(cfg, at_accept)?;
            let _lock = state::lock(&cfg.server.state_dir)?;
            let state = State::load(&cfg.server.state_dir)?;
            let mut changed = state.clone();
            if !changed.allow.contains(&cidr) {
                changed.allow.push(cidr);
            }
            persist_then_apply(cfg, state, changed, || maps.allow_insert(&cidr))?;
            writeln!(io.out, "allowed {cidr}")?;
            Ok(())
        }
        AllowCmd::Del { cidr } => {
            let mut maps = open(cfg, at_accept)?;
            let _lock = state::lock(&cfg.server.state_dir)?;
            let state = State::load(&cfg.server.state_dir)?;
            let in_maps = maps.allow_entries()?.contains(&cidr);
            let mut changed = state.clone();
            changed.allow.retain(|c| *c != cidr);
            if !in_maps && changed.allow.len() == state.allow.len() {
                return Err(UsageError(format!(
                    "{cidr} is not in the allowlist (see `gateway allow list`)"
                ))
                .into());
            }
            if cfg.xdp.allow.contains(&cidr) {
                return Err(UsageError(format!(
                    "{cidr} comes from xdp.allow in the config and stays allowed while it \
                     is listed there: remove it there and run `gateway reload`"
                ))
                .into());
            }
            persist_then_apply(cfg, state, changed, || maps.allow_remove(&cidr).map(|_| ()))?;
            writeln!(io.out, "removed {cidr} from the allowlist")?;
            Ok(())
        }
        AllowCmd::List(f) => {
            let maps = open(cfg, at_accept)?;
            let state = State::load(&cfg.server.state_dir)?;
            let mut list = maps.allow_entries()?;
            list.sort();
            #[derive(Serialize)]
            struct Row {
                cidr: String,
                source: &'static str,
            }
            let rows: Vec<Row> = list
                .iter()
                .map(|c| Row {
                    cidr: c.to_string(),
                    source: if state.allow.contains(c) {
                        "runtime"
                    } else {
                        "config"
                    },
                })
                .collect();
            if f.json {
                writeln!(io.out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                let mut t = vec![vec!["CIDR".to_string(), "SOURCE".to_string()]];
                t.extend(
                    rows.iter()
                        .map(|r| vec![r.cidr.clone(), r.source.to_string()]),
                );
                output::table(io, &t)?;
            }
            Ok(())
        }
    }
}
