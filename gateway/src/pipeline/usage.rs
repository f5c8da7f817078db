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

/// The `usage` of a complete (non-stream) JSON response, in one piece
/// (a body that comes in several is read by [`JsonUsage`]).
///
/// Only the `usage` value is parsed: the rest of the body (the completion
/// text, mostly) is stepped over by [`top_level_value`], which tracks
/// strings and nesting and nothing else. That is a third of the
/// instructions a full serde pass took on a 16-token completion, and the
/// body is the client's to validate, not the gateway's. Servers put
/// `usage` at or near the end, so [`usage_near_end`] first tries from the
/// last `"usage"` in the body.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    let value = match usage_near_end(body) {
        Some(found) => found,
        None => top_level_value(body, b"usage"),
    }?;
    // An object only: serde would also fill the struct from an array, by
    // position.
    if value.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    usage_obj(value)
}

/// Reads a `usage` value (the input from its start; what follows it is
/// not looked at). The common shape, plain keys with integer or skipped
/// values, is read by hand: serde's map visitor took ~2.6k instructions
/// per response for it, a third of a 16-token completion's usage
/// accounting. Anything else (an escaped key, a token count that is not
/// plain digits, a stray byte) goes to serde, which decides as before.
fn usage_obj(value: &[u8]) -> Option<Usage> {
    let u = match plain_usage(value) {
        Some(u) => u,
        None => {
            let mut de = serde_json::Deserializer::from_slice(value);
            Option::<UsageObj>::deserialize(&mut de).ok()??
        }
    };
    Some(Usage {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens,
    })
}

/// The usage object at the start of `v` when it has the plain shape, read
/// as serde reads it; `None` hands the decision to serde. Values of other
/// keys are stepped over as [`top_level_value`] steps over the body
/// (strings and nesting), so an ill-formed value of a key the gateway does
/// not read is not refused here.
fn plain_usage(v: &[u8]) -> Option<UsageObj> {
    // JSON's whitespace (not form feed, which serde refuses).
    let ws = |mut i: usize| {
        while matches!(v.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            i += 1;
        }
        i
    };
    let mut i = ws(0);
    if v.get(i) != Some(&b'{') {
        return None;
    }
    let mut u = UsageObj::default();
    i = ws(i + 1);
    if v.get(i) == Some(&b'}') {
        return Some(u);
    }
    loop {
        if v.get(i) != Some(&b'"') {
            return None;
        }
        let end = string_end(v, i + 1)?;
        let key = &v[i + 1..end];
        if key.contains(&b'\\') {
            return None;
        }
        i = ws(end + 1);
        if v.get(i) != Some(&b':') {
            return None;
        }
        i = ws(i + 1);
        let slot = match key {
            b"prompt_tokens" | b"input_tokens" => Some(&mut u.prompt_tokens),
            b"completion_tokens" | b"output_tokens" => Some(&mut u.completion_tokens),
            _ => None,
        };
        i = match slot {
            Some(slot) => {
                let (n, next) = plain_u64(v, i)?;
                *slot = n;
                next
            }
            None => skip_value(v, i)?,
        };
        i = ws(i);
        match v.get(i)? {
            b',' => i = ws(i + 1),
            b'}' => return Some(u),
            _ => return None,
        }
    }
}

