//! `mock-llm`: an OpenAI-compatible mock upstream for the gateway's
//! integration tests, demo and benchmarks.
//!
//! It serves `POST /v1/chat/completions`, `POST /v1/completions` (plain or
//! SSE stream), `POST /v1/embeddings`, `GET /v1/models`, `GET /health`, and
//! its own `GET /mock/stats` and `GET /mock/requests`, over HTTP/1.1 and
//! HTTP/2 prior knowledge (h2c) on one port. It counts what happens to each
//! request (`MockStats`: completed, cancelled by the client, aborted by an
//! injected failure, in flight) and keeps the last requests it received
//! (`RecordedRequest`), which is what gateway tests assert on.
//!
//! Behaviour comes from `MockOptions` (the failure and latency can be
//! changed while it runs: `MockLlm::set_fail`, `set_latency`) and can be overridden per request with
//! headers, so one mock can serve varied tests:
//!
//! | header               | value                                                   |
//! |----------------------|---------------------------------------------------------|
//! | `x-mock-tokens`      | completion tokens, e.g. `5`                             |
//! | `x-mock-interval-ms` | delay between stream token chunks                       |
//! | `x-mock-first-token-ms` | delay of a stream's first chunk after its head       |
//! | `x-mock-latency-ms`  | delay before the response headers                       |
//! | `x-mock-fail`        | `500`/`503`/`429`/… (400-599), `reset`, `stall`, `garbage`, `midstream:N`, or `none` |
//! | `x-mock-usage`       | `asked`, `always` or `never`                            |
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use gateway_tests::mock::{MockLlm, MockOptions};
//! let mock = MockLlm::start(MockOptions { tokens: 5, ..Default::default() }).await?;
//! let upstream = mock.url(); // http://127.0.0.1:PORT
//! // ... send traffic through the gateway to `upstream` ...
//! assert_eq!(mock.stats().snapshot().cancelled, 0);
//! # Ok(()) }
//! ```
//!
//! Sync tests use `MockLlm::start_blocking`, which brings its own runtime.

mod body;
mod handler;
mod options;
mod render;
mod server;
mod stats;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::task::JoinHandle;

pub use options::{Failure, MockOptions, UsageMode};
pub use stats::{MockStats, RecordedRequest, StatsSnapshot, LOG_CAPACITY};

use server::Shared;

/// A running mock server. Dropping it stops accepting and aborts its
/// connections (and shuts down its own runtime, if it has one).
pub struct MockLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    /// The dedicated runtime of `start_blocking`.
    runtime: Option<tokio::runtime::Runtime>,
}

impl MockLlm {
    /// Binds `opts.listen` (default 127.0.0.1:0) and serves on the current
    /// tokio runtime. Use a multi-thread runtime when measuring: the mock
    /// then never shares one thread with the client.
    pub async fn start(opts: MockOptions) -> anyhow::Result<MockLlm> {
        let listener = server::bind(opts.listen)
            .with_context(|| format!("mock-llm: binding {}", opts.listen))?;
        Self::launch(listener, opts, None)
    }

    /// Like `start`, for code without a runtime (sync tests): the mock runs
    /// on a dedicated two-thread runtime that lives as long as the handle.
    /// Panics if it cannot bind. Safe to call and drop inside an async
    /// context too.
    pub fn start_blocking(opts: MockOptions) -> MockLlm {
        let start = || -> anyhow::Result<MockLlm> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("mock-llm")
                .enable_all()
                .build()?;
            let listener = server::bind(opts.listen)
                .with_context(|| format!("mock-llm: binding {}", opts.listen))?;
            Self::launch(listener, opts, Some(rt))
        };
        start().expect("starting mock-llm")
    }

    fn launch(
        listener: std::net::TcpListener,
        opts: MockOptions,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> anyhow::Result<MockLlm> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts)?);
        // Registering the listener and spawning need the runtime's context:
        // the dedicated one if there is one, else the caller's.
        let accept = {
            let _guard = runtime.as_ref().map(|rt| rt.enter());
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::spawn(server::accept_loop(listener, shared.clone()))
        };
        Ok(MockLlm {
            addr,
            shared,
            accept,
            runtime,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL to give a gateway as its upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The live counters; `stats().snapshot()` copies them.
    pub fn stats(&self) -> &MockStats {
        &self.shared.stats
    }

    /// A shared handle on the counters that outlives `&self`, e.g. to poll
    /// from another task.
    pub fn stats_handle(&self) -> Arc<MockStats> {
        self.shared.stats.clone()
    }

    /// The last `LOG_CAPACITY` requests received, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log.all()
    }

    /// Changes the failure injected into every request from now on (and
    /// what `GET /health` answers: 503 while failing, no answer while
    /// stalling); `None` makes the mock healthy again.
    pub fn set_fail(&self, fail: Option<Failure>) {
        *self.shared.fail.lock().unwrap_or_else(|p| p.into_inner()) = fail;
    }

    /// Changes the delay before response headers from now on.
    /// Delays every stream's first chunk after its head from now on (a
    /// server that sends the head before queueing and prefill).
    pub fn set_first_token(&self, delay: std::time::Duration) {
        *self
            .shared
            .first_token
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = delay;
    }

    pub fn set_latency(&self, latency: std::time::Duration) {
        *self
            .shared
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = latency;
    }

    pub fn name(&self) -> &str {
        &self.shared.opts.name
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(rt) = self.runtime.take() {
            // Not a blocking shutdown: that would panic when dropped in an
            // async context.
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for MockLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockLlm")
            .field("name", &self.shared.opts.name)
            .field("addr", &self.addr)
            .finish()
    }
}
