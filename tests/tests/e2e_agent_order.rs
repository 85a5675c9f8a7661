//! `lbctl agent` checks every setting and opens every resource before it touches the kernel: a
//! CA file that cannot be read, a status socket that cannot be bound, a metrics address in use,
//! `--bpf-log` in a build without it, or an interface that does not exist each stop the real
//! agent with a message naming the fault, and leave nothing pinned, no XDP program on any
//! interface and no status socket behind. A good agent in the same sandbox then attaches, which
//! shows that the checks below do see an attached data plane.
use lbtest::{Lab, apps_doc, in_netns, lbctl_bin, privileged_or_skip, read_log};
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Runs `lbctl agent` in the lab's load-balancer namespace with its pin directory, every
/// interface and `args`; it must exit by itself within 15 s. Returns its exit code and stderr.
fn refused_agent(lab: &Lab, args: &[String]) -> (i32, String) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.lb_ns))
        .arg(lbctl_bin())
        .args(["agent", "--pin-dir"])
        .arg(&lab.pin_dir);
    for i in &lab.lb_ifaces {
        cmd.args(["--iface", &lab.iface_arg(i)]);
    }
    let mut child = cmd
        .args(args)
        .env("LBCTL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lbctl agent");
    let end = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for the agent") {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent with {args:?} kept running: it should have been refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("reading stderr");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("the agent with {args:?} died of a signal: {err}"));
    (code, err)
}

/// The lab's load-balancer interfaces that have a program (XDP or TC).
fn xdp_interfaces(lab: &Lab) -> Vec<String> {
    lab.lb_ifaces
        .iter()
        .filter(|i| lab.program_on(i).is_some())
        .cloned()
        .collect()
}

/// Nothing of a data plane exists: no pin directory, no XDP on any interface, no socket.
fn assert_untouched(lab: &Lab, socket: &Path, case: &str) {
    assert!(
        !lab.pin_dir.exists(),
        "{case}: {} was created",
        lab.pin_dir.display()
    );
    let xdp = xdp_interfaces(lab);
    assert!(xdp.is_empty(), "{case}: XDP attached to {xdp:?}");
    assert!(
        !socket.exists(),
        "{case}: the status socket {} was left behind",
        socket.display()
    );
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_bad_setting_never_touches_the_kernel() {
    if !privileged_or_skip("a_bad_setting_never_touches_the_kernel") {
        return;
    }
    let mut lab = Lab::new("lbt-order", 1);
    let dir = lbtest::TestDir::new("order");
    let apps = dir.join("apps.json");
    std::fs::write(
        &apps,
        apps_doc(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.1:8080")],
            &lab.backends,
            31000,
        ),
    )
    .expect("apps file");
    let socket = dir.join("agent.sock");
    let p = |p: &PathBuf| p.display().to_string();
    let from_file = strings(&["--apps", &p(&apps), "--status-socket", &p(&socket)]);
    assert_untouched(&lab, &socket, "before any agent");

    // A CA file that does not exist.
    let ca = dir.join("no-such-ca.pem");
    let (code, err) = refused_agent(
        &lab,
        &strings(&[
            "--marathon",
            "https://198.18.0.1:8443",
            "--ca-file",
            &p(&ca),
            "--status-socket",
            &p(&socket),
        ]),
    );
    assert!(
        code != 0 && err.contains("CA file") && err.contains(&p(&ca)),
        "bad CA file: exit {code}: {err}"
    );
    assert_untouched(&lab, &socket, "bad CA file");

    // A status socket path that cannot be bound: a directory is there.
    let taken = dir.join("a-directory");
    std::fs::create_dir_all(&taken).expect("dir");
    let (code, err) = refused_agent(
        &lab,
        &strings(&["--apps", &p(&apps), "--status-socket", &p(&taken)]),
    );
    assert!(
        code != 0 && err.contains("binding the status socket") && err.contains(&p(&taken)),
        "status socket: exit {code}: {err}"
    );
    assert!(taken.is_dir(), "the directory in the way was removed");
    assert_untouched(&lab, &socket, "status socket");

    // A metrics address already in use in the agent's namespace.
    let busy = in_netns(&lab.lb_ns, || {
        TcpListener::bind("127.0.0.1:0").expect("a listener in the load balancer's namespace")
    });
    let addr = busy.local_addr().expect("address").to_string();
    let mut args = from_file.clone();
    args.extend(strings(&["--metrics-listen", &addr]));
    let (code, err) = refused_agent(&lab, &args);
    assert!(
        code != 0 && err.contains("binding the metrics listener") && err.contains(&addr),
        "metrics: exit {code}: {err}"
    );
    assert_untouched(&lab, &socket, "metrics address in use");
    drop(busy);

    // --bpf-log in a build without the data plane's log ($LBCTL_BIN is the ordinary build).
    let mut args = from_file.clone();
    args.push("--bpf-log".into());
    let (code, err) = refused_agent(&lab, &args);
    assert!(
        code != 0 && err.contains("--bpf-log") && err.contains("--features bpf-log"),
        "--bpf-log: exit {code}: {err}"
    );
    assert_untouched(&lab, &socket, "--bpf-log");

    // An interface that does not exist, after ones that do.
    let mut args = from_file.clone();
    args.extend(strings(&["--iface", "nosuch0"]));
    let (code, err) = refused_agent(&lab, &args);
    assert!(
        code != 0 && err.contains("interface nosuch0 does not exist"),
        "interface: exit {code}: {err}"
    );
    assert_untouched(&lab, &socket, "missing interface");

    // The same settings, good: the agent attaches, and the checks above see it.
    let log = dir.join("agent.log");
    lab.start_agent_with(&from_file, &[], &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    assert_eq!(xdp_interfaces(&lab), lab.lb_ifaces, "{}", read_log(&log));
    assert!(lab.pin_dir.is_dir() && socket.exists());
    lab.stop_agents(false);
}
