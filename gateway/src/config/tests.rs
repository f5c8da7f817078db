//! Config validation: defaults, every problem reported with its path.

use super::*;

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text) {
        Ok(_) => Vec::new(),
        Err(p) => p
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect(),
    }
}

/// `problems` are exactly `want`, each matched by its start.
#[track_caller]
fn assert_exactly(problems: &[String], want: &[&str]) {
    for w in want {
        assert!(
            problems.iter().any(|l| l.starts_with(w)),
            "missing {w:?} in {problems:#?}"
        );
    }
    assert_eq!(
        problems.len(),
        want.len(),
        "unexpected extra problems: {problems:#?}"
    );
}

#[test]
fn empty_file_gives_defaults() {
    let c = Config::defaults();
    assert_eq!(
        c.server.listen,
        vec!["0.0.0.0:8443".parse::<SocketAddr>().unwrap()]
    );
    assert!(!c.xdp.enabled, "no [xdp] section means no XDP");
    assert_eq!(c.xdp.syn_rate, DEFAULT_SYN_RATE);
    assert_eq!(c.xdp.protected_ports, vec![8443]);
    assert_eq!(c.pin_path(), PathBuf::from("/sys/fs/bpf/gateway/v7"));
}

#[test]
fn design_example_is_valid() {
    let text = include_str!("../../../config/gateway.toml");
    let c = Config::parse(text).unwrap_or_else(|p| panic!("config/gateway.toml: {p:?}"));
    assert!(c.xdp.enabled);
    assert_eq!(c.xdp.mode, AttachMode::Auto);
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let p = problems(
        r#"
[server]
listen = ["nope"]
[xdp]
interfaces = ["eth0"]
mode = "turbo"
block = ["10.0.0.1/8", "203.0.113.0/24"]
syn_rate = 5
syn_burst = 0
[[models]]
name = "m"
timeouts = { connect = "2" }
[[models.backends]]
url = "htp://x"
[[models.backends]]
url = "http://10.0.1.2:8000"
weight = 0
"#,
    );
    let want = [
        "server.listen[0]:",
        "xdp.mode:",
        "xdp.block[0]:",
        "xdp.syn_burst:",
        "models[0].timeouts.connect:",
        "models[0].backends[0].url: \"htp://x\" is not an http(s) URL",
        "models[0].backends[1].weight:",
    ];
    assert_exactly(&p, &want);
}

#[test]
fn unknown_keys_are_errors() {
    let p = problems("[xdp]\ninterfaces = [\"lo\"]\nsyn_rat = 3\n");
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("xdp.syn_rat: line 3: unknown field `syn_rat`"),
        "{p:?}"
    );
}

/// Mistakes in the file's form (unknown keys, wrong types, missing keys of
/// a rule) are each reported with their path and line: one does not hide
/// the others, nor the value problems of the sections that could be read.
#[test]
fn every_mistake_of_form_is_reported_with_its_path_and_line() {
    let p = problems(
        r#"[server]
listen = "0.0.0.0:8443"
[metrics]
listen = "nope"
[abuse]
auth_failures = { max = 3, window = "1m" }
[[keys]]
name = "a"
sha256 = "00"
[[keys]]
name = "b"
rpm = 5
[[models]]
name = "m"
[[models.backends]]
url = "http://10.0.0.1:8000"
wieght = 2
[extra]
"#,
    );
    let want = [
        "server.listen: line 2: invalid type: string",
        "metrics.listen: \"nope\" is not an IP:port address",
        "abuse.auth_failures: line 6: missing field `ban`",
        "keys[0].sha256:",
        "keys[1].rpm: line 12: unknown field `rpm`",
        "models[0].backends[0].wieght: line 17: unknown field `wieght`",
        "extra: line 18: unknown section",
    ];
    assert_exactly(&p, &want);
    // An entry that could not be read does not shift the paths of the
    // entries after it.
    let p = problems(
        r#"[[models]]
name = "a"
wieght = 2
[[models]]
name = "b"
[[models.backends]]
url = "htp://x"
"#,
    );
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p[0].starts_with("models[0].wieght: line 3"), "{p:#?}");
    assert!(p[1].starts_with("models[1].backends[0].url:"), "{p:#?}");
    // A syntax error stops the reading, with its line.
    let p = problems("[server]\nlisten = [\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with(": line "), "{p:?}");
}

#[test]
fn xdp_enabled_needs_interfaces() {
    let p = problems("[xdp]\n");
    assert!(p[0].starts_with("xdp.interfaces:"), "{p:?}");
    assert!(problems("[xdp]\nenabled = false\n").is_empty());
}

