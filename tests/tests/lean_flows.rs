//! Lean flows: a flow whose backend serves its VIP and no other VIP of its protocol keeps one
//! entry (client -> VIP); the backend's replies find it through the backend's record of its VIPs
//! (`lb_bevip_v1`), and the connection's FIN and RST are noted in that entry. A backend that comes
//! to serve a second VIP keeps the replies of its lean flows, and a flow to that second VIP from
//! the same client port never takes the backend a live lean flow holds.
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    BACKEND_LIVE, Backend, BackendKey, BackendKey6, BackendVips, BackendVips6, END_BACKEND_FIN,
    END_CLIENT_FIN, MAP_BACKEND_VIPS, MAP_BACKEND_VIPS6, MAP_BACKENDS, RECORD_COPY_MAX_AGE_NS,
};
use lbctl::dataplane::{TableConfig, Writer};
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{
        Dataplane, Ingress, PacketLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, app, apps, octets_words,
        pinned_array, running, stat_delta,
    },
    privileged_or_skip,
};
use std::{
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP: u8 = 6;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

fn tuple(a: SocketAddrV4, b: SocketAddrV4) -> (SocketAddr, SocketAddr, u8) {
    (a.into(), b.into(), TCP)
}

/// The pinned `lb_bevip_v1` of the data plane in `dir`.
fn records(dir: &std::path::Path) -> HashMap<MapData, BackendKey, BackendVips> {
    let data = MapData::from_pin(dir.join(MAP_BACKEND_VIPS)).expect("pin");
    HashMap::try_from(Map::from_map_data(data).expect("map")).expect("hash map")
}

/// The key of backend `a`'s record in `lb_bevip_v1`.
fn record_key(a: SocketAddrV4) -> BackendKey {
    BackendKey {
        addr: u32::from(*a.ip()).to_be(),
        port: a.port().to_be(),
        _pad: 0,
    }
}

#[test]
fn a_flow_through_a_backend_of_one_vip_keeps_one_entry() {
    if !privileged_or_skip("a_flow_through_a_backend_of_one_vip_keeps_one_entry") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-lean1");
    lab.run(move |dp| {
        let tasks = [
            running(sa("198.18.1.2:31000")),
            running(sa("198.18.1.3:31000")),
        ];
        dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.2:8080")],
            &tasks,
        )]));
        let (vip, c) = (sa("172.16.0.2:8080"), sa("198.18.0.2:45000"));
        let x = dp.sent_to(c, vip, TCP_SYN);
        let entry = dp.flow_entry(tuple(c, vip)).expect("the flow's entry");
        assert_eq!(entry.ends(), 0);
        assert_eq!(dp.reverse_vip(tuple(x, c)), None, "no reverse entry");
        // Replies come from the VIP all the same, the handshake's and the data's.
        assert_eq!(dp.seen_from(x, c, TCP_SYN | TCP_ACK), vip);
        assert_eq!(dp.sent_to(c, vip, TCP_ACK), x);
        assert_eq!(dp.seen_from(x, c, TCP_ACK), vip);
        // The client's FIN, then the backend's, are noted in the flow's entry; the half-closed
        // connection still gets its replies.
        assert_eq!(dp.sent_to(c, vip, TCP_FIN | TCP_ACK), x);
        let ends = |dp: &lbtest::pktlab::Dataplane| {
            dp.flow_entry(tuple(c, vip))
                .expect("the flow's entry")
                .ends()
        };
        assert_eq!(ends(dp), END_CLIENT_FIN);
        assert_eq!(dp.seen_from(x, c, TCP_ACK), vip);
        assert_eq!(dp.sent_to(c, vip, TCP_ACK), x, "a segment after the FIN");
        assert_eq!(ends(dp), END_CLIENT_FIN, "kept by the segments after it");
        assert_eq!(dp.seen_from(x, c, TCP_FIN | TCP_ACK), vip);
        assert_eq!(ends(dp), END_CLIENT_FIN | END_BACKEND_FIN);
        assert_eq!(dp.reverse_vip(tuple(x, c)), None, "still no reverse entry");
        // Over: the port's next connection is picked afresh, and starts with no ends.
        let again = dp.sent_to(c, vip, TCP_SYN);
        assert_eq!(Some(again), dp.pick(vip, TCP, c));
        assert_eq!(ends(dp), 0);

        // A backend's reply whose flow has no entry (evicted, or never through the VIP) is not
        // a reply: it passes as it came.
        let stranger = sa("198.18.0.9:45001");
        let input = Frame::tcp(x, stranger, TCP_ACK).build();
        let before = dp.stats();
        let r = dp.run(&input, Ingress::Backend).expect("run");
        assert_eq!(r.out, input);
        assert_eq!(stat_delta(&before, &dp.stats()), vec![("pass_not_ours", 1)]);
    });
}

