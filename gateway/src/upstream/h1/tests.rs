use std::sync::atomic::{AtomicUsize, Ordering};

use http_body::Body as _;
use http_body_util::BodyExt as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::http1::{MAX_CHUNK_LINE, MAX_TRAILERS};
use http::HeaderValue;

fn decode_all(c: &mut Chunked, input: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
    let mut out = Vec::new();
    let used = c.decode(input, &mut |d| out.extend_from_slice(d))?;
    Ok((out, used))
}

#[test]
fn chunked_bodies_decode_the_same_however_they_are_split() {
    let cases: [(&[u8], &[u8]); 5] = [
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (
            b"5;name=v\r\nhello\r\n6 \r\n world\r\n0\r\n\r\n",
            b"hello world",
        ),
        (
            b"A\r\n0123456789\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n",
            b"0123456789",
        ),
        // Bare LF line ends, as some servers send them.
        (b"3\nabc\n0\n\n", b"abc"),
        (b"00000001\r\nz\r\n0000\r\n\r\n", b"z"),
    ];
    for (wire, want) in cases {
        let mut whole = Chunked::default();
        let (out, used) = decode_all(&mut whole, wire).unwrap();
        assert_eq!(out, want, "{:?}", String::from_utf8_lossy(wire));
        assert_eq!(used, wire.len());
        assert!(whole.is_done());
        for cut in 0..=wire.len() {
            let mut c = Chunked::default();
            let (mut a, _) = decode_all(&mut c, &wire[..cut]).unwrap();
            assert_eq!(c.is_done(), cut == wire.len());
            let (b, _) = decode_all(&mut c, &wire[cut..]).unwrap();
            a.extend_from_slice(&b);
            assert_eq!(a, want, "split at {cut}");
            assert!(c.is_done());
        }
    }
}

