//! Every agent given the same Marathon state sends every flow to the same backend: two real agents
//! in two load-balancer namespaces, and two data planes filled independently by the agent's
//! writer (one seeing the backends arrive in another order), agree with each other and with
//! `lbctl simulate --apps` (computed in user space) on 10,000 flows.
use lbctl::{
    dataplane::{self, Maps, Writer},
    marathon::{self, Options},
    model::{Proto, Vip},
};
use lbtest::{
    pktlab::{Task, app},
    privileged_or_skip,
};
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
};

/// Removes a pin directory on drop, also when the test fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = dataplane::down(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 10,000 client addresses and ports from 198.18.0.0/15, from a xorshift generator.
fn clients(mut x: u64) -> impl Iterator<Item = SocketAddrV4> {
    (0..10_000).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        SocketAddrV4::new(
            Ipv4Addr::from(0xc612_0000 | (x as u32 & 0x1_ffff)),
            1024 + (x >> 40) as u16 % 60000,
        )
    })
}

#[test]
fn same_state_same_backend_everywhere() {
    if !privileged_or_skip("same_state_same_backend_everywhere") {
        return;
    }
    let mut tasks: Vec<Task> = (1..=7u8)
        .map(|i| {
            lbtest::pktlab::running(SocketAddrV4::new(
                Ipv4Addr::new(198, 18, i, 2),
                31000 + i as u16,
            ))
        })
        .collect();
    tasks[3].state = "TASK_KILLING"; // a draining backend takes no new flow
    let doc =
        serde_json::json!({"apps": [app("/web", "tcp", &[("VIP_0", "172.16.0.1:8080")], &tasks)]})
            .to_string();
    let (_, derived) = marathon::derive(&doc, "doc", &Options::default()).expect("derive");
    let vip = Vip {
        addr: "172.16.0.1:8080".parse().expect("vip"),
        proto: Proto::Tcp,
    };
    let spec = derived.services.get(&vip).expect("service");

    // Two data planes, as two agents on two machines would build them; the second sees the
    // backends arrive in another order (a scale-up), which must not matter.
    let a = Pins(PathBuf::from("/sys/fs/bpf/lbt-det-a"));
    let b = Pins(PathBuf::from("/sys/fs/bpf/lbt-det-b"));
    for p in [&a, &b] {
        let _ = dataplane::down(&p.0);
    }
    let _ea = dataplane::load(&a.0).expect("load a");
    let _eb = dataplane::load(&b.0).expect("load b");
    let applied = Writer::open(&a.0)
        .expect("writer a")
        .apply(&derived.services);
    assert!(applied.failed.is_empty(), "{applied:?}");
    let mut wb = Writer::open(&b.0).expect("writer b");
    let few = serde_json::json!({"apps": [app("/web", "tcp", &[("VIP_0", "172.16.0.1:8080")], &tasks[4..])]})
        .to_string();
    let (_, first) = marathon::derive(&few, "few", &Options::default()).expect("derive");
    assert!(wb.apply(&first.services).failed.is_empty());
    assert!(wb.apply(&derived.services).failed.is_empty());
    let (ma, mb) = (
        Maps::open(&a.0).expect("maps a"),
        Maps::open(&b.0).expect("maps b"),
    );

    let mut seen = std::collections::BTreeMap::new();
    for (i, src) in clients(0x5eed_1234_abcd_ef01).enumerate() {
        let pa = ma.pick(&vip, src).expect("pick a");
        let pb = mb.pick(&vip, src).expect("pick b");
        let pu = dataplane::predict(spec, src, &Default::default());
        assert!(pa.is_some(), "flow {i} from {src} got no backend");
        assert_eq!(pa, pb, "flow {i} from {src}: the two data planes disagree");
        assert_eq!(
            pa, pu,
            "flow {i} from {src}: user-space prediction disagrees"
        );
        *seen.entry(pa.expect("some")).or_insert(0u32) += 1;
    }
    // Six active backends share the flows; the draining one gets none.
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(
        !seen.keys().any(|a| a.to_string() == "198.18.4.2:31004"),
        "{seen:?}"
    );
    assert!(seen.values().all(|n| (1200..=2200).contains(n)), "{seen:?}");

    // Another table size and seed (a smaller prime): the kernel and the prediction still agree,
    // and a data plane pinned with one size refuses to be loaded with another.
    let small = dataplane::TableConfig::new(1021, 0x1234)
        .and_then(|t| t.with_flows(4096))
        .and_then(|t| t.with_capacity(64, 128, 512))
        .expect("a prime, a flow table size and a capacity");
    let c = Pins(PathBuf::from("/sys/fs/bpf/lbt-det-c"));
    let _ = dataplane::down(&c.0);
    let _ec = dataplane::load_with(&c.0, &small).expect("load c");
    assert!(
        Writer::open(&c.0)
            .expect("writer c")
            .apply(&derived.services)
            .failed
            .is_empty()
    );
    let mc = Maps::open(&c.0).expect("maps c");
    assert_eq!(mc.table().expect("table"), small);
    for (name, entries) in [
        (lb_common::MAP_FLOWS, 4096),
        (lb_common::MAP_REPLIES6, 4096),
        (lb_common::MAP_SERVICES, 64),
        (lb_common::MAP_SERVICES6, 64),
        (lb_common::MAP_SERVICE_TRAFFIC, 64),
        (lb_common::MAP_BACKENDS, 128),
        (lb_common::MAP_BACKEND_TRAFFIC, 128),
        (lb_common::MAP_MEMBERS, 512),
        // 64 services x 2 tables x 1021 slots, 16 slots an element.
        (lb_common::MAP_RING, 64 * 2 * 64),
    ] {
        let info = aya::maps::MapData::from_pin(c.0.join(name))
            .and_then(|m| m.info())
            .expect("map info");
        assert_eq!(info.max_entries(), entries, "{name}");
    }
    let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 4321);
    assert_eq!(
        mc.pick(&vip, src).expect("pick"),
        dataplane::predict(spec, src, &small)
    );
    let refused = dataplane::load_with(&c.0, &Default::default())
        .expect_err("a second size is refused")
        .to_string();
    assert!(
        refused.contains("tables of 1021 slots")
            && refused.contains("room for 64 services")
            && refused.contains("lbctl down"),
        "{refused}"
    );
    assert!(
        dataplane::TableConfig::new(1000, 0).is_err(),
        "1000 is not a prime"
    );
    assert!(
        dataplane::TableConfig::new(131_101, 0).is_err(),
        "above the largest size"
    );

    // The command line gives the same answer, from the kernel and from the file.
    let dir = std::env::temp_dir().join(format!("lbtest-det-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("apps.json");
    std::fs::write(&file, &doc).expect("write");
    let src = "198.18.0.2:40000";
    let run = |args: &[&str]| {
        let out = Command::new(lbtest::lbctl_bin())
            .args(args)
            .output()
            .expect("lbctl");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let from_kernel = run(&[
        "simulate",
        "--vip",
        "172.16.0.1:8080",
        "--src",
        src,
        "--pin-dir",
        "/sys/fs/bpf/lbt-det-a",
    ]);
    let from_file = run(&[
        "simulate",
        "--vip",
        "172.16.0.1:8080",
        "--src",
        src,
        "--apps",
        file.to_str().expect("path"),
    ]);
    assert_eq!(from_kernel, from_file);
    assert_eq!(
        from_kernel,
        ma.pick(&vip, src.parse::<SocketAddrV4>().expect("src"))
            .expect("pick")
            .expect("some")
            .to_string()
    );

    // Two real agents, in two load-balancer namespaces, given the same document.
    let mut labs = [
        lbtest::Lab::new("lbt-det1", 1),
        lbtest::Lab::new("lbt-det2", 1),
    ];
    for (i, lab) in labs.iter_mut().enumerate() {
        lab.start_agent(&file, &dir.join(format!("agent{i}.log")));
    }
    for (i, lab) in labs.iter().enumerate() {
        lab.wait_for_kernel(std::time::Duration::from_secs(20), |s| s.len() == 1)
            .unwrap_or_else(|e| {
                panic!(
                    "agent {i}: {e}\n{}",
                    lbtest::read_log(&dir.join(format!("agent{i}.log")))
                )
            });
    }
    let agents: Vec<Maps> = labs
        .iter()
        .map(|l| Maps::open(&l.pin_dir).expect("maps"))
        .collect();
    for (i, src) in clients(0x0dd_ba11).enumerate() {
        let one = agents[0].pick(&vip, src).expect("pick");
        assert!(one.is_some(), "flow {i} got no backend");
        assert_eq!(
            one,
            agents[1].pick(&vip, src).expect("pick"),
            "flow {i} from {src}: the agents disagree"
        );
        assert_eq!(
            one,
            dataplane::predict(spec, src, &Default::default()),
            "flow {i} from {src}: the prediction disagrees"
        );
    }
    for lab in labs.iter_mut() {
        lab.stop_agents(false);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
