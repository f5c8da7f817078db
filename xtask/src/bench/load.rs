//! An open-loop load generator in the manner of wrk2: each of `CONNS`
//! keep-alive connections sends on a fixed schedule, and every latency is
//! measured from the request's scheduled start, so a slow server shows up
//! as latency instead of quietly lowering the request rate (coordinated
//! omission).
//!
//! The connections share one thread (a current-thread tokio runtime, so
//! the generator costs the shared cores little), but not tokio's timer:
//! that rounds every deadline up to the next millisecond, which put a floor
//! of about 1.7 ms (p50) and a millisecond of jitter under every figure,
//! more than the 0.5 ms a proxy may add. Each connection waits for its
//! next send time on a timerfd armed to the nanosecond instead.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::io::{
    unix::AsyncFd, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::TcpStream;

/// Connections the schedule is spread over.
const CONNS: u64 = 32;

/// The watcher's sleep: short enough that a stall of a few milliseconds
/// cannot fall between two wake-ups unseen, long enough to cost nothing.
const WATCH: Duration = Duration::from_millis(2);

/// How long one request may take before it counts as an error.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The latencies (µs) of the requests that succeeded, and how many were
/// sent; runs against the same target merge.
#[derive(Default)]
pub struct Latencies {
    sorted: Vec<f64>,
    pub sent: usize,
    /// The longest one of the watcher threads (one pinned to each CPU,
    /// sleeping `WATCH` at a time alongside the load) woke late (µs): a
    /// stall of a CPU (the host running something else on that vCPU, say),
    /// which every request in flight there then carries, whichever target
    /// it was sent to.
    pub worst_stall: f64,
}

impl Latencies {
    pub fn merge(&mut self, other: Latencies) {
        self.sorted.extend(other.sorted);
        self.sorted.sort_by(f64::total_cmp);
        self.sent += other.sent;
        self.worst_stall = self.worst_stall.max(other.worst_stall);
    }

