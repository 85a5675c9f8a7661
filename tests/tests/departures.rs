//! What a service id carries from one service to the next. `lb_svcdep_v1`, the departures count
//! of each service id, which lets a tracked flow's packet whose entry was noted lately go to its
//! backend without the service's lookup: a service that leaves, and another service that takes
//! its id, end the notes taken before; a data plane pinned without the map, or whose counts an
//! older agent left behind, gets every service's count before the program runs. And the traffic
//! counters of a service id, and of a backend slot, which start at zero for each service or
//! backend that takes the id, also when the writer opened maps it made itself
//! (`Writer::open_made`, as the agent does on a fresh data plane), which writes no zeroes over
//! the kernel's for an id nothing has had yet.
use lb_common::MAP_DEPARTURES;
use lbctl::dataplane::{ServiceView, Writer};
use lbtest::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    pktlab::{
        Dataplane, Ingress, PacketLab, XDP_PASS, XDP_REDIRECT, app, apps, pinned_array, running,
        set_vip_bit, stat_delta,
    },
    privileged_or_skip,
};
use std::{net::SocketAddrV4, path::Path};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("address")
}

const WEB: &str = "172.16.0.1:8080";
const OTHER: &str = "172.16.0.5:8080";
const X: &str = "198.18.1.2:31000";
const Y: &str = "198.18.1.3:31001";
const CLIENT: &str = "198.18.0.2:40001";

/// The pinned service of `vip`: (id, departures), and the id's count in `lb_svcdep_v1`.
fn counts(dir: &Path, vip: &str) -> (u32, u32, u32) {
    let maps = lbctl::dataplane::Maps::open(dir).expect("maps");
    let state = maps.read().expect("read");
    let key = lbctl::model::Vip {
        addr: sa(vip).into(),
        proto: lbctl::model::Proto::Tcp,
    };
    let svc = &state.services[&key];
    let held: u32 = pinned_array::<u32>(dir, MAP_DEPARTURES)
        .get(&svc.id, 0)
        .expect("count");
    (svc.id, svc.departures, held)
}

/// `/web` on WEB with `tasks`.
fn web(tasks: &[&str]) -> String {
    let tasks: Vec<_> = tasks.iter().map(|t| running(sa(t))).collect();
    apps(vec![app("/web", "tcp", &[("VIP_0", WEB)], &tasks)])
}

fn run(dp: &mut Dataplane, flags: u8, payload: &[u8]) -> u32 {
    dp.run(
        &Frame::tcp(sa(CLIENT), sa(WEB), flags)
            .payload(payload)
            .build(),
        Ingress::Client,
    )
    .expect("run")
    .verdict
}

#[test]
fn a_removed_services_flow_is_not_sent_on_by_its_note() {
    if !privileged_or_skip("a_removed_services_flow_is_not_sent_on_by_its_note") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-dep");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        // X serves both VIPs, so its slot stays live when /web leaves.
        dp.apply(&web(&[X]));
        let (id, departures, held) = counts(&dir, WEB);
        assert_eq!(held, departures, "the id holds its service's count");
        assert_eq!(run(dp, TCP_SYN, b""), XDP_REDIRECT);
        // Tracked and noted: sent on without the service's lookup.
        let before = dp.stats();
        assert_eq!(run(dp, TCP_ACK, b"one"), XDP_REDIRECT);
        assert_eq!(
            stat_delta(&before, &dp.stats()),
            vec![("forwarded", 1), ("redirect", 1)]
        );

        // /web leaves; /other, on X too, takes its id.
        dp.apply(&apps(vec![app(
            "/other",
            "tcp",
            &[("VIP_0", OTHER)],
            &[running(sa(X)), running(sa(Y))],
        )]));
        let (reused, started, now_held) = counts(&dir, OTHER);
        assert_eq!(reused, id, "the id is reused");
        // Removing /web raised the id's count once; the service new to the id starts one above.
        assert_eq!(
            started,
            departures + 2,
            "the new service starts above the count its id's removal left"
        );
        assert_eq!(now_held, started);
        // WEB's bit stays set (another VIP on it, or a clear that failed): only the count keeps
        // the old note from sending the flow on to X.
        set_vip_bit(&dir, sa(WEB), true);
        let before = dp.stats();
        assert_eq!(run(dp, TCP_ACK, b"two"), XDP_PASS, "no VIP any more");
        assert_eq!(stat_delta(&before, &dp.stats()), vec![("pass_not_ours", 1)]);
    });
}

