//! Fragmented IPv4 datagrams through a VIP, both ways: the first fragment is translated like any
//! packet and remembered; the later ones (no ports) follow it. Expected frames are built
//! independently from the whole datagram as it must arrive.
use lb_common::Stat;
use lbtest::{
    packet::{Frame, IP_MF},
    pktlab::{Ingress, PacketLab, XDP_PASS, app, apps, departure, each_once, running, stat_delta},
    privileged_or_skip,
};
use std::net::SocketAddrV4;

const PROTO_UDP: u8 = 17;
/// L4 bytes in the first fragment (a multiple of 8).
const FIRST: usize = 1480;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

/// A UDP datagram from `src` to `dst` with a 2000-byte payload, cut in two fragments that each
/// fit the lab's 1500-byte MTU.
fn fragments(src: SocketAddrV4, dst: SocketAddrV4, ttl: u8) -> [Frame; 2] {
    let payload: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 251) as u8).collect();
    let whole = Frame::udp(src, dst, true).payload(&payload).build();
    let segment = &whole[14 + 20..];
    [
        Frame::raw(*src.ip(), *dst.ip(), PROTO_UDP, &segment[..FIRST])
            .frag(IP_MF)
            .ttl(ttl),
        Frame::raw(*src.ip(), *dst.ip(), PROTO_UDP, &segment[FIRST..])
            .frag((FIRST / 8) as u16)
            .ttl(ttl),
    ]
}

#[test]
fn fragmented_datagrams_follow_their_first_fragment() {
    if !privileged_or_skip("fragmented_datagrams_follow_their_first_fragment") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-frag");
    lab.run(|dp| {
        let tasks = [
            running(sa("198.18.1.2:31000")),
            running(sa("198.18.1.3:31000")),
        ];
        dp.apply(&apps(vec![app(
            "/dns",
            "udp",
            &[("VIP_0", "172.16.0.1:5353")],
            &tasks,
        )]));
        let (client, vip) = (sa("198.18.0.2:40000"), sa("172.16.0.1:5353"));
        let be = dp.pick(vip, PROTO_UDP, client).expect("a backend");

        // Client -> VIP: both fragments reach the backend, the first one with its port.
        let (v, _, smac, dmac) = departure(Ingress::Client, *be.ip()).expect("route");
        let want = fragments(client, be, 64).map(|f| f.hop(smac, dmac).build());
        let sent = fragments(client, vip, 64).map(|f| f.build());
        let stats: [&[Stat]; 2] = [
            &[Stat::NewFlow, Stat::Redirect],
            &[Stat::Forwarded, Stat::Redirect],
        ];
        for i in 0..2 {
            let before = dp.stats();
            let r = dp.run(&sent[i], Ingress::Client).expect("run");
            assert_eq!(
                (r.verdict, &r.out),
                (v, &want[i]),
                "fragment {i} to the VIP"
            );
            assert_eq!(
                stat_delta(&before, &dp.stats()),
                each_once(stats[i]),
                "fragment {i}"
            );
        }

        // Backend -> client: both fragments of the reply come from the VIP.
        let (v, _, smac, dmac) = departure(Ingress::Backend, *client.ip()).expect("route");
        let want = fragments(vip, client, 64).map(|f| f.hop(smac, dmac).build());
        let sent = fragments(be, client, 64).map(|f| f.build());
        for (i, frame) in sent.iter().enumerate() {
            let before = dp.stats();
            let r = dp.run(frame, Ingress::Backend).expect("run");
            assert_eq!((r.verdict, &r.out), (v, &want[i]), "reply fragment {i}");
            assert_eq!(
                stat_delta(&before, &dp.stats()),
                each_once(&[Stat::Reply, Stat::Redirect])
            );
        }

        // A later fragment whose first one was never seen: untouched.
        let stray = fragments(sa("198.18.0.3:40001"), vip, 64)[1].build();
        let before = dp.stats();
        let r = dp.run(&stray, Ingress::Client).expect("run");
        assert_eq!((r.verdict, &r.out), (XDP_PASS, &stray));
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            each_once(&[Stat::PassNotOurs])
        );
    });
}
