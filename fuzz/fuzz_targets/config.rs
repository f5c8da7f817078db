//! Config text: `Config::parse` either accepts it or says what is wrong,
//! never panics and never fails without a problem to show. What it accepts
//! holds the promises validation makes to the runtime.
#![no_main]

use gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(c) => {
            let shown = || format!("accepted {text:?}");
            assert!(
                !c.server.listen.is_empty(),
                "no listen address; {}",
                shown()
            );
            assert!(c.server.max_body_bytes > 0, "max_body_bytes 0; {}", shown());
            assert!(
                !c.xdp.enabled || !c.xdp.interfaces.is_empty(),
                "XDP enabled without interfaces; {}",
                shown()
            );
            assert!(
                !c.xdp.protected_ports.contains(&0),
                "port 0 protected; {}",
                shown()
            );
            assert!(
                c.xdp.ipv4_prefix <= 32 && c.xdp.ipv6_prefix <= 128,
                "prefix too long; {}",
                shown()
            );
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "rejected with no problem: {text:?}");
            for p in &problems {
                assert!(
                    !p.message.is_empty(),
                    "a problem without a message at {:?}: {text:?}",
                    p.path
                );
            }
        }
    }
});
