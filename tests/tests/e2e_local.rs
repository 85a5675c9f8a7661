//! The local path end to end (issue 15): `lbctl agent --local --cgroup <the test's own child
//! cgroup>` in the flat lab (client and backends on one bridge, no load balancer in the path),
//! clients as processes of their own inside that cgroup or outside it.
use lbtest::{
    local_lab::{LocalLab, TestCgroup, run_client},
    privileged_or_skip, read_log, wait_log, write_atomically,
};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

const PORT: u16 = 8080;
const VIP: &str = "172.16.0.1:80";
const VIP6: &str = "[fd00:172:16::1]:80";
const MAPPED: &str = "[::ffff:172.16.0.1]:80";
/// A VIP whose only task is being killed: no backend takes new connections.
const EMPTY: &str = "172.16.0.9:80";

fn task(app: &str, name: &str, host: String, state: &str) -> Value {
    json!({"id": format!("{app}.{name}"), "appId": format!("/{app}"), "host": host,
           "ports": [PORT], "state": state, "startedAt": "2026-11-25T00:00:00.000Z"})
}

/// The apps: `web` (VIP, IPv4 tasks `v4`), `web6` (VIP6, IPv6 tasks), `empty` (EMPTY).
fn apps(lab: &LocalLab, v4: &[usize], v6: &[usize]) -> String {
    let b = &lab.backends;
    let web = v4
        .iter()
        .map(|&i| task("web", &b[i].name, b[i].addr.to_string(), "TASK_RUNNING"))
        .collect();
    doc(lab, web, v6)
}

/// The three apps with these tasks of `web`.
fn doc(lab: &LocalLab, web: Vec<Value>, v6: &[usize]) -> String {
    let b = &lab.backends;
    json!({"apps": [
        {"id": "/web", "portDefinitions": [{"protocol": "udp,tcp", "labels": {"VIP_0": VIP}}],
         "tasks": web},
        {"id": "/web6", "portDefinitions": [{"protocol": "udp,tcp", "labels": {"VIP_0": "fd00:172:16::1:80"}}],
         "tasks": v6.iter().map(|&i| task("web6", &b[i].name, b[i].addr6.to_string(), "TASK_RUNNING")).collect::<Vec<_>>()},
        {"id": "/empty", "portDefinitions": [{"protocol": "udp,tcp", "labels": {"VIP_0": EMPTY}}],
         "tasks": [task("empty", "gone", b[0].addr.to_string(), "TASK_KILLING")]}
    ]})
    .to_string()
}

/// `web` with b1 draining and the running backends `running`.
fn drained(lab: &LocalLab, running: &[usize]) -> String {
    let b = &lab.backends;
    let mut web = vec![task("web", "b1", b[0].addr.to_string(), "TASK_KILLING")];
    web.extend(
        running
            .iter()
            .map(|&i| task("web", &b[i].name, b[i].addr.to_string(), "TASK_RUNNING")),
    );
    doc(lab, web, &[0])
}

/// Answers by backend name; panics on a line that is not `ok <name> <peer> [cookie]` with
/// `peer`.
fn answers(lines: &[String], peer: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        assert!(
            (3..=4).contains(&f.len()) && f[0] == "ok" && f[2] == peer,
            "expected `ok <backend> {peer}`, got `{l}`"
        );
        *out.entry(f[1].to_string()).or_insert(0) += 1;
    }
    out
}

fn assert_spread(got: &BTreeMap<String, usize>, total: usize, what: &str) {
    assert_spread_over(got, &["b1", "b2", "b3"], total, what);
}

fn assert_spread_over(got: &BTreeMap<String, usize>, over: &[&str], total: usize, what: &str) {
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(names, over, "{what}: {got:?}");
    assert_eq!(got.values().sum::<usize>(), total, "{what}: {got:?}");
    // 200 over three backends through a Maglev table: each well above a tenth.
    assert!(got.values().all(|&n| n >= total / 10), "{what}: {got:?}");
}

/// How many backends of the TCP service of VIP take new connections (`lbctl list --json`: the
/// service's entry, written after its memberships and table).
fn web_active(list: &Value) -> Option<u64> {
    list["services"]
        .as_array()?
        .iter()
        .find(|s| s["vip"] == VIP && s["protocol"] == "tcp")?["active"]
        .as_u64()
}

fn stats(lab: &LocalLab) -> Value {
    serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("lbctl stats --json")
}

