//! One VIP working end to end: real TCP and UDP traffic from a client namespace through the XDP
//! load balancer (driven by the real `lbctl agent`) to backends in their own namespaces.
use lbtest::{Lab, apps_doc, privileged_or_skip, read_log, tally, wait_log, write_atomically};
use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

const PORT: u16 = 31000;

fn vip(s: &str) -> SocketAddrV4 {
    s.parse().expect("vip")
}

/// Every backend in `want` answered at least once, and nobody else did.
fn assert_spread(what: &str, answers: &[String], want: &[&str]) {
    let t = tally(answers);
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, want, "{what}: answers per backend {t:?}");
}

#[test]
fn one_vip_end_to_end() {
    if !privileged_or_skip("one_vip_end_to_end") {
        return;
    }
    let mut lab = Lab::new("lbt-e2e", 3);
    let hits = lab.serve(PORT);
    let dir = tempdir("e2e");
    let apps = dir.join("apps.json");
    let log = dir.join("agent.log");
    let all = lab.backends.clone();
    write_atomically(
        &apps,
        &apps_doc(
            "/web",
            "udp,tcp",
            &[("VIP_0", "172.16.0.1:8080"), ("VIP_1", "172.16.0.1:5050")],
            &all,
            PORT,
        ),
    );
    lab.start_agent(&apps, &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 4)
        .unwrap_or_else(|e| {
            panic!(
                "agent did not fill the maps: {e}\nagent log:\n{}",
                read_log(&log)
            )
        });
    // A fresh data plane: the document (a file, read at once) is written while the kernel
    // verifies the programs (hundreds of ms), and served once they are attached. The agent logs
    // it just after the write, so it may follow the services seen above.
    wait_log(
        &log,
        "the first document was written while the kernel verified",
        Duration::from_secs(5),
    );

    // What lbctl list shows is what the file says: 4 services of 3 active backends each.
    let services = lab.kernel_services();
    let three: Vec<String> = (1..=3)
        .map(|i| format!("198.18.{i}.2:{PORT} active"))
        .collect();
    for (v, p) in [
        ("172.16.0.1:5050", "tcp"),
        ("172.16.0.1:5050", "udp"),
        ("172.16.0.1:8080", "tcp"),
        ("172.16.0.1:8080", "udp"),
    ] {
        assert!(
            services
                .iter()
                .any(|(sv, sp, b)| sv == v && sp == p && *b == three),
            "{p} {v} with 3 active backends missing from {services:?}"
        );
    }

    // 200 TCP connections and 200 UDP request/replies per VIP; every one completes, replies come
    // from the VIP (checked in tcp_request/udp_request), every backend gets traffic.
    for v in ["172.16.0.1:8080", "172.16.0.1:5050"] {
        let tcp = lab.tcp_requests(vip(v), 200);
        assert_spread(&format!("tcp {v}"), &tcp, &["b1", "b2", "b3"]);
        let udp = lab.udp_requests(vip(v), 200);
        assert_spread(&format!("udp {v}"), &udp, &["b1", "b2", "b3"]);
    }
    for (name, h) in &hits {
        assert!(
            h.tcp.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "{name} got no TCP"
        );
        assert!(
            h.udp.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "{name} got no UDP"
        );
    }
    let stats = lab.lbctl(&["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats json");
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    // 400 TCP connections are 400 distinct flows; a fresh UDP socket may reuse a port, and then
    // its request rides the tracked flow.
    assert!(
        n("new_flow") >= 400 && n("new_flow") + n("forwarded") >= 800,
        "{stats}"
    );
    assert!(n("reply") >= 800, "{stats}");
    // The XDP fast path forwarded both directions; only first packets to a new neighbour may
    // take the kernel's path.
    assert!(n("redirect") >= 1600, "{stats}");
    assert!(n("rewritten_to_stack") <= 20, "{stats}");
    assert_eq!(stats["drop_malformed"], 0, "{stats}");
    eprintln!("data plane counters after the first round: {stats}");

    // The file changes: backend 3 leaves, and a VIP is added. Applied within 2 s.
    let two = all[..2].to_vec();
    write_atomically(
        &apps,
        &apps_doc(
            "/web",
            "udp,tcp",
            &[
                ("VIP_0", "172.16.0.1:8080"),
                ("VIP_1", "172.16.0.1:5050"),
                ("VIP_2", "10.1.2.3:9090"),
            ],
            &two,
            PORT,
        ),
    );
    let changed = Instant::now();
    let two_active: Vec<String> = (1..=2)
        .map(|i| format!("198.18.{i}.2:{PORT} active"))
        .collect();
    let took = lab
        .wait_for_kernel(Duration::from_secs(10), |s| {
            s.len() == 6 && s.iter().all(|(_, _, b)| *b == two_active)
        })
        .unwrap_or_else(|e| panic!("change not applied: {e}\nagent log:\n{}", read_log(&log)));
    assert!(
        changed.elapsed() <= Duration::from_secs(2) || took <= Duration::from_secs(2),
        "the change took {took:?} to reach the kernel"
    );
    for v in ["172.16.0.1:8080", "10.1.2.3:9090"] {
        let tcp = lab.tcp_requests(vip(v), 100);
        assert_spread(&format!("tcp {v} after the change"), &tcp, &["b1", "b2"]);
        let udp = lab.udp_requests(vip(v), 100);
        assert_spread(&format!("udp {v} after the change"), &udp, &["b1", "b2"]);
    }

    // A bad label: a clear error naming app, port and label; the app keeps its last good state
    // and traffic goes on.
    let bad = apps_doc(
        "/web",
        "udp,tcp",
        &[("VIP_0", "172.16.0.1:http"), ("VIP_1", "172.16.0.1:5050")],
        &two,
        PORT,
    );
    let synced = lab.wait_status(
        Duration::from_secs(5),
        |v| v["agent"]["last_sync"].is_u64(),
        "a first sync",
    );
    write_atomically(&apps, &bad);
    wait_log(&log, "VIP_0", Duration::from_secs(5));
    let text = read_log(&log);
    let line = text
        .lines()
        .find(|l| l.contains("bad Marathon data") && l.contains("VIP_0"))
        .unwrap_or_else(|| panic!("no error for the bad label in:\n{text}"));
    assert!(
        line.contains("/web") && line.contains("port 0") && line.contains("172.16.0.1:http"),
        "{line}"
    );
    // The agent has finished with that document once its status says it reconciled one, and
    // its status names the problem while the app keeps its last good state.
    let st = lab.wait_reconciled_since(&synced, Duration::from_secs(5), "the bad label's document");
    let problems = st["agent"]["problems"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        problems.iter().any(|p| {
            p["app"] == "/web"
                && p["port_index"] == 0
                && p["label"] == "VIP_0"
                && p["value"] == "172.16.0.1:http"
        }),
        "the status must name the bad label: {st}"
    );
    assert_eq!(
        lab.kernel_services().len(),
        6,
        "the last good state must stay"
    );
    assert_eq!(lab.tcp_requests(vip("172.16.0.1:8080"), 20).len(), 20);

    // Not JSON: named, ignored, traffic goes on.
    let errors = |v: &serde_json::Value| v["agent"]["sync_errors"].as_u64().unwrap_or(0);
    let before = errors(&lab.wait_status(Duration::from_secs(5), |_| true, "status"));
    write_atomically(&apps, "{\"apps\": [");
    let st = lab.wait_status(
        Duration::from_secs(5),
        |v| errors(v) > before,
        "the broken document counted as a sync error",
    );
    let last = st["agent"]["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("invalid JSON"), "{st}");
    assert_eq!(lab.kernel_services().len(), 6);
    assert_eq!(lab.udp_requests(vip("172.16.0.1:5050"), 20).len(), 20);

    // The agent stops: the data plane stays pinned and keeps forwarding.
    lab.stop_agents(false);
    assert_eq!(lab.tcp_requests(vip("172.16.0.1:8080"), 20).len(), 20);
    // A new agent adopts what is pinned, and a good file applies again.
    write_atomically(
        &apps,
        &apps_doc("/web", "tcp", &[("VIP_0", "172.16.0.1:8080")], &all, PORT),
    );
    let log2 = dir.join("agent2.log");
    lab.start_agent(&apps, &log2);
    lab.wait_for_kernel(Duration::from_secs(20), |s| {
        s.len() == 1 && s[0].2.len() == 3
    })
    .unwrap_or_else(|e| panic!("second agent: {e}\n{}", read_log(&log2)));
    assert!(
        read_log(&log2).contains("replaced=[\"lb-c\""),
        "{}",
        read_log(&log2)
    );
    // A pinned data plane is written to only once the new programs run in its links.
    let second = read_log(&log2);
    assert!(
        second.contains("adopted the services in the kernel maps")
            && !second.contains("while the kernel verified"),
        "{second}"
    );
    let tcp = lab.tcp_requests(vip("172.16.0.1:8080"), 100);
    assert_spread("tcp after the restart", &tcp, &["b1", "b2", "b3"]);
    // The removed UDP service now drops nothing silently: its VIP is no longer served.
    assert!(lab.udp_try(vip("172.16.0.1:5050")).is_err());
    lab.stop_agents(false);
}

fn tempdir(name: &str) -> lbtest::TestDir {
    lbtest::TestDir::new(name)
}