#[test]
fn key_digest_must_be_hex() {
    let p = problems("[[keys]]\nname = \"a\"\nsha256 = \"sk-plaintext\"\n");
    assert!(p[0].starts_with("keys[0].sha256:"), "{p:?}");
}

#[test]
fn keys_are_distinct_and_name_real_models() {
    let d = |c: char| c.to_string().repeat(64);
    let p = problems(&format!(
        r#"
[[keys]]
name = "a"
sha256 = "{a}"
models = []
[[keys]]
name = "a"
sha256 = "{b}"
models = ["m", "alias-of-m", "qwen-*", "lama"]
[[keys]]
name = "c"
sha256 = "{a}"
[[models]]
name = "m"
aliases = ["alias-of-m"]
[[models.backends]]
url = "http://10.0.1.2:8000"
"#,
        a = d('a'),
        b = d('b'),
    ));
    let want = [
        "keys[0].models: an empty list would allow no model",
        "keys[1].name: \"a\" is the name of an earlier key",
        "keys[1].models[3]: \"lama\" is not a model name or alias",
        "keys[2].sha256: the same digest as an earlier key",
    ];
    assert_exactly(&p, &want);
}

#[test]
fn a_backend_is_listed_once_and_without_credentials() {
    let p = problems(
        r#"
[[models]]
name = "m"
[[models.backends]]
url = "http://10.0.1.1:8000"
[[models.backends]]
url = "http://10.0.1.1:8000/"
[[models.backends]]
url = "http://user:secret@10.0.1.2:8000"
"#,
    );
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p[0].starts_with("models[0].backends[1].url:") && p[0].contains("listed twice"));
    assert!(p[1].starts_with("models[0].backends[2].url:") && !p[1].contains("secret"));
}

#[test]
fn a_backend_api_key_is_checked_and_never_printed() {
    let c = Config::parse(
        "[[models]]\nname = \"m\"\n[[models.backends]]\nurl = \"http://10.0.1.1:8000\"\napi_key = \"sk-upstream-9\"\n",
    )
    .unwrap();
    assert!(
        !format!("{c:?}").contains("sk-upstream-9"),
        "Debug hides it"
    );
    let p = problems(
        "[[models]]\nname = \"m\"\n[[models.backends]]\nurl = \"http://10.0.1.1:8000\"\napi_key = \"has space\"\n",
    );
    assert!(
        p.len() == 1 && p[0].starts_with("models[0].backends[0].api_key:"),
        "{p:?}"
    );
    assert!(!p[0].contains("has space"), "{p:?}");
}

