//! Two flows from one client address and port to two VIPs that share a backend. The backend sees
//! only (client, port, itself, its port): given both, it would take the second SYN for the first
//! connection, and the first would break without a trace. A new flow whose backend already
//! carries such a flow that is not over (reset, or FIN from both sides) goes to the next backend
//! of its table; a TCP flow with no other backend is dropped (the client retries) and the first
//! connection goes on.
use lbctl::{
    dataplane::Maps,
    model::{Proto, Vip},
};
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{
        Dataplane, Ingress, PacketLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, app, apps, running,
        stat_delta,
    },
    privileged_or_skip,
};
use std::net::{Ipv4Addr, SocketAddrV4};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

#[test]
fn a_second_flow_from_one_client_port_never_takes_a_live_ones_backend() {
    if !privileged_or_skip("a_second_flow_from_one_client_port_never_takes_a_live_ones_backend") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-clash");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        let pair = [
            running(sa("198.18.1.2:31000")),
            running(sa("198.18.1.3:31000")),
        ];
        let solo = [running(sa("198.18.1.4:31000"))];
        dp.apply(&apps(vec![
            app(
                "/web",
                "tcp",
                &[("VIP_0", "172.16.0.2:8080"), ("VIP_1", "172.16.0.3:8080")],
                &pair,
            ),
            app(
                "/solo",
                "tcp",
                &[("VIP_0", "172.16.0.4:8080"), ("VIP_1", "172.16.0.5:8080")],
                &solo,
            ),
        ]));
        let (a, b) = (sa("172.16.0.2:8080"), sa("172.16.0.3:8080"));
        let other = |x: SocketAddrV4| {
            if x == sa("198.18.1.2:31000") {
                sa("198.18.1.3:31000")
            } else {
                sa("198.18.1.2:31000")
            }
        };
        // Client ports whose flows to both VIPs hash to the same backend (the tables decide).
        let clashing: Vec<SocketAddrV4> = (40000..41000)
            .map(|p| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), p))
            .filter(|c| dp.pick(a, 6, *c) == dp.pick(b, 6, *c))
            .take(4)
            .collect();
        assert_eq!(clashing.len(), 4, "two tables of two backends agree often");

        // A live connection: the second flow goes to the other backend, both get their replies
        // from their own VIP.
        let c = clashing[0];
        let x = dp.sent_to(c, a, TCP_SYN);
        assert_eq!(Some(x), dp.pick(a, 6, c));
        let before = dp.stats();
        let y = dp.sent_to(c, b, TCP_SYN);
        assert_eq!(y, other(x), "moved to the other backend");
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            vec![("new_flow", 1), ("redirect", 1), ("port_clash_moved", 1)]
        );
        assert_eq!(dp.seen_from(x, c, TCP_ACK), a);
        assert_eq!(dp.seen_from(y, c, TCP_ACK), b);
        // Both stay where they are.
        assert_eq!(dp.sent_to(c, a, TCP_ACK), x);
        assert_eq!(dp.sent_to(c, b, TCP_ACK), y);

        // Half closed (the client's FIN only) is not over: still moved.
        let c = clashing[1];
        let x = dp.sent_to(c, a, TCP_SYN);
        dp.sent_to(c, a, TCP_FIN | TCP_ACK);
        assert_eq!(dp.sent_to(c, b, TCP_SYN), other(x));
        assert_eq!(
            dp.seen_from(x, c, TCP_ACK),
            a,
            "the half-closed one still replies"
        );

        // FIN from both sides: over, and the new flow takes the backend its table names.
        let c = clashing[2];
        let x = dp.sent_to(c, a, TCP_SYN);
        dp.sent_to(c, a, TCP_FIN | TCP_ACK);
        dp.seen_from(x, c, TCP_FIN | TCP_ACK);
        let before = dp.stats();
        assert_eq!(dp.sent_to(c, b, TCP_SYN), x);
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            vec![("new_flow", 1), ("redirect", 1)]
        );
        assert_eq!(
            dp.seen_from(x, c, TCP_ACK),
            b,
            "the entry is the new flow's"
        );
        // The client reuses the port for a new connection to the first VIP: a SYN is picked
        // afresh even on a tracked 5-tuple, and does not take the backend the live one holds.
        assert_eq!(dp.sent_to(c, a, TCP_SYN), other(x));
        assert_eq!(dp.seen_from(x, c, TCP_ACK), b);
        assert_eq!(dp.seen_from(other(x), c, TCP_ACK), a);

        // Reset by the backend: over too.
        let c = clashing[3];
        let x = dp.sent_to(c, a, TCP_SYN);
        dp.seen_from(x, c, TCP_RST);
        assert_eq!(dp.sent_to(c, b, TCP_SYN), x);

        // One backend: the second flow has nowhere else to go and is dropped, counted; the
        // first goes on. Once that one is over, the second gets through.
        let (s1, s2) = (sa("172.16.0.4:8080"), sa("172.16.0.5:8080"));
        let c = sa("198.18.0.2:42000");
        let only = dp.sent_to(c, s1, TCP_SYN);
        let before = dp.stats();
        let r = dp
            .run(&Frame::tcp(c, s2, TCP_SYN).build(), Ingress::Client)
            .expect("run");
        assert_eq!(r.verdict, XDP_DROP);
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            vec![("drop_port_clash", 1)]
        );
        assert_eq!(dp.sent_to(c, s1, TCP_ACK), only);
        assert_eq!(dp.seen_from(only, c, TCP_ACK), s1);
        dp.sent_to(c, s1, TCP_RST);
        assert_eq!(dp.sent_to(c, s2, TCP_SYN), only);
        assert_eq!(dp.seen_from(only, c, TCP_ACK), s2);

        let stats = Maps::open(&dir).expect("maps").stats().expect("stats");
        let count = |name: &str| {
            stats
                .iter()
                .find(|(s, _)| s.name() == name)
                .map(|(_, v)| *v)
        };
        assert_eq!(count("port_clash_moved"), Some(3));
        assert_eq!(count("drop_port_clash"), Some(1));
    });
}

