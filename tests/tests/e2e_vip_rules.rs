//! The VIP rules of issue 14 through the real agent: a named VIP's address never moves while
//! its name lives, even across an agent restart after a name that sorts earlier and hashes to
//! the same address arrived (item 10); labels that would capture traffic (the named pool,
//! special addresses, a task's or the load balancer's own address) are refused with a problem
//! while the first owner keeps its VIP and its held connections (item 4); labels and tasks that
//! yield nothing are problems (item 8).
use lbtest::{Backend, Lab, TestFile, exchange, privileged_or_skip, write_atomically};
use serde_json::{Value, json};
use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::Duration,
};

const PORT: u16 = 31000;
const WAIT: Duration = Duration::from_secs(20);

/// A lab of two backends serving on `PORT`, the path of its apps file, and guards that remove
/// that file and the agent's named-VIP book (removed before too: a killed run may leave one),
/// unless the test fails.
fn setup(prefix: &str) -> (Lab, PathBuf, [TestFile; 2]) {
    let mut lab = Lab::new(prefix, 2);
    lab.serve(PORT);
    let book = TestFile::new(lbctl::marathon::book_path(&lab.status_socket()));
    let apps = TestFile::new(std::env::temp_dir().join(format!("{prefix}-apps.json")));
    (lab, apps.to_path_buf(), [book, apps])
}

fn task(app: &str, b: &Backend) -> Value {
    json!({"id": format!("{}.{}", app.trim_start_matches('/'), b.name), "appId": app,
           "host": b.addr.to_string(), "ports": [PORT], "state": "TASK_RUNNING"})
}

/// A host-networking app whose one port carries `labels`, with one task on `b`.
fn app(id: &str, labels: &[(&str, String)], b: &Backend) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(v.clone())))
        .collect();
    json!({"id": id, "portDefinitions": [{"port": 0, "labels": labels}], "tasks": [task(id, b)]})
}

/// FNV-1a (64 bits) of a named VIP's DNS name, written here apart from the agent's code: the
/// pool 11.0.0.0/30 has two usable addresses, 11.0.0.1 and 11.0.0.2, and a name's first choice
/// is 11.0.0.(1 + hash % 2).
fn home(name: &str) -> u64 {
    let dns = format!("{name}.marathon.l4lb.thisdcos.directory");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dns.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    1 + h % 2
}

