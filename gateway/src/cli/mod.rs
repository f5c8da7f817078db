//! Command-line surface (DESIGN.md section 6): argument definitions and
//! dispatch. Each command group lives in its own module.

mod admin_cmds;
mod keys;
mod lists;
pub mod output;
mod run;
mod stats;

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use gateway_common::cidr::Cidr;

use crate::{
    config::{self, Config},
    error::UsageError,
};

#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version,
    about = "XDP-accelerated edge gateway for LLM APIs"
)]
pub struct Cli {
    /// Config file. Commands other than `run` and `check` fall back to
    /// built-in defaults when the default path does not exist.
    #[arg(long, global = true, env = "GATEWAY_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format of the daemon (its log and its access log).
    #[arg(long, global = true, value_enum, env = "GATEWAY_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load and attach the kernel programs and serve.
    Run,
    /// Validate the config; print every problem with its TOML path.
    Check,
    /// Manage the kernel blocklist.
    #[command(subcommand)]
    Block(BlockCmd),
    /// Manage the kernel allowlist (allowlisted sources skip every check).
    #[command(subcommand)]
    Allow(AllowCmd),
    /// Show or change the SYN rate limits at runtime.
    #[command(subcommand)]
    Limits(LimitsCmd),
    /// Kernel counters by reason, map occupancy and attach state.
    Stats(JsonFlag),
    /// Sources with the most dropped packets.
    Top(TopArgs),
    /// API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Ask the running daemon to re-read its config (like SIGHUP).
    Reload,
    /// The running daemon's backends.
    #[command(subcommand)]
    Backends(BackendsCmd),
}

