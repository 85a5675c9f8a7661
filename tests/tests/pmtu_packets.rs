//! Path MTU through a VIP, packet by packet (BPF_PROG_TEST_RUN, both hooks): a packet too big
//! for its next hop, with DF set (IPv6: always), comes back as the ICMP error its sender
//! understands, byte for byte: "fragmentation needed" / "packet too big" with the next hop's
//! MTU, quoting the packet as the sender sent it (the VIP restored), from the VIP (to a client)
//! or from the client (to a backend), back out of the interface it came in on. The expected
//! frames are built here from the test's own packet builder and checksum code.
use lb_common::Stat;
use lbtest::{
    checksum::residue,
    packet::{Frame, IP_DF, IP_MF, IPPROTO_TCP, TCP_ACK, TCP_SYN},
    pktlab::{
        BACKEND_SIDE, CLIENT_SIDE, Dataplane, Hook, Ingress, PacketLab, XDP_PASS, XDP_REDIRECT,
        app, apps, each_once, running, stat_delta, tc_verdict,
    },
    privileged_or_skip, sh,
};
use std::net::{IpAddr, SocketAddr};

/// The MTU both sides of the lab get: smaller than the frames sent.
const SMALL_MTU: u16 = 1400;
/// Payload of the big segments: 1440 (IPv4) / 1460 (IPv6) bytes of IP, over SMALL_MTU.
const BIG: usize = 1400;

/// What the error quotes: the minimum datagram minus the error's own headers.
const QUOTE4: usize = 576 - 20 - 8;
const QUOTE6: usize = 1280 - 40 - 8;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// The checksum of `parts` (their checksum fields zero).
fn csum(parts: &[&[u8]]) -> u16 {
    let r = residue(parts);
    if r == 0xffff { 0 } else { !r }
}

/// The error `sent` (a frame, as its sender sent it) gets: from `from` to the sender, quoting
/// it, the MAC addresses swapped.
fn too_big(sent: &Frame, from: IpAddr, mtu: u16) -> Vec<u8> {
    let bytes = sent.build();
    let ipv6 = sent.is_ipv6();
    let quote = &bytes[14..14 + if ipv6 { QUOTE6 } else { QUOTE4 }];
    let mut msg = if ipv6 {
        let mut m = vec![2, 0, 0, 0];
        m.extend((mtu as u32).to_be_bytes());
        m
    } else {
        let mut m = vec![3, 4, 0, 0, 0, 0];
        m.extend(mtu.to_be_bytes());
        m
    };
    msg.extend(quote);
    let c = match (from, sent.src) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = (msg.len() as u32).to_be_bytes();
            csum(&[&s.octets(), &d.octets(), &len, &[0, 0, 0, 58], &msg])
        }
        _ => csum(&[&msg]),
    };
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Frame::raw(from, sent.src, if ipv6 { 58 } else { 1 }, &msg);
    f.eth_dst = sent.eth_src;
    f.eth_src = sent.eth_dst;
    f.ttl = 64;
    f.flow_label = 0;
    if !ipv6 {
        f.tos = 0xc0;
        f.id = 0;
        f.frag = 0;
    }
    f.build()
}

fn run(
    dp: &mut Dataplane,
    what: &str,
    input: &[u8],
    ingress: Ingress,
    want: (u32, &[u8], &[Stat]),
) {
    let before = dp.stats();
    let r = dp.run(input, ingress).expect("test_run");
    let hook = dp.hook();
    let verdict = if hook == Hook::Tc {
        tc_verdict(want.0)
    } else {
        want.0
    };
    assert_eq!(r.verdict, verdict, "{hook:?}: {what}: verdict");
    assert_eq!(
        stat_delta(&before, &dp.stats()),
        each_once(want.2),
        "{hook:?}: {what}: counters"
    );
    if !want.1.is_empty() {
        assert_eq!(r.out.len(), want.1.len(), "{hook:?}: {what}: output length");
        let first = r.out.iter().zip(want.1).position(|(a, b)| a != b);
        assert_eq!(
            first, None,
            "{hook:?}: {what}: first differing byte of the output"
        );
    }
}

