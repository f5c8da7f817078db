//! The routing table a request is served with: keys, models and their
//! backends, compiled from the config. Requests read it lock-free through an
//! `ArcSwap`; a reload builds a new one and swaps it in, and requests keep
//! the snapshot they started with.

use std::{collections::HashMap, sync::Arc, time::Duration};

use super::{
    balance::Balancer,
    limits::{KeyState, Limits},
    retry,
};
use crate::{
    config::{Config, HashOn, HealthCheck, KeyConfig, ModelConfig, Policy, Queue, Timeouts},
    upstream::{Backend, Slots},
};

/// An API key as the gateway knows it: a name and the digest of the key.
pub struct Key {
    pub name: Arc<str>,
    pub digest: [u8; 32],
    /// Model globs this key may use; empty = every model.
    globs: Vec<String>,
    pub limits: Limits,
    /// Rate buckets and in-flight count; carried over reloads by name.
    pub state: Arc<KeyState>,
}

impl Key {
    fn new(k: &KeyConfig, old: Option<&Key>) -> Key {
        let limits = Limits {
            requests_per_minute: k.requests_per_minute,
            tokens_per_minute: k.tokens_per_minute,
            max_concurrent: k.max_concurrent,
        };
        Key {
            name: k.name.as_str().into(),
            digest: k.sha256,
            globs: k.models.clone(),
            limits,
            state: old.map_or_else(|| KeyState::new(&limits), |o| Arc::clone(&o.state)),
        }
    }

    /// A key without limits that may use every model.
    #[cfg(test)]
    pub fn for_test(name: &str, digest: [u8; 32]) -> Key {
        Key {
            name: name.into(),
            digest,
            globs: Vec::new(),
            limits: Limits::default(),
            state: KeyState::new(&Limits::default()),
        }
    }

    /// Whether the key may use `model` (matched by canonical name or alias).
    pub fn allows(&self, model: &Model, asked: &str) -> bool {
        self.globs.is_empty()
            || self
                .globs
                .iter()
                .any(|g| glob(g, &model.name) || glob(g, asked))
    }
}

/// A model and the pool that serves it.
pub struct Model {
    pub name: Arc<str>,
    /// Other names clients may ask for, in config order.
    pub aliases: Vec<String>,
    pub upstream_model: Option<String>,
    pub timeouts: Timeouts,
    pub retries: u32,
    pub retry_budget: retry::Budget,
    pub health_check: Option<HealthCheck>,
    pub queue: Queue,
    /// Every backend, in config order.
    pub backends: Vec<Arc<Backend>>,
    /// The traffic groups; one unnamed group when none are configured.
    pub groups: Vec<Group>,
    pub hash_on: HashOn,
    pub group_header: Option<http::HeaderName>,
    /// Models (names or aliases) tried in order when this one cannot
    /// take a request.
    pub fallbacks: Vec<String>,
}

/// Backends that share a version or an experiment, with their share of
/// the model's traffic, balanced among themselves.
pub struct Group {
    /// Empty for the implicit single group.
    pub name: Arc<str>,
    pub weight: u32,
    pub backends: Vec<Arc<Backend>>,
    pub balancer: Balancer,
}

