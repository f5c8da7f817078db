//! HTTP/1.1 wire pieces shared by the upstream client (`upstream::h1`) and
//! the client-facing server (`listener::h1`): the chunked decoder, header
//! fields sliced out of a head's bytes, list-valued headers and body
//! lengths, and reads that hold no buffer while they wait.

use std::{
    io,
    mem::MaybeUninit,
    ops::Range,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, ReadBuf};

/// Longest chunk-size line (with extensions) and total trailer section.
pub const MAX_CHUNK_LINE: u32 = 4096;
pub const MAX_TRAILERS: u32 = 16 * 1024;
/// Bytes read from a socket at a time, into a buffer on the stack.
pub const READ_CHUNK: usize = 16 * 1024;

/// `io`, or `None` if `timer` fires first. The timer is polled (and so
/// registered) only while `io` is pending: a connection's one timer, moved
/// forward per request, costs a store where one per request cost a
/// registration and a removal.
pub async fn before<F: std::future::Future>(
    mut timer: Pin<&mut tokio::time::Sleep>,
    io: F,
) -> Option<F::Output> {
    let mut io = std::pin::pin!(io);
    std::future::poll_fn(|cx| match io.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => std::future::Future::poll(timer.as_mut(), cx).map(|()| None),
    })
    .await
}

/// Reads at most `cap` bytes (and at most `READ_CHUNK`) into a buffer on
/// the stack and hands what arrived to `got`; an empty slice is the end of
/// the stream. A connection waiting here holds no heap buffer.
pub fn poll_read_with<R, T>(
    r: &mut R,
    cx: &mut Context<'_>,
    cap: usize,
    got: impl FnOnce(&[u8]) -> T,
) -> Poll<io::Result<T>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut raw = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut rb = ReadBuf::uninit(&mut raw[..cap.min(READ_CHUNK)]);
    match Pin::new(r).poll_read(cx, &mut rb) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Ready(Ok(())) => Poll::Ready(Ok(got(rb.filled()))),
    }
}

/// The non-empty comma-separated elements of every `name` header.
pub fn tokens(h: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    h.get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// `h.get(name)`, found by a look along the fields when there are few: a
/// compare each (a tag and a byte for a standard name, a length and the
/// bytes for another), where `get` hashes the name and probes (100-180
/// instructions, most for a name that is not a standard one).
pub fn find<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if h.len() > 16 {
        return h.get(name);
    }
    h.iter().find_map(|(k, v)| (k == name).then_some(v))
}

/// Whether a `Connection` header lists `token`.
pub fn connection_has(h: &HeaderMap, token: &[u8]) -> bool {
    tokens(h, header::CONNECTION).any(|t| t.eq_ignore_ascii_case(token))
}

/// The `Content-Length`, if any: every value must be the same run of digits.
pub fn content_length(h: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let all = h.get_all(header::CONTENT_LENGTH);
    let mut values = all.iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    // The common case, one field of one number, without the general
    // path's splitting (a third of the cost of a call).
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return digits(first.as_bytes().trim_ascii())
            .map(Some)
            .ok_or("bad content-length");
    }
    let mut len = None;
    // Every element must be digits: an empty value or element (`""`,
    // `"5,"`) is invalid, not absent (RFC 9112 section 6.3).
    for t in all.iter().flat_map(|v| v.as_bytes().split(|&b| b == b',')) {
        let n = digits(t.trim_ascii()).ok_or("bad content-length")?;
        if len.is_some_and(|l| l != n) {
            return Err("conflicting content-length values");
        }
        len = Some(n);
    }
    Ok(len)
}

