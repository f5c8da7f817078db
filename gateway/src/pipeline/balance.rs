//! Choosing a backend within a model (or one of its traffic groups).
//!
//! Every policy sees the same candidates: backends that are not drained,
//! not at `max_connections`, not unhealthy or ejected, and not already
//! tried by this request. A backend whose ejection is over gets the request
//! as its half-open probe whatever the policy. Weights are effective
//! weights: reduced while a backend is in slow start. The policies:
//!
//! | policy | choice |
//! |---|---|
//! | `weighted_least_connections` (default) | fewest in-flight per unit of weight; ties by smooth WRR |
//! | `round_robin` | each candidate in turn, weights ignored |
//! | `weighted_round_robin` | smooth WRR (nginx): interleaved, no bursts to one backend |
//! | `random` | weighted random |
//! | `power_of_two` | two weighted-random candidates, the one with fewer in flight wins (a tie: the first) |
//! | `consistent_hash` | a hash ring on a request attribute, bounded load (1.25x the mean) |
//! | `latency` | two random candidates, the lower EWMA of time to first byte x load x errors wins (within 25%: a tie); 10% of picks explore at random |
//!
//! When every healthy backend is at its cap, the request waits in the
//! model's bounded admission queue until a slot frees or the queue timeout
//! passes (503 + Retry-After). The queue is FIFO while every waiter can
//! take any slot (see `upstream::Slots::wake`).

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use crate::{
    config::{Policy, Queue},
    error::ProxyError,
    upstream::{
        health::{Admit, Now, WEIGHT_SCALE},
        Backend, Lease, Slots,
    },
};

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

/// Ring points per unit of weight (consistent_hash).
const VNODES_PER_WEIGHT: u32 = 100;
/// At most this many ring points per backend.
const MAX_VNODES: u32 = 2000;
/// consistent_hash: no backend takes more than this times its fair share.
const LOAD_BOUND: f64 = 1.25;
/// latency: the share of picks made at random, so every backend keeps
/// being measured.
const EXPLORE_PER_MILLE: u64 = 100;
/// latency: added to every latency average, so differences far below a
/// model's time to first token (scheduling noise) do not decide a pick.
const LATENCY_FLOOR_US: f64 = 5000.0;
/// latency: scores closer than this factor count as equal.
const LATENCY_TIE: f64 = 1.25;
/// latency: how much a backend's error rate inflates its score.
const ERROR_PENALTY: f64 = 8.0;

/// One backend the policy may choose.
#[derive(Clone, Copy)]
struct Cand {
    index: usize,
    in_flight: u64,
    /// Effective weight (scaled by WEIGHT_SCALE).
    weight: u64,
    /// Configured weight, scaled.
    full: u64,
}

/// Per-model (per-group) balancer.
pub struct Balancer {
    policy: Policy,
    /// Smooth-WRR credit of each backend; the lock also makes "read the
    /// loads, take the slot" one step, so concurrent picks cannot both
    /// see the same idle backend under its cap.
    credit: Mutex<Vec<i64>>,
    /// round_robin position.
    next: AtomicUsize,
    /// consistent_hash: (point, backend index), sorted by point.
    ring: Vec<(u64, u32)>,
}