#[test]
fn every_pinned_services_count_is_there_before_the_program_runs() {
    if !privileged_or_skip("every_pinned_services_count_is_there_before_the_program_runs") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-dep-up");
    let dir = lab.dir.clone();
    let d = dir.clone();
    lab.run(move |dp| {
        dp.apply(&web(&[X, Y]));
        // Y leaves: a departure.
        dp.apply(&web(&[X]));
        let (_, departures, held) = counts(&d, WEB);
        assert_eq!(held, departures, "raised with the service's");
        assert_eq!(run(dp, TCP_SYN, b""), XDP_REDIRECT);
    });
    // A pin directory as an agent without the map left it.
    std::fs::remove_file(lab.dir.join(MAP_DEPARTURES)).expect("unpin lb_svcdep_v1");
    let d = dir.clone();
    lab.run(move |dp| {
        let (id, departures, held) = counts(&d, WEB);
        assert_ne!(departures, 0, "a count to copy");
        assert_eq!(held, departures, "copied by the loader");
        assert_eq!(run(dp, TCP_ACK, b"tracked"), XDP_REDIRECT);
        // An older agent raised the service's count without the map's.
        pinned_array::<u32>(&d, MAP_DEPARTURES)
            .set(id, departures.wrapping_sub(1), 0)
            .expect("write");
    });
    lab.run(move |dp| {
        let (_, departures, held) = counts(&dir, WEB);
        assert_eq!(held, departures, "copied again by the next load");
        assert_eq!(run(dp, TCP_ACK, b"again"), XDP_REDIRECT);
    });
}

fn view(dp: &Dataplane, vip: &str) -> ServiceView {
    dp.maps()
        .views()
        .expect("views")
        .into_iter()
        .find(|v| v.vip == vip)
        .unwrap_or_else(|| panic!("no service {vip}"))
}

/// (packets, bytes, new flows) of the service, and of its backend `addr`.
fn traffic(dp: &Dataplane, vip: &str, addr: &str) -> [(u64, u64, u64); 2] {
    let v = view(dp, vip);
    let b = v
        .backends
        .iter()
        .find(|b| b.address == addr)
        .unwrap_or_else(|| panic!("no backend {addr} in {vip}"));
    [
        (v.packets, v.bytes, v.new_flows),
        (b.packets, b.bytes, b.new_flows),
    ]
}

/// Serves `vip` (app `name`) by `backend` alone, in place of whatever the maps held: what was
/// there leaves first, so that its ids are free.
fn serve_alone(dp: &mut Dataplane, name: &str, vip: &str, backend: &str) {
    dp.apply(&apps(vec![]));
    dp.apply(&apps(vec![app(
        name,
        "tcp",
        &[("VIP_0", vip)],
        &[running(sa(backend))],
    )]));
}

/// A new flow's SYN and an ACK to `vip`, both sent on to a backend.
fn send_two(dp: &mut Dataplane, vip: &str) {
    for flags in [TCP_SYN, TCP_ACK] {
        let frame = Frame::tcp(sa(CLIENT), sa(vip), flags).build();
        let run = dp.run(&frame, Ingress::Client).expect("run");
        assert_eq!(run.verdict, XDP_REDIRECT);
    }
}

/// The service id of `vip` and the backend slot of `addr` in it.
fn ids(dp: &mut Dataplane, vip: &str, addr: &str) -> (u32, u32) {
    let key = lbctl::model::Vip {
        addr: sa(vip).into(),
        proto: lbctl::model::Proto::Tcp,
    };
    let svc = &dp.writer().state().services[&key];
    (svc.id, svc.backends[&sa(addr).into()].0)
}

#[test]
fn a_reused_id_starts_at_zero_on_maps_the_writer_made() {
    if !privileged_or_skip("a_reused_id_starts_at_zero_on_maps_the_writer_made") {
        return;
    }
    let lab = PacketLab::new("lbt-pkt-ctr");
    let dir = lab.dir.clone();
    lab.run(move |dp| {
        // The lab's load made the maps in a directory of its own: as the agent's are.
        *dp.writer() = Writer::open_made(&dir).expect("writer");
        serve_alone(dp, "/web", WEB, X);
        assert_eq!(
            traffic(dp, WEB, X),
            [(0, 0, 0); 2],
            "a new id starts at zero"
        );
        send_two(dp, WEB);
        let [svc, be] = traffic(dp, WEB, X);
        assert_eq!((svc.0, svc.2, be.0, be.2), (2, 1, 2, 1), "counted");
        let web_ids = ids(dp, WEB, X);

        // /web leaves and X with it; then /other takes the service id, and Y the backend slot.
        serve_alone(dp, "/other", OTHER, Y);
        assert_eq!(ids(dp, OTHER, Y), web_ids, "the ids are reused");
        assert_eq!(
            traffic(dp, OTHER, Y),
            [(0, 0, 0); 2],
            "the service and backend that took the ids start at zero"
        );

        // Maps that hold a service were not made empty: a writer opened on them with
        // `open_made` zeroes every id it gives out, as `open` does.
        send_two(dp, OTHER);
        assert_ne!(traffic(dp, OTHER, Y), [(0, 0, 0); 2], "counted");
        *dp.writer() = Writer::open_made(&dir).expect("writer");
        serve_alone(dp, "/web", WEB, X);
        assert_eq!(ids(dp, WEB, X), web_ids, "the ids are reused again");
        assert_eq!(traffic(dp, WEB, X), [(0, 0, 0); 2], "zeroed again");
    });
}
