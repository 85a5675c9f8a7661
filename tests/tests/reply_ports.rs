//! `lb_rport_v1`, the ports backends use or used: a packet not for a VIP from any other port is
//! passed without a miss in the reply tables; replies of a backend that left still come from the
//! VIP; a data plane pinned without the map (an agent of an earlier version) gets it filled from
//! its backends and reverse entries before the new program runs; replies are asked for first,
//! and a packet to the VIP from a backend's port that is no reply still reaches the VIP.
use lb_common::{MAP_REPLY_PORTS, reply_port_bit};
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{
        Dataplane, Ingress, PacketLab, XDP_PASS, XDP_REDIRECT, XDP_TX, app, apps, running,
        stat_delta,
    },
    privileged_or_skip,
};
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

const VIP: &str = "172.16.0.1:8080";
const X: &str = "198.18.1.2:31000";
const Y: &str = "198.18.1.3:31001";

fn doc(tasks: &[&str]) -> String {
    let tasks: Vec<_> = tasks.iter().map(|t| running(sa(t))).collect();
    apps(vec![app("/web", "tcp", &[("VIP_0", VIP)], &tasks)])
}

/// The backend a SYN from `client` went to.
fn syn(dp: &mut Dataplane, client: SocketAddrV4) -> SocketAddrV4 {
    to_vip(dp, client, TCP_SYN)
}

/// The source the client sees on a segment from `from`, or None when it passed untouched.
fn reply(dp: &mut Dataplane, from: SocketAddrV4, client: SocketAddrV4) -> Option<SocketAddrV4> {
    let input = Frame::tcp(from, client, TCP_ACK).build();
    let r = dp.run(&input, Ingress::Backend).expect("run");
    if r.verdict == XDP_PASS {
        assert_eq!(r.out, input, "passed untouched");
        return None;
    }
    // Out of the interface it came in (TX) when the client is on the backends' side too.
    assert!(
        [XDP_REDIRECT, XDP_TX].contains(&r.verdict),
        "verdict {}",
        r.verdict
    );
    Some(SocketAddrV4::new(
        Ipv4Addr::new(r.out[26], r.out[27], r.out[28], r.out[29]),
        u16::from_be_bytes([r.out[34], r.out[35]]),
    ))
}

fn marked(dir: &Path, port: u16) -> bool {
    let map = lbtest::pktlab::pinned_array::<u64>(dir, MAP_REPLY_PORTS);
    let (word, bit) = reply_port_bit(port);
    map.get(&word, 0).expect("word") & bit != 0
}

#[test]
fn strangers_pass_and_replies_of_a_backend_that_left_still_come_from_the_vip() {
    if !privileged_or_skip(
        "strangers_pass_and_replies_of_a_backend_that_left_still_come_from_the_vip",
    ) {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-rport");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        dp.apply(&doc(&[X, Y]));
        assert!(marked(&dir, 31000) && marked(&dir, 31001));
        assert!(!marked(&dir, 5555));
        let client = sa("198.18.0.2:40001");
        let b = syn(dp, client);

        // The backend's address, another port: not a reply, passed, counted as not ours.
        let before = dp.stats();
        assert_eq!(reply(dp, SocketAddrV4::new(*b.ip(), 5555), client), None);
        assert_eq!(stat_delta(&before, &dp.stats()), vec![("pass_not_ours", 1)]);

        // The backend leaves Marathon while its connection lives on: its port keeps its bit,
        // its replies still come from the VIP.
        let other = if b == sa(X) { Y } else { X };
        dp.apply(&doc(&[other]));
        assert!(marked(&dir, b.port()), "a port's bit is never cleared");
        assert_eq!(reply(dp, b, client), Some(sa(VIP)));
    });
}

#[test]
fn a_data_plane_pinned_without_the_map_gets_it_filled_before_the_program_runs() {
    if !privileged_or_skip(
        "a_data_plane_pinned_without_the_map_gets_it_filled_before_the_program_runs",
    ) {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-rport-up");
    let dir = lab.dir.clone();
    let client = sa("198.18.0.2:40002");
    // A flow whose backend then leaves, and a pin directory as an earlier agent left it.
    let (b, other) = lab.run(move |dp| {
        dp.apply(&doc(&[X, Y]));
        let b = syn(dp, client);
        let other = if b == sa(X) { sa(Y) } else { sa(X) };
        dp.apply(&doc(&[&other.to_string()]));
        (b, other)
    });
    std::fs::remove_file(lab.dir.join(MAP_REPLY_PORTS)).expect("unpin lb_rport_v1");
    lab.run(move |dp| {
        // Loading created the map and filled it: the live backend's port from lb_be_v1, the
        // one that left from its reverse entry in lb_nat_v1.
        assert!(marked(&dir, other.port()));
        assert!(marked(&dir, b.port()));
        assert_eq!(reply(dp, b, client), Some(sa(VIP)));
    });
}

/// The destination a client's segment to the VIP was sent to.
fn to_vip(dp: &mut Dataplane, client: SocketAddrV4, flags: u8) -> SocketAddrV4 {
    let r = dp
        .run(&Frame::tcp(client, sa(VIP), flags).build(), Ingress::Client)
        .expect("run");
    assert_eq!(r.verdict, XDP_REDIRECT, "{client} to the VIP");
    SocketAddrV4::new(
        Ipv4Addr::new(r.out[30], r.out[31], r.out[32], r.out[33]),
        u16::from_be_bytes([r.out[36], r.out[37]]),
    )
}

#[test]
fn a_client_on_a_backends_port_still_reaches_the_vip() {
    if !privileged_or_skip("a_client_on_a_backends_port_still_reaches_the_vip") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-rport-cl");
    lab.run(move |dp| {
        dp.apply(&doc(&[X, Y]));
        // The program asks whether a packet is a reply before whether it is for a VIP: packets
        // to the VIP from a port backends use, which no flow explains as a reply, go on to the
        // VIP. A backend itself, from its own address and port, and a stranger on the other
        // backend's port.
        for client in [sa(X), sa("198.18.0.2:31001")] {
            let before = dp.stats();
            let b = to_vip(dp, client, TCP_SYN);
            assert!(b == sa(X) || b == sa(Y), "{client} went to {b}");
            let after = dp.stats();
            assert_eq!(stat_delta(&before, &after)[0], ("new_flow", 1), "{client}");
            // Its next segment is tracked, to the same backend.
            assert_eq!(to_vip(dp, client, TCP_ACK), b, "{client}");
            assert_eq!(
                stat_delta(&after, &dp.stats())[0],
                ("forwarded", 1),
                "{client}"
            );
            // And the backend's reply comes from the VIP.
            assert_eq!(reply(dp, b, client), Some(sa(VIP)), "{client}");
        }
    });
}
