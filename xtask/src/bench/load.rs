//! An open-loop load generator in the manner of wrk2: each of `CONNS`
//! keep-alive connections sends on a fixed schedule, and every latency is
//! measured from the request's scheduled start, so a slow server shows up
//! as latency instead of quietly lowering the request rate (coordinated
//! omission).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// Connections the schedule is spread over.
const CONNS: u64 = 32;

/// Latency percentiles of one run, in microseconds.
pub struct Latencies {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub sent: usize,
    pub errors: usize,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// Sends `rate` POSTs per second for `secs` seconds; returns latencies.
pub fn run(
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
    rate: u64,
    secs: u64,
) -> Result<Latencies> {
    let uri: hyper::Uri = url.parse().context("load URL")?;
    let addr = format!(
        "{}:{}",
        uri.host().context("URL host")?,
        uri.port_u16().unwrap_or(80)
    );
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let body = Bytes::from(body.to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let per_conn = (rate * secs).div_ceil(CONNS);
        let interval = Duration::from_nanos(1_000_000_000 * CONNS / rate.max(1));
        let start = Instant::now() + Duration::from_millis(100);
        let mut tasks = Vec::new();
        for c in 0..CONNS {
            let (addr, uri, headers, body) =
                (addr.clone(), uri.clone(), headers.clone(), body.clone());
            // Stagger the connections across one interval.
            let first = start + interval.mul_f64(c as f64 / CONNS as f64);
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_conn as usize);
                let mut errors = 0usize;
                let mut send = connect(&addr).await?;
                for k in 0..per_conn {
                    let due = first + interval * k as u32;
                    tokio::time::sleep_until(due.into()).await;
                    // Servers close keep-alive connections (nginx after
                    // 1,000 requests by default): reconnect like a client.
                    if send.is_closed() || send.ready().await.is_err() {
                        send = connect(&addr).await?;
                    }
                    let mut req = hyper::Request::post(uri.clone()).header("host", &addr);
                    for (n, v) in &headers {
                        req = req.header(n, v);
                    }
                    let ok = match send.send_request(req.body(Full::new(body.clone()))?).await {
                        Ok(r) => r.status().is_success() && r.into_body().collect().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(due.elapsed().as_secs_f64() * 1e6);
                    } else {
                        errors += 1;
                    }
                }
                anyhow::Ok((lat, errors, per_conn as usize))
            }));
        }
        let (mut all, mut sent) = (Vec::new(), 0);
        for t in tasks {
            let (lat, _failed, n) = t.await??;
            all.extend(lat);
            sent += n;
        }
        all.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        Ok(Latencies {
            p50: pct(0.50),
            p99: pct(0.99),
            p999: pct(0.999),
            sent,
            errors: sent - all.len(),
        })
    })
}
