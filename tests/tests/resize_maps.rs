//! A resize moves every map of the data plane: after it, each map of `dataplane::MAPS` (the one
//! table of maps that load, open, resize and down use) holds what it held before, compared map by
//! map through that table, not only selected maps. A map a resize forgot to copy fails here.
use lbctl::dataplane::{self, MAPS, TableConfig, spec::CopyHow};
use lbtest::{
    packet::{Frame, IP_MF, TCP_ACK, TCP_SYN},
    pktlab::{Ingress, PacketLab, app, apps, running},
    privileged_or_skip,
};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

fn sa6(host: u16, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, host),
        port,
        0,
        0,
    ))
}

#[test]
fn a_resize_keeps_what_every_map_holds() {
    if !privileged_or_skip("a_resize_keeps_what_every_map_holds") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-resize");
    let dir = lab.dir.clone();
    let small = TableConfig::new(1021, 0x5eed)
        .and_then(|t| t.with_capacity(64, 128, 512))
        .and_then(|t| t.with_flows(4096))
        .expect("small sizes");
    let big = small
        .with_capacity(256, 512, 2048)
        .and_then(|t| t.with_flows(8192))
        .expect("big sizes");
    lab.run_with(small, move |dp| {
        let vip6 = "[fd00:172:16::1]:8080";
        dp.apply(&apps(vec![
            app(
                "/web",
                "tcp",
                // Two VIPs on one port: their flows keep reverse entries (lean flows do not).
                &[("VIP_0", "172.16.0.1:8080"), ("VIP_1", "172.16.0.5:8080")],
                &[
                    running(sa("198.18.1.2:31000")),
                    running(sa("198.18.1.3:31000")),
                ],
            ),
            app(
                "/dns",
                "udp",
                &[("VIP_0", "172.16.0.2:53")],
                &[running(sa("198.18.1.4:31001"))],
            ),
            app(
                "/web6",
                "tcp",
                &[("VIP_0", vip6), ("VIP_1", "[fd00:172:16::2]:8080")],
                &[running(
                    "[2001:2:0:1::2]:31000"
                        .parse::<SocketAddr>()
                        .expect("address"),
                )],
            ),
        ]));
        // Flows of both families, replies, a fragment, a lost flow: every map holds something.
        let vip = sa("172.16.0.1:8080");
        for port in 40000..40040 {
            dp.run(
                &Frame::tcp(sa(&format!("198.18.0.2:{port}")), vip, TCP_SYN).build(),
                Ingress::Client,
            )
            .expect("run");
        }
        dp.run(
            &Frame::tcp(sa("198.18.0.2:41000"), vip, TCP_ACK).build(),
            Ingress::Client,
        )
        .expect("run");
        let vip6: SocketAddr = vip6.parse().expect("address");
        for port in 40000..40010 {
            dp.run(
                &Frame::tcp(sa6(2, port), vip6, TCP_SYN).build(),
                Ingress::Client,
            )
            .expect("run");
        }
        let first = Frame::udp(sa("198.18.0.2:5353"), sa("172.16.0.2:53"), true)
            .payload(&[7; 64])
            .frag(IP_MF);
        dp.run(&first.build(), Ingress::Client).expect("run");
        // The local path's maps are written by its cgroup programs, which a packet lab has not.
        lbtest::local_lab::fill_socket_maps(&dir);
        // The flow tables' counters under pressure count only where a pair of buckets is full
        // of flows in use (flow_table.rs makes that happen): written here.
        lbtest::pktlab::set_flow_pressure(&dir, [5, 6]);

        let before: Vec<_> = MAPS
            .iter()
            .map(|m| m.contents(&dir, &small).expect("reading a map"))
            .collect();
        for (m, c) in MAPS.iter().zip(&before) {
            // (The program arrays hold the programs of the load that filled them.)
            if !matches!(m.copy, CopyHow::Skip(_) | CopyHow::Programs) {
                assert!(
                    c.entries > 0,
                    "{} holds nothing: the test proves nothing for it",
                    m.name
                );
            }
        }
        let attached = dataplane::attach(&dir, &[], &big).expect("resizing");
        assert!(attached.attached.is_empty() && attached.replaced.is_empty());
        let maps = dataplane::Maps::open(&dir).expect("the resized maps");
        assert_eq!(
            maps.table().expect("sizes"),
            big,
            "the data plane was not resized"
        );
        let mut differ = Vec::new();
        for (m, was) in MAPS.iter().zip(&before) {
            let now = m.contents(&dir, &small).expect("reading a map");
            match m.copy {
                CopyHow::Skip(why) => eprintln!("{}: not copied ({why})", m.name),
                CopyHow::Programs => eprintln!("{}: filled by the load", m.name),
                _ if now != *was => differ.push(format!(
                    "{}: {} entries before, {} after{}",
                    m.name,
                    was.entries,
                    now.entries,
                    if was.entries == now.entries {
                        " (other contents)"
                    } else {
                        ""
                    }
                )),
                _ => {}
            }
        }
        assert!(differ.is_empty(), "a resize changed: {}", differ.join("; "));
    });
}