    /// The `p` quantile (0.5 = median); NaN without a success.
    pub fn pct(&self, p: f64) -> f64 {
        let n = self.sorted.len();
        self.sorted
            .get(((n as f64 * p) as usize).min(n.saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    }

    pub fn errors(&self) -> usize {
        self.sent - self.sorted.len()
    }
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
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "the load generator speaks plain HTTP/1.1: {url}"
    );
    let addr = format!(
        "{}:{}",
        uri.host().context("URL host")?,
        uri.port_u16().unwrap_or(80)
    );
    let mut request = format!(
        "POST {} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n",
        uri.path_and_query().map_or("/", |p| p.as_str()),
        body.len()
    );
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let request: std::sync::Arc<[u8]> = request.into_bytes().into();

    let per_conn = (rate * secs).div_ceil(CONNS);
    let interval = Duration::from_nanos(1_000_000_000 * CONNS / rate.max(1));
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + interval * per_conn as u32;
    // One watcher per CPU, pinned there: a stall of one vCPU (the host
    // running something else on it) holds whatever runs on that CPU, and
    // a watcher free to move would mostly be on the other one.
    let watchers = (0..cpus())
        .map(|cpu| {
            std::thread::Builder::new()
                .name(format!("load-watch-{cpu}"))
                .spawn(move || watch(cpu, end))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    // Tokio's timer serves only the per-request timeout.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let all = rt.block_on(async move {
        let mut tasks = Vec::new();
        for c in 0..CONNS {
            let (addr, request) = (addr.clone(), request.clone());
            // Stagger the connections across one interval.
            let first = start + interval.mul_f64(c as f64 / CONNS as f64);
            tasks.push(tokio::spawn(async move {
                connection(&addr, &request, first, interval, per_conn).await
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        anyhow::Ok(all)
    });
    let mut worst = Duration::ZERO;
    for w in watchers {
        let w = w
            .join()
            .map_err(|_| anyhow::anyhow!("a watcher thread panicked"))?;
        worst = worst.max(w);
    }
    let mut all = all?;
    all.sort_by(f64::total_cmp);
    Ok(Latencies {
        sorted: all,
        sent: (per_conn * CONNS) as usize,
        worst_stall: worst.as_secs_f64() * 1e6,
    })
}

/// One connection's schedule: the latencies (µs) of its successful requests.
async fn connection(
    addr: &str,
    request: &[u8],
    first: Instant,
    interval: Duration,
    count: u64,
) -> Result<Vec<f64>> {
    let timer = Timer::new()?;
    let mut lat = Vec::with_capacity(count as usize);
    let mut conn: Option<BufReader<TcpStream>> = None;
    for k in 0..count {
        let due = first + interval * k as u32;
        timer.until(due).await?;
        // Servers close keep-alive connections (nginx after 1,000
        // requests by default): reconnect like a client, and again after
        // an error.
        let c = match conn.take() {
            Some(c) => c,
            None => match open(addr).await {
                Ok(c) => c,
                Err(_) => continue,
            },
        };
        if let Ok(Ok((c, keep))) = tokio::time::timeout(TIMEOUT, exchange(c, request)).await {
            lat.push(due.elapsed().as_secs_f64() * 1e6);
            if keep {
                conn = Some(c);
            }
        }
    }
    Ok(lat)
}

/// A timerfd on `CLOCK_MONOTONIC` (the clock `Instant` reads), which fires
/// at the nanosecond it is armed for, give or take the kernel's wake-up.
struct Timer {
    fd: AsyncFd<OwnedFd>,
    /// One reading of the clock as both an `Instant` and a timespec, to
    /// turn one into the other.
    base: (Instant, Duration),
}

impl Timer {
    fn new() -> Result<Timer> {
        // SAFETY: plain syscalls; the fd is owned from here on.
        let fd = unsafe {
            let fd = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            anyhow::ensure!(
                fd >= 0,
                "timerfd_create: {}",
                std::io::Error::last_os_error()
            );
            OwnedFd::from_raw_fd(fd)
        };
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes the timespec passed.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let base = (
            Instant::now(),
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
        );
        // SAFETY: an OwnedFd stays open, and names the same file, for as
        // long as the AsyncFd that owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering a timerfd: {e}"))?;
        Ok(Timer { fd, base })
    }

    /// Returns at `due`, or at once if it has passed.
    async fn until(&self, due: Instant) -> Result<()> {
        if due <= Instant::now() {
            return Ok(());
        }
        let at = self.base.1 + due.saturating_duration_since(self.base.0);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: at.as_secs() as libc::time_t,
                tv_nsec: at.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: arms the fd owned here with the spec passed.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        anyhow::ensure!(
            rc == 0,
            "timerfd_settime: {}",
            std::io::Error::last_os_error()
        );
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes into the u64.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut expirations as *mut u64).cast(),
                    8,
                )
            };
            if n == 8 {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

/// The CPUs this process may run on.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sleeps `WATCH` at a time on `cpu` until `end`; returns the longest it
/// woke late. Unpinned (the CPU set may be sparse), it still watches.
fn watch(cpu: usize, end: Instant) -> Duration {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls read the set
    // passed and pin only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    set_timer_slack();
    let mut worst = Duration::ZERO;
    while Instant::now() < end {
        let t = Instant::now();
        std::thread::sleep(WATCH);
        worst = worst.max(t.elapsed().saturating_sub(WATCH));
    }
    worst
}

/// The default slack lets the kernel fire a sleep up to 50 µs late.
fn set_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a value and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

async fn open(addr: &str) -> Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(BufReader::with_capacity(16 * 1024, s))
}

/// Sends `request` and reads the whole answer; a non-2xx status is an
/// error. Returns the connection and whether it may be used again.
async fn exchange(
    mut c: BufReader<TcpStream>,
    request: &[u8],
) -> Result<(BufReader<TcpStream>, bool)> {
    c.get_mut().write_all(request).await?;
    let mut line = String::new();
    c.read_line(&mut line).await?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {line:?}"))?;
    let (mut length, mut chunked, mut keep) = (None, false, true);
    loop {
        line.clear();
        if c.read_line(&mut line).await? == 0 {
            bail!("closed in the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            bail!("header line {l:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<u64>()?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            keep = !value.eq_ignore_ascii_case("close");
        }
    }
    if chunked {
        loop {
            line.clear();
            c.read_line(&mut line).await?;
            let size = u64::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                loop {
                    line.clear();
                    if c.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            discard(&mut c, size + 2).await?;
        }
    } else if let Some(n) = length {
        discard(&mut c, n).await?;
    } else {
        // Delimited by the close.
        tokio::io::copy(&mut c, &mut tokio::io::sink()).await?;
        keep = false;
    }
    anyhow::ensure!((200..300).contains(&status), "status {status}");
    Ok((c, keep))
}

async fn discard(c: &mut BufReader<TcpStream>, n: u64) -> Result<()> {
    let got = tokio::io::copy(&mut c.take(n), &mut tokio::io::sink()).await?;
    anyhow::ensure!(got == n, "closed after {got} of {n} body bytes");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `answer` to one request on a fresh connection and returns
    /// what `exchange` made of it.
    async fn answered(answer: &'static [u8]) -> Result<bool> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await?;
            s.write_all(answer).await?;
            // Hold the connection open but for the close-delimited case.
            if answer.windows(6).any(|w| w == b"close\r") || !answer.starts_with(b"HTTP/1.1 2") {
                return anyhow::Ok(());
            }
            let _ = s.read(&mut buf).await;
            anyhow::Ok(())
        });
        let c = open(&addr).await?;
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(c, b"POST / HTTP/1.1\r\n\r\n"),
        )
        .await?
        .map(|(_, keep)| keep);
        server.abort();
        r
    }

    #[tokio::test]
    async fn answers_are_read_to_their_end() {
        let keep = answered(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
        assert!(keep, "a sized answer leaves the connection usable");

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        assert!(
            answered(chunked).await.unwrap(),
            "chunked, with an extension and a trailer"
        );

        let closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        assert!(
            !answered(closing).await.unwrap(),
            "connection: close is honoured"
        );

        let to_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end";
        assert!(!answered(to_close).await.unwrap(), "a close-delimited body");
    }

    #[tokio::test]
    async fn failures_are_errors() {
        let e = answered(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("503"), "{e:#}");

        let e =
            answered(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\nshort")
                .await
                .unwrap_err();
        assert!(e.to_string().contains("5 of 10"), "{e:#}");
    }

    #[tokio::test]
    async fn the_timer_fires_at_its_deadline() {
        let timer = Timer::new().unwrap();
        for ms in [1u64, 3, 7] {
            let due = Instant::now() + Duration::from_millis(ms);
            timer.until(due).await.unwrap();
            let now = Instant::now();
            assert!(now >= due, "woke {:?} early", due - now);
            // Generous: a loaded test machine may be slow to schedule us.
            assert!(
                now - due < Duration::from_millis(500),
                "woke {:?} late",
                now - due
            );
        }
        // A deadline in the past returns at once.
        let t = Instant::now();
        timer.until(t - Duration::from_millis(5)).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(500));
    }
}
