//! The request body: read within the size limit, the fields routing needs
//! picked out without building a JSON tree, and rewritten for upstream only
//! when it must be (model rename, asking for stream usage).

use std::{borrow::Cow, future::poll_fn, task::Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use serde::Deserialize;

use crate::error::ProxyError;

/// Most of an announced body length reserved before it arrives.
const RESERVE_AHEAD: usize = 64 * 1024;

/// Reads the whole body, refusing more than `limit` bytes (413) before
/// reading it when Content-Length already says so, and a body that sends
/// nothing for `stall` (408; nginx's `client_body_timeout`).
pub async fn read_body<B>(
    body: B,
    content_length: Option<u64>,
    limit: u64,
    stall: std::time::Duration,
) -> Result<Bytes, ProxyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if content_length.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let mut body = std::pin::pin!(body);
    // One buffer, sized by Content-Length when it is given: a body sent a
    // byte at a time costs its bytes, not a list entry per piece.
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    loop {
        // Asked once without a timer: a body that came with its head (the
        // usual case) costs no timer.
        let next = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => tokio::time::timeout(stall, body.frame())
                .await
                .map_err(|_| ProxyError::BodyTimeout(stall))?,
        };
        let frame = match next {
            None => break,
            Some(Err(_)) => return Err(ProxyError::BodyRead),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let had = first.as_ref().map_or(0, Bytes::len) + joined.len();
        if (had + data.len()) as u64 > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        // The common case, a body in one piece, is kept without a copy.
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(f) => {
                // What the length announces, but not more than a little
                // ahead of what came: a client that announces 10 MiB and
                // trickles pins only what it sent.
                let want = content_length.map_or(0, |n| n as usize).min(RESERVE_AHEAD);
                joined.reserve(want.max(f.len() + data.len()));
                joined.extend_from_slice(&f);
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The fields of an OpenAI request body the gateway acts on. serde skips
/// every other field without allocating, so this is a validating scan of
/// the body rather than a parse into a tree.
#[derive(Deserialize)]
struct Peek<'a> {
    /// A string; any other value is no model (400 `missing_model`).
    #[serde(borrow, default, deserialize_with = "string_only")]
    model: Option<Cow<'a, str>>,
    /// As the Python servers read it (pydantic's lax bool): `true`, `1`,
    /// `"true"`, `"yes"`, ...; vLLM streams for `"stream": "true"`, so the
    /// gateway must see a stream there too.
    #[serde(default, deserialize_with = "lax_bool")]
    stream: Option<bool>,
    /// Absent: `None`; present, even as `null`: `Some(..)`, so the body
    /// is edited rather than given a second `stream_options` key.
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
    /// Only an estimate's input: a value that is no count of tokens
    /// (`-1`, llama.cpp's "no limit"; `100.0`; `null`) is the backend's to
    /// judge, not a reason to refuse the request here.
    #[serde(default, deserialize_with = "lenient_count")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    max_completion_tokens: Option<u64>,
}

/// A string (escapes decoded), else `None`; any other JSON value is
/// stepped over.
fn string_only<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Text;
    impl<'v> serde::de::Visitor<'v> for Text {
        type Value = Option<Cow<'v, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E>(self, v: &'v str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'v>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'v>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    }
    d.deserialize_any(Text)
}

/// A boolean as pydantic reads one in lax mode: `true`/`false`, `1`/`0`,
/// or a string among `true`, `t`, `yes`, `y`, `on`, `1` and their
/// opposites (any case); `null` is absent. Anything else is refused.
fn lax_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct Flag;
    impl serde::de::Visitor<'_> for Flag {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a boolean")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Option<bool>, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<bool>, E> {
            match v {
                0 => Ok(Some(false)),
                1 => Ok(Some(true)),
                _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(v), &self)),
            }
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<bool>, E> {
            Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<bool>, E> {
            match lax_bool_text(v) {
                Some(b) => Ok(Some(b)),
                None => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
            }
        }
        fn visit_unit<E>(self) -> Result<Option<bool>, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Flag)
}

