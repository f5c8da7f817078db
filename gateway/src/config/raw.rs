//! The config file as written: serde structs mirroring the TOML, every field
//! optional so validation (in `mod.rs`) can name each missing or bad value
//! with its path. Unknown keys are rejected here.

use serde::{de::DeserializeOwned, Deserialize};

/// The file's sections, as far as they could be read (see [`File::read`]).
#[derive(Debug, Default)]
pub struct File {
    pub server: Option<Server>,
    pub metrics: Option<Metrics>,
    pub xdp: Option<Xdp>,
    pub abuse: Option<Abuse>,
    /// Each entry with its index in the file: an entry that could not be
    /// read leaves a gap, and the paths of the others stay right.
    pub keys: Vec<(usize, Key)>,
    pub models: Vec<(usize, Model)>,
}

/// A problem with the file's form: its TOML path (empty for a syntax
/// error) and what is wrong, with the line it is on.
pub type FormProblem = (String, String);

impl File {
    /// Reads `text` section by section (each `[[keys]]` and `[[models]]`
    /// entry on its own), so that one unknown key or wrong type does not
    /// hide the problems after it. Each problem names its TOML path and
    /// line. Only a syntax error stops the reading at once.
    pub fn read(text: &str) -> (File, Vec<FormProblem>) {
        let mut problems = Vec::new();
        let mut file = File::default();
        let doc = match toml_edit::ImDocument::parse(text) {
            Ok(d) => d,
            Err(e) => {
                let at = e.span().map(|s| line_of(text, s.start));
                problems.push((String::new(), with_line(e.message(), at)));
                return (file, problems);
            }
        };
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                let at = e.span().map(|s| line_of(text, s.start));
                problems.push((String::new(), with_line(e.message(), at)));
                return (file, problems);
            }
        };
        let mut cx = Reader {
            text,
            doc: &doc,
            problems: &mut problems,
        };
        for (name, value) in table {
            match name.as_str() {
                "server" => file.server = cx.section(value, &[key("server")]),
                "metrics" => file.metrics = cx.section(value, &[key("metrics")]),
                "xdp" => file.xdp = cx.section(value, &[key("xdp")]),
                "abuse" => file.abuse = cx.section(value, &[key("abuse")]),
                "keys" => file.keys = cx.entries(value, "keys"),
                "models" => file.models = cx.entries(value, "models"),
                other => cx.problem(
                    &[key(other)],
                    "unknown section (expected server, metrics, xdp, abuse, keys or models)".into(),
                ),
            }
        }
        (file, problems)
    }
}

/// One step of a TOML path.
#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_owned())
}

/// `models[1].backends[0].url`, as validation names paths too.
fn display(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The message on one line, after the line it is about.
fn with_line(message: &str, line: Option<usize>) -> String {
    let message = message.trim_end().replace('\n', "; ");
    match line {
        Some(l) => format!("line {l}: {message}"),
        None => message,
    }
}

struct Reader<'a> {
    text: &'a str,
    doc: &'a toml_edit::ImDocument<&'a str>,
    problems: &'a mut Vec<FormProblem>,
}

impl Reader<'_> {
    /// One table, or `None` with its problem recorded.
    fn section<T: DeserializeOwned>(&mut self, v: toml::Value, at: &[Seg]) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                let mut path = at.to_vec();
                for seg in e.path().iter() {
                    match seg {
                        serde_path_to_error::Segment::Map { key } => {
                            path.push(Seg::Key(key.clone()))
                        }
                        serde_path_to_error::Segment::Seq { index } => {
                            path.push(Seg::Index(*index))
                        }
                        _ => {}
                    }
                }
                let message = e.into_inner().message().to_owned();
                self.problem(&path, message);
                None
            }
        }
    }

    /// An array of tables (`[[keys]]`, `[[models]]`), entry by entry.
    fn entries<T: DeserializeOwned>(&mut self, v: toml::Value, name: &str) -> Vec<(usize, T)> {
        let toml::Value::Array(items) = v else {
            self.problem(
                &[key(name)],
                format!("must be a list of tables ([[{name}]])"),
            );
            return Vec::new();
        };
        items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| Some((i, self.section(item, &[key(name), Seg::Index(i)])?)))
            .collect()
    }

    fn problem(&mut self, path: &[Seg], message: String) {
        let line = self.start_of(path).map(|start| line_of(self.text, start));
        self.problems
            .push((display(path), with_line(&message, line)));
    }

    /// Where the item at `path`, or else the nearest enclosing one, starts.
    fn start_of(&self, path: &[Seg]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|depth| {
            let mut item = self.doc.as_item();
            for seg in &path[..depth] {
                item = match seg {
                    Seg::Key(k) => item.get(k.as_str())?,
                    Seg::Index(i) => item.get(*i)?,
                };
            }
            item.span().map(|s| s.start)
        })
    }
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
    pub drain_timeout: Option<String>,
    pub cors_origins: Option<Vec<String>>,
    pub max_connections_per_ip: Option<u32>,
    pub max_connections: Option<u32>,
    pub keepalive_requests: Option<u32>,
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
    pub fallbacks: Vec<String>,
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
    pub api_key: Option<String>,
    pub tls_ca: Option<String>,
}
