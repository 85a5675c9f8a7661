//! The forwarding stage's next-hop cache (lb-ebpf `fwd`): a neighbour or route change reaches the
//! packets within `lb_common::NEXT_HOP_MAX_AGE_NS`, and packets right after a change still get
//! the cached answer (so the cache is in use). The lab's routes and neighbours are changed with
//! `ip` while the program runs on packets with BPF_PROG_TEST_RUN.
use lbtest::{
    packet::{Frame, Mac, TCP_ACK, TCP_SYN},
    pktlab::{
        BACKEND_SIDE, CLIENT_SIDE, Hook, Ingress, PacketLab, XDP_REDIRECT, XDP_TX, app, apps,
        mac_str, running, tc_verdict,
    },
    privileged_or_skip, sh,
};
use std::{
    net::{SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

const BOUND: Duration = Duration::from_nanos(lb_common::NEXT_HOP_MAX_AGE_NS);
/// The program's clock (the kernel's tick count) steps at least every 10 ms (HZ >= 100); the
/// test's own steps add a little more.
const SLACK: Duration = Duration::from_millis(50);

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

/// `ip neigh VERB` of the backend's address (198.18.1.2) with `mac` on `dev`.
fn neighbour(ns: &str, verb: &str, mac: Mac, dev: &str) {
    sh(&[
        "ip",
        "-n",
        ns,
        "neigh",
        verb,
        "198.18.1.2",
        "lladdr",
        &mac_str(mac),
        "dev",
        dev,
        "nud",
        "permanent",
    ]);
}

/// What a forwarded packet left with: verdict, source and destination MAC.
type Departure = (u32, Mac, Mac);

/// Sends packets of one flow every 10 ms from `changed` until `BOUND` + 300 ms after it, and
/// checks: every one sent earlier than `BOUND` - `SLACK` after the entry's fill (no earlier than
/// `filled`) still left as `old`, every one sent later than `BOUND` + `SLACK` after the change
/// left as `new`. The first half is also a check of the program's clock (the kernel's ticks times
/// the tick's length the loader sets): a clock running fast would age the entry out early.
/// Returns how long after the change the first packet left as `new`.
fn follows(
    send: &mut dyn FnMut() -> Departure,
    filled: Instant,
    changed: Instant,
    old: Departure,
    new: Departure,
    what: &str,
) -> Duration {
    let mut first_new = None;
    let (mut early, mut late) = (0, 0);
    while changed.elapsed() < BOUND + Duration::from_millis(300) {
        let sent_at = changed.elapsed();
        let cached_for = filled.elapsed();
        let got = send();
        if got == new && first_new.is_none() {
            first_new = Some(sent_at);
        }
        if cached_for + SLACK < BOUND {
            assert_eq!(
                got, old,
                "{what}: a packet {cached_for:?} after the entry's fill (bound {BOUND:?}) left by \
                 the new next hop: the cached one aged out early"
            );
            early += 1;
        } else if sent_at > BOUND + SLACK {
            assert_eq!(
                got, new,
                "{what}: a packet {sent_at:?} after the change (bound {BOUND:?}) left by the old next hop"
            );
            late += 1;
        } else {
            assert!(got == old || got == new, "{what}: {got:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(late > 0, "{what}: no packet was sent after the bound");
    if early == 0 {
        eprintln!("next_hop: {what}: the machine was too slow to see the cached entry");
    }
    first_new.unwrap_or_else(|| panic!("{what}: the new next hop was never used"))
}

#[test]
fn neighbour_and_route_changes_are_followed_within_the_bound() {
    if !privileged_or_skip("neighbour_and_route_changes_are_followed_within_the_bound") {
        return;
    }
    changes_are_followed(Hook::Xdp, "lbt-pkt-nexthop");
}

/// The same through `lb_tc`, whose cache entries keep the device's MTU (`fwd::fits`).
#[test]
fn neighbour_and_route_changes_are_followed_within_the_bound_tc() {
    if !privileged_or_skip("neighbour_and_route_changes_are_followed_within_the_bound_tc") {
        return;
    }
    changes_are_followed(Hook::Tc, "lbt-pkt-nexthop-tc");
}

fn changes_are_followed(hook: Hook, lab_name: &str) {
    // The hook's verdict for an XDP one.
    let v = move |xdp: u32| match hook {
        Hook::Xdp => xdp,
        Hook::Tc => tc_verdict(xdp),
    };
    let lab = PacketLab::new(lab_name);
    let ns = lab.ns.clone();
    lab.run(move |dp| {
        dp.set_hook(hook);
        let backend = sa("198.18.1.2:31000");
        dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.1:80")],
            &[running(backend)],
        )]));
        let (client, vip) = (sa("198.18.0.2:40000"), sa("172.16.0.1:80"));
        let mut send = |flags: u8| -> Departure {
            let r = dp
                .run(&Frame::tcp(client, vip, flags).build(), Ingress::Client)
                .expect("test run");
            assert!(r.out.len() >= 12, "{r:?}");
            let mac = |i: usize| -> Mac { r.out[i..i + 6].try_into().expect("6 bytes") };
            (r.verdict, mac(6), mac(0))
        };
        let old_mac = [0x02, 0, 0, 0, 0x01, 0x02];
        let old = (v(XDP_REDIRECT), BACKEND_SIDE.mac, old_mac);
        // No later than the entry's fill.
        let filled = Instant::now();
        assert_eq!(send(TCP_SYN), old, "before any change");

        // The backend's MAC changes (a failed-over host, a replaced NIC).
        let new_mac = [0x02, 0, 0, 0, 0x01, 0x99];
        neighbour(&ns, "replace", new_mac, BACKEND_SIDE.name);
        let changed = Instant::now();
        let new = (v(XDP_REDIRECT), BACKEND_SIDE.mac, new_mac);
        let took = follows(
            &mut || send(TCP_ACK),
            filled,
            changed,
            old,
            new,
            "neighbour",
        );
        eprintln!("next_hop: a new neighbour MAC was used {took:?} after the change");

        // A route moves the backend behind the client-side interface: out where it came in.
        // The entry holding the new MAC was filled once the old one had aged out: no earlier
        // than `filled` + BOUND.
        let filled = filled + BOUND;
        assert_eq!(send(TCP_ACK), new, "before the route change");
        let via = [0x02, 0, 0, 0, 0x00, 0x77];
        neighbour(&ns, "add", via, CLIENT_SIDE.name);
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "198.18.1.2/32",
            "dev",
            CLIENT_SIDE.name,
        ]);
        let changed = Instant::now();
        let moved = (v(XDP_TX), CLIENT_SIDE.mac, via);
        let took = follows(&mut || send(TCP_ACK), filled, changed, new, moved, "route");
        eprintln!("next_hop: a new route was used {took:?} after the change");
    });
}