#[test]
fn chunked_decoding_stops_at_the_end_and_refuses_garbage() {
    let mut c = Chunked::default();
    let (out, used) = decode_all(&mut c, b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200").unwrap();
    assert_eq!(out, b"ok");
    assert_eq!(used, 12, "bytes after the body are not used");

    for bad in [
        &b"x\r\n"[..],
        b";ext\r\n",
        b"5\r\nhelloX\r\n",
        b"5\r\nhello\rX",
        b"5\rX",
        b"11111111111111111\r\n",
    ] {
        let mut c = Chunked::default();
        assert!(
            decode_all(&mut c, bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut long = b"1;".to_vec();
    long.resize(2 + MAX_CHUNK_LINE as usize + 1, b'a');
    assert_eq!(
        decode_all(&mut Chunked::default(), &long),
        Err("chunk extension too long")
    );
    let mut zeros = vec![b'0'; MAX_CHUNK_LINE as usize + 1];
    zeros.push(b'1');
    assert!(decode_all(&mut Chunked::default(), &zeros).is_err());
    let mut trailers = b"0\r\n".to_vec();
    trailers.resize(3 + MAX_TRAILERS as usize + 1, b'a');
    assert_eq!(
        decode_all(&mut Chunked::default(), &trailers),
        Err("trailer section too long")
    );
}

fn head(raw: &str) -> (Response<()>, http1::Noted) {
    let (len, parsed) = parse_head(raw.as_bytes()).unwrap().unwrap();
    assert_eq!(len, raw.len());
    // SAFETY: a copy of the head just parsed (the whole of `raw`).
    unsafe { parsed.into_response(&Bytes::copy_from_slice(raw.as_bytes())) }.unwrap()
}

/// The framing of the response head `raw`.
fn framed(raw: &str, no_body: bool) -> Result<(Framing, bool), Error> {
    let (resp, noted) = head(raw);
    framing(&resp, noted, no_body)
}

#[test]
fn framing_follows_rfc_9112() {
    let cases = [
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            Some(5),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            Some(5),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: Close\r\n\r\n",
            Some(0),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
            Some(5),
            false,
        ),
        ("HTTP/1.1 204 No Content\r\n\r\n", Some(0), true),
        (
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            Some(0),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            None,
            true,
        ),
        // Both: chunked wins, and the connection is not reused.
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            None,
            false,
        ),
        // Neither: the body runs to the close.
        ("HTTP/1.1 200 OK\r\n\r\n", Some(u64::MAX), false),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            Some(u64::MAX),
            false,
        ),
    ];
    for (raw, want_len, want_keep) in cases {
        let (f, keep) = framed(raw, false).unwrap();
        let len = match f {
            Framing::Length(n) => Some(n),
            Framing::Chunked(_) => None,
            Framing::Eof => Some(u64::MAX),
            Framing::Done => unreachable!(),
        };
        assert_eq!((len, keep), (want_len, want_keep), "{raw:?}");
    }
    let (f, _) = framed("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).unwrap();
    assert!(matches!(f, Framing::Length(0)), "HEAD has no body");
    for bad in [
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
    ] {
        assert!(framed(bad, false).is_err(), "{bad:?}");
    }
}

#[test]
fn heads_are_parsed_or_refused() {
    assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le")
        .unwrap()
        .is_none());
    let (r, _) =
        head("HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\nx-a: 1\r\nx-a: 2\r\n\r\n");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(r.headers().get_all("x-a").iter().count(), 2);
    for bad in [
        &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    ] {
        assert!(
            parse_head(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert!(parse_head(&many).is_err());
}

/// One scripted exchange on the test backend: what it answers, in pieces
/// written with a pause between them, and whether it then closes.
#[derive(Clone)]
struct Reply {
    pieces: Vec<&'static [u8]>,
    close: bool,
    /// How long the backend works on the request before it answers.
    wait: Duration,
}

fn reply(raw: &'static [u8]) -> Reply {
    Reply {
        pieces: vec![raw],
        close: false,
        wait: Duration::ZERO,
    }
}

/// `pieces` written 20 ms apart (as tokens arrive), connection kept.
fn paced(pieces: Vec<&'static [u8]>) -> Reply {
    Reply {
        pieces,
        close: false,
        wait: Duration::ZERO,
    }
}

/// `raw`, then the backend closes the connection.
fn closing(raw: &'static [u8]) -> Reply {
    Reply {
        pieces: vec![raw],
        close: true,
        wait: Duration::ZERO,
    }
}

struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections the client closed (the backend read their end).
    closed: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// A backend answering the n-th request (over all connections) with
/// `replies[n]`; it records every request it read, whole.
async fn backend(replies: Vec<Reply>) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (acc, reqs, ends) = (
        Arc::clone(&accepted),
        Arc::clone(&requests),
        Arc::clone(&closed),
    );
    let replies = Arc::new(replies);
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            acc.fetch_add(1, Ordering::SeqCst);
            let (replies, next, reqs, ends) = (
                Arc::clone(&replies),
                Arc::clone(&next),
                Arc::clone(&reqs),
                Arc::clone(&ends),
            );
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: the head, then content-length bytes.
                    let head_end = loop {
                        if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut b = [0u8; 4096];
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => {
                                ends.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    };
                    let text = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + len {
                        let mut b = [0u8; 4096];
                        let n = s.read(&mut b).await.unwrap();
                        assert!(n > 0, "request body cut short");
                        buf.extend_from_slice(&b[..n]);
                    }
                    reqs.lock()
                        .unwrap()
                        .push(buf.drain(..head_end + len).collect());
                    let r = replies[next.fetch_add(1, Ordering::SeqCst)].clone();
                    tokio::time::sleep(r.wait).await;
                    for (i, p) in r.pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if s.write_all(p).await.is_err() {
                            return;
                        }
                    }
                    if r.close {
                        return;
                    }
                }
            });
        }
    });
    Backend {
        addr,
        accepted,
        closed,
        requests,
    }
}

