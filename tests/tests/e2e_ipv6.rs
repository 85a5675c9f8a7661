//! IPv6 end to end: an IPv6 VIP with IPv6 backends, TCP and UDP from a client namespace through
//! the real agent, next to an IPv4 VIP of the same app.
use lbtest::{Lab, privileged_or_skip, read_log, tally, write_atomically};
use serde_json::json;
use std::{net::SocketAddr, time::Duration};

const PORT: u16 = 31000;

fn names(answers: &[String]) -> Vec<String> {
    tally(answers).into_iter().map(|(n, _)| n).collect()
}

#[test]
fn ipv6_vip_end_to_end() {
    if !privileged_or_skip("ipv6_vip_end_to_end") {
        return;
    }
    let mut lab = Lab::new("lbt-v6", 2);
    let hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("v6");
    let apps = dir.join("apps.json");
    let log = dir.join("agent.log");
    // Two apps: one whose tasks are reached over IPv6, one over IPv4. An IP VIP only gets
    // backends of its own family.
    let task = |app: &str, b: &lbtest::Backend, host: String| json!({"id": format!("{app}.{}", b.name), "host": host, "ports": [PORT], "state": "TASK_RUNNING"});
    let doc = json!({"apps": [
        {"id": "/web6", "portDefinitions": [{"protocol": "udp,tcp",
            "labels": {"VIP_0": "fd00:172:16::1:8080"}}],
         "tasks": lab.backends.iter().map(|b| task("web6", b, b.addr6.to_string())).collect::<Vec<_>>()},
        {"id": "/web4", "portDefinitions": [{"labels": {"VIP_0": "172.16.0.1:8080"}}],
         "tasks": lab.backends.iter().map(|b| task("web4", b, b.addr.to_string())).collect::<Vec<_>>()}
    ]});
    write_atomically(&apps, &doc.to_string());
    lab.start_agent(&apps, &log);
    lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 3)
        .unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    let services = lab.kernel_services();
    let v6: Vec<&(String, String, Vec<String>)> = services
        .iter()
        .filter(|(v, _, _)| v.starts_with('['))
        .collect();
    assert_eq!(v6.len(), 2, "{services:?}");
    for (vip, _, backends) in &v6 {
        assert_eq!(vip, "[fd00:172:16::1]:8080");
        assert_eq!(
            *backends,
            vec![
                format!("[2001:2:0:1::2]:{PORT} active"),
                format!("[2001:2:0:2::2]:{PORT} active")
            ]
        );
    }

    let vip6: SocketAddr = "[fd00:172:16::1]:8080".parse().expect("vip");
    assert_eq!(names(&lab.tcp_requests(vip6, 100)), ["b1", "b2"]);
    assert_eq!(names(&lab.udp_requests(vip6, 100)), ["b1", "b2"]);
    let vip4: SocketAddr = "172.16.0.1:8080".parse().expect("vip");
    assert_eq!(names(&lab.tcp_requests(vip4, 50)), ["b1", "b2"]);
    for (name, h) in &hits {
        assert!(
            h.tcp.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "{name}"
        );
    }
    let stats: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats");
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    // The XDP path did the work for IPv6 too: both directions redirected, not handed to the stack.
    assert!(n("reply") >= 250 && n("redirect") >= 500, "{stats}");
    assert!(n("rewritten_to_stack") <= 20, "{stats}");
    // The flows are tracked (closed ones stay until the LRU needs their room).
    let flows: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["flows", "--json", "--vip", "[fd00:172:16::1]:8080"]))
            .expect("flows");
    let flows = flows["flows"].as_array().expect("flows");
    assert!(flows.len() >= 100, "{} IPv6 flows", flows.len());
    assert!(
        flows.iter().all(|f| f["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("[2001:2::2]:"))
            && f["backend"]
                .as_str()
                .is_some_and(|b| b.starts_with("[2001:2:0:"))),
        "{flows:?}"
    );
    // The kernel's choice for an IPv6 client, as `lbctl simulate` predicts it from the file.
    let from_kernel = lab.lbctl(&[
        "simulate",
        "--vip",
        "[fd00:172:16::1]:8080",
        "--src",
        "[2001:2::2]:40000",
    ]);
    let out = std::process::Command::new(lbtest::lbctl_bin())
        .args([
            "simulate",
            "--vip",
            "[fd00:172:16::1]:8080",
            "--src",
            "[2001:2::2]:40000",
            "--apps",
        ])
        .arg(&apps)
        .output()
        .expect("simulate --apps");
    assert_eq!(
        from_kernel.trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        from_kernel.trim().starts_with("[2001:2:0:"),
        "{from_kernel}"
    );
    lab.stop_agents(false);
}