/// The program's array `name` of `N`-byte slots, through a handle of its own (the data plane's
/// is borrowed by each run), after checking that the loader made room for every possible CPU.
fn per_cpu_slots<const N: usize>(
    ebpf: &aya::Ebpf,
    name: &str,
    bits: u32,
    cpus: usize,
) -> aya::maps::Array<aya::maps::MapData, [u8; N]> {
    let id = match ebpf.map(name) {
        Some(aya::maps::Map::Array(data)) => data.info().expect("its description").id(),
        _ => panic!("{name} is not an array"),
    };
    let data = aya::maps::MapData::from_id(id).expect("the map by id");
    let slots = aya::maps::Array::try_from(aya::maps::Map::Array(data))
        .unwrap_or_else(|e| panic!("{name}: {N}-byte slots: {e}"));
    assert_eq!(
        slots.len() as usize,
        cpus << bits,
        "{name}: slots for every possible CPU"
    );
    slots
}

/// Whether any of CPU `cpu`'s slots in `map` (`bits`: log2 of a CPU's share) starts with `key`.
fn cpu_holds<const N: usize>(
    map: &aya::maps::Array<aya::maps::MapData, [u8; N]>,
    bits: u32,
    cpu: usize,
    key: &[u8],
) -> bool {
    let slots = 1usize << bits;
    (cpu * slots..(cpu + 1) * slots)
        .any(|i| map.get(&(i as u32), 0).expect("a slot")[..key.len()] == *key)
}

