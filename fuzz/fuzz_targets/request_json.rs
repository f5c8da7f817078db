//! Request bodies as clients send them: `request::inspect` picks out the
//! routing fields, and `request::upstream_body` must then produce a JSON
//! object with the rename and `stream_options.include_usage` applied,
//! whichever of its paths (untouched, spliced, re-encoded) it takes.
#![no_main]

use bytes::Bytes;
use gateway::pipeline::request::{inspect, upstream_body, RequestInfo};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

/// The fields checked in the body sent upstream. Every other field is
/// skipped without being parsed into numbers (`1e999` passes `inspect` and
/// the splice keeps it), and a duplicated `model` or `stream_options` is an
/// error, as it would be ambiguous for the upstream.
#[derive(Deserialize)]
struct Sent {
    model: String,
    stream_options: Option<SentOptions>,
}

#[derive(Deserialize)]
struct SentOptions {
    include_usage: Option<bool>,
}

fn check_sent(input: &[u8], out: &[u8], info: &RequestInfo, model: &str) {
    let shown = || {
        format!(
            "input {:?}\n{info:?}\nsent {:?}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(out)
        )
    };
    assert_eq!(
        out.iter().find(|b| !b.is_ascii_whitespace()),
        Some(&b'{'),
        "the body sent upstream is not a JSON object\n{}",
        shown()
    );
    let sent: Sent = match serde_json::from_slice::<Sent>(out) {
        Ok(s) => s,
        Err(e) => panic!("the body sent upstream does not parse ({e})\n{}", shown()),
    };
    assert_eq!(sent.model, model, "wrong model sent upstream\n{}", shown());
    assert_eq!(
        sent.stream_options.and_then(|o| o.include_usage),
        Some(true),
        "stream_options.include_usage is not true upstream\n{}",
        shown()
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(info) = inspect(data) else {
        return;
    };
    assert!(!info.model.is_empty(), "inspect accepted an empty model");
    let body = Bytes::copy_from_slice(data);

    // Nothing to change: the very same buffer goes upstream.
    let same = upstream_body(body.clone(), &info, Some(&info.model), false)
        .expect("an unchanged body cannot fail");
    assert_eq!(same.as_ptr(), body.as_ptr(), "an unchanged body was copied");

    // Renamed and asking for usage (the re-encoding path).
    if let Ok(out) = upstream_body(body.clone(), &info, Some("renamed"), true) {
        check_sent(data, &out, &info, "renamed");
    }
    // Only asking for usage (the splice path when there is no stream_options).
    if let Ok(out) = upstream_body(body, &info, None, true) {
        check_sent(data, &out, &info, &info.model);
    }
});
