//! The client-facing HTTP/1.1 connection over an in-memory pipe: framing
//! both ways, keep-alive and pipelining, refusals, `Expect`, and closes.

use std::time::Duration;

use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, DuplexStream};

use super::*;

const KEY: &str = "sk-unit";

fn shared() -> Arc<Shared> {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\
         [[keys]]\nname = \"t\"\nsha256 = \"{:x}\"\nmodels = [\"*\"]\n\
         [[models]]\nname = \"m\"\n[[models.backends]]\nurl = \"http://127.0.0.1:1\"\n",
        sha2::Sha256::digest(KEY.as_bytes())
    );
    let cfg = crate::config::Config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
    let (tx, _) = tokio::sync::mpsc::unbounded_channel();
    Arc::new(Shared::new(&cfg, tx))
}

fn limits() -> ConnLimits {
    ConnLimits {
        header_read_timeout: Duration::from_secs(2),
        send_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(1),
        max_header_bytes: 8192,
        max_headers: 20,
        keepalive_requests: 1000,
    }
}

/// A connection served on one end of a pipe; the other end, and the
/// sender that drains the connection.
fn connect_with(limits: ConnLimits) -> (DuplexStream, watch::Sender<bool>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let (tx, rx) = watch::channel(false);
    let peer = "127.0.0.1:40000".parse().unwrap();
    tokio::spawn(serve(
        Box::new(server),
        BytesMut::new(),
        shared(),
        peer,
        limits,
        rx,
        tokio::time::Instant::now() + limits.header_read_timeout,
    ));
    (client, tx)
}

/// One response read off the pipe: status, headers (names lowercase) and
/// body, decoded by its framing.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (the body too unless `head_only`), leaving any later
/// bytes in `pending`.
async fn reply(c: &mut DuplexStream, pending: &mut Vec<u8>, head_only: bool) -> Reply {
    let end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(c, pending).await;
    };
    let head = String::from_utf8(pending.drain(..end).collect()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(": ").unwrap();
            (n.to_ascii_lowercase(), v.to_owned())
        })
        .collect();
    let mut r = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only {
        return r;
    }
    if let Some(n) = r.header("content-length") {
        let n: usize = n.parse().unwrap();
        while pending.len() < n {
            fill(c, pending).await;
        }
        r.body = pending.drain(..n).collect();
    } else if r.header("transfer-encoding") == Some("chunked") {
        let mut dec = Chunked::default();
        loop {
            let used = dec
                .decode(pending, &mut |d| r.body.extend_from_slice(d))
                .unwrap();
            pending.drain(..used);
            if dec.is_done() {
                break;
            }
            fill(c, pending).await;
        }
    } else {
        c.read_to_end(pending).await.unwrap();
        r.body = std::mem::take(pending);
    }
    r
}

async fn fill(c: &mut DuplexStream, pending: &mut Vec<u8>) {
    let mut b = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
        .await
        .expect("the gateway answered within 5 s")
        .unwrap();
    assert!(
        n > 0,
        "closed early; got so far: {:?}",
        String::from_utf8_lossy(pending)
    );
    pending.extend_from_slice(&b[..n]);
}

/// Whether the gateway closed its end (after reading what is left).
async fn closed(c: &mut DuplexStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await,
        Ok(Ok(_))
    )
}

/// A test client: its end of the pipe, bytes read past the last reply,
/// and the connection's drain switch.
struct Peer {
    c: DuplexStream,
    pending: Vec<u8>,
    drain: watch::Sender<bool>,
}

impl Peer {
    fn new() -> Peer {
        Peer::with(limits())
    }

    fn with(limits: ConnLimits) -> Peer {
        let (c, drain) = connect_with(limits);
        Peer {
            c,
            pending: Vec::new(),
            drain,
        }
    }

