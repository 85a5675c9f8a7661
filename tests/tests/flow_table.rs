//! The flow table of buckets (`lb_ct_v3`, `lb_common::flow_table`) as the program uses it: a
//! new flow whose two buckets are full takes the slot of a flow no packet came back for, else
//! moves a flow in use to its other bucket, else takes one in use, whose bucket then gets a
//! second chance; the flow that lost its slot keeps its
//! backend through the Maglev table (and is counted lost); a slot whose check fails (two
//! writers met on it) is never used to forward.
use aya::maps::{Array, MapData};
use lb_common::{
    Flow, Flow6, FlowEntry, MAP_FLOW_SEED, MAP_FLOWS, MAP_FLOWS6,
    flow_table::{FlowBucket, FlowKey, buckets_of},
};
use lbctl::dataplane::{FlowTable, Maps, TableConfig};
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{Ingress, PacketLab, XDP_REDIRECT, app, apps, flow4, flow6, pinned_array, running},
    privileged_or_skip,
};
use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

const VIP: &str = "172.16.0.1:8080";

/// The pinned table's seed and buckets, and the bucket of a client's flow to the VIP.
struct Place {
    seed: u64,
    buckets: u32,
}

impl Place {
    fn of(dir: &Path) -> Place {
        let seed: Array<MapData, u64> = pinned_array(dir, MAP_FLOW_SEED);
        let table: Array<MapData, FlowBucket<Flow>> = pinned_array(dir, MAP_FLOWS);
        Place {
            seed: seed.get(&0, 0).expect("the seed"),
            buckets: table.len(),
        }
    }
    fn buckets(&self, client: SocketAddrV4) -> (u32, u32) {
        buckets_of(flow4(client, sa(VIP), 6).mix(&self.seed), self.buckets)
    }
}

fn web(dp: &mut lbtest::pktlab::Dataplane) {
    dp.apply(&apps(vec![app(
        "/web",
        "tcp",
        &[("VIP_0", VIP)],
        &[
            running(sa("198.18.1.2:31000")),
            running(sa("198.18.1.3:31000")),
        ],
    )]));
}

#[test]
fn full_buckets_give_an_unused_flows_slot_then_a_second_chance() {
    if !privileged_or_skip("full_buckets_give_an_unused_flows_slot_then_a_second_chance") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-ftfull");
    let dir = lab.dir.clone();
    // The smallest table: 512 buckets, so that ten flows of one pair of buckets are found fast.
    let table = TableConfig::default().with_flows(1024).expect("sizes");
    lab.run_with(table, move |dp| {
        web(dp);
        let place = Place::of(&dir);
        assert_eq!(place.buckets, 512);
        let vip = sa(VIP);
        // Ten clients whose flows have the same two buckets (of four slots each): a search
        // over source addresses and ports, bounded (about 262,144 candidates a match).
        let first = SocketAddrV4::new([198, 18, 0, 2].into(), 1024);
        let pair = place.buckets(first);
        let clients: Vec<SocketAddrV4> = (2..=254u8)
            .flat_map(|h| {
                (1024..=u16::MAX).map(move |p| SocketAddrV4::new([198, 18, 0, h].into(), p))
            })
            .filter(|c| place.buckets(*c) == pair)
            .take(10)
            .collect();
        assert_eq!(clients.len(), 10, "ten clients of one pair of buckets");
        let maps = Maps::open(&dir).expect("maps");
        let tracked = |dp: &lbtest::pktlab::Dataplane| -> Vec<bool> {
            clients
                .iter()
                .map(|c| dp.flow_entry(((*c).into(), vip.into(), 6)).is_some())
                .collect()
        };
        let send = |dp: &mut lbtest::pktlab::Dataplane, c: SocketAddrV4, flags| {
            let r = dp
                .run(&Frame::tcp(c, vip, flags).build(), Ingress::Client)
                .expect("run");
            assert_eq!(r.verdict, XDP_REDIRECT, "{c}");
            r
        };
        // Eight flows fill both buckets; every one but the first sends a second segment.
        for c in &clients[..8] {
            send(dp, *c, TCP_SYN);
        }
        for c in &clients[1..8] {
            send(dp, *c, TCP_ACK);
        }
        assert_eq!(&tracked(dp)[..8], [true; 8]);
        // The ninth takes the slot of the first, the one flow no packet came back for: no
        // flow in use moved or lost its slot.
        let pressure = maps.flow_pressure().expect("pressure");
        send(dp, clients[8], TCP_SYN);
        assert_eq!(maps.flow_pressure().expect("pressure"), pressure);
        assert_eq!(
            tracked(dp)[..9],
            [false, true, true, true, true, true, true, true, true]
        );
        // That flow's next segment goes where the Maglev table sends it, which is where its
        // SYN went (the table did not change), and is counted as a flow lost. Its new entry
        // takes the ninth's slot (no packet came back for it either).
        let lost = maps.flows_lost().expect("lost");
        let backend = dp.pick(vip, 6, clients[0]).expect("a backend");
        let r = send(dp, clients[0], TCP_ACK);
        assert_eq!(&r.out[30..34], &backend.ip().octets());
        assert_eq!(maps.flows_lost().expect("lost"), lost + 1);
        assert_eq!(
            tracked(dp)[..9],
            [true, true, true, true, true, true, true, true, false]
        );
        // Every flow in use now, and none can move (the other bucket of each is one of the
        // pair): the tenth takes one of them, and the others of its bucket lose their marks (a
        // second chance), the other bucket's keep theirs.
        send(dp, clients[0], TCP_ACK);
        send(dp, clients[9], TCP_SYN);
        let [moved, evicted] = pressure;
        assert_eq!(
            maps.flow_pressure().expect("pressure"),
            [moved, evicted + 1],
            "counted as a flow in use evicted"
        );
        let now = tracked(dp);
        assert!(now[9], "the tenth is tracked");
        assert_eq!(now[..8].iter().filter(|t| !**t).count(), 1, "{now:?}");
        let table: Array<MapData, FlowBucket<Flow>> = pinned_array(&dir, MAP_FLOWS);
        let key = flow4(clients[9], vip, 6);
        let (a, b) = (
            table.get(&pair.0, 0).expect("bucket"),
            table.get(&pair.1, 0).expect("bucket"),
        );
        let (taken, other) = if a.slots.iter().any(|s| s.key == key) {
            (a, b)
        } else {
            (b, a)
        };
        assert!(taken.slots.iter().all(|s| s.used == 0), "{taken:?}");
        assert!(other.slots.iter().all(|s| s.used == 1), "{other:?}");
    });
}

