//! The real agent with a data plane sized by its flags: a service that does not fit is reported
//! (`lbctl problems`, the status socket) and the others serve; another agent asking for other
//! sizes is refused with what to do; one with the same sizes adopts the data plane and reuses the
//! ids of services that left.
use lbtest::{Lab, apps_doc, privileged_or_skip, read_log, write_atomically};
use std::{
    net::SocketAddrV4,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const PORT: u16 = 31000;

/// Three VIPs on one port of one app.
const THREE_VIPS: [(&str, &str); 3] = [
    ("VIP_0", "172.16.0.1:8080"),
    ("VIP_1", "172.16.0.2:8080"),
    ("VIP_2", "172.16.0.3:8080"),
];

fn vip(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new([172, 16, 0, last].into(), 8080)
}

fn status(lab: &Lab, socket: &Path) -> Option<serde_json::Value> {
    lab.status_at(socket)
}

/// A service whose bit in the VIP filter is clear (what an agent that does not know the filter
/// leaves) is named by `lbctl status`, which exits 6; the bit is put back afterwards.
fn hidden_service_is_named(lab: &Lab, socket: &Path) {
    use lbtest::pktlab::set_vip_bit;
    assert!(
        set_vip_bit(&lab.pin_dir, vip(1), false),
        "the served VIP's bit is set"
    );
    let out = Command::new(lbtest::lbctl_bin())
        .args(["status", "--socket"])
        .arg(socket)
        .arg("--pin-dir")
        .arg(&lab.pin_dir)
        .output()
        .expect("lbctl status");
    set_vip_bit(&lab.pin_dir, vip(1), true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(
        text.contains("NOT SERVED:    1 service(s)") && text.contains("tcp 172.16.0.1:8080"),
        "{text}"
    );
}

/// The sizing flags: room for these many services, backends and memberships, 251-slot tables.
fn room(services: u32, backends: u32, members: u32) -> Vec<String> {
    [
        ("--max-services", services),
        ("--max-backends", backends),
        ("--max-members", members),
        ("--ring-size", 251),
    ]
    .iter()
    .flat_map(|(f, v)| [f.to_string(), v.to_string()])
    .collect()
}

/// Starts an agent with `extra` flags that must refuse to start; its standard error.
fn refused(lab: &Lab, apps: &Path, dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        format!("--net=/run/netns/{}", lab.lb_ns),
        lbtest::lbctl_bin().display().to_string(),
        "agent".into(),
        "--pin-dir".into(),
        lab.pin_dir.display().to_string(),
        "--apps".into(),
        apps.display().to_string(),
        "--status-socket".into(),
        dir.join("other.sock").display().to_string(),
    ];
    for i in &lab.lb_ifaces {
        args.extend(["--iface".to_string(), i.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut other = Command::new("nsenter")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nsenter");
    let end = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(st) = other.try_wait().expect("wait") {
            break st.code();
        }
        if Instant::now() > end {
            let _ = other.kill();
            panic!("an agent that should have been refused kept running: {extra:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut other.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_ne!(code, Some(0), "{err}");
    err
}

fn wait_applied(lab: &Lab, socket: &Path, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    lbtest::wait_until(
        Duration::from_secs(20),
        || status(lab, socket).is_some_and(|v| ok(&v["agent"]["last_apply"])),
        what,
    );
}

/// Flows in use evicted from the flow tables (counted into `lb_ftpres_v1` here as the programs
/// count them) show in `lbctl status` with the setting to raise, and the agent warns of them in
/// its log within its read interval. The counters are then put back.
fn evictions_are_reported(lab: &Lab, socket: &Path, log: &Path) {
    let cpus = aya::util::nr_cpus().expect("CPUs") as u64;
    lbtest::pktlab::set_flow_pressure(&lab.pin_dir, [2, 3]);
    let text = lab.lbctl(&["status", "--socket", socket.to_str().expect("p")]);
    let (moved, evicted) = (2 * cpus, 3 * cpus);
    assert!(
        text.contains(&format!(
            "flow tables:   moved {moved}, evicted {evicted} (flows in use"
        )) && text.contains("; raise --flow-table-size above 262144"),
        "{text}"
    );
    let read_every = lbctl::dataplane::EVICTIONS_READ_EVERY;
    lbtest::wait_until(
        read_every + Duration::from_secs(5),
        || {
            read_log(log).lines().any(|l| {
                l.contains("WARN")
                    && l.contains(&format!("evicted={evicted}"))
                    && l.contains("raise --flow-table-size")
            })
        },
        "the agent's warning of flows in use evicted",
    );
    lbtest::pktlab::set_flow_pressure(&lab.pin_dir, [0, 0]);
}

#[test]
fn a_full_data_plane_is_reported_and_the_rest_serves() {
    if !privileged_or_skip("a_full_data_plane_is_reported_and_the_rest_serves") {
        return;
    }
    let mut lab = Lab::new("lbt-size", 2);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("size");
    let apps = dir.join("apps.json");
    let socket = dir.join("agent.sock");
    let backends = lab.backends.clone();
    let doc = |labels: &[(&str, &str)]| apps_doc("/web", "tcp", labels, &backends, PORT);
    // Three VIPs on one port, for a data plane with room for two services.
    write_atomically(&apps, &doc(&THREE_VIPS));
    let sized = |more: &[String]| -> Vec<String> {
        [
            "--apps",
            apps.to_str().expect("p"),
            "--status-socket",
            socket.to_str().expect("p"),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(more.iter().cloned())
        .collect()
    };
    let sizes = room(2, 16, 64);
    lab.start_agent_with(&sized(&sizes), &[], &dir.join("agent1.log"));
    wait_applied(&lab, &socket, "two services applied, one refused", |a| {
        a["added"].as_array().map(Vec::len) == Some(2)
            && a["failed"].as_array().map(Vec::len) == Some(1)
    });
    let problems = lab.lbctl(&["problems", "--socket", socket.to_str().expect("p")]);
    assert!(
        problems.contains("not applied (keeps what it had): tcp 172.16.0.3:8080")
            && problems.contains("all 2 service slots are in use (raise --max-services)"),
        "{problems}"
    );
    let pj: serde_json::Value = serde_json::from_str(&lab.lbctl(&[
        "problems",
        "--json",
        "--socket",
        socket.to_str().expect("p"),
    ]))
    .expect("json");
    assert_eq!(pj["not_applied"].as_array().map(Vec::len), Some(1), "{pj}");
    let log = read_log(&dir.join("agent1.log"));
    assert!(
        log.contains("all 2 service slots are in use (raise --max-services)")
            && log.contains("services are nearly all in use; raise --max-services"),
        "the agent's log names the setting:\n{log}"
    );
    // `lbctl status` says how full the data plane is, how big its tables are, and what new
    // flows did to flows in use (nothing: its flow tables are far from full).
    let text = lab.lbctl(&["status", "--socket", socket.to_str().expect("p")]);
    assert!(
        text.contains("2 of 2 services (100%)")
            && text.contains("2 of 16 backends (12%)")
            && text.contains("4 of 64 memberships (6%)")
            && text.contains("Maglev up to 251 slots a service")
            && text.contains("flow tables:   moved 0, evicted 0 (flows in use"),
        "{text}"
    );
    // Every service served has its bit in the VIP filter (and the one refused left none).
    assert!(
        text.contains("vip filter:    2 of 262144 bits set, 0 with no service")
            && !text.contains("NOT SERVED"),
        "{text}"
    );
    evictions_are_reported(&lab, &socket, &dir.join("agent1.log"));
    let sj = status(&lab, &socket).expect("status");
    assert_eq!(
        sj["kernel"]["vip_filter"]["unmarked"],
        serde_json::json!([]),
        "{sj}"
    );
    hidden_service_is_named(&lab, &socket);
    assert_eq!(sj["kernel"]["in_use"]["services"], 2, "{sj}");
    assert_eq!(sj["kernel"]["sizes"]["services"], 2, "{sj}");
    assert_eq!(sj["kernel"]["sizes"]["size"], 251, "{sj}");
    // The two that fit serve.
    for last in [1, 2] {
        let answers = lab.tcp_requests(vip(last), 20);
        assert_eq!(answers.len(), 20, "{}", vip(last));
    }
    let listed = lab.kernel_services();
    assert_eq!(listed.len(), 2, "{listed:?}");
    lab.stop_agents(false);

    // Another agent asking for other tables (the default ring size) is refused, saying what to
    // do; traffic goes on.
    let err = refused(&lab, &apps, &dir, &[]);
    assert!(
        err.contains("room for 2 services")
            && err.contains("--max-services")
            && err.contains("lbctl down"),
        "{err}"
    );
    assert_eq!(lab.tcp_requests(vip(1), 10).len(), 10);

    // The same sizes adopt it; a service leaves and the refused one takes its id.
    write_atomically(
        &apps,
        &doc(&[("VIP_1", "172.16.0.2:8080"), ("VIP_2", "172.16.0.3:8080")]),
    );
    lab.start_agent_with(&sized(&sizes), &[], &dir.join("agent2.log"));
    wait_applied(&lab, &socket, "the third service applied", |a| {
        a["failed"].as_array().is_some_and(Vec::is_empty)
            && a["removed"].as_array().map(Vec::len) == Some(1)
    });
    for last in [2, 3] {
        assert_eq!(lab.tcp_requests(vip(last), 20).len(), 20, "{}", vip(last));
    }

    // Growing: connections open through the VIPs, the agent stops, and one with room for four
    // services moves the data plane to new maps. Every connection goes on on its backend, no
    // flow is lost, and the service that did not fit before is now served.
    let mut open: Vec<_> = [2, 3]
        .into_iter()
        .flat_map(|last| lab.open_connections(vip(last), 10))
        .collect();
    let before: Vec<String> = open
        .iter_mut()
        .map(|c| {
            lbtest::exchange(c).unwrap_or_else(|e| {
                panic!(
                    "exchange before ({:?} -> {:?}): {e}\n{}",
                    c.local_addr(),
                    c.peer_addr(),
                    lab.lbctl(&["stats"])
                )
            })
        })
        .collect();
    lab.stop_agents(false);
    // Smaller than what it holds: refused, naming what is in use.
    let err = refused(
        &lab,
        &apps,
        &dir,
        &room(1, 16, 64)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains("cannot be made smaller") && err.contains("--max-services 2 or more"),
        "{err}"
    );
    write_atomically(&apps, &doc(&THREE_VIPS));
    let grown = room(4, 32, 128);
    lab.start_agent_with(&sized(&grown), &[], &dir.join("agent3.log"));
    wait_applied(
        &lab,
        &socket,
        "the grown data plane serving three services",
        |a| {
            a["failed"].as_array().is_some_and(Vec::is_empty)
                && a["added"].as_array().map(Vec::len) == Some(1)
        },
    );
    let after: Vec<String> = open
        .iter_mut()
        .map(|c| {
            lbtest::exchange(c).unwrap_or_else(|e| {
                panic!(
                    "exchange after the resize ({:?} -> {:?}): {e}\n{}",
                    c.local_addr(),
                    c.peer_addr(),
                    lab.lbctl(&["stats"])
                )
            })
        })
        .collect();
    assert_eq!(before, after, "every connection stays on its backend");
    let stats: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats");
    assert_eq!(stats["flows_lost"], 0, "{stats}");
    let text = lab.lbctl(&["status", "--socket", socket.to_str().expect("p")]);
    assert!(text.contains("3 of 4 services"), "{text}");
    assert!(
        read_log(&dir.join("agent3.log")).contains("data plane resized; tracked flows kept"),
        "the agent says it resized"
    );
    assert_eq!(lab.tcp_requests(vip(1), 20).len(), 20);
    assert!(!lab.pin_dir.join("resizing").exists());
    lab.stop_agents(false);
}
