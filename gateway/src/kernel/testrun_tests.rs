//! The real XDP program on crafted frames, one test per verdict and reason.
//! Each test loads its own copy of the program, so maps start empty.

use std::time::{Duration, Instant};

use gateway_common::{
    cidr::Cidr,
    packet::{craft::*, ETH_P_8021AD, ETH_P_8021Q, TCP_ACK, TCP_RST, TCP_SYN},
    BlockValue, Limits, Reason, SourceBucket,
};

use super::{
    clock,
    testrun::{kernel_tests_enabled, Harness, XDP_DROP, XDP_PASS},
};

const PORT: u16 = 8443;
const SRC: [u8; 4] = [198, 51, 100, 7];
const SRC2: [u8; 4] = [198, 51, 100, 8];
const DST: [u8; 4] = [192, 0, 2, 1];

/// Per-source 5/s burst 5, no global budget.
fn limits() -> Limits {
    Limits::new(5, 5, 0, 32, 64)
}

macro_rules! harness {
    ($limits:expr) => {{
        if !kernel_tests_enabled(module_path!()) {
            return;
        }
        Harness::new($limits, &[PORT]).expect("loading the XDP program")
    }};
}

fn syn(src: [u8; 4]) -> Vec<u8> {
    Frame::v4(src, DST).tcp(PORT, TCP_SYN).build()
}

fn block(h: &mut Harness, c: &str, expires_ns: u64) {
    h.maps
        .block_insert(&c.parse::<Cidr>().unwrap(), BlockValue::until(expires_ns))
        .unwrap();
}

#[track_caller]
fn expect(h: &mut Harness, frame: &[u8], action: u32, reason: Reason) {
    let before = h.count(reason).unwrap();
    let got = h.run(frame).unwrap();
    let name = if action == XDP_DROP { "DROP" } else { "PASS" };
    assert_eq!(
        got,
        action,
        "expected {name} ({}) for {frame:02x?}",
        reason.name()
    );
    assert_eq!(
        h.count(reason).unwrap(),
        before + 1,
        "counter {} did not move",
        reason.name()
    );
}

#[test]
fn exact_and_cidr_blocks_v4_and_v6() {
    let mut h = harness!(limits());
    block(&mut h, "198.51.100.7", 0);
    block(&mut h, "203.0.113.0/24", 0);
    block(&mut h, "2001:db8::a", 0);
    block(&mut h, "2001:db8:1::/48", 0);
    expect(&mut h, &syn(SRC), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &syn(SRC2), XDP_PASS, Reason::SynPass);
    // Blocked sources are dropped whatever they send, to any port.
    let udp = Frame::v4([203, 0, 113, 200], DST).udp(53).build();
    expect(&mut h, &udp, XDP_DROP, Reason::Blocklist);
    let v6_exact = Frame::v6(V6_A, V6_B).tcp(22, TCP_ACK).build();
    expect(&mut h, &v6_exact, XDP_DROP, Reason::Blocklist);
    let mut in48 = V6_A;
    in48[5] = 1; // 2001:db8:1::a
    let v6_cidr = Frame::v6(in48, V6_B).tcp(PORT, TCP_SYN).build();
    expect(&mut h, &v6_cidr, XDP_DROP, Reason::Blocklist);
    let v6_other = Frame::v6(V6_B, V6_A).tcp(PORT, TCP_SYN).build();
    expect(&mut h, &v6_other, XDP_PASS, Reason::SynPass);
    // Each entry counts the packets it dropped; top sources are for limits.
    let hits: Vec<(String, u64)> = h
        .maps
        .block_entries()
        .unwrap()
        .iter()
        .map(|(c, v)| (c.to_string(), v.hits))
        .collect();
    for (c, want) in [
        ("198.51.100.7/32", 1),
        ("203.0.113.0/24", 1),
        ("2001:db8::a/128", 1),
        ("2001:db8:1::/48", 1),
    ] {
        assert!(
            hits.contains(&(c.to_string(), want)),
            "{c} should have {want} hit: {hits:?}"
        );
    }
    assert!(
        h.maps.top(10).unwrap().is_empty(),
        "blocklist drops are counted on their entries"
    );
}

/// /32 blocks crowded onto one home slot of the host table, with a window
/// that wraps around the table's end: the first `MAX_PROBE` fill the
/// window, the rest spill; the program finds every one, and removals pull
/// spilled entries back into the table without losing any.
#[test]
fn crowded_host_blocks_spill_and_come_back() {
    use gateway_common::host::{self, MAX_PROBE, SLOTS};
    let mut h = harness!(limits());
    let mut addrs = host::homed_at(SLOTS - 3);
    let blocked: Vec<[u8; 4]> = addrs.by_ref().take(MAX_PROBE as usize + 5).collect();
    let stranger = addrs.next().unwrap();
    for a in &blocked {
        h.maps
            .block_insert(&Cidr::V4 { addr: *a, len: 32 }, BlockValue::permanent())
            .unwrap();
    }
    assert_eq!(h.maps.host_v4().spilled(), 5);
    for a in &blocked {
        expect(&mut h, &syn(*a), XDP_DROP, Reason::Blocklist);
    }
    // A search that saw a full window and a spill-map miss passes.
    expect(&mut h, &syn(stranger), XDP_PASS, Reason::SynPass);
    // Remove from both ends of the window and from the spill map.
    let gone = [0, 1, MAX_PROBE as usize - 1, MAX_PROBE as usize + 4];
    for i in gone {
        let c = Cidr::V4 {
            addr: blocked[i],
            len: 32,
        };
        assert!(h.maps.block_remove(&c).unwrap(), "{c}");
    }
    assert_eq!(h.maps.host_v4().spilled(), 1);
    for (i, a) in blocked.iter().enumerate() {
        if gone.contains(&i) {
            expect(&mut h, &syn(*a), XDP_PASS, Reason::SynPass);
        } else {
            expect(&mut h, &syn(*a), XDP_DROP, Reason::Blocklist);
        }
    }
    // Hit counts moved with the entries that were shifted or pulled in.
    let entries = h.maps.block_entries().unwrap();
    assert_eq!(entries.len(), blocked.len() - gone.len());
    for (c, v) in entries {
        assert_eq!(v.hits, 2, "{c}");
    }
}

