//! The agent against a live (fake) Marathon, with traffic through the VIP: Marathon down at
//! start, scaling, health changes, deployments and app deletion followed through the event
//! stream, and every failure mode (500s, resets, malformed JSON, a stalled request, a stalled
//! event stream, Marathon going away) survived with the last good state still serving.
use lbtest::{
    Backend, Lab,
    fake_marathon::{FakeMarathon, Mode},
    in_netns, privileged_or_skip, read_log, tally, wait_log, wait_until,
};
use serde_json::json;
use std::{
    net::{SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

const PORT: u16 = 31000;
const MARATHON_PORT: u16 = 18080;
const DEAD_PORT: u16 = 18081;
const USER: &str = "lb-agent";
const PASSWORD: &str = "s3cret-pw-never-logged";

fn task(app: &str, b: &Backend, alive: Option<bool>) -> serde_json::Value {
    let mut t = json!({
        "id": format!("{}.{}", app.trim_start_matches('/'), b.name),
        "appId": app,
        "host": b.addr.to_string(),
        "ports": [PORT],
        "state": "TASK_RUNNING",
        "startedAt": "2026-11-25T00:00:00.000Z"
    });
    if let Some(alive) = alive {
        t["healthCheckResults"] = json!([{"alive": alive, "taskId": t["id"]}]);
    }
    t
}

/// App `/web` with VIP 172.16.0.1:8080 and an HTTP health check; `tasks` as (backend, alive).
fn web(tasks: &[(&Backend, bool)]) -> serde_json::Value {
    json!({
        "id": "/web",
        "healthChecks": [{"protocol": "HTTP", "path": "/"}],
        "portDefinitions": [{"port": 0, "protocol": "tcp", "labels": {"VIP_0": "172.16.0.1:8080"}}],
        "tasks": tasks.iter().map(|(b, alive)| task("/web", b, Some(*alive))).collect::<Vec<_>>()
    })
}

/// App `/api` with a named VIP, no health checks.
fn api(backends: &[&Backend]) -> serde_json::Value {
    json!({
        "id": "/api",
        "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/api:9090"}}],
        "tasks": backends.iter().map(|b| task("/api", b, None)).collect::<Vec<_>>()
    })
}

fn doc(apps: &[serde_json::Value]) -> String {
    json!({ "apps": apps }).to_string()
}

fn vip() -> SocketAddrV4 {
    "172.16.0.1:8080".parse().expect("vip")
}

/// The backends of the service at `vip` as "address state".
fn backends_of(s: &[(String, String, Vec<String>)], vip: &str) -> Option<Vec<String>> {
    s.iter()
        .find(|(v, _, _)| v == vip)
        .map(|(_, _, b)| b.clone())
}

fn be(i: u8, state: &str) -> String {
    format!("198.18.{i}.2:{PORT} {state}")
}