/// One family's fixtures on the data plane's current hook; `port` keeps the flows apart.
fn fixtures(dp: &mut Dataplane, client: SocketAddr, vip: SocketAddr, port: u16) {
    let client = SocketAddr::new(client.ip(), port);
    let be = dp.pick(vip, 6, client).expect("a backend");
    // The flow starts with a small SYN, which fits.
    let syn = Frame::tcp(client, vip, TCP_SYN);
    let r = dp.run(&syn.build(), Ingress::Client).expect("run");
    assert_ne!(r.verdict, XDP_PASS, "{:?}: the SYN is forwarded", dp.hook());

    // Too big for the backends' side, DF: the client hears it from the VIP, about its packet.
    let big = Frame::tcp(client, vip, TCP_ACK).payload(&[0x5a; BIG]);
    run(
        dp,
        "client's segment over the backend side's MTU",
        &big.build(),
        Ingress::Client,
        (
            XDP_REDIRECT,
            &too_big(&big, vip.ip(), SMALL_MTU),
            &[Stat::Forwarded, Stat::IcmpTooBig],
        ),
    );

    // The backend's reply over the clients' side's MTU: the backend hears it, about its reply.
    let reply = Frame::tcp(be, client, TCP_ACK).payload(&[0xa5; BIG]);
    run(
        dp,
        "backend's reply over the client side's MTU",
        &reply.build(),
        Ingress::Backend,
        (
            XDP_REDIRECT,
            &too_big(&reply, client.ip(), SMALL_MTU),
            &[Stat::Reply, Stat::IcmpTooBig],
        ),
    );

    if !client.is_ipv6() {
        // Without DF the kernel fragments it: rewritten and passed.
        let mut nodf = big.clone();
        nodf.frag = 0;
        let mut want = nodf.clone().to(be);
        want.frag = 0;
        run(
            dp,
            "client's segment over the MTU without DF",
            &nodf.build(),
            Ingress::Client,
            (
                XDP_PASS,
                &want.build(),
                &[Stat::Forwarded, Stat::RewrittenToStack],
            ),
        );
        assert_eq!(big.frag, IP_DF, "the builder sets DF");

        // A later fragment is no flow's packet to answer (it has no ports), even with DF set
        // and its first bytes reading as the flow's ports: the kernel gets it, rewritten.
        let mut first = Frame::tcp(client, vip, TCP_ACK).frag(IP_MF);
        first.id = port;
        let r = dp.run(&first.build(), Ingress::Client).expect("run");
        assert_ne!(r.verdict, XDP_PASS, "{:?}: the first fragment", dp.hook());
        let mut payload = [client.port().to_be_bytes(), be.port().to_be_bytes()].concat();
        payload.resize(BIG, 0x3c);
        let mut later = Frame::raw(client.ip(), vip.ip(), IPPROTO_TCP, &payload).frag(IP_DF | 185);
        later.id = port;
        let want = later.clone().to(SocketAddr::new(be.ip(), 0));
        run(
            dp,
            "a later fragment over the MTU, DF set",
            &later.build(),
            Ingress::Client,
            (
                XDP_PASS,
                &want.build(),
                &[Stat::Forwarded, Stat::RewrittenToStack],
            ),
        );
    }
}

#[test]
fn too_big_for_the_next_hop_answers_the_sender() {
    if !privileged_or_skip("too_big_for_the_next_hop_answers_the_sender") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-pmtu");
    for side in [&CLIENT_SIDE, &BACKEND_SIDE] {
        sh(&[
            "ip",
            "-n",
            &lab.ns,
            "link",
            "set",
            side.name,
            "mtu",
            &SMALL_MTU.to_string(),
        ]);
    }
    lab.run(|dp| {
        dp.apply(&apps(vec![
            app(
                "/web",
                "tcp",
                &[("VIP_0", "172.16.0.1:8080")],
                &[running(sa("198.18.1.2:31000"))],
            ),
            app(
                "/web6",
                "tcp",
                &[("VIP_0", "[fd00::1]:8080")],
                &[running(sa("[2001:2:0:1::2]:31000"))],
            ),
        ]));
        for (hook, port) in [(Hook::Xdp, 41000), (Hook::Tc, 42000)] {
            dp.set_hook(hook);
            fixtures(dp, sa("198.18.0.2:1"), sa("172.16.0.1:8080"), port);
            fixtures(dp, sa("[2001:2::2]:1"), sa("[fd00::1]:8080"), port);
        }
    });
}