/// The program and userspace agree on every address at scale: 60,000
/// random /32s plus a crowded window that spills, a third of them removed
/// again (entries shift back, spilled ones are pulled in), then every
/// address, and 2,000 never blocked, sent through the real program.
#[test]
fn host_table_agrees_with_the_program_at_scale() {
    use std::collections::BTreeSet;

    use gateway_common::host;
    let mut h = harness!(limits());
    let mut x: u32 = 0x9E37_79B9;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x.to_be_bytes()
    };
    let mut addrs: BTreeSet<[u8; 4]> = (0..60_000).map(|_| next()).collect();
    addrs.extend(host::homed_at(12_345).take(40));
    let entries: Vec<(Cidr, BlockValue)> = addrs
        .iter()
        .map(|a| (Cidr::V4 { addr: *a, len: 32 }, BlockValue::permanent()))
        .collect();
    h.maps.block_insert_many(&entries).unwrap();
    assert!(h.maps.host_v4().spilled() >= 40 - host::MAX_PROBE as usize);
    let mut kept = BTreeSet::new();
    for (i, a) in addrs.iter().enumerate() {
        if i % 3 == 0 {
            assert!(h
                .maps
                .block_remove(&Cidr::V4 { addr: *a, len: 32 })
                .unwrap());
        } else {
            kept.insert(*a);
        }
    }
    assert_eq!(h.maps.block_entries().unwrap().len(), kept.len());
    let strangers: Vec<[u8; 4]> = (0..2_000)
        .map(|_| next())
        .filter(|a| !addrs.contains(a))
        .collect();
    for a in addrs.iter().chain(&strangers) {
        let frame = Frame::v4(*a, DST).tcp(PORT, TCP_ACK).build();
        let want = if kept.contains(a) { XDP_DROP } else { XDP_PASS };
        assert_eq!(h.run(&frame).unwrap(), want, "{a:?}");
    }
}

