//! `multipart/form-data` request bodies, as the audio endpoints take them
//! (`/v1/audio/transcriptions`, `/v1/audio/translations`): the fields
//! routing needs are found by walking the parts' boundaries, without
//! copying the audio file, and the `model` field is rewritten in place when
//! the backend knows the model by another name.
//!
//! The gateway must read the `model` the backend will read: a key's model
//! restriction is checked against it. So the walk follows python-multipart
//! (under FastAPI, what vLLM reads forms with) where RFC 7578 / RFC 2046
//! leave room, and refuses what the two could read differently: a second
//! boundary parameter, a preamble, padding after a boundary, a lone CR or
//! LF in a part's headers, a second Content-Disposition or field name,
//! parameters Python's `email.message` splits otherwise (RFC 2231 `name*`
//! and continuations, escapes, stray quotes), a second `model` field.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::request::{lax_bool_text, Media, RequestInfo};
use crate::error::ProxyError;

/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;
/// Largest header block of one part (its Content-Disposition and
/// Content-Type); Starlette's limit is the same order.
const MAX_PART_HEADERS: usize = 16 * 1024;

/// What a form tells the gateway: the request's routing fields, and where
/// the `model` value sits in the body (to rename it).
#[derive(Debug, PartialEq, Eq)]
pub struct Form {
    pub info: RequestInfo,
    model_at: Range<usize>,
}

fn bad(why: &str) -> ProxyError {
    ProxyError::InvalidForm(why.to_owned())
}

/// The boundary of a `multipart/form-data` content type, if it is one.
fn boundary(content_type: &[u8]) -> Result<&[u8], ProxyError> {
    let ct = std::str::from_utf8(content_type).map_err(|_| bad("Content-Type is not text"))?;
    let (kind, params) = ct.split_once(';').unwrap_or((ct, ""));
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return Err(bad("this endpoint takes multipart/form-data"));
    }
    check_params(params.as_bytes())?;
    let mut found =
        params_of(params.as_bytes()).filter(|(k, _)| k.eq_ignore_ascii_case(b"boundary"));
    let b = found
        .next()
        .map(|(_, v)| v)
        .ok_or_else(|| bad("Content-Type has no boundary"))?;
    if found.next().is_some() {
        return Err(bad("Content-Type gives the boundary twice"));
    }
    if b.is_empty() || b.len() > MAX_BOUNDARY {
        return Err(bad("the boundary must be 1 to 70 characters"));
    }
    // No escapes to unescape (readers differ on them), no quote left in.
    if !b.iter().all(|c| is_bchar(*c)) || b.ends_with(b" ") {
        return Err(bad("the boundary has characters RFC 2046 does not allow"));
    }
    Ok(b)
}

/// A character RFC 2046 allows in a boundary (a space, but not last).
fn is_bchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c)
}

