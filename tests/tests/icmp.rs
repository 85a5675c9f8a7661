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
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

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

/// An Ethernet + IPv6 frame carrying `payload` as `next` header, hop limit `hops`.
fn v6_frame(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hops: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![
        0x02, 0, 0, 0, 0xc0, 0xfe, 0x02, 0, 0, 0, 0xc0, 0x01, 0x86, 0xdd,
    ];
    f.extend([0x60, 0, 0, 0]);
    f.extend((payload.len() as u16).to_be_bytes());
    f.extend([next, hops]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(payload);
    f
}

/// The checksum over the IPv6 pseudo-header and `msg` (its checksum field zero).
fn v6_checksum(src: Ipv6Addr, dst: Ipv6Addr, next: u8, msg: &[u8]) -> u16 {
    let mut p = Vec::new();
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend((msg.len() as u32).to_be_bytes());
    p.extend([0, 0, 0, next]);
    p.extend(msg);
    !sum(&p)
}

/// A TCP SYN over IPv6 (a 20-byte header), with its checksum.
fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8, hops: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(src.port().to_be_bytes());
    t.extend(dst.port().to_be_bytes());
    t.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    let c = v6_checksum(*src.ip(), *dst.ip(), 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    v6_frame(*src.ip(), *dst.ip(), 6, hops, &t)
}

/// An ICMPv6 error from `src` to `dst` quoting `quote`, with its checksum.
fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend(rest);
    m.extend(quote);
    let c = v6_checksum(src, dst, 58, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    v6_frame(src, dst, 58, 64, &m)
}

/// What an ICMPv6 error quotes of an IPv6 TCP frame: its header and 8 bytes.
fn quote6(frame: &[u8]) -> Vec<u8> {
    frame[14..14 + 40 + 8].to_vec()
}

#[test]
fn icmpv6_errors_about_translated_flows() {
    if !privileged_or_skip("icmpv6_errors_about_translated_flows") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-icmp6");
    lab.run(|dp| {
        // Addresses with no route in the lab: the FIB hands every rewritten packet to the stack,
        // which makes the outputs independent of the lab's IPv6 routes.
        let b1 = "2001:2:0:99::2";
        let tasks = serde_json::json!([{"id": "w.1", "host": b1, "ports": [31000], "state": "TASK_RUNNING"}]);
        let doc = serde_json::json!({"apps": [{"id": "/web6",
            "portDefinitions": [{"labels": {"VIP_0": "[fd00::1]:8080"}}], "tasks": tasks}]});
        dp.apply(&doc.to_string());
        let client: SocketAddrV6 = "[2001:2:0:98::2]:40000".parse().expect("client");
        let vip: SocketAddrV6 = "[fd00::1]:8080".parse().expect("vip");
        let be: SocketAddrV6 = format!("[{b1}]:31000").parse().expect("backend");
        let router_b: Ipv6Addr = "2001:2:0:99::fe".parse().expect("router");
        let router_c: Ipv6Addr = "2001:2:0:98::fe".parse().expect("router");

        let syn = tcp6(client, vip, TCP_SYN, 64);
        let sent = dp.run(&syn, Ingress::Client).expect("run");
        assert_eq!(sent.verdict, XDP_PASS);
        assert_eq!(sent.out, tcp6(client, be, TCP_SYN, 64), "the SYN goes to the backend");

        // Packet too big, from a router on the backends' side, about the client's packet.
        let mtu = [0, 0, 0x05, 0x00]; // 1280
        let err = icmp6(router_b, *client.ip(), 2, mtu, &quote6(&sent.out));
        let want = icmp6(router_b, *client.ip(), 2, mtu, &quote6(&syn));
        expect6(dp, "packet too big to the client", &err, Ingress::Backend, &want, Stat::IcmpToClient);

        // From the backend itself: it speaks as the VIP.
        let err = icmp6(*be.ip(), *client.ip(), 1, [0; 4], &quote6(&sent.out));
        let want = icmp6(*vip.ip(), *client.ip(), 1, [0; 4], &quote6(&syn));
        expect6(dp, "unreachable from the backend", &err, Ingress::Backend, &want, Stat::IcmpToClient);

        // Packet too big, on the clients' side, about a reply from the VIP: to the backend.
        let reply = tcp6(vip, client, TCP_SYN | TCP_ACK, 63);
        let err = icmp6(router_c, *vip.ip(), 2, mtu, &quote6(&reply));
        let want = icmp6(router_c, *be.ip(), 2, mtu, &quote6(&tcp6(be, client, TCP_SYN | TCP_ACK, 63)));
        expect6(dp, "packet too big to the backend", &err, Ingress::Client, &want, Stat::IcmpToBackend);

        // About a flow nobody translated: untouched.
        let other = tcp6(client, "[2001:2:0:99::9]:80".parse().expect("a"), TCP_SYN, 63);
        let err = icmp6(router_b, *client.ip(), 3, [0; 4], &quote6(&other));
        let before = dp.stats();
        let r = dp.run(&err, Ingress::Backend).expect("run");
        assert_eq!((r.verdict, &r.out), (XDP_PASS, &err));
        assert_eq!(stat_delta(&before, &dp.stats()), each_once(&[Stat::PassNotOurs]));
    });
}

/// An ICMPv6 error that must come out as `want`, handed to the stack (no route in the lab).
fn expect6(
    dp: &mut Dataplane,
    what: &str,
    input: &[u8],
    ingress: Ingress,
    want: &[u8],
    stat: Stat,
) {
    let before = dp.stats();
    let r = dp.run(input, ingress).expect("test_run");
    assert_eq!(r.verdict, XDP_PASS, "{what}: verdict");
    assert_eq!(r.out, want, "{what}: output frame");
    let (src, dst) = (
        Ipv6Addr::from(<[u8; 16]>::try_from(&r.out[22..38]).expect("src")),
        Ipv6Addr::from(<[u8; 16]>::try_from(&r.out[38..54]).expect("dst")),
    );
    let mut msg = r.out[54..].to_vec();
    let c = u16::from_be_bytes([msg[2], msg[3]]);
    msg[2..4].fill(0);
    assert_eq!(
        c,
        v6_checksum(src, dst, 58, &msg),
        "{what}: ICMPv6 checksum"
    );
    assert_eq!(
        stat_delta(&before, &dp.stats()),
        each_once(&[stat, Stat::RewrittenToStack]),
        "{what}: counters"
    );
}