/// `tls_ca` is read when the config loads: a file that is missing, holds
/// no certificate, or sits on a backend without TLS is a problem at its path.
#[test]
fn a_backend_tls_ca_is_read_and_checked() {
    let dir = std::env::temp_dir().join(format!("gw-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, TEST_CA_PEM).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let with = |url: &str, path: &std::path::Path| {
        format!(
            "[[models]]\nname = \"m\"\n[[models.backends]]\nurl = \"{url}\"\ntls_ca = \"{}\"\n",
            path.display()
        )
    };
    let c = Config::parse(&with("https://10.0.1.1:8443", &ca)).unwrap();
    let got = c.models[0].backends[0].tls_ca.as_ref().expect("read");
    assert_eq!(got.certs.len(), 1);
    for (text, says) in [
        (
            with("http://10.0.1.1:8000", &ca),
            "is for https:// backends",
        ),
        (
            with("https://10.0.1.1:8443", &dir.join("none.pem")),
            "cannot read",
        ),
        (
            with("https://10.0.1.1:8443", &junk),
            "holds no PEM certificate",
        ),
    ] {
        let p = problems(&text);
        assert!(
            p.len() == 1
                && p[0].starts_with("models[0].backends[0].tls_ca:")
                && p[0].contains(says),
            "{p:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A self-signed CA certificate (P-256, made once with `openssl req
/// -x509`; it signs nothing here, only its loading matters).
const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBiTCCATGgAwIBAgIUf1qVyi39bGYYIFTHG1w7yYgr7+8wCgYIKoZIzj0EAwIw\n\
GjEYMBYGA1UEAwwPZ2F0ZXdheSB0ZXN0IENBMCAXDTI2MTEzMDIzMzI0OFoYDzIx\n\
MjYxMTA2MjMzMjQ4WjAaMRgwFgYDVQQDDA9nYXRld2F5IHRlc3QgQ0EwWTATBgcq\n\
hkjOPQIBBggqhkjOPQMBBwNCAASuQiEU5xYCX7qqD3sLEo4uo86l8BtxaxEdJgG0\n\
39TUvngToOwATLVb5Zs1GZlFFOdaerOpF0Gj4xv06x0s2Ntho1MwUTAdBgNVHQ4E\n\
FgQU5zgl/fJYKoCAX9Gzc85j8cRf+3gwHwYDVR0jBBgwFoAU5zgl/fJYKoCAX9Gz\n\
c85j8cRf+3gwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNGADBDAh9dyFNr\n\
SFhsFDDEz98DUt95tDQmu3XB3oOdIPtbmWphAiB1RpzXX5+heEWbhoA//U6IH1yV\n\
wjAmLrPkSz4S9+FO/Q==\n\
-----END CERTIFICATE-----\n\
";

#[test]
fn balancing_and_groups() {
    let c = Config::parse(
        r#"
[[models]]
name = "m"
balance = "consistent_hash"
hash_on = "header:x-session-id"
groups = { stable = 90, canary = 10 }
group_header = "x-test-group"
[[models.backends]]
url = "http://10.0.0.1:8000"
group = "stable"
[[models.backends]]
url = "http://10.0.0.2:8000"
group = "canary"
"#,
    )
    .unwrap();
    let m = &c.models[0];
    assert_eq!(m.balance, Policy::ConsistentHash);
    assert_eq!(m.hash_on, HashOn::Header("x-session-id".parse().unwrap()));
    assert_eq!(m.groups.len(), 2);
    assert_eq!(m.group_header.as_ref().unwrap(), "x-test-group");
    for p in Policy::ALL {
        assert_eq!(Policy::parse(p.name()), Some(p));
    }
    let p = problems(
        r#"
[[models]]
name = "m"
balance = "fastest"
hash_on = "cookie"
groups = { a = 1, b = 1 }
[[models.backends]]
url = "http://10.0.0.1:8000"
group = "a"
[[models.backends]]
url = "http://10.0.0.2:8000"
group = "c"
[[models]]
name = "n"
group_header = "x-g"
[[models.backends]]
url = "http://10.0.0.3:8000"
group = "a"
"#,
    );
    let want = [
        "models[0].balance: \"fastest\" is not one of weighted_least_connections,",
        "models[0].hash_on:",
        "models[0].backends[1].group: \"c\" is not in the model's groups",
        "models[0].groups.b: no backend is in this group",
        "models[1].groups: backends name groups",
        "models[1].group_header: needs `groups`",
    ];
    for w in want {
        assert!(
            p.iter().any(|x| x.starts_with(w)),
            "missing {w:?} in {p:#?}"
        );
    }
}

#[test]
fn resilience_settings_and_their_problems() {
    let c = Config::defaults();
    assert!(c.models.is_empty());
    let m = &Config::parse("[[models]]\nname = \"m\"\n[[models.backends]]\nurl = \"http://a:1\"\n")
        .unwrap()
        .models[0];
    assert_eq!(m.outlier.consecutive_failures, DEFAULT_CONSECUTIVE_FAILURES);
    assert_eq!(m.queue.size, DEFAULT_QUEUE_SIZE);
    assert!(m.health_check.is_none());
    let p = problems(
        r#"
[server]
max_header_bytes = 100
[[keys]]
name = "k"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
requests_per_minute = 0
[[models]]
name = "m"
retry_budget = { ratio = 1.5 }
health_check = { path = "health", interval = "1ms", healthy = 0 }
outlier = { ejection = "10s", max_ejection = "1s" }
[[models.backends]]
url = "http://a:1"
"#,
    );
    let want = [
        "server.max_header_bytes: 100 is below the minimum 8192",
        "keys[0].requests_per_minute: must be at least 1",
        "models[0].retry_budget.ratio:",
        "models[0].health_check.path:",
        "models[0].health_check.interval: must be at least 10ms",
        "models[0].health_check.healthy: 0 is below the minimum 1",
        "models[0].outlier.max_ejection: must not be shorter",
    ];
    for w in want {
        assert!(
            p.iter().any(|x| x.starts_with(w)),
            "missing {w:?} in {p:#?}"
        );
    }
}

#[test]
fn a_reload_keeps_the_settings_only_a_restart_applies() {
    let running = Config::parse(
        "[server]\nlisten = [\"0.0.0.0:8443\"]\nstate_dir = \"/var/lib/a\"\n\
         [xdp]\ninterfaces = [\"eth0\"]\npin_dir = \"/sys/fs/bpf/a\"\nsyn_rate = 20\n",
    )
    .unwrap();
    let mut new = Config::parse(
        "[server]\nlisten = [\"0.0.0.0:443\"]\nstate_dir = \"/var/lib/b\"\nmax_body_bytes = 1024\n\
         [xdp]\ninterfaces = [\"eth1\"]\npin_dir = \"/sys/fs/bpf/b\"\nsyn_rate = 30\nmode = \"skb\"\n",
    )
    .unwrap();
    assert_eq!(new.xdp.protected_ports, vec![443]);
    let changed = new.keep_restart_only(&running);
    assert_eq!(
        changed,
        [
            "server.listen",
            "server.state_dir",
            "xdp.interfaces",
            "xdp.mode",
            "xdp.pin_dir"
        ]
    );
    // The running values stay; everything else is the new config's.
    assert_eq!(new.server.listen, running.server.listen);
    assert_eq!(new.server.state_dir, running.server.state_dir);
    assert_eq!(new.xdp.pin_dir, running.xdp.pin_dir);
    assert_eq!(new.xdp.mode, AttachMode::Auto);
    assert_eq!((new.server.max_body_bytes, new.xdp.syn_rate), (1024, 30));
    assert_eq!(
        new.xdp.protected_ports,
        vec![8443],
        "defaulted protected ports follow the listen port kept"
    );
    // Ports set in the file are the file's.
    let mut set = Config::parse(
        "[server]\nlisten = [\"0.0.0.0:443\"]\n\
         [xdp]\ninterfaces = [\"eth0\"]\nprotected_ports = [443]\n",
    )
    .unwrap();
    set.keep_restart_only(&running);
    assert_eq!(set.xdp.protected_ports, vec![443]);
    // Nothing changed, nothing to say.
    let mut same = running.clone();
    assert!(same.keep_restart_only(&running).is_empty());
    // New certificate paths are reloaded; turning TLS on waits.
    let tls = |paths: &str| {
        Config::parse(&format!(
            "[server]\nlisten = [\"0.0.0.0:8443\"]\n{paths}[xdp]\nenabled = false\n"
        ))
        .unwrap()
    };
    let on = tls("tls = { cert = \"/a.pem\", key = \"/a.key\" }\n");
    let mut renewed = tls("tls = { cert = \"/b.pem\", key = \"/b.key\" }\n");
    assert!(renewed.keep_restart_only(&on).is_empty());
    assert_eq!(
        renewed.server.tls.unwrap().cert,
        std::path::Path::new("/b.pem")
    );
    let mut turned_on = on.clone();
    assert_eq!(turned_on.keep_restart_only(&tls("")), ["server.tls"]);
}

#[test]
fn cors_origins_are_origins() {
    let ok = "[server]\ncors_origins = [\"*\", \"https://chat.example\", \"http://127.0.0.1:3000\", \"https://[::1]:8443\"]\n";
    assert_eq!(problems(ok), Vec::<String>::new());
    let c = Config::parse(ok).unwrap();
    assert_eq!(c.server.cors_origins.len(), 4);
    let p = problems(
        "[server]\ncors_origins = [\"https://chat.example/\", \"chat.example\", \"https://a b\"]\n",
    );
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(p[0].starts_with("server.cors_origins[0]: "), "{p:?}");
    assert!(p[2].starts_with("server.cors_origins[2]: "), "{p:?}");
}

#[test]
fn fallbacks_name_other_models_once() {
    let text = |fallbacks: &str| {
        format!(
            "[[models]]\nname = \"a\"\naliases = [\"a2\"]\nfallbacks = {fallbacks}\n\
             [[models.backends]]\nurl = \"http://10.0.1.1:8000\"\n\
             [[models]]\nname = \"b\"\naliases = [\"b2\"]\n\
             [[models.backends]]\nurl = \"http://10.0.1.2:8000\"\n"
        )
    };
    let c = Config::parse(&text("[\"b2\"]")).unwrap();
    assert_eq!(c.models[0].fallbacks, ["b2"]);
    for (fallbacks, says) in [
        (
            "[\"nope\"]",
            "models[0].fallbacks[0]: \"nope\" is not a model name or alias",
        ),
        ("[\"a2\"]", "models[0].fallbacks[0]: is this model itself"),
        (
            "[\"b\", \"b2\"]",
            "models[0].fallbacks[1]: \"b2\" is a model listed earlier",
        ),
    ] {
        assert_eq!(problems(&text(fallbacks)), [says], "{fallbacks}");
    }
}