/// A new flow whose two buckets hold only flows in use moves one of them whose other bucket has
/// room there, and takes its slot: no flow is lost.
#[test]
fn a_flow_in_use_moves_to_its_other_bucket_for_a_new_one() {
    if !privileged_or_skip("a_flow_in_use_moves_to_its_other_bucket_for_a_new_one") {
        return;
    }
    moves_one_for_a_new_flow::<Flow>("lbt-pkt-ftmove", Writer::Program);
}

/// The same in the IPv6 table (`lb_room6`).
#[test]
fn an_ipv6_flow_in_use_moves_to_its_other_bucket_for_a_new_one() {
    if !privileged_or_skip("an_ipv6_flow_in_use_moves_to_its_other_bucket_for_a_new_one") {
        return;
    }
    moves_one_for_a_new_flow::<Flow6>("lbt-pkt-ftmove6", Writer::Program);
}

/// User space writes a flow (a resize's or an upgrade's carry, `FlowTable::insert_absent`) as
/// the program does: moving a flow in use rather than evicting it.
#[test]
fn a_carried_flow_moves_a_flow_in_use_as_the_program_does() {
    if !privileged_or_skip("a_carried_flow_moves_a_flow_in_use_as_the_program_does") {
        return;
    }
    moves_one_for_a_new_flow::<Flow>("lbt-pkt-ftcarry", Writer::Carry);
}

/// Who writes the new flow.
#[derive(Clone, Copy)]
enum Writer {
    /// The program, for a SYN.
    Program,
    /// User space (`FlowTable::insert_absent`).
    Carry,
}

/// An address family's side of the move tests: its table, its VIP and its clients.
trait Side: FlowKey + 'static
where
    FlowBucket<Self>: aya::Pod + Default,
{
    /// The pinned table.
    const MAP: &'static str;
    /// The VIP, as a Marathon label writes it.
    const LABEL: &'static str;
    /// The VIP.
    fn vip() -> SocketAddr;
    /// The backends.
    fn backends() -> [SocketAddr; 2];
    /// Client number `i` (an address of the clients' network and a port).
    fn client(i: u32) -> SocketAddr;
    /// The flow key of a client's flow to the VIP.
    fn key(client: SocketAddr) -> Self;
}