#[test]
fn a_backend_that_comes_to_serve_a_second_vip_keeps_its_lean_flows() {
    if !privileged_or_skip("a_backend_that_comes_to_serve_a_second_vip_keeps_its_lean_flows") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-lean2");
    lab.run(move |dp| {
        let b = sa("198.18.1.2:31000");
        let (v1, v2) = (sa("172.16.0.2:8080"), sa("172.16.0.3:8080"));
        dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.2:8080")],
            &[running(b)],
        )]));
        let c = sa("198.18.0.2:46000");
        assert_eq!(dp.sent_to(c, v1, TCP_SYN), b);
        assert_eq!(dp.reverse_vip(tuple(b, c)), None, "lean");
        // The same port now serves a second VIP: the backend's record names both before any
        // packet can reach it through the second.
        let applied = dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.2:8080"), ("VIP_1", "172.16.0.3:8080")],
            &[running(b)],
        )]));
        assert_eq!(applied.added, [format!("tcp {v2}")], "{applied:?}");
        // It served one VIP alone: lean flows may hold it, new flows look for them.
        let record = dp.backend_vips(b.into()).expect("the backend's record");
        assert_eq!((record.served, record.no_lean), (2, false), "{record:?}");
        // The lean flow's replies still come from its VIP.
        assert_eq!(dp.seen_from(b, c, TCP_ACK), v1);
        // A flow from the same client port to the second VIP would be the same connection to
        // the backend: dropped while the first lives (its only backend is taken).
        let before = dp.stats();
        let r = dp
            .run(&Frame::tcp(c, v2, TCP_SYN).build(), Ingress::Client)
            .expect("run");
        assert_eq!(r.verdict, XDP_DROP);
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            vec![("drop_port_clash", 1)]
        );
        assert_eq!(
            dp.reverse_vip(tuple(b, c)),
            None,
            "the refused flow left nothing"
        );
        assert_eq!(dp.seen_from(b, c, TCP_ACK), v1);
        // A new flow through the shared backend keeps a reverse entry.
        let d = sa("198.18.0.2:46001");
        assert_eq!(dp.sent_to(d, v2, TCP_SYN), b);
        assert_eq!(dp.reverse_vip(tuple(b, d)), Some(v2.into()));
        assert_eq!(dp.seen_from(b, d, TCP_ACK), v2);
        // The first connection is reset: the second VIP's flow from its port gets through.
        assert_eq!(dp.sent_to(c, v1, TCP_RST | TCP_ACK), b);
        assert_eq!(dp.sent_to(c, v2, TCP_SYN), b);
        assert_eq!(dp.seen_from(b, c, TCP_ACK), v2);
        // A backend that comes with two VIPs never served one alone: its record says that no
        // lean flow holds it, and its flows' reverse entries alone refuse the clash.
        let b2 = sa("198.18.1.3:31000");
        let (v3, v4) = (sa("172.16.0.4:8080"), sa("172.16.0.5:8080"));
        let applied = dp.apply(&apps(vec![
            app(
                "/web",
                "tcp",
                &[("VIP_0", "172.16.0.2:8080"), ("VIP_1", "172.16.0.3:8080")],
                &[running(b)],
            ),
            app(
                "/api",
                "tcp",
                &[("VIP_0", "172.16.0.4:8080"), ("VIP_1", "172.16.0.5:8080")],
                &[running(b2)],
            ),
        ]));
        assert_eq!(applied.added.len(), 2, "{applied:?}");
        let record = dp
            .backend_vips(b2.into())
            .expect("the second backend's record");
        assert_eq!((record.served, record.no_lean), (2, true), "{record:?}");
        let e = sa("198.18.0.2:46002");
        assert_eq!(dp.sent_to(e, v3, TCP_SYN), b2);
        assert_eq!(dp.reverse_vip(tuple(b2, e)), Some(v3.into()));
        let before = dp.stats();
        let r = dp
            .run(&Frame::tcp(e, v4, TCP_SYN).build(), Ingress::Client)
            .expect("run");
        assert_eq!(r.verdict, XDP_DROP);
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            vec![("drop_port_clash", 1)]
        );
        assert_eq!(dp.seen_from(b2, e, TCP_ACK), v3);
    });
}

