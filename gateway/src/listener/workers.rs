//! Worker threads, the way nginx runs: one single-threaded runtime per
//! worker, each accepting on its own SO_REUSEPORT socket for every listen
//! address, so the kernel spreads new connections across workers and a
//! request is served start to finish on one thread, with no cross-thread
//! wake-ups. Each worker also uses its own upstream connection pools (see
//! `upstream::Backend::client`).

use std::{
    cell::Cell,
    net::{SocketAddr, TcpListener as StdListener},
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use super::Listeners;
use crate::pipeline::Shared;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the current thread (0 elsewhere).
pub fn current() -> usize {
    WORKER.with(|w| w.get())
}

/// How many workers `server.workers` asks for (0 = one per CPU).
pub fn count(configured: u32) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    }
}

/// A listening socket that shares its address with the other workers'.
fn reuseport_socket(addr: SocketAddr) -> Result<StdListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into()).with_context(|| {
        format!("binding {addr} (server.listen): in use, or a privileged port without CAP_NET_BIND_SERVICE?")
    })?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Binds `workers` sockets per address. A configured port 0 becomes one
/// real port shared by all workers.
pub fn bind(addrs: &[SocketAddr], workers: usize) -> Result<Vec<Vec<StdListener>>> {
    let mut per_worker: Vec<Vec<StdListener>> = (0..workers).map(|_| Vec::new()).collect();
    for addr in addrs {
        let first = reuseport_socket(*addr)?;
        let actual = first.local_addr()?;
        per_worker[0].push(first);
        for w in per_worker.iter_mut().skip(1) {
            w.push(reuseport_socket(actual)?);
        }
    }
    Ok(per_worker)
}

/// How far ahead the worker's timer driver always has something to do.
const TICK: Duration = Duration::from_millis(100);

/// Keeps a timer due within `TICK` on the worker's runtime.
///
/// tokio writes to the runtime's eventfd whenever a new timer is due before
/// the driver's planned wake-up, even from the runtime's own thread, where
/// the write only costs a syscall and a spurious `epoll_wait` return. Every
/// request registers timers (hyper's header-read deadline, the first-byte
/// and idle timeouts), so without a near timer that happened for most
/// requests (0.63 eventfd writes per request under `bench l7`); with it, a
/// request's timers (all longer than `TICK`) never come first, and the
/// tick costs ten wake-ups a second.
async fn keep_next_wake_near() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Running workers.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

impl Workers {
    /// Starts one thread per socket set.
    pub fn start(sockets: Vec<Vec<StdListener>>, shared: Arc<Shared>) -> Result<Workers> {
        let (shutdown, rx) = watch::channel(false);
        let mut threads = Vec::new();
        for (id, socks) in sockets.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let rx = rx.clone();
            let t = std::thread::Builder::new()
                .name(format!("gateway-worker-{id}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(id));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            return tracing::error!(worker = id, "cannot start a runtime: {e}")
                        }
                    };
                    rt.block_on(async move {
                        let mut sockets = Vec::new();
                        for s in socks {
                            match tokio::net::TcpListener::from_std(s) {
                                Ok(l) => sockets.push(l),
                                Err(e) => {
                                    return tracing::error!(
                                        worker = id,
                                        "cannot register a socket: {e}"
                                    )
                                }
                            }
                        }
                        let l = Listeners {
                            sockets,
                            worker: id,
                        };
                        // Ends with the runtime when the worker returns.
                        tokio::spawn(keep_next_wake_near());
                        l.serve(shared, rx).await;
                    });
                })
                .context("spawning a worker thread")?;
            threads.push(t);
        }
        Ok(Workers { threads, shutdown })
    }

    /// Stops accepting everywhere, waits for the drain, joins the threads.
    pub fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
