//! Connected sockets of the local path whose backend left (issue 15, item 4), end to end: a
//! held TCP connection and a connected UDP socket to a VIP whose only backend is then removed
//! from Marathon (its process keeps answering: only Marathon says it left). With
//! `--local-backend-gone end` (the default) the application sees ECONNABORTED within 2 s and
//! connects again to the live backend; with `keep` the sockets stay on the old one. Sockets to
//! the same backend that the local path did not connect (to its own address, from inside the
//! cgroup and from outside it) are never touched.
use lbtest::{local_lab::LocalLab, privileged_or_skip, read_log, write_atomically};
use serde_json::{Value, json};
use std::time::Duration;

const PORT: u16 = 8080;
const VIP: &str = "172.16.0.1:80";

/// `web` (VIP, TCP and UDP) with the one task on backend `i`.
fn only(lab: &LocalLab, i: usize) -> String {
    let b = &lab.backends[i];
    json!({"apps": [{"id": "/web",
        "portDefinitions": [{"protocol": "udp,tcp", "labels": {"VIP_0": VIP}}],
        "tasks": [{"id": format!("web.{}", b.name), "appId": "/web", "host": b.addr.to_string(),
                   "ports": [PORT], "state": "TASK_RUNNING",
                   "startedAt": "2026-11-25T00:00:00.000Z"}]}]})
    .to_string()
}

/// What a `watch` client printed after the change.
struct Watched {
    /// (socket, errno, ms after the change) of each socket that failed.
    gone: Vec<(String, i32, u64)>,
    /// (socket, backend) of each socket connected again.
    new: Vec<(String, String)>,
    /// The backends of the last requests: tcp, udp, direct.
    last: [String; 3],
}

fn watched(lines: &[String]) -> Watched {
    let mut w = Watched {
        gone: Vec::new(),
        new: Vec::new(),
        last: Default::default(),
    };
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        match f[..] {
            ["gone", what, errno, ms] => w.gone.push((
                what.into(),
                errno.parse().expect("errno"),
                ms.parse().expect("ms"),
            )),
            ["new", what, backend] => w.new.push((what.into(), backend.into())),
            ["last", tcp, udp, direct] => w.last = [tcp.into(), udp.into(), direct.into()],
            ["lost", "udp"] => {}
            _ => panic!("unexpected line `{l}` in {lines:?}"),
        }
    }
    w
}

fn local_ended(lab: &LocalLab) -> u64 {
    let s: Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("lbctl stats --json");
    s["local_ended"]
        .as_u64()
        .unwrap_or_else(|| panic!("no local_ended in {s}"))
}

/// Runs the scenario with the agent's `extra` flags; returns what the client inside the cgroup
/// (TCP and UDP through the VIP, TCP to b1's own address) and the one outside it (TCP to b1's
/// own address) saw after b1 left Marathon for b2.
fn backend_leaves(prefix: &str, extra: &[&str]) -> (LocalLab, Watched, Watched) {
    let mut lab = LocalLab::new(prefix, 2);
    lab.serve(0, PORT);
    lab.serve(1, PORT);
    let apps = lab.dir.join("apps.json");
    let log = lab.dir.join("agent.log");
    write_atomically(&apps, &only(&lab, 0));
    lab.start_agent(&apps, extra, &log);
    lab.wait_list(
        Duration::from_secs(20),
        |v| v["services"].as_array().is_some_and(|s| s.len() == 2),
        "the agent serving web (TCP and UDP)",
    );
    let direct = format!("{}:{PORT}", lab.backends[0].addr);
    let mut inside = lab.spawn_client(true, &["watch", &direct, "3", VIP]);
    let mut outside = lab.spawn_client(false, &["watch", &direct, "3", "-"]);
    assert_eq!(inside.line(), "ready b1 b1 b1");
    assert_eq!(outside.line(), "ready - - b1");
    // b1 leaves Marathon, b2 comes; b1's process keeps answering.
    write_atomically(&apps, &only(&lab, 1));
    inside.say("go");
    outside.say("go");
    let (inside, outside) = (inside.finish(), outside.finish());
    eprintln!("inside the cgroup: {inside:?}\noutside: {outside:?}");
    let (inside, outside) = (watched(&inside), watched(&outside));
    // The agent applied the change (so `keep` is checked after it, not before).
    lab.wait_list(
        Duration::from_secs(2),
        |v| {
            v.to_string()
                .contains(&format!("{}:{PORT}", lab.backends[1].addr))
        },
        "b2 replacing b1",
    );
    (lab, inside, outside)
}

#[test]
fn connected_sockets_whose_backend_left_are_ended_and_others_untouched() {
    if !privileged_or_skip("connected_sockets_whose_backend_left_are_ended_and_others_untouched") {
        return;
    }
    let (lab, inside, outside) = backend_leaves("lbt-lg1", &[]);
    let log = read_log(&lab.dir.join("agent.log"));
    let mut gone: Vec<&str> = inside.gone.iter().map(|g| g.0.as_str()).collect();
    gone.sort();
    assert_eq!(gone, ["tcp", "udp"], "{:?}\n{log}", inside.gone);
    for (what, errno, ms) in &inside.gone {
        // TCP: ECONNABORTED. Connected UDP: ECONNABORTED on the pending error, or EDESTADDRREQ
        // when the send came first (the kernel's abort disconnects a UDP socket).
        let want: &[i32] = if what == "tcp" {
            &[libc::ECONNABORTED]
        } else {
            &[libc::ECONNABORTED, libc::EDESTADDRREQ]
        };
        assert!(want.contains(errno), "{what}: errno {errno}\n{log}");
        assert!(*ms < 2000, "{what} ended after {ms} ms\n{log}");
    }
    let mut new = inside.new.clone();
    new.sort();
    assert_eq!(
        new,
        [("tcp".into(), "b2".into()), ("udp".into(), "b2".into())]
    );
    // The direct connections to b1 (inside the cgroup and outside it) still answer.
    assert_eq!(inside.last, ["b2", "b2", "b1"].map(String::from));
    assert!(outside.gone.is_empty(), "{:?}", outside.gone);
    assert_eq!(outside.last, ["-", "-", "b1"].map(String::from));
    assert_eq!(local_ended(&lab), 2);
    assert!(
        log.contains("ended the local path's connected sockets"),
        "{log}"
    );
}

#[test]
fn with_keep_connected_sockets_stay_on_the_backend_that_left() {
    if !privileged_or_skip("with_keep_connected_sockets_stay_on_the_backend_that_left") {
        return;
    }
    let (lab, inside, outside) = backend_leaves("lbt-lg2", &["--local-backend-gone", "keep"]);
    assert!(inside.gone.is_empty(), "{:?}", inside.gone);
    assert!(outside.gone.is_empty(), "{:?}", outside.gone);
    assert_eq!(inside.last, ["b1", "b1", "b1"].map(String::from));
    assert_eq!(local_ended(&lab), 0);
    // A new connection gets the live backend.
    let lines = lab.client(true, &["tcp", VIP, "3"]);
    assert!(lines.iter().all(|l| l.starts_with("ok b2 ")), "{lines:?}");
}
