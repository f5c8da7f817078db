//! Backend health: what active checks and live traffic say about a backend,
//! and whether the balancer may send it a request.
//!
//! ```text
//!            N consecutive failures                 ejection over
//!   up ──────────────────────────────> ejected ───────────────────> half-open
//!    ^   (connect error, 5xx, timeout)   ^  back-off doubles           | one probe request
//!    |                                   '-----------------------------| fails
//!    '-------------------------------------------------------------------' succeeds
//!                    (with slow start: the share ramps up)
//! ```
//!
//! Active checks (when configured) move a backend between up and
//! unhealthy after `unhealthy` failures / `healthy` successes in a row; a
//! passing check also ends an ejection. The request path reads one atomic
//! flag while a backend is up; the lock is taken only on state changes and
//! while a backend is out.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use crate::config::{HealthCheck, Outlier};

/// Nanoseconds since the first call: a clock that fits an atomic.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Start at 1 so that 0 can mean "unset".
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// What the balancer may do with a backend right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// In rotation.
    Yes,
    /// Out: unhealthy, ejected, or its probe is in flight.
    No,
    /// Ejection over: one request may go as the probe.
    Probe,
}

/// Effective weights are scaled by this, so slow start can grant fractions.
pub const WEIGHT_SCALE: u64 = 1000;

/// A ramping backend gets at least this fraction of its share (1/10).
const RAMP_FLOOR_DIVISOR: u64 = 10;

#[derive(Default)]
struct Inner {
    /// Active checks said unhealthy.
    active_down: bool,
    /// Consecutive active results against the current state.
    active_streak: u32,
    /// Ejected until this time (`now_ns` clock).
    ejected_until: Option<u64>,
    /// Ejections in a row; the back-off exponent. Reset by a good probe.
    ejections: u32,
    /// A half-open probe request is in flight.
    probing: bool,
    ejection: Duration,
    max_ejection: Duration,
}

impl Inner {
    fn in_rotation(&self) -> bool {
        !self.active_down && self.ejected_until.is_none() && !self.probing
    }
}

/// A backend's health; see the module docs.
pub struct Health {
    /// Fast path: in rotation, no questions asked.
    up: AtomicBool,
    /// Consecutive failed requests.
    failures: AtomicU32,
    /// Failures in a row that eject (0 = never).
    threshold: AtomicU32,
    /// Slow start began at this time (`now_ns`), 0 = not ramping.
    ramp_since: AtomicU64,
    slow_start_ns: AtomicU64,
    inner: Mutex<Inner>,
    /// Set while an active check of this backend is running.
    pub(crate) checking: AtomicBool,
    /// When the next active check is due (`now_ns`).
    pub(crate) next_check: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            threshold: AtomicU32::new(0),
            ramp_since: AtomicU64::new(0),
            slow_start_ns: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
            checking: AtomicBool::new(false),
            next_check: AtomicU64::new(0),
        }
    }
}