#[derive(Subcommand, Debug)]
pub enum BackendsCmd {
    /// Every backend with its weight, load and state.
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Take a backend out of rotation; its in-flight requests finish.
    Drain { url: String },
    /// Put a drained backend back in rotation.
    Undrain { url: String },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Print a fresh key once, and the [[keys]] entry that stores its digest.
    New {
        /// The key's name in logs and metrics.
        #[arg(long)]
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum BlockCmd {
    /// Block an address or CIDR (IPv4 or IPv6).
    Add {
        #[arg(value_parser = parse_cidr)]
        cidr: Cidr,
        /// Lift the block after this long (e.g. 15m); permanent without it.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// Free text shown by `block list`.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Remove a blocklist entry.
    #[command(alias = "rm")]
    Del {
        #[arg(value_parser = parse_cidr)]
        cidr: Cidr,
    },
    /// List the blocklist.
    #[command(alias = "ls")]
    List(JsonFlag),
}

#[derive(Subcommand, Debug)]
pub enum AllowCmd {
    /// Never drop, rate-limit or ban an address or CIDR (IPv4 or IPv6).
    Add {
        #[arg(value_parser = parse_cidr)]
        cidr: Cidr,
    },
    /// Remove an allowlist entry.
    #[command(alias = "rm")]
    Del {
        #[arg(value_parser = parse_cidr)]
        cidr: Cidr,
    },
    /// List the allowlist.
    #[command(alias = "ls")]
    List(JsonFlag),
}

#[derive(Subcommand, Debug)]
pub enum LimitsCmd {
    /// Show the limits in force.
    Show(JsonFlag),
    /// Change limits now; the change survives restarts.
    Set(LimitsSet),
}

#[derive(Args, Debug)]
pub struct LimitsSet {
    /// New connections per second per source (0 = no per-source limit).
    #[arg(long)]
    pub syn_rate: Option<u64>,
    /// SYNs a source may send back to back.
    #[arg(long)]
    pub syn_burst: Option<u64>,
    /// New connections per second from all sources (0 = no global budget).
    #[arg(long)]
    pub global_syn_rate: Option<u64>,
    /// Drop every runtime override and return to the config's values.
    #[arg(long, conflicts_with_all = ["syn_rate", "syn_burst", "global_syn_rate"])]
    pub reset: bool,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// How many sources to show.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub n: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse::<Cidr>()
        .map_err(|e| format!("{s:?} is not a valid IP or CIDR: {e}"))
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    match config::duration::parse(s)? {
        d if d.is_zero() => {
            Err("the TTL must be longer than 0 (omit --ttl for a permanent block)".into())
        }
        d => Ok(d),
    }
}

/// Loads the config for a command. `run` and `check` insist on the file;
/// other commands use defaults when the default path does not exist.
fn load_config(path: &std::path::Path, required: bool) -> Result<Config> {
    if !required && path == std::path::Path::new(config::DEFAULT_CONFIG_PATH) && !path.exists() {
        return Ok(Config::defaults());
    }
    Ok(Config::load(path)?)
}

/// The config for a command the running daemon answers, and the file's
/// problem when it does not load. The daemon runs on the config it loaded
/// before (the file may be mid-edit, or a reload just rejected it), and
/// reaching it takes only the admin socket the file names: that is read
/// leniently, and the problem is the answer only when no daemon runs.
fn load_for_daemon(path: &std::path::Path) -> Result<(Config, Option<anyhow::Error>)> {
    let problem = match load_config(path, false) {
        Ok(c) => return Ok((c, None)),
        Err(e) => e,
    };
    let Some(socket) = lenient_admin_socket(path) else {
        return Err(problem);
    };
    let mut cfg = Config::defaults();
    cfg.server.admin_socket = socket;
    let answers = std::os::unix::net::UnixStream::connect(&cfg.server.admin_socket).is_ok();
    if !answers {
        return Err(problem);
    }
    Ok((cfg, Some(problem)))
}

fn warn_not_loaded(path: &std::path::Path, problem: &Option<anyhow::Error>) {
    if let Some(p) = problem {
        eprintln!(
            "warning: {} does not load ({p:#}); the running daemon's config applies",
            path.display()
        );
    }
}

/// `server.admin_socket` of a TOML file that may not validate as a config
/// (or the default when it names none); `None` when it is not TOML.
fn lenient_admin_socket(path: &std::path::Path) -> Option<PathBuf> {
    let table: toml::Table = std::fs::read_to_string(path).ok()?.parse().ok()?;
    match table.get("server").and_then(|s| s.get("admin_socket")) {
        Some(toml::Value::String(s)) => Some(PathBuf::from(s)),
        Some(_) => None,
        None => Some(Config::defaults().server.admin_socket),
    }
}

/// The log filter: `GATEWAY_LOG` (default `info`), with rustls held to
/// errors unless it names rustls itself. rustls warns about what a client
/// sent (an IP address as SNI, a fatal alert it answers with), once per
/// handshake: nothing an operator can act on, and any client could fill
/// the log with it.
fn log_filter(env: Option<&str>) -> tracing_subscriber::EnvFilter {
    let spec = env.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    // A directive for rustls or one of its modules (not `hyper_rustls`).
    let names_rustls = spec.split(',').any(|d| {
        let target = d.split(['=', '[']).next().unwrap_or_default().trim();
        target == "rustls" || target.starts_with("rustls::")
    });
    let spec = if names_rustls {
        spec.to_owned()
    } else {
        format!("{spec},rustls=error")
    };
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"))
}

pub fn init_logging(cli: &Cli) {
    let filter = log_filter(std::env::var("GATEWAY_LOG").ok().as_deref());
    // Colours only for a person at a terminal: under systemd, journald
    // keeps a line with escape codes as binary (`journalctl` shows "[blob
    // data]"), and colouring every access-log line cost ~14k instructions a
    // request (`NO_COLOR`, https://no-color.org, turns them off anyway).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // The access log writes its own lines, in the same format.
    crate::access_log::set_format(match cli.log_format {
        LogFormat::Text => crate::access_log::Format::Text,
        LogFormat::Json => crate::access_log::Format::Json,
    });
    let _ = match cli.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => run::run(load_config(&cli.config, true)?, &cli.config),
        Command::Check => check(&cli.config),
        cmd @ (Command::Block(_)
        | Command::Allow(_)
        | Command::Limits(_)
        | Command::Stats(_)
        | Command::Top(_)) => {
            let (cfg, problem) = load_for_daemon(&cli.config)?;
            warn_not_loaded(&cli.config, &problem);
            // With a daemon running, it executes the command, so its own
            // writes (bans) and the CLI's never race on maps or state.
            let args: Vec<String> = std::env::args().skip(1).collect();
            if let Some(reply) = crate::admin::call(
                &cfg.server.admin_socket,
                &crate::admin::Request::Cli { args },
            )? {
                if !reply.ok {
                    // The daemon could not run it at all (a CLI of another
                    // version, say): say why rather than exit silently.
                    for e in &reply.errors {
                        eprintln!("error: {e}");
                    }
                    std::process::exit(1);
                }
                let code = reply.data["code"].as_i64().unwrap_or(1) as i32;
                print!("{}", reply.data["stdout"].as_str().unwrap_or_default());
                eprint!("{}", reply.data["stderr"].as_str().unwrap_or_default());
                if code != 0 {
                    std::process::exit(code);
                }
                return Ok(());
            }
            if let Some(problem) = problem {
                // The daemon went away in between: without it, the file's
                // own config is needed.
                return Err(problem);
            }
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            local(
                &cfg,
                cmd,
                &mut output::Io {
                    out: &mut out,
                    err: &mut err,
                },
                false,
            )
        }
        Command::Keys(KeysCmd::New { name }) => keys::new(&name),
        // The daemon reads the file again and names its problems itself.
        Command::Reload => admin_cmds::reload(&load_for_daemon(&cli.config)?.0),
        Command::Backends(cmd) => {
            let (cfg, problem) = load_for_daemon(&cli.config)?;
            warn_not_loaded(&cli.config, &problem);
            match cmd {
                BackendsCmd::List(f) => admin_cmds::backends_list(&cfg, f.json),
                BackendsCmd::Drain { url } => admin_cmds::drain(&cfg, &url, true),
                BackendsCmd::Undrain { url } => admin_cmds::drain(&cfg, &url, false),
            }
        }
    }
}

/// Runs a kernel-policy command against the pinned maps (from the CLI with
/// no daemon, or inside the daemon on behalf of the CLI).
/// Runs a kernel policy command. `at_accept`: there is no kernel program,
/// and the daemon running the command enforces the lists at accept (see
/// `lists::AtAccept`).
pub fn local(cfg: &Config, cmd: Command, io: &mut output::Io, at_accept: bool) -> Result<()> {
    match cmd {
        Command::Block(cmd) => lists::block(cfg, cmd, io, at_accept),
        Command::Allow(cmd) => lists::allow(cfg, cmd, io, at_accept),
        Command::Limits(cmd) => stats::limits(cfg, cmd, io, at_accept),
        Command::Stats(f) => stats::stats(cfg, f.json, io),
        Command::Top(_) if at_accept => anyhow::bail!(
            "the daemon runs without an XDP program (xdp.enabled is false, or it could not \
             attach: see `gateway stats`), so there are no kernel drop counts to rank"
        ),
        Command::Top(a) => stats::top(cfg, a.n, a.json, io),
        _ => Err(UsageError("not a kernel policy command".into()).into()),
    }
}

fn check(path: &std::path::Path) -> Result<()> {
    let cfg = Config::load(path)?;
    // What `gateway run` would refuse beyond the file itself: TLS files
    // that do not load, interfaces this host does not have.
    let mut refused = Vec::new();
    if let Some(tls) = &cfg.server.tls {
        match crate::listener::tls::acceptor(tls) {
            Err(e) => refused.push(format!("{e:#}")),
            Ok(loaded) => {
                // Served all the same, but the operator must hear it.
                let now = std::time::SystemTime::now();
                if let Some(w) =
                    crate::listener::tls::validity_warning(&tls.cert, loaded.validity, now)
                {
                    eprintln!("warning: {w}");
                }
            }
        }
    }
    if cfg.xdp.enabled {
        if let Err(e) = crate::kernel::loader::check_interfaces(&cfg.xdp.interfaces) {
            refused.push(format!("{e:#}"));
        }
    }
    if !refused.is_empty() {
        for r in &refused {
            eprintln!("  {r}");
        }
        return Err(UsageError(format!(
            "{}: {} problem{} on this host",
            path.display(),
            refused.len(),
            if refused.len() == 1 { "" } else { "s" }
        ))
        .into());
    }
    let warnings = match crate::kernel::policy::load_block_files(&cfg.xdp) {
        Ok((_, warnings)) => warnings,
        Err(e) => return Err(UsageError(format!("{}: {e:#}", path.display())).into()),
    };
    for w in &warnings {
        println!("warning: {w}");
    }
    println!(
        "{}: ok ({} model{}, {} key{}, xdp {})",
        path.display(),
        cfg.models.len(),
        if cfg.models.len() == 1 { "" } else { "s" },
        cfg.keys.len(),
        if cfg.keys.len() == 1 { "" } else { "s" },
        if cfg.xdp.enabled {
            format!("on {}", cfg.xdp.interfaces.join(", "))
        } else {
            "off".into()
        },
    );
    // Bad lines are skipped by `run` and `reload` too, with the same
    // warnings: a typo in a third-party feed must not stop a restart, nor
    // fail the `check` an operator runs before one.
    if !warnings.is_empty() {
        println!(
            "{} bad line{} in block files skipped",
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_is_held_to_errors_unless_named() {
        let directives = |env: Option<&str>| {
            let mut d: Vec<String> = log_filter(env)
                .to_string()
                .split(',')
                .map(str::to_owned)
                .collect();
            d.sort();
            d
        };
        assert_eq!(directives(None), ["info", "rustls=error"]);
        assert_eq!(directives(Some("")), ["info", "rustls=error"]);
        assert_eq!(
            directives(Some("warn,access=info")),
            ["access=info", "rustls=error", "warn"]
        );
        assert_eq!(
            directives(Some("info,rustls=debug")),
            ["info", "rustls=debug"]
        );
        assert_eq!(
            directives(Some("info,rustls::msgs=warn")),
            ["info", "rustls::msgs=warn"]
        );
        assert_eq!(
            directives(Some("info,hyper_rustls=debug")),
            ["hyper_rustls=debug", "info", "rustls=error"]
        );
        // A spec EnvFilter cannot read: the default, as before.
        assert_eq!(directives(Some("[[")), ["info", "rustls=error"]);
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
    }

    #[test]
    fn block_add_with_ttl_and_comment() {
        let cli = parse(&[
            "block",
            "add",
            "2001:db8::/48",
            "--ttl",
            "15m",
            "--comment",
            "abuse",
        ])
        .unwrap();
        let Command::Block(BlockCmd::Add { cidr, ttl, comment }) = cli.command else {
            panic!("parsed into the wrong command");
        };
        assert_eq!(cidr.to_string(), "2001:db8::/48");
        assert_eq!(ttl, Some(Duration::from_secs(900)));
        assert_eq!(comment.as_deref(), Some("abuse"));
    }

    #[test]
    fn bad_cidrs_and_ttls_are_rejected_by_the_parser() {
        for args in [
            &["block", "add", "10.0.0.1/8"][..],
            &["block", "add", "300.1.1.1"],
            &["block", "add", "10.0.0.0/8", "--ttl", "0s"],
            &["block", "add", "10.0.0.0/8", "--ttl", "15"],
            &["allow", "del", "nope"],
        ] {
            let e = parse(args).expect_err("must be rejected");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn limits_reset_conflicts_with_values() {
        assert!(parse(&["limits", "set", "--reset", "--syn-rate", "3"]).is_err());
        let cli = parse(&["limits", "set", "--syn-rate", "3", "--global-syn-rate", "0"]).unwrap();
        let Command::Limits(LimitsCmd::Set(s)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(
            (s.syn_rate, s.syn_burst, s.global_syn_rate, s.reset),
            (Some(3), None, Some(0), false)
        );
    }

    #[test]
    fn global_config_flag_and_top_count() {
        let cli = parse(&["top", "-n", "5", "--config", "/tmp/x.toml"]).unwrap();
        assert_eq!(cli.config, PathBuf::from("/tmp/x.toml"));
        let Command::Top(t) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(t.n, 5);
    }
}
