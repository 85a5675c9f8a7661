//! Flows the flow table lost while they were alive are counted: a packet of an established TCP flow (no
//! SYN) to a VIP that finds no flow entry. It is re-hashed to the same backend while the service's
//! table is unchanged, so the connection survives; the counter says it happened.
use lb_common::Stat;
use lbctl::dataplane::Maps;
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{Ingress, PacketLab, XDP_REDIRECT, app, apps, each_once, running, stat_delta},
    privileged_or_skip,
};
use std::net::SocketAddrV4;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

#[test]
fn established_flows_without_an_entry_are_counted() {
    if !privileged_or_skip("established_flows_without_an_entry_are_counted") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-lost");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        let tasks = [
            running(sa("198.18.1.2:31000")),
            running(sa("198.18.1.3:31000")),
        ];
        dp.apply(&apps(vec![app(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.1:8080")],
            &tasks,
        )]));
        let maps = Maps::open(&dir).expect("maps");
        let vip = sa("172.16.0.1:8080");
        let lost = || maps.flows_lost().expect("lost");

        // A new connection (SYN) is not a lost flow.
        let a = sa("198.18.0.2:40001");
        let before = dp.stats();
        assert_eq!(
            dp.run(&Frame::tcp(a, vip, TCP_SYN).build(), Ingress::Client)
                .expect("run")
                .verdict,
            XDP_REDIRECT
        );
        assert_eq!(lost(), 0);
        // Its next segment is tracked: not lost either.
        dp.run(&Frame::tcp(a, vip, TCP_ACK).build(), Ingress::Client)
            .expect("run");
        assert_eq!(lost(), 0);
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            vec![("new_flow", 1), ("forwarded", 1), ("redirect", 2)]
        );

        // An ACK of a connection the table does not know: counted, and sent where the table says,
        // the same backend a SYN of that connection would have got.
        let b = sa("198.18.0.2:40002");
        // The flow's backend, stated literally (tests/tests/known_answers.rs pins the hash, the
        // tables and their sizes); the reference agrees with it.
        let want = sa("198.18.1.2:31000");
        assert_eq!(dp.pick(vip, 6, b), Some(want));
        let before = dp.stats();
        let r = dp
            .run(&Frame::tcp(b, vip, TCP_ACK).build(), Ingress::Client)
            .expect("run");
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(
            &r.out[30..34],
            &want.ip().octets(),
            "re-hashed to the backend the table names"
        );
        assert_eq!(lost(), 1);
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            each_once(&[Stat::NewFlow, Stat::Redirect])
        );
        // UDP has no connection to lose.
        dp.run(
            &Frame::udp(sa("198.18.0.2:40003"), sa("172.16.0.1:8080"), true).build(),
            Ingress::Client,
        )
        .expect("run");
        assert_eq!(lost(), 1);
    });
}
