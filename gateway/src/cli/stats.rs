//! `gateway limits`, `gateway stats` and `gateway top`.

use anyhow::Result;
use gateway_common::Limits;
use serde::Serialize;

use super::{output, output::Io, LimitsCmd};
use crate::{
    config::{check_limits, Config},
    error::UsageError,
    kernel::{
        policy,
        runtime::{open_running, Status},
        state::{LimitOverrides, State},
    },
};

#[derive(Serialize)]
struct LimitsView {
    syn_rate: u64,
    syn_burst: u64,
    global_syn_rate: u64,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    protected_ports: Vec<u16>,
    /// Which values are runtime overrides of the config.
    overrides: LimitOverrides,
}

fn view(l: &Limits, ports: Vec<u16>, overrides: LimitOverrides) -> LimitsView {
    LimitsView {
        syn_rate: l.syn_rate,
        syn_burst: l.syn_burst,
        global_syn_rate: l.global_rate,
        ipv4_prefix: l.ipv4_prefix,
        ipv6_prefix: l.ipv6_prefix,
        protected_ports: ports,
        overrides,
    }
}

/// `gateway limits`. `at_accept`: there is no kernel program; the daemon
/// running the command enforces the limits at accept (see `lists::AtAccept`).
pub fn limits(cfg: &Config, cmd: LimitsCmd, io: &mut Io, at_accept: bool) -> Result<()> {
    match cmd {
        LimitsCmd::Show(f) => {
            let state = State::load(&cfg.server.state_dir)?;
            let (l, ports) = if at_accept {
                (
                    policy::effective_limits(&cfg.xdp, &state),
                    cfg.xdp.protected_ports.clone(),
                )
            } else {
                let maps = open_running(cfg)?;
                let l = maps
                    .limits()?
                    .unwrap_or_else(|| policy::effective_limits(&cfg.xdp, &state));
                (l, maps.ports()?)
            };
            let v = view(&l, ports, state.limits);
            if f.json {
                writeln!(io.out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                let mark = |o: Option<u64>| {
                    if o.is_some() {
                        "  (runtime override)"
                    } else {
                        ""
                    }
                };
                let off = |n: u64| {
                    if n == 0 {
                        "off".to_string()
                    } else {
                        n.to_string()
                    }
                };
                writeln!(
                    io.out,
                    "syn_rate         {}/s per source{}",
                    off(v.syn_rate),
                    mark(v.overrides.syn_rate)
                )?;
                writeln!(
                    io.out,
                    "syn_burst        {}{}",
                    v.syn_burst,
                    mark(v.overrides.syn_burst)
                )?;
                writeln!(
                    io.out,
                    "global_syn_rate  {}/s{}",
                    off(v.global_syn_rate),
                    mark(v.overrides.global_syn_rate)
                )?;
                writeln!(
                    io.out,
                    "source prefix    IPv4 /{}, IPv6 /{}",
                    v.ipv4_prefix, v.ipv6_prefix
                )?;
                let ports: Vec<String> = v.protected_ports.iter().map(u16::to_string).collect();
                writeln!(io.out, "protected ports  {}", ports.join(", "))?;
            }
            Ok(())
        }
        LimitsCmd::Set(s) => {
            if !s.reset
                && s.syn_rate.is_none()
                && s.syn_burst.is_none()
                && s.global_syn_rate.is_none()
            {
                return Err(UsageError(
                    "nothing to set: pass --syn-rate, --syn-burst, --global-syn-rate or --reset"
                        .into(),
                )
                .into());
            }
            if at_accept && !cfg.xdp.enabled {
                return Err(UsageError(
                    "xdp.enabled is false: there are no SYN limits to set (enable [xdp] in the config)"
                        .into(),
                )
                .into());
            }
            let mut maps = if at_accept {
                None
            } else {
                Some(open_running(cfg)?)
            };
            let _lock = crate::kernel::state::lock(&cfg.server.state_dir)?;
            let state = State::load(&cfg.server.state_dir)?;
            let mut changed = state.clone();
            if s.reset {
                changed.limits = LimitOverrides::default();
            } else {
                let o = &mut changed.limits;
                o.syn_rate = s.syn_rate.or(o.syn_rate);
                o.syn_burst = s.syn_burst.or(o.syn_burst);
                o.global_syn_rate = s.global_syn_rate.or(o.global_syn_rate);
            }
            let l = policy::effective_limits(&cfg.xdp, &changed);
            let problems = check_limits(l.syn_rate, l.syn_burst, l.global_rate);
            if let Some(p) = problems.first() {
                return Err(
                    UsageError(format!("--{}: {}", p.path.replace('_', "-"), p.message)).into(),
                );
            }
            changed.save(&cfg.server.state_dir)?;
            if let Err(e) = maps.as_mut().map_or(Ok(()), |m| m.set_limits(&l)) {
                state.save(&cfg.server.state_dir)?;
                return Err(e);
            }
            writeln!(
                io.out,
                "limits now: syn_rate {}/s, syn_burst {}, global_syn_rate {}/s",
                l.syn_rate, l.syn_burst, l.global_rate
            )?;
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct StatsView {
    attached: Option<Status>,
    reasons: Vec<ReasonRow>,
    total_packets: u64,
    dropped_packets: u64,
    maps: MapsRow,
}

#[derive(Serialize)]
struct ReasonRow {
    reason: &'static str,
    action: &'static str,
    packets: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct MapsRow {
    allow: usize,
    block_cidr: usize,
    block_host: usize,
    syn_buckets: usize,
    top_sources: usize,
    syn_trusted: usize,
    /// How the program searches IPv4 CIDR blocks; `None`: the trie alone.
    cidr_table: Option<CidrTable>,
    /// The same for IPv6 CIDR blocks.
    cidr_table_v6: Option<CidrTable>,
}

#[derive(Serialize)]
struct CidrTable {
    /// Prefix lengths searched in `BLOCK_NET_V4` (`BLOCK_NET_V6`), longest
    /// first.
    lengths: Vec<u8>,
    /// Shorter lengths are in use too, searched in the LPM trie after.
    trie_after: bool,
}

pub fn stats(cfg: &Config, json: bool, io: &mut Io) -> Result<()> {
    let maps = open_running(cfg)?;
    let reasons: Vec<ReasonRow> = maps
        .stats()?
        .into_iter()
        .map(|(r, c)| ReasonRow {
            reason: r.name(),
            action: if r.is_drop() { "drop" } else { "pass" },
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let o = maps.occupancy()?;
    let v = StatsView {
        attached: Status::read(&cfg.server.state_dir),
        total_packets: reasons.iter().map(|r| r.packets).sum(),
        dropped_packets: reasons
            .iter()
            .filter(|r| r.action == "drop")
            .map(|r| r.packets)
            .sum(),
        reasons,
        maps: MapsRow {
            allow: o.allow,
            block_cidr: o.block_cidr,
            block_host: o.block_host,
            syn_buckets: o.syn_buckets,
            top_sources: o.top_sources,
            syn_trusted: o.syn_trusted,
            cidr_table: maps.cidr_table()?.map(CidrTable::from),
            cidr_table_v6: maps.cidr_table_v6()?.map(CidrTable::from),
        },
    };
    if json {
        writeln!(io.out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    match &v.attached {
        Some(s) => {
            let ifs: Vec<String> = s
                .interfaces
                .iter()
                .map(|i| format!("{} ({})", i.name, i.mode))
                .collect();
            writeln!(
                io.out,
                "XDP attached to {} by pid {}",
                ifs.join(", "),
                s.pid
            )?;
        }
        None => writeln!(
            io.out,
            "XDP attached (no status file in {})",
            cfg.server.state_dir.display()
        )?,
    }
    let mut t = vec![["REASON", "ACTION", "PACKETS", "BYTES"]
        .map(String::from)
        .to_vec()];
    for r in &v.reasons {
        t.push(vec![
            r.reason.into(),
            r.action.into(),
            r.packets.to_string(),
            r.bytes.to_string(),
        ]);
    }
    output::table(io, &t)?;
    writeln!(
        io.out,
        "total {} packets, {} dropped",
        v.total_packets, v.dropped_packets
    )?;
    writeln!(
        io.out,
        "maps: allow {}, block {} CIDR + {} host, syn buckets {}, top sources {}, trusted sources {}",
        o.allow, o.block_cidr, o.block_host, o.syn_buckets, o.top_sources, o.syn_trusted
    )?;
    for (family, t) in [
        ("IPv4", &v.maps.cidr_table),
        ("IPv6", &v.maps.cidr_table_v6),
    ] {
        writeln!(io.out, "{family} CIDR search: {}", describe_search(t))?;
    }
    Ok(())
}

impl From<(Vec<u8>, bool)> for CidrTable {
    fn from((lengths, trie_after): (Vec<u8>, bool)) -> CidrTable {
        CidrTable {
            lengths,
            trie_after,
        }
    }
}

/// How the program searches one family's CIDR blocks, in words.
fn describe_search(t: &Option<CidrTable>) -> String {
    match t {
        None => "the LPM trie (the table is not in use)".to_string(),
        Some(t) if t.lengths.is_empty() => "nothing to search".to_string(),
        Some(t) => {
            let lengths: Vec<String> = t.lengths.iter().map(|l| format!("/{l}")).collect();
            let after = if t.trie_after {
                ", then the LPM trie for shorter prefixes"
            } else {
                ""
            };
            format!("table for {}{after}", lengths.join(" "))
        }
    }
}

/// One line of `gateway top`.
#[derive(Serialize)]
struct TopRow {
    /// An address (rate-limited or malformed traffic) or a blocklist entry.
    source: String,
    /// "limits" (SYN limits, malformed headers) or "blocklist".
    reason: &'static str,
    dropped_packets: u64,
}

pub fn top(cfg: &Config, n: usize, json: bool, io: &mut Io) -> Result<()> {
    let maps = open_running(cfg)?;
    let now = crate::kernel::clock::monotonic_ns();
    let mut rows: Vec<TopRow> = maps
        .top(n)?
        .iter()
        .map(|(k, c)| TopRow {
            source: output::source(k).to_string(),
            reason: "limits",
            dropped_packets: *c,
        })
        .chain(
            maps.block_entries()?
                .into_iter()
                .filter(|(_, v)| v.hits > 0 && v.active(now))
                .map(|(c, v)| TopRow {
                    source: c.to_string(),
                    reason: "blocklist",
                    dropped_packets: v.hits,
                }),
        )
        .collect();
    rows.sort_by(|a, b| {
        b.dropped_packets
            .cmp(&a.dropped_packets)
            .then_with(|| a.source.cmp(&b.source))
    });
    rows.truncate(n);
    if json {
        writeln!(io.out, "{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        let mut t = vec![["SOURCE", "REASON", "DROPPED"].map(String::from).to_vec()];
        t.extend(
            rows.into_iter()
                .map(|r| vec![r.source, r.reason.into(), r.dropped_packets.to_string()]),
        );
        output::table(io, &t)?;
    }
    Ok(())
}