/// A snapshot for `gateway backends list` and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up,
    /// Up, but still ramping to its full share.
    SlowStart,
    Unhealthy,
    Ejected,
    Probing,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "healthy",
            State::SlowStart => "slow_start",
            State::Unhealthy => "unhealthy",
            State::Ejected => "ejected",
            State::Probing => "probing",
        }
    }

    /// Whether the backend counts as healthy (`gateway_backend_healthy`).
    pub fn healthy(self) -> bool {
        matches!(self, State::Up | State::SlowStart)
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the model's settings (at start and on every reload).
    pub fn configure(&self, outlier: &Outlier, slow_start: Duration) {
        self.threshold
            .store(outlier.consecutive_failures, Ordering::Relaxed);
        self.slow_start_ns
            .store(slow_start.as_nanos() as u64, Ordering::Relaxed);
        let mut g = self.lock();
        g.ejection = outlier.ejection;
        g.max_ejection = outlier.max_ejection;
        if outlier.consecutive_failures == 0 && g.ejected_until.take().is_some() {
            // Ejection was turned off: let the backend back in.
            self.up.store(g.in_rotation(), Ordering::Relaxed);
        }
    }

    /// Whether the backend is in rotation (neither ejected nor failing
    /// its active checks).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// When an ejection (not active checks) ends and the backend may take
    /// its probe, if it is ejected now and can be probed then.
    pub fn probe_at(&self) -> Option<Instant> {
        if self.is_up() {
            return None;
        }
        let g = self.lock();
        if g.active_down || g.probing {
            return None;
        }
        let until = g.ejected_until?;
        // A millisecond late rather than a hair early (two clocks read).
        Some(
            Instant::now()
                + Duration::from_nanos(until.saturating_sub(now_ns()))
                + Duration::from_millis(1),
        )
    }

    /// Whether the balancer may pick this backend now.
    pub fn admit(&self, now: &mut Now) -> Admit {
        if self.up.load(Ordering::Relaxed) {
            return Admit::Yes;
        }
        let g = self.lock();
        if g.active_down || g.probing {
            return Admit::No;
        }
        match g.ejected_until {
            Some(until) if now.get() < until => Admit::No,
            Some(_) => Admit::Probe,
            // Only the flag was behind (a transition in progress).
            None => Admit::Yes,
        }
    }

    /// Active checks were turned off: their verdict no longer counts.
    pub fn clear_active(&self, label: &str) {
        let mut g = self.lock();
        g.active_streak = 0;
        if std::mem::take(&mut g.active_down) {
            self.back_in_rotation(&g, label, "health checks turned off");
        }
    }

    /// Claims the half-open probe slot for the request about to be sent.
    pub fn claim_probe(&self) {
        self.lock().probing = true;
    }

    /// `weight` scaled by `WEIGHT_SCALE`, reduced while slow start lasts.
    pub fn effective_weight(&self, weight: u32, now: &mut Now) -> u64 {
        let full = weight as u64 * WEIGHT_SCALE;
        let since = self.ramp_since.load(Ordering::Relaxed);
        if since == 0 {
            return full;
        }
        let span = self.slow_start_ns.load(Ordering::Relaxed);
        let elapsed = now.get().saturating_sub(since);
        if span == 0 || elapsed >= span {
            self.ramp_since.store(0, Ordering::Relaxed);
            return full;
        }
        let floor = (full / RAMP_FLOOR_DIVISOR).max(1);
        ((full as u128 * elapsed as u128 / span as u128) as u64).max(floor)
    }

    /// The outcome of a request: `true` for a usable response, `false` for
    /// a connect error, reset, timeout or 5xx. `probe`: it was the
    /// half-open probe.
    pub fn report(&self, ok: bool, probe: bool, label: &str) {
        if ok {
            if probe {
                let mut g = self.lock();
                g.probing = false;
                g.ejected_until = None;
                g.ejections = 0;
                self.failures.store(0, Ordering::Relaxed);
                self.back_in_rotation(&g, label, "probe request succeeded");
            } else if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        if probe {
            let mut g = self.lock();
            g.probing = false;
            self.eject(&mut g, label, "probe request failed");
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = self.threshold.load(Ordering::Relaxed);
        if threshold > 0 && n >= threshold {
            let mut g = self.lock();
            if g.ejected_until.is_none() && !g.probing {
                self.eject(&mut g, label, "consecutive failures");
            }
        }
    }

    /// A probe request ended without an outcome (the client left first):
    /// the next request may probe instead.
    pub fn abandon_probe(&self) {
        self.lock().probing = false;
    }

    fn eject(&self, g: &mut Inner, label: &str, why: &str) {
        let shift = g.ejections.min(16);
        let span = g
            .ejection
            .saturating_mul(1 << shift)
            .min(g.max_ejection.max(g.ejection));
        g.ejections = g.ejections.saturating_add(1);
        g.ejected_until = Some(now_ns() + span.as_nanos() as u64);
        self.failures.store(0, Ordering::Relaxed);
        self.up.store(false, Ordering::Relaxed);
        tracing::warn!(backend = label, ejection = ?span, "backend ejected: {why}");
    }

    fn back_in_rotation(&self, g: &Inner, label: &str, why: &str) {
        if !g.in_rotation() {
            return;
        }
        if self.slow_start_ns.load(Ordering::Relaxed) > 0 {
            self.ramp_since.store(now_ns(), Ordering::Relaxed);
        }
        self.up.store(true, Ordering::Relaxed);
        tracing::info!(backend = label, "backend back in rotation: {why}");
    }

    /// The result of one active check.
    pub fn active_result(&self, ok: bool, hc: &HealthCheck, label: &str) {
        let mut g = self.lock();
        if ok != g.active_down {
            // Agrees with the current state.
            g.active_streak = 0;
            if ok && g.ejected_until.is_some() && !g.probing {
                // A passing check ends an ejection early.
                g.ejected_until = None;
                g.ejections = 0;
                self.failures.store(0, Ordering::Relaxed);
                self.back_in_rotation(&g, label, "health check passed");
            }
            return;
        }
        g.active_streak += 1;
        let needed = if ok { hc.healthy } else { hc.unhealthy };
        if g.active_streak < needed {
            return;
        }
        g.active_streak = 0;
        g.active_down = !ok;
        if ok {
            g.ejected_until = None;
            g.ejections = 0;
            self.failures.store(0, Ordering::Relaxed);
            self.back_in_rotation(&g, label, "health checks passed");
        } else {
            self.up.store(false, Ordering::Relaxed);
            tracing::warn!(
                backend = label,
                "backend unhealthy: {} health checks failed in a row",
                hc.unhealthy
            );
        }
    }

    pub fn state(&self) -> State {
        let g = self.lock();
        if g.active_down {
            State::Unhealthy
        } else if g.probing {
            State::Probing
        } else if g.ejected_until.is_some() {
            State::Ejected
        } else if self.ramp_since.load(Ordering::Relaxed) != 0
            && self.effective_weight(1, &mut Now::default()) < WEIGHT_SCALE
        {
            State::SlowStart
        } else {
            State::Up
        }
    }

    /// Consecutive failed requests so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The time, read at most once per balancing decision.
#[derive(Default)]
pub struct Now(u64);

impl Now {
    pub fn get(&mut self) -> u64 {
        if self.0 == 0 {
            self.0 = now_ns();
        }
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(n: u32, ejection_ms: u64) -> Outlier {
        Outlier {
            consecutive_failures: n,
            ejection: Duration::from_millis(ejection_ms),
            max_ejection: Duration::from_millis(ejection_ms * 4),
        }
    }

    fn admit(h: &Health) -> Admit {
        h.admit(&mut Now::default())
    }

    #[test]
    fn consecutive_failures_eject_and_a_probe_readmits() {
        let h = Health::default();
        h.configure(&outlier(3, 30), Duration::ZERO);
        h.report(false, false, "b");
        h.report(false, false, "b");
        h.report(true, false, "b");
        assert_eq!(admit(&h), Admit::Yes, "a success resets the count");
        for _ in 0..3 {
            h.report(false, false, "b");
        }
        assert_eq!(admit(&h), Admit::No);
        assert_eq!(h.state(), State::Ejected);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(admit(&h), Admit::Probe);
        h.claim_probe();
        assert_eq!(admit(&h), Admit::No, "one probe at a time");
        h.report(true, true, "b");
        assert_eq!(admit(&h), Admit::Yes);
        assert_eq!(h.state(), State::Up);
    }

    #[test]
    fn a_failed_probe_doubles_the_ejection_up_to_the_cap() {
        let h = Health::default();
        h.configure(&outlier(1, 20), Duration::ZERO);
        h.report(false, false, "b");
        let until = |h: &Health| h.lock().ejected_until.unwrap() - now_ns();
        assert!(until(&h) <= 20_000_000);
        h.lock().probing = true;
        h.report(false, true, "b");
        let d = until(&h);
        assert!(d > 20_000_000 && d <= 40_000_000, "{d}");
        for _ in 0..5 {
            h.lock().probing = true;
            h.report(false, true, "b");
        }
        assert!(until(&h) <= 80_000_000, "capped at max_ejection");
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let h = Health::default();
        h.configure(&outlier(1, 1), Duration::ZERO);
        h.report(false, false, "b");
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(admit(&h), Admit::Probe);
        h.claim_probe();
        h.abandon_probe();
        assert_eq!(admit(&h), Admit::Probe);
    }

    #[test]
    fn active_checks_need_streaks_and_end_ejections() {
        let hc = HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
        };
        let h = Health::default();
        h.configure(&outlier(1, 60_000), Duration::ZERO);
        h.active_result(false, &hc, "b");
        h.active_result(false, &hc, "b");
        assert_eq!(admit(&h), Admit::Yes);
        h.active_result(false, &hc, "b");
        assert_eq!(admit(&h), Admit::No);
        assert_eq!(h.state(), State::Unhealthy);
        h.active_result(true, &hc, "b");
        assert_eq!(admit(&h), Admit::No);
        h.active_result(true, &hc, "b");
        assert_eq!(admit(&h), Admit::Yes);
        // Ejected by traffic, readmitted by a passing check.
        h.report(false, false, "b");
        assert_eq!(admit(&h), Admit::No);
        h.active_result(true, &hc, "b");
        assert_eq!(admit(&h), Admit::Yes);
    }

    #[test]
    fn slow_start_ramps_the_weight() {
        let h = Health::default();
        h.configure(&outlier(1, 1), Duration::from_millis(200));
        h.report(false, false, "b");
        std::thread::sleep(Duration::from_millis(3));
        h.claim_probe();
        h.report(true, true, "b");
        let w = h.effective_weight(2, &mut Now::default());
        assert!(
            (2 * WEIGHT_SCALE / 10..2 * WEIGHT_SCALE / 2).contains(&w),
            "starts low: {w}"
        );
        assert_eq!(h.state(), State::SlowStart);
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(h.effective_weight(2, &mut Now::default()), 2 * WEIGHT_SCALE);
        assert_eq!(h.state(), State::Up);
    }

    #[test]
    fn zero_threshold_never_ejects() {
        let h = Health::default();
        h.configure(&outlier(0, 10), Duration::ZERO);
        for _ in 0..100 {
            h.report(false, false, "b");
        }
        assert_eq!(admit(&h), Admit::Yes);
    }
}