impl Balancer {
    pub fn new(policy: Policy, backends: &[Arc<Backend>]) -> Balancer {
        let ring = if matches!(policy, Policy::ConsistentHash) {
            build_ring(backends)
        } else {
            Vec::new()
        };
        Balancer {
            policy,
            credit: Mutex::new(vec![0; backends.len()]),
            next: AtomicUsize::new(0),
            ring,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Picks a backend in rotation, not in `exclude`, and leases a slot on
    /// it; returns its index too. `hash` is the request's attribute hash
    /// (used by consistent_hash only).
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        exclude: &[usize],
        hash: u64,
    ) -> Result<(usize, Lease), NoPick> {
        self.choose(backends, exclude, hash, false)
    }

    /// [`Balancer::pick`] in panic mode: when health has taken every
    /// backend out of rotation (ejected, failing active checks), the pick
    /// goes over those instead of refusing. Ejection is there to move
    /// traffic to better backends; with none left anywhere (the caller
    /// has tried the other traffic groups), a chance of an answer beats a
    /// certain 503 (Envoy's panic threshold does the same; a model with
    /// one backend would otherwise refuse everyone for the whole
    /// ejection).
    pub fn pick_in_panic(
        &self,
        backends: &[Arc<Backend>],
        exclude: &[usize],
        hash: u64,
    ) -> Result<(usize, Lease), NoPick> {
        self.choose(backends, exclude, hash, true)
    }

    fn choose(
        &self,
        backends: &[Arc<Backend>],
        exclude: &[usize],
        hash: u64,
        panic: bool,
    ) -> Result<(usize, Lease), NoPick> {
        let mut now = Now::default();
        let mut credit = self.credit.lock().unwrap_or_else(|p| p.into_inner());
        let mut cands: smallvec::SmallVec<[Cand; 8]> = Default::default();
        // Out of rotation for health alone, with room: panic mode's.
        let mut resting: smallvec::SmallVec<[Cand; 8]> = Default::default();
        let (mut full, mut resting_full) = (false, false);
        for (i, b) in backends.iter().enumerate() {
            if b.drained() || exclude.contains(&i) {
                continue;
            }
            let admit = b.health.admit(&mut now);
            if b.full() {
                if admit == Admit::No {
                    resting_full = true;
                } else {
                    full = true;
                }
                continue;
            }
            if admit == Admit::Probe {
                // An ejected backend whose time is up: this request probes it.
                return Ok((i, b.lease(true)));
            }
            if admit == Admit::No && !panic {
                continue;
            }
            let weight = b.weight();
            let c = Cand {
                index: i,
                in_flight: b.in_flight() as u64,
                weight: b.health.effective_weight(weight, &mut now),
                full: weight as u64 * WEIGHT_SCALE,
            };
            if admit == Admit::No {
                resting.push(c);
            } else {
                cands.push(c);
            }
        }
        if cands.is_empty() {
            if full {
                return Err(NoPick::Full);
            }
            if resting.is_empty() {
                // In panic mode, resting backends at their cap are full
                // ones: wait for them rather than answer no_backend.
                return Err(if panic && resting_full {
                    NoPick::Full
                } else {
                    NoPick::NoneHealthy
                });
            }
            cands = resting;
        }
        let i = match self.policy {
            Policy::LeastConnections => least_connections(&cands, &mut credit),
            Policy::RoundRobin => self.round_robin(&cands),
            Policy::WeightedRoundRobin => smooth_wrr(cands.iter(), &mut credit),
            Policy::Random => weighted_random(&cands),
            Policy::PowerOfTwo => power_of_two(&cands, 1.0, |c| c.in_flight as f64),
            Policy::ConsistentHash => self.consistent_hash(&cands, hash),
            Policy::Latency => latency(&cands, backends),
        };
        Ok((i, backends[i].lease(false)))
    }

    /// Each candidate in turn. A backend in slow start is passed over with
    /// the probability of its missing share.
    fn round_robin(&self, cands: &[Cand]) -> usize {
        for _ in 0..cands.len() {
            let c = cands[self.next.fetch_add(1, Ordering::Relaxed) % cands.len()];
            if c.weight >= c.full || rand_below(c.full) < c.weight {
                return c.index;
            }
        }
        cands[0].index
    }

    /// The first backend clockwise from `hash` on the ring that is a
    /// candidate and under its load bound.
    fn consistent_hash(&self, cands: &[Cand], hash: u64) -> usize {
        let total: u64 = cands.iter().map(|c| c.in_flight).sum();
        let weights: u64 = cands.iter().map(|c| c.weight).sum();
        let bound = |c: &Cand| {
            let share = (total + 1) as f64 * c.weight as f64 / weights as f64;
            (c.in_flight + 1) as f64 <= (LOAD_BOUND * share).ceil()
        };
        let start = self.ring.partition_point(|(p, _)| *p < hash);
        for k in 0..self.ring.len() {
            let (_, i) = self.ring[(start + k) % self.ring.len()];
            if let Some(c) = cands.iter().find(|c| c.index == i as usize) {
                if bound(c) {
                    return c.index;
                }
            }
        }
        // Every candidate over its bound (tiny weights): the least loaded.
        least_loaded(cands).index
    }

    /// A pick, in panic mode too when `panic` and none is in rotation: a
    /// panic pick that finds every resting backend full waits in the queue
    /// like any other (`Full`), and only no backend at all is `NoneHealthy`.
    fn look(
        &self,
        backends: &[Arc<Backend>],
        tried: &[usize],
        hash: u64,
        panic: bool,
    ) -> Result<(usize, Lease), NoPick> {
        match self.pick(backends, tried, hash) {
            Err(NoPick::NoneHealthy) if panic => self.pick_in_panic(backends, tried, hash),
            other => other,
        }
    }

    /// Picks a backend, waiting in the admission queue while every healthy
    /// backend is full. With `panic`, backends that health took out are
    /// picked (and waited for) when none is in rotation. `tried` backends
    /// are avoided (retries go elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub async fn acquire(
        &self,
        model: &str,
        backends: &[Arc<Backend>],
        tried: &Tried,
        hash: u64,
        queue: &Queue,
        deadline: Instant,
        panic: bool,
    ) -> Result<(usize, Lease), ProxyError> {
        let overloaded = || ProxyError::Overloaded {
            model: model.to_owned(),
            retry_after_secs: super::routes::OVERLOADED_RETRY_AFTER.as_secs() as u32,
        };
        let Some(slots) = backends.first().map(|b| b.slots()) else {
            return Err(ProxyError::NoBackend(model.to_owned()));
        };
        // A request that could take any slot does not take one from under
        // the requests already queued for it: it queues behind them (FIFO).
        // (`fifo` holds only for a model without traffic groups.)
        // With no backend in rotation (and no panic mode here) it looks at
        // once instead, to learn so (another group or a fallback model then
        // take over); in panic mode the resting backends' slots are queued
        // for in order too.
        let behind = slots.waiting.load(Ordering::SeqCst) > 0
            && tried.is_empty()
            && slots.fifo()
            && backends
                .iter()
                .any(|b| !b.drained() && (panic || b.health.is_up()));
        if !behind {
            match self.look(backends, tried, hash, panic) {
                Ok(p) => return Ok(p),
                Err(NoPick::NoneHealthy) => return Err(ProxyError::NoBackend(model.to_owned())),
                Err(NoPick::Full) if queue.size == 0 => return Err(overloaded()),
                Err(NoPick::Full) => {}
            }
        }
        let picky = !tried.is_empty() || slots.grouped();
        let slots = Arc::clone(slots);
        let Some(_place) = Waiting::join(&slots, queue.size, picky) else {
            return Err(overloaded());
        };
        let deadline = deadline.min(Instant::now() + queue.timeout);
        let give_up = tokio::time::sleep_until(deadline.into());
        tokio::pin!(give_up);
        let mut first = true;
        loop {
            // Registered before looking, so a slot freed in between still wakes us.
            let freed = slots.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Pairs with the SeqCst release of a slot (`Lease::drop`): a
            // slot freed before this is seen by the pick below, one freed
            // after it sees this request waiting and wakes it.
            std::sync::atomic::fence(Ordering::SeqCst);
            // Queued behind others, the first look waits for its turn (a
            // wake-up, in order) unless those others have gone meanwhile:
            // then no wake-up may come for a slot already free.
            let my_turn = !(first && behind && slots.waiting.load(Ordering::SeqCst) > 1);
            first = false;
            if my_turn {
                match self.look(backends, tried, hash, panic) {
                    Ok(p) => {
                        // Slots freed while waiters were between a wake-up
                        // and their next look are one stored wake-up at
                        // most: with room left (on a backend in rotation)
                        // and others waiting, the next in line is woken, so
                        // no slot stays idle.
                        if slots.waiting.load(Ordering::SeqCst) > 1
                            && backends
                                .iter()
                                .any(|b| (panic || b.health.is_up()) && b.available())
                        {
                            slots.freed.notify_one();
                        }
                        return Ok(p);
                    }
                    Err(NoPick::NoneHealthy) => {
                        // The others waiting learn it now, not one per
                        // freed slot.
                        slots.wake_all();
                        return Err(ProxyError::NoBackend(model.to_owned()));
                    }
                    Err(NoPick::Full) => {}
                }
            }
            // An ejected backend whose ejection ends before the wait does
            // may take this request as its probe then: look again at that
            // moment (nothing else wakes the queue for it).
            let probe_at = backends
                .iter()
                .filter(|b| b.available())
                .filter_map(|b| b.health.probe_at())
                .min()
                .filter(|at| *at < deadline);
            let probe = async {
                match probe_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A wake-up that came is used, never dropped for the timer:
                // under FIFO it is this request's alone.
                biased;
                _ = &mut freed => {}
                _ = &mut give_up => return Err(overloaded()),
                _ = probe => {}
            }
        }
    }
}

