//! Token usage from upstream responses: the `usage` object of a JSON body,
//! and the usage chunk of an SSE stream. Pure functions over bytes, shared
//! by the proxy and the fuzzers.

use serde::Deserialize;

/// Prompt and completion tokens of one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// A `usage` object. Read by hand rather than derived: a key given twice
/// takes its last value, as JSON parsers commonly do (a derived struct
/// would refuse the whole object and the tokens would go uncounted).
#[derive(Default)]
struct UsageObj {
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum UsageField {
    /// `input_tokens` and `output_tokens`: the Responses API's names.
    #[serde(alias = "input_tokens")]
    PromptTokens,
    #[serde(alias = "output_tokens")]
    CompletionTokens,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for UsageObj {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UsageObj, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UsageObj;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UsageObj, A::Error> {
                let mut u = UsageObj::default();
                while let Some(k) = map.next_key::<UsageField>()? {
                    match k {
                        UsageField::PromptTokens => u.prompt_tokens = map.next_value()?,
                        UsageField::CompletionTokens => u.completion_tokens = map.next_value()?,
                        UsageField::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(u)
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[derive(Deserialize)]
struct Chunk {
    usage: Option<UsageObj>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    /// The Responses API's `response.completed` event carries the usage
    /// in its `response`.
    response: Option<ResponseObj>,
}

#[derive(Deserialize)]
struct ResponseObj {
    usage: Option<UsageObj>,
}

/// The `usage` of a complete (non-stream) JSON response.
///
/// Only the `usage` value is parsed: the rest of the body (the completion
/// text, mostly) is stepped over by [`top_level_value`], which tracks
/// strings and nesting and nothing else. That is a third of the
/// instructions a full serde pass took on a 16-token completion, and the
/// body is the client's to validate, not the gateway's.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    let value = top_level_value(body, b"usage")?;
    // An object only: serde would also fill the struct from an array, by
    // position.
    if value.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(value);
    let u = Option::<UsageObj>::deserialize(&mut de).ok()??;
    Some(Usage {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens,
    })
}

/// The input from the start of the value of the top-level `key` of the JSON
/// object in `body` (serde reads one value from it and stops), or `None`
/// when `body` is not an object or has no such key. A key given twice
/// yields its last value, as with the fields of `usage` itself.
fn top_level_value<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut found = None;
    let mut i = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[i] != b'{' {
        return None;
    }
    i += 1;
    let mut depth = 1usize;
    // At depth 1, the next string is a key (after `{` or `,`).
    let mut want_key = true;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let end = string_end(body, i + 1)?;
                if depth == 1 && want_key {
                    want_key = false;
                    let raw = &body[i + 1..end];
                    // A key spelled with escapes ("us\u0061ge") is decoded
                    // as serde would; plain keys are compared as they are.
                    let matches = raw == key
                        || (raw.contains(&b'\\')
                            && serde_json::from_slice::<String>(&body[i..=end])
                                .is_ok_and(|k| k.as_bytes() == key));
                    if matches {
                        let colon = end
                            + 1
                            + body[end + 1..]
                                .iter()
                                .position(|b| !b.is_ascii_whitespace())?;
                        if body[colon] != b':' {
                            return None;
                        }
                        found = Some(&body[colon + 1..]);
                        i = colon + 1;
                        continue;
                    }
                }
                i = end + 1;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return found;
                }
            }
            b',' if depth == 1 => want_key = true,
            _ => {}
        }
        i += 1;
    }
    found
}

/// The index of the quote closing the string whose contents start at `i`.
fn string_end(body: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let j = i + memchr::memchr2(b'"', b'\\', body.get(i..)?)?;
        if body[j] == b'"' {
            return Some(j);
        }
        i = j + 2; // the escaped byte, whatever it is
    }
}

/// Whether `data` holds a `"usage"` key whose value is an object (not
/// `null`): a cheap test that lets every ordinary chunk skip JSON parsing.
pub fn has_usage_object(data: &[u8]) -> bool {
    let mut rest = data;
    while let Some(i) = memchr::memmem::find(rest, b"\"usage\"") {
        rest = &rest[i + 7..];
        let after = rest
            .iter()
            .position(|b| !b.is_ascii_whitespace() && *b != b':');
        if let Some(j) = after {
            if rest[j] == b'{' {
                return true;
            }
        }
    }
    false
}

/// What one SSE event tells us.
#[derive(Debug, PartialEq, Eq)]
pub struct EventUsage {
    pub usage: Usage,
    /// The event is a usage-only chunk (`"choices": []`), which the gateway
    /// removes when it, not the client, asked for usage.
    pub usage_only: bool,
}