#[test]
fn the_load_adds_every_memberships_vip_and_a_stale_one_goes_after_the_grace() {
    if !privileged_or_skip(
        "the_load_adds_every_memberships_vip_and_a_stale_one_goes_after_the_grace",
    ) {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-lean3");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        let b = sa("198.18.1.2:31000");
        let doc = apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.2:8080")],
            &[running(b)],
        )]);
        dp.apply(&doc);
        // An older agent's writes (it knows no record): the backend's entry is gone, and one of
        // a backend that serves nothing is there.
        let mut rec = records(&dir);
        let key = record_key;
        let held = rec.get(&key(b), 0).expect("the backend's record");
        assert_eq!((held.served(), held.vips[0].port), (1, 8080u16.to_be()));
        rec.remove(&key(b)).expect("remove");
        let stale = sa("198.18.1.9:31000");
        rec.insert(key(stale), held, 0).expect("insert");
        // The load puts the membership's VIP back before any program runs.
        let _again = lbctl::dataplane::load_with(&dir, &TableConfig::default()).expect("load");
        // Put back without `BACKEND_NO_LEAN`: the programs may have served it meanwhile.
        let back = BackendVips { count: 1, ..held };
        assert_eq!(rec.get(&key(b), 0).ok(), Some(back), "put back");
        // The stale one is a backend that left as far as the writer knows: kept for the grace,
        // then taken out by the next apply.
        *dp.writer() = Writer::open(&dir).expect("writer");
        dp.apply(&doc);
        assert!(rec.get(&key(stale), 0).is_ok(), "kept within the grace");
        dp.writer().set_record_grace(std::time::Duration::ZERO);
        dp.apply(&doc);
        assert!(rec.get(&key(stale), 0).is_err(), "gone after it");
        assert_eq!(rec.get(&key(b), 0).ok(), Some(back));
    });
}

/// A CPU's copy of what a backend's record says a reply needs (its one VIP of the protocol, its
/// id) answers the backend's replies without the record's lookup, for at most
/// `RECORD_COPY_MAX_AGE_NS` after it was taken and only while its id is live. The record is
/// taken out behind the writer's back here, so that what answers shows: the copy, or nothing.
#[test]
fn a_cpus_copy_of_a_record_serves_only_while_young_and_its_id_live() {
    if !privileged_or_skip("a_cpus_copy_of_a_record_serves_only_while_young_and_its_id_live") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-lean4");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        // The copy is per CPU: every packet of this test runs on one.
        lbtest::pin_thread_to(0);
        let b = sa("198.18.1.2:31000");
        let (vip, c) = (sa("172.16.0.2:8080"), sa("198.18.0.2:47000"));
        dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.2:8080")],
            &[running(b)],
        )]));
        assert_eq!(dp.sent_to(c, vip, TCP_SYN), b);
        let id = dp.backend_vips(b.into()).expect("the backend's record").id;
        // The first reply reads the record and copies it.
        assert_eq!(dp.seen_from(b, c, TCP_SYN | TCP_ACK), vip);
        let taken = Instant::now();
        records(&dir)
            .remove(&record_key(b))
            .expect("remove the record");
        let passed = |dp: &mut lbtest::pktlab::Dataplane, what: &str| {
            let before = dp.stats();
            let r = dp
                .run(&Frame::tcp(b, c, TCP_ACK).build(), Ingress::Backend)
                .expect("run");
            assert_eq!(r.verdict, XDP_PASS, "{what}");
            assert_eq!(
                stat_delta(&before, &dp.stats()),
                vec![("pass_not_ours", 1)],
                "{what}"
            );
        };
        // Without its record the reply is not known as one, unless the copy answers: it does.
        assert_eq!(dp.seen_from(b, c, TCP_ACK), vip, "the copy answers");
        // Its id no longer a live backend of that address: the copy is not used.
        let mut slots = pinned_array::<Backend>(&dir, MAP_BACKENDS);
        let live = slots.get(&id, 0).expect("the backend's slot");
        assert_ne!(live.flags & BACKEND_LIVE, 0);
        let dead = Backend {
            flags: live.flags & !BACKEND_LIVE,
            ..live
        };
        slots.set(id, dead, 0).expect("the slot not live");
        passed(dp, "the copy's id is not live");
        slots.set(id, live, 0).expect("the slot live again");
        assert_eq!(dp.seen_from(b, c, TCP_ACK), vip, "live again");
        assert!(
            taken.elapsed() < Duration::from_millis(500),
            "the steps above took {:?}: too close to the copy's bound to tell",
            taken.elapsed()
        );
        // Past the bound (and a tick of the programs' clock) the copy is not used.
        let bound = Duration::from_nanos(RECORD_COPY_MAX_AGE_NS);
        std::thread::sleep((bound + Duration::from_millis(100)).saturating_sub(taken.elapsed()));
        passed(dp, "the copy is older than its bound");
    });
}

