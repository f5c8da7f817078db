//! Configuration: the TOML file (`raw`) validated into typed runtime values.
//!
//! Validation collects every problem with its TOML path before failing, so an
//! operator fixes a file in one pass. Runtime types never derive
//! `Deserialize`; defaults are the named constants below.

pub mod duration;
mod raw;

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gateway_common::cidr::Cidr;

/// Default config path used by every command.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gateway/gateway.toml";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the next piece of a request body (nginx's
/// `client_body_timeout`).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a client to take the next piece of its response
/// (nginx's `send_timeout`).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping gateway lets open requests and streams finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 256;
/// nginx's `keepalive_requests` default.
pub const DEFAULT_KEEPALIVE_REQUESTS: u32 = 1000;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gateway";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/gateway/admin.sock";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/gateway";
pub const DEFAULT_SYN_RATE: u64 = 20;
pub const DEFAULT_SYN_BURST: u64 = 40;
pub const DEFAULT_GLOBAL_SYN_RATE: u64 = 50_000;
pub const DEFAULT_IPV4_PREFIX: u8 = 32;
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_WEIGHT: u32 = 1;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(600);
/// 8 KiB: hyper then keeps each connection's read buffer at 8 KiB; any
/// larger limit lets it grow to 16 KiB per connection (measured with
/// heaptrack at 1,000 streams: 60 vs 66 MB).
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 8 * 1024;
pub const DEFAULT_MAX_HEADERS: u32 = 100;
pub const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.2;
pub const DEFAULT_RETRY_BUDGET_MIN_PER_SECOND: u32 = 5;
pub const DEFAULT_HEALTH_PATH: &str = "/health";
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
pub const DEFAULT_SLOW_START: Duration = Duration::from_secs(10);
pub const DEFAULT_QUEUE_SIZE: u32 = 64;
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub metrics: MetricsConfig,
    pub xdp: XdpConfig,
    pub abuse: AbuseConfig,
    pub keys: Vec<KeyConfig>,
    pub models: Vec<ModelConfig>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Default: `0.0.0.0:8443`.
    pub listen: Vec<SocketAddr>,
    /// Worker sockets; 0 = one per CPU. Default: 0.
    pub workers: u32,
    /// PEM certificate and key; `None` serves plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Default: 10 MiB.
    pub max_body_bytes: u64,
    /// Default: 10s.
    pub header_read_timeout: Duration,
    /// Longest wait between two reads of a request body (408 after it).
    /// Default: 30s.
    pub body_read_timeout: Duration,
    /// Longest wait for the client to take more of its response (HTTP/1.1:
    /// the connection closes after it; HTTP/2: the stream's upstream
    /// request is cancelled). Default: 60s.
    pub send_timeout: Duration,
    /// On SIGTERM, how long open requests and streams may finish before
    /// they are cut. Default: 30s.
    pub drain_timeout: Duration,
    /// Browser origins (`https://chat.example.com`, or `*`) allowed to
    /// call the API: preflights are answered and responses carry
    /// `Access-Control-Allow-Origin`. Default: none (no CORS).
    pub cors_origins: Vec<String>,
    /// Default: 256.
    pub max_connections_per_ip: u32,
    /// Client connections open at once, all clients together; 0 = no
    /// limit. `None` (the default): the open-file limit less what is kept
    /// for upstream connections, health checks, metrics and the admin
    /// socket ([`crate::listener::limit::auto_max_connections`]).
    pub max_connections: Option<u32>,
    /// Requests one client connection serves before the gateway closes it
    /// (HTTP/1.1: `Connection: close` on the last answer; HTTP/2: GOAWAY
    /// once that many streams were opened), so long-lived connections
    /// are spread over the workers again; 0 = no limit. Default: 1000.
    pub keepalive_requests: u32,
    /// Request line plus headers, in bytes (HTTP/1.1; the header list for
    /// HTTP/2). Larger requests get 431. Default: 8 KiB.
    pub max_header_bytes: u32,
    /// Header fields per request (HTTP/1.1 and HTTP/2). Default: 100.
    pub max_headers: u32,
    /// Persisted blocklist, allowlist, limits and bans. Default: /var/lib/gateway.
    pub state_dir: PathBuf,
    /// Default: /run/gateway/admin.sock.
    pub admin_socket: PathBuf,
}

#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Default: 127.0.0.1:9090.
    pub listen: SocketAddr,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode when the driver supports it, else generic (skb).
    Auto,
    Driver,
    Skb,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Auto => "auto",
            AttachMode::Driver => "driver",
            AttachMode::Skb => "skb",
        }
    }
}

