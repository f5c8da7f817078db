//! Ethernet frames as the XDP program sees them: the shared parser and the
//! verdict, run against an in-memory policy, never panic and keep the
//! promises the kernel's counters and drops rely on.
#![no_main]

use gateway_common::{
    bucket::{MemBuckets, Taken},
    maps::{v4_mapped, Limits, Reason, SourceKey},
    packet::{parse, Parsed, Source, Transport, TCP_ACK, TCP_SYN},
    verdict::{decide, Tables},
};
use libfuzzer_sys::fuzz_target;

/// A fixed policy over plain collections: 10/8 and fd00::/8 allowlisted,
/// 203/8 and 3f00::/8 blocked, ports 80, 443 and 8443 protected, one SYN
/// per source (/24, /48) and one in total before the buckets are empty.
struct Policy {
    limits: Limits,
    buckets: MemBuckets,
}

impl Policy {
    fn new() -> Self {
        Policy {
            limits: Limits::new(1, 1, 1, 24, 48),
            buckets: MemBuckets::default(),
        }
    }
}

impl Tables for Policy {
    fn now(&self) -> u64 {
        1_000_000_000
    }
    fn allowed(&self, src: &Source) -> bool {
        match src {
            Source::V4(a) => a[0] == 10,
            Source::V6(a) => a[0] == 0xfd,
        }
    }
    fn blocked(&self, src: &Source) -> bool {
        match src {
            Source::V4(a) => a[0] == 203,
            Source::V6(a) => a[0] == 0x3f,
        }
    }
    fn protected(&self, port: u16) -> bool {
        matches!(port, 80 | 443 | 8443)
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
    fn trusted(&self, key: &SourceKey, _now: u64) -> bool {
        key[15] % 2 == 1
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse(data);

    // A complete TCP header was read in full, so bytes after the frame
    // cannot change what it is.
    if let Parsed::Ip {
        transport: Transport::Tcp { .. },
        ..
    } = parsed
    {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0xa5; 64]);
        assert_eq!(
            parse(&longer[..]),
            parsed,
            "trailing bytes changed the parse"
        );
    }

    let policy = Policy::new();
    let first = decide(data, &policy);
    let second = decide(data, &policy);
    let src = match parsed {
        Parsed::NotIp => {
            assert_eq!(first.reason, Reason::NotIp);
            return;
        }
        Parsed::Truncated => {
            assert_eq!(first.reason, Reason::Unparsed);
            return;
        }
        Parsed::Ip { src, transport } => {
            let bare_syn = matches!(
                transport,
                Transport::Tcp { dport, flags }
                    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN && policy.protected(dport)
            );
            if bare_syn && !policy.blocked(&src) {
                // Fresh buckets admit the first SYN; the second finds the
                // source's bucket empty.
                assert_eq!(first.reason, Reason::SynPass, "{parsed:?}");
                let expect = if policy.allowed(&src) {
                    Reason::Allowlist
                } else {
                    Reason::SynRate
                };
                assert_eq!(second.reason, expect, "{parsed:?}");
            }
            src
        }
    };
    for v in [first, second] {
        if policy.allowed(&src) {
            assert!(!v.drop(), "allowlisted source dropped: {v:?} {parsed:?}");
        }
        if policy.blocked(&src) && !policy.allowed(&src) {
            assert_eq!(v.reason, Reason::Blocklist, "{parsed:?}");
        }
        if let Some((key, credit)) = v.ranked() {
            assert!(credit > 0, "ranked with nothing to credit: {v:?}");
            assert!(
                matches!(v.reason, Reason::SynRate | Reason::Malformed),
                "a {:?} drop ranked its source",
                v.reason
            );
            let own = match src {
                Source::V4(a) => v4_mapped(a),
                Source::V6(a) => a,
            };
            assert_eq!(key, own, "ranked under another source");
        }
    }
});