/// Lowercase hex digits by value, for the hand-written numbers and escapes.
pub const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `n` in decimal, in the tail of `buf` (no `fmt` machinery).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A non-empty run of ASCII digits as a number; `None` for anything else,
/// or for a number above `u64::MAX`.
fn digits(t: &[u8]) -> Option<u64> {
    if t.is_empty() {
        return None;
    }
    t.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Where each header's name and value lie in a head's bytes, so the values
/// can share those bytes instead of being copied; made only by [`fields`]
/// from what httparse accepted. Positions are `u32` (a head is far smaller)
/// so that the list, which moves with the parsed head, stays small.
pub struct Fields(smallvec::SmallVec<[(Span, Span); 16]>);

/// A range of a head's bytes.
#[derive(Clone, Copy)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// The positions of `headers`, which httparse found inside `buf`.
pub(crate) fn fields(buf: &[u8], headers: &[httparse::Header<'_>]) -> Fields {
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        let at = |i: usize| u32::try_from(i).expect("a request or response head is under 4 GiB");
        Span {
            start: at(start),
            end: at(start + s.len()),
        }
    };
    Fields(
        headers
            .iter()
            .map(|h| (range(h.name.as_bytes()), range(h.value)))
            .collect(),
    )
}

/// Adds the headers at `fields` in `head` to `h`. The values are not
/// checked again: httparse, with obsolete line folding refused as it is by
/// default, accepts a field value by the rule `HeaderValue` checks (HTAB,
/// SP to `~`, 0x80-0xFF; a test holds the two equal for every byte), and
/// checking each byte again cost ~150 instructions per field. hyper's
/// HTTP/1.1 reader relies on the same.
///
/// # Safety
///
/// `head` must hold the bytes httparse parsed, with its default
/// configuration, into the headers `fields` was made from (those bytes, or
/// a copy of them), unchanged: what it accepted as values is then what
/// `head` holds at their ranges.
///
/// Returns what it noted of the fields that frame the message or steer its
/// connection (see [`Noted`]).
pub(crate) unsafe fn fill_headers(
    h: &mut HeaderMap,
    head: &Bytes,
    fields: &Fields,
) -> Result<Noted, &'static str> {
    h.reserve(fields.0.len());
    let mut noted = Noted::default();
    for &(n, v) in &fields.0 {
        let name = HeaderName::from_bytes(&head[n.range()]).map_err(|_| "bad header name")?;
        let raw = &head[v.range()];
        noted.note(&name, raw);
        // SAFETY: httparse accepted these bytes as a field value (the
        // caller's promise), and those are valid `HeaderValue` bytes.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(v.range())) };
        h.append(name, value);
    }
    Ok(noted)
}

/// What [`fill_headers`] noted, as it added a head's fields, of those that
/// frame the message or steer its connection. A typical head has none of
/// them but one `Content-Length` of plain digits, and then the questions
/// below are answered without a lookup in the map (each lookup hashes the
/// name and probes, ~100-230 instructions, and a request asked six).
///
/// Valid only for the map as `fill_headers` left it (or for the map whose
/// every field was passed to [`Noted::note`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Noted {
    /// [`Noted::CONNECTION`], [`Noted::TRANSFER_ENCODING`] and
    /// [`Noted::EXPECT`], for the fields present.
    seen: u8,
    length: NotedLength,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum NotedLength {
    #[default]
    Absent,
    /// One `Content-Length` field, this number and nothing else.
    Plain(u64),
    /// Anything else (more fields, a list, not a number): the map decides.
    Other,
}

impl Noted {
    const CONNECTION: u8 = 1;
    const TRANSFER_ENCODING: u8 = 2;
    const EXPECT: u8 = 4;

