//! The XDP verdict, written once against the [`Tables`] trait so the kernel
//! program (backed by BPF maps) and userspace tests/fuzzers (backed by plain
//! collections) run exactly the same decision code.
//!
//! Order (DESIGN.md section 3): allowlist -> blocklist -> malformed TCP to a
//! protected port -> SYN to a protected port through the per-source bucket
//! and the global budget -> pass. Fail open: only blocked sources and packets
//! aimed at a protected port are ever dropped.
//!
//! The allowlist only changes the outcome of a packet that would otherwise
//! be dropped, so it is consulted lazily, just before a drop: ordinary
//! traffic and admitted SYNs pay for no allowlist lookup, and the
//! `allowlist` counter counts the packets it actually saved. (An allowlisted
//! source's SYNs still draw on its bucket and the global budget while there
//! are tokens; once they run out it passes regardless.) The clock is read
//! only when an expiry or a bucket needs it.

use crate::{
    bucket::Taken,
    maps::{v4_mapped, Limits, Reason, SourceKey},
    packet::{parse, Bytes, Parsed, Source, Transport, TCP_ACK, TCP_SYN},
};

/// Policy state the verdict consults. The kernel implements it over BPF maps.
pub trait Tables {
    /// The current time (the kernel's coarse monotonic clock,
    /// `bpf_ktime_get_coarse_ns`); called only when needed.
    fn now(&self) -> u64;
    fn allowed(&self, src: &Source) -> bool;
    /// Whether an active (unexpired) blocklist entry covers `src`.
    fn blocked(&self, src: &Source) -> bool;
    fn protected(&self, port: u16) -> bool;
    /// The limits in force, borrowed from the map (no per-packet copy).
    fn limits(&self) -> Option<&Limits>;
    /// Takes a token from the per-source bucket keyed by `key`; `None`
    /// when the source has no bucket (nothing taken, nothing made).
    fn take_source(&self, key: &SourceKey, limits: &Limits, now_ns: u64) -> Option<Taken>;
    /// Makes `key`'s bucket, charged for this SYN ([`crate::bucket::fresh_source`]);
    /// takes from it instead where another CPU made it meanwhile.
    fn add_source(&self, key: &SourceKey, limits: &Limits, now_ns: u64) -> Taken;
    /// Takes a token from the global SYN budget.
    fn take_global(&self, limits: &Limits, now_ns: u64) -> bool;
    /// Whether userspace saw `key` complete a TCP handshake within
    /// `TRUST_TTL_NS` (so it is no spoofed source).
    fn trusted(&self, key: &SourceKey, now_ns: u64) -> bool;
}

/// What to do with a frame, and the counter it lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    /// Drops to add to `key`'s count in `TOP_SOURCES` (see
    /// [`Verdict::ranked`]); 0 for none.
    credit: u64,
    /// Always initialized (zeros when unranked): an `Option<SourceKey>`
    /// left its bytes undefined when `None`, and LLVM then copied an
    /// uninitialized register, which the verifier refuses.
    key: SourceKey,
}

impl Verdict {
    #[inline(always)]
    const fn new(reason: Reason) -> Verdict {
        Verdict {
            reason,
            credit: 0,
            key: [0; 16],
        }
    }

    #[inline(always)]
    pub const fn drop(&self) -> bool {
        self.reason.is_drop()
    }

    /// The source of a packet dropped by its per-source SYN limit or as
    /// malformed, and how many drops to add to its `TOP_SOURCES` count: 1
    /// for a malformed packet; SYN-limit drops come in batches
    /// ([`crate::bucket::rank_credit`]), so most of them add nothing and
    /// return `None` here. Blocklist drops are counted on the matching
    /// entry.
    #[inline(always)]
    pub const fn ranked(&self) -> Option<(SourceKey, u64)> {
        if self.credit != 0 {
            Some((self.key, self.credit))
        } else {
            None
        }
    }
}

#[inline(always)]
fn key_of(src: &Source) -> SourceKey {
    match src {
        Source::V4(a) => v4_mapped(*a),
        Source::V6(a) => *a,
    }
}

