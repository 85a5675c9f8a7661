//! ICMP errors about translated flows, through the real XDP program (BPF_PROG_TEST_RUN): each
//! fixture gives the input error, the expected verdict, the exact expected output frame (built
//! independently) and the counters that must move; checksums are verified by recomputation.
use lb_common::Stat;
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{
        Dataplane, Ingress, PacketLab, XDP_PASS, XDP_REDIRECT, app, apps, departure, each_once,
        running, stat_delta,
    },
    privileged_or_skip,
};
use std::net::{Ipv4Addr, SocketAddrV4};

const PROTO_ICMP: u8 = 1;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

/// Ones' complement sum of big-endian words, folded.
fn sum(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|w| (w[0] as u32) << 8 | *w.get(1).unwrap_or(&0) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// An ICMP message (type, code, 4 bytes of rest) quoting `quote`, with its checksum.
fn icmp(kind: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend(rest);
    m.extend(quote);
    let c = !sum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// What an ICMP error quotes of a frame: its IP header and the first 8 bytes after it.
fn quote(frame: &[u8]) -> Vec<u8> {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[14..14 + ihl + 8].to_vec()
}

/// Checks every checksum of an ICMP-in-IPv4 frame by recomputation.
fn verify(frame: &[u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    assert_eq!(sum(&frame[14..14 + ihl]), 0xffff, "outer IP checksum");
    let icmp = &frame[14 + ihl..];
    assert_eq!(sum(icmp), 0xffff, "ICMP checksum");
    let inner = &icmp[8..];
    let inner_ihl = (inner[0] & 0x0f) as usize * 4;
    assert_eq!(sum(&inner[..inner_ihl]), 0xffff, "quoted IP checksum");
}

/// Runs `input` in on `ingress`, checks verdict, exact output, checksums and counters.
fn expect(
    dp: &mut Dataplane,
    what: &str,
    input: &[u8],
    ingress: Ingress,
    verdict: u32,
    output: &[u8],
    stats: &[Stat],
) {
    let before = dp.stats();
    let r = dp.run(input, ingress).expect("test_run");
    let moved = stat_delta(&before, &dp.stats());
    assert_eq!(r.verdict, verdict, "{what}: verdict");
    assert_eq!(r.out, output, "{what}: output frame");
    if verdict != XDP_PASS || output != input {
        verify(&r.out);
    }
    assert_eq!(moved, each_once(stats), "{what}: counters");
}

#[test]
fn icmp_errors_about_translated_flows() {
    if !privileged_or_skip("icmp_errors_about_translated_flows") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-icmp");
    lab.run(|dp| {
        let backends = [sa("198.18.1.2:31000"), sa("198.18.1.3:31000")];
        let tasks: Vec<_> = backends.iter().map(|b| running(*b)).collect();
        dp.apply(&apps(vec![
            app("/web", "tcp", &[("VIP_0", "172.16.0.1:8080")], &tasks),
            app("/dns", "udp", &[("VIP_0", "172.16.0.1:5353")], &tasks),
        ]));
        let client = sa("198.18.0.2:40000");
        let (vip, vip_udp) = (sa("172.16.0.1:8080"), sa("172.16.0.1:5353"));
        let router_b = Ipv4Addr::new(198, 18, 1, 4); // a router on the backends' side
        let router_c = Ipv4Addr::new(198, 18, 0, 3); // a router on the clients' side

        // A TCP flow and a UDP flow through the VIPs.
        let syn = Frame::tcp(client, vip, TCP_SYN);
        let be = dp.pick(vip, 6, client).expect("a backend");
        let sent = dp.run(&syn.build(), Ingress::Client).expect("run");
        assert_eq!(sent.verdict, XDP_REDIRECT);
        let dgram = Frame::udp(client, vip_udp, true);
        let be_udp = dp.pick(vip_udp, 17, client).expect("a backend");
        let sent_udp = dp.run(&dgram.build(), Ingress::Client).expect("run");
        assert_eq!(sent_udp.verdict, XDP_REDIRECT);

        // 1. Fragmentation needed, from a router between the balancer and the backend, about the
        //    client's packet: the client must see its VIP in the quote (path-MTU discovery).
        let mtu = [0, 0, 0x05, 0x78]; // 1400
        let err = Frame::raw(
            router_b,
            *client.ip(),
            PROTO_ICMP,
            &icmp(3, 4, mtu, &quote(&sent.out)),
        );
        let quoted_as_client_sent = quote(&syn.clone().ttl(syn.ttl - 1).build());
        let (v, _, smac, dmac) = departure(Ingress::Backend, *client.ip()).expect("route");
        let want = Frame::raw(
            router_b,
            *client.ip(),
            PROTO_ICMP,
            &icmp(3, 4, mtu, &quoted_as_client_sent),
        )
        .hop(smac, dmac)
        .build();
        expect(
            dp,
            "frag needed to the client",
            &err.build(),
            Ingress::Backend,
            v,
            &want,
            &[Stat::IcmpToClient, Stat::Redirect],
        );

        // 2. Port unreachable from the backend itself, about a UDP datagram: it speaks as the VIP,
        //    and the quote names the VIP. The quoted UDP checksum is left as the backend saw it.
        let err = Frame::raw(
            *be_udp.ip(),
            *client.ip(),
            PROTO_ICMP,
            &icmp(3, 3, [0; 4], &quote(&sent_udp.out)),
        );
        let mut q = quote(&dgram.clone().ttl(dgram.ttl - 1).build());
        let ihl = (q[0] & 0x0f) as usize * 4;
        let seen = quote(&sent_udp.out);
        q[ihl + 6..ihl + 8].copy_from_slice(&seen[ihl + 6..ihl + 8]);
        let want = Frame::raw(
            *vip_udp.ip(),
            *client.ip(),
            PROTO_ICMP,
            &icmp(3, 3, [0; 4], &q),
        )
        .hop(smac, dmac)
        .build();
        expect(
            dp,
            "port unreachable from the backend",
            &err.build(),
            Ingress::Backend,
            v,
            &want,
            &[Stat::IcmpToClient, Stat::Redirect],
        );

        // 3. Fragmentation needed, from a router on the clients' side, about a reply from the VIP:
        //    it goes to the flow's backend, which must see itself in the quote.
        let reply = Frame::tcp(vip, client, TCP_SYN | TCP_ACK).ttl(63);
        let err = Frame::raw(
            router_c,
            *vip.ip(),
            PROTO_ICMP,
            &icmp(3, 4, mtu, &quote(&reply.build())),
        );
        // The quoted TCP checksum is not in the first 8 bytes: nothing else differs.
        let q = quote(&Frame::tcp(be, client, TCP_SYN | TCP_ACK).ttl(63).build());
        let (v2, _, smac2, dmac2) = departure(Ingress::Client, *be.ip()).expect("route");
        let want = Frame::raw(router_c, *be.ip(), PROTO_ICMP, &icmp(3, 4, mtu, &q))
            .hop(smac2, dmac2)
            .build();
        expect(
            dp,
            "frag needed to the backend",
            &err.build(),
            Ingress::Client,
            v2,
            &want,
            &[Stat::IcmpToBackend, Stat::Redirect],
        );

        // 4. Time exceeded about a flow nobody translated: untouched.
        let other = Frame::tcp(client, sa("198.18.1.9:80"), TCP_SYN).ttl(1);
        let err = Frame::raw(
            router_b,
            *client.ip(),
            PROTO_ICMP,
            &icmp(11, 0, [0; 4], &quote(&other.build())),
        )
        .build();
        expect(
            dp,
            "error about an unknown flow",
            &err,
            Ingress::Backend,
            XDP_PASS,
            &err,
            &[Stat::PassNotOurs],
        );

        // 5. Echo request to a VIP: passed to the kernel as it is (the VIP is not an address of
        //    this host, so the kernel answers only if it is configured to).
        let echo = Frame::raw(
            *client.ip(),
            *vip.ip(),
            PROTO_ICMP,
            &icmp(8, 0, [0, 1, 0, 1], b"ping"),
        )
        .build();
        expect(
            dp,
            "echo request to a VIP",
            &echo,
            Ingress::Client,
            XDP_PASS,
            &echo,
            &[Stat::PassNotOurs],
        );

        // 6. A truncated error (the quote ends before the ports): untouched.
        let cut = quote(&sent.out);
        let err = Frame::raw(
            router_b,
            *client.ip(),
            PROTO_ICMP,
            &icmp(3, 4, mtu, &cut[..cut.len() - 6]),
        )
        .build();
        expect(
            dp,
            "truncated quote",
            &err,
            Ingress::Backend,
            XDP_PASS,
            &err,
            &[Stat::PassNotOurs],
        );
    });
}
