//! Forwarding to the chosen backend: the upstream request (hop-by-hop and
//! credential headers removed, request id and client address added), the
//! first-byte timeout, and the client-facing response headers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::Full;

use super::ctx::RequestCtx;
use crate::{
    error::ProxyError,
    upstream::{
        h1::{field, HeadFields},
        Backend, Incoming,
    },
};

/// Headers that describe one connection, not the message (RFC 9110 7.6.1),
/// plus the client's credentials for the gateway, which upstream must never see.
const DROPPED: [HeaderName; 12] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
];

/// `x-request-id`, on requests to upstream and on every response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The header names the `Connection` header lists (hop-by-hop too).
fn connection_listed(from: &HeaderMap) -> Vec<HeaderName> {
    // Usually there is none: a look along the few names present costs a
    // compare each, where a lookup hashes the name and probes (and
    // `http1::find`, which walks the values too, cost 200 more here).
    if from.len() <= 16 && !from.keys().any(|k| k == header::CONNECTION) {
        return Vec::new();
    }
    from.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers (including those the `Connection` header
/// names) and client credentials in place.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed = connection_listed(h);
    // Usually nothing matches: one pass over the few headers present
    // instead of a removal attempt per name in `DROPPED`.
    let found: Vec<HeaderName> = h
        .keys()
        .filter(|k| DROPPED.contains(k) || listed.contains(k))
        .cloned()
        .collect();
    for n in found {
        h.remove(n);
    }
}

/// Copies `from` without hop-by-hop headers (including those the
/// `Connection` header names).
#[cfg(test)]
fn end_to_end(from: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(from);
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if !DROPPED.contains(name) && !listed.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Request headers the gateway sets itself upstream, or drops; the
/// client's values of them are not forwarded. `expect`: the body is read
/// in full, so upstream has nothing to wait for. `accept-encoding`: the
/// gateway reads `usage` from the response and edits SSE streams, so it
/// asks for the body as it is (`identity`). The forwarding headers other
/// than the two the gateway writes would carry whatever the client claims.
const REPLACED: [HeaderName; 10] = [
    header::CONTENT_LENGTH,
    header::EXPECT,
    header::ACCEPT_ENCODING,
    X_REQUEST_ID,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
];

/// The upstream request's headers: the client's end-to-end headers except
/// those in [`REPLACED`], then the gateway's own. Written straight into the
/// request head for HTTP/1.1 backends (no second header map is built per
/// request), or as a `HeaderMap` for hyper's client.
pub struct Forward<'a> {
    client: &'a HeaderMap,
    /// Header names the client's `Connection` header lists (usually none).
    listed: Vec<HeaderName>,
    request_id: &'a str,
    ip: std::net::IpAddr,
    tls: bool,
    body_len: usize,
    /// The backend's own credentials (`api_key`), if it wants some.
    auth: Option<&'a HeaderValue>,
}

impl<'a> Forward<'a> {
    pub fn new(
        client: &'a HeaderMap,
        request_id: &'a str,
        ip: std::net::IpAddr,
        tls: bool,
        body_len: usize,
    ) -> Forward<'a> {
        Forward {
            client,
            listed: connection_listed(client),
            request_id,
            ip,
            tls,
            body_len,
            auth: None,
        }
    }

    /// Sends the backend's own credentials (the client's are never sent).
    pub fn with_auth(mut self, auth: Option<&'a HeaderValue>) -> Forward<'a> {
        self.auth = auth;
        self
    }

    /// A name with `_` is dropped, as nginx drops it by default: a backend
    /// behind a WSGI/CGI-style layer reads `x_forwarded_for` as the
    /// `X-Forwarded-For` the gateway sets, which a client could spoof.
    fn keeps(&self, name: &HeaderName) -> bool {
        !DROPPED.contains(name)
            && !REPLACED.contains(name)
            && !self.listed.contains(name)
            && !name.as_str().as_bytes().contains(&b'_')
    }

    fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Each forwarded header, in order: the client's kept ones, then the
    /// gateway's own. The one list both forms below are made from.
    fn each(&self, mut f: impl FnMut(&HeaderName, &[u8])) {
        for (name, value) in self.client {
            if self.keeps(name) {
                f(name, value.as_bytes());
            }
        }
        let mut digits = [0u8; 20];
        f(
            &header::CONTENT_LENGTH,
            crate::http1::decimal(self.body_len as u64, &mut digits),
        );
        f(&X_REQUEST_ID, self.request_id.as_bytes());
        let mut ip = [0u8; 45];
        let n = ip_text(self.ip, &mut ip);
        f(&X_FORWARDED_FOR, &ip[..n]);
        f(&X_FORWARDED_PROTO, self.proto().as_bytes());
        f(&header::ACCEPT_ENCODING, b"identity");
        if let Some(a) = self.auth {
            f(&header::AUTHORIZATION, a.as_bytes());
        }
    }

    /// The same headers as a map (hyper's client: h2c and https backends).
    pub fn header_map(&self) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(self.client.len() + REPLACED.len());
        self.each(|name, value| {
            out.append(
                name.clone(),
                HeaderValue::from_bytes(value).expect("a valid header value"),
            );
        });
        out
    }
}