/// The bucket key of a source: its address masked to the configured prefix
/// (IPv4 /32 and IPv6 /64 by default), v4-mapped for IPv4.
#[inline(always)]
pub fn bucket_key(src: &Source, limits: &Limits) -> SourceKey {
    match src {
        Source::V4(a) => v4_mapped([
            a[0] & limits.v4_mask[0],
            a[1] & limits.v4_mask[1],
            a[2] & limits.v4_mask[2],
            a[3] & limits.v4_mask[3],
        ]),
        Source::V6(a) => {
            let mut k = [0u8; 16];
            for i in 0..16 {
                k[i] = a[i] & limits.v6_mask[i];
            }
            k
        }
    }
}

/// Decides the fate of one frame.
#[inline(always)]
pub fn decide<B: Bytes + ?Sized, T: Tables>(pkt: &B, t: &T) -> Verdict {
    let pass = Verdict::new;
    let (src, transport) = match parse(pkt) {
        Parsed::NotIp => return pass(Reason::NotIp),
        Parsed::Truncated => return pass(Reason::Unparsed),
        Parsed::Ip { src, transport } => (src, transport),
    };
    // A drop (or bucket charge) is only final when the source is not
    // allowlisted. `credit`: drops to add to the source's `TOP_SOURCES`
    // count; global-budget drops come from floods of spoofed, ever-new
    // sources, where ranking would cost an LRU insert per packet and mean
    // nothing (0).
    let dropped = |reason, credit| {
        if t.allowed(&src) {
            Verdict::new(Reason::Allowlist)
        } else {
            Verdict {
                reason,
                credit,
                key: if credit != 0 { key_of(&src) } else { [0; 16] },
            }
        }
    };
    if t.blocked(&src) {
        // Counted on the entry, never ranked. Kept out of `dropped`: sharing
        // it cost the blocklist hits 3-5 ns in the kernel (code layout).
        return Verdict::new(if t.allowed(&src) {
            Reason::Allowlist
        } else {
            Reason::Blocklist
        });
    }
    match transport {
        Transport::Fragment => pass(Reason::Fragment),
        Transport::Other => pass(Reason::Pass),
        Transport::Malformed { dport: Some(port) } if t.protected(port) => {
            dropped(Reason::Malformed, 1)
        }
        // Too broken to tell the port: not provably ours, and the kernel's IP
        // layer discards it anyway.
        Transport::Malformed { .. } => pass(Reason::Pass),
        Transport::Evasive => dropped(Reason::Malformed, 1),
        Transport::Tcp { dport, flags } => {
            if flags & (TCP_SYN | TCP_ACK) != TCP_SYN || !t.protected(dport) {
                return pass(Reason::Pass);
            }
            let Some(limits) = t.limits() else {
                return pass(Reason::SynPass);
            };
            let now_ns = t.now();
            // A source seen before is held to its own rate first; a new
            // one gets its bucket only once the global budget admitted it
            // (below): a spoofed flood of fresh sources refused there then
            // costs no map insert per packet, and does not churn the LRU
            // of the buckets real sources hold.
            let mut fresh = false;
            if limits.syn_rate != 0 {
                match t.take_source(&bucket_key(&src, limits), limits, now_ns) {
                    Some(Taken::Refused { credit }) => return dropped(Reason::SynRate, credit),
                    Some(Taken::Admitted) => {}
                    None => fresh = true,
                }
            }
            // The global budget is there for spoofed floods of ever-new
            // sources; a source that recently completed a handshake is not
            // one of them, so its SYNs pass once the budget is spent (asked
            // only then). Allowlisted sources do not take from it at all:
            // busy ones (a load balancer in front) would spend what the
            // strangers share.
            if limits.global_rate != 0
                && !t.allowed(&src)
                && !t.take_global(limits, now_ns)
                && !t.trusted(&key_of(&src), now_ns)
            {
                return dropped(Reason::SynGlobal, 0);
            }
            if fresh {
                // Refuses only with a burst of 0.
                if let Taken::Refused { credit } =
                    t.add_source(&bucket_key(&src, limits), limits, now_ns)
                {
                    return dropped(Reason::SynRate, credit);
                }
            }
            pass(Reason::SynPass)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bucket::MemBuckets,
        packet::{craft::*, TCP_ACK, TCP_SYN},
    };
    use std::vec::Vec;

    /// Plain-collection stand-in for the BPF maps.
    struct Fake {
        allow: Vec<crate::cidr::Cidr>,
        block: Vec<(crate::cidr::Cidr, u64)>,
        ports: Vec<u16>,
        limits: Limits,
        buckets: MemBuckets,
        trusted: Vec<(SourceKey, u64)>,
        now: core::cell::Cell<u64>,
    }

    impl Fake {
        fn new() -> Self {
            Fake {
                allow: Vec::new(),
                block: Vec::new(),
                ports: std::vec![8443],
                limits: Limits::new(2, 2, 0, 32, 64),
                buckets: MemBuckets::default(),
                trusted: Vec::new(),
                now: core::cell::Cell::new(0),
            }
        }
    }

    fn ip(src: &Source) -> core::net::IpAddr {
        match src {
            Source::V4(a) => (*a).into(),
            Source::V6(a) => (*a).into(),
        }
    }

    impl Tables for Fake {
        fn now(&self) -> u64 {
            self.now.get()
        }
        fn allowed(&self, src: &Source) -> bool {
            self.allow.iter().any(|c| c.contains(ip(src)))
        }
        fn blocked(&self, src: &Source) -> bool {
            let now = self.now.get();
            self.block
                .iter()
                .any(|(c, exp)| c.contains(ip(src)) && (*exp == 0 || now < *exp))
        }
        fn protected(&self, port: u16) -> bool {
            self.ports.contains(&port)
        }
        fn limits(&self) -> Option<&Limits> {
            Some(&self.limits)
        }
        fn take_source(&self, key: &SourceKey, l: &Limits, now: u64) -> Option<Taken> {
            self.buckets.take_source(key, l, now)
        }
        fn add_source(&self, key: &SourceKey, l: &Limits, now: u64) -> Taken {
            self.buckets.add_source(key, l, now)
        }
        fn take_global(&self, l: &Limits, now: u64) -> bool {
            self.buckets.take_global(l, now)
        }
        fn trusted(&self, key: &SourceKey, now: u64) -> bool {
            self.trusted
                .iter()
                .any(|(k, seen)| k == key && now.saturating_sub(*seen) < crate::TRUST_TTL_NS)
        }
    }

    const A: [u8; 4] = [198, 51, 100, 7];
    const B: [u8; 4] = [198, 51, 100, 8];
    const ME: [u8; 4] = [192, 0, 2, 1];

    fn syn(src: [u8; 4]) -> Vec<u8> {
        Frame::v4(src, ME).tcp(8443, TCP_SYN).build()
    }

    fn reason(t: &Fake, f: &[u8], now: u64) -> Reason {
        t.now.set(now);
        decide(f, t).reason
    }

    #[test]
    fn allowlist_beats_blocklist() {
        let mut t = Fake::new();
        t.block.push(("198.51.100.0/24".parse().unwrap(), 0));
        assert_eq!(reason(&t, &syn(A), 0), Reason::Blocklist);
        t.allow.push("198.51.100.7".parse().unwrap());
        assert_eq!(reason(&t, &syn(A), 0), Reason::Allowlist);
        assert_eq!(reason(&t, &syn(B), 0), Reason::Blocklist);
        // Ordinary traffic from an allowlisted source is plain `pass`: the
        // allowlist changed nothing for it.
        let ack = Frame::v4(A, ME).tcp(8443, TCP_ACK).build();
        t.block.clear();
        assert_eq!(reason(&t, &ack, 0), Reason::Pass);
    }

    #[test]
    fn allowlisted_sources_are_never_syn_limited() {
        let mut t = Fake::new(); // 2/s, burst 2
        t.allow.push("198.51.100.0/24".parse().unwrap());
        let got: Vec<Reason> = (0..6).map(|_| reason(&t, &syn(A), 0)).collect();
        assert_eq!(
            got[..2],
            [Reason::SynPass; 2],
            "tokens are used while there are some"
        );
        assert_eq!(
            got[2..],
            [Reason::Allowlist; 4],
            "then the allowlist lets it through"
        );
        let v = decide(&syn(A)[..], &t);
        assert_eq!(
            v.ranked(),
            None,
            "allowlisted traffic is never a top dropped source"
        );
    }

    #[test]
    fn allowlisted_sources_leave_the_global_budget_to_the_others() {
        let mut t = Fake::new();
        t.limits = Limits::new(0, 0, 3, 32, 64); // 3 SYNs/s from everyone
        t.allow.push("198.51.100.0/24".parse().unwrap());
        for _ in 0..10 {
            assert_eq!(reason(&t, &syn(A), 0), Reason::SynPass);
        }
        let stranger = [203, 0, 113, 1];
        let got: Vec<Reason> = (0..4).map(|_| reason(&t, &syn(stranger), 0)).collect();
        assert_eq!(
            got,
            [
                Reason::SynPass,
                Reason::SynPass,
                Reason::SynPass,
                Reason::SynGlobal
            ],
            "the whole budget is the strangers'"
        );
    }

    #[test]
    fn blocklist_drops_are_not_top_sources() {
        let mut t = Fake::new();
        t.block.push(("198.51.100.7".parse().unwrap(), 0));
        let v = decide(&syn(A)[..], &t);
        assert_eq!((v.reason, v.ranked()), (Reason::Blocklist, None));
    }

    #[test]
    fn expired_block_lapses() {
        let mut t = Fake::new();
        t.block.push(("198.51.100.7".parse().unwrap(), 1_000));
        assert_eq!(reason(&t, &syn(A), 999), Reason::Blocklist);
        assert_eq!(reason(&t, &syn(A), 1_000), Reason::SynPass);
    }

    #[test]
    fn syn_bucket_per_source_and_refill() {
        let t = Fake::new(); // 2/s, burst 2
        assert_eq!(reason(&t, &syn(A), 0), Reason::SynPass);
        assert_eq!(reason(&t, &syn(A), 0), Reason::SynPass);
        let v = decide(&syn(A)[..], &t);
        assert_eq!(v.reason, Reason::SynRate);
        assert_eq!(
            v.ranked(),
            Some((v4_mapped(A), 1)),
            "the first refusal ranks its source at once"
        );
        assert_eq!(
            reason(&t, &syn(B), 0),
            Reason::SynPass,
            "another source has its own bucket"
        );
        assert_eq!(
            reason(&t, &syn(A), 500_000_000),
            Reason::SynPass,
            "refilled after 0.5 s"
        );
        let v = decide(&syn(A)[..], &t);
        assert_eq!(v.reason, Reason::SynRate);
        assert_eq!(v.ranked(), None, "the second refusal waits for its batch");
    }

    #[test]
    fn syn_refusals_rank_in_batches() {
        let t = Fake::new(); // 2/s, burst 2
        for _ in 0..2 {
            assert_eq!(reason(&t, &syn(A), 0), Reason::SynPass);
        }
        let batch = crate::bucket::RANK_BATCH;
        let mut credited = 0;
        let mut ranked = 0;
        for nth in 1..=3 * batch + 5 {
            let v = decide(&syn(A)[..], &t);
            assert_eq!(v.reason, Reason::SynRate, "refusal {nth}");
            if let Some((key, n)) = v.ranked() {
                assert_eq!(key, v4_mapped(A));
                credited += n;
                ranked += 1;
            }
        }
        assert_eq!(ranked, 4, "the first refusal, then one per batch");
        assert_eq!(credited, 3 * batch + 1);
        // A malformed drop always counts at once.
        let bad = Frame::v4(A, ME).tcp(8443, TCP_SYN).tcp_doff(2).build();
        for _ in 0..3 {
            let v = decide(&bad[..], &t);
            assert_eq!(
                (v.reason, v.ranked()),
                (Reason::Malformed, Some((v4_mapped(A), 1)))
            );
        }
    }

    #[test]
    fn only_bare_syn_to_protected_ports_is_limited() {
        let t = Fake::new();
        let synack = Frame::v4(A, ME).tcp(8443, TCP_SYN | TCP_ACK).build();
        let ack = Frame::v4(A, ME).tcp(8443, TCP_ACK).build();
        let other_port = Frame::v4(A, ME).tcp(22, TCP_SYN).build();
        for _ in 0..10 {
            assert_eq!(reason(&t, &synack, 0), Reason::Pass);
            assert_eq!(reason(&t, &ack, 0), Reason::Pass);
            assert_eq!(reason(&t, &other_port, 0), Reason::Pass);
        }
    }

    #[test]
    fn global_budget() {
        let mut t = Fake::new();
        t.limits = Limits::new(0, 0, 3, 32, 64);
        let srcs: Vec<[u8; 4]> = (1..=5).map(|i| [203, 0, 113, i]).collect();
        let got: Vec<Reason> = srcs.iter().map(|s| reason(&t, &syn(*s), 0)).collect();
        assert_eq!(got[..3], [Reason::SynPass; 3]);
        assert_eq!(got[3..], [Reason::SynGlobal; 2]);
    }

    /// Fresh sources refused by the global budget leave no bucket behind
    /// (a spoofed flood costs no map insert per packet); the admitted ones
    /// have theirs, charged, so their own rate holds from the next SYN.
    #[test]
    fn a_fresh_source_gets_its_bucket_only_when_admitted() {
        let mut t = Fake::new();
        t.limits = Limits::new(5, 1, 3, 32, 64);
        let srcs: Vec<[u8; 4]> = (1..=100).map(|i| [203, 0, 113, i]).collect();
        let got: Vec<Reason> = srcs.iter().map(|s| reason(&t, &syn(*s), 0)).collect();
        assert_eq!(got[..3], [Reason::SynPass; 3]);
        assert!(got[3..].iter().all(|r| *r == Reason::SynGlobal), "{got:?}");
        assert_eq!(t.buckets.sources(), 3, "buckets only for the admitted");
        assert_eq!(
            reason(&t, &syn(srcs[0]), 0),
            Reason::SynRate,
            "its burst of 1 was spent on the first SYN"
        );
    }

    #[test]
    fn trusted_sources_pass_a_spent_global_budget_until_the_trust_lapses() {
        let mut t = Fake::new();
        t.limits = Limits::new(5, 5, 1, 32, 64);
        t.trusted.push((v4_mapped(A), 0));
        assert_eq!(reason(&t, &syn(B), 0), Reason::SynPass, "the budget of 1");
        assert_eq!(reason(&t, &syn(B), 0), Reason::SynGlobal);
        assert_eq!(reason(&t, &syn(A), 0), Reason::SynPass, "trusted");
        let lapsed = crate::TRUST_TTL_NS + 1;
        t.buckets = MemBuckets::default();
        assert_eq!(reason(&t, &syn(A), lapsed), Reason::SynPass, "the budget");
        assert_eq!(
            reason(&t, &syn(A), lapsed),
            Reason::SynGlobal,
            "trust lapsed"
        );
        // Trust does not lift the source's own bucket.
        let mut t = Fake::new(); // 2/s, burst 2, no global budget
        t.trusted.push((v4_mapped(A), 0));
        let got: Vec<Reason> = (0..3).map(|_| reason(&t, &syn(A), 0)).collect();
        assert_eq!(got, [Reason::SynPass, Reason::SynPass, Reason::SynRate]);
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_prefix() {
        let t = Fake::new(); // /64
        let mut a = V6_A;
        let f1 = Frame::v6(a, V6_B).tcp(8443, TCP_SYN).build();
        a[15] = 0x99; // same /64
        let f2 = Frame::v6(a, V6_B).tcp(8443, TCP_SYN).build();
        assert_eq!(reason(&t, &f1, 0), Reason::SynPass);
        assert_eq!(reason(&t, &f2, 0), Reason::SynPass);
        assert_eq!(reason(&t, &f1, 0), Reason::SynRate);
    }

    #[test]
    fn malformed_only_dropped_for_protected_ports() {
        let t = Fake::new();
        let bad = Frame::v4(A, ME).tcp(8443, TCP_SYN).tcp_doff(2).build();
        let bad_other = Frame::v4(A, ME).tcp(22, TCP_SYN).tcp_doff(2).build();
        assert_eq!(reason(&t, &bad, 0), Reason::Malformed);
        assert_eq!(reason(&t, &bad_other, 0), Reason::Pass);
    }
}
