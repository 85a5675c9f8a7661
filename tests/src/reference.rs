//! Which backend a flow gets, written a second time from the descriptions alone, sharing no code
//! with `lb-common` or `lbctl`: the tests check the production code and the kernel against this,
//! and `tests/tests/known_answers.rs` pins both with literal vectors.
//!
//! What it implements, step by step:
//!
//! * The flow hash (documented at `lb_common::flow_hash`): Bob Jenkins' lookup3 `final` mix of
//!   three 32-bit words, each started from 0xdeadbeef. The words are the fields as the packet
//!   carries them (network byte order), loaded as host integers: `a` the source address, `b` the
//!   destination address, `c` the source port in the high half and the destination port in the
//!   low half, xor the protocol shifted left by 8. The result is `c`. IPv6 addresses are first
//!   folded to one word: `w0 ^ rotl(w1, 8) ^ rotl(w2, 16) ^ rotl(w3, 24)` of their four words.
//! * Maglev (Eisenbud et al., NSDI 2016, section 3.4): backend `i`, named `addr:port`, has
//!   `offset = h1(name) mod M` and `skip = h2(name) mod (M - 1) + 1`, and prefers the slots
//!   `permutation[i][j] = (offset + j * skip) mod M` in order of `j`. Backends take turns, in the
//!   order of their names' addresses, each claiming its next preferred slot that is still free,
//!   until the `M` slots are full. `h1` and `h2` are one string hash started from two seeds (the
//!   table's seed, and the seed xor 0x9e3779b97f4a7c15): FNV-1a over the name's bytes with the
//!   64-bit offset basis xor the seed, then the mix `x ^= x >> 33; x *= 0xff51afd7ed558ccd;
//!   x ^= x >> 33`.
//! * The table's size `M`: the agent's table size (`--ring-size`, 16381 by default) is the
//!   largest; a service with few active backends gets the first of the largest primes below
//!   256, 512, ..., 65536 that has at least 100 slots per active backend, when it is smaller.
//! * The backend of a new flow: slot `hash mod M` of the table built from the service's active
//!   backends, sorted by address.
use std::net::{IpAddr, SocketAddr};

/// The table size and seed an agent uses unless told otherwise (`lbctl agent --table-size`,
/// `--table-seed`), copied as values from the documentation: the seed is "lbctl_v1" in ASCII.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
pub const DEFAULT_TABLE_SEED: u64 = 0x6c62_6374_6c5f_7631;

const LOOKUP3_INIT: u32 = 0xdead_beef;

/// lookup3's `final(a, b, c)`: seven steps, each `x ^= y; x -= rotl(y, k)` over the words
/// (x, y) named here, with the rotations the original uses.
const FINAL_STEPS: [(usize, usize, u32); 7] = [
    (2, 1, 14),
    (0, 2, 11),
    (1, 0, 25),
    (2, 1, 16),
    (0, 2, 4),
    (1, 0, 14),
    (2, 1, 24),
];

fn lookup3_final(mut w: [u32; 3]) -> u32 {
    for (x, y, k) in FINAL_STEPS {
        w[x] ^= w[y];
        w[x] = w[x].wrapping_sub(w[y].rotate_left(k));
    }
    w[2]
}

/// Four bytes in packet order, as the host loads them from the packet.
fn wire_word(bytes: [u8; 4]) -> u32 {
    u32::from_ne_bytes(bytes)
}

/// A port as the host loads it from the packet.
fn wire_port(port: u16) -> u32 {
    u16::from_ne_bytes(port.to_be_bytes()) as u32
}