    /// Notes one field, in the head's order.
    pub fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::CONTENT_LENGTH {
            self.length = match (self.length, digits(value.trim_ascii())) {
                (NotedLength::Absent, Some(n)) => NotedLength::Plain(n),
                _ => NotedLength::Other,
            };
        } else if *name == header::CONNECTION {
            self.seen |= Self::CONNECTION;
        } else if *name == header::TRANSFER_ENCODING {
            self.seen |= Self::TRANSFER_ENCODING;
        } else if *name == header::EXPECT {
            self.seen |= Self::EXPECT;
        }
    }

    /// Whether there is a `Transfer-Encoding` field.
    pub fn transfer_encoding(self) -> bool {
        self.seen & Self::TRANSFER_ENCODING != 0
    }

    /// Whether there is an `Expect` field.
    pub fn expect(self) -> bool {
        self.seen & Self::EXPECT != 0
    }

    /// Whether there is a `Content-Length` field.
    pub fn has_content_length(self) -> bool {
        self.length != NotedLength::Absent
    }

    /// [`content_length`] of `h`, the map these notes were taken of.
    pub fn content_length(self, h: &HeaderMap) -> Result<Option<u64>, &'static str> {
        match self.length {
            NotedLength::Absent => Ok(None),
            NotedLength::Plain(n) => Ok(Some(n)),
            NotedLength::Other => content_length(h),
        }
    }

    /// [`connection_has`] of `h`, the map these notes were taken of.
    pub fn connection_has(self, h: &HeaderMap, token: &[u8]) -> bool {
        self.seen & Self::CONNECTION != 0 && connection_has(h, token)
    }
}