fn start(lab: &mut LocalLab, doc: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let apps = lab.dir.join("apps.json");
    let log = lab.dir.join("agent.log");
    write_atomically(&apps, doc);
    lab.start_agent(&apps, &[], &log);
    lab.wait_list(
        Duration::from_secs(20),
        |v| v["services"].as_array().is_some_and(|s| s.len() == 6),
        "the agent serving the three apps (TCP and UDP each)",
    );
    (apps, log)
}

#[test]
fn local_path_balances_v4_v6_mapped_refuses_and_leaves_others_alone() {
    if !privileged_or_skip("local_path_balances_v4_v6_mapped_refuses_and_leaves_others_alone") {
        return;
    }
    let mut lab = LocalLab::new("lbt-lo1", 3);
    for i in 0..3 {
        lab.serve(i, PORT);
    }
    let doc = apps(&lab, &[0, 1, 2], &[0, 1, 2]);
    let (_, log) = start(&mut lab, &doc);
    // The agent logs it just after attaching, so it may follow the attachment seen above.
    wait_log(&log, "local path", Duration::from_secs(5));
    // The nine programs, once each, on the test's cgroup.
    assert!(
        lab.attached_programs().iter().all(|&(_, n)| n == 1),
        "{:?}",
        lab.attached_programs()
    );

    for (vip, what) in [(VIP, "IPv4"), (VIP6, "IPv6"), (MAPPED, "v4-mapped")] {
        let tcp = lab.client(true, &["tcp", vip, "200"]);
        assert_spread(&answers(&tcp, vip), 200, &format!("TCP {what}"));
        if what == "IPv4" {
            simulate_agrees(&lab, &tcp[..20]);
        }
        let udp = lab.client(true, &["udp", vip, "200"]);
        assert_spread(&answers(&udp, vip), 200, &format!("UDP {what}"));
    }

    // Outside the cgroup nothing is rewritten: the VIP has no route in the flat lab.
    let outside = lab.client(false, &["tcp", VIP, "1"]);
    assert!(
        outside[0].starts_with(&format!("err {} ", libc::ENETUNREACH)),
        "a process outside the cgroup was load balanced: {outside:?}"
    );

    // No backend: refused at once, TCP and UDP, both families.
    let t = Instant::now();
    for (mode, vip) in [
        ("tcp", EMPTY),
        ("udp", EMPTY),
        ("tcp", "[::ffff:172.16.0.9]:80"),
    ] {
        let out = lab.client(true, &[mode, vip, "1"]);
        assert!(
            out[0].starts_with(&format!("err {} ", libc::ECONNREFUSED)),
            "{mode} {vip}: {out:?}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Hairpin: a task connecting to its own VIP, picked itself for some connections.
    let b1 = lab.backends[0].ns.clone();
    let hair = answers(&lab.client_in(&b1, true, &["tcp", VIP, "60"]), VIP);
    assert!(hair.get("b1").is_some_and(|&n| n > 0), "{hair:?}");
    assert_eq!(hair.values().sum::<usize>(), 60);

    let s = stats(&lab);
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    assert!(n("local_connect") >= 600 + 60, "{s}");
    assert!(n("local_udp_pick") >= 600, "{s}");
    assert!(n("local_refused") >= 3, "{s}");
    assert!(n("local_reverse") >= 1200, "{s}");
    // Every closed TCP connection took its entries with it (the UDP sockets were unconnected).
    assert!(n("local_released") >= 600 + 60, "{s}");
    // The gateway's packet counters saw nothing: no packet was rewritten.
    assert_eq!(n("new_flow"), 0, "{s}");
    // Per service and backend in `lbctl list`; the cgroup in the status.
    let list: Value = serde_json::from_str(&lab.lbctl(&["list", "--json"])).expect("list");
    let web = list["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["vip"] == VIP && s["protocol"] == "tcp")
        .expect("the TCP service of VIP");
    assert!(web["local_connections"].as_u64() >= Some(200 + 60), "{web}");
    assert!(
        web["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .all(|b| b["local_connections"].as_u64() > Some(0)),
        "{web}"
    );
    let status = lbtest::sh(&[
        lbtest::lbctl_bin().to_str().expect("path"),
        "status",
        "--json",
        "--socket",
        lab.status_socket().to_str().expect("path"),
        "--pin-dir",
        lab.pin_dir.to_str().expect("path"),
    ]);
    let status: Value = serde_json::from_str(&status).expect("status --json");
    assert_eq!(
        status["agent"]["local"]["cgroup"].as_str(),
        lab.cgroup.to_str(),
        "{status}"
    );
    // No interface: no packet program was loaded, so none has an id.
    assert_eq!(status["agent"]["program_id"].as_u64(), Some(0), "{status}");
}

/// `lbctl simulate --local --cookie C` names the backend the kernel gave the socket of cookie C.
fn simulate_agrees(lab: &LocalLab, lines: &[String]) {
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        let out = lab.lbctl(&[
            "simulate", "--vip", VIP, "--local", "--cookie", f[3], "--json",
        ]);
        let v: Value = serde_json::from_str(&out).expect("simulate --json");
        let b = &lab.backends[f[1][1..].parse::<usize>().expect("bN") - 1];
        assert_eq!(
            v["backend"].as_str(),
            Some(format!("{}:{PORT}", b.addr).as_str()),
            "{l}: {v}"
        );
        assert_eq!(v["path"], "local");
    }
}

#[test]
fn local_path_survives_the_agent_adopts_drains_follows_marathon_and_goes_down() {
    if !privileged_or_skip(
        "local_path_survives_the_agent_adopts_drains_follows_marathon_and_goes_down",
    ) {
        return;
    }
    let mut lab = LocalLab::new("lbt-lo2", 3);
    for i in 0..3 {
        lab.serve(i, PORT);
    }
    let first = apps(&lab, &[0, 1], &[0]);
    let (apps, log) = start(&mut lab, &first);

    // Drain b1 with connections held to it: they stay, new ones avoid it.
    let mut held = lab.spawn_client(true, &["hold", VIP, "12"]);
    let mut before = Vec::new();
    loop {
        let l = held.line();
        if l == "held" {
            break;
        }
        before.push(l);
    }
    assert!(before.iter().any(|l| l == "ok b1"), "{before:?}");
    write_atomically(&apps, &drained(&lab, &[1]));
    lab.wait_list(
        Duration::from_secs(5),
        |v| web_active(v) == Some(1),
        "b1 draining (one active backend left)",
    );
    held.say("go");
    let after = held.finish();
    assert_eq!(after, before, "held connections moved or broke");
    let fresh = answers(&lab.client(true, &["tcp", VIP, "50"]), VIP);
    assert_eq!(fresh.keys().collect::<Vec<_>>(), ["b2"], "{fresh:?}");

    // A Marathon change (b3 added) is served within 2 s.
    write_atomically(&apps, &drained(&lab, &[1, 2]));
    let t = Instant::now();
    lab.wait_list(
        Duration::from_secs(2),
        |v| web_active(v) == Some(2),
        "b3 in the kernel within 2 s",
    );
    let mut seen_b3 = false;
    while t.elapsed() < Duration::from_secs(2) && !seen_b3 {
        seen_b3 = answers(&lab.client(true, &["tcp", VIP, "20"]), VIP).contains_key("b3");
    }
    assert!(seen_b3, "no connection reached b3 within 2 s of the change");

    // kill -9: the links stay, new connections are still balanced.
    lab.stop_agents(true);
    assert!(lab.attached_programs().iter().all(|&(_, n)| n == 1));
    assert_spread_over(
        &answers(&lab.client(true, &["tcp", VIP, "200"]), VIP),
        &["b2", "b3"],
        200,
        "after kill -9",
    );

    // A new agent adopts the links in place: still one program per hook, now its own.
    let log2 = lab.dir.join("agent2.log");
    lab.start_agent(&apps, &[], &log2);
    lbtest::wait_log(&log2, "replaced: [\"lb_connect4\"", Duration::from_secs(20));
    assert!(lab.attached_programs().iter().all(|&(_, n)| n == 1));
    assert_spread_over(
        &answers(&lab.client(true, &["tcp", VIP, "200"]), VIP),
        &["b2", "b3"],
        200,
        "after the restart",
    );

    // down: nothing of ours is left in the cgroup, and the VIP is not rewritten any more.
    lab.stop_agents(false);
    let out = lab.lbctl(&["down"]);
    assert!(out.contains("cgroup:lb_connect4"), "{out}");
    assert!(
        lab.attached_programs().iter().all(|&(_, n)| n == 0),
        "{:?}",
        lab.attached_programs()
    );
    let gone = lab.client(true, &["tcp", VIP, "1"]);
    assert!(gone[0].starts_with("err "), "{gone:?}\n{}", read_log(&log));
}

/// Long-lived UDP senders (unconnected and connected, IPv4 and v4-mapped IPv6), one datagram
/// every 100 ms for 10 s, while their backend is removed (and its task ends) and another added.
#[test]
fn long_lived_udp_senders_follow_their_backend_away() {
    if !privileged_or_skip("long_lived_udp_senders_follow_their_backend_away") {
        return;
    }
    let mut lab = LocalLab::new("lbt-lo3", 2);
    lab.serve(0, PORT);
    lab.serve(1, PORT);
    let b = lab.backends.clone();
    let only = |i: usize| {
        json!({"apps": [{"id": "/web", "portDefinitions": [{"protocol": "udp", "labels": {"VIP_0": VIP}}],
            "tasks": [task("web", &b[i].name, b[i].addr.to_string(), "TASK_RUNNING")]}]})
        .to_string()
    };
    let apps = lab.dir.join("apps.json");
    let log = lab.dir.join("agent.log");
    write_atomically(&apps, &only(0));
    lab.start_agent(&apps, &[], &log);
    lab.wait_list(
        Duration::from_secs(20),
        |v| v["services"].as_array().is_some_and(|s| s.len() == 1),
        "the UDP service",
    );
    let kinds = [
        (VIP, "unconnected"),
        (VIP, "connected"),
        (MAPPED, "unconnected"),
        (MAPPED, "connected"),
    ];
    let senders: Vec<_> = kinds
        .iter()
        .map(|(vip, how)| lab.spawn_client(true, &["udp-long", vip, "100", "100", how]))
        .collect();
    // After 3 s, b1 leaves Marathon (b2 comes), then its task ends (its port closes).
    std::thread::sleep(Duration::from_secs(3));
    write_atomically(&apps, &only(1));
    lab.wait_list(
        Duration::from_secs(2),
        |v| v.to_string().contains(&format!("{}:{PORT}", b[1].addr)),
        "b2 replacing b1",
    );
    lab.unserve(0);
    let mut total_ok = 0;
    for (s, (vip, how)) in senders.into_iter().zip(kinds) {
        let lines = s.finish();
        assert_eq!(lines.len(), 100, "{vip} {how}: {lines:?}");
        let ok: Vec<&String> = lines.iter().filter(|l| l.starts_with("ok ")).collect();
        total_ok += ok.len();
        // Every datagram after the change reached the live backend: the last answers are b2's.
        let tail: Vec<&String> = lines[lines.len() - 50..].iter().collect();
        assert!(
            tail.iter().all(|l| l.starts_with("ok b2 ")),
            "{vip} {how}: {lines:?}"
        );
        assert!(lines[0].starts_with("ok b1 "), "{vip} {how}: {lines:?}");
        if how == "unconnected" {
            let ports: std::collections::BTreeSet<&str> =
                lines.iter().filter_map(|l| l.rsplit(' ').next()).collect();
            assert_eq!(
                ports.len(),
                1,
                "{vip} {how}: the local port changed: {ports:?}"
            );
        }
    }
    assert!(total_ok * 100 >= 95 * 400, "{total_ok} of 400 delivered");
    let s = stats(&lab);
    assert!(s["local_repick"].as_u64().unwrap_or(0) >= 2, "{s}");
}

/// One agent serving both ways at once: the gateway (XDP on the load balancer's interfaces)
/// for a client outside the cgroup, the local path for one inside it.
#[test]
fn gateway_and_local_in_one_agent() {
    if !privileged_or_skip("gateway_and_local_in_one_agent") {
        return;
    }
    let mut lab = lbtest::Lab::new("lbt-lo4", 2);
    let _hits = lab.serve(PORT);
    let cgroup = TestCgroup::new("lbt-lo4");
    let dir = lbtest::TestDir::new("lo4");
    let apps = dir.join("apps.json");
    let log = dir.join("agent.log");
    write_atomically(
        &apps,
        &lbtest::apps_doc("web", "tcp", &[("VIP_0", VIP)], &lab.backends, PORT),
    );
    let source = [
        "--apps".to_string(),
        apps.display().to_string(),
        "--local".into(),
        "--cgroup".into(),
        cgroup.0.display().to_string(),
    ];
    lab.start_agent_with(&source, &[], &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    let gateway = lab.tcp_requests(
        "172.16.0.1:80"
            .parse::<std::net::SocketAddrV4>()
            .expect("vip"),
        50,
    );
    assert_eq!(gateway.len(), 50);
    let local = run_client(Some(&cgroup.0), &lab.client_ns, &["tcp", VIP, "50"]);
    let got = answers(&local, VIP);
    assert_eq!(got.values().sum::<usize>(), 50, "{got:?}");
    let s: Value = serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats");
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    // 50 new flows through the gateway; 50 connects on the local path, whose packets the XDP
    // program passed untouched (they go to a backend's own address).
    assert_eq!(n("new_flow"), 50, "{s}");
    assert_eq!(n("local_connect"), 50, "{s}");
    drop(lab);
    assert!(!Path::new("/sys/fs/bpf/lbt-lo4").exists());
}