/// A JSON integer of plain digits at `i` that fits a `u64` (no sign,
/// fraction, exponent or leading zero: serde decides those), and the index
/// after it.
fn plain_u64(v: &[u8], i: usize) -> Option<(u64, usize)> {
    let digits = v[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || (digits > 1 && v[i] == b'0') {
        return None;
    }
    let end = i + digits;
    if matches!(v.get(end), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    let mut n = 0u64;
    for d in &v[i..end] {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some((n, end))
}

/// The index after the value starting at `i`: a string, an object or
/// array (stepped over by [`walk`]), or a bare scalar (up to the next
/// delimiter).
fn skip_value(v: &[u8], mut i: usize) -> Option<usize> {
    match v.get(i)? {
        b'"' => Some(string_end(v, i + 1)? + 1),
        b'{' | b'[' => Some(walk(v, i + 1, false, None, None)?.1? + 1),
        _ => {
            let start = i;
            while !matches!(v.get(i), None | Some(b',' | b'}' | b']'))
                && !v[i].is_ascii_whitespace()
            {
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

/// The input from the start of the value of the top-level `key` of the JSON
/// object in `body` (serde reads one value from it and stops), or `None`
/// when `body` is not an object or has no such key. A key given twice
/// yields its last value, as with the fields of `usage` itself.
fn top_level_value<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let i = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[i] != b'{' {
        return None;
    }
    walk(body, i + 1, true, Some(key), None).map(|(found, _)| found)?
}

/// [`top_level_value`] for `usage`, decided from the body's last plain
/// `"usage"` when that is the top-level key: `Some(value)` when it is,
/// `None` when this cannot tell (it was nested, or spelled otherwise, or
/// the body is not well formed) and the whole body must be scanned.
///
/// In well-formed JSON a `"usage"` whose first quote is not escaped is a
/// key (inside a string every quote is escaped). Walked from its value on
/// as if it were a top-level key, the object closes at the body's last
/// byte only if it was one; a nested key closes its own object first. The
/// walk also sees any later top-level key spelled with escapes.
fn usage_near_end(body: &[u8]) -> Option<Option<&[u8]>> {
    // Not an object at the top: the whole scan says so.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    let at = FINDER
        .find_iter(body)
        .filter(|&at| !escaped(body, at))
        .last()?;
    let end = at + b"\"usage\"".len();
    let colon = end + body[end..].iter().position(|b| !b.is_ascii_whitespace())?;
    if body[colon] != b':' {
        return None;
    }
    let found = Some(&body[colon + 1..]);
    let (found, closed) = walk(body, colon + 1, false, Some(b"usage"), found)?;
    let closed = closed?;
    body[closed + 1..]
        .iter()
        .all(u8::is_ascii_whitespace)
        .then_some(found)
}

/// Whether the byte at `at` is escaped (an odd run of backslashes before it).
fn escaped(body: &[u8], at: usize) -> bool {
    body[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
}

/// Steps through an object's members (or an array's) from `i`, one level
/// inside it (at a key if `want_key`, else at a value), tracking strings
/// and nesting: returns the value of its last key equal to `key` (or
/// `found`, if none comes), and the index of the bracket that closes it if
/// the body reaches it; `None` for a string left open.
fn walk<'a>(
    body: &'a [u8],
    mut i: usize,
    mut want_key: bool,
    key: Option<&[u8]>,
    mut found: Option<&'a [u8]>,
) -> Option<(Option<&'a [u8]>, Option<usize>)> {
    let mut depth = 1usize;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let end = string_end(body, i + 1)?;
                if let (1, true, Some(key)) = (depth, want_key, key) {
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
                    return Some((found, Some(i)));
                }
            }
            b',' if depth == 1 => want_key = true,
            _ => {}
        }
        i += 1;
    }
    Some((found, None))
}

/// The index of the quote closing the JSON string whose contents start at
/// `i`; `None` when it is not closed.
pub(super) fn string_end(body: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let j = i + memchr::memchr2(b'"', b'\\', body.get(i..)?)?;
        if body[j] == b'"' {
            return Some(j);
        }
        i = j + 2; // the escaped byte, whatever it is
    }
}

/// Longest `usage` object kept (a real one is a few hundred bytes).
const MAX_USAGE_VALUE: usize = 64 * 1024;
/// Longest top-level key compared with `usage`: its five letters each
/// spelled as a `\uXXXX` escape.
const MAX_KEY: usize = 30;

/// The top-level `usage` object of a JSON response, read as its body goes
/// by, in pieces of any size (for bodies too large to keep whole; it reads
/// what [`from_json`] reads, which is faster on a body held whole). Only the `usage` value is kept and parsed:
/// the rest (the completion text, mostly; an embeddings batch can be tens
/// of MB) is stepped over, tracking strings and nesting and nothing else,
/// so no copy of the body is held. A key given twice counts by its last
/// value, as JSON parsers commonly read it. The body is the client's to
/// validate, not the gateway's.
#[derive(Default)]
pub struct JsonUsage {
    /// The first non-blank byte was seen (and was `{`, else `dead`).
    started: bool,
    /// Not an object, or past its end: nothing more to read.
    dead: bool,
    depth: usize,
    in_string: bool,
    /// The byte after a backslash in a string is taken as it is.
    escaped: bool,
    /// At depth 1, the next string is a key (after `{` or `,`).
    want_key: bool,
    /// A top-level key is being read into `key` (its raw bytes).
    in_key: bool,
    key: Key,
    /// After a top-level key: 1 waiting for its `:`, 2 for its value.
    after_key: u8,
    /// That key was `usage`.
    is_usage: bool,
    /// The `usage` object being read, from its `{`.
    value: Option<Vec<u8>>,
    /// The last complete `usage` value; `None` when it was no object.
    found: Option<Vec<u8>>,
}

/// A top-level key's first bytes, inline (no allocation per key).
struct Key {
    bytes: [u8; MAX_KEY],
    len: usize,
    /// Longer than `bytes`: no spelling of `usage`.
    over: bool,
}

impl Default for Key {
    fn default() -> Key {
        Key {
            bytes: [0; MAX_KEY],
            len: 0,
            over: false,
        }
    }
}

impl Key {
    fn push(&mut self, part: &[u8]) {
        if self.len + part.len() > MAX_KEY {
            self.over = true;
        } else {
            self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
            self.len += part.len();
        }
    }

    fn is_usage(&self) -> bool {
        !self.over && is_usage_key(&self.bytes[..self.len])
    }
}

/// The bytes that mean something outside a string; the scan steps over
/// every other one (blanks, numbers, `true`, `null`) without looking.
static STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    let special = b"\"{}[],:";
    while i < special.len() {
        t[special[i] as usize] = true;
        i += 1;
    }
    t
};

impl JsonUsage {
    pub fn feed(&mut self, buf: &[u8]) {
        if self.dead {
            return;
        }
        let mut i = 0;
        if !self.started {
            while i < buf.len() && buf[i].is_ascii_whitespace() {
                i += 1;
            }
            if i == buf.len() {
                return;
            }
            self.started = true;
            if buf[i] != b'{' {
                self.dead = true;
                return;
            }
        }
        // Where the key or value being read starts in this piece.
        let (mut key_from, mut value_from) = (0, 0);
        while i < buf.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                match memchr::memchr2(b'"', b'\\', &buf[i..]) {
                    None => i = buf.len(),
                    Some(j) if buf[i + j] == b'\\' => {
                        self.escaped = true;
                        i += j + 1;
                    }
                    Some(j) => {
                        self.in_string = false;
                        if self.in_key {
                            self.in_key = false;
                            self.key.push(&buf[key_from..i + j]);
                            self.is_usage = self.key.is_usage();
                            self.after_key = 1;
                        }
                        i += j + 1;
                    }
                }
                continue;
            }
            while i < buf.len() && !STRUCTURAL[buf[i] as usize] {
                i += 1;
            }
            let Some(&b) = buf.get(i) else { break };
            if self.after_key == 2 {
                // The first byte that means something after a top-level
                // key's `:` tells its value: `{` an object; anything else
                // (a string's quote, or the `,` or `}` after a scalar) not.
                self.after_key = 0;
                if std::mem::take(&mut self.is_usage) {
                    if b == b'{' {
                        self.value = Some(Vec::new());
                        value_from = i;
                    } else {
                        // `null` or no object: no usage (the last key decides).
                        self.found = None;
                    }
                }
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 && self.want_key {
                        self.want_key = false;
                        self.in_key = true;
                        self.key = Key::default();
                        key_from = i + 1;
                    }
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth == 1 {
                        self.want_key = true;
                    }
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 1 {
                        if let Some(mut v) = self.value.take() {
                            let part = &buf[value_from..=i];
                            self.found = (v.len() + part.len() <= MAX_USAGE_VALUE).then(|| {
                                v.extend_from_slice(part);
                                v
                            });
                        }
                    } else if self.depth == 0 {
                        self.dead = true;
                        return;
                    }
                }
                b':' if self.depth == 1 && self.after_key == 1 => self.after_key = 2,
                b',' if self.depth == 1 => self.want_key = true,
                _ => {}
            }
            i += 1;
        }
        // The piece ended inside a key or the `usage` value: keep its part.
        if self.in_key {
            self.key.push(&buf[key_from..]);
        }
        if let Some(v) = &mut self.value {
            let part = &buf[value_from..];
            if v.len() + part.len() > MAX_USAGE_VALUE {
                self.value = None;
                self.found = None;
            } else {
                v.extend_from_slice(part);
            }
        }
    }

    /// The usage read, once the body has ended.
    pub fn finish(&self) -> Option<Usage> {
        usage_obj(self.found.as_deref()?)
    }
}

