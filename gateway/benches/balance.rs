//! Selection cost of every balancing policy: ns per pick (including taking
//! and releasing the backend slot) over 4 backends, single thread.
//!
//! Run: `cargo xtask bench policies`. Prints a table and leaves it in
//! target/bench/balance.md, which xtask records in docs/benchmarks.md.

use std::{hint::black_box, sync::Arc, time::Instant};

use gateway::{
    config::{BackendConfig, Policy},
    pipeline::balance::{hash_parts, Balancer},
    upstream::{Backend, Slots},
};

const PICKS: u64 = 2_000_000;
const ROUNDS: usize = 5;

fn main() {
    let slots = Arc::new(Slots::default());
    let backends: Vec<Arc<Backend>> = (0..4)
        .map(|i| {
            let cfg = BackendConfig {
                url: format!("http://10.0.0.{}:8000", i + 1).parse().unwrap(),
                weight: i + 1,
                max_connections: None,
                group: None,
                api_key: None,
                tls_ca: None,
            };
            Arc::new(Backend::new(
                &cfg,
                std::time::Duration::from_secs(1),
                1,
                Arc::clone(&slots),
            ))
        })
        .collect();
    for (i, b) in backends.iter().enumerate() {
        b.observed
            .success(std::time::Duration::from_micros(500 * (i as u64 + 1)));
    }
    // Some load, so least-connections and the bounded hash do real work.
    let _held: Vec<_> = backends
        .iter()
        .enumerate()
        .flat_map(|(i, b)| (0..i).map(move |_| b.lease(false)))
        .collect();
    let hashes: Vec<u64> = (0..1024u64)
        .map(|k| hash_parts(&[&k.to_le_bytes()]))
        .collect();
    let mut table = String::from("| policy | ns/pick (best of 5 x 2M, 4 backends) |\n|---|---:|\n");
    for policy in Policy::ALL {
        let b = Balancer::new(policy, &backends);
        let mut best = f64::MAX;
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for k in 0..PICKS {
                let h = hashes[(k % 1024) as usize];
                let (i, lease) = b.pick(&backends, &[], h).expect("a backend");
                black_box(i);
                drop(lease);
            }
            best = best.min(t.elapsed().as_nanos() as f64 / PICKS as f64);
        }
        println!("{:<28} {best:>6.1} ns/pick", policy.name());
        table.push_str(&format!("| {} | {best:.1} |\n", policy.name()));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(out.join("balance.md"), table).expect("writing target/bench/balance.md");
}
