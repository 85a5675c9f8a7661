//! A resolver that does not answer (issue 14, item 7), through the real agent: one app's task
//! runs on a host given by a name whose lookup hangs (the agent's resolv.conf names a server
//! that never answers: a UDP socket the test holds open on 127.0.0.53:53 in the load
//! balancer's namespace, and never reads). The snapshot is applied within the resolve deadline with that task as a problem;
//! changes to other apps reach the kernel at once while the lookup still hangs.
use lbtest::{Lab, in_netns, lbctl_bin, pktlab, privileged_or_skip, read_log, write_atomically};
use std::{
    net::{SocketAddrV4, UdpSocket},
    process::{Child, Command},
    time::{Duration, Instant},
};

const PORT: u16 = 31000;
const RESOLVE_TIMEOUT_MS: u64 = 500;

/// The agent this test starts itself (in a mount namespace of its own, for its resolv.conf);
/// killed when dropped, before the lab is.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `/fast` (VIP 172.16.0.1:8080) on `fast` backends by address; `/slow` (VIP 172.16.0.2:8080)
/// on b2 by address and on the host `slow.invalid`.
fn doc(lab: &Lab, fast: &[usize]) -> String {
    let task = |i: usize| pktlab::running(SocketAddrV4::new(lab.backends[i].addr, PORT));
    let fast_tasks: Vec<pktlab::Task> = fast.iter().map(|i| task(*i)).collect();
    let mut slow = pktlab::app("/slow", "tcp", &[("VIP_0", "172.16.0.2:8080")], &[task(1)]);
    let mut hung = slow["tasks"][0].clone();
    hung["id"] = "slow.hung".into();
    hung["host"] = "slow.invalid".into();
    slow["tasks"].as_array_mut().expect("tasks").push(hung);
    pktlab::apps(vec![
        pktlab::app("/fast", "tcp", &[("VIP_0", "172.16.0.1:8080")], &fast_tasks),
        slow,
    ])
}

fn backends_of(s: &[(String, String, Vec<String>)], vip: &str) -> Option<usize> {
    s.iter().find(|x| x.0 == vip).map(|x| x.2.len())
}

#[test]
fn a_hanging_resolver_delays_only_its_app() {
    if !privileged_or_skip("a_hanging_resolver_delays_only_its_app") {
        return;
    }
    let mut lab = Lab::new("lbt-sgr", 2);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("sgr");
    let (apps, log, resolv) = (
        dir.join("apps.json"),
        dir.join("agent.log"),
        dir.join("resolv.conf"),
    );
    // A name server that never answers (and no ICMP error tells the resolver so).
    let _silent = in_netns(&lab.lb_ns, || {
        UdpSocket::bind("127.0.0.53:53").expect("bind the silent name server")
    });
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.53\noptions timeout:30 attempts:1\n",
    )
    .expect("resolv.conf");
    write_atomically(&apps, &doc(&lab, &[0]));

    let mut args: Vec<String> = vec![
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        // $0 the resolv.conf, $1 the namespace, $2 lbctl, then the agent's flags.
        r#"r="$0"; n="$1"; b="$2"; shift 2; mount --bind "$r" /etc/resolv.conf && exec nsenter --net="$n" "$b" agent "$@""#.into(),
        resolv.display().to_string(),
        format!("/run/netns/{}", lab.lb_ns),
        lbctl_bin().display().to_string(),
    ];
    args.push("--apps".into());
    args.push(apps.display().to_string());
    args.push("--pin-dir".into());
    args.push(lab.pin_dir.display().to_string());
    args.push("--status-socket".into());
    args.push(lab.status_socket().display().to_string());
    args.push("--resolve-timeout-ms".into());
    args.push(RESOLVE_TIMEOUT_MS.to_string());
    for i in &lab.lb_ifaces {
        args.push("--iface".into());
        args.push(lab.iface_arg(i));
    }
    let logf = std::fs::File::create(&log).expect("log");
    let started = Instant::now();
    let _agent = Agent(
        Command::new("unshare")
            .args(&args)
            .env("LBCTL_LOG", "info")
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("starting the agent"),
    );

    // The first snapshot: both services, /slow with its task on b2 only; the hung name is a
    // problem naming it.
    let took = lab
        .wait_for_kernel(Duration::from_secs(10), |s| {
            backends_of(s, "172.16.0.1:8080") == Some(1)
                && backends_of(s, "172.16.0.2:8080") == Some(1)
        })
        .unwrap_or_else(|e| panic!("first snapshot not applied: {e}\n{}", read_log(&log)));
    println!(
        "first snapshot applied {:.2} s after the start ({:.2} s of waiting for the kernel)",
        started.elapsed().as_secs_f64(),
        took.as_secs_f64()
    );
    let st = lab.wait_status(
        Duration::from_secs(5),
        |v| {
            v["agent"]["problems"].as_array().is_some_and(|p| {
                p.iter().any(|p| {
                    p["task"] == "slow.hung"
                        && p["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("\"slow.invalid\" did not resolve in time"))
                })
            })
        },
        "no problem names the host that did not resolve",
    );
    assert_eq!(st["agent"]["last_error"], serde_json::Value::Null);
    assert_eq!(
        lab.tcp_try("172.16.0.2:8080".parse().expect("vip")),
        Ok("b2".into())
    );

    // A change to the other app, while the lookup still hangs (30 s): in the kernel at once.
    for round in 0..3 {
        let fast: &[usize] = if round % 2 == 0 { &[0, 1] } else { &[0] };
        let t = Instant::now();
        write_atomically(&apps, &doc(&lab, fast));
        let took = lab
            .wait_for_kernel(Duration::from_secs(5), |s| {
                backends_of(s, "172.16.0.1:8080") == Some(fast.len())
            })
            .unwrap_or_else(|e| panic!("change {round} not applied: {e}\n{}", read_log(&log)));
        println!(
            "change {round} to another app applied in {:.2} s while the resolver hangs",
            t.elapsed().as_secs_f64()
        );
        assert!(
            took < Duration::from_millis(RESOLVE_TIMEOUT_MS + 1500),
            "change {round} took {took:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the test outlived the hung lookup: it proves nothing"
    );
}
