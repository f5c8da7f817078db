//! A bounded, allocation-free packet parser shared by the XDP program, the
//! userspace tests and the fuzzers.
//!
//! It reads through [`Bytes`], whose kernel implementation checks every read
//! against `data_end` right before it happens (the shape the BPF verifier
//! proves safe) and whose slice implementation is plain bounds checking. Every
//! offset it computes is capped by [`MAX_L4_OFFSET`], and the IPv6 extension
//! header walk by [`MAX_EXT_HEADERS`], so the program has a fixed worst case.

/// Random access to a packet's bytes.
pub trait Bytes {
    /// `N` bytes at `off`, or `None` when the packet is shorter.
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl Bytes for [u8] {
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        let s = self.get(off..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Some(out)
    }
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
/// VLAN tags read at most (802.1ad outer + 802.1Q inner).
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked at most before the packet is called
/// malformed. Real TCP traffic carries zero to two.
pub const MAX_EXT_HEADERS: usize = 8;
/// Largest offset at which a transport header is looked for; deeper ones are
/// treated as malformed. Keeps every packet offset provably bounded.
pub const MAX_L4_OFFSET: usize = 512;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The source address of an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What the transport layer of an IP packet is, as far as policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP with a well-formed header.
    Tcp { dport: u16, flags: u8 },
    /// A non-first fragment: no transport header to look at.
    Fragment,
    /// Any other protocol, or TCP we chose not to inspect.
    Other,
    /// The IP or TCP header is invalid. `dport` is the TCP destination port
    /// when it could be read (only then can it be matched to a protected port).
    Malformed { dport: Option<u16> },
    /// An IPv6 extension chain longer or deeper than any real stack sends,
    /// ending in TCP or in more extension headers: it cannot be classified,
    /// and passing it would let SYN floods slip past the limits. (One that
    /// names another protocol at its end is `Other`.)
    Evasive,
}

/// Result of parsing one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4/IPv6, or the Ethernet/VLAN header is cut short.
    NotIp,
    /// IPv4/IPv6 ethertype but too short to read the addresses.
    Truncated,
    Ip {
        src: Source,
        transport: Transport,
    },
}

#[inline(always)]
fn be16<B: Bytes + ?Sized>(p: &B, off: usize) -> Option<u16> {
    p.read::<2>(off).map(u16::from_be_bytes)
}

/// Parses an Ethernet frame.
#[inline(always)]
pub fn parse<B: Bytes + ?Sized>(p: &B) -> Parsed {
    let Some(mut proto) = be16(p, 12) else {
        return Parsed::NotIp;
    };
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        // TCI (2 bytes) then the inner ethertype.
        let Some(inner) = be16(p, off + 2) else {
            return Parsed::NotIp;
        };
        proto = inner;
        off += 4;
    }
    match proto {
        ETH_P_IP => parse_ipv4(p, off),
        ETH_P_IPV6 => parse_ipv6(p, off),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4<B: Bytes + ?Sized>(p: &B, off: usize) -> Parsed {
    // The fixed 20-byte header carries everything we need.
    let Some(h) = p.read::<20>(off) else {
        return Parsed::Truncated;
    };
    let src = Source::V4([h[12], h[13], h[14], h[15]]);
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let proto = h[9];
    if frag & 0x1fff != 0 {
        // RFC 791: only the first fragment carries the transport header.
        return Parsed::Ip {
            src,
            transport: Transport::Fragment,
        };
    }
    if proto != IPPROTO_TCP {
        return Parsed::Ip {
            src,
            transport: Transport::Other,
        };
    }
    let bad_ip = h[0] >> 4 != 4 || ihl < 20 || total_len < ihl;
    // With a nonsense IHL the port is read where a minimal header would put it.
    let l4 = off + if ihl < 20 { 20 } else { ihl };
    let options_cut = p.read::<1>(l4 - 1).is_none();
    let transport = if bad_ip || options_cut {
        Transport::Malformed {
            dport: be16(p, l4 + 2),
        }
    } else {
        parse_tcp(p, l4)
    };
    Parsed::Ip { src, transport }
}

#[inline(always)]
fn parse_ipv6<B: Bytes + ?Sized>(p: &B, off: usize) -> Parsed {
    let Some(h) = p.read::<40>(off) else {
        return Parsed::Truncated;
    };
    let mut a = [0u8; 16];
    a.copy_from_slice(&h[8..24]);
    let src = Source::V6(a);
    if h[0] >> 4 != 6 {
        return malformed(src);
    }
    let mut next = h[6];
    let mut l4 = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => {
                return Parsed::Ip {
                    src,
                    transport: parse_tcp(p, l4),
                }
            }
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let Some([nh, len]) = p.read::<2>(l4) else {
                    return malformed(src);
                };
                next = nh;
                l4 += (len as usize + 1) * 8;
            }
            // Fragment header (RFC 8200 4.5): fixed 8 bytes.
            44 => {
                let Some([nh, _, fo_hi, fo_lo]) = p.read::<4>(l4) else {
                    return malformed(src);
                };
                if u16::from_be_bytes([fo_hi, fo_lo]) & 0xfff8 != 0 {
                    return Parsed::Ip {
                        src,
                        transport: Transport::Fragment,
                    };
                }
                next = nh;
                l4 += 8;
            }
            // Authentication header (RFC 4302): (len + 2) * 4 bytes.
            51 => {
                let Some([nh, len]) = p.read::<2>(l4) else {
                    return malformed(src);
                };
                next = nh;
                l4 += (len as usize + 2) * 4;
            }
            // ESP, no next header, or any other protocol: nothing to inspect.
            _ => {
                return Parsed::Ip {
                    src,
                    transport: Transport::Other,
                }
            }
        }
        if l4 > MAX_L4_OFFSET {
            return Parsed::Ip {
                src,
                transport: unreachable_l4(next),
            };
        }
    }
    if next == IPPROTO_TCP {
        return Parsed::Ip {
            src,
            transport: parse_tcp(p, l4),
        };
    }
    Parsed::Ip {
        src,
        transport: unreachable_l4(next),
    }
}