#[derive(Clone, Debug)]
pub struct XdpConfig {
    /// Default: true when an [xdp] section exists.
    pub enabled: bool,
    pub interfaces: Vec<String>,
    /// Default: auto.
    pub mode: AttachMode,
    /// Default: the ports of `server.listen`.
    pub protected_ports: Vec<u16>,
    /// Whether `protected_ports` is that default (not set in the file).
    pub protected_ports_default: bool,
    /// Default: 20 new connections per second per source.
    pub syn_rate: u64,
    /// Default: 40.
    pub syn_burst: u64,
    /// Default: 50,000 per second from all sources.
    pub global_syn_rate: u64,
    /// Default: 32 (each IPv4 address has its own bucket).
    pub ipv4_prefix: u8,
    /// Default: 64.
    pub ipv6_prefix: u8,
    pub allow: Vec<Cidr>,
    pub block: Vec<Cidr>,
    pub block_files: Vec<PathBuf>,
    /// bpffs directory for pinned maps (the schema version is appended).
    /// Default: /sys/fs/bpf/gateway.
    pub pin_dir: PathBuf,
    /// Leave the program attached (its link pinned) when the daemon exits,
    /// so a restart or upgrade loses no protection; the next daemon swaps
    /// its own program in atomically. Default: false (detach on exit).
    pub keep_attached: bool,
}

#[derive(Clone, Debug, Default)]
pub struct AbuseConfig {
    pub auth_failures: Option<AbuseRule>,
    pub rate_limited: Option<AbuseRule>,
}

#[derive(Clone, Debug)]
pub struct AbuseRule {
    pub max: u32,
    pub window: Duration,
    pub ban: Duration,
}

#[derive(Clone, Debug)]
pub struct KeyConfig {
    pub name: String,
    pub sha256: [u8; 32],
    pub models: Vec<String>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub name: String,
    pub aliases: Vec<String>,
    pub upstream_model: Option<String>,
    pub timeouts: Timeouts,
    /// Default: 2.
    pub retries: u32,
    pub retry_budget: RetryBudget,
    /// Active health checks; `None`: backends are judged by traffic only.
    pub health_check: Option<HealthCheck>,
    pub outlier: Outlier,
    /// A backend coming back into rotation ramps its share up over this
    /// long. Default: 10s; 0 = full share at once.
    pub slow_start: Duration,
    pub queue: Queue,
    /// Default: weighted_least_connections.
    pub balance: Policy,
    /// What consistent_hash and the sticky group split hash. Default: key.
    pub hash_on: HashOn,
    /// Traffic groups with their weights (canary split); empty = one group.
    pub groups: Vec<GroupConfig>,
    /// A request header naming a group picks it explicitly (A/B).
    pub group_header: Option<http::HeaderName>,
    /// Models (names or aliases) tried in order when this one cannot take
    /// a request: no backend in rotation, all full, or every backend tried
    /// refused it before generating (connect error, 502, 503, 429).
    pub fallbacks: Vec<String>,
    pub backends: Vec<BackendConfig>,
}

/// How a model spreads requests over its backends (`balance = "..."`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    LeastConnections,
    RoundRobin,
    WeightedRoundRobin,
    Random,
    PowerOfTwo,
    ConsistentHash,
    Latency,
}

impl Policy {
    pub const ALL: [Policy; 7] = [
        Policy::LeastConnections,
        Policy::RoundRobin,
        Policy::WeightedRoundRobin,
        Policy::Random,
        Policy::PowerOfTwo,
        Policy::ConsistentHash,
        Policy::Latency,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::LeastConnections => "weighted_least_connections",
            Policy::RoundRobin => "round_robin",
            Policy::WeightedRoundRobin => "weighted_round_robin",
            Policy::Random => "random",
            Policy::PowerOfTwo => "power_of_two",
            Policy::ConsistentHash => "consistent_hash",
            Policy::Latency => "latency",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// The request attribute a hash is taken of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// The API key's name.
    Key,
    ClientIp,
    /// A request header's value (the key's name when it is absent).
    Header(http::HeaderName),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    pub weight: u32,
}

/// Retries may add at most `ratio` of the model's recent requests, plus
/// `min_per_second`, so a failing fleet is not hammered.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    /// Default: 0.2.
    pub ratio: f64,
    /// Default: 5.
    pub min_per_second: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// GET path on the backend, e.g. `/health` or `/v1/models`; any 2xx is healthy.
    pub path: String,
    /// Default: 5s.
    pub interval: Duration,
    /// Default: 2s.
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy backend back. Default: 2.
    pub healthy: u32,
    /// Consecutive failures that take a backend out. Default: 3.
    pub unhealthy: u32,
}

/// Passive outlier detection: a backend failing `consecutive_failures`
/// requests in a row (connect errors, 5xx, timeouts) is ejected for
/// `ejection`, doubled for each further ejection up to `max_ejection`, then
/// let back in by one probe request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// Default: 5; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// Default: 10s.
    pub ejection: Duration,
    /// Default: 5m.
    pub max_ejection: Duration,
}

/// Requests that find every backend at `max_connections` wait here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queue {
    /// Waiting requests per model; more get 503 at once. Default: 64; 0 = no queue.
    pub size: u32,
    /// How long a request may wait for a slot before 503. Default: 2s.
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Timeouts {
    /// Default: 2s.
    pub connect: Duration,
    /// Default: 60s.
    pub first_byte: Duration,
    /// Default: 30s.
    pub idle: Duration,
    /// Default: 10m.
    pub total: Duration,
}

