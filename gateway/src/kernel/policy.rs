//! The kernel policy the config and the persisted state ask for, and its
//! application to the maps as a diff (insert what is missing or changed,
//! delete what is no longer wanted), so the program never sees a moment
//! with an empty blocklist.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context as _, Result};
use gateway_common::{cidr::Cidr, BlockValue, Limits};

use super::{clock, maps::KernelMaps, state::State};
use crate::config::XdpConfig;

/// What the maps should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub block: BTreeMap<Cidr, BlockValue>,
    pub allow: BTreeSet<Cidr>,
    pub limits: Limits,
    pub ports: Vec<u16>,
}

/// Effective SYN limits: config values with runtime overrides on top.
pub fn effective_limits(cfg: &XdpConfig, state: &State) -> Limits {
    let o = &state.limits;
    Limits::new(
        o.syn_rate.unwrap_or(cfg.syn_rate),
        o.syn_burst.unwrap_or(cfg.syn_burst),
        o.global_syn_rate.unwrap_or(cfg.global_syn_rate),
        cfg.ipv4_prefix,
        cfg.ipv6_prefix,
    )
}

/// Parses a block file: one IP or CIDR per line, `#` starts a comment. Bad
/// lines are reported as `file:line: problem` and skipped; good lines load.
pub fn parse_block_file(text: &str, file: &Path) -> (Vec<Cidr>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        match entry.parse::<Cidr>() {
            Ok(c) => good.push(c),
            Err(e) => bad.push(format!("{}:{}: {entry:?}: {e}", file.display(), i + 1)),
        }
    }
    (good, bad)
}

/// Reads every block file. Bad lines become warnings (the good lines
/// load); a file that cannot be read is an error: taken as empty, it
/// would unblock its whole feed, e.g. when a feed updater has it
/// truncated at the moment of a reload. A reload that meets one is
/// refused and the entries loaded before stay.
pub fn load_block_files(cfg: &XdpConfig) -> Result<(Vec<Cidr>, Vec<String>)> {
    let mut all = Vec::new();
    let mut warnings = Vec::new();
    for f in &cfg.block_files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the block file {}", f.display()))?;
        let (good, bad) = parse_block_file(&text, f);
        all.extend(good);
        warnings.extend(bad);
    }
    Ok((all, warnings))
}

/// Combines config, block files and runtime state into the wanted maps.
pub fn desired(cfg: &XdpConfig, state: &State, file_blocks: &[Cidr]) -> Desired {
    let mut block: BTreeMap<Cidr, BlockValue> = BTreeMap::new();
    let mut add = |c: Cidr, expires_ns: u64| {
        let e = block.entry(c).or_insert(BlockValue::until(expires_ns));
        // Permanent (0) wins; otherwise the later deadline.
        if e.expires_ns != 0 && (expires_ns == 0 || expires_ns > e.expires_ns) {
            e.expires_ns = expires_ns;
        }
    };
    for c in cfg.block.iter().chain(file_blocks) {
        add(*c, 0);
    }
    for e in &state.block {
        match e.expires_unix_ms {
            None => add(e.cidr, 0),
            Some(ms) => {
                if let Some(ns) = clock::expiry_ns_from_unix_ms(ms) {
                    add(e.cidr, ns)
                }
            }
        }
    }
    let allow = cfg.allow.iter().chain(&state.allow).copied().collect();
    let mut ports = cfg.protected_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    Desired {
        block,
        allow,
        limits: effective_limits(cfg, state),
        ports,
    }
}

/// The policy for `cfg`: its lists and block files (bad lines logged) plus
/// the runtime entries persisted in its state_dir. What the kernel program
/// enforces, or the userspace guard without one.
pub fn load(cfg: &crate::config::Config) -> Result<Desired> {
    let state = State::load(&cfg.server.state_dir)?;
    let (file_blocks, warnings) = load_block_files(&cfg.xdp)?;
    for w in &warnings {
        tracing::warn!("block file: {w}");
    }
    Ok(desired(&cfg.xdp, &state, &file_blocks))
}

/// What `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub block_added: usize,
    pub block_removed: usize,
    pub allow_added: usize,
    pub allow_removed: usize,
}

