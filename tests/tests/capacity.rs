//! The data plane's size is chosen when it is loaded: 100,000 services fit and each is served by
//! its own table; a data plane that is full says which setting to raise and keeps serving what it
//! holds; tables the machine cannot hold are refused before the kernel is asked for them.
use lb_common::{BACKEND_LIVE, Backend, Backend6, Member, MemberKey};
use lbctl::{
    dataplane::{self, TableConfig},
    model::{BackendSpec, BackendState, Desired, Proto, ServiceSpec, Vip},
};
use lbtest::{
    packet::{Frame, TCP_SYN},
    pktlab::{Ingress, PacketLab, XDP_REDIRECT, pinned_array},
    privileged_or_skip,
};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Service `s`'s VIP: 10.1.0.0 and up, port 80, TCP.
fn vip(s: u32) -> Vip {
    let n = u32::from(Ipv4Addr::new(10, 1, 0, 0)) + s;
    Vip {
        addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(n), 80)),
        proto: Proto::Tcp,
    }
}

/// Backend `i` of a pool: the three backend hosts the lab has neighbours for, many ports each.
fn backend(i: u32) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(198, 18, 1, 2 + (i % 3) as u8),
        20000 + (i / 3) as u16,
    ))
}

/// Service `s` served by the pool's backends `backends`, all active.
fn service(s: u32, backends: impl IntoIterator<Item = u32>) -> (Vip, ServiceSpec) {
    let mut spec = ServiceSpec::new(vip(s), None);
    for i in backends {
        spec.add_backend(BackendSpec {
            addr: backend(i),
            state: BackendState::Active,
            app: format!("/app-{s}").into(),
            task: format!("task-{s}-{i}").into(),
        });
    }
    (vip(s), spec)
}

/// `services` services of two backends each, drawn from a pool of `pool` backends.
fn desired(services: u32, pool: u32) -> Desired {
    (0..services)
        .map(|s| service(s, [s % pool, (s * 7 + 1) % pool]))
        .collect()
}

#[test]
fn a_hundred_thousand_services_are_each_served_by_their_own_table() {
    if !privileged_or_skip("a_hundred_thousand_services_are_each_served_by_their_own_table") {
        return;
    }
    const SERVICES: u32 = 100_000;
    const POOL: u32 = 1_500;
    // A small prime keeps the tables at 100,000 x 2 x 251 x 4 bytes (about 200 MB).
    let table = TableConfig::new(251, 0x5eed)
        .and_then(|t| t.with_flows(65_536))
        .and_then(|t| t.with_capacity(SERVICES, POOL, 2 * SERVICES))
        .expect("sizes");
    let lab = PacketLab::new("lbt-pkt-cap");
    lab.run_with(table, move |dp| {
        let want = desired(SERVICES, POOL);
        let applied = dp.writer().apply(&want);
        assert!(
            applied.failed.is_empty(),
            "{:?}",
            &applied.failed[..3.min(applied.failed.len())]
        );
        assert_eq!(applied.added.len(), SERVICES as usize);
        let state = dp.writer().state();
        assert_eq!(state.services.len(), SERVICES as usize);
        assert_eq!(state.backend_ids.len(), POOL as usize);
        let ids: std::collections::BTreeSet<u32> = state.services.values().map(|s| s.id).collect();
        assert_eq!(
            ids.len(),
            SERVICES as usize,
            "every service has an id of its own"
        );
        assert_eq!(
            ids.last(),
            Some(&(SERVICES - 1)),
            "ids are the lowest free ones"
        );

        // A SYN to every 97th service (and the last one) reaches one of that service's two
        // backends, the one the control plane reads from the same table. Each from its own
        // port: the backends are shared, and a second open flow from one client port through a
        // backend would be moved to another (see `port_clash` in tests/tests/packets.rs).
        let mut checked = 0;
        for s in (0..SERVICES).step_by(97).chain([SERVICES - 1]) {
            let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 20000 + checked as u16);
            let v = vip(s);
            let SocketAddr::V4(to) = v.addr else {
                unreachable!()
            };
            let r = dp
                .run(&Frame::tcp(client, to, TCP_SYN).build(), Ingress::Client)
                .expect("test run");
            assert_eq!(r.verdict, XDP_REDIRECT, "service {s}");
            let got = SocketAddrV4::new(
                Ipv4Addr::new(r.out[30], r.out[31], r.out[32], r.out[33]),
                u16::from_be_bytes([r.out[36], r.out[37]]),
            );
            assert!(
                want[&v].backends.contains_key(&SocketAddr::V4(got)),
                "service {s}: {got}"
            );
            assert_eq!(dp.pick(to, 6, client), Some(got), "service {s}");
            checked += 1;
        }
        assert_eq!(checked, SERVICES.div_ceil(97) + 1);

        // Half the services leave; as many others come: they take the freed ids.
        let mut next: Desired = desired(SERVICES, POOL)
            .into_iter()
            .filter(|(v, _)| {
                let SocketAddr::V4(a) = v.addr else {
                    unreachable!()
                };
                u32::from(*a.ip()) % 2 == 0
            })
            .collect();
        let more: Desired = desired(SERVICES + SERVICES / 2, POOL)
            .into_iter()
            .skip(SERVICES as usize)
            .collect();
        next.extend(more);
        let applied = dp.writer().apply(&next);
        assert!(
            applied.failed.is_empty(),
            "{:?}",
            &applied.failed[..3.min(applied.failed.len())]
        );
        assert_eq!(applied.removed.len(), (SERVICES / 2) as usize);
        assert_eq!(applied.added.len(), (SERVICES / 2) as usize);
        let last = vip(SERVICES + SERVICES / 2 - 1);
        let SocketAddr::V4(to) = last.addr else {
            unreachable!()
        };
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);
        let b = dp
            .pick(to, 6, client)
            .expect("the last new service is served");
        assert!(next[&last].backends.contains_key(&SocketAddr::V4(b)));
    });
}