#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub url: http::Uri,
    /// Default: 1.
    pub weight: u32,
    /// `None` = unlimited.
    pub max_connections: Option<u32>,
    /// The traffic group (`models.groups`); `None` when there are none.
    pub group: Option<String>,
    /// Sent to the backend as `Authorization: Bearer <api_key>` (vLLM's
    /// `--api-key`, a hosted endpoint); the client's own key never is.
    pub api_key: Option<ApiKey>,
    /// `https://` only: the CA certificates its certificate must chain to,
    /// instead of the system's roots (a private PKI).
    pub tls_ca: Option<TrustedCa>,
}

/// A PEM bundle of CA certificates, read when the config is loaded: a
/// reload that finds the file changed builds the backend's client anew.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedCa {
    pub path: PathBuf,
    pub certs: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

impl std::fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} certificates)",
            self.path.display(),
            self.certs.len()
        )
    }
}

/// Largest CA bundle read (the system's whole bundle is ~200 KiB).
const MAX_CA_FILE: u64 = 1 << 20;

impl TrustedCa {
    /// Reads the PEM certificates of `path`; the error says what is wrong.
    fn read(path: &Path) -> Result<TrustedCa, String> {
        use std::io::Read as _;
        let mut pem = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CA_FILE + 1).read_to_end(&mut pem))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if pem.len() as u64 > MAX_CA_FILE {
            return Err(format!("{} is larger than 1 MiB", path.display()));
        }
        let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs.iter().cloned());
        if added == 0 {
            return Err(format!("{} holds no usable CA certificate", path.display()));
        }
        Ok(TrustedCa {
            path: path.to_owned(),
            certs: Arc::new(certs),
        })
    }
}

/// A backend's key: compared, sent, never printed (`Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

/// One problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// TOML path, e.g. `models[1].backends[0].url`.
    pub path: String,
    pub message: String,
}

/// Every problem of a config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.path.is_empty() {
                write!(f, "\n  {}", p.message)?;
            } else {
                write!(f, "\n  {}: {}", p.path, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                path: String::new(),
                message,
            }],
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(format!("cannot read the config file: {e}")))?;
        Config::parse(&text).map_err(|problems| ConfigError {
            file: path.to_owned(),
            problems,
        })
    }

    /// The configuration an empty file gives.
    pub fn defaults() -> Config {
        Config::parse("").expect("the empty config is valid")
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        let (file, form) = raw::File::read(text);
        let mut v = Validator {
            // With a section unread, checks across sections would report
            // what is only missing.
            partial: !form.is_empty(),
            problems: form
                .into_iter()
                .map(|(path, message)| Problem { path, message })
                .collect(),
        };
        let config = v.file(file);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(v.problems)
        }
    }

    /// Directory holding the pinned maps of this schema version.
    pub fn pin_path(&self) -> PathBuf {
        self.xdp
            .pin_dir
            .join(format!("v{}", gateway_common::SCHEMA_VERSION))
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
    /// Some of the file could not be read (its problems are listed).
    partial: bool,
}

