//! Choosing a backend. Weighted least connections: a request goes to the
//! backend with the fewest in-flight requests per unit of (effective)
//! weight; backends that are drained, at their `max_connections`,
//! unhealthy or ejected are skipped, and a backend in slow start counts
//! with a reduced weight. Ties (all idle, say) are broken by smooth
//! weighted round robin, so sequential traffic still follows the weights and
//! equal backends take turns instead of the first one taking everything.
//!
//! When every backend is at its cap, the request waits in the model's
//! bounded admission queue until a slot frees or the queue timeout passes
//! (503 + Retry-After).

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::Instant,
};

use crate::{
    config::Queue,
    error::ProxyError,
    upstream::{
        health::{Admit, Now},
        Backend, Lease, Slots,
    },
};

/// Per-model balancer state: the smooth-WRR credit of each backend.
pub struct Balancer {
    credit: Mutex<Vec<i64>>,
}

/// Why no backend could be picked.
#[derive(Debug, PartialEq, Eq)]
pub enum NoPick {
    /// Some backend is healthy but all such are at their cap.
    Full,
    /// None is in rotation (all unhealthy, ejected, drained or excluded).
    NoneHealthy,
}

/// Backends a request already tried (indices), to retry elsewhere.
pub type Tried = smallvec::SmallVec<[usize; 4]>;

impl Balancer {
    pub fn new(backends: usize) -> Balancer {
        Balancer {
            credit: Mutex::new(vec![0; backends]),
        }
    }

    /// Picks a backend not in `exclude` and leases a slot on it; returns
    /// its index too.
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        exclude: &[usize],
    ) -> Result<(usize, Lease), NoPick> {
        let mut now = Now::default();
        // The lock covers reading loads and taking the slot, so two
        // concurrent picks cannot both see the same idle backend.
        let mut credit = self.credit.lock().unwrap_or_else(|p| p.into_inner());
        // (index, in_flight, effective weight, probe) of each candidate.
        let mut cands: smallvec::SmallVec<[(usize, u64, u64, bool); 8]> = Default::default();
        let mut full = false;
        for (i, b) in backends.iter().enumerate() {
            if b.drained() || exclude.contains(&i) {
                continue;
            }
            let admit = b.health.admit(&mut now);
            if admit == Admit::No {
                continue;
            }
            if b.full() {
                full = true;
                continue;
            }
            let w = b.health.effective_weight(b.weight, &mut now);
            cands.push((i, b.in_flight() as u64, w, admit == Admit::Probe));
        }
        // An ejected backend whose time is up gets the request as its probe.
        if let Some(&(i, ..)) = cands.iter().find(|c| c.3) {
            return Ok((i, backends[i].lease(true)));
        }
        let Some(&(_, bi, bw, _)) = cands.iter().min_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)))
        else {
            return Err(if full {
                NoPick::Full
            } else {
                NoPick::NoneHealthy
            });
        };
        // Smooth weighted round robin among the least-loaded ties.
        let mut total = 0i64;
        let mut chosen: Option<usize> = None;
        for &(i, inf, w, _) in &cands {
            if inf * bw != bi * w {
                continue;
            }
            credit[i] += w as i64;
            total += w as i64;
            if chosen.is_none_or(|c| credit[i] > credit[c]) {
                chosen = Some(i);
            }
        }
        let i = chosen.expect("the least loaded backend is among the ties");
        credit[i] -= total;
        Ok((i, backends[i].lease(false)))
    }

    /// Picks a backend, waiting in the admission queue while every healthy
    /// backend is full. `tried` backends are avoided (retries go elsewhere).
    pub async fn acquire(
        &self,
        model: &str,
        backends: &[Arc<Backend>],
        tried: &Tried,
        queue: &Queue,
        deadline: Instant,
    ) -> Result<(usize, Lease), ProxyError> {
        let overloaded = || ProxyError::Overloaded {
            model: model.to_owned(),
            retry_after_secs: super::routes::OVERLOADED_RETRY_AFTER.as_secs() as u32,
        };
        match self.pick(backends, tried) {
            Ok(p) => return Ok(p),
            Err(NoPick::NoneHealthy) => return Err(ProxyError::NoBackend(model.to_owned())),
            Err(NoPick::Full) if queue.size == 0 => return Err(overloaded()),
            Err(NoPick::Full) => {}
        }
        let Some(slots) = backends.first().map(|b| Arc::clone(b.slots())) else {
            return Err(ProxyError::NoBackend(model.to_owned()));
        };
        let Some(_place) = Waiting::join(&slots, queue.size) else {
            return Err(overloaded());
        };
        let deadline = deadline.min(Instant::now() + queue.timeout);
        loop {
            // Registered before looking, so a slot freed in between still wakes us.
            let freed = slots.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.pick(backends, tried) {
                Ok(p) => {
                    // Pass the wake-up on if more slots may be free.
                    slots.wake();
                    return Ok(p);
                }
                Err(NoPick::NoneHealthy) => return Err(ProxyError::NoBackend(model.to_owned())),
                Err(NoPick::Full) => {}
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = tokio::time::sleep_until(deadline.into()) => return Err(overloaded()),
            }
        }
    }
}

/// A place in the admission queue, given back on drop.
struct Waiting<'a>(&'a Slots);

impl<'a> Waiting<'a> {
    fn join(slots: &'a Slots, size: u32) -> Option<Waiting<'a>> {
        slots
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < size).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiting(slots))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}
