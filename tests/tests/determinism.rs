//! Every agent given the same Marathon state sends every flow to the same backend, and that backend
//! is the one the independent reference (`lbtest::reference`, pinned by known-answer vectors)
//! names:
//!
//! - two data planes filled independently by the agent's writer (one seeing the backends arrive
//!   in another order) agree on 10,000 flows, and with `lbctl simulate`;
//! - two real agents (`lbctl agent`) in two load-balancer namespaces, given the same document:
//!   10,000 new flows run through each agent's attached XDP program (BPF_PROG_TEST_RUN on the
//!   program and maps the agent uses) are rewritten to the same backend by both, and real UDP
//!   and TCP exchanges through each lab are answered by the backend the reference names.
use lbctl::{
    dataplane::{self, Maps, TableConfig, Writer},
    marathon::{self, Options},
    model::{Proto, Vip},
};
use lbtest::{
    CLIENT_ADDR, Lab, in_netns,
    packet::{Frame, TCP_SYN},
    pktlab::{Task, XDP_ABORTED, XDP_DROP, app, killing, run_attached, running},
    privileged_or_skip,
    reference::{self, DEFAULT_TABLE_SEED, DEFAULT_TABLE_SIZE},
    tcp_request_from, udp_request_from,
};
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

const VIP: &str = "172.16.0.1:8080";
const PORT: u16 = 31000;
/// Backend 4 of 7 is draining: it takes no new flow.
const DRAINING: u8 = 4;

/// Removes a pin directory on drop, also when the test fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = dataplane::down(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 10,000 client addresses and ports from 198.19.0.0/16 (no lab host lives there), from a
/// xorshift generator.
fn clients(mut x: u64) -> impl Iterator<Item = SocketAddrV4> {
    (0..10_000).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        SocketAddrV4::new(
            Ipv4Addr::from(0xc613_0000 | (x as u32 & 0xffff)),
            1024 + (x >> 40) as u16 % 60000,
        )
    })
}

/// Backend `i` (1 to 7): host 198.18.i.2, which is lab backend `b<i>`.
fn backend(i: u8) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, i, 2), PORT))
}

fn tasks(from: u8) -> Vec<Task> {
    (from..=7)
        .map(|i| {
            if i == DRAINING {
                killing(backend(i))
            } else {
                running(backend(i))
            }
        })
        .collect()
}

fn document(tasks: &[Task]) -> String {
    serde_json::json!({"apps": [app("/web", "tcp,udp", &[("VIP_0", VIP)], tasks)]}).to_string()
}

/// The service as the reference sees it: the six active backends, tables of `m` slots built
/// with `seed`.
fn reference_service((m, seed): (u32, u64)) -> reference::Service {
    let active: Vec<SocketAddr> = (1..=7).filter(|i| *i != DRAINING).map(backend).collect();
    reference::Service::new(&active, m, seed)
}

/// What the reference says about a flow from `src` to the VIP.
fn expected(service: &reference::Service, src: impl Into<SocketAddr>, proto: u8) -> SocketAddr {
    let vip = VIP.parse().expect("vip");
    service.backend(src.into(), vip, proto).expect("a backend")
}

const DEFAULT_TABLE: (u32, u64) = (DEFAULT_TABLE_SIZE, DEFAULT_TABLE_SEED);