impl Validator {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, s: Option<&str>, default: Duration) -> Duration {
        match s.map(duration::parse) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.problem(path, e);
                default
            }
        }
    }

    /// `duration`, for a timeout: 0 is an error (it would fail everything).
    fn timeout(&mut self, path: &str, s: Option<&str>, default: Duration) -> Duration {
        let d = self.duration(path, s, default);
        if d.is_zero() {
            self.problem(path, "must be longer than 0");
            return default;
        }
        d
    }

    /// `v` or its default, reporting a value below `min`.
    fn at_least(&mut self, path: &str, v: Option<u32>, default: u32, min: u32) -> u32 {
        match v {
            Some(v) if v < min => {
                self.problem(path, format!("{v} is below the minimum {min}"));
                default
            }
            v => v.unwrap_or(default),
        }
    }

    fn cidrs(&mut self, path: &str, list: Option<Vec<String>>) -> Vec<Cidr> {
        let mut out = Vec::new();
        for (i, s) in list.unwrap_or_default().iter().enumerate() {
            match s.parse::<Cidr>() {
                Ok(c) => out.push(c),
                Err(e) => self.problem(format!("{path}[{i}]"), format!("{s:?}: {e}")),
            }
        }
        out
    }

    fn file(&mut self, f: raw::File) -> Config {
        let server = self.server(f.server.unwrap_or_default());
        let metrics = self.metrics(f.metrics.unwrap_or_default());
        let xdp_present = f.xdp.is_some();
        let xdp = self.xdp(f.xdp.unwrap_or_default(), xdp_present, &server);
        let abuse = AbuseConfig {
            auth_failures: f
                .abuse
                .as_ref()
                .and_then(|a| a.auth_failures.as_ref())
                .map(|r| self.abuse_rule("abuse.auth_failures", r)),
            rate_limited: f
                .abuse
                .as_ref()
                .and_then(|a| a.rate_limited.as_ref())
                .map(|r| self.abuse_rule("abuse.rate_limited", r)),
        };
        let keys: Vec<KeyConfig> = f.keys.into_iter().map(|(i, k)| self.key(i, k)).collect();
        let models: Vec<ModelConfig> = f
            .models
            .into_iter()
            .map(|(i, m)| self.model(i, m))
            .collect();
        // Checks across entries name entries by their place in the list,
        // which is only known while every entry could be read; with some
        // unread, they would also report what is only missing.
        if !self.partial {
            self.unique_model_names(&models);
            self.keys_are_distinct_and_name_models(&keys, &models);
            self.fallbacks_name_other_models(&models);
        }
        Config {
            server,
            metrics,
            xdp,
            abuse,
            keys,
            models,
        }
    }

    fn server(&mut self, s: raw::Server) -> ServerConfig {
        let mut listen = Vec::new();
        let raw_listen = s.listen.unwrap_or_else(|| vec![DEFAULT_LISTEN.to_owned()]);
        if raw_listen.is_empty() {
            self.problem(
                "server.listen",
                "list at least one address, e.g. [\"0.0.0.0:8443\"]",
            );
        }
        for (i, a) in raw_listen.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(a) => listen.push(a),
                Err(_) => self.problem(
                    format!("server.listen[{i}]"),
                    format!("{a:?} is not an IP:port address (e.g. \"0.0.0.0:8443\")"),
                ),
            }
        }
        let max_body_bytes = s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            self.problem("server.max_body_bytes", "must be greater than 0");
        }
        let workers = s.workers.unwrap_or(0);
        if workers > gateway_common::reuseport::MAX_WORKERS {
            self.problem(
                "server.workers",
                format!(
                    "{workers} is more than {} (0 = one per CPU)",
                    gateway_common::reuseport::MAX_WORKERS
                ),
            );
        }
        ServerConfig {
            listen,
            workers,
            tls: s.tls.map(|t| TlsConfig {
                cert: t.cert.into(),
                key: t.key.into(),
            }),
            max_body_bytes,
            header_read_timeout: self.timeout(
                "server.header_read_timeout",
                s.header_read_timeout.as_deref(),
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            body_read_timeout: self.timeout(
                "server.body_read_timeout",
                s.body_read_timeout.as_deref(),
                DEFAULT_BODY_READ_TIMEOUT,
            ),
            send_timeout: self.timeout(
                "server.send_timeout",
                s.send_timeout.as_deref(),
                DEFAULT_SEND_TIMEOUT,
            ),
            drain_timeout: self.timeout(
                "server.drain_timeout",
                s.drain_timeout.as_deref(),
                DEFAULT_DRAIN_TIMEOUT,
            ),
            cors_origins: self.cors_origins(s.cors_origins.unwrap_or_default()),
            max_connections_per_ip: s
                .max_connections_per_ip
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
            max_connections: s.max_connections,
            keepalive_requests: s.keepalive_requests.unwrap_or(DEFAULT_KEEPALIVE_REQUESTS),
            max_header_bytes: self.at_least(
                "server.max_header_bytes",
                s.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
                MIN_HEADER_BYTES,
            ),
            max_headers: self.at_least("server.max_headers", s.max_headers, DEFAULT_MAX_HEADERS, 1),
            state_dir: s
                .state_dir
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
                .into(),
            admin_socket: s
                .admin_socket
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into())
                .into(),
        }
    }

    /// `*`, or origins as browsers send them: a scheme, a host and maybe a
    /// port, with no path (`https://chat.example.com:8443`).
    fn cors_origins(&mut self, origins: Vec<String>) -> Vec<String> {
        for (i, o) in origins.iter().enumerate() {
            let path = format!("server.cors_origins[{i}]");
            if o == "*" {
                continue;
            }
            let rest = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"));
            let ok = rest.is_some_and(|r| {
                !r.is_empty()
                    && r.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            });
            if !ok {
                self.problem(
                    path,
                    format!("{o:?} is not an origin: `*` or scheme://host[:port], no path, as a browser sends it"),
                );
            }
        }
        origins
    }

    fn metrics(&mut self, m: raw::Metrics) -> MetricsConfig {
        let s = m.listen.unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
        let listen = s.parse().unwrap_or_else(|_| {
            self.problem("metrics.listen", format!("{s:?} is not an IP:port address"));
            DEFAULT_METRICS_LISTEN.parse().expect("valid default")
        });
        MetricsConfig { listen }
    }

    fn xdp(&mut self, x: raw::Xdp, present: bool, server: &ServerConfig) -> XdpConfig {
        let enabled = x.enabled.unwrap_or(present);
        let interfaces = x.interfaces.unwrap_or_default();
        if enabled && interfaces.is_empty() {
            self.problem(
                "xdp.interfaces",
                "list the interfaces to protect (e.g. [\"eth0\"]), or set xdp.enabled = false",
            );
        }
        for (i, name) in interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                self.problem(
                    format!("xdp.interfaces[{i}]"),
                    format!("{name:?} is not an interface name"),
                );
            }
        }
        let mode = match x.mode.as_deref().unwrap_or("auto") {
            "auto" => AttachMode::Auto,
            "driver" | "native" => AttachMode::Driver,
            "skb" | "generic" => AttachMode::Skb,
            other => {
                self.problem(
                    "xdp.mode",
                    format!("{other:?} is not one of auto, driver, skb"),
                );
                AttachMode::Auto
            }
        };
        let protected_ports_default = x.protected_ports.is_none();
        let protected_ports = match x.protected_ports {
            Some(p) => {
                if p.contains(&0) {
                    self.problem("xdp.protected_ports", "port 0 cannot be protected");
                }
                p
            }
            // The proxy's own ports; an ephemeral port (0) is unknown yet.
            None => server
                .listen
                .iter()
                .map(|a| a.port())
                .filter(|p| *p != 0)
                .collect(),
        };
        let syn_rate = x.syn_rate.unwrap_or(DEFAULT_SYN_RATE);
        let syn_burst = x.syn_burst.unwrap_or(DEFAULT_SYN_BURST);
        let global_syn_rate = x.global_syn_rate.unwrap_or(DEFAULT_GLOBAL_SYN_RATE);
        self.limits("xdp", syn_rate, syn_burst, global_syn_rate);
        let ipv4_prefix = x.ipv4_prefix.unwrap_or(DEFAULT_IPV4_PREFIX);
        if ipv4_prefix > 32 {
            self.problem(
                "xdp.ipv4_prefix",
                format!("{ipv4_prefix} is longer than 32"),
            );
        }
        let ipv6_prefix = x.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
        if ipv6_prefix > 128 {
            self.problem(
                "xdp.ipv6_prefix",
                format!("{ipv6_prefix} is longer than 128"),
            );
        }
        XdpConfig {
            enabled,
            interfaces,
            mode,
            protected_ports,
            protected_ports_default,
            syn_rate,
            syn_burst,
            global_syn_rate,
            ipv4_prefix,
            ipv6_prefix,
            allow: self.cidrs("xdp.allow", x.allow),
            block: self.cidrs("xdp.block", x.block),
            block_files: x
                .block_files
                .unwrap_or_default()
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            pin_dir: x.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into()).into(),
            keep_attached: x.keep_attached.unwrap_or(false),
        }
    }

    /// Shared by the config and `gateway limits set`.
    fn limits(&mut self, at: &str, rate: u64, burst: u64, global: u64) {
        for e in check_limits(rate, burst, global) {
            self.problem(format!("{at}.{}", e.path), e.message);
        }
    }

    fn abuse_rule(&mut self, path: &str, r: &raw::AbuseRule) -> AbuseRule {
        if r.max == 0 {
            self.problem(format!("{path}.max"), "must be at least 1");
        }
        AbuseRule {
            max: r.max,
            window: self.timeout(
                &format!("{path}.window"),
                Some(&r.window),
                Duration::from_secs(60),
            ),
            ban: self.timeout(
                &format!("{path}.ban"),
                Some(&r.ban),
                Duration::from_secs(900),
            ),
        }
    }

    fn key(&mut self, i: usize, k: raw::Key) -> KeyConfig {
        let at = format!("keys[{i}]");
        let name = k.name.unwrap_or_else(|| {
            self.problem(
                format!("{at}.name"),
                "missing (a label used in logs and metrics)",
            );
            String::new()
        });
        let sha256 = match k.sha256.as_deref().map(parse_sha256) {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.problem(format!("{at}.sha256"), e);
                [0; 32]
            }
            None => {
                self.problem(
                    format!("{at}.sha256"),
                    "missing (`gateway keys new` prints one)",
                );
                [0; 32]
            }
        };
        for (field, v) in [
            ("requests_per_minute", k.requests_per_minute),
            ("tokens_per_minute", k.tokens_per_minute),
            ("max_concurrent", k.max_concurrent.map(u64::from)),
        ] {
            if v == Some(0) {
                self.problem(
                    format!("{at}.{field}"),
                    "must be at least 1 (omit it for no limit)",
                );
            }
        }
        let models = match k.models {
            None => Vec::new(),
            Some(m) if m.is_empty() => {
                self.problem(
                    format!("{at}.models"),
                    "an empty list would allow no model (omit it to allow every model)",
                );
                Vec::new()
            }
            Some(m) => m,
        };
        KeyConfig {
            name,
            sha256,
            models,
            requests_per_minute: k.requests_per_minute,
            tokens_per_minute: k.tokens_per_minute,
            max_concurrent: k.max_concurrent,
        }
    }

    fn model(&mut self, i: usize, m: raw::Model) -> ModelConfig {
        let at = format!("models[{i}]");
        let name = m.name.unwrap_or_else(|| {
            self.problem(format!("{at}.name"), "missing");
            String::new()
        });
        let t = m.timeouts.unwrap_or_default();
        let timeouts = Timeouts {
            connect: self.timeout(
                &format!("{at}.timeouts.connect"),
                t.connect.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            first_byte: self.timeout(
                &format!("{at}.timeouts.first_byte"),
                t.first_byte.as_deref(),
                DEFAULT_FIRST_BYTE_TIMEOUT,
            ),
            idle: self.timeout(
                &format!("{at}.timeouts.idle"),
                t.idle.as_deref(),
                DEFAULT_IDLE_TIMEOUT,
            ),
            total: self.timeout(
                &format!("{at}.timeouts.total"),
                t.total.as_deref(),
                DEFAULT_TOTAL_TIMEOUT,
            ),
        };
        if m.backends.is_empty() {
            self.problem(
                format!("{at}.backends"),
                "a model needs at least one backend",
            );
        }
        let mut backends: Vec<BackendConfig> = Vec::new();
        for (j, b) in m.backends.into_iter().enumerate() {
            let Some(b) = self.backend(&format!("{at}.backends[{j}]"), b) else {
                continue;
            };
            // One server listed twice would be two backends with two caps
            // and one metric label, and a retry "elsewhere" could land on
            // it again: give it more weight instead.
            let label = b.url.to_string();
            if backends
                .iter()
                .any(|o| o.url.to_string().trim_end_matches('/') == label.trim_end_matches('/'))
            {
                self.problem(
                    format!("{at}.backends[{j}].url"),
                    format!("{label:?} is listed twice in this model (raise its weight instead)"),
                );
                continue;
            }
            backends.push(b);
        }
        let rb = m.retry_budget.unwrap_or_default();
        let ratio = rb.ratio.unwrap_or(DEFAULT_RETRY_BUDGET_RATIO);
        if !(0.0..=1.0).contains(&ratio) {
            self.problem(
                format!("{at}.retry_budget.ratio"),
                format!("{ratio} is not between 0 and 1"),
            );
        }
        let health_check = m.health_check.map(|h| self.health_check(&at, h));
        let o = m.outlier.unwrap_or_default();
        let outlier = Outlier {
            consecutive_failures: o
                .consecutive_failures
                .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
            ejection: self.duration(
                &format!("{at}.outlier.ejection"),
                o.ejection.as_deref(),
                DEFAULT_EJECTION,
            ),
            max_ejection: self.duration(
                &format!("{at}.outlier.max_ejection"),
                o.max_ejection.as_deref(),
                DEFAULT_MAX_EJECTION,
            ),
        };
        if outlier.consecutive_failures > 0 && outlier.ejection.is_zero() {
            self.problem(
                format!("{at}.outlier.ejection"),
                "must be longer than 0 (set consecutive_failures = 0 to turn ejection off)",
            );
        }
        if outlier.max_ejection < outlier.ejection {
            self.problem(
                format!("{at}.outlier.max_ejection"),
                "must not be shorter than outlier.ejection",
            );
        }
        let q = m.queue.unwrap_or_default();
        let queue = Queue {
            size: q.size.unwrap_or(DEFAULT_QUEUE_SIZE),
            timeout: self.duration(
                &format!("{at}.queue.timeout"),
                q.timeout.as_deref(),
                DEFAULT_QUEUE_TIMEOUT,
            ),
        };
        let balance = match m.balance.as_deref() {
            None => Policy::LeastConnections,
            Some(s) => Policy::parse(s).unwrap_or_else(|| {
                let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
                self.problem(
                    format!("{at}.balance"),
                    format!("{s:?} is not one of {}", names.join(", ")),
                );
                Policy::LeastConnections
            }),
        };
        let hash_on = match m.hash_on.as_deref() {
            None | Some("key") => HashOn::Key,
            Some("client_ip") => HashOn::ClientIp,
            Some(s) => match s
                .strip_prefix("header:")
                .map(|h| http::HeaderName::from_bytes(h.trim().as_bytes()))
            {
                Some(Ok(h)) => HashOn::Header(h),
                _ => {
                    self.problem(
                        format!("{at}.hash_on"),
                        format!(
                            "{s:?} is not one of key, client_ip, header:<name> (e.g. \"header:x-session-id\")"
                        ),
                    );
                    HashOn::Key
                }
            },
        };
        let groups = self.groups(&at, m.groups, &backends);
        let group_header = m.group_header.and_then(|h| {
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| {
                    self.problem(
                        format!("{at}.group_header"),
                        format!("{h:?} is not a header name"),
                    )
                })
                .ok()
        });
        if group_header.is_some() && groups.is_empty() {
            self.problem(
                format!("{at}.group_header"),
                "needs `groups` (and a `group` on each backend)",
            );
        }
        ModelConfig {
            name,
            aliases: m.aliases,
            upstream_model: m.upstream_model,
            timeouts,
            retries: m.retries.unwrap_or(DEFAULT_RETRIES),
            balance,
            hash_on,
            groups,
            group_header,
            retry_budget: RetryBudget {
                ratio,
                min_per_second: rb
                    .min_per_second
                    .unwrap_or(DEFAULT_RETRY_BUDGET_MIN_PER_SECOND),
            },
            health_check,
            outlier,
            slow_start: self.duration(
                &format!("{at}.slow_start"),
                m.slow_start.as_deref(),
                DEFAULT_SLOW_START,
            ),
            queue,
            fallbacks: m.fallbacks,
            backends,
        }
    }

    /// `groups = { v1 = 90, v2 = 10 }`: every backend names one of them,
    /// every group has a backend.
    fn groups(
        &mut self,
        at: &str,
        raw: Option<std::collections::BTreeMap<String, u32>>,
        backends: &[BackendConfig],
    ) -> Vec<GroupConfig> {
        let Some(raw) = raw else {
            if backends.iter().any(|b| b.group.is_some()) {
                self.problem(
                    format!("{at}.groups"),
                    "backends name groups, but the model lists none (e.g. groups = { stable = 90, canary = 10 })",
                );
            }
            return Vec::new();
        };
        if raw.is_empty() {
            self.problem(
                format!("{at}.groups"),
                "list at least one group, or omit it",
            );
        }
        let groups: Vec<GroupConfig> = raw
            .into_iter()
            .map(|(name, weight)| GroupConfig { name, weight })
            .collect();
        if !groups.is_empty() && groups.iter().all(|g| g.weight == 0) {
            self.problem(
                format!("{at}.groups"),
                "at least one group needs a weight above 0",
            );
        }
        for (j, b) in backends.iter().enumerate() {
            match &b.group {
                None => self.problem(
                    format!("{at}.backends[{j}].group"),
                    "missing: the model has groups, so each backend names one",
                ),
                Some(g) if !groups.iter().any(|x| &x.name == g) => self.problem(
                    format!("{at}.backends[{j}].group"),
                    format!("{g:?} is not in the model's groups"),
                ),
                Some(_) => {}
            }
        }
        for g in &groups {
            if !backends.iter().any(|b| b.group.as_deref() == Some(&g.name)) {
                self.problem(
                    format!("{at}.groups.{}", g.name),
                    "no backend is in this group",
                );
            }
        }
        groups
    }

    fn health_check(&mut self, at: &str, h: raw::HealthCheck) -> HealthCheck {
        let at = format!("{at}.health_check");
        let path = h.path.unwrap_or_else(|| DEFAULT_HEALTH_PATH.into());
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            self.problem(
                format!("{at}.path"),
                format!("{path:?} is not a request path (e.g. \"/health\")"),
            );
        }
        let interval = self.duration(
            &format!("{at}.interval"),
            h.interval.as_deref(),
            DEFAULT_HEALTH_INTERVAL,
        );
        if interval < Duration::from_millis(10) {
            self.problem(format!("{at}.interval"), "must be at least 10ms");
        }
        let healthy = self.at_least(
            &format!("{at}.healthy"),
            h.healthy,
            DEFAULT_HEALTHY_THRESHOLD,
            1,
        );
        let unhealthy = self.at_least(
            &format!("{at}.unhealthy"),
            h.unhealthy,
            DEFAULT_UNHEALTHY_THRESHOLD,
            1,
        );
        HealthCheck {
            path,
            interval,
            timeout: self.timeout(
                &format!("{at}.timeout"),
                h.timeout.as_deref(),
                DEFAULT_HEALTH_TIMEOUT,
            ),
            healthy,
            unhealthy,
        }
    }

    fn backend(&mut self, at: &str, b: raw::Backend) -> Option<BackendConfig> {
        let weight = b.weight.unwrap_or(DEFAULT_WEIGHT);
        if weight == 0 {
            self.problem(
                format!("{at}.weight"),
                "must be at least 1 (drain a backend instead)",
            );
        }
        if b.max_connections == Some(0) {
            self.problem(
                format!("{at}.max_connections"),
                "must be at least 1 (omit for no cap)",
            );
        }
        let Some(url) = b.url else {
            self.problem(format!("{at}.url"), "missing");
            return None;
        };
        let uri = match url.parse::<http::Uri>() {
            Ok(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => {
                // Credentials in the URL would show in metric labels, logs
                // and `backends list`, and are not sent as credentials.
                self.problem(
                    format!("{at}.url"),
                    "must not carry a user or password (user@host)",
                );
                return None;
            }
            Ok(u)
                if matches!(u.scheme_str(), Some("http") | Some("https") | Some("h2c"))
                    && u.host().is_some_and(|h| !h.is_empty())
                    && u.query().is_none() =>
            {
                u
            }
            _ => {
                // A URL with an `@` may carry a password: not echoed.
                let shown = if url.contains('@') {
                    "the URL".to_owned()
                } else {
                    format!("{url:?}")
                };
                self.problem(
                    format!("{at}.url"),
                    format!("{shown} is not an http(s) URL (or h2c:// for HTTP/2 without TLS)"),
                );
                return None;
            }
        };
        if let Some(k) = &b.api_key {
            let printable = k.bytes().all(|c| c.is_ascii_graphic());
            if k.is_empty() || !printable {
                // The key itself is never printed.
                self.problem(
                    format!("{at}.api_key"),
                    "must be a non-empty token of printable ASCII without spaces",
                );
            }
        }
        let tls_ca = match b.tls_ca {
            None => None,
            Some(_) if uri.scheme_str() != Some("https") => {
                self.problem(
                    format!("{at}.tls_ca"),
                    "is for https:// backends (this one is not TLS)",
                );
                None
            }
            Some(path) => match TrustedCa::read(Path::new(&path)) {
                Ok(ca) => Some(ca),
                Err(e) => {
                    self.problem(format!("{at}.tls_ca"), e);
                    None
                }
            },
        };
        Some(BackendConfig {
            url: uri,
            weight,
            max_connections: b.max_connections,
            group: b.group,
            api_key: b.api_key.map(ApiKey),
            tls_ca,
        })
    }

    /// Two keys with one name would share a metric label and their limits'
    /// state across reloads; two with one digest, one of them never
    /// matches. A `models` entry without `*` must name a model or alias: a
    /// typo there would refuse the key's requests with 403.
    fn keys_are_distinct_and_name_models(&mut self, keys: &[KeyConfig], models: &[ModelConfig]) {
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        for (i, k) in keys.iter().enumerate() {
            if !k.name.is_empty() && !names.insert(k.name.as_str()) {
                self.problem(
                    format!("keys[{i}].name"),
                    format!("{:?} is the name of an earlier key", k.name),
                );
            }
            if k.sha256 != [0; 32] && !digests.insert(k.sha256) {
                self.problem(
                    format!("keys[{i}].sha256"),
                    "the same digest as an earlier key (each key needs its own)",
                );
            }
            for (j, g) in k.models.iter().enumerate() {
                let known = g.contains('*')
                    || models
                        .iter()
                        .any(|m| m.name == *g || m.aliases.iter().any(|a| a == g));
                if !known && !models.is_empty() {
                    self.problem(
                        format!("keys[{i}].models[{j}]"),
                        format!("{g:?} is not a model name or alias (use `*` for a pattern)"),
                    );
                }
            }
        }
    }

    /// Each fallback is another model's name or alias, listed once.
    fn fallbacks_name_other_models(&mut self, models: &[ModelConfig]) {
        let owner = |n: &str| {
            models
                .iter()
                .position(|m| m.name == n || m.aliases.iter().any(|a| a == n))
        };
        for (i, m) in models.iter().enumerate() {
            let mut seen = HashSet::new();
            for (j, f) in m.fallbacks.iter().enumerate() {
                let at = format!("models[{i}].fallbacks[{j}]");
                match owner(f) {
                    None => self.problem(at, format!("{f:?} is not a model name or alias")),
                    Some(k) if k == i => self.problem(at, "is this model itself"),
                    Some(k) if !seen.insert(k) => {
                        self.problem(at, format!("{f:?} is a model listed earlier"))
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn unique_model_names(&mut self, models: &[ModelConfig]) {
        let mut seen = HashSet::new();
        for (i, m) in models.iter().enumerate() {
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if !n.is_empty() && !seen.insert(n.clone()) {
                    self.problem(
                        format!("models[{i}]"),
                        format!("model name or alias {n:?} is used twice"),
                    );
                }
            }
        }
    }
}

/// hyper's smallest HTTP/1.1 read buffer.
const MIN_HEADER_BYTES: u32 = 8192;

/// Checks SYN limits; shared by config validation and `gateway limits set`.
/// Paths in the returned problems are the bare key names.
pub fn check_limits(rate: u64, burst: u64, global: u64) -> Vec<Problem> {
    let max = gateway_common::bucket::MAX_RATE;
    let mut out = Vec::new();
    for (key, v) in [
        ("syn_rate", rate),
        ("syn_burst", burst),
        ("global_syn_rate", global),
    ] {
        if v > max {
            out.push(Problem {
                path: key.into(),
                message: format!("{v} is above the maximum {max}"),
            });
        }
    }
    if rate > 0 && burst == 0 {
        out.push(Problem {
            path: "syn_burst".into(),
            message: "must be at least 1 when syn_rate is set (0 would refuse every SYN)".into(),
        });
    }
    out
}

impl Config {
    /// For a reload: the settings only a restart applies (sockets, files,
    /// the XDP attachment) are set back to those of `running`, so the
    /// daemon keeps working with what it started with, and their names
    /// are returned where they changed. `protected_ports`, when left to
    /// default to the listen ports, follows the listen ports kept.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! keep {
            ($name:literal, $($field:ident).+) => {
                if self.$($field).+ != running.$($field).+ {
                    changed.push($name);
                    self.$($field).+ = running.$($field).+.clone();
                }
            };
        }
        keep!("server.listen", server.listen);
        keep!("server.workers", server.workers);
        // A new certificate (or new paths) is reloaded; turning TLS on or
        // off changes what the listeners are.
        if self.server.tls.is_some() != running.server.tls.is_some() {
            changed.push("server.tls");
            self.server.tls = running.server.tls.clone();
        }
        keep!("server.state_dir", server.state_dir);
        keep!("server.admin_socket", server.admin_socket);
        keep!("metrics.listen", metrics.listen);
        keep!("xdp.enabled", xdp.enabled);
        keep!("xdp.interfaces", xdp.interfaces);
        keep!("xdp.mode", xdp.mode);
        keep!("xdp.pin_dir", xdp.pin_dir);
        keep!("xdp.keep_attached", xdp.keep_attached);
        if self.xdp.protected_ports_default {
            self.xdp.protected_ports = self
                .server
                .listen
                .iter()
                .map(|a| a.port())
                .filter(|p| *p != 0)
                .collect();
        }
        changed
    }
}

fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 64 hex digits: the SHA-256 of the key, never the key itself".into());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
