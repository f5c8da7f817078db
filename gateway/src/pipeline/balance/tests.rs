//! Every policy: distribution, stickiness, load awareness, and that none
//! of them sends a request to a drained, full or ejected backend.

use std::{collections::HashMap, sync::Arc, time::Duration};

use super::*;
use crate::config::{BackendConfig, Outlier};

fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
    let slots = Arc::new(Slots::default());
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| backend(i, *w, None, &slots))
        .collect()
}

fn backend(i: usize, weight: u32, max: Option<u32>, slots: &Arc<Slots>) -> Arc<Backend> {
    let cfg = BackendConfig {
        url: format!("http://10.0.0.{}:8000", i + 1).parse().unwrap(),
        weight,
        max_connections: max,
        group: None,
        api_key: None,
        tls_ca: None,
    };
    Arc::new(Backend::new(
        &cfg,
        Duration::from_secs(1),
        1,
        Arc::clone(slots),
    ))
}

/// Picks `n` times (leases dropped at once); counts per backend index.
fn spread(b: &Balancer, bs: &[Arc<Backend>], n: usize, hash: impl Fn(usize) -> u64) -> Vec<usize> {
    let mut counts = vec![0; bs.len()];
    for k in 0..n {
        let (i, _lease) = b.pick(bs, &[], hash(k)).unwrap();
        counts[i] += 1;
    }
    counts
}

fn within(got: usize, want: f64, tolerance: f64) -> bool {
    (got as f64 - want).abs() <= want * tolerance
}

#[test]
fn round_robin_takes_turns_ignoring_weights() {
    let bs = backends(&[5, 1, 1]);
    let b = Balancer::new(Policy::RoundRobin, &bs);
    let order: Vec<usize> = (0..6).map(|_| b.pick(&bs, &[], 0).unwrap().0).collect();
    assert_eq!(order, [0, 1, 2, 0, 1, 2]);
}

#[test]
fn weighted_round_robin_is_exact_and_interleaved() {
    let bs = backends(&[5, 1, 1]);
    let b = Balancer::new(Policy::WeightedRoundRobin, &bs);
    let order: Vec<usize> = (0..700).map(|_| b.pick(&bs, &[], 0).unwrap().0).collect();
    for window in order.chunks(7) {
        let mut c = [0; 3];
        window.iter().for_each(|i| c[*i] += 1);
        assert_eq!(c, [5, 1, 1], "every 7 picks follow the weights exactly");
    }
    let longest = order
        .chunk_by(|a, b| a == b)
        .filter(|r| r[0] == 0)
        .map(|r| r.len())
        .max()
        .unwrap();
    assert!(
        longest < 5,
        "no burst of the heavy backend's whole share: {longest}"
    );
}

#[test]
fn random_follows_weights() {
    let bs = backends(&[3, 1]);
    let b = Balancer::new(Policy::Random, &bs);
    let c = spread(&b, &bs, 20_000, |_| 0);
    assert!(
        within(c[0], 15_000.0, 0.03) && within(c[1], 5_000.0, 0.06),
        "{c:?}"
    );
}

#[test]
fn power_of_two_prefers_the_less_loaded() {
    let bs = backends(&[1, 1, 1]);
    let b = Balancer::new(Policy::PowerOfTwo, &bs);
    // Backend 0 is busy with 10 requests, backend 1 with 3, backend 2 idle.
    let _held: Vec<Lease> = (0..10)
        .map(|_| bs[0].lease(false))
        .chain((0..3).map(|_| bs[1].lease(false)))
        .collect();
    let c = spread(&b, &bs, 3_000, |_| 0);
    assert_eq!(c[0], 0, "the busiest never wins a pair: {c:?}");
    // Backend 2 wins every pair it is in (2 of 3 pairs), backend 1 the rest.
    assert!(
        within(c[2], 2_000.0, 0.08) && within(c[1], 1_000.0, 0.15),
        "{c:?}"
    );
}

