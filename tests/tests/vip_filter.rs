//! `lb_vipf_v1`, the VIPs' bits in front of the service maps: a service's bit is set while it
//! exists and cleared once no service is left on it; a packet whose destination has no bit is
//! passed (and counted) as before, one to a VIP served as before; a data plane pinned without
//! the map, or whose map misses a service (an older agent wrote to it), gets every service's
//! bit before the program runs; `lbctl status` names a service whose bit is clear and counts the
//! bits no service is on.
use lb_common::MAP_VIP_FILTER;
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{
        Dataplane, Ingress, PacketLab, XDP_PASS, XDP_REDIRECT, app, apps, running, set_vip_bit,
        stat_delta, vip_marked,
    },
    privileged_or_skip,
};
use std::{net::SocketAddrV4, path::Path};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

const WEB: &str = "172.16.0.1:8080";
const DNS: &str = "172.16.0.2:53";
const X: &str = "198.18.1.2:31000";
const Y: &str = "198.18.1.3:31001";

/// `/web` on WEB (TCP); with `dns`, `/dns` on DNS over TCP and over UDP (two services, one bit).
fn doc(dns: Option<&[&str]>) -> String {
    let mut list = vec![app("/web", "tcp", &[("VIP_0", WEB)], &[running(sa(X))])];
    if let Some(protocols) = dns {
        for p in protocols {
            list.push(app(
                &format!("/dns-{p}"),
                p,
                &[("VIP_0", DNS)],
                &[running(sa(Y))],
            ));
        }
    }
    apps(list)
}

fn marked(dir: &Path, vip: &str) -> bool {
    vip_marked(dir, sa(vip))
}

/// Clears `vip`'s bit, as a map an older agent wrote services to without knowing it.
fn unmark(dir: &Path, vip: &str) {
    set_vip_bit(dir, sa(vip), false);
}

/// What `lbctl status` reads of the filter.
fn check(dir: &Path) -> lbctl::dataplane::FilterCheck {
    let maps = lbctl::dataplane::Maps::open(dir).expect("maps");
    maps.filter_check()
        .expect("read")
        .expect("the filter is pinned")
}

/// The verdict of a SYN from `client` to `vip`.
fn syn(dp: &mut Dataplane, client: &str, vip: &str) -> u32 {
    dp.run(
        &Frame::tcp(sa(client), sa(vip), TCP_SYN).build(),
        Ingress::Client,
    )
    .expect("run")
    .verdict
}

#[test]
fn a_vip_has_its_bit_while_a_service_needs_it() {
    if !privileged_or_skip("a_vip_has_its_bit_while_a_service_needs_it") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-vipf");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        dp.apply(&doc(Some(&["tcp", "udp"])));
        assert!(marked(&dir, WEB) && marked(&dir, DNS));
        assert!(!marked(&dir, X), "a backend's address is no VIP");
        assert_eq!(syn(dp, "198.18.0.2:40001", WEB), XDP_REDIRECT);

        // Not for a VIP: passed untouched and counted, as without the filter.
        let input = Frame::tcp(sa("198.18.0.2:40002"), sa(X), TCP_ACK).build();
        let before = dp.stats();
        let r = dp.run(&input, Ingress::Client).expect("run");
        assert_eq!((r.verdict, &r.out), (XDP_PASS, &input));
        assert_eq!(stat_delta(&before, &dp.stats()), vec![("pass_not_ours", 1)]);

        // The UDP service leaves, the TCP one on the same address and port keeps the bit.
        dp.apply(&doc(Some(&["tcp"])));
        assert!(marked(&dir, DNS), "another service is on the bit");
        assert_eq!(syn(dp, "198.18.0.2:40003", DNS), XDP_REDIRECT);
        // The last service on it leaves: cleared; the other VIP is untouched.
        dp.apply(&doc(None));
        assert!(!marked(&dir, DNS), "no service is left on the bit");
        assert!(marked(&dir, WEB));
        assert_eq!(syn(dp, "198.18.0.2:40004", DNS), XDP_PASS);
        assert_eq!(syn(dp, "198.18.0.2:40005", WEB), XDP_REDIRECT);
        // And back.
        dp.apply(&doc(Some(&["udp"])));
        assert!(marked(&dir, DNS));
    });
}

#[test]
fn every_service_pinned_gets_its_bit_before_the_program_runs() {
    if !privileged_or_skip("every_service_pinned_gets_its_bit_before_the_program_runs") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-vipf-up");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        dp.apply(&doc(Some(&["tcp"])));
    });
    // A pin directory as an agent without the map left it.
    std::fs::remove_file(lab.dir.join(MAP_VIP_FILTER)).expect("unpin lb_vipf_v1");
    let d = dir.clone();
    lab.run(move |dp| {
        assert!(marked(&d, WEB) && marked(&d, DNS), "filled by the loader");
        assert_eq!(syn(dp, "198.18.0.2:40011", DNS), XDP_REDIRECT);
        let fine = check(&d);
        assert_eq!((fine.set, fine.stale), (2, 0), "{fine:?}");
        assert!(fine.unmarked.is_empty(), "{fine:?}");
        // An older agent adds a service without setting its bit: `lbctl status` names it.
        unmark(&d, DNS);
        let hidden = check(&d);
        assert_eq!(hidden.unmarked, vec![format!("tcp {DNS}")], "{hidden:?}");
        assert_eq!((hidden.set, hidden.stale), (1, 0), "{hidden:?}");
        let maps = lbctl::dataplane::Maps::open(&d).expect("maps");
        let scrape = lbctl::metrics::Metrics::new().render(Some(&maps), &Default::default());
        assert!(
            scrape.contains("lb_services_unserved 1")
                && scrape.contains("lb_vip_filter_bits{bits=\"set\"} 1"),
            "{scrape}"
        );
        let text = lbctl::cli::filter_text(&hidden);
        assert!(
            text.contains("NOT SERVED:    1 service(s)") && text.contains(&format!("tcp {DNS}")),
            "{text}"
        );
        // A bit no service is on (a clear that failed): counted as such, harmless.
        assert!(
            !set_vip_bit(&d, sa("198.18.9.9:80"), true),
            "no service on it"
        );
        let stale = check(&d);
        assert_eq!((stale.set, stale.stale), (2, 1), "{stale:?}");
    });
    lab.run(move |dp| {
        assert!(marked(&dir, DNS), "set again by the next load");
        assert_eq!(syn(dp, "198.18.0.2:40012", DNS), XDP_REDIRECT);
    });
}
