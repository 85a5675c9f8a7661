//! `lbctl agent --bpf-log` relays the data plane's per-packet debug log, from an lbctl built with
//! the `bpf-log` feature ($LBCTL_LOG_BIN; `cargo xtask test` builds it), and an ordinary build
//! refuses the flag, saying how to get it; so does the logging build without an interface.
use lbtest::{Lab, apps_doc, privileged_or_skip, read_log, write_atomically};
use std::{path::PathBuf, process::Command, time::Duration};

#[test]
fn bpf_log_behind_a_debug_switch() {
    if !privileged_or_skip("bpf_log_behind_a_debug_switch") {
        return;
    }
    let Some(log_bin) = std::env::var_os("LBCTL_LOG_BIN").map(PathBuf::from) else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "LBCTL_LOG_BIN is not set: run the tests with `cargo xtask test`, which builds it"
            );
        }
        eprintln!(
            "SKIPPED bpf_log_behind_a_debug_switch: LBCTL_LOG_BIN not set (cargo xtask test sets it)"
        );
        return;
    };
    let mut lab = Lab::new("lbt-log", 1);
    let _hits = lab.serve(31000);
    let dir = lbtest::TestDir::new("log");
    let apps = dir.join("apps.json");
    let backends = lab.backends.clone();
    write_atomically(
        &apps,
        &apps_doc(
            "/web",
            "tcp",
            &[("VIP_0", "172.16.0.1:8080")],
            &backends,
            31000,
        ),
    );

    // An ordinary build refuses the flag and says what to do.
    let plain = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.lb_ns))
        .arg(lbtest::lbctl_bin())
        .args(["agent", "--bpf-log", "--iface", "lb-c", "--apps"])
        .arg(&apps)
        .args(["--pin-dir"])
        .arg(&lab.pin_dir)
        .output()
        .expect("agent");
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success() && err.contains("--features bpf-log"),
        "{err}"
    );
    let _ = Command::new(lbtest::lbctl_bin())
        .args(["down", "--pin-dir"])
        .arg(&lab.pin_dir)
        .output();

    // The logging build refuses the flag without an interface (the log is the XDP and TC
    // programs', which the local path alone does not load), before it touches the kernel.
    // `timeout` ends an agent that would run instead.
    let cgroup = lbtest::local_lab::TestCgroup::new("bpf-log");
    let local = Command::new("timeout")
        .arg("15")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.lb_ns))
        .arg(&log_bin)
        .args(["agent", "--bpf-log", "--local", "--cgroup"])
        .arg(&cgroup.0)
        .arg("--apps")
        .arg(&apps)
        .arg("--pin-dir")
        .arg(&lab.pin_dir)
        .arg("--status-socket")
        .arg(dir.join("refused.sock"))
        .output()
        .expect("agent");
    let err = String::from_utf8_lossy(&local.stderr);
    assert!(
        local.status.code().is_some_and(|c| c != 0 && c != 124) && err.contains("give an --iface"),
        "{:?}: {err}",
        local.status
    );
    assert!(
        lbctl::dataplane::is_fresh(&lab.pin_dir),
        "the refused agent pinned something"
    );
    drop(cgroup);

    // The logging build relays one line per packet of the VIP.
    // SAFETY: set before any thread of this test reads it.
    unsafe { std::env::set_var("LBCTL_BIN", &log_bin) };
    let log = dir.join("agent.log");
    lab.start_agent_with(
        &[
            "--apps".into(),
            apps.display().to_string(),
            "--bpf-log".into(),
        ],
        &[],
        &log,
    );
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    assert_eq!(
        lab.tcp_requests(
            "172.16.0.1:8080"
                .parse::<std::net::SocketAddrV4>()
                .expect("vip"),
            5
        )
        .len(),
        5
    );
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5)
        && read_log(&log).matches("lb: rewritten").count() < 10
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = read_log(&log);
    assert!(
        text.matches("lb: rewritten").count() >= 10,
        "no per-packet log lines:\n{text}"
    );
    lab.stop_agents(false);
}