/// IPv4 CIDR blocks in `BLOCK_NET_V4`, searched per prefix length: the
/// longest entry in force decides (an expired /16 inside a live /8 leaves
/// its sources blocked by the /8, also when the /8 lives in the trie
/// alone); a fifth prefix length longer than the
/// table's shortest rebuilds the table with the four longest, one shorter
/// stays in the trie alone behind them; thousands of prefixes agree with a
/// model in every mode (table, table then trie, trie alone) and after
/// removals; hits counted in the table survive a rebuild.
#[test]
fn cidr_table_searches_lengths_longest_first_and_falls_back_to_the_trie() {
    use std::collections::BTreeSet;

    let mut h = harness!(limits());
    assert_eq!(h.maps.cidr_table().unwrap(), Some((vec![], false)));
    block(&mut h, "10.0.0.0/8", 0);
    block(&mut h, "10.1.0.0/16", 1); // expired long ago
    block(&mut h, "10.1.2.0/24", 0);
    assert_eq!(h.maps.cidr_table().unwrap(), Some((vec![24, 16, 8], false)));
    let ack = |a: [u8; 4]| Frame::v4(a, DST).tcp(PORT, TCP_ACK).build();
    expect(&mut h, &ack([10, 9, 9, 9]), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &ack([10, 1, 9, 9]), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &ack([10, 1, 2, 9]), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &ack([11, 1, 2, 9]), XDP_PASS, Reason::Pass);
    // Without the /8, the lapsed /16 blocks nothing.
    assert!(h.maps.block_remove(&"10.0.0.0/8".parse().unwrap()).unwrap());
    expect(&mut h, &ack([10, 1, 9, 9]), XDP_PASS, Reason::Pass);
    block(&mut h, "10.0.0.0/8", 0);

    // Thousands of prefixes of four lengths, none of them inside 10/8.
    let mut x: u32 = 0x2545_F491;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut nets: BTreeSet<([u8; 4], u8)> = BTreeSet::new();
    while nets.len() < 3_000 {
        let len = [12u8, 20, 26, 28][(next() % 4) as usize];
        let a = next() & (u32::MAX << (32 - len));
        if a >> 24 != 10 {
            nets.insert((a.to_be_bytes(), len));
        }
    }
    let cidr = |(addr, len): ([u8; 4], u8)| Cidr::V4 { addr, len };
    let entries: Vec<(Cidr, BlockValue)> = nets
        .iter()
        .map(|n| (cidr(*n), BlockValue::permanent()))
        .collect();
    h.maps.block_insert_many(&entries).unwrap();
    // Seven lengths in use: a new length that belongs among the table's
    // four sent the program to the trie, and the insert rebuilt the table
    // at once with the four longest; 8, 12 and 16 live in the trie alone.
    assert_eq!(
        h.maps.cidr_table().unwrap(),
        Some((vec![28, 26, 24, 20], true))
    );
    // Sources inside each prefix, and strangers.
    let mut sources: Vec<[u8; 4]> = nets
        .iter()
        .map(|(a, len)| (u32::from_be_bytes(*a) | (next() >> len)).to_be_bytes())
        .collect();
    sources.extend(
        (0..2_000)
            .map(|_| next().to_be_bytes())
            .filter(|a| a[0] != 10),
    );
    let agree = |h: &mut Harness, nets: &BTreeSet<([u8; 4], u8)>, when: &str| {
        for a in &sources {
            let covered = nets.iter().any(|(n, len)| {
                let m = u32::MAX << (32 - len);
                u32::from_be_bytes(*a) & m == u32::from_be_bytes(*n)
            });
            let want = if covered { XDP_DROP } else { XDP_PASS };
            assert_eq!(h.run(&ack(*a)).unwrap(), want, "{a:?} {when}");
        }
    };
    agree(&mut h, &nets, "through the table, then the trie");
    // The trie alone, as before the first rebuild.
    h.maps
        .hint_set(gateway_common::hint::NETS_V4_INDEX, 0)
        .unwrap();
    agree(&mut h, &nets, "through the trie");

    for c in ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"] {
        assert!(h.maps.block_remove(&c.parse().unwrap()).unwrap(), "{c}");
    }
    let listed: Vec<Cidr> = nets.iter().map(|n| cidr(*n)).collect();
    h.maps.hint_rebuild(&listed, []).unwrap();
    assert_eq!(
        h.maps.cidr_table().unwrap(),
        Some((vec![28, 26, 20, 12], false))
    );
    agree(&mut h, &nets, "through the table");

    // Removals while the program searches the table.
    let gone: Vec<([u8; 4], u8)> = nets.iter().copied().step_by(3).collect();
    for n in &gone {
        assert!(h.maps.block_remove(&cidr(*n)).unwrap());
        nets.remove(n);
    }
    assert_eq!(
        h.maps.cidr_table().unwrap(),
        Some((vec![28, 26, 20, 12], false))
    );
    agree(&mut h, &nets, "after removals");

    // A fifth length added on its own: the trie at once, the table again
    // once it is gone and the lists are rebuilt.
    let (n0, l0) = *nets.iter().next().unwrap();
    let inside = (u32::from_be_bytes(n0) | 1).to_be_bytes();
    let host31 = Cidr::V4 {
        addr: inside,
        len: 31,
    };
    h.maps
        .block_insert(&host31, BlockValue::permanent())
        .unwrap();
    // 31 displaced 12 from the table: rebuilt at once.
    assert_eq!(
        h.maps.cidr_table().unwrap(),
        Some((vec![31, 28, 26, 20], true))
    );
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    agree(&mut h, &nets, "with a /31 in the table and /12 in the trie");
    assert!(h.maps.block_remove(&host31).unwrap());
    let listed: Vec<Cidr> = nets.iter().map(|n| cidr(*n)).collect();
    h.maps.hint_rebuild(&listed, []).unwrap();
    assert_eq!(
        h.maps.cidr_table().unwrap(),
        Some((vec![28, 26, 20, 12], false))
    );

    // A length shorter than the table's four lives in the trie alone: the
    // program searches the table, then the trie.
    block(&mut h, "10.0.0.0/8", 0);
    assert_eq!(
        h.maps.cidr_table().unwrap(),
        Some((vec![28, 26, 20, 12], true))
    );
    expect(&mut h, &ack([10, 9, 9, 9]), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    agree(&mut h, &nets, "with a /8 in the trie alone");
    assert!(h.maps.block_remove(&"10.0.0.0/8".parse().unwrap()).unwrap());
    expect(&mut h, &ack([10, 9, 9, 9]), XDP_PASS, Reason::Pass);

    // Hits counted in the table are the entry's, before and after a
    // rebuild moves them into the trie.
    let hits = |h: &Harness| {
        let want = Cidr::V4 { addr: n0, len: l0 };
        let all = h.maps.block_entries().unwrap();
        all.iter().find(|(c, _)| *c == want).map(|(_, v)| v.hits)
    };
    let before = hits(&h).unwrap();
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    assert_eq!(hits(&h), Some(before + 2));
    // A fifth length, longer than the table's shortest: the table is
    // rebuilt with the four longest and /12 goes to the trie alone; the
    // entry's hits move with it.
    block(&mut h, "192.0.2.0/30", 0);
    assert_eq!(
        h.maps.cidr_table().unwrap(),
        Some((vec![30, 28, 26, 20], true))
    );
    assert_eq!(hits(&h), Some(before + 2));
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    assert_eq!(hits(&h), Some(before + 3));
    agree(&mut h, &nets, "with /12 in the trie alone");
}

