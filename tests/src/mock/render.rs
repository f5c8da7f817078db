//! OpenAI wire format: renders each response body into one buffer in one
//! pass. A stream is rendered whole up front too (it is a few kilobytes) and
//! then handed out event by event as zero-copy slices, so serving a chunk
//! costs no allocation and no formatting.

use bytes::Bytes;
use serde_json::json;

/// Which completion API a response belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Text,
}

/// Everything a completion response says.
#[derive(Debug)]
pub(crate) struct Completion<'a> {
    pub api: Api,
    pub seq: u64,
    pub created: u64,
    /// The model as a JSON string literal (quoted and escaped).
    pub model_json: &'a str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// `length` when the request's `max_tokens` cut the answer, as OpenAI.
    pub finish_reason: &'static str,
    /// Whether the usage object (plain) or the usage chunk (stream) is sent.
    pub usage: bool,
}

/// The one SSE event that ends every stream.
const DONE: &[u8] = b"data: [DONE]\n\n";

impl Completion<'_> {
    /// The `chat.completion` / `text_completion` JSON object.
    pub fn render(&self) -> Bytes {
        let mut v = Vec::with_capacity(256 + 8 * self.completion_tokens as usize);
        self.head(&mut v, false);
        match self.api {
            Api::Chat => {
                v.extend_from_slice(br#"{"index":0,"message":{"role":"assistant","content":""#)
            }
            Api::Text => v.extend_from_slice(br#"{"text":""#),
        }
        for i in 1..=self.completion_tokens {
            push_token(&mut v, i);
        }
        match self.api {
            Api::Chat => v.extend_from_slice(br#""},"finish_reason":""#),
            Api::Text => v.extend_from_slice(br#"","index":0,"logprobs":null,"finish_reason":""#),
        }
        v.extend_from_slice(self.finish_reason.as_bytes());
        v.extend_from_slice(br#""}]"#);
        if self.usage {
            v.extend_from_slice(b",");
            self.usage_object(&mut v);
        }
        v.extend_from_slice(b"}");
        Bytes::from(v)
    }

    /// The whole SSE stream: one event per token, the finishing event, the
    /// usage event if asked, and `[DONE]`. Events are separated by a blank
    /// line and their JSON never holds a raw newline, so `next_event` can
    /// split them again.
    pub fn render_stream(&self) -> Bytes {
        let mut v = Vec::with_capacity(64 + 200 * (self.completion_tokens as usize + 3));
        // Every event but [DONE] starts with the same prefix: render it once
        // and copy it.
        v.extend_from_slice(b"data: ");
        self.head(&mut v, true);
        let prefix = 0..v.len();
        for i in 1..=self.completion_tokens {
            if i > 1 {
                v.extend_from_within(prefix.clone());
            }
            match self.api {
                Api::Chat if i == 1 => {
                    v.extend_from_slice(br#"{"index":0,"delta":{"role":"assistant","content":""#)
                }
                Api::Chat => v.extend_from_slice(br#"{"index":0,"delta":{"content":""#),
                Api::Text => v.extend_from_slice(br#"{"text":""#),
            }
            push_token(&mut v, i);
            match self.api {
                Api::Chat => v.extend_from_slice(b"\"},\"finish_reason\":null}]}\n\n"),
                Api::Text => v.extend_from_slice(
                    b"\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}\n\n",
                ),
            }
        }
        if self.completion_tokens > 0 {
            v.extend_from_within(prefix.clone());
        }
        match self.api {
            Api::Chat => v.extend_from_slice(br#"{"index":0,"delta":{},"finish_reason":""#),
            Api::Text => {
                v.extend_from_slice(br#"{"text":"","index":0,"logprobs":null,"finish_reason":""#)
            }
        }
        v.extend_from_slice(self.finish_reason.as_bytes());
        v.extend_from_slice(b"\"}]}\n\n");
        if self.usage {
            v.extend_from_within(prefix);
            v.extend_from_slice(b"],");
            self.usage_object(&mut v);
            v.extend_from_slice(b"}\n\n");
        }
        v.extend_from_slice(DONE);
        Bytes::from(v)
    }

    /// `{"id":…,"object":…,"created":…,"model":…,"choices":[`
    fn head(&self, v: &mut Vec<u8>, chunk: bool) {
        let (id, object) = match (self.api, chunk) {
            (Api::Chat, false) => ("chatcmpl-mock-", "chat.completion"),
            (Api::Chat, true) => ("chatcmpl-mock-", "chat.completion.chunk"),
            // OpenAI's legacy completions stream uses the same object name.
            (Api::Text, _) => ("cmpl-mock-", "text_completion"),
        };
        v.extend_from_slice(b"{\"id\":\"");
        v.extend_from_slice(id.as_bytes());
        push_u64(v, self.seq);
        v.extend_from_slice(b"\",\"object\":\"");
        v.extend_from_slice(object.as_bytes());
        v.extend_from_slice(b"\",\"created\":");
        push_u64(v, self.created);
        v.extend_from_slice(b",\"model\":");
        v.extend_from_slice(self.model_json.as_bytes());
        v.extend_from_slice(b",\"choices\":[");
    }

    fn usage_object(&self, v: &mut Vec<u8>) {
        let (p, c) = (self.prompt_tokens as u64, self.completion_tokens as u64);
        v.extend_from_slice(b"\"usage\":{\"prompt_tokens\":");
        push_u64(v, p);
        v.extend_from_slice(b",\"completion_tokens\":");
        push_u64(v, c);
        v.extend_from_slice(b",\"total_tokens\":");
        push_u64(v, p + c);
        v.extend_from_slice(b"}");
    }
}

/// The end of the SSE event starting at `from` (just past its blank line).
pub(crate) fn next_event(buf: &[u8], from: usize) -> usize {
    buf[from..]
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or(buf.len(), |i| from + i + 2)
}

/// The embedding every input gets: fixed, so the response is rendered
/// without arithmetic (a gateway only passes it through).
const EMBEDDING: &str = "[0.5,-0.25,0.125,0.5,-0.5,0.25,-0.125,0.3125]";

/// The `/v1/embeddings` response: one embedding per input.
pub(crate) fn embeddings(
    model_json: &str,
    inputs: usize,
    prompt_tokens: u32,
    usage: bool,
) -> Bytes {
    let mut v = Vec::with_capacity(128 + 96 * inputs);
    v.extend_from_slice(br#"{"object":"list","data":["#);
    for i in 0..inputs {
        if i > 0 {
            v.push(b',');
        }
        v.extend_from_slice(br#"{"object":"embedding","index":"#);
        push_u64(&mut v, i as u64);
        v.extend_from_slice(br#","embedding":"#);
        v.extend_from_slice(EMBEDDING.as_bytes());
        v.push(b'}');
    }
    v.extend_from_slice(br#"],"model":"#);
    v.extend_from_slice(model_json.as_bytes());
    if usage {
        v.extend_from_slice(br#","usage":{"prompt_tokens":"#);
        push_u64(&mut v, prompt_tokens as u64);
        v.extend_from_slice(br#","total_tokens":"#);
        push_u64(&mut v, prompt_tokens as u64);
        v.push(b'}');
    }
    v.push(b'}');
    Bytes::from(v)
}

/// The `/v1/models` list, rendered once per server.
pub(crate) fn models(names: &[String]) -> Bytes {
    let data: Vec<_> = names
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

/// An OpenAI-shaped error body; its `type` and `code` follow the status as
/// OpenAI's do, so a gateway's error mapping sees familiar values.
pub(crate) fn error(status: u16, message: &str) -> Bytes {
    let (kind, code) = match status {
        401 => ("invalid_request_error", json!("invalid_api_key")),
        429 => ("requests", json!("rate_limit_exceeded")),
        500..=599 => ("server_error", json!(null)),
        _ => ("invalid_request_error", json!(null)),
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    Bytes::from(body.to_string())
}

/// `tok<i> `: distinct, so a test can see which tokens arrived and in what
/// order, and space-separated, so the joined text counts back to C words.
fn push_token(v: &mut Vec<u8>, i: u32) {
    v.extend_from_slice(b"tok");
    push_u64(v, i as u64);
    v.push(b' ');
}

/// Decimal digits without going through `fmt` machinery.
fn push_u64(v: &mut Vec<u8>, n: u64) {
    v.extend_from_slice(gateway::http1::decimal(n, &mut [0; 20]));
}