/// An address as the one word the hash takes (IPv6 folded).
fn address_word(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(a) => wire_word(a.octets()),
        IpAddr::V6(a) => {
            let o = a.octets();
            (0..4).fold(0u32, |acc, i| {
                let w = wire_word([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                acc ^ w.rotate_left(8 * i as u32)
            })
        }
    }
}

/// The flow hash of a packet from `src` to `dst` of IP protocol `proto`; panics when the two
/// are of different families.
pub fn flow_hash(src: SocketAddr, dst: SocketAddr, proto: u8) -> u32 {
    assert_eq!(
        src.is_ipv4(),
        dst.is_ipv4(),
        "{src} -> {dst}: one address family"
    );
    let ports = (wire_port(src.port()) << 16 | wire_port(dst.port())) ^ ((proto as u32) << 8);
    lookup3_final([
        address_word(src.ip()).wrapping_add(LOOKUP3_INIT),
        address_word(dst.ip()).wrapping_add(LOOKUP3_INIT),
        ports.wrapping_add(LOOKUP3_INIT),
    ])
}

/// The string hash behind `h1` and `h2`.
fn name_hash(name: &str, seed: u64) -> u64 {
    const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV64_PRIME: u64 = 0x100_0000_01b3;
    let fnv = name.bytes().fold(FNV64_OFFSET ^ seed, |h, byte| {
        (h ^ byte as u64).wrapping_mul(FNV64_PRIME)
    });
    let x = fnv ^ (fnv >> 33);
    let x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// `h2` is the same hash from this seed xor the table's.
const SKIP_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The Maglev lookup table of `m` slots (a prime) for backends named `names`, in this order:
/// each slot holds an index into `names`. No backends, no table.
pub fn maglev_table(names: &[String], m: u32, seed: u64) -> Vec<u32> {
    if names.is_empty() {
        return Vec::new();
    }
    let m = m as u64;
    let offset: Vec<u64> = names.iter().map(|n| name_hash(n, seed) % m).collect();
    let skip: Vec<u64> = names
        .iter()
        .map(|n| name_hash(n, seed ^ SKIP_SEED) % (m - 1) + 1)
        .collect();
    let permutation = |i: usize, j: u64| (offset[i] + j * skip[i]) % m;
    let mut next = vec![0u64; names.len()];
    let mut entry: Vec<Option<u32>> = vec![None; m as usize];
    let mut n = 0u64;
    // The paper's Pseudocode 1, with the bound made explicit: every turn fills one slot.
    'fill: loop {
        for (i, j) in next.iter_mut().enumerate() {
            let mut c = permutation(i, *j);
            while entry[c as usize].is_some() {
                *j += 1;
                c = permutation(i, *j);
            }
            entry[c as usize] = Some(i as u32);
            *j += 1;
            n += 1;
            if n == m {
                break 'fill;
            }
        }
    }
    entry
        .into_iter()
        .map(|e| e.expect("every slot is filled"))
        .collect()
}

/// A service's lookup table: its active backends, sorted by address, and the Maglev table of
/// `m` slots built from their names with `seed`.
pub struct Service {
    backends: Vec<SocketAddr>,
    slots: Vec<u32>,
    m: u32,
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..n)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// The slots of the table of a service with `active` active backends when the agent's table
/// size is `configured`: the first of the largest primes below 256, 512, ..., 65536 that has at
/// least 100 slots per active backend, if it is smaller than `configured`; else `configured`.
pub fn table_size(active: usize, configured: u32) -> u32 {
    for bits in 8..=16 {
        let Some(size) = (2..1u32 << bits).rev().find(|n| is_prime(*n)) else {
            continue;
        };
        if size >= configured {
            break;
        }
        if size as usize >= active * 100 {
            return size;
        }
    }
    configured
}

impl Service {
    /// The table of a service whose active backends are `active` (any order), for an agent
    /// whose table size is `configured` (`table_size`).
    pub fn new(active: &[SocketAddr], configured: u32, seed: u64) -> Service {
        let mut backends = active.to_vec();
        backends.sort();
        backends.dedup();
        let m = table_size(backends.len(), configured);
        let names: Vec<String> = backends.iter().map(|a| a.to_string()).collect();
        Service {
            slots: maglev_table(&names, m, seed),
            backends,
            m,
        }
    }

    /// The backend a new flow from `src` to `vip` (IP protocol `proto`) gets.
    pub fn backend(&self, src: SocketAddr, vip: SocketAddr, proto: u8) -> Option<SocketAddr> {
        let slot = self
            .slots
            .get((flow_hash(src, vip, proto) % self.m) as usize)?;
        Some(self.backends[*slot as usize])
    }
}

/// The backend a new flow from `src` to `vip` (IP protocol `proto`) gets when the service's active
/// backends are `active` (any order), built with `seed` by an agent whose table size is `m`.
pub fn backend_for(
    src: SocketAddr,
    vip: SocketAddr,
    proto: u8,
    active: &[SocketAddr],
    m: u32,
    seed: u64,
) -> Option<SocketAddr> {
    Service::new(active, m, seed).backend(src, vip, proto)
}

/// A digest of a whole table: CRC-32 over every slot as four little-endian bytes.
pub fn table_crc(table: &[u32]) -> u32 {
    crc32(table.iter().flat_map(|s| s.to_le_bytes()))
}

/// CRC-32 (IEEE 802.3: reflected, polynomial 0xedb88320, inverted in and out), bit by bit.
pub fn crc32(bytes: impl IntoIterator<Item = u8>) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_of_the_check_string() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(*b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn every_backend_gets_a_near_equal_share() {
        let names: Vec<String> = (0..5).map(|i| format!("198.18.1.{i}:80")).collect();
        let t = maglev_table(&names, 251, 1);
        for i in 0..5u32 {
            let n = t.iter().filter(|s| **s == i).count();
            assert!((49..=52).contains(&n), "backend {i}: {n} slots");
        }
    }
}