/// The other backends a new flow from `c` to `vip` would try after its own, in the order of the
/// next slots of its table (`CLASH_SLOTS` in all, as the kernel reads them).
fn clash_order(dp: &Dataplane, vip: SocketAddrV4, c: SocketAddrV4) -> Vec<SocketAddrV4> {
    let key = Vip {
        addr: vip.into(),
        proto: Proto::Tcp,
    };
    let mut order: Vec<SocketAddrV4> = Vec::new();
    for step in 0..CLASH_SLOTS {
        let b = dp.maps().pick_after(&key, c, step).expect("maps");
        let Some(std::net::SocketAddr::V4(b)) = b else {
            panic!("{vip}: no backend in slot {step} after {c}'s");
        };
        if !order.contains(&b) {
            order.push(b);
        }
    }
    order
}

/// Slots a new flow looks at for another backend (`lb_ebpf`'s `nat::CLASH_SLOTS`).
const CLASH_SLOTS: u32 = 8;

/// A client port already holding two of three backends through two VIPs: a flow to the third
/// VIP whose slots name those two first still gets the third backend (the third try).
#[test]
fn a_flow_whose_first_two_backends_are_taken_gets_the_third() {
    if !privileged_or_skip("a_flow_whose_first_two_backends_are_taken_gets_the_third") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-clash3");
    lab.run(move |dp| {
        let trio = [
            running(sa("198.18.1.2:31000")),
            running(sa("198.18.1.3:31000")),
            running(sa("198.18.1.4:31000")),
        ];
        dp.apply(&apps(vec![app(
            "/trio",
            "tcp",
            &[
                ("VIP_0", "172.16.0.2:8080"),
                ("VIP_1", "172.16.0.3:8080"),
                ("VIP_2", "172.16.0.4:8080"),
            ],
            &trio,
        )]));
        let (a, b, third) = (
            sa("172.16.0.2:8080"),
            sa("172.16.0.3:8080"),
            sa("172.16.0.4:8080"),
        );
        let mut seen = 0;
        for port in 40000..42000 {
            let c = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), port);
            let order = clash_order(dp, third, c);
            if order.len() < 3 {
                continue;
            }
            // Live connections to the first two VIPs: on two different backends (the second
            // moved when its table names the first's).
            let x = dp.sent_to(c, a, TCP_SYN);
            let y = dp.sent_to(c, b, TCP_SYN);
            assert_ne!(x, y, "{c}");
            if !(order[..2].contains(&x) && order[..2].contains(&y)) {
                continue;
            }
            let before = dp.stats();
            assert_eq!(
                dp.sent_to(c, third, TCP_SYN),
                order[2],
                "{c}: the third try"
            );
            assert_eq!(
                stat_delta(&before, &dp.stats()),
                vec![("new_flow", 1), ("redirect", 1), ("port_clash_moved", 1)]
            );
            // All three stay where they are.
            assert_eq!(dp.sent_to(c, a, TCP_ACK), x);
            assert_eq!(dp.sent_to(c, b, TCP_ACK), y);
            assert_eq!(dp.sent_to(c, third, TCP_ACK), order[2]);
            seen += 1;
            if seen == 3 {
                break;
            }
        }
        assert_eq!(seen, 3, "client ports whose first two tries clash");
    });
}

