//! Bad input and wrong environment: one clear line, the right exit code,
//! and nothing changed.

use gateway_tests::{netns::Topology, process::cli_with, process::Daemon, TempDir};

use crate::require_root;

fn write_config(dir: &TempDir, body: &str) -> std::path::PathBuf {
    let p = dir.0.join("gateway.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn invalid_cidrs_are_usage_errors() {
    let dir = TempDir::new("cli");
    let cfg = write_config(&dir, "");
    for (arg, want) in [
        ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
        ("banana", "not an IPv4 or IPv6 address"),
        ("10.0.0.0/33", "longer than 32"),
        ("2001:db8::/129", "longer than 128"),
    ] {
        let r = cli_with(&cfg, &["block", "add", arg]);
        assert_eq!(r.code, 2, "{arg}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{arg}: {}", r.stderr);
    }
    let r = cli_with(&cfg, &["block", "add", "10.0.0.0/8", "--ttl", "soon"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = cli_with(&cfg, &["limits", "set"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("nothing to set"), "{}", r.stderr);
}

#[test]
fn no_running_program_is_a_one_line_error_and_changes_nothing() {
    let dir = TempDir::new("cli");
    let state = dir.0.join("state");
    let cfg = write_config(
        &dir,
        &format!(
            "[server]\nstate_dir = \"{}\"\n[xdp]\nenabled = false\npin_dir = \"{}\"\n",
            state.display(),
            dir.0.join("nopin").display()
        ),
    );
    let r = cli_with(&cfg, &["block", "add", "192.0.2.1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("gateway run"),
        "says what to do: {}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    assert!(
        !state.exists(),
        "nothing may be written when the command fails"
    );
}

#[test]
fn config_errors_exit_2_with_toml_paths() {
    let dir = TempDir::new("cli");
    let cfg = write_config(
        &dir,
        "[xdp]\ninterfaces = [\"lo\"]\nmode = \"turbo\"\nblock = [\"10.1.2.3/8\"]\n",
    );
    let r = cli_with(&cfg, &["check"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("xdp.mode:") && r.stderr.contains("xdp.block[0]:"),
        "{}",
        r.stderr
    );
    let r = cli_with(&dir.0.join("missing.toml"), &["check"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("missing.toml"), "{}", r.stderr);
    // What `gateway run` would refuse on this host: `check` says so first.
    let cfg = write_config(
        &dir,
        "[server]\ntls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }\n\
         [xdp]\ninterfaces = [\"nosuch0\"]\n",
    );
    let r = cli_with(&cfg, &["check"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("server.tls.cert: cannot open /nonexistent/cert.pem")
            && r.stderr.contains("interface \"nosuch0\" does not exist")
            && r.stderr.contains("2 problems on this host"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_tls_file_that_does_not_load_is_a_config_error_of_run() {
    let r = Daemon::start(
        None,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"@STATE_DIR@\"\n\
         tls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let err = format!("{:#}", r.err().expect("must fail"));
    assert!(err.contains("exit status: 2"), "{err}");
    assert!(err.contains("server.tls.cert: cannot open"), "{err}");
}

#[test]
fn unknown_interface_fails_before_touching_the_kernel() {
    require_root!();
    let r = Daemon::start(
        None,
        "[server]\nstate_dir = \"@STATE_DIR@\"\n[xdp]\ninterfaces = [\"nosuch0\"]\npin_dir = \"@PIN_DIR@\"\n",
    );
    let err = format!("{:#}", r.err().expect("must fail"));
    assert!(err.contains("exit status: 2"), "{err}");
    assert!(
        err.contains("interface \"nosuch0\" does not exist"),
        "{err}"
    );
}

/// Started by systemd (`$NOTIFY_SOCKET`), the daemon waits for an
/// interface made after it started (a VLAN or bond made late at boot), and
/// for a block file that appears after it started (a mount that comes
/// later), instead of exiting 2, which the unit would not restart.
#[test]
fn under_systemd_a_late_interface_and_block_file_are_waited_for() {
    require_root!();
    let ns = gateway_tests::netns::Netns::new(format!("gwlate{}", std::process::id()))
        .expect("creating a test namespace");
    let dir = TempDir::new("late");
    let sock = dir.0.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let feed = dir.0.join("late-feed.txt");
    let body = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"@STATE_DIR@\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [xdp]\ninterfaces = [\"gwlate0\"]\nmode = \"skb\"\npin_dir = \"@PIN_DIR@\"\n\
         block_files = [\"{}\"]\n",
        feed.display()
    );
    let ns_name = ns.name.clone();
    let late_feed = feed.clone();
    // Each thing is made once the daemon tells systemd it waits for it.
    let made = std::thread::spawn(move || {
        let next = || {
            let mut buf = [0u8; 256];
            let n = notify
                .recv(&mut buf)
                .expect("a word to systemd within 10 s");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let first = next();
        assert!(first.contains("waiting for the block files"), "{first}");
        std::fs::write(&late_feed, "203.0.113.0/24\n").unwrap();
        let second = next();
        assert!(second.contains("waiting for xdp.interfaces"), "{second}");
        gateway_tests::netns::ip(&[
            "-n", &ns_name, "link", "add", "gwlate0", "type", "veth", "peer", "name", "gwlate1",
        ])
    });
    let sock_env = sock.display().to_string();
    let gw = Daemon::start_with_env(Some(&ns.path()), &body, &[("NOTIFY_SOCKET", &sock_env)])
        .expect("the daemon waits for the file and the interface, then starts");
    made.join().unwrap().expect("making the interface");
    let stats = gw.cli(&["stats", "--json"]).json();
    assert_eq!(stats["xdp"], "attached", "{stats}");
    let listed = gw.cli(&["block", "list"]).ok();
    assert!(listed.contains("203.0.113.0/24"), "{listed}");
    drop(gw);
}

#[test]
fn an_unreadable_block_file_stops_the_start() {
    let r = Daemon::start(
        None,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"@STATE_DIR@\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[xdp]\nenabled = false\nblock_files = [\"/nonexistent/blocklist.txt\"]\n",
    );
    let err = format!("{:#}", r.err().expect("must fail"));
    assert!(err.contains("exit status: 2"), "{err}");
    assert!(
        err.contains("cannot read the block file /nonexistent/blocklist.txt"),
        "{err}"
    );
}

#[test]
fn block_file_bad_lines_are_reported_and_good_lines_load() {
    require_root!();
    let t = Topology::new().expect("creating the test topology");
    let dir = TempDir::new("blockfile");
    let file = dir.0.join("blocklist.txt");
    std::fs::write(
        &file,
        "# feed\n203.0.113.0/24\n10.1.2.3/8\n2001:db8::/32 # v6\n",
    )
    .unwrap();
    let body = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"@STATE_DIR@\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[xdp]\ninterfaces = [\"{}\"]\nprotected_ports = [8443]\npin_dir = \"@PIN_DIR@\"\nblock_files = [\"{}\"]\nallow = [\"198.51.100.0/24\"]\n",
        t.server_if,
        file.display()
    );
    let gw =
        Daemon::start(Some(&t.server.path()), &body).expect("a bad line must not stop the start");
    let cidrs = gw.block_cidrs();
    assert_eq!(cidrs, ["203.0.113.0/24", "2001:db8::/32"], "{cidrs:?}");
    // `check` looks the interfaces up too: run it where they are.
    // `check` warns, and passes: `run` and `reload` skip the bad line too.
    let r = gw.cli_in_netns(&["check"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("blocklist.txt:3:") && r.stdout.contains("1 bad line in block files"),
        "file and line reported: {}",
        r.stdout
    );
    // An entry of the config's feed cannot be removed from the CLI: the
    // next reload would bring it back. The refusal says where it is.
    let r = gw.cli(&["block", "del", "203.0.113.0/24"]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr.contains("comes from the config") && r.stderr.contains("allow add"),
        "{}",
        r.stderr
    );
    assert_eq!(gw.block_cidrs(), cidrs, "nothing removed");
    let r = gw.cli(&["allow", "del", "198.51.100.0/24"]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stderr.contains("comes from xdp.allow"), "{}", r.stderr);
    let r = gw.cli(&["allow", "list"]);
    assert!(
        r.stdout.contains("198.51.100.0/24"),
        "still allowed: {}",
        r.stdout
    );
    // A feed that cannot be read is no empty feed: a reload is refused and
    // the entries loaded stay in the kernel; `check` fails.
    std::fs::remove_file(&file).unwrap();
    let r = gw.cli(&["reload"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot read the block file"),
        "{}",
        r.stderr
    );
    assert_eq!(gw.block_cidrs(), cidrs, "the feed's entries stay");
    let r = gw.cli_in_netns(&["check"]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr.contains("cannot read the block file"),
        "{}",
        r.stderr
    );
}

#[test]
fn keys_new_prints_a_key_and_its_digest_entry() {
    let dir = TempDir::new("keys");
    let cfg = write_config(&dir, "");
    let r = cli_with(&cfg, &["keys", "new", "--name", "team-x"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let key = r
        .stdout
        .lines()
        .next()
        .expect("the key first")
        .trim()
        .to_owned();
    assert!(key.starts_with("sk-gw-") && key.len() > 40, "{key}");
    let digest = gateway_tests::l7::sha256_hex(&key);
    assert!(
        r.stdout.contains(&format!("sha256 = \"{digest}\"")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("name = \"team-x\""));
    // The printed entry is a valid config on its own.
    let entry = r
        .stdout
        .split_once("[[keys]]")
        .map(|(_, e)| format!("[[keys]]{e}"))
        .unwrap();
    let cfg = write_config(&dir, &entry);
    assert_eq!(cli_with(&cfg, &["check"]).code, 0);
    // A name that would be a bad metrics label is refused.
    assert_eq!(cli_with(&cfg, &["keys", "new", "--name", "a b"]).code, 2);
}

/// A state file (persisted blocks, allowlist, limits and bans) that cannot
/// be parsed stops `gateway run` before it serves anything, with exit 2
/// (the unit does not restart it) and the file named: the policy in it is
/// never taken for empty.
#[test]
fn a_corrupt_state_file_stops_run_before_it_serves() {
    let dir = TempDir::new("cli");
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("xdp-state.json"),
        "{\"version\": 1, \"blocks\": [",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = write_config(
        &dir,
        &format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = \"{}\"\nadmin_socket = \"{}\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n[xdp]\nenabled = false\n",
            state.display(),
            dir.0.join("admin.sock").display()
        ),
    );
    let mut child = std::process::Command::new(gateway_tests::gateway_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gateway run kept running with a corrupt state file");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("xdp-state.json is corrupt"), "{err}");
}