/// Client `i`'s host number (3 and up, below 256 for the `Side::client` numbers the tests use)
/// and port (1024 to 65535: never 0).
fn client_host_port(i: u32) -> (u16, u16) {
    const PORTS: u32 = 65536 - 1024;
    let host = 3 + i / PORTS;
    assert!(host < 256, "client {i}");
    (host as u16, (1024 + i % PORTS) as u16)
}

impl Side for Flow {
    const MAP: &'static str = MAP_FLOWS;
    const LABEL: &'static str = VIP;
    fn vip() -> SocketAddr {
        sa(VIP).into()
    }
    fn backends() -> [SocketAddr; 2] {
        [sa("198.18.1.2:31000").into(), sa("198.18.1.3:31000").into()]
    }
    fn client(i: u32) -> SocketAddr {
        let (host, port) = client_host_port(i);
        SocketAddrV4::new([198, 18, 0, host as u8].into(), port).into()
    }
    fn key(client: SocketAddr) -> Flow {
        match (client, Self::vip()) {
            (SocketAddr::V4(c), SocketAddr::V4(v)) => flow4(c, v, 6),
            _ => unreachable!("IPv4"),
        }
    }
}

impl Side for Flow6 {
    const MAP: &'static str = MAP_FLOWS6;
    const LABEL: &'static str = "fd00:172:16::1:8080";
    fn vip() -> SocketAddr {
        "[fd00:172:16::1]:8080".parse().expect("address")
    }
    fn backends() -> [SocketAddr; 2] {
        [
            "[2001:2:0:1::2]:31000".parse().expect("address"),
            "[2001:2:0:1::3]:31000".parse().expect("address"),
        ]
    }
    fn client(i: u32) -> SocketAddr {
        let (host, port) = client_host_port(i);
        let host = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, host);
        SocketAddrV6::new(host, port, 0, 0).into()
    }
    fn key(client: SocketAddr) -> Flow6 {
        match (client, Self::vip()) {
            (SocketAddr::V6(c), SocketAddr::V6(v)) => flow6(c, v, 6),
            _ => unreachable!("IPv6"),
        }
    }
}

