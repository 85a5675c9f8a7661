//! Known-answer vectors that pin which backend a flow gets: the flow hash of concrete 5-tuples,
//! whole Maglev tables, and the backend of concrete flows, as literals. Each is checked against
//! the independent implementation in `lbtest::reference` and against the production code
//! (`lb_common::flow_hash*`, `lbctl::maglev::table`, `lbctl::dataplane::predict`).
//!
//! The literals were computed once by `lbtest::reference`. A CHANGED VECTOR IS A BREAKING CHANGE:
//! agents of two versions would send the same flow to different backends, so a rolling upgrade
//! would break established connections (see "Upgrade notes" in the README). Never update a
//! literal to make a test pass without announcing it.
//!
//! The hash reads the fields as the packet carries them, loaded as host integers, so the
//! vectors hold for little-endian hosts (x86-64, arm64), where the agents run.
#![cfg(target_endian = "little")]

use lbctl::{
    maglev,
    model::{BackendSpec, BackendState, Proto, ServiceSpec, Vip},
};
use lbtest::reference::{self, DEFAULT_TABLE_SEED, DEFAULT_TABLE_SIZE};
use std::net::{IpAddr, SocketAddr};

fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("{s} is not an address: {e}"))
}

/// (source, destination, IP protocol, flow hash).
const HASHES: [(&str, &str, u8, u32); 12] = [
    ("198.18.0.2:40000", "172.16.0.1:8080", 6, 0xdd3746a2),
    ("198.18.0.2:40001", "172.16.0.1:8080", 6, 0x925d31c9),
    ("198.18.0.3:12345", "172.16.0.1:8080", 17, 0x733219e2),
    ("198.19.255.254:65535", "172.16.0.2:53", 17, 0x7b02d72e),
    ("198.18.0.2:1024", "10.0.0.1:443", 6, 0x222756ed),
    ("0.0.0.0:0", "0.0.0.0:0", 0, 0x31b8a510),
    (
        "255.255.255.255:65535",
        "255.255.255.255:65535",
        6,
        0xb8731ae9,
    ),
    ("[2001:2::2]:40000", "[fd00:172:16::1]:8080", 6, 0x1d83c010),
    ("[2001:2::2]:40000", "[fd00:172:16::1]:8080", 17, 0x29572e9b),
    ("[2001:2::3]:5353", "[fc00::1]:53", 17, 0x837a4aac),
    (
        "[2001:2:0:ffff::1234]:65000",
        "[fd00:1::7]:443",
        6,
        0x66a1f451,
    ),
    ("[::]:0", "[::]:0", 0, 0x31b8a510),
];

/// The production hash, called as the kernel and `lbctl` call it: every field in network byte
/// order (IPv6 addresses as four words of packet bytes).
fn production_hash(src: SocketAddr, dst: SocketAddr, proto: u8) -> u32 {
    fn words(ip: IpAddr) -> [u32; 4] {
        let IpAddr::V6(a) = ip else {
            panic!("{ip} is not IPv6")
        };
        let o = a.octets();
        std::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }
    let (sport, dport) = (src.port().to_be(), dst.port().to_be());
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => lb_common::flow_hash(
            u32::from(s).to_be(),
            u32::from(d).to_be(),
            sport,
            dport,
            proto,
        ),
        (s, d) => lb_common::flow_hash6(&words(s), &words(d), sport, dport, proto),
    }
}