/// A boolean as pydantic's lax mode reads it from text, if it is one.
pub(super) fn lax_bool_text(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "on" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A non-negative integer (or a float holding one), else `None`; any other
/// JSON value is stepped over.
fn lenient_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Count;
    impl<'v> serde::de::Visitor<'v> for Count {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Option<u64>, E> {
            Ok(Some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Option<u64>, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_f64<E>(self, v: f64) -> Result<Option<u64>, E> {
            Ok((v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64).then_some(v as u64))
        }
        fn visit_unit<E>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'v>>(self, mut a: A) -> Result<Option<u64>, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'v>>(self, mut a: A) -> Result<Option<u64>, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    }
    d.deserialize_any(Count)
}

/// A field that is present (even as `null`) becomes `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Deepest nesting of arrays and objects accepted in a request body.
pub const MAX_JSON_DEPTH: usize = 64;

/// What routing needs to know about a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: String,
    pub stream: bool,
    /// `None`: no `stream_options`; `Some(x)`: its `include_usage` (false if absent).
    pub include_usage: Option<bool>,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Inline media: strings that are `data:` URLs (base64 images, audio).
    pub media: Media,
}

/// The `data:` URL strings of a body: how many, and their bytes. A prompt's
/// tokens are estimated from the rest of the body: an image is a few
/// hundred to a few thousand tokens to a model, not its base64 length / 4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Media {
    pub count: u32,
    pub bytes: usize,
}

