//! IPv4/IPv6 prefixes ("CIDRs") as the blocklist and allowlist store them.
//!
//! Parsing is strict: a host address with bits set past the prefix
//! (`10.0.0.1/8`) is an error rather than silently truncated, because an
//! operator who typed it almost certainly meant something else.

use core::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IPv4 or IPv6 prefix with no bits set past its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cidr {
    V4 { addr: [u8; 4], len: u8 },
    V6 { addr: [u8; 16], len: u8 },
}

/// Why a string is not a valid CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrError {
    /// The address part is neither IPv4 nor IPv6.
    BadAddress,
    /// The part after `/` is not a number.
    BadPrefix,
    /// The prefix is longer than the address (max is carried).
    PrefixTooLong { max: u8 },
    /// Bits are set past the prefix; `suggestion` is the network address.
    HostBits { suggestion: Cidr },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::BadAddress => f.write_str("not an IPv4 or IPv6 address"),
            CidrError::BadPrefix => f.write_str("the prefix length after '/' is not a number"),
            CidrError::PrefixTooLong { max } => {
                write!(f, "the prefix length is longer than {max} bits")
            }
            CidrError::HostBits { suggestion } => {
                write!(
                    f,
                    "bits are set past the prefix length (did you mean {suggestion}?)"
                )
            }
        }
    }
}

impl Cidr {
    /// The prefix containing exactly one address.
    pub fn host(ip: IpAddr) -> Cidr {
        match ip {
            IpAddr::V4(a) => Cidr::V4 {
                addr: a.octets(),
                len: 32,
            },
            IpAddr::V6(a) => Cidr::V6 {
                addr: a.octets(),
                len: 128,
            },
        }
    }

    /// The prefix of `ip` that is `v4_len` bits long for an IPv4 address
    /// and `v6_len` for an IPv6 one (each capped at the address's length),
    /// with the bits past it cleared: the network a source belongs to when
    /// sources are counted per prefix.
    pub fn enclosing(ip: IpAddr, v4_len: u8, v6_len: u8) -> Cidr {
        let mut c = Cidr::host(ip);
        match &mut c {
            Cidr::V4 { addr, len } => {
                *len = v4_len.min(32);
                check_host_bits(addr, *len);
            }
            Cidr::V6 { addr, len } => {
                *len = v6_len.min(128);
                check_host_bits(addr, *len);
            }
        }
        c
    }

    /// An IPv4-mapped IPv6 prefix (`::ffff:198.51.100.0/120`) as the IPv4
    /// prefix it stands for (`198.51.100.0/24`); anything else unchanged.
    /// IPv4 packets carry IPv4 addresses, so the kernel would never match
    /// the mapped form: an operator who writes it means the IPv4 one.
    pub fn unmapped(self) -> Cidr {
        match self {
            Cidr::V6 { addr, len } if len >= 96 => match Ipv6Addr::from(addr).to_ipv4_mapped() {
                Some(v4) => Cidr::V4 {
                    addr: v4.octets(),
                    len: len - 96,
                },
                None => self,
            },
            _ => self,
        }
    }

    /// Prefix length in bits.
    pub const fn prefix_len(&self) -> u8 {
        match self {
            Cidr::V4 { len, .. } | Cidr::V6 { len, .. } => *len,
        }
    }

    /// True for a single address (/32 or /128).
    pub const fn is_host(&self) -> bool {
        match self {
            Cidr::V4 { len, .. } => *len == 32,
            Cidr::V6 { len, .. } => *len == 128,
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            Cidr::V4 { addr, .. } => IpAddr::V4(Ipv4Addr::from(*addr)),
            Cidr::V6 { addr, .. } => IpAddr::V6(Ipv6Addr::from(*addr)),
        }
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Cidr::V4 { addr, len }, IpAddr::V4(a)) => masked_eq(addr, &a.octets(), *len),
            (Cidr::V6 { addr, len }, IpAddr::V6(a)) => masked_eq(addr, &a.octets(), *len),
            _ => false,
        }
    }
}

fn masked_eq(net: &[u8], ip: &[u8], len: u8) -> bool {
    let mut mask = [0u8; 16];
    crate::maps::prefix_mask(&mut mask[..net.len()], len);
    net.iter()
        .zip(ip)
        .zip(mask.iter())
        .all(|((n, i), m)| n & m == i & m)
}