/// Takes backend `b`'s record out of `lb_bevip_v1` / `lb_bevip6_v1` behind the writer's back.
fn forget_record(dir: &std::path::Path, b: SocketAddr) {
    let open = |name| Map::from_map_data(MapData::from_pin(dir.join(name)).expect("pin"));
    match b {
        SocketAddr::V4(b) => {
            let mut m: HashMap<_, BackendKey, BackendVips> =
                HashMap::try_from(open(MAP_BACKEND_VIPS).expect("map")).expect("hash map");
            m.remove(&record_key(b)).expect("remove the record");
        }
        SocketAddr::V6(b) => {
            let mut m: HashMap<_, BackendKey6, BackendVips6> =
                HashMap::try_from(open(MAP_BACKEND_VIPS6).expect("map")).expect("hash map");
            let key = BackendKey6 {
                addr: octets_words(b.ip().octets()),
                port: b.port().to_be(),
                _pad: 0,
            };
            m.remove(&key).expect("remove the record");
        }
    }
}

/// Sends a TCP segment from client `c` to `vip`, which must be redirected.
fn through(dp: &mut Dataplane, c: SocketAddr, vip: SocketAddr, flags: u8) {
    let r = dp
        .run(&Frame::tcp(c, vip, flags).build(), Ingress::Client)
        .expect("run");
    assert_eq!(r.verdict, XDP_REDIRECT, "{c} -> {vip}");
}

/// A tracked flow's check (here every packet after the client's FIN) asks whether its backend
/// still serves its VIP and no other: first this CPU's copy of the backend's record, which the
/// check takes from the record when there is none, so for at most `RECORD_COPY_MAX_AGE_NS`
/// after the record changed, the copy answers. The record is taken out behind the writer's back
/// here, so that what answers shows: while the copy is young the flow stays lean (no reverse
/// entry); once it is too old, the backend without a record is not the VIP's alone, and the
/// check takes the flow's reverse entry. Both families, each through its own global (`lb_copy4`,
/// `lb_copy6`).
#[test]
fn a_flows_check_asks_the_cpus_copy_of_the_record_which_it_takes() {
    if !privileged_or_skip("a_flows_check_asks_the_cpus_copy_of_the_record_which_it_takes") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-lean6");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        // The copy is per CPU: every packet of this test runs on one.
        lbtest::pin_thread_to(0);
        let nets: [(SocketAddr, SocketAddr, SocketAddr); 2] = [
            (
                sa("198.18.1.2:31000").into(),
                sa("172.16.0.2:8080").into(),
                sa("198.18.0.2:47100").into(),
            ),
            (
                "[2001:2:0:1::2]:31000".parse().expect("backend"),
                "[fd00::2]:8080".parse().expect("VIP"),
                "[2001:2::2]:47100".parse().expect("client"),
            ),
        ];
        dp.apply(&apps(vec![
            app(
                "/web",
                "tcp",
                &[("VIP_0", "172.16.0.2:8080")],
                &[running(nets[0].0)],
            ),
            app(
                "/web6",
                "tcp",
                &[("VIP_0", "[fd00::2]:8080")],
                &[running(nets[1].0)],
            ),
        ]));
        let taken = Instant::now();
        for (b, vip, c) in nets {
            let (flow, reply) = ((c, vip, TCP), (b, c, TCP));
            through(dp, c, vip, TCP_SYN);
            // The FIN is checked: no copy yet, the record says lean, and the check copies it.
            through(dp, c, vip, TCP_FIN | TCP_ACK);
            let entry = dp.flow_entry(flow).expect("the flow's entry");
            assert_eq!(entry.ends(), END_CLIENT_FIN, "{vip}: noted in the entry");
            assert_eq!(dp.reverse_vip(reply), None, "{vip}: lean, from the record");
            forget_record(&dir, b);
            // Without the record, the copy still says lean.
            through(dp, c, vip, TCP_ACK);
            assert_eq!(dp.reverse_vip(reply), None, "{vip}: lean, from the copy");
        }
        assert!(
            taken.elapsed() < Duration::from_millis(500),
            "the steps above took {:?}: too close to the copy's bound to tell",
            taken.elapsed()
        );
        // Past the bound (and a tick of the programs' clock) the copy is not used.
        let bound = Duration::from_nanos(RECORD_COPY_MAX_AGE_NS);
        std::thread::sleep((bound + Duration::from_millis(100)).saturating_sub(taken.elapsed()));
        for (b, vip, c) in nets {
            through(dp, c, vip, TCP_ACK);
            assert_eq!(
                dp.reverse_vip((b, c, TCP)),
                Some(vip),
                "{vip}: the copy too old, the record gone: the check takes a reverse entry"
            );
        }
    });
}