#[test]
fn consistent_hash_is_sticky_even_and_moves_little() {
    let bs = backends(&[1, 1, 1, 1]);
    let b = Balancer::new(Policy::ConsistentHash, &bs);
    let key = |k: usize| hash_parts(&[format!("user-{k}").as_bytes()]);
    let owner = |b: &Balancer, bs: &[Arc<Backend>], k: usize| b.pick(bs, &[], key(k)).unwrap().0;
    for k in 0..100 {
        assert_eq!(
            owner(&b, &bs, k),
            owner(&b, &bs, k),
            "same key, same backend"
        );
    }
    let c = spread(&b, &bs, 20_000, key);
    for n in &c {
        assert!(within(*n, 5_000.0, 0.25), "even within 25%: {c:?}");
    }
    // A fifth backend takes about a fifth of the keys, only from the others.
    let mut more = bs.clone();
    more.push(backend(4, 1, None, bs[0].slots()));
    let b5 = Balancer::new(Policy::ConsistentHash, &more);
    let mut moved = 0;
    for k in 0..20_000 {
        let (before, after) = (owner(&b, &bs, k), owner(&b5, &more, k));
        if before != after {
            assert_eq!(after, 4, "a key moves only to the new backend");
            moved += 1;
        }
    }
    assert!(
        within(moved, 4_000.0, 0.3),
        "about 1/5 of keys move: {moved}"
    );
}

#[test]
fn consistent_hash_bounds_the_load_of_a_hot_key() {
    let bs = backends(&[1, 1, 1, 1]);
    let b = Balancer::new(Policy::ConsistentHash, &bs);
    let hot = hash_parts(&[b"hot"]);
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(b.pick(&bs, &[], hot).unwrap());
    }
    let mut per = HashMap::new();
    for (i, _) in &held {
        *per.entry(*i).or_insert(0) += 1;
    }
    let max = per.values().max().unwrap();
    // 40 requests over 4 backends: at most 1.25 x the mean (plus one).
    assert!(*max <= 14, "a hot key spills over: {per:?}");
    assert!(per.len() > 1);
}

#[test]
fn latency_moves_load_off_a_slow_backend_and_back() {
    let bs = backends(&[1, 1]);
    let b = Balancer::new(Policy::Latency, &bs);
    for _ in 0..5 {
        bs[0].observed.success(Duration::from_millis(1));
        bs[1].observed.success(Duration::from_millis(100));
    }
    let c = spread(&b, &bs, 2_000, |_| 0);
    assert!(
        c[1] < 160,
        "the slow one gets about its exploration share: {c:?}"
    );
    assert!(c[1] > 40, "but keeps being measured: {c:?}");
    // It recovers: the samples its exploration share brings pull it back.
    let mut recent = [0usize; 2];
    for k in 0..2_000 {
        let (i, _l) = b.pick(&bs, &[], 0).unwrap();
        bs[i].observed.success(Duration::from_millis(1));
        if k >= 1_000 {
            recent[i] += 1;
        }
    }
    assert!(
        recent[1] > 300,
        "back to a fair share after recovery: {recent:?}"
    );
}

#[test]
fn latency_penalizes_errors() {
    let bs = backends(&[1, 1]);
    let b = Balancer::new(Policy::Latency, &bs);
    for _ in 0..10 {
        bs[0].observed.success(Duration::from_millis(1));
        bs[1].observed.success(Duration::from_millis(1));
        bs[1].observed.failure();
    }
    let c = spread(&b, &bs, 2_000, |_| 0);
    assert!(c[1] < 160, "{c:?}");
}