/// An upper layer past what the parser walks (too many extension headers,
/// or too deep): evasive when it is TCP or still an extension header (it
/// could be a SYN to a protected port), other traffic when the chain names
/// another protocol (UDP, ICMPv6), which the program passes.
#[inline(always)]
fn unreachable_l4(next: u8) -> Transport {
    match next {
        IPPROTO_TCP | 0 | 43 | 44 | 51 | 60 => Transport::Evasive,
        _ => Transport::Other,
    }
}

#[inline(always)]
fn malformed(src: Source) -> Parsed {
    Parsed::Ip {
        src,
        transport: Transport::Malformed { dport: None },
    }
}

#[inline(always)]
fn parse_tcp<B: Bytes + ?Sized>(p: &B, off: usize) -> Transport {
    if off > MAX_L4_OFFSET {
        return Transport::Malformed { dport: None };
    }
    let Some(t) = p.read::<20>(off) else {
        return Transport::Malformed {
            dport: be16(p, off + 2),
        };
    };
    let dport = u16::from_be_bytes([t[2], t[3]]);
    let doff = ((t[12] >> 4) as usize) * 4;
    if doff < 20 || p.read::<1>(off + doff - 1).is_none() {
        return Transport::Malformed { dport: Some(dport) };
    }
    Transport::Tcp {
        dport,
        flags: t[13],
    }
}

/// Builders for crafted frames, used by unit tests, the kernel tests and the
/// benchmarks (compiled for userspace only).
#[cfg(any(test, feature = "user"))]
pub mod craft;

#[cfg(test)]
mod tests {
    use super::craft::*;
    use super::*;
    use std::vec;

    fn tcp(dport: u16, flags: u8) -> Transport {
        Transport::Tcp { dport, flags }
    }

    #[test]
    fn ipv4_tcp_syn() {
        let f = Frame::v4([192, 0, 2, 1], [192, 0, 2, 2])
            .tcp(8443, TCP_SYN)
            .build();
        assert_eq!(
            parse(&f[..]),
            Parsed::Ip {
                src: Source::V4([192, 0, 2, 1]),
                transport: tcp(8443, TCP_SYN)
            }
        );
    }