/// Reads the `model` and `stream` fields of a form body sent with
/// `content_type`, and counts its files as media for the token estimate.
pub fn inspect(body: &[u8], content_type: Option<&[u8]>) -> Result<Form, ProxyError> {
    let boundary = boundary(content_type.ok_or_else(|| bad("no Content-Type"))?)?;
    let mut delim = Vec::with_capacity(boundary.len() + 4);
    delim.extend_from_slice(b"\r\n--");
    delim.extend_from_slice(boundary);
    let finder = memchr::memmem::Finder::new(&delim);
    // The first delimiter opens the body, after line ends at most: no
    // preamble, which python-multipart does not skip either.
    let lead = body
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    if !body[lead..].starts_with(&delim[2..]) {
        return Err(bad("the body does not start with the boundary"));
    }
    let mut at = lead + delim.len() - 2;
    let mut model: Option<Range<usize>> = None;
    let mut stream = None;
    let mut media = Media::default();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            break; // the closing delimiter; anything after is epilogue
        }
        // No transport padding: python-multipart reads a boundary with
        // spaces after it as content.
        if !rest.starts_with(b"\r\n") {
            return Err(bad("a boundary is not followed by a line end"));
        }
        let head_start = at + 2;
        let head_len = if body[head_start..].starts_with(b"\r\n") {
            0
        } else {
            let window = &body[head_start..body.len().min(head_start + MAX_PART_HEADERS)];
            memchr::memmem::find(window, b"\r\n\r\n")
                .map(|i| i + 2)
                .ok_or_else(|| bad("a part's headers do not end"))?
        };
        let content_start = head_start + head_len + 2;
        let content_end = next_delimiter(body, content_start, &finder, delim.len())
            .ok_or_else(|| bad("the form is not closed by its boundary"))?;
        let (name, file) = disposition(&body[head_start..head_start + head_len])?;
        let value = content_start..content_end;
        if file {
            media.count = media.count.saturating_add(1);
            media.bytes += value.len();
        } else if name == b"model" {
            if model.replace(value).is_some() {
                return Err(bad("the \"model\" field is given twice"));
            }
        } else if name == b"stream" {
            let text = std::str::from_utf8(&body[value]).unwrap_or_default();
            stream = Some(
                lax_bool_text(text.trim())
                    .ok_or_else(|| bad("the \"stream\" field is not a boolean"))?,
            );
        }
        at = content_end + delim.len();
    }
    let model_at = model.ok_or_else(|| bad("no \"model\" field"))?;
    let name = std::str::from_utf8(&body[model_at.clone()])
        .map_err(|_| bad("the \"model\" field is not UTF-8"))?;
    if name.is_empty() {
        return Err(bad("the \"model\" field is empty"));
    }
    Ok(Form {
        info: RequestInfo {
            model: name.to_owned(),
            stream: stream.unwrap_or(false),
            include_usage: None,
            max_tokens: None,
            media,
        },
        model_at,
    })
}

/// Where the next delimiter at or after `from` starts: the boundary's line,
/// followed by `--` (the close) or a line end. The same bytes followed by
/// anything else, transport padding included, are content, as
/// python-multipart reads them.
fn next_delimiter(
    body: &[u8],
    mut from: usize,
    finder: &memchr::memmem::Finder,
    len: usize,
) -> Option<usize> {
    loop {
        let at = from + finder.find(&body[from..])?;
        let after = &body[at + len..];
        if after.starts_with(b"--") || after.starts_with(b"\r\n") {
            return Some(at);
        }
        from = at + 1;
    }
}

/// The body to send upstream: `model` renamed to `rename_to` when that
/// differs, the rest (the audio) as it came.
pub fn upstream_body(body: Bytes, form: &Form, rename_to: Option<&str>) -> Bytes {
    let Some(to) = rename_to.filter(|m| *m != form.info.model) else {
        return body;
    };
    let r = &form.model_at;
    let mut out = BytesMut::with_capacity(body.len() - r.len() + to.len());
    out.extend_from_slice(&body[..r.start]);
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&body[r.end..]);
    out.freeze()
}

/// The field name of a part's headers (`head`: its lines, each ending in
/// CRLF), and whether the part is a file.
fn disposition(head: &[u8]) -> Result<(&[u8], bool), ProxyError> {
    let mut found = None;
    let mut rest = head;
    while !rest.is_empty() {
        let end = memchr::memmem::find(rest, b"\r\n").unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 2..).unwrap_or_default();
        if memchr::memchr2(b'\r', b'\n', line).is_some() {
            return Err(bad("a part's header has a lone CR or LF"));
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"content-disposition")
        {
            continue;
        }
        if found.is_some() {
            return Err(bad("a part has two Content-Disposition headers"));
        }
        let v = &line[colon + 1..];
        let (kind, params) = match v.iter().position(|b| *b == b';') {
            Some(i) => (&v[..i], &v[i + 1..]),
            None => (v, &[][..]),
        };
        if !kind.trim_ascii().eq_ignore_ascii_case(b"form-data") {
            return Err(bad("a part is not form-data"));
        }
        check_params(params)?;
        let mut name = None;
        let mut file = false;
        for (k, v) in params_of(params) {
            if k.eq_ignore_ascii_case(b"name") {
                if name.replace(v).is_some() {
                    return Err(bad("a part's Content-Disposition names it twice"));
                }
            } else if k.eq_ignore_ascii_case(b"filename") {
                file = true;
            }
        }
        let name = name.ok_or_else(|| bad("a part's Content-Disposition has no name"))?;
        found = Some((name, file));
    }
    found.ok_or_else(|| bad("a part has no Content-Disposition"))
}