/// A client port whose connection through one VIP of a backend is over (reset) opens a new one
/// through the backend's other VIP, after the backend stopped serving the first (its record
/// names only the second, a lean flow): the finished connection's reverse entry, of the other
/// VIP, neither answers the new connection's replies nor ends it. Within the second after the
/// backend's replies were matched while it served both, so this CPU's copy of its record still
/// says it serves several: that copy answers only from a reverse entry whose connection is live.
#[test]
fn a_finished_connection_through_another_vip_leaves_a_new_lean_one_alone() {
    if !privileged_or_skip("a_finished_connection_through_another_vip_leaves_a_new_lean_one_alone")
    {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-lean5");
    lab.run(move |dp| {
        // The copy is per CPU: every packet of this test runs on one.
        lbtest::pin_thread_to(0);
        // A VIP the backend leaves is out of its record at the next apply.
        dp.writer().set_record_grace(Duration::ZERO);
        let b = sa("198.18.1.2:31000");
        let (v1, v2) = (sa("172.16.0.2:8080"), sa("172.16.0.3:8080"));
        let both = [("VIP_0", "172.16.0.2:8080"), ("VIP_1", "172.16.0.3:8080")];
        dp.apply(&apps(vec![app("/web", "tcp", &both, &[running(b)])]));
        let c = sa("198.18.0.2:48000");
        assert_eq!(dp.sent_to(c, v1, TCP_SYN), b);
        assert_eq!(dp.reverse_vip(tuple(b, c)), Some(v1.into()));
        // The reply reads the record (two VIPs) and this CPU copies that.
        assert_eq!(dp.seen_from(b, c, TCP_SYN | TCP_ACK), v1);
        let copied = Instant::now();
        assert_eq!(dp.seen_from(b, c, TCP_ACK), v1, "from the copy");
        assert_eq!(dp.sent_to(c, v1, TCP_RST | TCP_ACK), b);
        let second = [("VIP_1", "172.16.0.3:8080")];
        dp.apply(&apps(vec![app("/web", "tcp", &second, &[running(b)])]));
        dp.apply(&apps(vec![app("/web", "tcp", &second, &[running(b)])]));
        let record = dp.backend_vips(b.into()).expect("the backend's record");
        assert_eq!(record.served, 1, "{record:?}");
        // The same client port through the second VIP: a lean flow.
        assert_eq!(dp.sent_to(c, v2, TCP_SYN), b);
        assert_eq!(dp.seen_from(b, c, TCP_SYN | TCP_ACK), v2);
        assert_eq!(dp.seen_from(b, c, TCP_ACK), v2);
        assert_eq!(dp.sent_to(c, v2, TCP_ACK), b);
        assert!(
            copied.elapsed() < Duration::from_millis(500),
            "the steps above took {:?}: too close to the copy's bound to tell",
            copied.elapsed()
        );
    });
}