fn client(b: &Backend) -> Client {
    let authority: http::uri::Authority = b.addr.to_string().parse().unwrap();
    Client::new(
        &authority,
        Duration::from_secs(2),
        Duration::from_secs(90),
        1,
    )
}

/// A response deadline no test reaches.
fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(60)
}

/// Headers of a request without a body.
fn empty_request() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    h
}

async fn post(c: &Client, body: &'static [u8]) -> Result<(Response<()>, Vec<Vec<u8>>), Error> {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let resp = c
        .send(
            &Method::POST,
            "/v1/chat/completions?x=1",
            &h,
            Bytes::from_static(body),
            far(),
        )
        .await?;
    let (parts, mut body) = resp.into_parts();
    let mut frames = Vec::new();
    while let Some(f) = body.frame().await {
        frames.push(f.map_err(Error::Io)?.into_data().unwrap().to_vec());
    }
    assert!(body.is_end_stream());
    Ok((Response::from_parts(parts, ()), frames))
}

#[tokio::test]
async fn requests_are_written_whole_and_kept_connections_reused() {
    let b = backend(vec![
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-up: 1\r\n\r\nok"),
        reply(b"HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nyes"),
    ])
    .await;
    let c = client(&b);
    let (r, body) = post(&c, b"{\"model\":\"m\"}").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-up"], "1");
    assert_eq!(body.concat(), b"ok");
    assert_eq!(c.idle(), 1, "the connection went back to the pool");
    let (r, body) = post(&c, b"{}").await.unwrap();
    assert_eq!((r.status().as_u16(), body.concat()), (201, b"yes".to_vec()));
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        1,
        "one connection for both"
    );

    let reqs = b.requests.lock().unwrap();
    let first = String::from_utf8(reqs[0].clone()).unwrap();
    let want = format!(
        "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: {}\r\ncontent-length: 13\r\ncontent-type: application/json\r\n\r\n{{\"model\":\"m\"}}",
        b.addr
    );
    assert_eq!(first, want);
}

/// The response deadline rides on the connection's own timer, moved for
/// each request: a kept connection whose last deadline passed while it was
/// idle waits for the next answer by the new deadline, not the old one, and
/// a deadline that passes fails the request, on a kept connection and on a
/// new one.
#[tokio::test]
async fn each_request_waits_by_its_own_deadline_on_a_kept_connection() {
    let slow = |wait_ms| Reply {
        wait: Duration::from_millis(wait_ms),
        ..reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    };
    let b = backend(vec![slow(0), slow(300), slow(800), slow(800)]).await;
    let c = client(&b);
    let headers = empty_request();
    let send = |ms: u64| {
        let by = tokio::time::Instant::now() + Duration::from_millis(ms);
        c.send(&Method::POST, "/", &headers, Bytes::new(), by)
    };
    let body = |r: Response<Body>| async move { r.into_body().collect().await.unwrap().to_bytes() };

    // Answered at once; the connection goes back with its timer set 150 ms on.
    assert_eq!(body(send(150).await.unwrap()).await, "ok");
    tokio::time::sleep(Duration::from_millis(250)).await;
    // That deadline has passed; this answer takes 300 ms, within its own 1 s.
    let t = Instant::now();
    assert_eq!(body(send(1000).await.unwrap()).await, "ok");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1, "the kept connection");

    // An answer later than the deadline, on the kept connection, then on a
    // new one (the timed-out connection is not kept).
    for (n, connections) in [(1, 1), (2, 2)] {
        let t = Instant::now();
        let e = send(200).await.map(|_| ()).unwrap_err();
        assert!(e.is_answer_timeout() && e.is_timeout(), "{n}: {e}");
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(190), "{n}: {took:?}");
        assert!(took < Duration::from_millis(700), "{n}: {took:?}");
        assert_eq!(b.accepted.load(Ordering::SeqCst), connections, "{n}");
        assert_eq!(c.idle(), 0, "{n}");
    }
}