#[test]
fn udp_flows_from_one_port_move_and_never_drop() {
    if !privileged_or_skip("udp_flows_from_one_port_move_and_never_drop") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-clash-udp");
    lab.run(move |dp| {
        let solo = [running(sa("198.18.1.4:31000"))];
        dp.apply(&apps(vec![app(
            "/dns",
            "udp",
            &[("VIP_0", "172.16.0.4:53"), ("VIP_1", "172.16.0.5:53")],
            &solo,
        )]));
        let c = sa("198.18.0.2:43000");
        for vip in [sa("172.16.0.4:53"), sa("172.16.0.5:53")] {
            let r = dp
                .run(&Frame::udp(c, vip, true).build(), Ingress::Client)
                .expect("run");
            assert_eq!(
                r.verdict, XDP_REDIRECT,
                "{vip}: UDP is never dropped for a clash"
            );
        }
        // The later flow took the entry: the backend's datagrams now come from its VIP.
        let r = dp
            .run(
                &Frame::udp(sa("198.18.1.4:31000"), c, true).build(),
                Ingress::Backend,
            )
            .expect("run");
        assert_eq!(&r.out[26..30], &[172, 16, 0, 5]);
    });
}

/// A client that reaches a backend directly (the socket-level path of `--local`, or a route
/// around the VIP) from a port it used before for a VIP flow through that backend: once that
/// flow is over, the backend's SYN-ACK and everything after it pass untouched, not rewritten to
/// come from the VIP (which the client would refuse).
#[test]
fn a_direct_connection_on_a_finished_flows_addresses_is_left_alone() {
    if !privileged_or_skip("a_direct_connection_on_a_finished_flows_addresses_is_left_alone") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-direct");
    lab.run(move |dp| {
        let tasks = [running(sa("198.18.1.2:31000"))];
        dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.2:8080")],
            &tasks,
        )]));
        let (vip, c) = (sa("172.16.0.2:8080"), sa("198.18.0.2:44000"));
        let x = dp.sent_to(c, vip, TCP_SYN);
        assert_eq!(dp.seen_from(x, c, TCP_SYN | TCP_ACK), vip);
        // While the VIP flow lives, even a SYN from the backend is its.
        assert_eq!(dp.seen_from(x, c, TCP_SYN | TCP_ACK), vip);
        dp.sent_to(c, vip, TCP_FIN | TCP_ACK);
        assert_eq!(dp.seen_from(x, c, TCP_FIN | TCP_ACK), vip);
        // Over. The client connects to the backend itself from the same port: the SYN is not
        // for a VIP (passed); the backend's SYN-ACK and what follows are not replies any more.
        for flags in [TCP_SYN | TCP_ACK, TCP_ACK] {
            let input = Frame::tcp(x, c, flags).build();
            let before = dp.stats();
            let r = dp.run(&input, Ingress::Backend).expect("run");
            assert_eq!((r.verdict, &r.out), (XDP_PASS, &input), "flags {flags:#x}");
            assert_eq!(stat_delta(&before, &dp.stats()), vec![("pass_not_ours", 1)]);
        }
    });
}

/// A SYN on a tracked 5-tuple: a duplicate of a live connection's keeps its backend even after
/// the table changed; once the connection is over, the port's next connection is picked afresh.
#[test]
fn a_live_connections_duplicate_syn_keeps_its_backend() {
    if !privileged_or_skip("a_live_connections_duplicate_syn_keeps_its_backend") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-dupsyn");
    lab.run(move |dp| {
        let vip = sa("172.16.0.2:8080");
        let x = sa("198.18.1.2:31000");
        let all: Vec<SocketAddrV4> = (2..6)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, i), 31000))
            .collect();
        let doc = |tasks: &[SocketAddrV4]| {
            let tasks: Vec<_> = tasks.iter().map(|t| running(*t)).collect();
            apps(vec![app(
                "/web",
                "tcp",
                &[("VIP_0", "172.16.0.2:8080")],
                &tasks,
            )])
        };
        dp.apply(&doc(&all));
        // A client port the four-backend table does not send to X.
        let c = (40000..41000)
            .map(|p| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), p))
            .find(|c| dp.pick(vip, 6, *c) != Some(x))
            .expect("some port goes elsewhere");
        let elsewhere = dp.pick(vip, 6, c).expect("pick");
        dp.apply(&doc(&[x]));
        assert_eq!(dp.sent_to(c, vip, TCP_SYN), x);
        assert_eq!(dp.seen_from(x, c, TCP_SYN | TCP_ACK), vip);
        dp.apply(&doc(&all));
        // A duplicate of the SYN arrives late: the connection stays where it is.
        assert_eq!(dp.sent_to(c, vip, TCP_SYN), x);
        assert_eq!(dp.sent_to(c, vip, TCP_ACK), x);
        // Over; the port's next connection follows the table.
        dp.sent_to(c, vip, TCP_FIN | TCP_ACK);
        dp.seen_from(x, c, TCP_FIN | TCP_ACK);
        assert_eq!(dp.sent_to(c, vip, TCP_SYN), elsewhere);
        assert_eq!(dp.seen_from(elsewhere, c, TCP_SYN | TCP_ACK), vip);
    });
}