/// IPv6 CIDR blocks in `BLOCK_NET_V6`, looked up per prefix length, as
/// the IPv4 table above: the longest entry in force decides, a fifth length goes to
/// the trie alone (shorter) or rebuilds the table (longer), thousands of
/// prefixes agree with a model through the table, the trie and after
/// removals, and hits counted in the table survive a rebuild.
#[test]
fn ipv6_cidr_table_searches_lengths_longest_first_and_falls_back_to_the_trie() {
    use std::collections::BTreeSet;

    let mut h = harness!(limits());
    let dst6: [u8; 16] = "2001:db8:ffff::1"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let ack = |a: [u8; 16]| Frame::v6(a, dst6).tcp(PORT, TCP_ACK).build();
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    assert_eq!(h.maps.cidr_table_v6().unwrap(), Some((vec![], false)));
    block(&mut h, "2001:db8::/32", 0);
    block(&mut h, "2001:db8:1::/48", 1); // expired long ago
    block(&mut h, "2001:db8:1:2::/64", 0);
    assert_eq!(
        h.maps.cidr_table_v6().unwrap(),
        Some((vec![64, 48, 32], false))
    );
    expect(
        &mut h,
        &ack(v6("2001:db8:9::9")),
        XDP_DROP,
        Reason::Blocklist,
    );
    expect(
        &mut h,
        &ack(v6("2001:db8:1:9::9")),
        XDP_DROP,
        Reason::Blocklist,
    );
    expect(
        &mut h,
        &ack(v6("2001:db8:1:2::9")),
        XDP_DROP,
        Reason::Blocklist,
    );
    expect(&mut h, &ack(v6("2001:db9:1:2::9")), XDP_PASS, Reason::Pass);
    assert_eq!(
        h.maps.net_v6_hits(&v6("2001:db8:1:2::"), 64),
        1,
        "the program found the /64 in BLOCK_NET_V6"
    );

    // Thousands of prefixes of four lengths, none inside 2001:db8::/32.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mask = |len: u8| {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        }
    };
    let mut nets: BTreeSet<(u128, u8)> = BTreeSet::new();
    while nets.len() < 3_000 {
        let len = [40u8, 56, 60, 96][(next() % 4) as usize];
        // Few /32s, so the hint sends most strangers to the lookups too.
        let a = ((0x2a00_0000u128 | (next() % 64) as u128) << 96)
            | ((next() as u128) << 32)
            | (next() as u128 >> 32);
        nets.insert((a & mask(len), len));
    }
    let cidr = |(addr, len): (u128, u8)| Cidr::V6 {
        addr: addr.to_be_bytes(),
        len,
    };
    let entries: Vec<(Cidr, BlockValue)> = nets
        .iter()
        .map(|n| (cidr(*n), BlockValue::permanent()))
        .collect();
    h.maps.block_insert_many(&entries).unwrap();
    // Seven lengths: the four longest in the table, 48, 40 and 32 behind.
    assert_eq!(
        h.maps.cidr_table_v6().unwrap(),
        Some((vec![96, 64, 60, 56], true))
    );
    let mut sources: Vec<u128> = nets
        .iter()
        .map(|(a, len)| a | ((((next() as u128) << 64) | next() as u128) & !mask(*len)))
        .collect();
    sources.extend(
        (0..2_000)
            .map(|_| ((0x2a00_0000u128 | (next() % 64) as u128) << 96) | ((next() as u128) << 32)),
    );
    let agree = |h: &mut Harness, nets: &BTreeSet<(u128, u8)>, when: &str| {
        for a in &sources {
            let covered = nets.iter().any(|(n, len)| a & mask(*len) == *n);
            let want = if covered { XDP_DROP } else { XDP_PASS };
            assert_eq!(
                h.run(&ack(a.to_be_bytes())).unwrap(),
                want,
                "{} {when}",
                std::net::Ipv6Addr::from(*a)
            );
        }
    };
    agree(&mut h, &nets, "through the table, then the trie");
    h.maps
        .hint_set(gateway_common::hint::NETS_V6_INDEX, 0)
        .unwrap();
    agree(&mut h, &nets, "through the trie");

    for c in ["2001:db8::/32", "2001:db8:1::/48", "2001:db8:1:2::/64"] {
        assert!(h.maps.block_remove(&c.parse().unwrap()).unwrap(), "{c}");
    }
    let listed: Vec<Cidr> = nets.iter().map(|n| cidr(*n)).collect();
    h.maps.hint_rebuild(&listed, []).unwrap();
    assert_eq!(
        h.maps.cidr_table_v6().unwrap(),
        Some((vec![96, 60, 56, 40], false))
    );
    agree(&mut h, &nets, "through the table");

    let gone: Vec<(u128, u8)> = nets.iter().copied().step_by(3).collect();
    for n in &gone {
        assert!(h.maps.block_remove(&cidr(*n)).unwrap());
        nets.remove(n);
    }
    agree(&mut h, &nets, "after removals");

    // A shorter fifth length lives in the trie alone, behind the table.
    block(&mut h, "2001:db8::/32", 0);
    assert_eq!(
        h.maps.cidr_table_v6().unwrap(),
        Some((vec![96, 60, 56, 40], true))
    );
    expect(
        &mut h,
        &ack(v6("2001:db8:9::9")),
        XDP_DROP,
        Reason::Blocklist,
    );
    agree(&mut h, &nets, "with a /32 in the trie alone");
    assert!(h
        .maps
        .block_remove(&"2001:db8::/32".parse().unwrap())
        .unwrap());
    expect(&mut h, &ack(v6("2001:db8:9::9")), XDP_PASS, Reason::Pass);

    // Hits counted in the table are the entry's, before and after a
    // longer fifth length rebuilds the table and sends /40 to the trie.
    let (n0, l0) = *nets.iter().find(|(_, len)| *len == 40).unwrap();
    let inside = (n0 | 1).to_be_bytes();
    let hits = |h: &Harness| {
        let all = h.maps.block_entries().unwrap();
        all.iter()
            .find(|(c, _)| *c == cidr((n0, l0)))
            .map(|(_, v)| v.hits)
    };
    let before = hits(&h).unwrap();
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    assert_eq!(hits(&h), Some(before + 2));
    block(&mut h, "2001:db8:1:2:3::/80", 0);
    assert_eq!(
        h.maps.cidr_table_v6().unwrap(),
        Some((vec![96, 80, 60, 56], true))
    );
    assert_eq!(hits(&h), Some(before + 2));
    expect(&mut h, &ack(inside), XDP_DROP, Reason::Blocklist);
    assert_eq!(hits(&h), Some(before + 3));
    expect(
        &mut h,
        &ack(v6("2001:db8:1:2:3::9")),
        XDP_DROP,
        Reason::Blocklist,
    );
    agree(&mut h, &nets, "with /40 in the trie alone");
}

#[test]
fn allowlist_beats_blocklist() {
    let mut h = harness!(limits());
    block(&mut h, "198.51.100.0/24", 0);
    h.maps
        .allow_insert(&"198.51.100.7".parse().unwrap())
        .unwrap();
    for _ in 0..20 {
        // Also never rate-limited: 20 SYNs with a burst of 5.
        expect(&mut h, &syn(SRC), XDP_PASS, Reason::Allowlist);
    }
    expect(&mut h, &syn(SRC2), XDP_DROP, Reason::Blocklist);
}