impl Model {
    fn new(m: &ModelConfig, workers: usize, old: Option<&Model>) -> Model {
        // The admission queue belongs to the model name: requests waiting
        // across a reload are woken by the new table's backends too.
        let slots = old
            .and_then(|o| o.backends.first())
            .map_or_else(|| Arc::new(Slots::default()), |b| Arc::clone(b.slots()));
        let backends: Vec<Arc<Backend>> = m
            .backends
            .iter()
            .map(|b| {
                let kept = old.and_then(|o| {
                    o.backends
                        .iter()
                        .find(|x| x.same_spec(b, m.timeouts.connect))
                });
                kept.cloned().unwrap_or_else(|| {
                    Arc::new(Backend::new(
                        b,
                        m.timeouts.connect,
                        workers,
                        Arc::clone(&slots),
                    ))
                })
            })
            .collect();
        for (b, c) in backends.iter().zip(&m.backends) {
            b.set_weight(c.weight);
            b.set_max_connections(c.max_connections);
            let was_up = b.health.is_up();
            b.health.configure(&m.outlier, m.slow_start);
            if m.health_check.is_none() {
                b.health.clear_active(&b.label);
            }
            if was_up != b.health.is_up() {
                // Back in rotation (ejection or checks turned off): requests
                // waiting for a slot look again.
                b.slots().wake_all();
            }
        }
        let groups = if m.groups.is_empty() {
            vec![Group {
                name: "".into(),
                weight: 1,
                balancer: Balancer::new(m.balance, &backends),
                backends: backends.clone(),
            }]
        } else {
            m.groups
                .iter()
                .map(|g| {
                    let members: Vec<Arc<Backend>> = backends
                        .iter()
                        .zip(&m.backends)
                        .filter(|(_, c)| c.group.as_deref() == Some(g.name.as_str()))
                        .map(|(b, _)| Arc::clone(b))
                        .collect();
                    Group {
                        name: g.name.as_str().into(),
                        weight: g.weight,
                        balancer: Balancer::new(m.balance, &members),
                        backends: members,
                    }
                })
                .collect()
        };
        slots.set_grouped(groups.len() > 1);
        Model {
            name: m.name.as_str().into(),
            aliases: m.aliases.clone(),
            upstream_model: m.upstream_model.clone(),
            timeouts: m.timeouts.clone(),
            retries: m.retries,
            retry_budget: retry::Budget::new(&m.retry_budget),
            health_check: m.health_check.clone(),
            queue: m.queue.clone(),
            backends,
            groups,
            hash_on: m.hash_on.clone(),
            group_header: m.group_header.clone(),
            fallbacks: m.fallbacks.clone(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.groups[0].balancer.policy()
    }

    /// Whether picking needs the request's attribute hash.
    pub fn needs_hash(&self) -> bool {
        self.groups.len() > 1 || self.policy() == Policy::ConsistentHash
    }

    /// The group a request goes to: the one its `group_header` names, if
    /// any (`explicit`), else a weighted choice that is sticky per request
    /// attribute (`hash`), so a user stays on one version.
    pub fn choose_group(&self, headers: &http::HeaderMap, hash: u64) -> (usize, bool) {
        if self.groups.len() == 1 {
            return (0, false);
        }
        if let Some(v) = self
            .group_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
        {
            if let Some(i) = self.groups.iter().position(|g| &*g.name == v) {
                return (i, true);
            }
        }
        let total: u64 = self.groups.iter().map(|g| g.weight as u64).sum();
        // A hash of its own, so the split does not mirror the ring.
        let mut point = super::balance::hash_parts(&[&hash.to_le_bytes(), b"split"]) % total.max(1);
        for (i, g) in self.groups.iter().enumerate() {
            if point < g.weight as u64 {
                return (i, false);
            }
            point -= g.weight as u64;
        }
        (self.groups.len() - 1, false)
    }
}

/// Everything a request needs from the config.
pub struct Routes {
    pub keys: Vec<Key>,
    /// Models by name and by alias.
    by_name: HashMap<String, Arc<Model>>,
    /// Models in config order (for /v1/models).
    pub models: Vec<Arc<Model>>,
    pub max_body_bytes: u64,
    /// `server.body_read_timeout`.
    pub body_read_timeout: Duration,
    /// `server.cors_origins`.
    pub cors: Cors,
}

/// The browser origins allowed to call the API (`server.cors_origins`).
#[derive(Debug, Default)]
pub struct Cors {
    any: bool,
    origins: Vec<http::HeaderValue>,
}

impl Cors {
    pub fn new(origins: &[String]) -> Cors {
        Cors {
            any: origins.iter().any(|o| o == "*"),
            origins: origins
                .iter()
                .filter_map(|o| http::HeaderValue::from_str(o).ok())
                .collect(),
        }
    }

    /// The `Access-Control-Allow-Origin` for a request from `origin`, if
    /// it is allowed.
    pub fn allow(&self, origin: &http::HeaderValue) -> Option<http::HeaderValue> {
        if self.any {
            Some(http::HeaderValue::from_static("*"))
        } else {
            self.origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
                .then(|| origin.clone())
        }
    }

    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }
}

impl Routes {
    pub fn new(cfg: &Config) -> Routes {
        Self::reload(cfg, None)
    }

    /// Builds the table for `cfg`, keeping the backends of `old` whose URL
    /// and settings did not change (with their in-flight counts, pools and
    /// drain state), so a reload neither resets balancing nor drops
    /// keep-alive connections.
    pub fn reload(cfg: &Config, old: Option<&Routes>) -> Routes {
        let workers = crate::listener::workers::count(cfg.server.workers);
        let models: Vec<Arc<Model>> = cfg
            .models
            .iter()
            .map(|m| {
                let prev = old.and_then(|o| o.models.iter().find(|x| *x.name == *m.name));
                Arc::new(Model::new(m, workers, prev.map(|p| p.as_ref())))
            })
            .collect();
        let mut by_name = HashMap::new();
        for (m, c) in models.iter().zip(&cfg.models) {
            for n in std::iter::once(&c.name).chain(&c.aliases) {
                by_name.insert(n.clone(), Arc::clone(m));
            }
        }
        Routes {
            keys: cfg
                .keys
                .iter()
                .map(|k| {
                    let prev = old.and_then(|o| o.keys.iter().find(|x| *x.name == *k.name));
                    Key::new(k, prev)
                })
                .collect(),
            by_name,
            models,
            max_body_bytes: cfg.server.max_body_bytes,
            body_read_timeout: cfg.server.body_read_timeout,
            cors: Cors::new(&cfg.server.cors_origins),
        }
    }