fn check_host_bits(addr: &mut [u8], len: u8) -> bool {
    let mut mask = [0u8; 16];
    let mask = &mut mask[..addr.len()];
    crate::maps::prefix_mask(mask, len);
    let mut clean = true;
    for (b, m) in addr.iter_mut().zip(mask.iter()) {
        if *b & !m != 0 {
            clean = false;
        }
        *b &= m;
    }
    clean
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => {
                let len: u8 = len.trim().parse().map_err(|_| CidrError::BadPrefix)?;
                (ip.trim(), Some(len))
            }
            None => (s, None),
        };
        let ip = IpAddr::from_str(ip).map_err(|_| CidrError::BadAddress)?;
        let mut cidr = Cidr::host(ip);
        if let Some(len) = len {
            let max = match ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            if len > max {
                return Err(CidrError::PrefixTooLong { max });
            }
            let clean = match &mut cidr {
                Cidr::V4 { addr, len: l } => {
                    *l = len;
                    check_host_bits(addr, len)
                }
                Cidr::V6 { addr, len: l } => {
                    *l = len;
                    check_host_bits(addr, len)
                }
            };
            if !clean {
                return Err(CidrError::HostBits { suggestion: cidr });
            }
        }
        Ok(cidr.unmapped())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Cidr, CidrError> {
        s.parse()
    }

    #[test]
    fn parses_hosts_and_prefixes() {
        assert_eq!(
            p("192.0.2.7"),
            Ok(Cidr::V4 {
                addr: [192, 0, 2, 7],
                len: 32
            })
        );
        assert_eq!(
            p(" 10.0.0.0/8 "),
            Ok(Cidr::V4 {
                addr: [10, 0, 0, 0],
                len: 8
            })
        );
        assert_eq!(
            p("0.0.0.0/0"),
            Ok(Cidr::V4 {
                addr: [0; 4],
                len: 0
            })
        );
        let v6 = p("2001:db8::/32").unwrap();
        assert_eq!(v6.prefix_len(), 32);
        assert!(p("2001:db8::1").unwrap().is_host());
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        assert_eq!(p("10.0.0.256"), Err(CidrError::BadAddress));
        assert_eq!(p("banana"), Err(CidrError::BadAddress));
        assert_eq!(p("10.0.0.0/x"), Err(CidrError::BadPrefix));
        assert_eq!(p("10.0.0.0/33"), Err(CidrError::PrefixTooLong { max: 32 }));
        assert_eq!(p("::/129"), Err(CidrError::PrefixTooLong { max: 128 }));
        assert_eq!(
            p("10.1.2.3/8"),
            Err(CidrError::HostBits {
                suggestion: Cidr::V4 {
                    addr: [10, 0, 0, 0],
                    len: 8
                }
            })
        );
        assert!(matches!(
            p("2001:db8::1/64"),
            Err(CidrError::HostBits { .. })
        ));
    }

    #[test]
    fn enclosing_clears_the_bits_past_each_familys_length() {
        let v4: IpAddr = "198.51.100.77".parse().unwrap();
        let v6: IpAddr = "2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap();
        assert_eq!(Cidr::enclosing(v4, 32, 64), p("198.51.100.77").unwrap());
        assert_eq!(Cidr::enclosing(v4, 24, 64), p("198.51.100.0/24").unwrap());
        assert_eq!(Cidr::enclosing(v6, 32, 64), p("2001:db8:1:2::/64").unwrap());
        assert_eq!(Cidr::enclosing(v6, 32, 56), p("2001:db8:1::/56").unwrap());
        assert_eq!(Cidr::enclosing(v6, 32, 200), Cidr::host(v6), "capped");
        assert_eq!(Cidr::enclosing(v4, 0, 0), p("0.0.0.0/0").unwrap());
    }

    #[test]
    fn ipv4_mapped_prefixes_parse_as_ipv4() {
        assert_eq!(p("::ffff:198.51.100.7"), p("198.51.100.7"));
        assert_eq!(p("::ffff:198.51.100.0/120"), p("198.51.100.0/24"));
        assert_eq!(p("::ffff:0:0/96"), p("0.0.0.0/0"));
        // Shorter than the mapped range, or outside it: IPv6 as written.
        assert!(matches!(p("::fffe:0:0/95"), Ok(Cidr::V6 { len: 95, .. })));
        assert!(matches!(p("::198.51.100.7"), Ok(Cidr::V6 { len: 128, .. })));
        assert!(matches!(
            p("64:ff9b::198.51.100.7"),
            Ok(Cidr::V6 { len: 128, .. })
        ));
        // Host bits are still checked on the written form.
        assert!(matches!(
            p("::ffff:198.51.100.7/120"),
            Err(CidrError::HostBits { .. })
        ));
    }

    #[test]
    fn contains_respects_family_and_prefix() {
        let net = p("198.51.100.0/22").unwrap();
        assert!(net.contains("198.51.103.255".parse().unwrap()));
        assert!(!net.contains("198.51.104.0".parse().unwrap()));
        assert!(!net.contains("::ffff:198.51.100.1".parse().unwrap()));
        assert!(p("::/0").unwrap().contains("2001:db8::9".parse().unwrap()));
    }
}