/// Each of the programs' per-CPU caches (`lb_common::PER_CPU_SLOTS`) keeps what a CPU copies in
/// that CPU's slots: the next hop of a forwarded packet, and the backend's record of a reply
/// (IPv4 and IPv6).
#[test]
fn each_cpu_keeps_its_copies_in_its_own_slots() {
    if !privileged_or_skip("each_cpu_keeps_its_copies_in_its_own_slots") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-nearcpu");
    lab.run(|dp| {
        let (client, vip, be) = (
            sa("198.18.0.2:40000"),
            sa("172.16.0.1:8080"),
            sa("198.18.1.2:31000"),
        );
        let sa6 = |s: &str| -> SocketAddrV6 { s.parse().expect("address") };
        let (client6, vip6, be6) = (
            sa6("[2001:2:0:98::2]:40000"),
            sa6("[fd00::1]:8080"),
            sa6("[2001:2:0:99::2]:31000"),
        );
        dp.apply(&apps(vec![
            app(
                "/web",
                "tcp",
                &[("VIP_0", "172.16.0.1:8080")],
                &[running(be)],
            ),
            app(
                "/web6",
                "tcp",
                &[("VIP_0", "[fd00::1]:8080")],
                &[running(be6)],
            ),
        ]));
        let cpus = aya::util::nr_cpus().expect("possible CPUs");
        let [
            (hops_name, hop_bits),
            (singles_name, single_bits),
            (singles6_name, _),
        ] = lb_common::PER_CPU_SLOTS;
        let hops = per_cpu_slots::<64>(dp.ebpf(), hops_name, hop_bits, cpus);
        let singles = per_cpu_slots::<32>(dp.ebpf(), singles_name, single_bits, cpus);
        let singles6 = per_cpu_slots::<64>(dp.ebpf(), singles6_name, single_bits, cpus);
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        for cpu in 0..online.min(cpus) {
            lbtest::pin_thread_to(cpu);
            for flags in [TCP_SYN, TCP_ACK] {
                let r = dp
                    .run(&Frame::tcp(client, vip, flags).build(), Ingress::Client)
                    .expect("run");
                assert_eq!(r.verdict, XDP_REDIRECT);
                dp.run(&Frame::tcp(client6, vip6, flags).build(), Ingress::Client)
                    .expect("run");
            }
            // The replies leave with the VIPs' addresses and ports as their sources.
            let reply = dp
                .run(&Frame::tcp(be, client, TCP_ACK).build(), Ingress::Backend)
                .expect("run");
            assert_eq!(reply.out[26..30], vip.ip().octets(), "{reply:?}");
            assert_eq!(reply.out[34..36], vip.port().to_be_bytes(), "{reply:?}");
            let reply = dp
                .run(&Frame::tcp(be6, client6, TCP_ACK).build(), Ingress::Backend)
                .expect("run");
            assert_eq!(reply.out[22..38], vip6.ip().octets(), "{reply:?}");
            assert_eq!(reply.out[54..56], vip6.port().to_be_bytes(), "{reply:?}");
            // Each slot starts with its key's address: the backend's next hop, and the copies
            // of the backends' records, are in this CPU's slots and in no later CPU's yet.
            let v4 = be.ip().octets();
            let v6 = be6.ip().octets();
            let copies: [(&str, &dyn Fn(usize) -> bool); 3] = [
                (hops_name, &|c| cpu_holds(&hops, hop_bits, c, &v4)),
                (singles_name, &|c| cpu_holds(&singles, single_bits, c, &v4)),
                (singles6_name, &|c| {
                    cpu_holds(&singles6, single_bits, c, &v6)
                }),
            ];
            for (name, holds) in copies {
                assert!(holds(cpu), "{name}: CPU {cpu}'s slots hold the copy");
                for later in cpu + 1..cpus {
                    assert!(!holds(later), "{name}: CPU {later} has no copy yet");
                }
            }
        }
    });
}
