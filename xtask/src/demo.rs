//! `cargo xtask demo`: a client, the load balancer and three backends, each in its own network
//! namespace; the real agent serves an app whose port carries two VIP labels; traffic goes through
//! both VIPs; then everything is torn down.
use anyhow::{Result, bail};
use lbtest::{Lab, apps_doc, read_log, tally, write_atomically};
use std::{net::SocketAddrV4, path::Path, process::Command, time::Duration};

const PORT: u16 = 31000;
const REQUESTS: usize = 300;

pub fn run(lbctl: &Path) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF: run it as root");
    }
    // SAFETY: the demo is single-threaded here; the variable is read by lbtest on this thread.
    unsafe { std::env::set_var("LBCTL_BIN", lbctl) };
    let dir = std::env::temp_dir().join(format!("lbdemo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = demo(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo(dir: &Path) -> Result<()> {
    println!("== building a sandbox: client 198.18.0.2, load balancer, backends 198.18.1-3.2");
    let mut lab = Lab::new("lbdemo", 3);
    let hits = lab.serve(PORT);
    let apps = dir.join("apps.json");
    let log = dir.join("agent.log");
    let backends = lab.backends.clone();
    let doc = apps_doc(
        "/demo/web",
        "tcp",
        &[("VIP_0", "172.16.0.1:8080"), ("VIP_1", "172.16.0.1:5050")],
        &backends,
        PORT,
    );
    write_atomically(&apps, &doc);
    println!("== the Marathon document (GET /v2/apps?embed=apps.tasks):");
    let pretty: serde_json::Value = serde_json::from_str(&doc)?;
    println!("{}", serde_json::to_string_pretty(&pretty)?);
    println!(
        "== starting: lbctl agent --apps {} --iface {}",
        apps.display(),
        lab.lb_ifaces.join(" --iface ")
    );
    lab.start_agent(&apps, &log);
    if let Err(e) = lab.wait_for_kernel(Duration::from_secs(20), |s| s.len() == 2) {
        bail!("the agent did not come up: {e}\n{}", read_log(&log));
    }
    // The lab's agent answers on a socket of its own (not the one the pin directory implies).
    let socket = lab.status_socket().display().to_string();
    let asking_agent = |cmd: &str| lab.lbctl(&[cmd, "--socket", &socket]);
    println!("== lbctl list");
    print!("{}", asking_agent("list"));
    for vip in ["172.16.0.1:8080", "172.16.0.1:5050"] {
        let v: SocketAddrV4 = vip.parse()?;
        let answers = lab.tcp_requests(v, REQUESTS);
        println!("== {REQUESTS} TCP connections to {vip}, answered by:");
        for (name, n) in tally(&answers) {
            println!("   {name}: {n}");
        }
    }
    println!("== requests each backend's server counted:");
    for (name, h) in &hits {
        println!(
            "   {name}: {}",
            h.tcp.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    println!("== lbctl list (flows the kernel tracks, and what each VIP and backend received)");
    print!("{}", asking_agent("list"));
    println!("== lbctl status (asks the agent; also how full the data plane is)");
    print!("{}", asking_agent("status"));
    println!("== lbctl stats");
    print!("{}", lab.lbctl(&["stats"]));
    println!("== which backend would a new flow from 198.18.0.2:40000 reach? (lbctl simulate)");
    print!(
        "{}",
        lab.lbctl(&[
            "simulate",
            "--vip",
            "172.16.0.1:8080",
            "--src",
            "198.18.0.2:40000"
        ])
    );
    lab.stop_agents(false);
    println!("== tearing down (lbctl down, namespaces removed)");
    drop(lab);
    let left = Command::new("ip").args(["netns", "list"]).output()?;
    if String::from_utf8_lossy(&left.stdout).contains("lbdemo-") {
        bail!("namespaces were left behind");
    }
    Ok(())
}
