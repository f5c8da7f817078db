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
    assert_eq!(c.pin_path(), PathBuf::from("/sys/fs/bpf/gateway/v1"));
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
    for w in want {
        assert!(
            p.iter().any(|l| l.starts_with(w)),
            "missing {w:?} in {p:#?}"
        );
    }
    assert_eq!(p.len(), want.len(), "unexpected extra problems: {p:#?}");
}

#[test]
fn unknown_keys_are_errors() {
    let p = problems("[xdp]\ninterfaces = [\"lo\"]\nsyn_rat = 3\n");
    assert_eq!(p.len(), 1);
    assert!(p[0].contains("line 3") && p[0].contains("syn_rat"), "{p:?}");
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
