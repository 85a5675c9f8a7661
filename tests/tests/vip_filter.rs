//! `lb_vipf_v1`, the VIPs' bits in front of the service maps: a service's bit is set while it
//! exists and cleared once no service is left on it; a packet whose destination has no bit is
//! passed (and counted) as before, one to a VIP served as before; a data plane pinned without
//! the map, or whose map misses a service (an older agent wrote to it), gets every service's
//! bit before the program runs; `lbctl status` names a service whose bit is clear and counts the
//! bits no service is on. The filter's size follows the room for services, in the program as in
//! the agent, and a resize that changes it puts every service on its bit in the new one.
use lb_common::MAP_VIP_FILTER;
use lbctl::dataplane::TableConfig;
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{
        Dataplane, Ingress, PacketLab, XDP_PASS, XDP_REDIRECT, app, apps, pinned_array, running,
        set_vip_bit, stat_delta, vip_bit, vip_filter_words, vip_marked,
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

/// A VIP of 172.16.0.0/24 on port 8080 whose bit in a filter of `words` words is in its upper
/// half: a program taking the bit with half that size would look at another word.
fn vip_in_upper_half(words: u32) -> SocketAddrV4 {
    (1..=255u8)
        .map(|i| SocketAddrV4::new([172, 16, 0, i].into(), 8080))
        .find(|v| vip_bit(*v, words).0 >= words / 2)
        .expect("half of the VIPs are there")
}

/// The filter pinned in `dir` has `words` words and the bits of WEB and `vip_in_upper_half`, and
/// no other.
fn filter_holds_both(dir: &Path, words: u32) {
    let c = check(dir);
    assert_eq!(
        (c.bits, c.set, c.stale),
        (u64::from(words) * 64, 2, 0),
        "{c:?}"
    );
    assert!(c.unmarked.is_empty(), "{c:?}");
    assert!(marked(dir, WEB) && vip_marked(dir, vip_in_upper_half(words)));
}

#[test]
fn the_filter_grows_with_the_room_for_services_and_a_resize_moves_its_bits() {
    if !privileged_or_skip(
        "the_filter_grows_with_the_room_for_services_and_a_resize_moves_its_bits",
    ) {
        return;
    }
    let small = TableConfig::new(1021, 0x5eed)
        .and_then(|t| t.with_capacity(1024, 128, 512))
        .expect("small sizes");
    let big = small.with_capacity(20_000, 128, 512).expect("big sizes");
    let (small_words, big_words) = (
        lb_common::vip_filter_words(small.services),
        lb_common::vip_filter_words(big.services),
    );
    assert_eq!((small_words, big_words), (4096, 8192));
    let far = vip_in_upper_half(big_words);
    let far_doc = move || {
        apps(vec![
            app("/web", "tcp", &[("VIP_0", WEB)], &[running(sa(X))]),
            app(
                "/far",
                "tcp",
                &[("VIP_0", &far.to_string())],
                &[running(sa(Y))],
            ),
        ])
    };

    // Made with room for 20,000 services: 8,192 words, used as such by the program.
    let lab = PacketLab::new("lbt-pkt-vipf-big");
    let dir = lab.dir.clone();
    lab.run_with(big, move |dp| {
        dp.apply(&far_doc());
        assert_eq!(vip_filter_words(&dir), big_words);
        filter_holds_both(&dir, big_words);
        // The same bit in a filter of half the size is clear: a program that took that size
        // would pass the VIP's packets as not ours.
        let (word, bit) = vip_bit(far, big_words);
        let lower = pinned_array::<u64>(&dir, MAP_VIP_FILTER)
            .get(&(word - big_words / 2), 0)
            .expect("a word");
        assert_eq!(lower & bit, 0, "another VIP on the lower half's bit");
        assert_eq!(syn(dp, "198.18.0.2:40021", &far.to_string()), XDP_REDIRECT);
    });
    drop(lab);

    // Made small, then resized past 16,384 services: the filter grows, every service keeps a
    // bit (at its place in the larger filter), and the VIPs are served.
    let lab = PacketLab::new("lbt-pkt-vipf-grow");
    let (dir, d) = (lab.dir.clone(), lab.dir.clone());
    lab.run_with(small, move |dp| {
        dp.apply(&far_doc());
        assert_eq!(vip_filter_words(&dir), small_words);
        assert_eq!(syn(dp, "198.18.0.2:40022", &far.to_string()), XDP_REDIRECT);
        let attached = lbctl::dataplane::attach(&dir, &[], &big).expect("resizing");
        assert!(attached.attached.is_empty() && attached.replaced.is_empty());
    });
    let d2 = d.clone();
    lab.run_with(big, move |dp| {
        assert_eq!(vip_filter_words(&d), big_words);
        filter_holds_both(&d, big_words);
        assert_eq!(syn(dp, "198.18.0.2:40023", &far.to_string()), XDP_REDIRECT);
        assert_eq!(syn(dp, "198.18.0.2:40024", WEB), XDP_REDIRECT);
    });

    // A filter of the smallest size where there is room for 20,000 services, as an agent from
    // before the filter grew left it: the next load replaces it with one of the right size and
    // marks every service in it.
    let old = PacketLab::new("lbt-pkt-vipf-old");
    old.run_with(small, |_| {});
    std::fs::rename(old.dir.join(MAP_VIP_FILTER), d2.join(MAP_VIP_FILTER))
        .expect("pinning the smaller filter in its place");
    assert_eq!(vip_filter_words(&d2), small_words);
    let d = d2.clone();
    lab.run_with(big, move |dp| {
        assert_eq!(vip_filter_words(&d), big_words, "grown at the load");
        filter_holds_both(&d, big_words);
        assert_eq!(syn(dp, "198.18.0.2:40025", &far.to_string()), XDP_REDIRECT);
    });
}
