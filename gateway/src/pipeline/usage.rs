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

#[derive(Deserialize)]
struct UsageObj {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<UsageObj>,
}

#[derive(Deserialize)]
struct Chunk {
    usage: Option<UsageObj>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

/// The `usage` of a complete (non-stream) JSON response.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    let v: WithUsage = serde_json::from_slice(body).ok()?;
    v.usage.map(|u| Usage {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens,
    })
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
    let u = c.usage?;
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