/// Starts the agent, its log in a temporary file (removed when the test passes).
fn start(lab: &mut Lab, apps: &Path, extra: &[&str], log: &str) -> lbtest::TestFile {
    let mut args = vec!["--apps".to_string(), apps.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = lbtest::TestFile::new(std::env::temp_dir().join(log));
    lab.start_agent_with(&args, &[], &log);
    log
}

fn answers(held: &mut [std::net::TcpStream]) -> Vec<String> {
    held.iter_mut()
        .map(|s| exchange(s).unwrap_or_else(|e| format!("broken: {e}")))
        .collect()
}

#[test]
fn a_named_vip_keeps_its_address_across_a_restart() {
    if !privileged_or_skip("a_named_vip_keeps_its_address_across_a_restart") {
        return;
    }
    let (mut lab, apps, _guards) = setup("lbt-vipn");
    let (b1, b2) = (lab.backends[0].clone(), lab.backends[1].clone());
    // "zz" first; then "aN", which sorts earlier and wants the same address.
    let early = (0..100)
        .map(|i| format!("a{i}"))
        .find(|n| home(n) == home("zz"))
        .expect("a name with the same home");
    let held_vip: SocketAddrV4 = format!("11.0.0.{}:80", home("zz")).parse().expect("vip");
    let zz = app("/zz", &[("VIP_0", "/zz:80".into())], &b1);
    write_atomically(&apps, &json!({"apps": [zz.clone()]}).to_string());
    let pool = ["--named-vip-pool", "11.0.0.0/30"];
    let _log1 = start(&mut lab, &apps, &pool, "lbt-vipn-1.log");
    lab.wait_for_kernel(WAIT, |s| {
        s.iter().any(|(v, _, _)| *v == held_vip.to_string())
    })
    .expect("zz served at its home address");
    let mut held = lab.open_connections(held_vip, 10);
    assert_eq!(answers(&mut held), vec!["b1"; 10]);

    lab.stop_agents(false);
    let a = app("/a", &[("VIP_0", format!("/{early}:80"))], &b2);
    write_atomically(&apps, &json!({"apps": [zz, a]}).to_string());
    let _log2 = start(&mut lab, &apps, &pool, "lbt-vipn-2.log");
    lab.wait_for_kernel(WAIT, |s| s.len() == 2)
        .expect("both names served");
    let services = lab.kernel_services();
    let at_held: Vec<&Vec<String>> = services
        .iter()
        .filter(|(v, _, _)| *v == held_vip.to_string())
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(
        at_held,
        [&vec![format!("{}:{PORT} active", b1.addr)]],
        "{services:?}"
    );
    assert_eq!(answers(&mut held), vec!["b1"; 10], "held connections");
    assert_eq!(
        lab.tcp_requests(held_vip, 10),
        vec!["b1"; 10],
        "new connections"
    );
    let status = lab.wait_status(WAIT, |v| v["agent"]["last_sync"].is_u64(), "a sync");
    let problems = status["agent"]["problems"]
        .as_array()
        .expect("problems")
        .clone();
    assert!(
        problems.iter().any(|p| p["app"] == "/a"
            && p["label"] == "VIP_0"
            && p["reason"].as_str().unwrap_or("").contains("collides at")),
        "{problems:?}"
    );
}

#[test]
fn captures_are_refused_and_dropped_labels_are_problems() {
    if !privileged_or_skip("captures_are_refused_and_dropped_labels_are_problems") {
        return;
    }
    let (mut lab, apps, _guards) = setup("lbt-vipr");
    let (b1, b2) = (lab.backends[0].clone(), lab.backends[1].clone());
    let victim = app(
        "/victim",
        &[
            ("VIP_0", "/victim:80".into()),
            ("VIP_1", "172.16.0.1:80".into()),
        ],
        &b1,
    );
    write_atomically(&apps, &json!({"apps": [victim.clone()]}).to_string());
    // Every range allowed: the rules hold whatever the ranges say.
    let _log = start(
        &mut lab,
        &apps,
        &["--vip-range", "0.0.0.0/0", "--vip-range", "::/0"],
        "lbt-vipr.log",
    );
    lab.wait_for_kernel(WAIT, |s| s.len() == 2)
        .expect("victim served");
    let named = lab
        .kernel_services()
        .into_iter()
        .map(|(v, _, _)| v)
        .find(|v| v.starts_with("11."))
        .expect("the named VIP's address");
    let named_vip: SocketAddrV4 = named.parse().expect("vip");
    let mut held = lab.open_connections(named_vip, 10);
    assert_eq!(answers(&mut held), vec!["b1"; 10]);

    let captures = [
        named.clone(),
        "0.0.0.0:80".into(),
        "127.0.0.1:80".into(),
        "255.255.255.255:80".into(),
        "224.0.0.1:80".into(),
        "[::1]:80".into(),
        "[ff02::1]:80".into(),
        "169.254.169.254:80".into(),
        format!("{}:{PORT}", b1.addr), // a task's address
        "198.18.0.1:80".into(),        // the load balancer's own address
    ];
    let keys: Vec<String> = (0..captures.len()).map(|i| format!("VIP_{i}")).collect();
    let labels: Vec<(&str, String)> = keys
        .iter()
        .map(String::as_str)
        .zip(captures.iter().cloned())
        .collect();
    let thief = app("/thief", &labels, &b2);
    let bridge = json!({"id": "/bridge", "networks": [{"mode": "container/bridge"}],
        "portDefinitions": [{"labels": {"VIP_0": "172.16.0.9:80"}}],
        "container": {"portMappings": [{"containerPort": PORT}]}, "tasks": [task("/bridge", &b2)]});
    let port0 = json!({"id": "/port0", "networks": [{"mode": "container"}],
        "container": {"portMappings": [{"containerPort": 0, "labels": {"VIP_0": "172.16.0.10:80"}}]}});
    let disc = json!({"id": "/disc", "ipAddress": {"discovery": {"ports": [
        {"number": 70000, "labels": {"VIP_0": "172.16.0.11:80"}}]}}});
    let noips = json!({"id": "/noips", "networks": [{"mode": "container"}],
        "container": {"portMappings": [{"containerPort": PORT, "labels": {"VIP_0": "172.16.0.12:80"}}]},
        "tasks": [{"id": "noips.t1", "host": b2.addr.to_string(), "state": "TASK_RUNNING"}]});
    let doc = json!({"apps": [victim, thief, bridge, port0, disc, noips]});
    write_atomically(&apps, &doc.to_string());

    let mut want: Vec<(String, Value)> = keys
        .iter()
        .map(|k| ("/thief".to_string(), Value::from(k.clone())))
        .collect();
    for a in ["/bridge", "/port0", "/disc"] {
        want.push((a.into(), "VIP_0".into()));
    }
    want.push(("/noips".into(), Value::Null));
    let status = lab.wait_status(
        WAIT,
        |v| {
            v["agent"]["problems"]
                .as_array()
                .is_some_and(|p| p.len() >= want.len())
        },
        "the problems of the hostile document",
    );
    let problems = status["agent"]["problems"]
        .as_array()
        .expect("problems")
        .clone();
    for (app, label) in &want {
        assert!(
            problems
                .iter()
                .any(|p| p["app"] == app.as_str() && p["port_index"] == 0 && p["label"] == *label),
            "no problem for {app} {label}: {problems:?}"
        );
    }
    let reasons: Vec<&str> = problems
        .iter()
        .filter_map(|p| p["reason"].as_str())
        .collect();
    for needle in [
        "named-VIP pool",
        "can never be a VIP",
        "address of a task",
        "load balancer's own host",
        "ignores `portDefinitions`",
        "container port 0",
        "70000",
        "no `ipAddresses`",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "{needle}: {reasons:?}"
        );
    }
    // Only the victim's VIPs (and /noips's, which has no backend) are served; the first owner
    // keeps its address and its held connections.
    let mut served: Vec<String> = lab
        .kernel_services()
        .into_iter()
        .map(|(v, _, _)| v)
        .collect();
    served.sort();
    let mut expected = vec![
        named.clone(),
        "172.16.0.1:80".into(),
        "172.16.0.12:80".into(),
    ];
    expected.sort();
    assert_eq!(served, expected);
    assert_eq!(answers(&mut held), vec!["b1"; 10], "held connections");
    assert_eq!(
        lab.tcp_requests(named_vip, 10),
        vec!["b1"; 10],
        "new connections"
    );
}