#[test]
fn the_list_hints_decide_which_lookups_run() {
    use gateway_common::hint;
    let mut h = harness!(limits());
    block(&mut h, "198.51.100.7", 0);
    block(&mut h, "2001:db8:1::/48", 0);
    let ack = Frame::v4(SRC, DST).tcp(PORT, TCP_ACK).build();
    let v6 = Frame::v6(V6_A, V6_B).tcp(PORT, TCP_ACK).build(); // 2001:db8::a
    let mut in48 = V6_A;
    in48[5] = 1;
    let v6_blocked = Frame::v6(in48, V6_B).tcp(PORT, TCP_ACK).build();
    expect(&mut h, &ack, XDP_DROP, Reason::Blocklist);
    expect(&mut h, &v6_blocked, XDP_DROP, Reason::Blocklist);
    expect(&mut h, &v6, XDP_PASS, Reason::Pass);

    // The program believes the hint: with the source's bits cleared it does
    // not even look (which is why userspace must never clear a live bit).
    let slot = hint::slot_v4(&SRC);
    let w = hint::word(hint::V4_BASE, slot);
    h.maps.hint_set(w, 0).unwrap();
    expect(&mut h, &ack, XDP_PASS, Reason::Pass);
    // ... but only once it is marked ready.
    h.maps.hint_set(hint::READY_INDEX, 0).unwrap();
    expect(&mut h, &ack, XDP_DROP, Reason::Blocklist);

    // A rebuild from a list that lacks a live entry (another process added
    // it meanwhile) still leaves its bits set: it reads the maps back.
    h.maps.hint_rebuild([], []).unwrap();
    let (got, ready) = h.maps.hint().unwrap();
    assert!(ready);
    assert_eq!(
        got.maybe(&gateway_common::packet::Source::V4(SRC)),
        (true, false)
    );
    expect(&mut h, &ack, XDP_DROP, Reason::Blocklist);
    expect(&mut h, &v6_blocked, XDP_DROP, Reason::Blocklist);

    // After a removal the rebuild clears the slot; nothing else is set.
    h.maps
        .block_remove(&"198.51.100.7".parse::<Cidr>().unwrap())
        .unwrap();
    let left = ["2001:db8:1::/48".parse::<Cidr>().unwrap()];
    h.maps.hint_rebuild(&left, []).unwrap();
    let (got, _) = h.maps.hint().unwrap();
    assert_eq!(got, hint::Hint::of(&left, None));
    expect(&mut h, &ack, XDP_PASS, Reason::Pass);

    // The allowlist's bits work the same way.
    let me = "198.51.100.7".parse::<Cidr>().unwrap();
    block(&mut h, "198.51.100.0/24", 0);
    h.maps.allow_insert(&me).unwrap();
    expect(&mut h, &ack, XDP_PASS, Reason::Allowlist);
    // A rebuild from an allowlist that lacks the entry keeps its bit.
    let net = "198.51.100.0/24".parse::<Cidr>().unwrap();
    h.maps.hint_rebuild(&[net, left[0]], []).unwrap();
    assert_eq!(
        h.maps.hint().unwrap().0,
        hint::Hint::of(&[net, left[0]], [&me])
    );
    expect(&mut h, &ack, XDP_PASS, Reason::Allowlist);
    // Without its bit the program does not look the source up.
    h.maps
        .hint_set(hint::allow_word(hint::ALLOW_V4_BASE, slot), 0)
        .unwrap();
    expect(&mut h, &ack, XDP_DROP, Reason::Blocklist);
}