/// Refuses header parameters that Python's `email.message` (which
/// python-multipart reads them with) could split or name otherwise than
/// [`params_of`]: a `*` in a name (RFC 2231 `name*`, `name*0`
/// continuations, which Python merges into `name`), a backslash in a
/// quoted value (an escaped quote to Python, not to a reader that takes it
/// as escaping the backslash), a quote inside an unquoted value, text after
/// a quoted value, or a quote left open.
fn check_params(mut s: &[u8]) -> Result<(), ProxyError> {
    let odd = || bad("a form header has parameters its readers could split differently");
    loop {
        s = s.trim_ascii_start();
        if s.is_empty() {
            return Ok(());
        }
        let key_end = s
            .iter()
            .position(|b| *b == b'=' || *b == b';')
            .unwrap_or(s.len());
        if s[..key_end]
            .iter()
            .any(|b| matches!(b, b'*' | b'"' | b'\\'))
        {
            return Err(odd());
        }
        if s.get(key_end) != Some(&b'=') {
            s = s.get(key_end + 1..).unwrap_or_default();
            continue;
        }
        let v = s[key_end + 1..].trim_ascii_start();
        let rest = if let Some(q) = v.strip_prefix(b"\"") {
            let close = q.iter().position(|b| *b == b'"').ok_or_else(odd)?;
            if q[..close].contains(&b'\\') {
                return Err(odd());
            }
            let after = q[close + 1..].trim_ascii_start();
            if !after.is_empty() && after[0] != b';' {
                return Err(odd());
            }
            after
        } else {
            let end = v.iter().position(|b| *b == b';').unwrap_or(v.len());
            if v[..end].iter().any(|b| matches!(b, b'"' | b'\\')) {
                return Err(odd());
            }
            &v[end..]
        };
        s = rest.strip_prefix(b";").unwrap_or(rest);
    }
}