/// Eight flows in use fill a new flow's two buckets, four a bucket: those of its first bucket
/// each with its other bucket outside the pair (so that each could move), those of its second
/// with the same two buckets as the new flow; the new flow is written (`writer`): it is
/// tracked, one of the first bucket's four moved to its other bucket still marked in use, and
/// every one of the eight still finds its entry.
fn moves_one_for_a_new_flow<K: Side + std::fmt::Debug>(name: &str, writer: Writer)
where
    FlowBucket<K>: aya::Pod + Default,
{
    let lab = PacketLab::new(name);
    let dir = lab.dir.clone();
    let table = TableConfig::default().with_flows(1024).expect("sizes");
    lab.run_with(table, move |dp| {
        let tasks: Vec<_> = K::backends().into_iter().map(running).collect();
        dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", K::LABEL)],
            &tasks,
        )]));
        let seed: Array<MapData, u64> = pinned_array(&dir, MAP_FLOW_SEED);
        let keys = K::keys(seed.get(&0, 0).expect("the seed"));
        let flows: Array<MapData, FlowBucket<K>> = pinned_array(&dir, K::MAP);
        let count = flows.len();
        let buckets = |c: SocketAddr| buckets_of(K::key(c).mix(&keys), count);
        let new = K::client(0);
        let (a, b) = buckets(new);
        // Four clients whose first bucket is `a` and second not `b`, sent first: they fill `a`,
        // and each could move to its second bucket. Then four whose buckets are `a` and `b`,
        // as the new flow's: `a` full, they go to `b` (a first bucket is in the table's first
        // quarter, a second in the rest, so no client has `b` first). A search, bounded.
        let mut held: Vec<(SocketAddr, u32)> = Vec::new();
        for c in (1..1 << 23).map(K::client) {
            let (x, y) = buckets(c);
            let of = |want: u32| held.iter().filter(|h| h.1 == want).count();
            if x == a && y != b && of(a) < 4 {
                held.push((c, a));
            } else if x == a && y == b && c != new && of(b) < 4 {
                held.push((c, b));
            }
            if held.len() == 8 {
                break;
            }
        }
        assert_eq!(held.len(), 8, "eight clients of the pair's buckets");
        held.sort_by_key(|h| h.1 != a);
        let maps = Maps::open(&dir).expect("maps");
        let send = |dp: &mut lbtest::pktlab::Dataplane, c: SocketAddr, flags| {
            let r = dp
                .run(&Frame::tcp(c, K::vip(), flags).build(), Ingress::Client)
                .expect("run");
            assert_eq!(r.verdict, XDP_REDIRECT, "{c}");
        };
        for (c, _) in &held {
            send(dp, *c, TCP_SYN);
            send(dp, *c, TCP_ACK);
        }
        // Where a client's flow is: (bucket, used) of each live slot holding it.
        let where_is = |c: &SocketAddr| -> Vec<(u32, u32)> {
            let key = K::key(*c);
            let (x, y) = buckets(*c);
            let mut at = Vec::new();
            for b in [x, y] {
                let bucket = flows.get(&b, 0).expect("bucket");
                for s in bucket.slots.iter().filter(|s| s.key == key && s.check != 0) {
                    at.push((b, s.used));
                }
            }
            at
        };
        for (c, put) in &held {
            assert_eq!(where_is(c), [(*put, 1)], "{c} in bucket {put}, in use");
        }
        let lost = maps.flows_lost().expect("lost");
        let [moved_before, evicted] = maps.flow_pressure().expect("pressure");
        match writer {
            Writer::Program => send(dp, new, TCP_SYN),
            Writer::Carry => {
                let mut t: FlowTable<K> = FlowTable::open(&dir, K::MAP).expect("table");
                let written = t
                    .insert_absent(&K::key(new), &FlowEntry::new(1, 1))
                    .expect("insert");
                assert!(written);
            }
        }
        assert_eq!(where_is(&new).len(), 1, "the new flow is tracked");
        let mut moved = 0;
        for (c, put) in &held {
            let (x, y) = buckets(*c);
            let other = if *put == x { y } else { x };
            match where_is(c)[..] {
                [(at, 1)] if at == *put => {}
                [(at, 1)] if at == other && *put == a => moved += 1,
                ref other => panic!("{c}: {other:?}"),
            }
        }
        assert_eq!(moved, 1, "one flow moved, marked in use");
        // The program counts its move; user space's carry is not the data plane's traffic.
        let counted = match writer {
            Writer::Program => moved_before + 1,
            Writer::Carry => moved_before,
        };
        assert_eq!(
            maps.flow_pressure().expect("pressure"),
            [counted, evicted],
            "counted as moved, none evicted"
        );
        // Every flow's next segment finds its entry.
        for (c, _) in &held {
            send(dp, *c, TCP_ACK);
        }
        assert_eq!(maps.flows_lost().expect("lost"), lost);
    });
}

#[test]
fn a_slot_whose_check_fails_is_not_used() {
    if !privileged_or_skip("a_slot_whose_check_fails_is_not_used") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-fttorn");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        web(dp);
        let place = Place::of(&dir);
        let vip = sa(VIP);
        let client = sa("198.18.0.2:40000");
        let backend = dp.pick(vip, 6, client).expect("a backend");
        let r = dp
            .run(&Frame::tcp(client, vip, TCP_SYN).build(), Ingress::Client)
            .expect("run");
        assert_eq!(&r.out[30..34], &backend.ip().octets());
        let e = dp
            .flow_entry((client.into(), vip.into(), 6))
            .expect("tracked");
        // The id of the other backend: from the entry of a flow the table sends there.
        let elsewhere = (40001..41000)
            .map(|p| SocketAddrV4::new(*client.ip(), p))
            .find(|c| dp.pick(vip, 6, *c) != Some(backend))
            .expect("a client of the other backend");
        dp.run(
            &Frame::tcp(elsewhere, vip, TCP_SYN).build(),
            Ingress::Client,
        )
        .expect("run");
        let other = dp
            .flow_entry((elsewhere.into(), vip.into(), 6))
            .expect("tracked")
            .backend();
        assert_ne!(other, e.backend());
        // That id in the flow's entry, the check left as it was: what a second writer leaves
        // when it wrote its entry and not yet its check.

        let key = flow4(client, vip, 6);
        let mut table: Array<MapData, FlowBucket<Flow>> = pinned_array(&dir, MAP_FLOWS);
        let (first, second) = place.buckets(client);
        let (b, mut bucket) = [first, second]
            .into_iter()
            .map(|b| (b, table.get(&b, 0).expect("the bucket")))
            .find(|(_, bucket)| bucket.slots.iter().any(|s| s.key == key && s.check != 0))
            .expect("the flow's bucket");
        let slot = bucket
            .slots
            .iter_mut()
            .find(|s| s.key == key && s.check != 0)
            .expect("the flow's slot");
        slot.entry.backend_word = (slot.entry.backend_word & !0xf_ffff) | other;
        table.set(b, bucket, 0).expect("writing the bucket");
        assert_eq!(dp.flow_entry((client.into(), vip.into(), 6)), None);

        let maps = Maps::open(&dir).expect("maps");
        let lost = maps.flows_lost().expect("lost");
        let r = dp
            .run(&Frame::tcp(client, vip, TCP_ACK).build(), Ingress::Client)
            .expect("run");
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(
            &r.out[30..34],
            &backend.ip().octets(),
            "the flow's own backend, not the one the broken slot names"
        );
        assert_eq!(maps.flows_lost().expect("lost"), lost + 1);
        // And the flow is tracked again, with its own backend.
        let again = dp
            .flow_entry((client.into(), vip.into(), 6))
            .expect("tracked again");
        assert_eq!(again.backend(), e.backend());
    });
}