#[test]
fn same_state_same_backend_everywhere() {
    if !privileged_or_skip("same_state_same_backend_everywhere") {
        return;
    }
    let started = Instant::now();
    let service = reference_service(DEFAULT_TABLE);
    let doc = document(&tasks(1));
    let (_, derived) = marathon::derive(&doc, "doc", &Options::default()).expect("derive");
    assert!(derived.problems.is_empty(), "{:?}", derived.problems);
    let vip = Vip {
        addr: VIP.parse().expect("vip"),
        proto: Proto::Tcp,
    };

    // Two data planes, as two agents on two machines would build them; the second sees the
    // backends arrive in another order (a scale-up), which must not matter.
    let a = Pins(PathBuf::from("/sys/fs/bpf/lbt-det-a"));
    let b = Pins(PathBuf::from("/sys/fs/bpf/lbt-det-b"));
    for p in [&a, &b] {
        let _ = dataplane::down(&p.0);
    }
    let _ea = dataplane::load(&a.0).expect("load a");
    let _eb = dataplane::load(&b.0).expect("load b");
    let applied = Writer::open(&a.0)
        .expect("writer a")
        .apply(&derived.services);
    assert!(applied.failed.is_empty(), "{applied:?}");
    let mut wb = Writer::open(&b.0).expect("writer b");
    let (_, first) =
        marathon::derive(&document(&tasks(5)), "few", &Options::default()).expect("derive");
    assert!(wb.apply(&first.services).failed.is_empty());
    assert!(wb.apply(&derived.services).failed.is_empty());
    let (ma, mb) = (
        Maps::open(&a.0).expect("maps a"),
        Maps::open(&b.0).expect("maps b"),
    );
    let mut seen = BTreeMap::new();
    for (i, src) in clients(0x5eed_1234_abcd_ef01).enumerate() {
        let want = expected(&service, src, 6);
        let pa = ma.pick(&vip, src).expect("pick a");
        let pb = mb.pick(&vip, src).expect("pick b");
        assert_eq!(pa, Some(want), "flow {i} from {src}: data plane a");
        assert_eq!(pb, Some(want), "flow {i} from {src}: data plane b");
        *seen.entry(want).or_insert(0u32) += 1;
    }
    // Six active backends share the flows; the draining one gets none.
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(!seen.contains_key(&backend(DRAINING)), "{seen:?}");
    assert!(seen.values().all(|n| (1200..=2200).contains(n)), "{seen:?}");

    // Another table size and seed (a smaller prime): the kernel's table still gives what the
    // reference computes, and a data plane pinned with one size refuses to be loaded with another.
    let small = TableConfig::new(1021, 0x1234)
        .and_then(|t| t.with_flows(4096))
        .and_then(|t| t.with_capacity(64, 128, 512))
        .expect("a prime, a flow table size and a capacity");
    let c = Pins(PathBuf::from("/sys/fs/bpf/lbt-det-c"));
    let _ = dataplane::down(&c.0);
    let _ec = dataplane::load_with(&c.0, &small).expect("load c");
    assert!(
        Writer::open(&c.0)
            .expect("writer c")
            .apply(&derived.services)
            .failed
            .is_empty()
    );
    let mc = Maps::open(&c.0).expect("maps c");
    assert_eq!(mc.table().expect("table"), small);
    // The counters by id have a region for each possible CPU.
    let cpus = aya::util::nr_cpus().expect("CPUs") as u32;
    for (name, entries) in [
        // 4,096 flows: twice the slots, in buckets of four.
        (lb_common::MAP_FLOWS, 2048),
        (lb_common::MAP_REPLIES6, 4096),
        (lb_common::MAP_SERVICES, 64),
        (lb_common::MAP_SERVICES6, 64),
        (lb_common::MAP_SERVICE_TRAFFIC, 64 * cpus),
        (lb_common::MAP_BACKENDS, 128),
        (lb_common::MAP_BACKEND_TRAFFIC, 128 * cpus),
        (lb_common::MAP_MEMBERS, 512),
        // Chunks of 16 tables for 64 services, one to spare, and one for each size class.
        (lb_common::MAP_TABLES, 5 + lb_common::SIZE_CLASSES),
    ] {
        let info = aya::maps::MapData::from_pin(c.0.join(name))
            .and_then(|m| m.info())
            .expect("map info");
        assert_eq!(info.max_entries(), entries, "{name}");
    }
    // Chunks only for the services in use, of 16 tables of 1021 slots (64 elements of 16: six
    // active backends take more than the 509 slots of the class below).
    let outer = aya::maps::MapData::from_pin(c.0.join(lb_common::MAP_TABLES)).expect("pin");
    let outer: aya::maps::ArrayOfMaps<_, aya::maps::MapData> = aya::maps::Map::from_map_data(outer)
        .expect("map")
        .try_into()
        .expect("an array of maps");
    let held: Vec<u32> = (0..5 + lb_common::SIZE_CLASSES)
        .filter_map(|i| outer.get(&i, 0).ok())
        .map(|t| t.info().expect("chunk info").max_entries())
        .collect();
    let in_use = mc.read().expect("read").tables();
    assert!(in_use > 0, "the document has services");
    assert_eq!(
        held,
        vec![16 * 64; (in_use + 16 + 16).div_ceil(16)],
        "the chunks the services' tables take, with 16 blocks and a chunk to spare"
    );
    let small_service = reference_service((1021, 0x1234));
    for src in clients(0xfeed).take(1000) {
        assert_eq!(
            mc.pick(&vip, src).expect("pick"),
            Some(expected(&small_service, src, 6)),
            "{src} with 1021 slots, seed 0x1234"
        );
    }
    let refused = dataplane::load_with(&c.0, &Default::default())
        .expect_err("a second size is refused")
        .to_string();
    assert!(
        refused.contains("tables of 1021 slots")
            && refused.contains("room for 64 services")
            && refused.contains("lbctl down"),
        "{refused}"
    );
    assert!(TableConfig::new(1000, 0).is_err(), "1000 is not a prime");
    assert!(
        TableConfig::new(131_101, 0).is_err(),
        "above the largest size"
    );

    // The command line gives the reference's answer, from the kernel and from the file.
    let dir = lbtest::TestDir::new("det");
    let file = dir.join("apps.json");
    std::fs::write(&file, &doc).expect("write");
    let src = "198.18.0.2:40000";
    let run = |args: &[&str]| {
        let out = Command::new(lbtest::lbctl_bin())
            .args(args)
            .output()
            .expect("lbctl");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let pin_a = a.0.to_str().expect("path");
    let from_kernel = run(&["simulate", "--vip", VIP, "--src", src, "--pin-dir", pin_a]);
    let from_file = run(&[
        "simulate",
        "--vip",
        VIP,
        "--src",
        src,
        "--apps",
        file.to_str().expect("path"),
    ]);
    let want = expected(&service, src.parse::<SocketAddrV4>().expect("src"), 6);
    assert_eq!(from_kernel, want.to_string());
    assert_eq!(from_file, want.to_string());
    drop((a, b, c));

    // Two real agents, in two load-balancer namespaces, given the same document; every lab
    // backend runs servers that answer with their name.
    let mut labs = [Lab::new("lbt-det1", 7), Lab::new("lbt-det2", 7)];
    for (i, lab) in labs.iter_mut().enumerate() {
        lab.serve(PORT);
        lab.start_agent(&file, &dir.join(format!("agent{i}.log")));
    }
    for (i, lab) in labs.iter().enumerate() {
        lab.wait_for_kernel(Duration::from_secs(20), |s| {
            s.len() == 2 && s.iter().all(|(_, _, b)| b.len() == 7)
        })
        .unwrap_or_else(|e| {
            panic!(
                "agent {i}: {e}\n{}",
                lbtest::read_log(&dir.join(format!("agent{i}.log")))
            )
        });
    }

    // (a) 10,000 SYNs through each agent's own program and maps, arriving from the clients.
    let flows: Vec<SocketAddrV4> = clients(0x0dd_ba11).collect();
    let to: SocketAddrV4 = VIP.parse().expect("vip");
    let frames: Vec<Vec<u8>> = flows
        .iter()
        .map(|src| Frame::tcp(*src, to, TCP_SYN).build())
        .collect();
    let sent_to: Vec<Vec<SocketAddr>> = labs
        .iter()
        .map(|lab| {
            run_attached(&lab.lb_ns, &lab.pin_dir, "lb-c", frames.clone())
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    assert!(
                        ![XDP_ABORTED, XDP_DROP].contains(&r.verdict),
                        "{}: flow {i} from {}: verdict {}",
                        lab.prefix,
                        flows[i],
                        r.verdict
                    );
                    // The rewritten destination: IPv4 at 30..34, the TCP port at 36..38.
                    SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::new(r.out[30], r.out[31], r.out[32], r.out[33]),
                        u16::from_be_bytes([r.out[36], r.out[37]]),
                    ))
                })
                .collect()
        })
        .collect();
    for (i, src) in flows.iter().enumerate() {
        let want = expected(&service, *src, 6);
        assert_eq!(
            sent_to[0][i], sent_to[1][i],
            "flow {i} from {src}: the two agents' kernels disagree"
        );
        assert_eq!(
            sent_to[0][i], want,
            "flow {i} from {src}: not the reference's"
        );
    }

    // (b) Real exchanges through each lab: 100 UDP requests from fixed ports (the same flows in
    // both labs) and 100 TCP connections; each answered by the backend the reference names.
    let name_of =
        |b: SocketAddr| format!("b{}", b.ip().to_string().split('.').nth(2).unwrap_or("?"));
    let mut answered_udp = Vec::new();
    for lab in &labs {
        let udp = in_netns(&lab.client_ns, move || {
            (42000..42100u16)
                .map(|port| {
                    let from = SocketAddr::V4(SocketAddrV4::new(CLIENT_ADDR, port));
                    udp_request_from(from, to).map(|b| (port, b))
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .unwrap_or_else(|e| panic!("{}: UDP: {e}", lab.prefix));
        for (port, got) in &udp {
            let want = expected(&service, SocketAddrV4::new(CLIENT_ADDR, *port), 17);
            assert_eq!(*got, name_of(want), "{}: UDP from port {port}", lab.prefix);
        }
        answered_udp.push(udp);
        let tcp = in_netns(&lab.client_ns, move || {
            (0..100)
                .map(|_| tcp_request_from(to))
                .collect::<Result<Vec<_>, String>>()
        })
        .unwrap_or_else(|e| panic!("{}: TCP: {e}", lab.prefix));
        for (local, got) in &tcp {
            let want = expected(&service, *local, 6);
            assert_eq!(*got, name_of(want), "{}: TCP from {local}", lab.prefix);
        }
    }
    assert_eq!(
        answered_udp[0], answered_udp[1],
        "the labs answered differently"
    );
    let used: std::collections::BTreeSet<&String> =
        answered_udp[0].iter().map(|(_, b)| b).collect();
    assert!(used.len() >= 5, "100 flows reached only {used:?}");

    for lab in labs.iter_mut() {
        lab.stop_agents(false);
    }
    eprintln!("determinism: {:?}", started.elapsed());
}
