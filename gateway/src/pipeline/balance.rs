//! Weighted least connections: a request goes to the backend with the
//! fewest in-flight requests per unit of weight; backends at their
//! `max_connections` are skipped. Ties (all idle, say) are broken by smooth
//! weighted round robin, so sequential traffic still follows the weights and
//! equal backends take turns instead of the first one taking everything.

use std::sync::{Arc, Mutex};

use crate::{error::ProxyError, upstream::Backend, upstream::Lease};

/// Per-model balancer state: the smooth-WRR credit of each backend.
pub struct Balancer {
    credit: Mutex<Vec<i64>>,
}

impl Balancer {
    pub fn new(backends: usize) -> Balancer {
        Balancer {
            credit: Mutex::new(vec![0; backends]),
        }
    }

    /// Picks a backend and leases a slot on it.
    pub fn pick(&self, model: &str, backends: &[Arc<Backend>]) -> Result<Lease, ProxyError> {
        if backends.is_empty() {
            return Err(ProxyError::NoBackend(model.to_owned()));
        }
        // The lock covers reading loads and taking the slot, so two
        // concurrent picks cannot both see the same idle backend.
        let mut credit = self.credit.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<(u64, u64)> = None; // (in_flight, weight) of the least loaded
        for b in backends.iter().filter(|b| b.available()) {
            let load = (b.in_flight() as u64, b.weight as u64);
            if best.is_none_or(|(i, w)| load.0 * w < i * load.1) {
                best = Some(load);
            }
        }
        let Some((bi, bw)) = best else {
            return Err(ProxyError::Overloaded {
                model: model.to_owned(),
                retry_after_secs: super::routes::OVERLOADED_RETRY_AFTER.as_secs() as u32,
            });
        };
        // Smooth weighted round robin among the least-loaded ties.
        let mut total = 0i64;
        let mut chosen: Option<usize> = None;
        for (i, b) in backends.iter().enumerate() {
            if !b.available() || b.in_flight() as u64 * bw != bi * b.weight as u64 {
                continue;
            }
            credit[i] += b.weight as i64;
            total += b.weight as i64;
            if chosen.is_none_or(|c| credit[i] > credit[c]) {
                chosen = Some(i);
            }
        }
        let i = chosen.expect("the least loaded backend is among the ties");
        credit[i] -= total;
        Ok(backends[i].lease())
    }
}
