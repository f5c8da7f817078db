//! Active health checks: every backend of a model with `health_check` is
//! sent `GET <path>` every `interval` from the control runtime (its own
//! connection pool, so checks never compete with a worker's), and the
//! result feeds the backend's `Health`.

use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};

use super::{health::now_ns, Backend};
use crate::{config::HealthCheck, pipeline::Shared};

/// The checker wakes at least this often (and at half the shortest interval).
const MAX_TICK: Duration = Duration::from_secs(1);
const MIN_TICK: Duration = Duration::from_millis(5);
/// Most of a health response body read (to keep the connection reusable).
const MAX_BODY: usize = 64 * 1024;

/// Runs until the task is aborted, following the current routing table.
pub async fn run(shared: Arc<Shared>) {
    loop {
        let mut tick = MAX_TICK;
        {
            let routes = shared.routes.load();
            let now = now_ns();
            for m in &routes.models {
                let Some(hc) = &m.health_check else { continue };
                tick = tick.min(hc.interval / 2).max(MIN_TICK);
                for b in &m.backends {
                    let h = &b.health;
                    if h.next_check.load(Ordering::Relaxed) > now
                        || h.checking.swap(true, Ordering::AcqRel)
                    {
                        continue;
                    }
                    h.next_check
                        .store(now + hc.interval.as_nanos() as u64, Ordering::Relaxed);
                    let (b, hc) = (Arc::clone(b), hc.clone());
                    tokio::spawn(async move {
                        let ok = check(&b, &hc).await;
                        let was_up = b.health.is_up();
                        b.health.active_result(ok, &hc, &b.label);
                        if was_up != b.health.is_up() {
                            // In or out of rotation: requests queued for a
                            // slot look again (one may be free there, or
                            // none be left anywhere).
                            b.slots().wake_all();
                        }
                        b.health.checking.store(false, Ordering::Release);
                    });
                }
            }
        }
        tokio::time::sleep(tick).await;
    }
}

/// One check: a 2xx within the timeout.
async fn check(b: &Backend, hc: &HealthCheck) -> bool {
    let mut req = Request::new(Full::default());
    *req.uri_mut() = b.uri(&hc.path);
    req.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("gateway-health-check"),
    );
    if let Some(a) = b.auth() {
        // `/v1/models` needs the key on a vLLM started with `--api-key`.
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, a.clone());
    }
    let exchange = async {
        let resp = b
            .probe_client
            .request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read (a bounded part of) the body so the connection is reused.
        let _ = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await;
        Ok::<StatusCode, String>(status)
    };
    match tokio::time::timeout(hc.timeout, exchange).await {
        Ok(Ok(s)) if s.is_success() => true,
        Ok(Ok(s)) => {
            tracing::debug!(backend = %b.label, status = s.as_u16(), "health check failed");
            false
        }
        Ok(Err(e)) => {
            tracing::debug!(backend = %b.label, "health check failed: {e}");
            false
        }
        Err(_) => {
            tracing::debug!(backend = %b.label, timeout = ?hc.timeout, "health check timed out");
            false
        }
    }
}