/// Incremental decoder of the chunked transfer coding (RFC 9112 section
/// 7.1): fed any split of the bytes, it hands out the same data. Chunk
/// extensions and trailer fields are read and dropped.
///
/// The default is lenient, for what backends send (a bare LF ends a line).
/// [`Chunked::strict`] is for what clients send: the grammar as written,
/// as hyper reads it, so that no proxy in front of the gateway can frame
/// a request's body one way and the gateway another.
#[derive(Default)]
pub struct Chunked {
    state: ChunkState,
    /// Chunk size being read, or data bytes left in the current chunk.
    size: u64,
    /// Bytes of the current size line or of the trailer section so far.
    seen: u32,
    strict: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkState {
    /// Hex digits of a chunk size (`seen` counts them).
    #[default]
    Size,
    /// Strict only: whitespace after the size, before `;` or the line end.
    SizeWs,
    /// After the size: extensions up to the line end.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final blank line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// Strict only: a trailer line's CR seen, its LF next.
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// A decoder for request bodies: no bare LF line ends, nothing but `;`
    /// extensions after a size, no control bytes in extensions or trailers.
    pub fn strict() -> Chunked {
        Chunked {
            strict: true,
            ..Chunked::default()
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feeds `input`, passing each run of data to `data`; returns how many
    /// bytes were used (fewer than given only once the body has ended).
    pub fn decode(
        &mut self,
        input: &[u8],
        data: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.size >> 56 != 0 || self.seen >= MAX_CHUNK_LINE {
                            return Err("chunk size too large");
                        }
                        self.size = self.size << 4 | (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.seen += 1;
                    }
                    _ if self.seen == 0 => return Err("chunk size expected"),
                    b' ' | b'\t' if self.strict => self.state = SizeWs,
                    b';' | b' ' | b'\t' => self.state = Ext,
                    b'\r' => self.state = SizeLf,
                    b'\n' if !self.strict => self.end_size_line(),
                    _ => return Err("bad chunk size"),
                },
                SizeWs => match b {
                    b' ' | b'\t' => {
                        self.seen += 1;
                        if self.seen > MAX_CHUNK_LINE {
                            return Err("chunk size line too long");
                        }
                    }
                    b';' => self.state = Ext,
                    b'\r' => self.state = SizeLf,
                    _ => return Err("bad chunk size"),
                },
                Ext => {
                    self.seen += 1;
                    if self.seen > MAX_CHUNK_LINE {
                        return Err("chunk extension too long");
                    }
                    match b {
                        b'\r' => self.state = SizeLf,
                        b'\n' if !self.strict => self.end_size_line(),
                        _ if self.strict && is_control(b) => {
                            return Err("control byte in a chunk extension")
                        }
                        _ => {}
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err("bad chunk size line end");
                    }
                    self.end_size_line();
                }
                Data => {
                    let n = (self.size.min((input.len() - i) as u64)) as usize;
                    data(&input[i..i + n]);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => match b {
                    b'\r' => self.state = DataLf,
                    b'\n' if !self.strict => self.state = Size,
                    _ => return Err("missing CRLF after chunk data"),
                },
                DataLf => {
                    if b != b'\n' {
                        return Err("missing CRLF after chunk data");
                    }
                    self.state = Size;
                }
                TrailerStart | Trailer | TrailerLf => {
                    self.seen += 1;
                    if self.seen > MAX_TRAILERS {
                        return Err("trailer section too long");
                    }
                    self.state = match (self.state, b) {
                        (TrailerLf, b'\n') => TrailerStart,
                        (TrailerLf, _) => return Err("bad trailer line end"),
                        (TrailerStart, b'\r') => EndLf,
                        (_, b'\r') if self.strict => TrailerLf,
                        (_, b'\n') if self.strict => return Err("bad trailer line end"),
                        (_, b) if self.strict && is_control(b) => {
                            return Err("control byte in a trailer")
                        }
                        (TrailerStart, b'\n') => Done,
                        (_, b'\n') => TrailerStart,
                        _ => Trailer,
                    };
                    if self.state == Done {
                        return Ok(i + 1);
                    }
                }
                EndLf => {
                    if b != b'\n' {
                        return Err("bad end of chunked body");
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
                Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.seen = 0;
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }
}

/// A control byte other than HTAB (RFC 9110 field values and chunk
/// extensions hold none).
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    /// What `fill_headers`' unchecked values rest on: httparse, as the
    /// gateway configures it, accepts a byte in a field value exactly when
    /// `HeaderValue` does, for every byte. (Guards a dependency upgrade.)
    #[test]
    fn httparse_accepts_the_field_value_bytes_header_value_accepts() {
        // A short value (httparse's byte loop) and the byte deep inside a
        // long one (its SWAR and SIMD loops).
        for pad in [0usize, 70] {
            for b in 0..=255u8 {
                let mut value = vec![b'v'; pad + 1];
                value.push(b);
                value.extend(std::iter::repeat_n(b'v', pad + 1));
                let theirs = HeaderValue::from_bytes(&value).is_ok();
                for start in [&b"GET / HTTP/1.1\r\n"[..], b"HTTP/1.1 200 OK\r\n"] {
                    let mut head = start.to_vec();
                    head.extend_from_slice(b"x-a: ");
                    head.extend_from_slice(&value);
                    head.extend_from_slice(b"\r\n\r\n");
                    let mut slots = [httparse::EMPTY_HEADER; 4];
                    let parsed = if start.starts_with(b"GET") {
                        httparse::Request::new(&mut slots).parse(&head)
                    } else {
                        httparse::Response::new(&mut slots).parse(&head)
                    };
                    let ours = matches!(parsed, Ok(httparse::Status::Complete(_)));
                    assert_eq!(ours, theirs, "byte {b:#04x} after {pad} bytes: {parsed:?}");
                }
            }
        }
        // No obsolete line folding: a continuation line is refused.
        let mut slots = [httparse::EMPTY_HEADER; 4];
        assert!(httparse::Response::new(&mut slots)
            .parse(b"HTTP/1.1 200 OK\r\nx-a: v\r\n w\r\n\r\n")
            .is_err());
    }

    /// The head httparse read, or a copy of it, fills the same map.
    #[test]
    fn fill_headers_from_the_parsed_bytes_or_a_copy() {
        let raw: &[u8] =
            b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k\r\nx-b: 1\r\nx-b: 2\r\n\r\n";
        let head = Bytes::from_static(raw);
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(&head).unwrap().is_complete());
        let (same, copy) = (fields(&head, req.headers), fields(&head, req.headers));
        let mut shared = HeaderMap::new();
        // SAFETY: `head` is what httparse just parsed.
        unsafe { fill_headers(&mut shared, &head, &same) }.unwrap();
        let mut copied = HeaderMap::new();
        // SAFETY: a copy of what httparse just parsed.
        unsafe { fill_headers(&mut copied, &Bytes::copy_from_slice(raw), &copy) }.unwrap();
        assert_eq!(shared, copied);
        assert_eq!(shared["authorization"], "Bearer k");
        assert_eq!(shared.get_all("x-b").iter().count(), 2);
    }

    /// What `fill_headers` notes answers as the lookups in the map do, for
    /// heads with and without each field, in plain and unusual forms.
    #[test]
    fn notes_agree_with_the_map() {
        let cases = [
            "",
            "Content-Length: 12\r\n",
            "content-length:  7 \r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: x\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n",
            "Connection: close\r\n",
            "Connection: Keep-Alive, x-a\r\nx-a: 1\r\n",
            "connection: upgrade\r\nConnection: CLOSE\r\n",
            "Expect: 100-continue\r\n",
            "x-content-length: 5\r\nx-connection: close\r\n",
        ];
        for f in cases {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\n{f}\r\n");
            let head = Bytes::from(raw);
            let mut slots = [httparse::EMPTY_HEADER; 8];
            let mut req = httparse::Request::new(&mut slots);
            assert!(req.parse(&head).unwrap().is_complete(), "{f:?}");
            let parsed = fields(&head, req.headers);
            let mut h = HeaderMap::new();
            // SAFETY: `head` is what httparse just parsed.
            let noted = unsafe { fill_headers(&mut h, &head, &parsed) }.unwrap();
            assert_eq!(noted.content_length(&h), content_length(&h), "{f:?}");
            assert_eq!(
                noted.has_content_length(),
                h.contains_key(header::CONTENT_LENGTH),
                "{f:?}"
            );
            assert_eq!(
                noted.transfer_encoding(),
                h.contains_key(header::TRANSFER_ENCODING),
                "{f:?}"
            );
            assert_eq!(noted.expect(), h.contains_key(header::EXPECT), "{f:?}");
            for token in [&b"close"[..], b"keep-alive", b"upgrade", b"x-a"] {
                assert_eq!(
                    noted.connection_has(&h, token),
                    connection_has(&h, token),
                    "{f:?}"
                );
            }
            let mut again = Noted::default();
            for (n, v) in &h {
                again.note(n, v.as_bytes());
            }
            assert_eq!(again, noted, "{f:?}");
        }
    }

    fn lengths(values: &[&'static str]) -> Result<Option<u64>, &'static str> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                header::CONTENT_LENGTH,
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        content_length(&h)
    }

    #[test]
    fn decimals_round_trip() {
        let mut b = [0u8; 20];
        for n in [0, 7, 10, 4096, u64::MAX] {
            assert_eq!(decimal(n, &mut b), n.to_string().as_bytes());
            assert_eq!(digits(decimal(n, &mut b)), Some(n));
        }
    }

    #[test]
    fn content_lengths() {
        assert_eq!(lengths(&[]), Ok(None));
        assert_eq!(lengths(&["0"]), Ok(Some(0)));
        assert_eq!(lengths(&["42"]), Ok(Some(42)));
        assert_eq!(lengths(&["42, 42", "42"]), Ok(Some(42)));
        assert_eq!(lengths(&["7", "7"]), Ok(Some(7)));
        assert_eq!(lengths(&[" 7\t"]), Ok(Some(7)), "whitespace around it");
        assert_eq!(
            lengths(&["18446744073709551615"]),
            Ok(Some(u64::MAX)),
            "the largest u64"
        );
        for bad in [
            "18446744073709551616",
            "+1",
            "-1",
            "1 2",
            "0x10",
            "1.0",
            "٣",
            "",
            " ",
            "5,",
            ",5",
            "5,,5",
        ] {
            assert_eq!(lengths(&[bad]), Err("bad content-length"), "{bad:?}");
        }
        assert_eq!(
            lengths(&["1", "2"]),
            Err("conflicting content-length values")
        );
    }
}