    pub fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.by_name.get(name)
    }

    /// Names (canonical and aliases) a key may use, in config order.
    pub fn visible_models(&self, key: &Key) -> Vec<&str> {
        let mut out = Vec::new();
        for m in &self.models {
            for n in std::iter::once(&*m.name).chain(m.aliases.iter().map(String::as_str)) {
                if key.allows(m, n) && !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }
}

/// `*` matches any run of characters; everything else is literal.
pub fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Default for the `Retry-After` of an overloaded model.
pub const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::{glob, Routes};
    use crate::config::Config;

    fn canary(stable: u32, canary: u32) -> Routes {
        let text = format!(
            "[[models]]\nname = \"m\"\ngroups = {{ stable = {stable}, canary = {canary} }}\n\
             group_header = \"x-test-group\"\n\
             [[models.backends]]\nurl = \"http://10.0.0.1:1\"\ngroup = \"stable\"\n\
             [[models.backends]]\nurl = \"http://10.0.0.2:1\"\ngroup = \"canary\"\n"
        );
        Routes::new(&Config::parse(&text).unwrap())
    }

    /// A reload that changes a backend's weight or cap changes them in
    /// place: the same backend, its requests in flight and health, go on.
    #[test]
    fn a_reload_changes_weight_and_cap_in_place() {
        let cfg = |weight: u32, cap: &str| {
            Config::parse(&format!(
                "[[models]]\nname = \"m\"\n[[models.backends]]\nurl = \"http://10.0.0.1:1\"\n\
                 weight = {weight}\n{cap}"
            ))
            .unwrap()
        };
        let old = Routes::new(&cfg(1, "max_connections = 2"));
        let b = std::sync::Arc::clone(&old.model("m").unwrap().backends[0]);
        let _lease = b.lease(false);
        let new = Routes::reload(&cfg(3, "max_connections = 1"), Some(&old));
        let nb = &new.model("m").unwrap().backends[0];
        assert!(std::sync::Arc::ptr_eq(&b, nb), "the same backend");
        assert_eq!((nb.weight(), nb.max_connections()), (3, Some(1)));
        assert_eq!(nb.in_flight(), 1, "its request in flight counts");
        assert!(nb.full(), "and fills the new cap");
        let new = Routes::reload(&cfg(3, ""), Some(&new));
        assert_eq!(new.model("m").unwrap().backends[0].max_connections(), None);
    }

    #[test]
    fn canary_split_is_weighted_sticky_and_moves_few_on_reweight() {
        let r = canary(90, 10);
        let m = r.model("m").unwrap();
        let none = http::HeaderMap::new();
        let user = |k: u64| super::super::balance::hash_parts(&[&k.to_le_bytes()]);
        let group = |m: &super::Model, k| m.groups[m.choose_group(&none, user(k)).0].name.clone();
        let canaries = (0..10_000).filter(|k| &*group(m, *k) == "canary").count();
        assert!((900..1100).contains(&canaries), "about 10%: {canaries}");
        for k in 0..100 {
            assert_eq!(group(m, k), group(m, k), "a user stays on one version");
        }
        // 80/20: the users already on the canary stay there; about 10% more join.
        let r2 = canary(80, 20);
        let m2 = r2.model("m").unwrap();
        let mut moved = 0;
        for k in 0..10_000 {
            let (a, b) = (group(m, k), group(m2, k));
            if a != b {
                assert_eq!(&*b, "canary", "only stable users move, to the canary");
                moved += 1;
            }
        }
        assert!((800..1200).contains(&moved), "{moved}");
        // A/B: the header picks the group outright.
        let mut h = http::HeaderMap::new();
        h.insert("x-test-group", "canary".parse().unwrap());
        assert!((0..100).all(|k| m.choose_group(&h, user(k)) == (0, true)));
        h.insert("x-test-group", "nope".parse().unwrap());
        assert!(
            !m.choose_group(&h, user(1)).1,
            "an unknown group falls back to the split"
        );
    }

    #[test]
    fn globs() {
        assert!(glob("qwen-*", "qwen-72b"));
        assert!(glob("qwen-*", "qwen-"));
        assert!(!glob("qwen-*", "llama-3"));
        assert!(glob("*", "anything"));
        assert!(glob("llama-3-70b", "llama-3-70b"));
        assert!(!glob("llama-3-70b", "llama-3-70b-instruct"));
        assert!(glob("*-instruct", "llama-3-70b-instruct"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c-y-b"));
        assert!(!glob("ab*ba", "aba"), "prefix and suffix may not overlap");
    }
}
