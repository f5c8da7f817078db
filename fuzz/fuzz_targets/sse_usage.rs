//! Upstream SSE events and JSON bodies: the usage readers must agree with
//! each other, with their cheap prefilter, with a full JSON parse and with
//! themselves when the body comes in pieces, and never panic.
#![no_main]

use gateway::pipeline::usage::{from_json, from_sse_event, has_usage_object, JsonUsage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let has = has_usage_object(data);
    let event = from_sse_event(data);
    let json = from_json(data);

    // from_sse_event parses only what the prefilter lets through.
    if event.is_some() {
        assert!(
            has,
            "usage read from an event the prefilter rejected: {data:?}"
        );
    }

    // CRLF line endings read the same as LF (the parser strips the CR).
    if !data.contains(&b'\r') && data.contains(&b'\n') {
        let crlf: Vec<u8> = data.iter().fold(Vec::new(), |mut v, b| {
            if *b == b'\n' {
                v.push(b'\r');
            }
            v.push(*b);
            v
        });
        assert_eq!(
            from_sse_event(&crlf),
            event,
            "CRLF and LF events differ: {data:?}"
        );
    }

    // A body read in pieces (as it arrives, `JsonUsage`) reads as the whole
    // (`from_json`): split at two points the input chooses. (On JSON only:
    // the two may differ on a body no client could parse, such as one cut
    // inside a string after its usage.)
    if data.len() > 2 && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok() {
        let a = data[0] as usize % data.len();
        let b = a + (data[1] as usize % (data.len() - a));
        let mut scan = JsonUsage::default();
        for piece in [&data[..a], &data[a..b], &data[b..]] {
            scan.feed(piece);
        }
        assert_eq!(
            scan.finish(),
            json,
            "read in pieces at {a} and {b}: {:?}",
            String::from_utf8_lossy(data)
        );
    }

    // from_json parses only the `usage` value and steps over the rest: on
    // any valid JSON object it reads what a full parse reads. (The
    // Responses API's names are aliases, the last of the two counting; a
    // parsed map has lost the order, so an object with both is skipped.)
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(data) {
        // Some(what a full parse reads), or None when it cannot tell.
        let full = match m.get("usage").and_then(|u| u.as_object()) {
            None => Some(None),
            Some(u) => {
                let n = |k: &str, alias: &str| match (u.get(k), u.get(alias)) {
                    (None, None) => Some(Some(0)),
                    (Some(v), None) | (None, Some(v)) => Some(v.as_u64()),
                    (Some(_), Some(_)) => None,
                };
                n("prompt_tokens", "input_tokens")
                    .zip(n("completion_tokens", "output_tokens"))
                    .map(|(p, c)| p.zip(c))
            }
        };
        if let Some(full) = full {
            assert_eq!(
                json.map(|u| (u.prompt, u.completion)),
                full,
                "from_json and a full parse differ for {:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    // A JSON object sent as one `data:` line carries the same usage as the
    // same object as a plain response body. (Only objects: serde also reads
    // a struct from an array, where the two shapes differ in length.)
    let object = data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if object && !data.contains(&b'\n') {
        let mut line = b"data: ".to_vec();
        line.extend_from_slice(data);
        if let Some(e) = from_sse_event(&line) {
            assert_eq!(
                json,
                Some(e.usage),
                "SSE and JSON usage differ for {:?}",
                String::from_utf8_lossy(data)
            );
        }
    }
});