/// Picks `model`, `stream`, `stream_options.include_usage` and the token
/// cap out of a body, which must be a UTF-8 JSON object nested at most
/// `MAX_JSON_DEPTH` deep.
pub fn inspect(body: &[u8]) -> Result<RequestInfo, ProxyError> {
    // SIMD validation (several times std's rate on long prompts); only a
    // body that fails it is checked again, for the position of the error.
    if simdutf8::basic::from_utf8(body).is_err() {
        let at = std::str::from_utf8(body).map_or_else(|e| e.valid_up_to(), |_| body.len());
        return Err(ProxyError::InvalidJson(format!(
            "invalid UTF-8 at byte {at}"
        )));
    }
    // Only an object is a request (serde would also read the fields from
    // an array, by position). An empty body is not JSON at all.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => {}
        Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() => {
            return Err(ProxyError::MissingModel)
        }
        Some(_) => {}
    }
    let scanned = scan(body, MAX_JSON_DEPTH);
    if scanned.too_deep {
        return Err(ProxyError::InvalidJson(format!(
            "nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    // A field of the wrong type (`"stream": "maybe"`) or given twice is
    // named in serde's words; no or a non-string `model` is `missing_model`.
    // SAFETY: checked to be UTF-8 above. As a `str`, serde reads strings
    // without checking each one's UTF-8 again.
    let text = unsafe { std::str::from_utf8_unchecked(body) };
    let peek: Peek =
        serde_json::from_str(text).map_err(|e| ProxyError::InvalidJson(e.to_string()))?;
    let model = peek
        .model
        .filter(|m| !m.is_empty())
        .ok_or(ProxyError::MissingModel)?;
    Ok(RequestInfo {
        model: model.into_owned(),
        stream: peek.stream.unwrap_or(false),
        include_usage: peek
            .stream_options
            .map(|o| o.and_then(|o| o.include_usage).unwrap_or(false)),
        max_tokens: peek.max_completion_tokens.or(peek.max_tokens),
        media: scanned.media,
    })
}

/// What one pass over a body's structure finds.
struct Scan {
    /// Arrays and objects nest deeper than asked.
    too_deep: bool,
    media: Media,
}

/// Whether arrays and objects nest deeper than `max` (strings skipped).
#[cfg(test)]
fn too_deep(body: &[u8], max: usize) -> bool {
    scan(body, max).too_deep
}

/// Walks a body's nesting (strings skipped, `data:` URLs among them
/// counted). A linear scan that allocates nothing; run before parsing so
/// no parser downstream, here or upstream, meets an absurd depth.
fn scan(body: &[u8], max: usize) -> Scan {
    let mut out = Scan {
        too_deep: false,
        media: Media::default(),
    };
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: to the next quote not escaped.
                let start = i + 1;
                let Some(end) = super::usage::string_end(body, start) else {
                    return out; // unterminated: the parser says so
                };
                i = end;
                if body[start..].starts_with(b"data:") {
                    out.media.count += 1;
                    out.media.bytes += i - start;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    out.too_deep = true;
                    return out;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    out
}

/// The body to send upstream. Returns the original bytes untouched when no
/// change is needed; splices `stream_options` in without a re-encode in the
/// common case (a stream request with no `stream_options`); otherwise edits
/// the JSON object.
pub fn upstream_body(
    body: Bytes,
    info: &RequestInfo,
    rename_to: Option<&str>,
    ask_usage: bool,
) -> Result<Bytes, ProxyError> {
    let rename = rename_to.filter(|m| *m != info.model);
    if rename.is_none() && !ask_usage {
        return Ok(body);
    }
    if rename.is_none() && info.include_usage.is_none() {
        if let Some(open) = body.iter().position(|b| *b == b'{') {
            const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
            let mut out = BytesMut::with_capacity(body.len() + FIELD.len());
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(FIELD);
            out.extend_from_slice(&body[open + 1..]);
            return Ok(out.freeze());
        }
    }
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| ProxyError::InvalidJson(e.to_string()))?;
    if let Some(m) = rename {
        v.insert("model".into(), m.into());
    }
    if ask_usage {
        let so = v
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        match so.as_object_mut() {
            Some(o) => {
                o.insert("include_usage".into(), true.into());
            }
            None => *so = serde_json::json!({ "include_usage": true }),
        }
    }
    Ok(Bytes::from(
        serde_json::to_vec(&v).expect("re-encoding a parsed object"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn data_urls_are_counted_as_media() {
        let image = format!("data:image/png;base64,{}", "QUJD".repeat(1000));
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"what is data: this"}},{{"type":"image_url","image_url":{{"url":"{image}"}}}}]}}]}}"#
        );
        let i = inspect(body.as_bytes()).unwrap();
        assert_eq!(
            i.media,
            Media {
                count: 1,
                bytes: image.len()
            }
        );
        assert_eq!(
            inspect(br#"{"model":"m"}"#).unwrap().media,
            Media::default()
        );
    }

    #[test]
    fn inspect_fields_and_errors() {
        let i =
            inspect(br#"{"messages":[{"role":"user","content":"hi"}],"model":"m","stream":true}"#)
                .unwrap();
        assert_eq!(
            i,
            RequestInfo {
                model: "m".into(),
                stream: true,
                include_usage: None,
                max_tokens: None,
                media: Media::default(),
            }
        );
        assert_eq!(
            inspect(br#"{"model":"m","max_tokens":5,"max_completion_tokens":7}"#)
                .unwrap()
                .max_tokens,
            Some(7)
        );
        let i = inspect(br#"{"model":"m","stream":true,"stream_options":{}}"#).unwrap();
        assert_eq!(i.include_usage, Some(false));
        assert!(matches!(inspect(b"{nope"), Err(ProxyError::InvalidJson(_))));
        assert!(matches!(inspect(b""), Err(ProxyError::InvalidJson(_))));
        assert!(matches!(
            inspect(br#"{"messages":[]}"#),
            Err(ProxyError::MissingModel)
        ));
        assert!(matches!(
            inspect(br#"{"model":42}"#),
            Err(ProxyError::MissingModel)
        ));
        assert!(matches!(
            inspect(br#"["model"]"#),
            Err(ProxyError::MissingModel)
        ));
        assert!(matches!(
            inspect(br#"{"model":""}"#),
            Err(ProxyError::MissingModel)
        ));
        // Escapes in the model name are decoded (borrowed Cow falls back to owned).
        assert_eq!(inspect(br#"{"model":"a\u0062c"}"#).unwrap().model, "abc");
        assert!(matches!(inspect(b"42"), Err(ProxyError::MissingModel)));
        assert!(matches!(inspect(br#""m""#), Err(ProxyError::MissingModel)));
        assert!(matches!(
            inspect(br#"{"model":{"name":"m"}}"#),
            Err(ProxyError::MissingModel)
        ));
    }

    /// What the Python servers accept is not refused here: token caps that
    /// are no count (llama.cpp's `-1`, a float, `null`) are left to the
    /// backend, and `stream` is read as pydantic's lax bool. A field of the
    /// wrong type is named in the error.
    #[test]
    fn fields_the_backends_accept_are_not_refused() {
        for cap in ["-1", "100.0", "null", "\"8\""] {
            let body = format!(r#"{{"model":"m","max_tokens":{cap}}}"#);
            let i = inspect(body.as_bytes()).unwrap_or_else(|e| panic!("{cap}: {e}"));
            assert_eq!(i.max_tokens, (cap == "100.0").then_some(100), "{cap}");
        }
        for (v, want) in [
            ("\"true\"", true),
            ("1", true),
            ("\"No\"", false),
            ("null", false),
        ] {
            let body = format!(r#"{{"model":"m","stream":{v}}}"#);
            assert_eq!(inspect(body.as_bytes()).unwrap().stream, want, "{v}");
        }
        let e = inspect(br#"{"model":"m","stream":"maybe"}"#).unwrap_err();
        assert!(
            matches!(&e, ProxyError::InvalidJson(m) if m.contains("maybe")),
            "{e:?}"
        );
        let e = inspect(br#"{"model":"m","model":"n"}"#).unwrap_err();
        assert!(
            matches!(&e, ProxyError::InvalidJson(m) if m.contains("duplicate field `model`")),
            "{e:?}"
        );
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(65),
            "]".repeat(65)
        );
        assert!(
            matches!(inspect(deep.as_bytes()), Err(ProxyError::InvalidJson(e)) if e.contains("nested"))
        );
        let ok = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(63),
            "]".repeat(63)
        );
        assert!(inspect(ok.as_bytes()).is_ok());
        // Brackets inside strings, and escaped quotes, do not count.
        let quoted = format!("{{\"model\":\"m\",\"x\":\"\\\"{}\"}}", "[".repeat(100));
        assert!(inspect(quoted.as_bytes()).is_ok(), "{quoted}");
        let mut bad = br#"{"model":"m","x":"#.to_vec();
        bad.extend_from_slice(b"\"\xff\xfe\"}");
        assert!(matches!(inspect(&bad), Err(ProxyError::InvalidJson(e)) if e.contains("UTF-8")));
        for not_object in [&b"42"[..], b"\"model\"", b"null", b"[]"] {
            assert!(inspect(not_object).is_err());
        }
    }

    /// The depth scan against a byte-at-a-time model of it, on random
    /// mixes of brackets, quotes, escapes and filler of every length.
    #[test]
    fn depth_scan_matches_a_simple_model() {
        fn model(body: &[u8], max: usize) -> bool {
            // What lies outside strings, then the running depth over it.
            let (mut in_str, mut esc) = (false, false);
            let outside: Vec<u8> = body
                .iter()
                .copied()
                .filter(|&c| {
                    let was_in = in_str;
                    if !in_str {
                        in_str = c == b'"';
                    } else if esc {
                        esc = false;
                    } else if c == b'\\' {
                        esc = true;
                    } else if c == b'"' {
                        in_str = false;
                    }
                    !was_in && c != b'"'
                })
                .collect();
            let mut depth = 0usize;
            outside.iter().any(|&c| {
                if c == b'[' || c == b'{' {
                    depth += 1;
                } else if c == b']' || c == b'}' {
                    depth = depth.saturating_sub(1);
                }
                depth > max
            })
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let alphabet = b"[]{}\"\\abc \x80\xff";
        for n in 0..20_000 {
            let len = n % 90;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            for max in [0, 1, 3] {
                assert_eq!(
                    too_deep(&body, max),
                    model(&body, max),
                    "{body:?} max {max}"
                );
            }
        }
    }

    /// Found by the `request_json` fuzz target: a `null` stream_options
    /// was taken for an absent one and a second key was spliced in, which
    /// upstream parsers resolve to the last (null): usage went uncounted.
    #[test]
    fn null_stream_options_is_replaced_not_duplicated() {
        let b = Bytes::from_static(br#"{"model":"m","stream":true,"stream_options":null}"#);
        let i = inspect(&b).unwrap();
        assert_eq!(i.include_usage, Some(false));
        let out = upstream_body(b, &i, None, true).unwrap();
        assert_eq!(
            std::str::from_utf8(&out)
                .unwrap()
                .matches("stream_options")
                .count(),
            1,
            "{out:?}"
        );
        assert_eq!(json(&out)["stream_options"]["include_usage"], true);
    }

    /// Also from the fuzz target: serde reads a struct from an array by
    /// position, so `["m", true, null]` passed as a request.
    #[test]
    fn arrays_are_not_requests() {
        assert!(matches!(
            inspect(br#"["m",true,null]"#),
            Err(ProxyError::MissingModel)
        ));
        assert!(inspect(b" \n{\"model\":\"m\"}").is_ok());
    }

    #[test]
    fn untouched_when_nothing_to_do() {
        let b = Bytes::from_static(br#"{"model":"m"}"#);
        let i = inspect(&b).unwrap();
        let out = upstream_body(b.clone(), &i, Some("m"), false).unwrap();
        assert_eq!(out.as_ptr(), b.as_ptr(), "same buffer, no copy");
    }

    #[test]
    fn splices_stream_options() {
        let b = Bytes::from_static(br#" {"model":"m","stream":true}"#);
        let i = inspect(&b).unwrap();
        let out = upstream_body(b, &i, None, true).unwrap();
        let v = json(&out);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
    }

    #[test]
    fn rewrites_model_and_existing_stream_options() {
        let b = Bytes::from_static(
            br#"{"model":"alias","stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
        );
        let i = inspect(&b).unwrap();
        let v = json(&upstream_body(b, &i, Some("org/real"), true).unwrap());
        assert_eq!(v["model"], "org/real");
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
    }
}