/// Weighted least connections; ties by smooth WRR.
fn least_connections(cands: &[Cand], credit: &mut [i64]) -> usize {
    let best = least_loaded(cands);
    smooth_wrr(
        cands
            .iter()
            .filter(|c| c.in_flight * best.weight == best.in_flight * c.weight),
        credit,
    )
}

/// The candidate with the fewest in-flight requests per unit of weight.
fn least_loaded(cands: &[Cand]) -> Cand {
    *cands
        .iter()
        .min_by(|a, b| (a.in_flight * b.weight).cmp(&(b.in_flight * a.weight)))
        .expect("at least one candidate")
}

/// nginx's smooth weighted round robin: every candidate gains its weight
/// in credit, the richest is chosen and pays the total.
fn smooth_wrr<'a>(cands: impl Iterator<Item = &'a Cand>, credit: &mut [i64]) -> usize {
    let mut total = 0i64;
    let mut chosen: Option<usize> = None;
    for c in cands {
        credit[c.index] += c.weight as i64;
        total += c.weight as i64;
        if chosen.is_none_or(|x| credit[c.index] > credit[x]) {
            chosen = Some(c.index);
        }
    }
    let i = chosen.expect("at least one candidate");
    credit[i] -= total;
    i
}

fn weighted_random(cands: &[Cand]) -> usize {
    cands[random_position(cands)].index
}