/// The `key=value` parameters after a header's first `;`, values unquoted
/// (a quoted value's `\"` stays as it is: names the gateway looks for have
/// none).
fn params_of(mut s: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    std::iter::from_fn(move || loop {
        s = s.trim_ascii_start();
        if s.is_empty() {
            return None;
        }
        let key_end = s
            .iter()
            .position(|b| *b == b'=' || *b == b';')
            .unwrap_or(s.len());
        let key = s[..key_end].trim_ascii();
        if s.get(key_end) != Some(&b'=') {
            // A parameter without a value: skipped.
            s = s.get(key_end + 1..).unwrap_or_default();
            continue;
        }
        let v = s[key_end + 1..].trim_ascii_start();
        let (value, rest) = if let Some(q) = v.strip_prefix(b"\"") {
            // To the closing quote not escaped.
            let mut i = 0;
            while i < q.len() && q[i] != b'"' {
                i += if q[i] == b'\\' { 2 } else { 1 };
            }
            let i = i.min(q.len());
            let after = q.get(i + 1..).unwrap_or_default();
            let after = match after.iter().position(|b| *b == b';') {
                Some(j) => &after[j + 1..],
                None => &[][..],
            };
            (&q[..i], after)
        } else {
            match v.iter().position(|b| *b == b';') {
                Some(j) => (v[..j].trim_ascii_end(), &v[j + 1..]),
                None => (v.trim_ascii_end(), &[][..]),
            }
        };
        s = rest;
        return Some((key, value));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &[u8] = b"multipart/form-data; boundary=XyZ";

    /// A form as the OpenAI SDK (httpx) sends it.
    fn form(fields: &[(&str, &str)], file: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in fields {
            b.extend_from_slice(
                format!("--XyZ\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                    .as_bytes(),
            );
        }
        b.extend_from_slice(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n",
        );
        b.extend_from_slice(file);
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    }

    #[test]
    fn finds_model_stream_and_files() {
        // The audio holds what looks like a field and a near-boundary.
        let audio = b"RIFF\r\n--Xy\r\nname=\"model\"\r\n\r\n--XyZ-\r\n--XyZabc\r\nfake\x00\xff";
        let body = form(&[("model", "whisper"), ("stream", "true")], audio);
        let f = inspect(&body, Some(CT)).unwrap();
        assert_eq!(f.info.model, "whisper");
        assert!(f.info.stream);
        assert_eq!(
            f.info.media,
            Media {
                count: 1,
                bytes: audio.len()
            }
        );
        let f = inspect(&form(&[("model", "whisper")], b""), Some(CT)).unwrap();
        assert!(!f.info.stream);
    }

    #[test]
    fn quoted_boundary_and_leading_line_ends() {
        let body =
            b"\r\n--a:b c\r\ncontent-disposition: form-data; name=model\r\n\r\nm\r\n--a:b c--";
        let f = inspect(
            body,
            Some(b"Multipart/Form-Data; charset=x; boundary=\"a:b c\""),
        )
        .unwrap();
        assert_eq!(f.info.model, "m");
    }

    /// Forms that the gateway and python-multipart (vLLM's reader) could
    /// read differently are refused: the model the key is checked against
    /// must be the model the backend serves.
    #[test]
    fn ambiguous_forms_are_refused() {
        let why = |body: &[u8], ct: &[u8]| match inspect(body, Some(ct)) {
            Err(ProxyError::InvalidForm(w)) => w,
            other => panic!("{other:?}"),
        };
        let part = |headers: &str, value: &str| format!("--XyZ\r\n{headers}\r\n\r\n{value}\r\n");
        let cd = |params: &str| format!("Content-Disposition: form-data; {params}");
        let close = "--XyZ--\r\n";
        let model_form = String::from_utf8(form(&[("model", "m")], b"")).unwrap();
        let cases: Vec<(String, &[u8], &str)> = vec![
            // Which boundary: the first here, the last in Python.
            (
                model_form.clone(),
                b"multipart/form-data; boundary=XyZ; boundary=Q",
                "twice",
            ),
            (
                model_form.clone(),
                b"multipart/form-data; boundary=\"X\\yZ\"",
                "split differently",
            ),
            // A preamble, which Python does not skip.
            (format!("junk\r\n{model_form}"), CT, "does not start"),
            // Padding after a boundary: content to Python.
            (
                format!("--XyZ \r\n{}\r\n\r\nm\r\n{close}", cd("name=\"model\"")),
                CT,
                "line end",
            ),
            // Two dispositions in one part: the last counts in Python.
            (
                format!(
                    "{}{close}",
                    part(
                        &format!("{}\r\n{}", cd("name=\"x\""), cd("name=\"model\"")),
                        "m"
                    )
                ),
                CT,
                "two Content-Disposition",
            ),
            // A second name, an RFC 2231 name.
            (
                format!("{}{close}", part(&cd("name=\"x\"; name=\"model\""), "m")),
                CT,
                "twice",
            ),
            (
                format!(
                    "{}{close}",
                    part(&cd("name=\"x\"; name*=utf-8''model"), "m")
                ),
                CT,
                "split differently",
            ),
            // Parameters Python splits otherwise: an escaped backslash before
            // a closing quote, a quote in an unquoted value, RFC 2231
            // continuations.
            (
                format!(
                    "{}{close}",
                    part(&cd(r#"a="\\"; name="x"; b="; name="model""#), "m")
                ),
                CT,
                "split differently",
            ),
            (
                format!(
                    "{}{close}",
                    part(&cd(r#"a=b"; name="x"; c="; name="model""#), "m")
                ),
                CT,
                "split differently",
            ),
            (
                format!("{}{close}", part(&cd(r#"name="x"; name*0="model""#), "m")),
                CT,
                "split differently",
            ),
            (
                format!(
                    "{}{close}",
                    part(&cd(r#"name="model"; filename*0="a.wav""#), "m")
                ),
                CT,
                "split differently",
            ),
            // A lone LF inside the headers: one line to Python, two here.
            (
                format!(
                    "{}{close}",
                    part(&format!("X: a\n{}", cd("name=\"model\"")), "m")
                ),
                CT,
                "lone CR or LF",
            ),
        ];
        for (body, ct, says) in cases {
            let w = why(body.as_bytes(), ct);
            assert!(w.contains(says), "{body:?}: {w}");
        }
    }

    #[test]
    fn renames_the_model_in_place() {
        let body = Bytes::from(form(&[("model", "alias"), ("language", "en")], b"\x01\x02"));
        let f = inspect(&body, Some(CT)).unwrap();
        let out = upstream_body(body.clone(), &f, Some("openai/whisper-large-v3"));
        let g = inspect(&out, Some(CT)).unwrap();
        assert_eq!(g.info.model, "openai/whisper-large-v3");
        assert_eq!(g.info.media, f.info.media);
        assert_eq!(out.len(), body.len() - 5 + 23);
        // The same name: the body is passed as it came.
        assert_eq!(upstream_body(body.clone(), &f, Some("alias")), body);
        assert_eq!(upstream_body(body.clone(), &f, None), body);
    }

    #[test]
    fn refusals_say_why() {
        let why = |body: &[u8], ct: Option<&[u8]>| match inspect(body, ct) {
            Err(ProxyError::InvalidForm(w)) => w,
            other => panic!("{other:?}"),
        };
        let ok = form(&[("model", "m")], b"x");
        assert!(why(&ok, None).contains("no Content-Type"));
        assert!(why(&ok, Some(b"application/json")).contains("multipart/form-data"));
        assert!(why(&ok, Some(b"multipart/form-data")).contains("no boundary"));
        assert!(why(&ok, Some(b"multipart/form-data; boundary=other")).contains("boundary"));
        assert!(why(&form(&[], b"x"), Some(CT)).contains("no \"model\""));
        assert!(why(&form(&[("model", "")], b"x"), Some(CT)).contains("empty"));
        assert!(why(&form(&[("model", "a"), ("model", "b")], b"x"), Some(CT)).contains("twice"));
        assert!(
            why(&form(&[("model", "a"), ("stream", "maybe")], b""), Some(CT)).contains("stream")
        );
        // Cut before its closing boundary.
        assert!(why(&ok[..ok.len() - 12], Some(CT)).contains("not closed"));
        // A part without a disposition.
        let body = b"--XyZ\r\nContent-Type: text/plain\r\n\r\nm\r\n--XyZ--";
        assert!(why(body, Some(CT)).contains("Content-Disposition"));
        // Headers that never end.
        let mut body = b"--XyZ\r\nX: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', 2 * MAX_PART_HEADERS));
        assert!(why(&body, Some(CT)).contains("headers"));
    }

    #[test]
    fn params() {
        let got: Vec<_> = params_of(br#" name="a\"b;c"; filename=x.wav ;flag; k = v"#).collect();
        assert_eq!(
            got,
            vec![
                (&b"name"[..], &br#"a\"b;c"#[..]),
                (b"filename", b"x.wav"),
                (b"k", b"v")
            ]
        );
    }
}