#[tokio::test]
async fn a_chunked_stream_arrives_piece_by_piece() {
    let b = backend(vec![
        paced(vec![
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                b"d\r\ndata: one\r\n\r\n\r\n",
                b"d\r\ndata: t",
                b"wo\r\n\r\n\r\n",
                b"c\r\ndata: [DONE]\r\n0\r\n\r\n",
            ]),
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
    ])
    .await;
    let c = client(&b);
    let (_, frames) = post(&c, b"{}").await.unwrap();
    assert_eq!(
        frames,
        [
            &b"data: one\r\n\r\n"[..],
            b"data: t",
            b"wo\r\n\r\n",
            b"data: [DONE]"
        ]
    );
    assert_eq!(c.idle(), 1);
    let (r, frames) = post(&c, b"{}").await.unwrap();
    assert!(r.status().is_success() && frames.is_empty());
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
}

/// Connections left idle past the timeout are not used again: the next
/// request opens a new one, and the stale ones are closed (off the
/// request path, on the blocking pool).
#[tokio::test]
async fn connections_idle_past_the_timeout_are_closed_and_replaced() {
    let slow = Reply {
        wait: Duration::from_millis(100),
        ..reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")
    };
    let b = backend(vec![
        slow.clone(),
        slow.clone(),
        slow,
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
    ])
    .await;
    let authority: http::uri::Authority = b.addr.to_string().parse().unwrap();
    let c = Client::new(
        &authority,
        Duration::from_secs(2),
        Duration::from_millis(300),
        1,
    );
    // Three at once: three connections, all back in the pool after.
    let (x, y, z) = tokio::join!(post(&c, b"{}"), post(&c, b"{}"), post(&c, b"{}"));
    for r in [x, y, z] {
        assert_eq!(r.unwrap().1.concat(), b"a");
    }
    assert_eq!(c.idle(), 3);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 3);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"b");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 4, "a new connection");
    assert_eq!(c.idle(), 1, "only the new one is kept");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.closed.load(Ordering::SeqCst) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale connections were not closed: {} of 3",
            b.closed.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_kept_connection_the_backend_closed_is_replaced() {
    let b = backend(vec![
        closing(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
    ])
    .await;
    let c = client(&b);
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"a");
    // Whether or not the close has been seen yet, the request succeeds.
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"b");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(b.requests.lock().unwrap().len(), 2, "sent once each");
}

#[tokio::test]
async fn a_request_the_backend_drops_on_a_kept_connection_goes_again() {
    // The backend reads the second request on the kept connection, then
    // closes it without an answer (its keep-alive timeout racing the
    // request): the request goes again on a new connection.
    let b = backend(vec![
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
        closing(b""),
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
    ])
    .await;
    let c = client(&b);
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"a");
    assert_eq!(c.idle(), 1);
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"b");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(b.requests.lock().unwrap().len(), 3, "sent twice");

    // On a new connection the same is an error (nothing to blame but the
    // backend).
    let b = backend(vec![closing(b"")]).await;
    assert!(matches!(post(&client(&b), b"{}").await, Err(Error::Closed)));
}

/// A backend that worked on a request for a while, then closed the kept
/// connection without an answer, may have acted on it: the client does not
/// send it again by itself (the retry policy decides, and counts it).
#[tokio::test]
async fn a_request_the_backend_held_then_dropped_is_not_sent_again() {
    let b = backend(vec![
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
        Reply {
            pieces: vec![],
            close: true,
            wait: STALE_RACE * 2,
        },
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
    ])
    .await;
    let c = client(&b);
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"a");
    assert!(matches!(post(&c, b"{}").await, Err(Error::Closed)));
    assert_eq!(b.requests.lock().unwrap().len(), 2, "sent once");
}

