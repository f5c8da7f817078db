//! Request-body inspection cost: what the gateway does to every OpenAI
//! request body before routing it (`pipeline::request::inspect`: UTF-8
//! check, nesting-depth scan, a validating serde pass that keeps only
//! `model`, `stream`, `stream_options` and the token caps), against a full
//! parse into a `serde_json::Value` tree (what a gateway that loads the
//! request as a document pays), for chat bodies from 1 KiB to 4 MiB.
//!
//! Run: `cargo xtask bench body`. Prints a table and leaves it in
//! target/bench/body.md, which xtask records in docs/benchmarks.md.

use std::{hint::black_box, time::Instant};

use gateway::pipeline::request::inspect;

/// A chat completion request of about `size` bytes: messages of ~2 KiB of
/// prose with escaped newlines, quotes and some non-ASCII text, as long
/// RAG prompts and conversation histories are.
fn chat_body(size: usize) -> Vec<u8> {
    let prose = "The gateway routes each request by its model. \\\"Quoted\\\" text, \
                 numbers 12345, punctuation; and a line break.\\nÜnïcødé → ✓ 日本語.\\n";
    let mut messages = Vec::new();
    let mut total = 0;
    let mut i = 0;
    while total < size {
        let mut content = String::new();
        while content.len() < 2048 {
            content.push_str(prose);
        }
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let m = format!(r#"{{"role":"{role}","content":"{content}"}}"#);
        total += m.len() + 1;
        messages.push(m);
        i += 1;
    }
    format!(
        r#"{{"model":"llama-3.1-70b","messages":[{}],"stream":true,"max_tokens":512,"temperature":0.2}}"#,
        messages.join(",")
    )
    .into_bytes()
}

/// Best ns per call of `f` over rounds of enough calls for ~50 ms each.
fn best_ns(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    let once = t.elapsed().as_nanos().max(1) as u64;
    let calls = (50_000_000 / once).clamp(1, 1_000_000);
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / calls as f64);
    }
    best
}

fn main() {
    let mut table = String::from(
        "| body | inspect (the gateway) | its UTF-8 check | a validating skip of the whole body (serde `IgnoredAny`) | full parse (`serde_json::Value`) | full parse / inspect |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for size in [1 << 10, 16 << 10, 256 << 10, 4 << 20] {
        let body = chat_body(size);
        let info = inspect(&body).expect("a valid chat body");
        assert_eq!(info.model, "llama-3.1-70b");
        assert!(info.stream);
        let ins = best_ns(|| {
            black_box(inspect(black_box(&body)).is_ok());
        });
        let utf8 = best_ns(|| {
            black_box(simdutf8::basic::from_utf8(black_box(&body)).is_ok());
        });
        let skip = best_ns(|| {
            black_box(serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).is_ok());
        });
        let full = best_ns(|| {
            black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).is_ok());
        });
        let rate = |ns: f64| {
            let mbs = body.len() as f64 / ns * 1e9 / (1 << 20) as f64;
            if ns >= 1e6 {
                format!("{:.2} ms ({mbs:.0} MiB/s)", ns / 1e6)
            } else {
                format!("{:.1} us ({mbs:.0} MiB/s)", ns / 1e3)
            }
        };
        let kib = body.len() as f64 / 1024.0;
        let label = if kib >= 1024.0 {
            format!("{:.1} MiB", kib / 1024.0)
        } else {
            format!("{kib:.1} KiB")
        };
        let row = [rate(ins), rate(utf8), rate(skip), rate(full)];
        println!(
            "{label:>10}: inspect {}, utf-8 {}, skip {}, full parse {} ({:.1}x inspect)",
            row[0],
            row[1],
            row[2],
            row[3],
            full / ins
        );
        table.push_str(&format!(
            "| {label} | {} | {:.1}x |\n",
            row.join(" | "),
            full / ins
        ));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(out.join("body.md"), table).expect("writing target/bench/body.md");
}