    #[test]
    fn vlan_tags_single_and_double() {
        for tags in [vec![ETH_P_8021Q], vec![ETH_P_8021AD, ETH_P_8021Q]] {
            let f = Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
                .vlans(&tags)
                .tcp(80, TCP_SYN)
                .build();
            assert_eq!(
                parse(&f[..]),
                Parsed::Ip {
                    src: Source::V4([10, 0, 0, 1]),
                    transport: tcp(80, TCP_SYN)
                },
                "tags {tags:x?}"
            );
        }
        // A third tag is beyond what we read: treated as not-IP and passed.
        let f = Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
            .vlans(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q])
            .tcp(80, TCP_SYN)
            .build();
        assert_eq!(parse(&f[..]), Parsed::NotIp);
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let f = Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
            .ip_options(40)
            .tcp(22, TCP_SYN)
            .build();
        assert!(matches!(
            parse(&f[..]),
            Parsed::Ip {
                transport: Transport::Tcp { dport: 22, .. },
                ..
            }
        ));
    }

    #[test]
    fn ipv4_bad_ihl_is_malformed_with_port() {
        let f = Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
            .tcp(443, TCP_SYN)
            .ihl(3)
            .build();
        assert_eq!(
            parse(&f[..]),
            Parsed::Ip {
                src: Source::V4([10, 0, 0, 1]),
                transport: Transport::Malformed { dport: Some(443) }
            }
        );
    }

    #[test]
    fn tcp_bad_data_offset_is_malformed() {
        let f = Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
            .tcp(443, TCP_SYN)
            .tcp_doff(4)
            .build();
        assert!(matches!(
            parse(&f[..]),
            Parsed::Ip {
                transport: Transport::Malformed { dport: Some(443) },
                ..
            }
        ));
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let f = Frame::v6(V6_A, V6_B)
            .ext(&[0, 60, 43])
            .tcp(8443, TCP_SYN)
            .build();
        assert_eq!(
            parse(&f[..]),
            Parsed::Ip {
                src: Source::V6(V6_A),
                transport: tcp(8443, TCP_SYN)
            }
        );
        let too_many = Frame::v6(V6_A, V6_B)
            .ext(&[60; 9])
            .tcp(8443, TCP_SYN)
            .build();
        assert_eq!(
            parse(&too_many[..]),
            Parsed::Ip {
                src: Source::V6(V6_A),
                transport: Transport::Evasive
            }
        );
        // The chain's end names UDP: other traffic, not evasive. Past the
        // walk it may be anything: evasive.
        let udp = |n: usize| Frame::v6(V6_A, V6_B).ext(&vec![60; n]).udp(53).build();
        for (n, want) in [(8, Transport::Other), (9, Transport::Evasive)] {
            assert_eq!(
                parse(&udp(n)[..]),
                Parsed::Ip {
                    src: Source::V6(V6_A),
                    transport: want
                },
                "{n} extension headers, then UDP"
            );
        }
    }

    #[test]
    fn fragments() {
        let first = Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
            .frag(0, true)
            .tcp(80, TCP_SYN)
            .build();
        assert!(matches!(
            parse(&first[..]),
            Parsed::Ip {
                transport: Transport::Tcp { .. },
                ..
            }
        ));
        let later = Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
            .frag(185, false)
            .tcp(80, TCP_SYN)
            .build();
        assert!(matches!(
            parse(&later[..]),
            Parsed::Ip {
                transport: Transport::Fragment,
                ..
            }
        ));
        let v6_later = Frame::v6(V6_A, V6_B)
            .frag(64, true)
            .tcp(80, TCP_SYN)
            .build();
        assert!(matches!(
            parse(&v6_later[..]),
            Parsed::Ip {
                transport: Transport::Fragment,
                ..
            }
        ));
        let v6_first = Frame::v6(V6_A, V6_B).frag(0, true).tcp(80, TCP_SYN).build();
        assert!(matches!(
            parse(&v6_first[..]),
            Parsed::Ip {
                transport: Transport::Tcp { .. },
                ..
            }
        ));
    }

    #[test]
    fn every_truncation_is_handled() {
        let frames = [
            Frame::v4([10, 0, 0, 1], [10, 0, 0, 2])
                .vlans(&[ETH_P_8021Q])
                .ip_options(8)
                .tcp(80, TCP_SYN)
                .build(),
            Frame::v6(V6_A, V6_B).ext(&[0, 44]).tcp(80, TCP_SYN).build(),
        ];
        for f in frames {
            for cut in 0..f.len() {
                // Must not panic, and a cut frame never parses as good TCP.
                let got = parse(&f[..cut]);
                assert!(
                    !matches!(
                        got,
                        Parsed::Ip {
                            transport: Transport::Tcp { .. },
                            ..
                        }
                    ),
                    "frame cut at {cut} parsed as complete TCP: {got:?}"
                );
            }
        }
    }

    #[test]
    fn non_ip_frames() {
        let arp = Frame::raw_ethertype(0x0806, 28).build();
        assert_eq!(parse(&arp[..]), Parsed::NotIp);
        assert_eq!(parse(&[0u8; 5][..]), Parsed::NotIp);
    }
}