#[test]
fn a_full_data_plane_names_the_setting_and_serves_what_it_holds() {
    if !privileged_or_skip("a_full_data_plane_names_the_setting_and_serves_what_it_holds") {
        return;
    }
    let table = TableConfig::new(251, 1)
        .and_then(|t| t.with_flows(4096))
        .and_then(|t| t.with_capacity(4, 8, 16))
        .expect("sizes");
    let lab = PacketLab::new("lbt-pkt-full");
    let dir = lab.dir.clone();
    lab.run_with(table, move |dp| {
        // Five services of two backends each, in a data plane with room for four.
        let five = desired(5, 6);
        let applied = dp.writer().apply(&five);
        assert_eq!(applied.added.len(), 4, "{applied:?}");
        assert_eq!(applied.failed.len(), 1, "{applied:?}");
        assert!(
            applied.failed[0].contains("all 4 service slots are in use (raise --max-services)"),
            "{applied:?}"
        );
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);
        let served = |dp: &lbtest::pktlab::Dataplane, s: u32| {
            let SocketAddr::V4(to) = vip(s).addr else {
                unreachable!()
            };
            dp.pick(to, 6, client).is_some()
        };
        assert_eq!((0..5).filter(|s| served(dp, *s)).count(), 4);

        // One leaves: the one left out gets its id on the next apply.
        let first = vip(0);
        let four: Desired = five.into_iter().filter(|(v, _)| *v != first).collect();
        let applied = dp.writer().apply(&four);
        assert!(applied.failed.is_empty(), "{applied:?}");
        assert_eq!(applied.removed, vec![first.to_string()]);
        assert!((1..5).all(|s| served(dp, s)));
        assert!(!served(dp, 0));

        // Backends: 8 fit, the ninth is refused by name, and its service keeps what it had.
        let mut wide = four.clone();
        // Service 1 keeps its two backends (1 and 2 of the pool of 6) and asks for four more.
        wide.extend([service(1, [1, 2, 100, 101, 102, 103])]);
        let applied = dp.writer().apply(&wide);
        assert_eq!(applied.failed.len(), 1, "{applied:?}");
        assert!(
            applied.failed[0].contains("raise --max-backends"),
            "{applied:?}"
        );
        assert!((1..5).all(|s| served(dp, s)));
        assert_eq!(
            dp.writer().state().services[&vip(1)].backends.len(),
            2,
            "service 1 keeps its two backends"
        );
        // ...in the kernel too: the memberships written before the failure were taken back.
        let id = dp.writer().state().services[&vip(1)].id;
        let members: aya::maps::HashMap<_, MemberKey, Member> = aya::maps::Map::from_map_data(
            aya::maps::MapData::from_pin(dir.join(lb_common::MAP_MEMBERS)).expect("pin"),
        )
        .and_then(|m| m.try_into())
        .expect("lb_member_v1");
        let of_service = members.keys().flatten().filter(|k| k.service == id).count();
        assert_eq!(of_service, 2, "memberships of service 1 in the kernel");

        // Memberships: 16 fit. Four services of the same five backends want 20: the ones that
        // do not fit are refused by name and keep their two.
        let crowded: Desired = (1..5).map(|sv| service(sv, 1..6)).collect();
        let applied = dp.writer().apply(&crowded);
        assert!(!applied.failed.is_empty(), "{applied:?}");
        assert!(
            applied
                .failed
                .iter()
                .all(|f| f.contains("all 16 membership slots are in use (raise --max-members)")),
            "{applied:?}"
        );
        let in_kernel = members.keys().flatten().count();
        let mirrored: usize = dp
            .writer()
            .state()
            .services
            .values()
            .map(|s| s.backends.len())
            .sum();
        assert_eq!(
            in_kernel, mirrored,
            "the kernel holds what the writer believes"
        );
        assert!(in_kernel <= 16);
        assert!((1..5).all(|s| served(dp, s)));
    });
}