fn random_position(cands: &[Cand]) -> usize {
    let total: u64 = cands.iter().map(|c| c.weight).sum();
    let mut r = rand_below(total);
    for (k, c) in cands.iter().enumerate() {
        if r < c.weight {
            return k;
        }
        r -= c.weight;
    }
    cands.len() - 1
}

/// Two distinct weighted-random candidates; the lower `cost` wins, unless
/// the two are within a factor `tie` of each other: then the first (itself
/// drawn by weight) does, so equal backends share by weight instead of the
/// marginally better one taking everything.
fn power_of_two(cands: &[Cand], tie: f64, cost: impl Fn(&Cand) -> f64) -> usize {
    if cands.len() == 1 {
        return cands[0].index;
    }
    let a = random_position(cands);
    let mut b = random_position(cands);
    if b == a {
        b = (a + 1 + rand_below(cands.len() as u64 - 1) as usize) % cands.len();
    }
    let (x, y) = (&cands[a], &cands[b]);
    let (sx, sy) = (cost(x), cost(y));
    if sx <= sy * tie {
        x.index
    } else {
        y.index
    }
}

/// Power of two choices on EWMA latency x load x errors; a share of picks
/// explores at random so a backend that was slow is measured again.
fn latency(cands: &[Cand], backends: &[Arc<Backend>]) -> usize {
    if rand_below(1000) < EXPLORE_PER_MILLE {
        return weighted_random(cands);
    }
    power_of_two(cands, LATENCY_TIE, |c| {
        let o = &backends[c.index].observed;
        // A backend never measured scores best, so it gets measured.
        (o.latency_us() + LATENCY_FLOOR_US)
            * (c.in_flight as f64 + 1.0)
            * (1.0 + ERROR_PENALTY * o.error_rate())
            / c.weight as f64
    })
}

fn build_ring(backends: &[Arc<Backend>]) -> Vec<(u64, u32)> {
    let mut ring = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let n = (b.weight().saturating_mul(VNODES_PER_WEIGHT)).min(MAX_VNODES);
        for v in 0..n {
            // Points depend on the backend's URL, not its position, so
            // adding or removing one moves only the keys it owns.
            ring.push((
                hash_parts(&[b.label.as_bytes(), &v.to_le_bytes()]),
                i as u32,
            ));
        }
    }
    ring.sort_unstable();
    ring
}

/// FNV-1a over the parts, then a 64-bit finalizer (splitmix64) so nearby
/// inputs spread over the ring. Stable across processes and versions.
pub fn hash_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A uniform number below `n` (> 0) from a per-thread xorshift generator.
pub fn rand_below(n: u64) -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b) | 1
        });
    }
    let x = STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    ((x as u128 * n.max(1) as u128) >> 64) as u64
}

/// A place in the admission queue, given back on drop.
struct Waiting<'a> {
    slots: &'a Slots,
    picky: bool,
}

impl<'a> Waiting<'a> {
    fn join(slots: &'a Slots, size: u32, picky: bool) -> Option<Waiting<'a>> {
        // Counted picky before waiting, so a slot freed meanwhile is never
        // handed to one waiter when this one needed to look too.
        if picky {
            slots.picky.fetch_add(1, Ordering::SeqCst);
        }
        let joined = slots
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < size).then_some(n + 1)
            });
        if joined.is_err() {
            if picky {
                slots.picky.fetch_sub(1, Ordering::SeqCst);
            }
            return None;
        }
        Some(Waiting { slots, picky })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.slots.waiting.fetch_sub(1, Ordering::SeqCst);
        if self.picky {
            self.slots.picky.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests;
