//! Builders for crafted Ethernet frames: every verdict test and benchmark
//! describes its packet with these instead of hand-written byte arrays.

use std::vec::Vec;

use super::{ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP};

/// An IPv6 address for tests (2001:db8::a).
pub const V6_A: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a,
];
/// Another IPv6 address for tests (2001:db8::b).
pub const V6_B: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b,
];

#[derive(Clone, Debug)]
enum L3 {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
    Raw { ethertype: u16, len: usize },
}

#[derive(Clone, Debug)]
enum L4 {
    None,
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        doff: u8,
    },
    Udp {
        dport: u16,
    },
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    l3: L3,
    vlans: Vec<u16>,
    ip_options: usize,
    ihl: Option<u8>,
    /// (offset in 8-byte units, more fragments)
    frag: Option<(u16, bool)>,
    ext: Vec<u8>,
    l4: L4,
    payload: usize,
}

impl Frame {
    fn new(l3: L3) -> Self {
        Frame {
            l3,
            vlans: Vec::new(),
            ip_options: 0,
            ihl: None,
            frag: None,
            ext: Vec::new(),
            l4: L4::None,
            payload: 0,
        }
    }

    pub fn v4(src: [u8; 4], dst: [u8; 4]) -> Self {
        Self::new(L3::V4 { src, dst })
    }

    pub fn v6(src: [u8; 16], dst: [u8; 16]) -> Self {
        Self::new(L3::V6 { src, dst })
    }

    /// A frame with an arbitrary ethertype and `len` zero bytes after it.
    pub fn raw_ethertype(ethertype: u16, len: usize) -> Self {
        Self::new(L3::Raw { ethertype, len })
    }

    /// VLAN tags, outermost first, given by their TPID (0x8100 / 0x88a8).
    pub fn vlans(mut self, tpids: &[u16]) -> Self {
        self.vlans = tpids.to_vec();
        self
    }

    /// IPv4 options of `len` bytes (a multiple of 4, NOPs).
    pub fn ip_options(mut self, len: usize) -> Self {
        self.ip_options = len;
        self
    }

    /// Overrides the IPv4 header length field (in 32-bit words).
    pub fn ihl(mut self, words: u8) -> Self {
        self.ihl = Some(words);
        self
    }

    /// Marks the packet a fragment: IPv4 flags/offset, or an IPv6 fragment
    /// header appended to the extension chain.
    pub fn frag(mut self, offset_units: u16, more: bool) -> Self {
        self.frag = Some((offset_units, more));
        self
    }

    /// IPv6 extension headers (0, 43, 60: 8 bytes each; 51: AH of 12 bytes).
    pub fn ext(mut self, types: &[u8]) -> Self {
        self.ext = types.to_vec();
        self
    }

    pub fn tcp(mut self, dport: u16, flags: u8) -> Self {
        self.l4 = L4::Tcp {
            sport: 40000,
            dport,
            flags,
            doff: 5,
        };
        self
    }

    pub fn sport(mut self, port: u16) -> Self {
        if let L4::Tcp { sport, .. } = &mut self.l4 {
            *sport = port;
        }
        self
    }

    /// Overrides the TCP data offset (in 32-bit words).
    pub fn tcp_doff(mut self, words: u8) -> Self {
        if let L4::Tcp { doff, .. } = &mut self.l4 {
            *doff = words;
        }
        self
    }

    pub fn udp(mut self, dport: u16) -> Self {
        self.l4 = L4::Udp { dport };
        self
    }

    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let proto = match self.l4 {
            L4::None => 59,
            L4::Tcp {
                sport,
                dport,
                flags,
                doff,
            } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&1u32.to_be_bytes()); // seq
                out.extend_from_slice(&0u32.to_be_bytes()); // ack
                out.push(doff << 4);
                out.push(flags);
                out.extend_from_slice(&65535u16.to_be_bytes()); // window
                out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                IPPROTO_TCP
            }
            L4::Udp { dport } => {
                out.extend_from_slice(&40000u16.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&8u16.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                17
            }
        };
        out.resize(out.len() + self.payload, 0xab);
        (proto, out)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        let ethertype = match self.l3 {
            L3::V4 { .. } => ETH_P_IP,
            L3::V6 { .. } => ETH_P_IPV6,
            L3::Raw { ethertype, .. } => ethertype,
        };
        for (i, tpid) in self.vlans.iter().enumerate() {
            if i == 0 {
                f.extend_from_slice(&tpid.to_be_bytes());
            }
            f.extend_from_slice(&(100 + i as u16).to_be_bytes()); // TCI
            let next = self.vlans.get(i + 1).copied().unwrap_or(ethertype);
            f.extend_from_slice(&next.to_be_bytes());
        }
        if self.vlans.is_empty() {
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        let (proto, l4) = self.l4_bytes();
        match self.l3 {
            L3::Raw { len, .. } => f.resize(f.len() + len, 0),
            L3::V4 { src, dst } => {
                let hlen = 20 + self.ip_options;
                let ihl = self.ihl.unwrap_or((hlen / 4) as u8);
                let total = (hlen + l4.len()) as u16;
                let (off, more) = self.frag.unwrap_or((0, false));
                let frag = (off & 0x1fff) | if more { 0x2000 } else { 0 };
                f.push(0x40 | (ihl & 0x0f));
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64);
                f.push(proto);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&src);
                f.extend_from_slice(&dst);
                f.resize(f.len() + self.ip_options, 1); // NOP options
                f.extend_from_slice(&l4);
            }
            L3::V6 { src, dst } => {
                let mut chain: Vec<u8> = self.ext.clone();
                if self.frag.is_some() {
                    chain.push(44);
                }
                let mut ext = Vec::new();
                for (i, t) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).copied().unwrap_or(proto);
                    match t {
                        44 => {
                            let (off, more) = self.frag.unwrap_or((0, false));
                            let fo = (off << 3) | more as u16;
                            ext.extend_from_slice(&[next, 0]);
                            ext.extend_from_slice(&fo.to_be_bytes());
                            ext.extend_from_slice(&[0, 0, 0, 1]);
                        }
                        51 => ext.extend_from_slice(&[next, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]),
                        _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
                    }
                }
                let first = chain.first().copied().unwrap_or(proto);
                let plen = (ext.len() + l4.len()) as u16;
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&plen.to_be_bytes());
                f.push(first);
                f.push(64);
                f.extend_from_slice(&src);
                f.extend_from_slice(&dst);
                f.extend_from_slice(&ext);
                f.extend_from_slice(&l4);
            }
        }
        f
    }
}
