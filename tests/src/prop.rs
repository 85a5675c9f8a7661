//! Deterministic randomness for property tests: a seeded xorshift generator, and mutations of
//! frames (flipped bits and bytes, cuts, extensions, header fields set to odd values, checksums
//! made right again).
use crate::packet::{ETH_HLEN, IP_MF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, fix_checksums};

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

/// Offsets in an Ethernet + IPv4 frame.
const TOT_LEN: usize = 16;
const FRAG: usize = 20;
const TTL: usize = 22;
const PROTO: usize = 23;

/// Applies one random mutation to `f` (never making it shorter than an Ethernet header, which
/// test_run refuses) and says which.
pub fn mutate(f: &mut Vec<u8>, rng: &mut Rng, ports: &[u16]) -> &'static str {
    let len = f.len();
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
        5 if len >= TOT_LEN + 2 => {
            let real = (len - ETH_HLEN) as u16;
            let v = match rng.below(4) {
                0 => rng.u16(),
                1 => real.wrapping_add(1 + rng.below(8) as u16),
                2 => real.wrapping_sub(1 + rng.below(30) as u16),
                _ => 0,
            };
            f[TOT_LEN..TOT_LEN + 2].copy_from_slice(&v.to_be_bytes());
            "set the IP total length"
        }
        6 if len > ETH_HLEN => {
            f[ETH_HLEN] = (f[ETH_HLEN] & 0xf0) | rng.below(16) as u8;
            "set the IHL"
        }
        7 if len >= FRAG + 2 => {
            let off = 1 + rng.below(0x1fff) as u16;
            let v = *rng.pick(&[IP_MF, off, IP_MF | off, 0]);
            f[FRAG..FRAG + 2].copy_from_slice(&v.to_be_bytes());
            "set the fragment field"
        }
        8 if len > TTL => {
            f[TTL] = rng.below(3) as u8;
            "set the TTL to 0, 1 or 2"
        }
        9 if len > PROTO => {
            let other = rng.u8();
            f[PROTO] = *rng.pick(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, other]);
            "set the protocol"
        }
        10 if len > ETH_HLEN => {
            let l4 = ETH_HLEN + (f[ETH_HLEN] & 0x0f) as usize * 4;
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