/// Usage carried by one SSE event (its `data:` lines joined), if any.
pub fn from_sse_event(event: &[u8]) -> Option<EventUsage> {
    if !has_usage_object(event) {
        return None;
    }
    // Join the event's data lines (RFC: multiple `data:` lines are joined
    // with newlines); usage chunks are a single line in practice.
    let mut data = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    let c: Chunk = serde_json::from_slice(&data).ok()?;
    let u = c.usage.or(c.response.and_then(|r| r.usage))?;
    Some(EventUsage {
        usage: Usage {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens,
        },
        usage_only: c.choices.is_some_and(|v| v.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_api_usage() {
        let json = br#"{"id":"r","object":"response","output":[],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"total_tokens":13}}"#;
        assert_eq!(
            from_json(json),
            Some(Usage {
                prompt: 9,
                completion: 4
            })
        );
        let created = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n";
        assert_eq!(from_sse_event(created), None);
        let done = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"total_tokens\":13}}}\n\n";
        assert_eq!(
            from_sse_event(done),
            Some(EventUsage {
                usage: Usage {
                    prompt: 9,
                    completion: 4
                },
                usage_only: false
            })
        );
    }

    #[test]
    fn json_usage() {
        let b = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        assert_eq!(
            from_json(b),
            Some(Usage {
                prompt: 7,
                completion: 3
            })
        );
        assert_eq!(from_json(br#"{"id":"x"}"#), None);
        assert_eq!(from_json(b"not json"), None);
    }

    #[test]
    fn json_usage_is_the_top_level_key_only() {
        let u = |p, c| {
            Some(Usage {
                prompt: p,
                completion: c,
            })
        };
        // "usage" inside the completion text, with escaped quotes around it,
        // and a nested "usage" object, come before the real one.
        let b = br#"{"choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":99} \\"}}],
            "meta":{"usage":{"prompt_tokens":98}},"usage" : {"prompt_tokens":7,"completion_tokens":3}}"#;
        assert_eq!(from_json(b), u(7, 3));
        // A key written with escapes is the same key, as serde reads it.
        assert_eq!(
            from_json(br#"{"us\u0061ge":{"prompt_tokens":1,"completion_tokens":2}}"#),
            u(1, 2)
        );
        // A string value "usage" is not a key.
        assert_eq!(from_json(br#"{"a":"usage","b":{"prompt_tokens":1}}"#), None);
        assert_eq!(from_json(br#"{"usage":null}"#), None);
        assert_eq!(from_json(br#"{"usage":5}"#), None);
        assert_eq!(from_json(br#"{"usage": [3, 4]}"#), None);
        assert_eq!(from_json(br#"[{"usage":{"prompt_tokens":1}}]"#), None);
        // Truncated or unbalanced input ends the scan without a panic.
        for b in [
            &br#"{"usage""#[..],
            br#"{"x":"abc"#,
            br#"{"x":"\"#,
            br#"{}}"#,
            b"{",
        ] {
            assert_eq!(from_json(b), None, "{}", String::from_utf8_lossy(b));
        }
    }

    /// Found by the `sse_usage` fuzzer: a key given twice, inside `usage`
    /// or at the top, reads as a full JSON parse reads it (the last one),
    /// instead of losing the response's tokens.
    #[test]
    fn a_repeated_key_takes_its_last_value() {
        let u = |p, c| {
            Some(Usage {
                prompt: p,
                completion: c,
            })
        };
        let b =
            br#"{"id":"c","usage":{"prompt_tokens":7,"prompt_tokens":8,"completion_tokens":3}}"#;
        assert_eq!(from_json(b), u(8, 3));
        let b = br#"{"usage":{"prompt_tokens":1},"x":[],"usage":{"prompt_tokens":2,"completion_tokens":5}}"#;
        assert_eq!(from_json(b), u(2, 5));
        assert_eq!(
            from_json(br#"{"usage":{"prompt_tokens":1},"usage":null}"#),
            None
        );
        // A wrong type is still no usage, wherever it is.
        assert_eq!(
            from_json(br#"{"usage":{"prompt_tokens":1,"prompt_tokens":"x"}}"#),
            None
        );
    }

    #[test]
    fn usage_object_detection_skips_nulls() {
        assert!(!has_usage_object(
            br#"data: {"choices":[{"delta":{}}],"usage":null}"#
        ));
        assert!(has_usage_object(
            br#"data: {"choices":[],"usage": {"prompt_tokens":1}}"#
        ));
        assert!(has_usage_object(
            br#"{"usage":null,"x":{"usage" : {"a":1}}}"#
        ));
        assert!(!has_usage_object(b"data: [DONE]"));
    }

    #[test]
    fn sse_usage_chunk() {
        let ev = b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\n";
        assert_eq!(
            from_sse_event(ev),
            Some(EventUsage {
                usage: Usage {
                    prompt: 5,
                    completion: 9
                },
                usage_only: true
            })
        );
        // vLLM may put usage on the last content chunk instead.
        let ev = b"data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\n";
        assert_eq!(from_sse_event(ev).map(|e| e.usage_only), Some(false));
        assert_eq!(from_sse_event(b"data: [DONE]\n\n"), None);
        assert_eq!(from_sse_event(b"data: {\"usage\": {broken\n\n"), None);
    }
}