#[test]
fn flow_hash_known_answers() {
    let mut wrong = Vec::new();
    for (src, dst, proto, want) in HASHES {
        let (s, d) = (sa(src), sa(dst));
        let by_reference = reference::flow_hash(s, d, proto);
        let by_production = production_hash(s, d, proto);
        if by_reference != want || by_production != want {
            wrong.push(format!(
                "{src} -> {dst} proto {proto}: want {want:#010x}, reference {by_reference:#010x}, \
                 lb_common {by_production:#010x}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "flow hash vectors changed:\n{}",
        wrong.join("\n")
    );
}

/// `n` backend names `198.18.A.B:port` (A from 1, B from 2), as `addr:port` strings.
fn v4_names(n: usize, port: u16) -> Vec<String> {
    (0..n)
        .map(|i| format!("198.18.{}.{}:{port}", 1 + i / 200, 2 + i % 200))
        .collect()
}

/// `n` backend names `[2001:2:0:1::X]:8080`, X from 2.
fn v6_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("[2001:2:0:1::{:x}]:8080", 2 + i))
        .collect()
}

/// A whole table as a vector: its first (up to) 32 slots and the CRC-32 of all of them.
struct TableVector {
    what: &'static str,
    names: fn() -> Vec<String>,
    size: u32,
    seed: u64,
    first: &'static [u32],
    crc: u32,
}

const TABLES: [TableVector; 9] = [
    TableVector {
        what: "3 IPv4 backends, 7 slots",
        names: || v4_names(3, 31000),
        size: 7,
        seed: DEFAULT_TABLE_SEED,
        first: &[0, 0, 2, 1, 0, 1, 2],
        crc: 0x827558e1,
    },
    TableVector {
        what: "5 IPv4 backends, 13 slots",
        names: || v4_names(5, 31000),
        size: 13,
        seed: DEFAULT_TABLE_SEED,
        first: &[1, 0, 4, 1, 0, 2, 2, 4, 1, 0, 3, 3, 2],
        crc: 0xc6d4cfdc,
    },
    TableVector {
        what: "5 IPv4 backends, 13 slots, seed 0",
        names: || v4_names(5, 31000),
        size: 13,
        seed: 0,
        first: &[2, 4, 2, 3, 3, 0, 4, 1, 0, 1, 0, 1, 2],
        crc: 0xbc4037bf,
    },
    TableVector {
        what: "10 IPv4 backends, 251 slots",
        names: || v4_names(10, 8080),
        size: 251,
        seed: DEFAULT_TABLE_SEED,
        first: &[
            2, 8, 3, 0, 8, 7, 9, 2, 3, 8, 4, 1, 4, 9, 3, 2, 1, 0, 5, 0, 3, 8, 0, 7, 4, 1, 2, 0, 9,
            6, 1, 7,
        ],
        crc: 0x9b0a98ac,
    },
    TableVector {
        what: "4 IPv6 backends, 251 slots",
        names: || v6_names(4),
        size: 251,
        seed: DEFAULT_TABLE_SEED,
        first: &[
            2, 2, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2,
            0, 0, 0,
        ],
        crc: 0x7474350c,
    },
    TableVector {
        what: "7 IPv4 backends, 1021 slots, seed 0x1234",
        names: || v4_names(7, 31000),
        size: 1021,
        seed: 0x1234,
        first: &[
            2, 4, 2, 3, 0, 0, 0, 0, 5, 4, 4, 4, 3, 4, 3, 3, 1, 2, 3, 2, 3, 6, 6, 6, 6, 6, 6, 6, 6,
            6, 6, 4,
        ],
        crc: 0x9704fc21,
    },
    TableVector {
        what: "3 IPv4 backends, 16381 slots (the default)",
        names: || v4_names(3, 31000),
        size: DEFAULT_TABLE_SIZE,
        seed: DEFAULT_TABLE_SEED,
        first: &[
            2, 1, 1, 2, 0, 0, 2, 0, 1, 0, 1, 1, 0, 0, 2, 1, 1, 0, 2, 1, 2, 1, 1, 2, 2, 0, 2, 2, 1,
            2, 1, 0,
        ],
        crc: 0xe1b4be5a,
    },
    TableVector {
        what: "100 IPv4 backends, 16381 slots",
        names: || v4_names(100, 8080),
        size: DEFAULT_TABLE_SIZE,
        seed: DEFAULT_TABLE_SEED,
        first: &[
            93, 53, 47, 94, 64, 41, 90, 17, 91, 43, 46, 71, 55, 19, 49, 64, 32, 38, 74, 83, 91, 95,
            58, 74, 31, 24, 46, 20, 94, 2, 18, 85,
        ],
        crc: 0xb3018f74,
    },
    TableVector {
        what: "1000 IPv4 backends, 16381 slots, seed 0x1234",
        names: || v4_names(1000, 8080),
        size: DEFAULT_TABLE_SIZE,
        seed: 0x1234,
        first: &[
            514, 886, 333, 745, 100, 776, 303, 991, 914, 247, 208, 830, 680, 459, 981, 186, 103,
            590, 668, 946, 546, 744, 17, 202, 495, 739, 10, 268, 56, 123, 784, 170,
        ],
        crc: 0xaf7bf9e2,
    },
];

#[test]
fn maglev_table_known_answers() {
    let mut wrong = Vec::new();
    for v in &TABLES {
        let names = (v.names)();
        for (who, table) in [
            ("reference", reference::maglev_table(&names, v.size, v.seed)),
            ("lbctl::maglev", maglev::table(&names, v.size, v.seed)),
        ] {
            let first = &table[..table.len().min(32)];
            let crc = reference::table_crc(&table);
            if table.len() != v.size as usize || first != v.first || crc != v.crc {
                wrong.push(format!(
                    "{}: {who} gives {} slots starting {first:?}, CRC {crc:#010x}; want {} \
                     starting {:?}, CRC {:#010x}",
                    v.what,
                    table.len(),
                    v.size,
                    v.first,
                    v.crc
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "Maglev table vectors changed:\n{}",
        wrong.join("\n")
    );
}

/// The services of the packet fixtures (`packets.rs`): three backends each.
const WEB4: [&str; 3] = ["198.18.1.2:31000", "198.18.1.3:31000", "198.18.1.4:31000"];
const WEB6: [&str; 3] = [
    "[2001:2:0:1::2]:31000",
    "[2001:2:0:1::3]:31000",
    "[2001:2:0:1::4]:31000",
];

/// (client, VIP, IP protocol, the service's active backends, the backend of the flow), with the
/// default table size and seed: three backends take a table of 509 slots (changed in the
/// version that gave tables a size by their backends; see "Upgrade notes" in the README).
const BACKENDS: [(&str, &str, u8, &[&str], &str); 10] = [
    (
        "198.18.0.2:40000",
        "172.16.0.1:8080",
        6,
        &WEB4,
        "198.18.1.2:31000",
    ),
    (
        "198.18.0.2:40001",
        "172.16.0.1:8080",
        6,
        &WEB4,
        "198.18.1.4:31000",
    ),
    (
        "198.18.0.2:40002",
        "172.16.0.1:8080",
        6,
        &WEB4,
        "198.18.1.3:31000",
    ),
    (
        "198.18.0.3:40000",
        "172.16.0.1:8080",
        6,
        &WEB4,
        "198.18.1.4:31000",
    ),
    (
        "198.18.0.2:40000",
        "172.16.0.1:8080",
        17,
        &WEB4,
        "198.18.1.4:31000",
    ),
    (
        "198.18.0.2:5000",
        "172.16.0.1:8080",
        17,
        &WEB4,
        "198.18.1.3:31000",
    ),
    (
        "[2001:2::2]:40000",
        "[fd00:172:16::1]:8080",
        6,
        &WEB6,
        "[2001:2:0:1::4]:31000",
    ),
    (
        "[2001:2::2]:40001",
        "[fd00:172:16::1]:8080",
        6,
        &WEB6,
        "[2001:2:0:1::2]:31000",
    ),
    (
        "[2001:2::3]:40000",
        "[fd00:172:16::1]:8080",
        6,
        &WEB6,
        "[2001:2:0:1::3]:31000",
    ),
    (
        "[2001:2::2]:40000",
        "[fd00:172:16::1]:8080",
        17,
        &WEB6,
        "[2001:2:0:1::2]:31000",
    ),
];

/// The service as Marathon derivation would hand it to the writer: the backends in the order
/// given (the production code must not depend on it), all active, plus one draining backend that
/// must never take a new flow.
fn service(vip: SocketAddr, proto: u8, backends: &[SocketAddr]) -> ServiceSpec {
    let proto = Proto::from_number(proto).expect("tcp or udp");
    let mut spec = ServiceSpec::new(Vip { addr: vip, proto }, None);
    let draining = match vip {
        SocketAddr::V4(_) => sa("198.18.1.200:31000"),
        SocketAddr::V6(_) => sa("[2001:2:0:1::200]:31000"),
    };
    for (addr, state) in backends
        .iter()
        .rev()
        .map(|a| (*a, BackendState::Active))
        .chain([(draining, BackendState::Draining)])
    {
        spec.backends.insert(
            addr,
            BackendSpec {
                addr,
                state,
                app: "/web".into(),
                task: format!("web.{addr}").into(),
            },
        );
    }
    spec
}

#[test]
fn flows_get_their_known_backend() {
    let mut wrong = Vec::new();
    for (src, vip, proto, backends, want) in BACKENDS {
        let (s, v, want) = (sa(src), sa(vip), sa(want));
        let mut active: Vec<SocketAddr> = backends.iter().map(|b| sa(b)).collect();
        active.reverse();
        let by_reference =
            reference::backend_for(s, v, proto, &active, DEFAULT_TABLE_SIZE, DEFAULT_TABLE_SEED);
        let by_production = lbctl::dataplane::predict(
            &service(v, proto, &active),
            s,
            &lbctl::dataplane::TableConfig::default(),
        );
        if by_reference != Some(want) || by_production != Some(want) {
            wrong.push(format!(
                "{src} -> {vip} proto {proto}: want {want}, reference {by_reference:?}, \
                 lbctl {by_production:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "flow -> backend vectors changed:\n{}",
        wrong.join("\n")
    );
}

/// (active backends, the agent's table size, the slots of the service's table).
const TABLE_SIZES: [(usize, u32, u32); 16] = [
    (0, 16381, 251),
    (1, 16381, 251),
    (2, 16381, 251),
    (3, 16381, 509),
    (5, 16381, 509),
    (6, 16381, 1021),
    (10, 16381, 1021),
    (11, 16381, 2039),
    (40, 16381, 4093),
    (81, 16381, 8191),
    (82, 16381, 16381),
    (1000, 16381, 16381),
    (5, 1031, 509),
    (11, 1031, 1031),
    (655, 131071, 65521),
    (656, 131071, 131071),
];

#[test]
fn services_get_their_known_table_size() {
    let mut wrong = Vec::new();
    for (active, configured, want) in TABLE_SIZES {
        let by_reference = reference::table_size(active, configured);
        let table = lbctl::dataplane::TableConfig::new(configured, DEFAULT_TABLE_SEED)
            .unwrap_or_else(|e| panic!("{configured}: {e}"));
        let by_production = table.size_for(active);
        if by_reference != want || by_production != want {
            wrong.push(format!(
                "{active} backends, size {configured}: want {want}, reference {by_reference}, \
                 lbctl {by_production}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "table size vectors changed:\n{}",
        wrong.join("\n")
    );
}

/// The reference's defaults are the production defaults: otherwise the vectors above would pin
/// tables no agent builds.
#[test]
fn defaults_are_the_documented_ones() {
    let t = lbctl::dataplane::TableConfig::default();
    assert_eq!((t.size, t.seed), (DEFAULT_TABLE_SIZE, DEFAULT_TABLE_SEED));
    assert_eq!(maglev::DEFAULT_SEED, 0x6c62_6374_6c5f_7631);
    assert_eq!(lb_common::DEFAULT_RING_SIZE, 16381);
}
