//! Deterministic randomness for property tests: a seeded xorshift generator, and mutations of
//! IPv4 and IPv6 frames (flipped bits and bytes, cuts, extensions, header fields set to odd
//! values, extension headers inserted, checksums made right again).
use crate::packet::{
    ETH_HLEN, ETH_P_IPV6, IP_MF, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, fix_checksums,
};

/// xorshift64* (Vigna); the seed is spread by a splitmix64 step so that small seeds differ.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn u8(&mut self) -> u8 {
        self.u64() as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.u64() as u16
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

/// Where the fields a mutation likes to change lie, by the frame's Ethernet type.
struct Fields {
    ipv6: bool,
    /// The IP length field, and the offset it counts from.
    len: usize,
    len_from: usize,
    hops: usize,
    proto: usize,
}

const IPV4: Fields = Fields {
    ipv6: false,
    len: 16,
    len_from: ETH_HLEN,
    hops: 22,
    proto: 23,
};
const IPV6: Fields = Fields {
    ipv6: true,
    len: 18,
    len_from: ETH_HLEN + 40,
    hops: 21,
    proto: 20,
};
/// The IPv4 flags and fragment offset.
const FRAG: usize = 20;

impl Fields {
    fn of(f: &[u8]) -> &'static Fields {
        if f.get(12..14) == Some(&ETH_P_IPV6.to_be_bytes()[..]) {
            &IPV6
        } else {
            &IPV4
        }
    }

    /// Where the transport header starts, by the IPv4 IHL (IPv6: after the fixed header).
    fn l4(&self, f: &[u8]) -> usize {
        if self.ipv6 {
            ETH_HLEN + 40
        } else {
            ETH_HLEN + (f[ETH_HLEN] & 0x0f) as usize * 4
        }
    }
}

/// Applies one random mutation to `f` (never making it shorter than an Ethernet header, which
/// test_run refuses) and says which.
pub fn mutate(f: &mut Vec<u8>, rng: &mut Rng, ports: &[u16]) -> &'static str {
    let len = f.len();
    let h = Fields::of(f);
    match rng.below(11) {
        0 | 1 => {
            // Mostly within the headers, where a flipped bit changes what the program decides.
            let span = if rng.chance(75) { len.min(100) } else { len };
            let i = rng.below(span);
            f[i] ^= 1 << rng.below(8);
            "flip a bit"
        }
        2 => {
            let i = rng.below(len);
            f[i] = rng.u8();
            "set a byte"
        }
        3 => {
            f.truncate(ETH_HLEN + rng.below(len - ETH_HLEN + 1));
            "cut"
        }
        4 => {
            let n = 1 + rng.below(40);
            f.extend(rng.bytes(n));
            "extend"
        }
        5 if len >= h.len + 2 => {
            let real = len.saturating_sub(h.len_from) as u16;
            let v = match rng.below(4) {
                0 => rng.u16(),
                1 => real.wrapping_add(1 + rng.below(8) as u16),
                2 => real.wrapping_sub(1 + rng.below(30) as u16),
                _ => 0,
            };
            f[h.len..h.len + 2].copy_from_slice(&v.to_be_bytes());
            "set the IP length field"
        }
        6 if len > ETH_HLEN && h.ipv6 => {
            f[ETH_HLEN] = (rng.below(16) as u8) << 4 | (f[ETH_HLEN] & 0x0f);
            "set the IP version"
        }
        6 if len > ETH_HLEN => {
            f[ETH_HLEN] = (f[ETH_HLEN] & 0xf0) | rng.below(16) as u8;
            "set the IHL"
        }
        7 if len >= ETH_HLEN + 40 && h.ipv6 => {
            insert_extension_header(f, rng);
            "insert an extension header"
        }
        7 if len >= FRAG + 2 && !h.ipv6 => {
            let off = 1 + rng.below(0x1fff) as u16;
            let v = *rng.pick(&[IP_MF, off, IP_MF | off, 0]);
            f[FRAG..FRAG + 2].copy_from_slice(&v.to_be_bytes());
            "set the fragment field"
        }
        8 if len > h.hops => {
            f[h.hops] = rng.below(3) as u8;
            "set the TTL or hop limit to 0, 1 or 2"
        }
        9 if len > h.proto => {
            let other = rng.u8();
            f[h.proto] = if h.ipv6 {
                *rng.pick(&[
                    IPPROTO_TCP,
                    IPPROTO_UDP,
                    IPPROTO_ICMPV6,
                    IPPROTO_FRAGMENT,
                    other,
                ])
            } else {
                *rng.pick(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, other])
            };
            "set the protocol"
        }
        10 if len > ETH_HLEN => {
            let l4 = h.l4(f);
            if len >= l4 + 4 {
                let at = l4 + 2 * rng.below(2);
                let port = if rng.chance(50) {
                    *rng.pick(ports)
                } else {
                    rng.u16()
                };
                f[at..at + 2].copy_from_slice(&port.to_be_bytes());
            }
            "set a port"
        }
        _ => {
            fix_checksums(f);
            "make the checksums right"
        }
    }
}

/// Puts an 8-byte IPv6 extension header (hop-by-hop or destination options with padding, or a
/// fragment header, first or later) between the fixed header and what followed it, chaining the
/// "next header" fields and growing the payload length to match.
fn insert_extension_header(f: &mut Vec<u8>, rng: &mut Rng) {
    let next = f[20];
    let kind = *rng.pick(&[IPPROTO_HOPOPTS, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT]);
    let header = if kind == IPPROTO_FRAGMENT {
        let offset = if rng.chance(50) {
            0
        } else {
            1 + rng.below(0x1fff) as u16
        };
        let field = offset << 3 | rng.below(2) as u16;
        let [a, b] = field.to_be_bytes();
        let [c, d, e, g] = rng.u64().to_be_bytes()[..4].try_into().expect("4 bytes");
        [next, 0, a, b, c, d, e, g]
    } else {
        [next, 0, 1, 4, 0, 0, 0, 0] // PadN of 4 bytes
    };
    f.splice(ETH_HLEN + 40..ETH_HLEN + 40, header);
    f[20] = kind;
    let payload_len = u16::from_be_bytes([f[18], f[19]]).wrapping_add(8);
    f[18..20].copy_from_slice(&payload_len.to_be_bytes());
}