#[test]
fn expiry_lapses_in_the_kernel() {
    let mut h = harness!(limits());
    let now = clock::monotonic_ns();
    block(&mut h, "198.51.100.7", now + 60_000_000_000);
    block(&mut h, "198.51.100.8", now - 1);
    expect(&mut h, &syn(SRC), XDP_DROP, Reason::Blocklist);
    expect(&mut h, &syn(SRC2), XDP_PASS, Reason::SynPass);
    // A CIDR entry lapses the same way, and the host entry's lapse does not
    // hide an active covering CIDR.
    block(&mut h, "198.51.100.0/24", now + 60_000_000_000);
    expect(&mut h, &syn(SRC2), XDP_DROP, Reason::Blocklist);
    // Sweeping removes exactly the lapsed entry.
    let (gone, next) = h.maps.remove_expired(clock::monotonic_ns()).unwrap();
    assert_eq!(gone, vec!["198.51.100.8".parse::<Cidr>().unwrap()]);
    assert_eq!(
        next,
        Some(now + 60_000_000_000),
        "the next lapse the sweep waits for"
    );
    // ... and rebuilds the hint from what is left.
    let live: Vec<Cidr> = ["198.51.100.7", "198.51.100.0/24"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(
        h.maps.hint().unwrap(),
        (gateway_common::hint::Hint::of(&live, None), true)
    );
}

#[test]
fn syn_bucket_drains_and_refills_over_time() {
    let mut h = harness!(Limits::new(50, 5, 0, 32, 64));
    for i in 0..5 {
        let got = h.run(&syn(SRC)).unwrap();
        assert_eq!(got, XDP_PASS, "SYN {i} of the burst of 5 was dropped");
    }
    expect(&mut h, &syn(SRC), XDP_DROP, Reason::SynRate);
    // Another source is unaffected.
    expect(&mut h, &syn(SRC2), XDP_PASS, Reason::SynPass);
    // At 50/s a token comes back every 20 ms: poll until it does.
    let start = Instant::now();
    loop {
        if h.run(&syn(SRC)).unwrap() == XDP_PASS {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "bucket did not refill within 2 s"
        );
        std::thread::yield_now();
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(5),
        "refilled after only {waited:?}"
    );
    // The bucket in the map is keyed by the v4-mapped source.
    let key = gateway_common::v4_mapped(SRC);
    let b = bucket_of(&h, key).expect("bucket for the source");
    assert!(b.refused >= 1, "the refusals are counted: {b:?}");
}

fn bucket_of(h: &Harness, key: gateway_common::SourceKey) -> Option<SourceBucket> {
    h.maps.syn_bucket(&key).unwrap()
}

#[test]
fn syn_refusals_reach_top_sources_in_batches() {
    use gateway_common::{bucket::RANK_BATCH, v4_mapped};
    // 1/s with a burst of 1: the first SYN passes, the rest of this
    // (millisecond-long) test is refused.
    let mut h = harness!(Limits::new(1, 1, 0, 32, 64));
    expect(&mut h, &syn(SRC), XDP_PASS, Reason::SynPass);
    let refused = RANK_BATCH + 8;
    for _ in 0..refused {
        expect(&mut h, &syn(SRC), XDP_DROP, Reason::SynRate);
    }
    let b = bucket_of(&h, v4_mapped(SRC)).expect("bucket for the source");
    assert_eq!(b.refused, refused, "every refusal counted on the bucket");
    // Malformed drops are credited one by one.
    let bad = Frame::v4(SRC2, DST).tcp(PORT, TCP_SYN).tcp_doff(2).build();
    for _ in 0..3 {
        expect(&mut h, &bad, XDP_DROP, Reason::Malformed);
    }
    // The kernel has credited the first refusal and one batch; the 7
    // after it wait for the next batch.
    assert_eq!(
        h.maps.top_credited().unwrap(),
        vec![(v4_mapped(SRC), RANK_BATCH + 1), (v4_mapped(SRC2), 3)],
    );
    // A source that is its own bucket (IPv4 /32) gets its exact count: the
    // bucket's uncredited refusals are added.
    assert_eq!(
        h.maps.top(10).unwrap(),
        vec![(v4_mapped(SRC), refused), (v4_mapped(SRC2), 3)],
    );
    // With /24 buckets a source's count is what the kernel credited.
    h.maps.set_limits(&Limits::new(1, 1, 0, 24, 64)).unwrap();
    assert_eq!(
        h.maps.top(10).unwrap(),
        vec![(v4_mapped(SRC), RANK_BATCH + 1), (v4_mapped(SRC2), 3)],
    );
}

#[test]
fn global_budget_caps_many_sources() {
    // No per-source limit; 10 SYNs per second from everyone together.
    let mut h = harness!(Limits::new(0, 0, 10, 32, 64));
    let mut passed = 0;
    for i in 0..30u8 {
        let f = syn([203, 0, 113, i]);
        if h.run(&f).unwrap() == XDP_PASS {
            passed += 1;
        }
    }
    assert_eq!(passed, 10, "the global budget holds one second's worth");
    assert_eq!(h.count(Reason::SynGlobal).unwrap(), 20);
}

#[test]
fn fresh_sources_refused_by_the_global_budget_leave_no_bucket() {
    // Per-source limits on; 10 SYNs per second from everyone together.
    let mut h = harness!(Limits::new(5, 5, 10, 32, 64));
    for i in 0..100u8 {
        h.run(&syn([203, 0, 113, i])).unwrap();
    }
    assert_eq!(h.count(Reason::SynGlobal).unwrap(), 90);
    let buckets = h
        .maps
        .entries_per_map()
        .into_iter()
        .find(|(m, _)| *m == gateway_common::names::SYN_BUCKETS)
        .map(|(_, n)| n);
    assert_eq!(buckets, Some(10), "a bucket for each admitted source only");
}

#[test]
fn trusted_sources_pass_a_spent_global_budget() {
    use gateway_common::{v4_mapped, TRUST_TTL_NS};
    let mut h = harness!(Limits::new(0, 0, 1, 32, 64));
    let now = clock::monotonic_ns();
    h.maps.trust(&v4_mapped(SRC), now).unwrap();
    // Seen too long ago: no longer trusted.
    h.maps
        .trust(
            &v4_mapped(SRC2),
            now.saturating_sub(TRUST_TTL_NS + 1_000_000_000),
        )
        .unwrap();
    let stranger = syn([203, 0, 113, 1]);
    expect(&mut h, &stranger, XDP_PASS, Reason::SynPass); // the budget of 1
    expect(&mut h, &stranger, XDP_DROP, Reason::SynGlobal);
    for _ in 0..5 {
        expect(&mut h, &syn(SRC), XDP_PASS, Reason::SynPass);
    }
    expect(&mut h, &syn(SRC2), XDP_DROP, Reason::SynGlobal);
    // Through the workers' path: the pinned map is not needed for the key.
    assert_eq!(
        crate::kernel::trust::key("::ffff:198.51.100.7".parse().unwrap()),
        v4_mapped(SRC)
    );
}

/// Runs `runs` SYNs from `SRC` on each of two CPUs at once under `limits`
/// (after `first` SYNs on this thread). Returns the SYNs admitted, and how
/// many more than its burst a bucket of `rate` may admit meanwhile: its
/// refill by the coarse clock, and a race for the last SYN at each tick.
/// `None` (a skip) where this process may use only one CPU.
fn syn_flood_on_two_cpus(limits: Limits, first: u32, runs: u32, rate: u64) -> Option<(u64, u64)> {
    let mut h = Harness::new(limits, &[PORT]).expect("loading the XDP program");
    let before = clock::monotonic_ns();
    for _ in 0..first {
        h.run(&syn(SRC)).unwrap();
    }
    let cpus = h.run_on_cpus(&syn(SRC), runs, 2).unwrap() as u64;
    let ticked = clock::monotonic_ns() - before;
    if cpus < 2 {
        super::testrun::skipped(module_path!(), "this process may use only one CPU");
        return None;
    }
    let admitted = h.count(Reason::SynPass).unwrap();
    let refused = h.count(Reason::SynRate).unwrap() + h.count(Reason::SynGlobal).unwrap();
    assert_eq!(admitted + refused, first as u64 + cpus * runs as u64);
    // The bucket may be spent again at each tick of the coarse clock (at
    // most one per millisecond), and each time both CPUs may take its last
    // SYN: one more per tick.
    let refill = (ticked as u128 * rate as u128 / 1_000_000_000) as u64 + 1;
    let races = ticked / 1_000_000 + 1;
    Some((admitted, refill + races))
}

/// CPUs that receive one flood at once share its buckets, and each CPU's
/// take must count: a bucket refuses once spent however many CPUs take from
/// it. (A read-modify-write of a token bucket lost the other CPU's takes,
/// and let 0.3-4% more than the burst through.) At most one SYN per CPU
/// beyond the limit: two CPUs that read the last take both take it.
#[test]
fn cpus_sharing_a_bucket_admit_no_more_than_its_burst() {
    if !kernel_tests_enabled(module_path!()) {
        return;
    }
    const BURST: u64 = 50_000;
    // A source's bucket: 1 SYN/s (no refill to speak of while the test
    // runs), a burst of BURST, no global budget. Both CPUs start with no
    // bucket for the source, so they may both make it.
    let Some((admitted, refill)) =
        syn_flood_on_two_cpus(Limits::new(1, BURST, 0, 32, 64), 0, 100_000, 1)
    else {
        return;
    };
    assert!(
        admitted >= BURST && admitted <= BURST + refill + 1,
        "two CPUs took {admitted} SYNs from a bucket of {BURST} (refill {refill})"
    );
}

#[test]
fn cpus_sharing_the_global_budget_admit_no_more_than_it_holds() {
    if !kernel_tests_enabled(module_path!()) {
        return;
    }
    const BURST: u64 = 50_000;
    // 50,000 SYNs/s with as many in the bucket, no per-source limit; it
    // refills as the kernel's clock moves while the test runs.
    let Some((admitted, refill)) =
        syn_flood_on_two_cpus(Limits::new(0, 0, BURST, 32, 64), 1, 100_000, BURST)
    else {
        return;
    };
    assert!(
        admitted >= BURST && admitted <= BURST + refill + 1,
        "two CPUs took {admitted} SYNs from a global budget of {BURST} (refill {refill})"
    );
}

#[test]
fn limits_change_at_runtime_without_reload() {
    let mut h = harness!(Limits::new(1, 1, 0, 32, 64));
    expect(&mut h, &syn(SRC), XDP_PASS, Reason::SynPass);
    expect(&mut h, &syn(SRC), XDP_DROP, Reason::SynRate);
    h.maps.set_limits(&Limits::new(0, 0, 0, 32, 64)).unwrap();
    expect(&mut h, &syn(SRC), XDP_PASS, Reason::SynPass);
}

#[test]
fn syn_ack_and_non_syn_pass() {
    let mut h = harness!(Limits::new(1, 1, 1, 32, 64));
    for flags in [TCP_SYN | TCP_ACK, TCP_ACK, TCP_RST, 0] {
        for _ in 0..5 {
            let f = Frame::v4(SRC, DST).tcp(PORT, flags).build();
            expect(&mut h, &f, XDP_PASS, Reason::Pass);
        }
    }
    // A SYN to an unprotected port is not limited.
    for _ in 0..5 {
        let f = Frame::v4(SRC, DST).tcp(22, TCP_SYN).build();
        expect(&mut h, &f, XDP_PASS, Reason::Pass);
    }
}

#[test]
fn vlan_single_and_double_tags() {
    let mut h = harness!(limits());
    block(&mut h, "198.51.100.7", 0);
    for tags in [vec![ETH_P_8021Q], vec![ETH_P_8021AD, ETH_P_8021Q]] {
        let f = Frame::v4(SRC, DST).vlans(&tags).tcp(PORT, TCP_SYN).build();
        expect(&mut h, &f, XDP_DROP, Reason::Blocklist);
        let f = Frame::v4(SRC2, DST).vlans(&tags).tcp(PORT, TCP_SYN).build();
        expect(&mut h, &f, XDP_PASS, Reason::SynPass);
    }
}

#[test]
fn ipv4_options_and_malformed_headers() {
    let mut h = harness!(limits());
    let opts = Frame::v4(SRC, DST)
        .ip_options(40)
        .tcp(PORT, TCP_SYN)
        .build();
    expect(&mut h, &opts, XDP_PASS, Reason::SynPass);
    let bad_ihl = Frame::v4(SRC, DST).tcp(PORT, TCP_SYN).ihl(4).build();
    expect(&mut h, &bad_ihl, XDP_DROP, Reason::Malformed);
    let bad_doff = Frame::v4(SRC, DST).tcp(PORT, TCP_SYN).tcp_doff(3).build();
    expect(&mut h, &bad_doff, XDP_DROP, Reason::Malformed);
    // Malformed but not aimed at a protected port: not ours to drop.
    let other = Frame::v4(SRC, DST).tcp(22, TCP_SYN).tcp_doff(3).build();
    expect(&mut h, &other, XDP_PASS, Reason::Pass);
}

#[test]
fn ipv6_extension_headers() {
    let mut h = harness!(Limits::new(5, 1, 0, 32, 64));
    let f = Frame::v6(V6_A, V6_B)
        .ext(&[0, 60, 43, 51])
        .tcp(PORT, TCP_SYN)
        .build();
    expect(&mut h, &f, XDP_PASS, Reason::SynPass);
    // Same /64, so the same bucket: the extension headers do not hide it.
    expect(&mut h, &f, XDP_DROP, Reason::SynRate);
    let too_long = Frame::v6(V6_B, V6_A)
        .ext(&[60; 9])
        .tcp(PORT, TCP_SYN)
        .build();
    expect(&mut h, &too_long, XDP_DROP, Reason::Malformed);
    let esp = Frame::v6(V6_B, V6_A).ext(&[0]).udp(500).build();
    expect(&mut h, &esp, XDP_PASS, Reason::Pass);
    // A chain as long as the program walks, ending in UDP: passed; one
    // header more and what follows is unknown: dropped.
    let long_udp = Frame::v6(V6_B, V6_A).ext(&[60; 8]).udp(PORT).build();
    expect(&mut h, &long_udp, XDP_PASS, Reason::Pass);
    let longer_udp = Frame::v6(V6_B, V6_A).ext(&[60; 9]).udp(PORT).build();
    expect(&mut h, &longer_udp, XDP_DROP, Reason::Malformed);
    // Exactly eight headers before a SYN (from another /64, with a
    // bucket of its own): walked, and rate-limited.
    let mut other = V6_A;
    other[7] = 0x0c;
    let eight = Frame::v6(other, V6_A)
        .ext(&[60; 8])
        .tcp(PORT, TCP_SYN)
        .build();
    expect(&mut h, &eight, XDP_PASS, Reason::SynPass);
    expect(&mut h, &eight, XDP_DROP, Reason::SynRate);
}

#[test]
fn fragments_get_address_checks_only() {
    let mut h = harness!(Limits::new(1, 1, 0, 32, 64));
    block(&mut h, "198.51.100.7", 0);
    let blocked_frag = Frame::v4(SRC, DST)
        .frag(100, true)
        .tcp(PORT, TCP_SYN)
        .build();
    expect(&mut h, &blocked_frag, XDP_DROP, Reason::Blocklist);
    for _ in 0..3 {
        let frag = Frame::v4(SRC2, DST)
            .frag(100, false)
            .tcp(PORT, TCP_SYN)
            .build();
        expect(&mut h, &frag, XDP_PASS, Reason::Fragment);
        let v6 = Frame::v6(V6_A, V6_B)
            .frag(8, true)
            .tcp(PORT, TCP_SYN)
            .build();
        expect(&mut h, &v6, XDP_PASS, Reason::Fragment);
    }
    // A first fragment carries the TCP header and is limited like any SYN.
    let first = Frame::v4(SRC2, DST)
        .frag(0, true)
        .tcp(PORT, TCP_SYN)
        .build();
    expect(&mut h, &first, XDP_PASS, Reason::SynPass);
    expect(&mut h, &first, XDP_DROP, Reason::SynRate);
}

#[test]
fn truncated_at_every_header_boundary() {
    let mut h = harness!(limits());
    let v4 = Frame::v4(SRC, DST)
        .vlans(&[ETH_P_8021Q])
        .ip_options(8)
        .tcp(PORT, TCP_SYN)
        .build();
    // Ethernet (14) + VLAN (4) = 18; IPv4 fixed header ends at 38, options
    // at 46, TCP at 66.
    let cases: &[(usize, u32, Reason)] = &[
        (0, XDP_PASS, Reason::NotIp),
        (13, XDP_PASS, Reason::NotIp),
        (17, XDP_PASS, Reason::NotIp),
        (18, XDP_PASS, Reason::Unparsed),
        (37, XDP_PASS, Reason::Unparsed),
        // Options cut before the TCP port: not provably aimed at us.
        (38, XDP_PASS, Reason::Pass),
        (45, XDP_PASS, Reason::Pass),
        (46, XDP_PASS, Reason::Pass),
        (49, XDP_PASS, Reason::Pass),
        (50, XDP_DROP, Reason::Malformed), // port readable, TCP header cut
        (65, XDP_DROP, Reason::Malformed),
        (66, XDP_PASS, Reason::SynPass),
    ];
    for (len, action, reason) in cases {
        let got = h.run(&v4[..*len]).unwrap_or(u32::MAX);
        // The kernel refuses test frames shorter than an Ethernet header.
        if *len < 14 {
            assert!(got == XDP_PASS || got == u32::MAX, "cut at {len}: {got}");
            continue;
        }
        let before = h.count(*reason).unwrap();
        let got = h.run(&v4[..*len]).unwrap();
        assert_eq!(
            got,
            *action,
            "frame cut at {len} bytes should be {}",
            reason.name()
        );
        assert_eq!(
            h.count(*reason).unwrap(),
            before + 1,
            "cut at {len}: {} not counted",
            reason.name()
        );
    }
    let v6 = Frame::v6(V6_A, V6_B).ext(&[0]).tcp(PORT, TCP_SYN).build();
    // IPv6 header ends at 54, hop-by-hop at 62, TCP at 82.
    for (len, action, reason) in [
        (53, XDP_PASS, Reason::Unparsed),
        (54, XDP_PASS, Reason::Pass),
        (61, XDP_PASS, Reason::Pass),
        (62, XDP_PASS, Reason::Pass),
        (66, XDP_DROP, Reason::Malformed),
        (82, XDP_PASS, Reason::SynPass),
    ] {
        let before = h.count(reason).unwrap();
        assert_eq!(
            h.run(&v6[..len]).unwrap(),
            action,
            "IPv6 frame cut at {len}"
        );
        assert_eq!(
            h.count(reason).unwrap(),
            before + 1,
            "IPv6 cut at {len}: {} not counted",
            reason.name()
        );
    }
}

#[test]
fn non_ip_frames_pass_untouched() {
    let mut h = harness!(limits());
    for ethertype in [0x0806u16, 0x88cc, 0x8847] {
        let f = Frame::raw_ethertype(ethertype, 46).build();
        expect(&mut h, &f, XDP_PASS, Reason::NotIp);
    }
}