    async fn write(&mut self, bytes: impl AsRef<[u8]>) {
        self.c.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Writes `req` and reads the next reply.
    async fn send(&mut self, req: impl AsRef<[u8]>) -> Reply {
        self.write(req).await;
        self.next(false).await
    }

    async fn next(&mut self, head_only: bool) -> Reply {
        reply(&mut self.c, &mut self.pending, head_only).await
    }

    /// The reply says the connection closes, and it does.
    async fn closes_after(&mut self, r: &Reply) {
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        assert!(closed(&mut self.c).await, "{r:?}");
    }
}

fn post(extra: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {KEY}\r\n{extra}\r\n{body}"
    )
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests() {
    let mut p = Peer::new();
    let get = "GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n";
    // Two requests in one write, answered in order on the same connection.
    p.write(format!("{get}{get}")).await;
    for _ in 0..2 {
        let r = p.next(false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, br#"{"status":"ok"}"#);
        assert_eq!(r.header("content-length"), Some("15"));
        assert!(
            r.header("date").is_some_and(|d| d.ends_with(" GMT")),
            "{r:?}"
        );
        assert_eq!(r.header("connection"), None, "{r:?}");
    }
    assert_eq!(p.send(get).await.status, 200);
    // `Connection: close` is honoured.
    let r = p
        .send("GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n")
        .await;
    p.closes_after(&r).await;
}

/// `server.keepalive_requests`: the connection's last request is answered
/// with `Connection: close`, and the connection closes after it.
#[tokio::test]
async fn a_connection_closes_after_its_share_of_requests() {
    let mut p = Peer::with(ConnLimits {
        keepalive_requests: 3,
        ..limits()
    });
    let get = "GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n";
    for _ in 0..2 {
        let r = p.send(get).await;
        assert_eq!((r.status, r.header("connection")), (200, None), "{r:?}");
    }
    let r = p.send(get).await;
    assert_eq!(r.status, 200);
    p.closes_after(&r).await;
    // 0 = no limit.
    let mut p = Peer::with(ConnLimits {
        keepalive_requests: 0,
        ..limits()
    });
    for _ in 0..5 {
        let r = p.send(get).await;
        assert_eq!((r.status, r.header("connection")), (200, None), "{r:?}");
    }
}

#[tokio::test]
async fn head_answers_carry_no_body() {
    let mut p = Peer::new();
    p.write("HEAD /v1/models HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        .await;
    let r = p.next(true).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("content-length").is_some_and(|n| n != "0"),
        "{r:?}"
    );
    // The next bytes are the next response, not the HEAD's body.
    let r = p.next(false).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, br#"{"status":"ok"}"#.as_slice())
    );
    // A load balancer's HEAD health check.
    p.write("HEAD /healthz HTTP/1.1\r\n\r\nHEAD /readyz HTTP/1.1\r\n\r\n")
        .await;
    for _ in 0..2 {
        let r = p.next(true).await;
        assert_eq!((r.status, r.body.len()), (200, 0), "{r:?}");
    }
}

#[tokio::test]
async fn http10_closes_unless_asked_to_keep_alive() {
    let mut p = Peer::new();
    let r = p
        .send("GET /healthz HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let r = p.send("GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200);
    p.closes_after(&r).await;
}

#[tokio::test]
async fn chunked_request_bodies_are_decoded() {
    let mut p = Peer::new();
    let body = r#"{"model":"nope"}"#;
    let (a, b) = body.split_at(5);
    let chunked = format!(
        "{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nx-trailer: 1\r\n\r\n",
        a.len(),
        b.len()
    );
    let r = p
        .send(post("transfer-encoding: chunked\r\n", &chunked))
        .await;
    // The model was read out of the decoded body.
    assert_eq!(r.status, 404, "{r:?}");
    assert!(String::from_utf8_lossy(&r.body).contains("nope"), "{r:?}");
    // The body was read whole, so the connection carries on.
    assert_eq!(p.send("GET /healthz HTTP/1.1\r\n\r\n").await.status, 200);
}

/// A request head with `Expect: 100-continue` and a body still to come.
fn expecting(body: &str) -> String {
    post(
        &format!("expect: 100-continue\r\ncontent-length: {}\r\n", body.len()),
        "",
    )
}

#[tokio::test]
async fn expect_continue_is_answered_only_when_the_body_is_wanted() {
    let mut p = Peer::new();
    let body = r#"{"model":"nope"}"#;
    p.write(expecting(body)).await;
    assert_eq!(p.next(true).await.status, 100);
    assert_eq!(p.send(body).await.status, 404);

    // Refused before the body: no 100, and the connection closes since
    // the body was never read.
    let mut p = Peer::new();
    let r = p
        .send("POST /v1/chat/completions HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 100000\r\n\r\n")
        .await;
    assert_eq!(r.status, 401);
    p.closes_after(&r).await;
}

#[tokio::test]
async fn an_unread_body_closes_the_connection_after_the_answer() {
    let mut p = Peer::new();
    // No key: 401 without reading the body; the client may still be
    // sending it, so the connection cannot carry another request.
    let r = p
        .send("POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 50\r\n\r\n0123456789")
        .await;
    assert_eq!(r.status, 401);
    p.write([b'x'; 40]).await;
    p.closes_after(&r).await;
}

#[tokio::test]
async fn hostile_heads_are_refused_and_closed() {
    let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases = [
        (format!("GET /healthz HTTP/1.1\r\n{many}\r\n"), 431),
        (
            format!(
                "GET /healthz HTTP/1.1\r\nx-big: {}\r\n\r\n",
                "b".repeat(9000)
            ),
            431,
        ),
        (
            "GET /healthz HTTP/1.1\r\nbad header\r\n\r\n".to_owned(),
            400,
        ),
        ("GET /he lthz HTTP/1.1\r\n\r\n".to_owned(), 400),
        (post("transfer-encoding: gzip\r\n", ""), 400),
        (post("transfer-encoding: chunked, gzip\r\n", ""), 400),
        (
            post("content-length: 3\r\ncontent-length: 4\r\n", "abc"),
            400,
        ),
        (post("content-length: -1\r\n", ""), 400),
        // Empty lengths and codings are invalid, not absent.
        (post("content-length:\r\n", ""), 400),
        (post("content-length: 5,\r\n", "abcde"), 400),
        (
            post("transfer-encoding:\r\ncontent-length: 2\r\n", "{}"),
            400,
        ),
        // Control bytes and folded lines in a field.
        ("GET /healthz HTTP/1.1\r\nx: a\0b\r\n\r\n".to_owned(), 400),
        ("GET /healthz HTTP/1.1\r\nx: a\rb\r\n\r\n".to_owned(), 400),
        (
            "GET /healthz HTTP/1.1\r\nx: a\r\n folded\r\n\r\n".to_owned(),
            400,
        ),
        (post("content-length: 0x10\r\n", ""), 400),
        (
            "POST /v1/chat/completions HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(),
            400,
        ),
    ];
    for (req, want) in cases {
        let mut p = Peer::new();
        let r = p.send(&req).await;
        assert_eq!(r.status, want, "{req:?}: {r:?}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(
            r.header("x-request-id").is_some_and(|id| id.len() == 32),
            "a refused head has an id to quote too: {r:?}"
        );
        p.closes_after(&r).await;
    }
}

/// A chunked request body is held to the grammar (as hyper holds it), so
/// no proxy in front can frame it differently: whatever a lenient reader
/// would take as a body is refused.
#[tokio::test]
async fn chunked_request_bodies_are_read_strictly() {
    let body = r#"{"model":"nope"}"#;
    for chunked in [
        format!("10 junk\r\n{body}\r\n0\r\n\r\n"),
        format!("10\n{body}\r\n0\r\n\r\n"),
        format!("10;a=\0\r\n{body}\r\n0\r\n\r\n"),
        format!("10\r\n{body}\n0\r\n\r\n"),
        format!("10\r\n{body}\r\n0\r\nx: 1\n\r\n"),
        format!("10\r\n{body}\r\n0\n\n"),
    ] {
        let mut p = Peer::new();
        let r = p
            .send(post("transfer-encoding: chunked\r\n", &chunked))
            .await;
        assert_eq!(r.status, 400, "{chunked:?}: {r:?}");
    }
    // What the grammar allows: whitespace before an extension.
    let mut p = Peer::new();
    let chunked = format!("10 ;a=1\r\n{body}\r\n0\r\nx: 1\r\n\r\n");
    let r = p
        .send(post("transfer-encoding: chunked\r\n", &chunked))
        .await;
    assert_eq!(r.status, 404, "{r:?}");
}

/// A head over `max_header_bytes` is refused also when its bytes are all
/// buffered already (the connection's first read takes up to 16 KiB).
#[tokio::test]
async fn the_head_limit_holds_for_bytes_already_read() {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let (_drain, rx) = watch::channel(false);
    let head = format!("GET /healthz HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(12_000));
    let peer = "127.0.0.1:40000".parse().unwrap();
    tokio::spawn(serve(
        Box::new(server),
        BytesMut::from(head.as_bytes()),
        shared(),
        peer,
        limits(),
        rx,
        tokio::time::Instant::now() + Duration::from_secs(2),
    ));
    let r = reply(&mut client, &mut Vec::new(), false).await;
    assert_eq!(r.status, 431, "{r:?}");
}

#[tokio::test]
async fn both_lengths_decode_chunked_then_close() {
    let mut p = Peer::new();
    let body = "10\r\n{\"model\":\"nope\"}\r\n0\r\n\r\n";
    // The hidden request after the chunked body is never served.
    let req = post(
        "content-length: 4\r\ntransfer-encoding: chunked\r\n",
        &format!("{body}GET /healthz HTTP/1.1\r\n\r\n"),
    );
    let r = p.send(req).await;
    assert_eq!(r.status, 404);
    p.closes_after(&r).await;
    assert!(
        !String::from_utf8_lossy(&p.pending).contains("HTTP/1.1"),
        "{:?}",
        p.pending
    );
}

#[tokio::test]
async fn drain_closes_idle_connections_and_ends_busy_ones_after_their_answer() {
    let mut idle = Peer::new();
    assert_eq!(idle.send("GET /healthz HTTP/1.1\r\n\r\n").await.status, 200);
    idle.drain.send_replace(true);
    assert!(
        closed(&mut idle.c).await,
        "an idle connection closes at once"
    );

    // Mid-request when the drain comes (the 100 says its head was read):
    // the request is still answered, with `connection: close`.
    let mut busy = Peer::new();
    let body = r#"{"model":"nope"}"#;
    busy.write(expecting(body)).await;
    assert_eq!(busy.next(true).await.status, 100);
    busy.drain.send_replace(true);
    let r = busy.send(body).await;
    assert_eq!(r.status, 404);
    busy.closes_after(&r).await;
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_header_read_timeout() {
    let within = Duration::from_millis(300);
    let mut p = Peer::with(ConnLimits {
        header_read_timeout: within,
        ..limits()
    });
    let t = std::time::Instant::now();
    p.write("GET /healthz HTTP/1.1\r\n").await;
    let mut rest = Vec::new();
    p.c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "closed without an answer: {rest:?}");
    let took = t.elapsed();
    assert!(took >= within && took < within * 5, "{took:?}");
}

/// The first request's head is due by the deadline the connection came
/// with (its start plus the timeout, the wait for its first bytes counted),
/// not a whole timeout after the first bytes.
#[tokio::test]
async fn the_first_head_is_due_by_the_connections_deadline() {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let (_drain, rx) = watch::channel(false);
    let peer = "127.0.0.1:40000".parse().unwrap();
    let t = std::time::Instant::now();
    // As if the first bytes took all but 300 ms of a 5 s timeout.
    let by = tokio::time::Instant::now() + Duration::from_millis(300);
    let limits = ConnLimits {
        header_read_timeout: Duration::from_secs(5),
        ..limits()
    };
    tokio::spawn(serve(
        Box::new(server),
        BytesMut::from(&b"GET /healthz HTTP/1.1\r\n"[..]),
        shared(),
        peer,
        limits,
        rx,
        by,
    ));
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "closed without an answer: {rest:?}");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn inspect_head_matches_framing() {
    let r = inspect_head(b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello", 10)
        .unwrap()
        .unwrap();
    assert_eq!((r.body, r.keep_alive), (Some(5), true));
    let r = inspect_head(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 10)
        .unwrap()
        .unwrap();
    assert_eq!(r.body, None);
    assert!(inspect_head(b"POST / HTTP/1.1\r\ncontent", 10)
        .unwrap()
        .is_none());
    assert_eq!(
        inspect_head(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\n\r\n", 1).err(),
        Some(431)
    );
}

/// The send timeout is the time between writes that make progress: a slow
/// reader that keeps reading gets all of it, a client that reads nothing
/// is cut.
#[tokio::test]
async fn the_send_timeout_waits_on_progress_not_on_the_whole_write() {
    use tokio::io::AsyncReadExt as _;
    let within = Duration::from_millis(200);
    let (mut client, server) = tokio::io::duplex(64);
    let mut io: BoxIo = Box::new(server);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = [0u8; 64];
        // 4,096 bytes, 64 every 20 ms: 1.3 s in all, far past `within`.
        while got < 4096 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            got += client.read(&mut buf).await.unwrap();
        }
        client
    });
    send(&mut io, &[b'x'; 4096], within)
        .await
        .expect("a client that keeps reading is not cut");
    let _client = reader.await.unwrap();
    // Nobody reads now: the pipe's 64 bytes fill, then nothing moves.
    let t = std::time::Instant::now();
    let e = send(&mut io, &[b'y'; 4096], within).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(t.elapsed() >= within, "{:?}", t.elapsed());
}