impl HeadFields for Forward<'_> {
    fn fields_len(&self) -> usize {
        self.client.fields_len() + self.request_id.len() + 128
    }

    fn write_fields(&self, w: &mut Vec<u8>) {
        self.each(|name, value| field(w, name.as_str().as_bytes(), value));
    }
}

/// Sends the request to `backend`; returns the upstream response head once
/// it arrives within `first_byte` (and before `deadline`, the request's
/// total timeout).
#[allow(clippy::too_many_arguments)]
pub async fn send(
    backend: &Backend,
    path_and_query: &str,
    client_headers: &HeaderMap,
    body: Bytes,
    ctx: &mut RequestCtx,
    tls: bool,
    first_byte: Duration,
    deadline: Instant,
) -> Result<Response<Incoming>, ProxyError> {
    let dispatched = Instant::now();
    ctx.attempt_sent = Some(dispatched);
    if ctx.dispatched.is_none() {
        // Time spent on failed attempts is upstream's, not the gateway's.
        ctx.overhead += dispatched - ctx.start;
        ctx.dispatched = Some(dispatched);
    }
    let headers = Forward::new(
        client_headers,
        &ctx.request_id,
        ctx.client.ip(),
        tls,
        body.len(),
    )
    .with_auth(backend.auth());
    let wait = first_byte.min(deadline.saturating_duration_since(dispatched));
    // From the clock read above: `timeout` would read it again.
    let answer_by = tokio::time::Instant::from_std(dispatched + wait);
    let timed_out = || {
        ProxyError::AnswerTimeout(format!(
            "no response from {} within {wait:?}",
            backend.label
        ))
    };
    let classify = |e: &(dyn std::error::Error + 'static), timeout: bool, connect: bool| {
        let detail = format!("{}: {}", backend.label, error_chain(e));
        if timeout || is_timeout(e) {
            // In the connect phase the request never reached the backend
            // (a fallback model may take it); later it may be running.
            if connect {
                ProxyError::ConnectTimeout(detail)
            } else {
                ProxyError::UpstreamTimeout(detail)
            }
        } else if connect {
            ProxyError::UpstreamConnect(detail)
        } else {
            ProxyError::UpstreamBadResponse(detail)
        }
    };
    if let Some(client) = backend.h1() {
        let path = backend.path(path_and_query);
        // The client bounds the wait with a timer kept per connection.
        return match client
            .send(&ctx.method, &path, &headers, body, answer_by)
            .await
        {
            Ok(resp) => Ok(resp.map(Incoming::H1)),
            Err(e) if e.is_answer_timeout() => Err(timed_out()),
            Err(e) => Err(classify(
                &e,
                e.is_timeout(),
                e.is_connect() || e.is_connect_timeout(),
            )),
        };
    }
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = ctx.method.clone();
    *req.uri_mut() = backend.uri(path_and_query);
    *req.headers_mut() = headers.header_map();
    match tokio::time::timeout_at(answer_by, backend.client().request(req)).await {
        Err(_) => Err(timed_out()),
        // hyper's client hands a 101 back as the answer; the gateway's
        // requests never ask to switch protocols, so it is none.
        Ok(Ok(resp)) if resp.status().is_informational() => {
            Err(ProxyError::UpstreamBadResponse(format!(
                "{} answered {} as a final response",
                backend.label,
                resp.status()
            )))
        }
        Ok(Ok(mut resp)) => {
            // With Transfer-Encoding the length does not apply (RFC 9112
            // section 6.3), and hyper leaves it in: the client would be
            // told a length its body does not have. (The own HTTP/1.1
            // client removes it when it reads the head.)
            if resp.headers().contains_key(header::TRANSFER_ENCODING) {
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
            Ok(resp.map(Incoming::Hyper))
        }
        Ok(Err(e)) => Err(classify(&e, false, e.is_connect())),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Turns upstream's response headers into the client's, in place: the
/// end-to-end headers plus the request id; no length when the gateway
/// edits the body.
pub fn client_headers(h: &mut HeaderMap, request_id: &super::ctx::RequestId, body_edited: bool) {
    strip_hop_by_hop(h);
    if body_edited {
        h.remove(header::CONTENT_LENGTH);
    }
    h.insert(X_REQUEST_ID, request_id.header());
}

/// An address as a header value.
#[cfg(test)]
fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    let mut buf = [0u8; 45];
    let len = ip_text(ip, &mut buf);
    HeaderValue::from_bytes(&buf[..len]).expect("an address is a valid header value")
}

/// An address's text form, written on the stack (no `fmt` machinery and no
/// heap string on the request path); its length.
pub(crate) fn ip_text(ip: std::net::IpAddr, buf: &mut [u8; 45]) -> usize {
    use std::io::Write as _;
    match ip.to_canonical() {
        std::net::IpAddr::V4(a) => {
            let mut n = 0;
            for (i, o) in a.octets().iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                for (div, always) in [(100, false), (10, false), (1, true)] {
                    if always || *o >= div {
                        buf[n] = b'0' + (o / div) % 10;
                        n += 1;
                    }
                }
            }
            n
        }
        std::net::IpAddr::V6(a) => {
            // 45 bytes: the longest IPv6 text form.
            let mut w = &mut buf[..];
            let _ = write!(w, "{a}");
            45 - w.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_header_values() {
        for (ip, want) in [
            ("203.0.113.9", "203.0.113.9"),
            ("0.0.0.0", "0.0.0.0"),
            ("255.255.255.255", "255.255.255.255"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("2001:db8::1", "2001:db8::1"),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
            ),
        ] {
            assert_eq!(ip_header(ip.parse().unwrap()), want);
        }
    }

    /// The head fields written for an HTTP/1.1 backend, parsed back.
    fn written(f: &Forward<'_>) -> HeaderMap {
        let mut w = b"POST / HTTP/1.1\r\n".to_vec();
        assert!(f.fields_len() > 0);
        f.write_fields(&mut w);
        w.extend_from_slice(b"\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(&w).expect("a valid head").is_complete());
        let mut out = HeaderMap::new();
        for h in req.headers.iter() {
            out.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        out
    }

    #[test]
    fn upstream_headers_written_and_mapped_agree() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("client-chosen"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        // Claims about the client the gateway does not pass on.
        for (n, v) in [
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "1"),
            ("accept-encoding", "gzip, br"),
            // The same, as a WSGI/CGI layer would read them.
            ("x_forwarded_for", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
        ] {
            h.insert(n, HeaderValue::from_static(v));
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.append("x-custom", HeaderValue::from_static("a"));
        h.append("x-custom", HeaderValue::from_static("b"));
        for (ip, tls, len) in [
            ("203.0.113.9", false, 0usize),
            ("2001:db8::7", true, 1_234_567),
        ] {
            let f = Forward::new(&h, "req-1", ip.parse().unwrap(), tls, len);
            let map = f.header_map();
            assert_eq!(written(&f), map);
            let want = [
                ("content-type", "application/json"),
                ("x-custom", "a"),
                ("x-custom", "b"),
                ("content-length", &len.to_string()),
                ("x-request-id", "req-1"),
                ("x-forwarded-for", ip),
                ("x-forwarded-proto", if tls { "https" } else { "http" }),
                ("accept-encoding", "identity"),
            ];
            let mut got: Vec<(&str, &str)> = map
                .iter()
                .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
                .collect();
            let mut want = want.to_vec();
            got.sort();
            want.sort();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn hop_by_hop_and_credentials_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-secret"),
        );
        h.insert("x-api-key", HeaderValue::from_static("sk-secret"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        for n in [
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "upgrade",
            "host",
        ] {
            h.insert(n, HeaderValue::from_static("x"));
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.append("x-custom", HeaderValue::from_static("a"));
        h.append("x-custom", HeaderValue::from_static("b"));
        let out = end_to_end(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-custom"]);
        assert_eq!(
            out.get_all("x-custom").iter().count(),
            2,
            "repeated headers are kept"
        );
        // The in-place version keeps exactly the same.
        let mut inplace = h.clone();
        strip_hop_by_hop(&mut inplace);
        assert_eq!(inplace, out);
    }
}