#[test]
fn tables_the_machine_cannot_hold_are_refused_before_loading() {
    if !privileged_or_skip("tables_the_machine_cannot_hold_are_refused_before_loading") {
        return;
    }
    assert!(
        TableConfig::default()
            .with_capacity(0, 1, 1)
            .expect_err("no services")
            .contains("services must be from 1")
    );

    // 100,000 services of 131,071 slots: about 100 GB of tables, more than this machine has.
    let huge = TableConfig::new(131_071, 1)
        .and_then(|t| t.with_capacity(100_000, 4096, 65536))
        .expect("indexable");
    let dir = std::path::PathBuf::from("/sys/fs/bpf/lbt-cap-huge");
    let _ = dataplane::down(&dir);
    let err = dataplane::load_with(&dir, &huge)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("MiB of kernel memory") && err.contains("lower --max-services or --ring-size"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no map was created: {left:?}");
    let _ = dataplane::down(&dir);
}

#[test]
fn backend_slots_no_service_names_are_freed_when_the_maps_are_opened() {
    if !privileged_or_skip("backend_slots_no_service_names_are_freed_when_the_maps_are_opened") {
        return;
    }
    let table = TableConfig::new(251, 1)
        .and_then(|t| t.with_capacity(4, 8, 16))
        .expect("sizes");
    let lab = PacketLab::new("lbt-pkt-orphan");
    let dir = lab.dir.clone();
    lab.run_with(table, move |dp| {
        let applied = dp.writer().apply(&desired(2, 3));
        assert!(applied.failed.is_empty(), "{applied:?}");
        let used: Vec<u32> = dp.writer().state().backend_ids.values().copied().collect();
        // A writer that stopped between a backend's slot and its membership leaves the slot
        // live; two such slots, one in each family's array, at the last ids.
        let mut be: aya::maps::Array<_, Backend> = pinned_array(&dir, lb_common::MAP_BACKENDS);
        let mut be6: aya::maps::Array<_, Backend6> = pinned_array(&dir, lb_common::MAP_BACKENDS6);
        let left = Backend {
            addr: u32::from(Ipv4Addr::new(198, 18, 1, 9)).to_be(),
            port: 31000u16.to_be(),
            flags: BACKEND_LIVE,
            _pad: 0,
        };
        let left6 = Backend6 {
            addr: [0x2001_0db8u32.to_be(), 0, 0, 9u32.to_be()],
            port: 31000u16.to_be(),
            flags: BACKEND_LIVE,
            _pad: 0,
        };
        be.set(7, left, 0).expect("slot 7");
        be6.set(6, left6, 0).expect("slot 6");
        assert!(!used.contains(&7) && !used.contains(&6), "{used:?}");

        let live = |id: u32| {
            be.get(&id, 0).expect("lb_be_v1").flags & BACKEND_LIVE != 0
                || be6.get(&id, 0).expect("lb_be6_v1").flags & BACKEND_LIVE != 0
        };
        *dp.writer() = dataplane::Writer::open(&dir).expect("writer");
        assert!(!live(7) && !live(6), "the slots no service names are free");
        assert!(
            used.iter().all(|id| live(*id)),
            "the services' backends stay"
        );
        assert!(dp.writer().apply(&desired(2, 3)).is_noop());
    });
}
