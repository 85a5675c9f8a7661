#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const PAY: &str = "payments.marathon.l4lb.thisdcos.directory";

fn zone() -> Zone {
    let (z, bad) = Zone::new(5, vec!["198.18.0.1".parse().unwrap()]).with_names(
        [
            (PAY, IpAddr::V4(Ipv4Addr::new(11, 0, 0, 7))),
            (
                "web.marathon.l4lb.thisdcos.directory",
                "11.0.0.9".parse().unwrap(),
            ),
            ("outside.example.com", "11.0.0.10".parse().unwrap()),
        ],
        42,
    );
    assert_eq!(bad, vec!["outside.example.com".to_string()]);
    z
}

fn ask(z: &Zone, name: &str, t: RecordType, fwd: bool) -> Message {
    match answer(z, &query(fqdn(name).unwrap(), t), fwd) {
        Reply::Answer(m) => m,
        other => panic!("{name} {t}: {other:?}"),
    }
}

#[test]
fn a_named_vip_answers_its_address_with_the_ttl() {
    let m = ask(&zone(), PAY, RecordType::A, false);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].ttl, 5);
    assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(11, 0, 0, 7))));
    // Names are case-insensitive; the question's spelling is kept.
    let m = ask(
        &zone(),
        "PayMents.Marathon.L4LB.thisdcos.directory",
        RecordType::A,
        false,
    );
    assert_eq!(m.answers.len(), 1);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "PayMents.Marathon.L4LB.thisdcos.directory."
    );
}

#[test]
fn unknown_names_are_nxdomain_and_missing_types_nodata() {
    let z = zone();
    let m = ask(
        &z,
        "nope.marathon.l4lb.thisdcos.directory",
        RecordType::A,
        false,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    for (name, t) in [
        (PAY, RecordType::AAAA),
        (PAY, RecordType::MX),
        ("marathon.l4lb.thisdcos.directory", RecordType::A),
    ] {
        let m = ask(&z, name, t, false);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NoError,
            "{name} {t}"
        );
        assert!(m.answers.is_empty(), "{name} {t}");
        assert_eq!(
            m.authorities[0].record_type(),
            RecordType::SOA,
            "{name} {t}"
        );
    }
}

#[test]
fn the_apex_has_soa_and_ns_and_the_server_its_address() {
    let z = zone();
    let m = ask(&z, ZONE, RecordType::SOA, false);
    let RData::SOA(soa) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(soa.serial, 42);
    assert_eq!(soa.minimum, 5);
    let m = ask(&z, ZONE, RecordType::NS, false);
    assert_eq!(
        m.answers[0].data,
        RData::NS(NS(fqdn("ns.l4lb.thisdcos.directory").unwrap()))
    );
    let m = ask(&z, "ns.l4lb.thisdcos.directory", RecordType::A, false);
    assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(198, 18, 0, 1))));
}

#[test]
fn outside_the_zone_is_refused_or_forwarded() {
    let z = zone();
    let m = ask(&z, "example.com", RecordType::A, false);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // A name that only ends like the zone is outside it.
    let m = ask(&z, "xl4lb.thisdcos.directory", RecordType::A, false);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let q = query(fqdn("example.com").unwrap(), RecordType::A);
    assert!(matches!(answer(&z, &q, true), Reply::Forward));
    // The zone itself is never forwarded.
    let q = query(fqdn(PAY).unwrap(), RecordType::A);
    assert!(matches!(answer(&z, &q, true), Reply::Answer(_)));
}

#[test]
fn odd_requests_get_errors_or_nothing() {
    let z = zone();
    let mut two = query(fqdn(PAY).unwrap(), RecordType::A);
    two.add_query(Query::query(fqdn(PAY).unwrap(), RecordType::AAAA));
    let Reply::Answer(m) = answer(&z, &two, false) else {
        panic!()
    };
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let mut none = query(fqdn(PAY).unwrap(), RecordType::A);
    none.queries.clear();
    let Reply::Answer(m) = answer(&z, &none, false) else {
        panic!()
    };
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let mut update = query(fqdn(PAY).unwrap(), RecordType::A);
    update.metadata.op_code = OpCode::Update;
    let Reply::Answer(m) = answer(&z, &update, false) else {
        panic!()
    };
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    let mut resp = query(fqdn(PAY).unwrap(), RecordType::A);
    resp.metadata.message_type = MessageType::Response;
    assert!(matches!(answer(&z, &resp, false), Reply::Drop));
    // Undecodable bytes: FORMERR with the id when there is a header, nothing when not.
    let mut raw = query(fqdn(PAY).unwrap(), RecordType::A).to_vec().unwrap();
    raw[0] = 0x12;
    raw[1] = 0x34;
    raw.truncate(raw.len() - 3);
    assert!(Message::from_vec(&raw).is_err());
    let err = Message::from_vec(&formerr(&raw).unwrap()).unwrap();
    assert_eq!(err.metadata.id, 0x1234);
    assert_eq!(err.metadata.response_code, ResponseCode::FormErr);
    assert!(formerr(&raw[..11]).is_none());
}