/// Whether two kernel deadlines are one: equal, or both timed and within
/// a second. A timed entry's deadline is kept as wall-clock milliseconds
/// and turned into the kernel's clock at each load, which moves it by a
/// little; rewriting it at every reload would reset its hit counter.
fn same_deadline(a: u64, b: u64) -> bool {
    a == b || (a != 0 && b != 0 && a.abs_diff(b) < 1_000_000_000)
}

/// Brings the maps to `want` by difference. Limits and ports are written
/// first, additions before removals.
pub fn apply(maps: &mut KernelMaps, want: &Desired) -> Result<Applied> {
    let mut done = Applied::default();
    maps.set_limits(&want.limits)?;
    maps.set_ports(&want.ports)?;
    let have: BTreeMap<Cidr, BlockValue> = maps.block_entries()?.into_iter().collect();
    // Compare deadlines only: the kernel's hit counter moves on its own.
    let add: Vec<(Cidr, BlockValue)> = want
        .block
        .iter()
        .filter(|(c, v)| {
            !have
                .get(c)
                .is_some_and(|h| same_deadline(h.expires_ns, v.expires_ns))
        })
        .map(|(c, v)| (*c, *v))
        .collect();
    maps.block_insert_many(&add)?;
    done.block_added = add.len();
    for c in have.keys().filter(|c| !want.block.contains_key(c)) {
        maps.block_remove(c)?;
        done.block_removed += 1;
    }
    let have: BTreeSet<Cidr> = maps.allow_entries()?.into_iter().collect();
    for c in want.allow.difference(&have) {
        maps.allow_insert(c)?;
        done.allow_added += 1;
    }
    for c in have.difference(&want.allow) {
        maps.allow_remove(c)?;
        done.allow_removed += 1;
    }
    // Clears what removals left behind and lets the program trust the hints.
    maps.hint_rebuild(want.block.keys(), &want.allow)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_within_a_second_are_one() {
        assert!(same_deadline(0, 0));
        assert!(same_deadline(5_000_000_000, 5_000_300_000));
        assert!(!same_deadline(0, 5_000_000_000), "permanent is no deadline");
        assert!(!same_deadline(5_000_000_000, 7_000_000_000));
    }

    #[test]
    fn block_file_reports_bad_lines_and_keeps_good_ones() {
        let text = "# feed\n203.0.113.0/24\n\n10.1.2.3/8  # typo\nnot-an-ip\n2001:db8::/32 # v6\n";
        let (good, bad) = parse_block_file(text, Path::new("/etc/gateway/blocklist.txt"));
        assert_eq!(good.len(), 2);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].starts_with("/etc/gateway/blocklist.txt:4: \"10.1.2.3/8\""),
            "{}",
            bad[0]
        );
        assert!(bad[0].contains("did you mean 10.0.0.0/8"), "{}", bad[0]);
        assert!(
            bad[1].starts_with("/etc/gateway/blocklist.txt:5:"),
            "{}",
            bad[1]
        );
    }

    #[test]
    fn permanent_entries_win_over_temporary_ones() {
        let cfg = crate::config::Config::parse(
            "[xdp]\ninterfaces=[\"lo\"]\nblock=[\"203.0.113.0/24\"]\nallow=[\"10.0.0.0/8\"]\nprotected_ports=[443,80,443]\n",
        )
        .unwrap()
        .xdp;
        let mut state = State::default();
        state.upsert_block(super::super::state::BlockEntry {
            cidr: "203.0.113.0/24".parse().unwrap(),
            expires_unix_ms: Some(clock::unix_ms() + 60_000),
            cause: "manual".into(),
            comment: None,
            added_unix_ms: 0,
        });
        state.limits.syn_rate = Some(3);
        let d = desired(&cfg, &state, &[]);
        assert_eq!(d.block.len(), 1);
        assert_eq!(d.block.values().next().unwrap().expires_ns, 0);
        assert_eq!(d.ports, vec![80, 443]);
        assert_eq!(d.limits.syn_rate, 3, "runtime override applies");
        assert_eq!(d.limits.syn_burst, cfg.syn_burst);
    }
}
