//! The config file as written: serde structs mirroring the TOML, every field
//! optional so validation (in `mod.rs`) can name each missing or bad value
//! with its path. Unknown keys are rejected here.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub server: Option<Server>,
    pub metrics: Option<Metrics>,
    pub xdp: Option<Xdp>,
    pub abuse: Option<Abuse>,
    #[serde(default)]
    pub keys: Vec<Key>,
    #[serde(default)]
    pub models: Vec<Model>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: Option<Vec<String>>,
    pub workers: Option<u32>,
    pub tls: Option<Tls>,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub send_timeout: Option<String>,
    pub max_connections_per_ip: Option<u32>,
    pub max_header_bytes: Option<u32>,
    pub max_headers: Option<u32>,
    pub state_dir: Option<String>,
    pub admin_socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xdp {
    pub enabled: Option<bool>,
    pub interfaces: Option<Vec<String>>,
    pub mode: Option<String>,
    pub protected_ports: Option<Vec<u16>>,
    pub syn_rate: Option<u64>,
    pub syn_burst: Option<u64>,
    pub global_syn_rate: Option<u64>,
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    pub allow: Option<Vec<String>>,
    pub block: Option<Vec<String>>,
    pub block_files: Option<Vec<String>>,
    pub pin_dir: Option<String>,
    pub keep_attached: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abuse {
    pub auth_failures: Option<AbuseRule>,
    pub rate_limited: Option<AbuseRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbuseRule {
    pub max: u32,
    pub window: String,
    pub ban: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    pub name: Option<String>,
    pub sha256: Option<String>,
    /// `None` (omitted) allows every model; an empty list is an error.
    pub models: Option<Vec<String>>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub name: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub upstream_model: Option<String>,
    pub timeouts: Option<Timeouts>,
    pub retries: Option<u32>,
    pub retry_budget: Option<RetryBudget>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    pub slow_start: Option<String>,
    pub queue: Option<Queue>,
    pub balance: Option<String>,
    pub hash_on: Option<String>,
    pub groups: Option<std::collections::BTreeMap<String, u32>>,
    pub group_header: Option<String>,
    #[serde(default)]
    pub backends: Vec<Backend>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    pub ratio: Option<f64>,
    pub min_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy: Option<u32>,
    pub unhealthy: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    pub consecutive_failures: Option<u32>,
    pub ejection: Option<String>,
    pub max_ejection: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    pub size: Option<u32>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub connect: Option<String>,
    pub first_byte: Option<String>,
    pub idle: Option<String>,
    pub total: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub url: Option<String>,
    pub weight: Option<u32>,
    pub max_connections: Option<u32>,
    pub group: Option<String>,
}