#[test]
fn answers_too_large_for_the_client_are_truncated() {
    // 100 addresses for one name: about 1.6 KB of answer.
    let names: Vec<(&str, IpAddr)> = (0..100u16)
        .map(|i| (PAY, IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))))
        .collect();
    let (z, _) = Zone::new(5, vec![]).with_names(names, 2);
    let q = query(fqdn(PAY).unwrap(), RecordType::AAAA);
    let Reply::Answer(m) = answer(&z, &q, false) else {
        panic!()
    };
    assert_eq!(m.answers.len(), 100);
    let udp = encode(&m, udp_limit(&q)).unwrap();
    assert!(udp.len() <= 512, "{}", udp.len());
    let back = Message::from_vec(&udp).unwrap();
    assert!(back.metadata.truncation);
    assert!(back.answers.is_empty());
    assert_eq!(back.queries, m.queries);
    // Over TCP the whole answer goes.
    let tcp = Message::from_vec(&encode(&m, 65_535).unwrap()).unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 100);
    // An EDNS client offering 4096 gets at most what the server offers.
    let mut q = q;
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    q.set_edns(edns);
    assert_eq!(udp_limit(&q), EDNS_PAYLOAD as usize);
    let Reply::Answer(m) = answer(&z, &q, false) else {
        panic!()
    };
    assert!(m.edns.is_some());
    assert!(encode(&m, udp_limit(&q)).unwrap().len() <= EDNS_PAYLOAD as usize);
}

#[test]
fn names_of_every_length_and_random_bytes_never_panic() {
    let z = zone();
    // Labels of 1 to 63 bytes, names up to the 255-byte limit, and past it.
    for len in 1..=63 {
        let label = "a".repeat(len);
        let name = format!("{label}.{label}.{label}.marathon.{ZONE}");
        if let Ok(n) = fqdn(&name) {
            let _ = answer(&z, &query(n, RecordType::A), false);
        }
    }
    assert!(fqdn(&format!("{}.{ZONE}", "a".repeat(64))).is_err());
    // Pseudo-random bytes and mutations of a good query (xorshift: deterministic).
    let good = query(fqdn(PAY).unwrap(), RecordType::A).to_vec().unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let raw: Vec<u8> = if i % 2 == 0 {
            (0..next() % 600).map(|_| next() as u8).collect()
        } else {
            let mut m = good.clone();
            let at = next() as usize % m.len();
            m[at] = next() as u8;
            m.truncate(next() as usize % (m.len() + 1));
            m
        };
        match Message::from_vec(&raw) {
            Ok(m) => {
                if let Reply::Answer(r) = answer(&z, &m, true) {
                    assert!(encode(&r, udp_limit(&m)).is_some_and(|b| b.len() <= udp_limit(&m)));
                }
            }
            Err(_) => {
                let _ = formerr(&raw);
            }
        }
    }
}

#[test]
fn the_handle_publishes_named_services_and_keeps_held_ones() {
    use crate::model::{Proto, ServiceSpec, Vip};
    let h = super::super::ZoneHandle::default();
    let vip = |ip: &str| Vip {
        addr: std::net::SocketAddr::new(ip.parse().unwrap(), 8080),
        proto: Proto::Tcp,
    };
    let mut desired = crate::model::Desired::new();
    let v = vip("11.0.0.7");
    desired.insert(v, ServiceSpec::new(v, Some(PAY.into())));
    let w = vip("172.16.0.1");
    desired.insert(w, ServiceSpec::new(w, None));
    assert!(h.publish(&desired));
    let serial = h.current().serial();
    assert!(!h.publish(&desired), "the same names again are no change");
    assert_eq!(h.current().serial(), serial);
    assert_eq!(h.resolve(PAY, None).unwrap().addresses, vec!["11.0.0.7"]);
    // Held by the guard: the service comes back without its name, and keeps it.
    desired.insert(v, ServiceSpec::new(v, None));
    assert!(!h.publish(&desired));
    assert_eq!(h.resolve(PAY, Some("a")).unwrap().rcode, "NoError");
    // Gone: NXDOMAIN, and a later serial.
    desired.remove(&v);
    assert!(h.publish(&desired));
    assert!(h.current().serial() > serial);
    assert_eq!(h.resolve(PAY, None).unwrap().rcode, "NXDomain");
    assert!(h.resolve("a..b", None).is_err());
    assert!(h.resolve(PAY, Some("NOTATYPE")).is_err());
}