/// Whether a top-level key's raw bytes spell `usage` (escapes decoded as
/// serde would: "us\u0061ge").
fn is_usage_key(raw: &[u8]) -> bool {
    raw == b"usage"
        || (raw.contains(&b'\\') && {
            let mut quoted = Vec::with_capacity(raw.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(raw);
            quoted.push(b'"');
            serde_json::from_slice::<String>(&quoted).is_ok_and(|k| k == "usage")
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

    /// Fed in pieces of any size, the scan reads what it reads at once.
    #[test]
    fn json_usage_in_pieces() {
        let bodies: [&[u8]; 7] = [
            br#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {} b"}}],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
            br#"{"usage":{"prompt_tokens":1},"us\u0061ge":{"prompt_tokens":2,"completion_tokens":5}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":null}"#,
            br#" { "nested" : { "usage" : { "prompt_tokens" : 9 } } , "usage" : { "completion_tokens" : 4 } } trailing"#,
            br#"[{"usage":{"prompt_tokens":1}}]"#,
            br#"{"a_key_far_longer_than_usage_could_ever_be_spelled_even_with_escapes_in_it":1,"usage":{"prompt_tokens":3}}"#,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":"#,
        ];
        for body in bodies {
            let whole = from_json(body);
            for size in 1..=body.len() {
                let mut scan = JsonUsage::default();
                for piece in body.chunks(size) {
                    scan.feed(piece);
                }
                assert_eq!(
                    scan.finish(),
                    whole,
                    "pieces of {size}: {}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        assert_eq!(from_json(bodies[1]).map(|u| u.completion), Some(5));
        assert_eq!(from_json(bodies[2]), None, "the last usage decides");
        assert_eq!(
            from_json(bodies[3]).map(|u| (u.prompt, u.completion)),
            Some((0, 4))
        );
        assert_eq!(from_json(bodies[4]), None, "not an object");
        assert_eq!(from_json(bodies[5]).map(|u| u.prompt), Some(3));
        assert_eq!(from_json(bodies[6]), None, "cut short");
    }

    /// A body of tens of MB (an embeddings batch) with its usage at the
    /// end: read, and nothing of the body kept.
    #[test]
    fn json_usage_of_a_large_body_keeps_nothing_of_it() {
        let mut scan = JsonUsage::default();
        scan.feed(br#"{"object":"list","data":[{"embedding":""#);
        let piece = vec![b'A'; 64 * 1024];
        for _ in 0..400 {
            scan.feed(&piece);
            assert!(!scan.in_key && scan.value.is_none());
        }
        scan.feed(br#""}],"usage":{"prompt_tokens":4096,"total_tokens":4096}}"#);
        assert_eq!(
            scan.finish(),
            Some(Usage {
                prompt: 4096,
                completion: 0
            })
        );
    }

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

    /// The last plain `"usage"` decides when it is the top-level key, and
    /// hands over to the whole scan when it cannot tell.
    #[test]
    fn usage_near_the_end() {
        let u = |p, c| {
            Some(Usage {
                prompt: p,
                completion: c,
            })
        };
        let decided = |b: &[u8]| usage_near_end(b).is_some();
        // vLLM puts keys after `usage`; OpenAI and llama.cpp end with it.
        let vllm = br#"{"id":"c","choices":[{"message":{"content":"the "usage": {} key"}}],"usage":{"prompt_tokens":9,"completion_tokens":16},"prompt_logprobs":null,"kv_transfer_params":null}"#;
        assert!(decided(vllm));
        assert_eq!(from_json(vllm), u(9, 16));
        let last = b"{\"usage\" :\n {\"prompt_tokens\":1,\"completion_tokens\":2}}\n";
        assert!(decided(last));
        assert_eq!(from_json(last), u(1, 2));
        // The last one nested: the whole scan finds the top-level one, or
        // none.
        let nested = br#"{"usage":{"prompt_tokens":1},"meta":{"usage":{"prompt_tokens":9}}}"#;
        assert!(!decided(nested));
        assert_eq!(from_json(nested), u(1, 0));
        let only_nested = br#"{"meta":{"usage":{"prompt_tokens":9}}}"#;
        assert!(!decided(only_nested));
        assert_eq!(from_json(only_nested), None);
        // A later key spelled with escapes is still the last one.
        let escaped = br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#;
        assert_eq!(from_json(escaped), u(2, 0));
        // A quote escaped before `usage` (an odd run of backslashes) is in
        // a string; an even run ends the string before it.
        assert_eq!(
            from_json(br#"{"usage":{"prompt_tokens":4},"c":"x"usage":{"prompt_tokens":5}"}"#),
            u(4, 0)
        );
        assert_eq!(
            from_json(br#"{"c":"x\","usage":{"prompt_tokens":6}}"#),
            u(6, 0)
        );
        // Not an object at the top, or cut short: the whole scan decides.
        for b in [
            &br#"[{"usage":{"prompt_tokens":1}}]"#[..],
            b"\xef\xbb\xbf{\"usage\":{\"prompt_tokens\":5}}",
            br#"junk{"usage":{"prompt_tokens":5}}"#,
            br#"[1,{"usage":{"prompt_tokens":5}}"#,
            br#"{"usage":{"prompt_tokens":1}"#,
            br#"{"usage":{"prompt_tokens":1}} x"#,
            br#"{"usage""#,
        ] {
            assert!(!decided(b), "{}", String::from_utf8_lossy(b));
        }
    }

    /// The hand-read usage object reads as serde reads it, and leaves to
    /// serde what it does not read itself.
    #[test]
    fn plain_usage_reads_as_serde_does() {
        let serde = |v: &[u8]| -> Option<(u64, u64)> {
            let mut de = serde_json::Deserializer::from_slice(v);
            let u = Option::<UsageObj>::deserialize(&mut de).ok()??;
            Some((u.prompt_tokens, u.completion_tokens))
        };
        let plain = |v: &[u8]| plain_usage(v).map(|u| (u.prompt_tokens, u.completion_tokens));
        // Read by hand, each as serde reads it.
        for v in [
            &br#"{"prompt_tokens":9,"completion_tokens":16,"total_tokens":25}"#[..],
            br#" { "prompt_tokens" : 9 ,
                  "completion_tokens":16 } "#,
            br#"{}"#,
            br#"{"total_tokens":25}"#,
            br#"{"input_tokens":3,"output_tokens":4,"total_tokens":7}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            br#"{"prompt_tokens":0,"completion_tokens":18446744073709551615}"#,
            br#"{"prompt_tokens_details":{"cached_tokens":0,"x":[1,{"y":"}"}]},"prompt_tokens":5}"#,
            br#"{"note":"a \"quoted\" }","completion_tokens":2,"extra":null,"f":1.5e3,"t":true}"#,
        ] {
            let shown = String::from_utf8_lossy(v);
            assert!(plain(v).is_some(), "not read by hand: {shown}");
            assert_eq!(plain(v), serde(v), "{shown}");
        }
        // Left to serde, which refuses or reads them.
        for v in [
            &br#"{"prompt_tokens":-1}"#[..],
            br#"{"prompt_tokens":-0}"#,
            br#"{"prompt_tokens":1.0}"#,
            br#"{"prompt_tokens":1e2}"#,
            br#"{"prompt_tokens":01}"#,
            br#"{"prompt_tokens":18446744073709551616}"#,
            br#"{"prompt_tokens":null}"#,
            br#"{"prompt_tokens":"5"}"#,
            br#"{"prompt\u005ftokens":5}"#,
            br#"{"prompt_tokens":5,}"#,
            br#"{"prompt_tokens":5 "completion_tokens":1}"#,
            br#"{"a":}"#,
            br#"{"prompt_tokens":5"#,
            br#"[1,2]"#,
            br#"null"#,
            b"{\x0c\"prompt_tokens\":5}",
        ] {
            assert_eq!(plain(v), None, "{}", String::from_utf8_lossy(v));
        }
        // Through the readers: serde's decision stands where it decides.
        let u = |v: &str| from_json(format!(r#"{{"usage":{v}}}"#).as_bytes());
        // (serde reads `-0` as a float, so no count.)
        assert_eq!(u(r#"{"prompt_tokens":-0,"completion_tokens":2}"#), None);
        assert_eq!(
            u(r#"{"prompt\u005ftokens":5}"#),
            Some(Usage {
                prompt: 5,
                completion: 0
            })
        );
        assert_eq!(u(r#"{"prompt_tokens":1.0}"#), None);
        assert_eq!(u(r#"{"prompt_tokens":01}"#), None);
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