#[test]
fn every_policy_skips_drained_full_and_ejected_backends() {
    for policy in Policy::ALL {
        let slots = Arc::new(Slots::default());
        let bs: Vec<Arc<Backend>> = vec![
            backend(0, 1, None, &slots),
            backend(1, 1, Some(1), &slots),
            backend(2, 1, None, &slots),
            backend(3, 1, None, &slots),
        ];
        bs[0].set_drained(true);
        let _full = bs[1].lease(false);
        bs[2].health.configure(
            &Outlier {
                consecutive_failures: 1,
                ejection: Duration::from_secs(60),
                max_ejection: Duration::from_secs(60),
            },
            Duration::ZERO,
        );
        bs[2].health.report(false, false, "b2");
        let b = Balancer::new(policy, &bs);
        let c = spread(&b, &bs, 200, |k| {
            (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        assert_eq!(c, [0, 0, 0, 200], "{}", policy.name());
        // With 3 excluded as tried, nothing is left.
        assert_eq!(
            b.pick(&bs, &[3], 0).map(|p| p.0),
            Err(NoPick::Full),
            "{}",
            policy.name()
        );
    }
}

/// With every backend out of rotation for health, the pick goes over them
/// all rather than refusing (panic mode); one backend in rotation takes
/// everything again.
#[test]
fn with_every_backend_ejected_the_pick_goes_over_them_all() {
    let eject = |b: &Backend, name: &str| {
        b.health.configure(
            &Outlier {
                consecutive_failures: 1,
                ejection: Duration::from_secs(60),
                max_ejection: Duration::from_secs(60),
            },
            Duration::ZERO,
        );
        b.health.report(false, false, name);
    };
    for policy in Policy::ALL {
        let bs = backends(&[1, 1, 1]);
        let b = Balancer::new(policy, &bs);
        eject(&bs[0], "b0");
        eject(&bs[1], "b1");
        let c = spread(&b, &bs, 100, |k| k as u64);
        assert_eq!(c, [0, 0, 100], "{}: the one in rotation", policy.name());
        eject(&bs[2], "b2");
        assert_eq!(
            b.pick(&bs, &[], 0).map(|p| p.0),
            Err(NoPick::NoneHealthy),
            "{}: a pick outside panic mode finds none",
            policy.name()
        );
        let mut c = vec![0; bs.len()];
        for k in 0..300u64 {
            let (i, _lease) = b
                .pick_in_panic(&bs, &[], k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .unwrap();
            c[i] += 1;
        }
        assert_eq!(c.iter().sum::<usize>(), 300, "{}", policy.name());
        assert!(
            policy == Policy::ConsistentHash || c.iter().all(|n| *n > 0),
            "{}: spread over the ejected ones: {c:?}",
            policy.name()
        );
        // Out of rotation and at their cap, they are full, not gone.
        let capped = vec![backend(9, 1, Some(1), &Arc::new(Slots::default()))];
        eject(&capped[0], "capped");
        let cb = Balancer::new(policy, &capped);
        let _held = cb.pick_in_panic(&capped, &[], 0).unwrap();
        assert_eq!(
            cb.pick_in_panic(&capped, &[], 0).map(|p| p.0),
            Err(NoPick::Full),
            "{}",
            policy.name()
        );
        // Drained ones stay out even then.
        bs[0].set_drained(true);
        for k in 0..50 {
            assert_ne!(
                b.pick_in_panic(&bs, &[], k).unwrap().0,
                0,
                "{}",
                policy.name()
            );
        }
    }
}

#[test]
fn slow_start_reduces_the_share_under_weighted_policies() {
    for policy in [
        Policy::WeightedRoundRobin,
        Policy::Random,
        Policy::LeastConnections,
    ] {
        let bs = backends(&[1, 1]);
        let outlier = Outlier {
            consecutive_failures: 1,
            ejection: Duration::from_millis(1),
            max_ejection: Duration::from_millis(1),
        };
        bs[1].health.configure(&outlier, Duration::from_secs(60));
        bs[1].health.report(false, false, "b1");
        std::thread::sleep(Duration::from_millis(3));
        let b = Balancer::new(policy, &bs);
        // The probe goes through and succeeds: backend 1 starts ramping.
        let (i, mut probe) = b.pick(&bs, &[], 0).unwrap();
        assert_eq!(i, 1, "the probe");
        probe.report(true);
        drop(probe);
        let c = spread(&b, &bs, 1_100, |_| 0);
        assert!(
            c[1] < 200,
            "{}: ramping backend takes ~1/11: {c:?}",
            policy.name()
        );
        assert!(c[1] > 50, "{}: but not nothing: {c:?}", policy.name());
    }
}

/// Traffic groups share the model's queue: a slot freed in one group wakes
/// the request waiting for that group, even when a request for a full
/// group waits in front of it.
#[tokio::test]
async fn a_freed_slot_reaches_the_waiter_of_its_group() {
    use crate::config::Queue;
    let slots = Arc::new(Slots::default());
    slots.set_grouped(true);
    let a = vec![backend(0, 1, Some(1), &slots)];
    let b = vec![backend(1, 1, Some(1), &slots)];
    let (bal_a, bal_b) = (
        Arc::new(Balancer::new(Policy::LeastConnections, &a)),
        Arc::new(Balancer::new(Policy::LeastConnections, &b)),
    );
    let _held_a = bal_a.pick(&a, &[], 0).unwrap();
    let held_b = bal_b.pick(&b, &[], 0).unwrap();
    let queue = Queue {
        size: 8,
        timeout: Duration::from_secs(3),
    };
    let wait = |bal: Arc<Balancer>, bs: Vec<Arc<Backend>>| {
        let q = queue.clone();
        tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            bal.acquire("m", &bs, &Tried::new(), 0, &q, deadline, false)
                .await
                .map(|(i, _)| i)
        })
    };
    // The request for the full group A waits first, then one for B.
    let queued = |n: u32| {
        let slots = Arc::clone(&slots);
        async move {
            while slots.waiting.load(std::sync::atomic::Ordering::Acquire) < n {
                tokio::task::yield_now().await;
            }
        }
    };
    let waiting_a = wait(Arc::clone(&bal_a), a.clone());
    queued(1).await;
    let waiting_b = wait(Arc::clone(&bal_b), b.clone());
    queued(2).await;
    let t = std::time::Instant::now();
    drop(held_b);
    let got = waiting_b.await.unwrap();
    assert_eq!(got.ok(), Some(0), "B's waiter got B's freed slot");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    waiting_a.abort();
}

/// A one-backend model whose only slot is taken, and the queue to wait in.
fn one_slot() -> (Arc<Balancer>, Vec<Arc<Backend>>, crate::config::Queue) {
    slots_of(1)
}

/// A one-backend model with `cap` slots, and a queue of 16 (5 s).
fn slots_of(cap: u32) -> (Arc<Balancer>, Vec<Arc<Backend>>, crate::config::Queue) {
    let slots = Arc::new(Slots::default());
    let bs = vec![backend(0, 1, Some(cap), &slots)];
    let bal = Arc::new(Balancer::new(Policy::LeastConnections, &bs));
    let queue = crate::config::Queue {
        size: 16,
        timeout: Duration::from_secs(5),
    };
    (bal, bs, queue)
}

/// A request acquiring a slot of `bs` in a task of its own (5 s at most).
fn spawn_waiter(
    bal: &Arc<Balancer>,
    bs: &[Arc<Backend>],
    queue: &crate::config::Queue,
    panic: bool,
) -> tokio::task::JoinHandle<Result<(usize, Lease), ProxyError>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (bal, bs, q) = (Arc::clone(bal), bs.to_vec(), queue.clone());
    tokio::spawn(async move {
        bal.acquire("m", &bs, &Tried::new(), 0, &q, deadline, panic)
            .await
    })
}

/// Waits until `n` requests wait in the queue of `bs`.
async fn queued(bs: &[Arc<Backend>], n: u32) {
    let slots = Arc::clone(bs[0].slots());
    tokio::time::timeout(Duration::from_secs(5), async move {
        while slots.waiting.load(std::sync::atomic::Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the requests queue");
}

/// A slot freed while requests wait goes to the one that waited longest,
/// not to a request that arrives at that moment (it queues behind).
#[tokio::test]
async fn a_freed_slot_goes_to_the_longest_waiter_not_a_newcomer() {
    use std::{
        future::Future as _,
        task::{Context, Waker},
    };
    let (bal, bs, queue) = one_slot();
    let held = bal.pick(&bs, &[], 0).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let waiter = spawn_waiter(&bal, &bs, &queue, false);
    queued(&bs, 1).await;
    drop(held);
    // The newcomer looks before the waiter has run again.
    let none = Tried::new();
    let mut newcomer = Box::pin(bal.acquire("m", &bs, &none, 0, &queue, deadline, false));
    let polled = newcomer
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
    assert!(polled.is_pending(), "the newcomer took the freed slot");
    let (_, lease) = waiter.await.unwrap().expect("the waiter got the slot");
    drop(lease);
    let got = tokio::time::timeout(Duration::from_secs(5), newcomer).await;
    assert!(matches!(got, Ok(Ok(_))), "then the newcomer, in its turn");
}

/// Requests queued one after another get freed slots in that order.
#[tokio::test]
async fn queued_requests_are_served_in_arrival_order() {
    let (bal, bs, queue) = one_slot();
    let held = bal.pick(&bs, &[], 0).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for id in 0..6 {
        let (bal, mine, q, order) = (
            Arc::clone(&bal),
            bs.clone(),
            queue.clone(),
            Arc::clone(&order),
        );
        tasks.push(tokio::spawn(async move {
            let got = bal
                .acquire("m", &mine, &Tried::new(), 0, &q, deadline, false)
                .await;
            order.lock().unwrap().push(id);
            // Held a moment, then freed for the next.
            tokio::task::yield_now().await;
            drop(got);
        }));
        queued(&bs, id + 1).await;
    }
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
}

/// Slots freed while the first waiter is between its wake-up and its next
/// look coalesce into one stored wake-up; the waiter that takes a slot
/// passes the turn on while room is left, so none stays idle while
/// requests wait.
#[tokio::test]
async fn slots_freed_together_all_reach_the_queue() {
    use std::{
        future::Future as _,
        task::{Context, Waker},
    };
    let (bal, bs, queue) = slots_of(3);
    let held: Vec<_> = (0..3).map(|_| bal.pick(&bs, &[], 0).unwrap()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let first = spawn_waiter(&bal, &bs, &queue, false);
    queued(&bs, 1).await;
    // All three freed before the first waiter runs again.
    drop(held);
    let none = Tried::new();
    let mut cx = Context::from_waker(Waker::noop());
    let mut a = Box::pin(bal.acquire("m", &bs, &none, 0, &queue, deadline, false));
    let mut b = Box::pin(bal.acquire("m", &bs, &none, 0, &queue, deadline, false));
    let a_now = a.as_mut().poll(&mut cx);
    let b_now = b.as_mut().poll(&mut cx);
    let got = tokio::time::timeout(Duration::from_secs(2), async {
        let a = match a_now {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => a.await,
        };
        let b = match b_now {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => b.await,
        };
        (first.await.unwrap(), a, b)
    })
    .await
    .expect("a freed slot stayed idle while a request waited");
    assert!(got.0.is_ok() && got.1.is_ok() && got.2.is_ok());
}

/// With every backend out of rotation, a waiting request learns it at
/// once (to go to another group or a fallback model), not at the queue's
/// timeout; where panic mode is the next step anyway, it waits for the
/// resting backend's slot instead (and gets it when it frees).
#[tokio::test]
async fn an_ejection_ends_the_wait_of_queued_requests() {
    for panic in [false, true] {
        ejection_while_queued(panic).await;
    }
}

async fn ejection_while_queued(panic: bool) {
    let (bal, bs, queue) = one_slot();
    let mut held = bal.pick(&bs, &[], 0).unwrap().1;
    let waiter = spawn_waiter(&bal, &bs, &queue, panic);
    queued(&bs, 1).await;
    bs[0].health.configure(
        &Outlier {
            consecutive_failures: 1,
            ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
        },
        Duration::ZERO,
    );
    // The request in flight fails: the only backend is ejected (its slot
    // still held).
    held.report(false);
    if panic {
        // Let the woken waiter run (this runtime has one thread): it looks,
        // finds the resting backend full, and waits on.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !waiter.is_finished(),
            "waits for the resting backend's slot"
        );
        drop(held);
    }
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the waiter was told at once")
        .unwrap();
    if panic {
        assert!(
            got.is_ok(),
            "the freed slot, in panic mode: {:?}",
            got.err()
        );
    } else {
        assert!(
            matches!(got, Err(ProxyError::NoBackend(_))),
            "{:?}",
            got.err()
        );
    }
}

/// A request queued while the backend with room is ejected takes it as its
/// probe when the ejection ends, without waiting for another slot to free.
#[tokio::test]
async fn the_end_of_an_ejection_reaches_the_queue() {
    let slots = Arc::new(Slots::default());
    let busy = backend(0, 1, Some(1), &slots);
    let resting = backend(1, 1, None, &slots);
    resting.health.configure(
        &Outlier {
            consecutive_failures: 1,
            ejection: Duration::from_millis(300),
            max_ejection: Duration::from_millis(300),
        },
        Duration::ZERO,
    );
    let bs = vec![Arc::clone(&busy), Arc::clone(&resting)];
    let bal = Arc::new(Balancer::new(Policy::LeastConnections, &bs));
    let mut failed = resting.lease(false);
    failed.report(false);
    drop(failed);
    assert!(!resting.health.is_up(), "ejected");
    let _held = busy.lease(false);
    let queue = crate::config::Queue {
        size: 8,
        timeout: Duration::from_secs(5),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let t = std::time::Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(2),
        bal.acquire("m", &bs, &Tried::new(), 0, &queue, deadline, false),
    )
    .await
    .expect("taken when the ejection ended, not at the queue's timeout");
    assert_eq!(got.map(|(i, _)| i).ok(), Some(1), "the probe");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
}