#[tokio::test]
async fn unframed_and_closing_responses_do_not_reuse_the_connection() {
    let b = backend(vec![
        Reply {
            pieces: vec![b"HTTP/1.1 200 OK\r\n\r\nuntil", b" the end"],
            close: true,
            wait: Duration::ZERO,
        },
        closing(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx"),
        reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"),
    ])
    .await;
    let c = client(&b);
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"until the end");
    assert_eq!(c.idle(), 0);
    assert_eq!(post(&c, b"{}").await.unwrap().1.concat(), b"x");
    assert_eq!(c.idle(), 0);
    let (r, body) = post(&c, b"{}").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), body.concat()),
        (200, b"hi".to_vec()),
        "1xx skipped"
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), 3);
}

/// A length beside `Transfer-Encoding` frames nothing: it is not passed on,
/// where it would frame the client's response (cut at the bogus length).
#[tokio::test]
async fn a_length_beside_transfer_encoding_is_removed() {
    let b = backend(vec![closing(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n6\r\nsix ok\r\n0\r\n\r\n",
    )])
    .await;
    let (r, body) = post(&client(&b), b"{}").await.unwrap();
    assert_eq!(body.concat(), b"six ok");
    assert!(!r.headers().contains_key(header::CONTENT_LENGTH), "{r:?}");
}

#[tokio::test]
async fn broken_responses_are_errors() {
    let b = backend(vec![
        closing(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"),
        closing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"),
        reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"),
        closing(b"not http at all\r\n\r\n"),
        closing(b"HTTP/1.1 200 OK\r\nx: y"),
        closing(b""),
    ])
    .await;
    let c = client(&b);
    let e = post(&c, b"{}").await.unwrap_err();
    assert!(e.to_string().contains("before the end of the body"), "{e}");
    let e = post(&c, b"{}").await.unwrap_err();
    assert!(e.to_string().contains("before the end of the body"), "{e}");
    let e = post(&c, b"{}").await.unwrap_err();
    assert!(e.to_string().contains("chunk size"), "{e}");
    assert!(matches!(post(&c, b"{}").await, Err(Error::Invalid(_))));
    assert!(matches!(post(&c, b"{}").await, Err(Error::Invalid(_))));
    assert!(matches!(post(&c, b"{}").await, Err(Error::Closed)));
    assert_eq!(c.idle(), 0);
}

#[tokio::test]
async fn a_huge_head_is_refused() {
    let mut raw = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
    raw.resize(MAX_HEAD + 100, b'a');
    let b = backend(vec![closing(Box::leak(raw.into_boxed_slice()))]).await;
    let e = post(&client(&b), b"{}").await.unwrap_err();
    assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
}

#[tokio::test]
async fn a_body_dropped_midway_closes_its_connection() {
    let b = backend(vec![
        paced(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n",
            b"1\r\nb\r\n0\r\n\r\n",
        ]),
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nc"),
    ])
    .await;
    let c = client(&b);
    let mut body = c
        .send(&Method::POST, "/", &empty_request(), Bytes::new(), far())
        .await
        .unwrap()
        .into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    drop(body);
    assert_eq!(c.idle(), 0, "a half-read connection is not reused");
    assert_eq!(post(&c, b"").await.unwrap().1.concat(), b"c");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn connect_failures_are_connect_errors() {
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let authority: http::uri::Authority = addr.to_string().parse().unwrap();
    let c = Client::new(
        &authority,
        Duration::from_secs(1),
        Duration::from_secs(90),
        1,
    );
    let e = post(&c, b"{}").await.unwrap_err();
    assert!(e.is_connect(), "{e}");
    let authority: http::uri::Authority = "no-such-host.invalid:80".parse().unwrap();
    let c = Client::new(
        &authority,
        Duration::from_secs(1),
        Duration::from_secs(90),
        1,
    );
    let e = post(&c, b"{}").await.unwrap_err();
    assert!(e.is_connect(), "{e}");
}
