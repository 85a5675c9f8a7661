//! Snapshot guards (issue 14, item 1), through the real agent: a document of the wrong shape is
//! an error that keeps the last good state, and a valid snapshot removing most services at once
//! is held (the rest of it applied) until a snapshot fetched `--removal-confirm-secs` later
//! agrees. Held TCP connections are checked across every fault. Once with the file source, once
//! with the fake Marathon.
use lbtest::{
    Backend, Lab, exchange, fake_marathon::FakeMarathon, in_netns, pktlab, privileged_or_skip,
    read_log, wait_log, write_atomically,
};
use serde_json::Value;
use std::{
    net::{SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

const PORT: u16 = 31000;
const MARATHON_PORT: u16 = 18090;
const CONFIRM_SECS: u64 = 4;

/// Apps `/s1`.. each with VIP 172.16.0.N:8080 on every backend.
fn doc(ids: &[u8], b: &[Backend]) -> String {
    let tasks: Vec<pktlab::Task> = b
        .iter()
        .map(|b| pktlab::running(SocketAddrV4::new(b.addr, PORT)))
        .collect();
    pktlab::apps(
        ids.iter()
            .map(|i| {
                let vip = format!("172.16.0.{i}:8080");
                pktlab::app(&format!("/s{i}"), "tcp", &[("VIP_0", &vip)], &tasks)
            })
            .collect(),
    )
}

fn vip(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new([172, 16, 0, i].into(), 8080)
}

fn vips(lab: &Lab) -> Vec<String> {
    lab.kernel_services().into_iter().map(|s| s.0).collect()
}

fn want(ids: &[u8]) -> Vec<String> {
    ids.iter().map(|i| vip(*i).to_string()).collect()
}

/// Every held connection still answers (each sends one more request).
fn all_answer(conns: &mut [TcpStream], what: &str) -> usize {
    for (i, c) in conns.iter_mut().enumerate() {
        exchange(c).unwrap_or_else(|e| panic!("{what}: held connection {i} broke: {e}"));
    }
    conns.len()
}

fn errors(v: &Value) -> u64 {
    v["agent"]["sync_errors"].as_u64().unwrap_or(0)
}

/// The agent's flags besides the source: the guard small enough for a lab of three services.
fn guard_flags() -> Vec<String> {
    [
        "--max-removal-floor",
        "2",
        "--removal-confirm-secs",
        &CONFIRM_SECS.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Feeds the agent (through `set`) each wrong shape, then an empty snapshot while `/s4` is
/// added; checks held connections, the status and the kernel at each step; returns how long
/// the large removal took to apply once confirmable.
fn wrong_shapes_then_empty(lab: &Lab, log: &Path, set: &dyn Fn(&str)) -> Duration {
    let b = lab.backends.clone();
    let mut held = lab.open_connections(vip(1), 10);
    held.extend(lab.open_connections(vip(2), 10));
    all_answer(&mut held, "before any fault");
    for (bad, says) in [
        (r#"{"apps": null}"#, "apps is null, expected an array"),
        (
            r#"{"apps": {"id": "/s1"}}"#,
            "apps is an object, expected an array",
        ),
        (r#"{"apps": "x"}"#, "apps is a string, expected an array"),
        (r#"{"groups": null}"#, "groups is null, expected an array"),
    ] {
        let before = errors(&lab.wait_status(Duration::from_secs(5), |_| true, "status"));
        set(bad);
        let st = lab.wait_status(
            Duration::from_secs(10),
            |v| errors(v) > before,
            &format!("{bad}: no sync error counted"),
        );
        let e = st["agent"]["last_error"].as_str().unwrap_or_default();
        assert!(e.contains(says), "{bad}: last_error is {e:?}");
        assert_eq!(vips(lab), want(&[1, 2, 3]), "{bad} changed the kernel");
        let n = all_answer(&mut held, bad);
        println!("wrong shape {bad}: error reported, {n}/{n} held connections alive");
    }
    let text = lab.lbctl(&[
        "status",
        "--socket",
        &lab.status_socket().display().to_string(),
    ]);
    assert!(text.contains("groups is null, expected an array"), "{text}");

    // A valid snapshot without /s1../s3 but with a new /s4: the removal is held, the addition
    // is applied.
    set(&doc(&[4], &b));
    let st = lab.wait_status(
        Duration::from_secs(10),
        |v| v["agent"]["holding_removal"].is_object(),
        "the empty snapshot was not held",
    );
    let first = Instant::now();
    let hold = &st["agent"]["holding_removal"];
    assert_eq!(
        (hold["removing"].as_u64(), hold["served"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(st["agent"]["held_removals"].as_u64(), Some(1));
    lab.wait_for_kernel(Duration::from_secs(5), |s| s.len() == 4)
        .unwrap_or_else(|e| panic!("the addition was not applied during the hold: {e}"));
    assert_eq!(vips(lab), want(&[1, 2, 3, 4]));
    let n = all_answer(&mut held, "during the hold");
    println!("empty snapshot: held, {n}/{n} held connections alive, /s4 added meanwhile");
    assert!(
        lab.tcp_try(vip(4)).is_ok(),
        "the added service does not answer"
    );
    let text = lab.lbctl(&[
        "status",
        "--socket",
        &lab.status_socket().display().to_string(),
    ]);
    assert!(
        text.contains("holding:       a large removal of 3 of 3 services"),
        "{text}"
    );
    wait_log(log, "holding a large removal", Duration::from_secs(2));

    // A later snapshot agreeing, fetched at least CONFIRM_SECS later: applied.
    let took = lab
        .wait_for_kernel(Duration::from_secs(CONFIRM_SECS + 20), |s| s.len() == 1)
        .unwrap_or_else(|e| {
            panic!(
                "the confirmed removal was not applied: {e}\n{}",
                read_log(log)
            )
        });
    let held_for = first.elapsed();
    assert!(
        held_for >= Duration::from_secs(CONFIRM_SECS - 1),
        "applied after {held_for:?}, before the confirmation time"
    );
    assert_eq!(vips(lab), want(&[4]));
    let st = lab.wait_status(
        Duration::from_secs(5),
        |v| v["agent"]["holding_removal"].is_null(),
        "the hold is still shown after it was confirmed",
    );
    assert_eq!(st["agent"]["held_removals"].as_u64(), Some(1));
    wait_log(log, "confirmed the large removal", Duration::from_secs(2));
    println!(
        "empty snapshot: applied {:.1} s after it was first seen (confirm time {CONFIRM_SECS} s)",
        took.as_secs_f64()
    );
    took
}

#[test]
fn file_source_wrong_shapes_and_an_empty_snapshot_keep_serving() {
    if !privileged_or_skip("file_source_wrong_shapes_and_an_empty_snapshot_keep_serving") {
        return;
    }
    let mut lab = Lab::new("lbt-sgf", 2);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("sgf");
    let (apps, log) = (dir.join("apps.json"), dir.join("agent.log"));
    write_atomically(&apps, &doc(&[1, 2, 3], &lab.backends));
    let mut args = vec!["--apps".to_string(), apps.display().to_string()];
    args.extend(guard_flags());
    lab.start_agent_with(&args, &[], &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 3)
        .unwrap_or_else(|e| panic!("never served: {e}\n{}", read_log(&log)));
    wrong_shapes_then_empty(&lab, &log, &|text| write_atomically(&apps, text));
    lab.stop_agents(false);
}

#[test]
fn marathon_wrong_shapes_and_an_empty_snapshot_keep_serving() {
    if !privileged_or_skip("marathon_wrong_shapes_and_an_empty_snapshot_keep_serving") {
        return;
    }
    let mut lab = Lab::new("lbt-sgm", 2);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("sgm");
    let log = dir.join("agent.log");
    let listener = in_netns(&lab.lb_ns, || {
        TcpListener::bind(("127.0.0.1", MARATHON_PORT)).expect("bind fake Marathon")
    });
    let m = FakeMarathon::start(listener, &doc(&[1, 2, 3], &lab.backends), None);
    // A resync far beyond the test: the snapshots come from events, and the confirming one
    // from the agent's own request once the confirmation time has come.
    let mut args = vec![
        "--marathon".to_string(),
        m.url(),
        "--resync-secs".into(),
        "600".into(),
        "--debounce-ms".into(),
        "100".into(),
    ];
    args.extend(guard_flags());
    lab.start_agent_with(&args, &[], &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 3)
        .unwrap_or_else(|e| panic!("never served: {e}\n{}", read_log(&log)));
    lbtest::wait_until(
        Duration::from_secs(10),
        || m.streams() > 0,
        "the agent never opened the event stream",
    );
    let set = |text: &str| {
        m.set_doc(text);
        m.event("status_update_event");
    };
    wrong_shapes_then_empty(&lab, &log, &set);
    lab.stop_agents(false);
}