/// The flags of the map pinned at `dir`/`name`.
fn pinned_flags(dir: &Path, name: &str) -> u32 {
    aya::maps::MapInfo::from_pin(dir.join(name))
        .unwrap_or_else(|e| panic!("{name} pinned: {e}"))
        .map_flags()
}

#[test]
fn flow_tables_are_aligned_and_older_unaligned_ones_are_used_as_they_are() {
    if !privileged_or_skip("flow_tables_are_aligned_and_older_unaligned_ones_are_used_as_they_are")
    {
        return;
    }
    let vip = sa(VIP);
    let client = sa("198.18.0.9:40000");
    let vip6 = Flow6::vip();
    let client6 = Flow6::client(9);
    let serve = move |dp: &mut lbtest::pktlab::Dataplane| {
        dp.apply(&apps(vec![
            app(
                "/web",
                "tcp",
                &[("VIP_0", VIP)],
                &[running(sa("198.18.1.2:31000"))],
            ),
            app(
                "/web6",
                "tcp",
                &[("VIP_0", Flow6::LABEL)],
                &[running(Flow6::backends()[0])],
            ),
        ]));
        // A flow of each family goes through the table: its SYN writes it, its ACK finds it.
        for flags in [TCP_SYN, TCP_ACK] {
            let r = dp
                .run(&Frame::tcp(client, vip, flags).build(), Ingress::Client)
                .expect("run");
            assert_eq!(r.verdict, XDP_REDIRECT);
            let r = dp
                .run(&Frame::tcp(client6, vip6, flags).build(), Ingress::Client)
                .expect("run");
            assert_eq!(r.verdict, XDP_REDIRECT);
        }
        let v4 = dp.flow_entry((client.into(), vip.into(), 6));
        let v6 = dp.flow_entry((client6, vip6, 6));
        assert!(v4.is_some() && v6.is_some(), "both flows tracked");
    };
    // A fresh data plane makes its flow tables with the flags.
    let lab = PacketLab::new("lbt-pkt-ftalign");
    lab.run(serve);
    for name in [MAP_FLOWS, MAP_FLOWS6] {
        assert_eq!(
            pinned_flags(&lab.dir, name),
            lb_common::FLOW_TABLE_FLAGS,
            "{name}"
        );
    }
    drop(lab);
    // Tables an agent made before the flags, with their layout, are kept and used.
    let lab = PacketLab::new("lbt-pkt-ftalign");
    std::fs::create_dir_all(&lab.dir).expect("pin directory");
    let buckets = lb_common::flow_table::flow_buckets(TableConfig::default().flows);
    for (name, value) in [
        (MAP_FLOWS, size_of::<FlowBucket<Flow>>()),
        (MAP_FLOWS6, size_of::<FlowBucket<Flow6>>()),
    ] {
        // BPF_MAP_TYPE_ARRAY, no flags.
        let def = aya_obj::Map::new_from_params(2, 4, value as u32, buckets, 0);
        let map = MapData::create(def, name, None).expect("an older flow table");
        map.pin(lab.dir.join(name)).expect("pinned");
    }
    lab.run(serve);
    for name in [MAP_FLOWS, MAP_FLOWS6] {
        assert_eq!(
            pinned_flags(&lab.dir, name),
            0,
            "{name}: the older table stays"
        );
    }
}