#[test]
fn follows_a_live_marathon_through_failures() {
    if !privileged_or_skip("follows_a_live_marathon_through_failures") {
        return;
    }
    let mut lab = Lab::new("lbt-mar", 3);
    let _hits = lab.serve(PORT);
    let b = lab.backends.clone();
    let dir = lbtest::TestDir::new("mar");
    let log = dir.join("agent.log");
    let auth = lbtest::http::basic_auth(USER, PASSWORD);

    // Marathon is down at start: the first URL never answers, the second not yet.
    let urls = [
        format!("http://127.0.0.1:{DEAD_PORT}"),
        format!("http://127.0.0.1:{MARATHON_PORT}"),
    ];
    let args: Vec<String> = vec![
        "--marathon".into(),
        urls[0].clone(),
        "--marathon".into(),
        urls[1].clone(),
        "--resync-secs".into(),
        "4".into(),
        "--debounce-ms".into(),
        "150".into(),
    ];
    lab.start_agent_with(
        &args,
        &[
            ("LBCTL_MARATHON_USER", USER),
            ("LBCTL_MARATHON_PASSWORD", PASSWORD),
        ],
        &log,
    );
    wait_log(&log, "no Marathon state this time", Duration::from_secs(15));
    assert!(lab.kernel_services().is_empty());

    // Marathon comes up (in the load balancer's namespace, where the agent looks for it).
    let listener = in_netns(&lab.lb_ns, || {
        TcpListener::bind(("127.0.0.1", MARATHON_PORT)).expect("bind fake Marathon")
    });
    let m = FakeMarathon::start(
        listener,
        &doc(&[web(&[(&b[0], true), (&b[1], true)])]),
        Some(auth),
    );
    lab.wait_for_kernel(Duration::from_secs(40), |s| {
        backends_of(s, "172.16.0.1:8080") == Some(vec![be(1, "active"), be(2, "active")])
    })
    .unwrap_or_else(|e| {
        panic!(
            "never synced after Marathon came up: {e}\n{}",
            read_log(&log)
        )
    });
    let answers = lab.tcp_requests(vip(), 60);
    assert_eq!(names(&answers), ["b1", "b2"]);
    wait_until(
        Duration::from_secs(10),
        || m.streams() > 0,
        "the agent never opened the event stream",
    );

    // Scaling: a third task, announced by an event, reaches the kernel within about one
    // debounce interval plus a fetch.
    m.set_doc(&doc(&[web(&[(&b[0], true), (&b[1], true), (&b[2], true)])]));
    let t = Instant::now();
    m.event("status_update_event");
    lab.wait_for_kernel(Duration::from_secs(10), |s| {
        backends_of(s, "172.16.0.1:8080").is_some_and(|v| v.len() == 3)
    })
    .unwrap_or_else(|e| panic!("scale-up not followed: {e}\n{}", read_log(&log)));
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "scale-up took {took:?}");
    assert_eq!(names(&lab.tcp_requests(vip(), 90)), ["b1", "b2", "b3"]);

    // Health: b2 fails its check and drains; new connections avoid it, open ones stay.
    let mut open = lab.open_connections(vip(), 30);
    let before: Vec<String> = open
        .iter_mut()
        .map(|s| lbtest::exchange(s).expect("exchange before draining"))
        .collect();
    assert!(
        before.iter().any(|n| n == "b2"),
        "no open connection on b2: {before:?}"
    );
    m.set_doc(&doc(&[web(&[
        (&b[0], true),
        (&b[1], false),
        (&b[2], true),
    ])]));
    m.event("health_status_changed_event");
    lab.wait_for_kernel(Duration::from_secs(10), |s| {
        backends_of(s, "172.16.0.1:8080")
            == Some(vec![be(1, "active"), be(2, "draining"), be(3, "active")])
    })
    .unwrap_or_else(|e| panic!("health change not followed: {e}\n{}", read_log(&log)));
    assert_eq!(names(&lab.tcp_requests(vip(), 60)), ["b1", "b3"]);
    for (i, s) in open.iter_mut().enumerate() {
        let now = lbtest::exchange(s)
            .unwrap_or_else(|e| panic!("open connection {i} broke when b2 drained: {e}"));
        assert_eq!(now, before[i], "open connection {i} moved");
    }
    drop(open);

    // A deployment adds an app with a named VIP.
    let full = doc(&[
        web(&[(&b[0], true), (&b[1], false), (&b[2], true)]),
        api(&[&b[0], &b[2]]),
    ]);
    m.set_doc(&full);
    m.event("deployment_success");
    let services = lab
        .wait_for_kernel(Duration::from_secs(10), |s| s.len() == 2)
        .map(|_| lab.kernel_services())
        .unwrap_or_else(|e| panic!("deployment not followed: {e}\n{}", read_log(&log)));
    let named = services
        .iter()
        .find(|(v, _, _)| v.starts_with("11.") && v.ends_with(":9090"))
        .unwrap_or_else(|| panic!("no named VIP from the 11.0.0.0/8 pool in {services:?}"));
    let named_vip: SocketAddrV4 = named.0.parse().expect("named vip");
    assert_eq!(names(&lab.tcp_requests(named_vip, 40)), ["b1", "b3"]);

    // An event that names its app: that app alone is fetched, at once (no debounce). Full
    // snapshots are frozen at the old document meanwhile, so only that fetch can bring the
    // change.
    m.freeze_snapshots(true);
    let fetches = m.app_fetches();
    m.set_doc(&doc(&[
        web(&[(&b[0], true), (&b[1], true), (&b[2], true)]),
        api(&[&b[0], &b[2]]),
    ]));
    let t = Instant::now();
    m.app_event("health_status_changed_event", "/web");
    lab.wait_for_kernel(Duration::from_secs(10), |s| {
        backends_of(s, "172.16.0.1:8080")
            == Some(vec![be(1, "active"), be(2, "active"), be(3, "active")])
    })
    .unwrap_or_else(|e| {
        panic!(
            "the app fetched alone was not applied: {e}\n{}",
            read_log(&log)
        )
    });
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "the app event took {took:?}");
    assert!(m.app_fetches() > fetches, "the app was not fetched alone");
    lab.wait_status(
        Duration::from_secs(5),
        |v| {
            v["agent"]["last_sync_from"]
                .as_str()
                .is_some_and(|f| f.ends_with("(the app /web alone)"))
        },
        "the status names the app fetched alone",
    );
    eprintln!("an app event reached the kernel in {took:?}");
    // An app Marathon does not have (404): a full snapshot is fetched instead.
    let snapshots = m.snapshots();
    m.app_event("status_update_event", "/not-an-app");
    wait_until(
        Duration::from_secs(3),
        || m.snapshots() > snapshots,
        "no snapshot after an event about an app Marathon does not have",
    );
    m.freeze_snapshots(false);
    m.set_doc(&full);
    m.event("deployment_info");
    lab.wait_for_kernel(Duration::from_secs(10), |s| {
        backends_of(s, "172.16.0.1:8080")
            == Some(vec![be(1, "active"), be(2, "draining"), be(3, "active")])
    })
    .unwrap_or_else(|e| panic!("back to the full document: {e}\n{}", read_log(&log)));

    // Every failure mode: the kernel keeps the last good state and traffic keeps flowing.
    let before = lab.kernel_services();
    for mode in [Mode::Error500, Mode::Reset, Mode::Malformed, Mode::Stall] {
        let errors = count(&read_log(&log), "no Marathon state this time")
            + count(&read_log(&log), "ignoring this version of the document");
        m.set_doc(&doc(&[])); // would remove everything if it were ever read
        m.set_mode(mode);
        m.event("status_update_event");
        let need = errors + 1;
        let timeout = if mode == Mode::Stall { 30 } else { 10 };
        wait_until(
            Duration::from_secs(timeout),
            || {
                let l = read_log(&log);
                count(&l, "no Marathon state this time")
                    + count(&l, "ignoring this version of the document")
                    >= need
            },
            &format!("no error logged for {mode:?}"),
        );
        assert_eq!(lab.kernel_services(), before, "{mode:?} changed the kernel");
        assert_eq!(
            names(&lab.tcp_requests(vip(), 30)),
            ["b1", "b3"],
            "{mode:?}"
        );
        m.set_doc(&full);
        m.set_mode(Mode::Ok);
    }

    // A stalled event stream: changes still arrive through the periodic snapshot.
    m.stall_streams(true);
    m.set_doc(&doc(&[
        web(&[(&b[0], true), (&b[1], true), (&b[2], true)]),
        api(&[&b[0], &b[2]]),
    ]));
    lab.wait_for_kernel(Duration::from_secs(15), |s| {
        backends_of(s, "172.16.0.1:8080").is_some_and(|v| v.iter().all(|x| x.ends_with("active")))
    })
    .unwrap_or_else(|e| {
        panic!(
            "periodic resync did not pick the change up: {e}\n{}",
            read_log(&log)
        )
    });
    m.stall_streams(false);

    // Marathon goes away entirely, then comes back.
    let live = lab.kernel_services();
    let errors = |v: &serde_json::Value| v["agent"]["sync_errors"].as_u64().unwrap_or(0);
    let before = errors(&lab.wait_status(Duration::from_secs(5), |_| true, "status"));
    drop(m);
    // The agent has tried Marathon and failed (a snapshot it could not fetch) before the kernel
    // is compared: what it then keeps serving is its answer to losing Marathon.
    lab.wait_status(
        Duration::from_secs(20),
        |v| errors(v) > before,
        "the agent noticed Marathon going away",
    );
    assert_eq!(
        lab.kernel_services(),
        live,
        "losing Marathon changed the kernel"
    );
    assert_eq!(names(&lab.tcp_requests(vip(), 30)), ["b1", "b2", "b3"]);
    let listener = in_netns(&lab.lb_ns, || {
        TcpListener::bind(("127.0.0.1", MARATHON_PORT)).expect("rebind fake Marathon")
    });
    let auth = lbtest::http::basic_auth(USER, PASSWORD);
    let m = FakeMarathon::start(listener, &doc(&[api(&[&b[0], &b[2]])]), Some(auth));
    // The app /web is deleted while Marathon was away: its service goes.
    lab.wait_for_kernel(Duration::from_secs(40), |s| s.len() == 1)
        .unwrap_or_else(|e| panic!("app deletion not followed: {e}\n{}", read_log(&log)));
    assert!(
        lab.tcp_try(vip()).is_err(),
        "the deleted app's VIP still answers"
    );
    assert_eq!(m.unauthorized(), 0, "the agent sent wrong credentials");

    let text = read_log(&log);
    assert!(!text.contains(PASSWORD), "the password reached the log");
    if std::env::var_os("LBTEST_SHOW_LOG").is_some() {
        eprintln!("agent log:\n{text}");
    }
    lab.stop_agents(false);
    drop(m);
}

fn names(answers: &[String]) -> Vec<String> {
    tally(answers).into_iter().map(|(n, _)| n).collect()
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}
