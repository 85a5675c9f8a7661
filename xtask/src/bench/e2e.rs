//! End to end in network namespaces: the same load generator against this load balancer (the
//! real agent, XDP attached), iptables DNAT rules as kube-proxy writes them (nf_tables and legacy
//! back ends), nftables DNAT through a verdict map, and plain routing without a load balancer.
//!
//! Every measurement gets a fresh `lbtest::Lab` (client, load balancer, backends), so nothing one
//! contender leaves (conntrack state, a registered netfilter table) can touch another; within it
//! the contender is set up, measured, torn down (`lbctl down`, rules flushed) and checked gone.
use super::{
    doc::{self, App},
    load::{self, Load, Outcome, Server},
    stats::Summary,
    sys,
};
use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The VIPs' port. Service `i`'s endpoints listen on `ENDPOINT_PORT + i` on every backend, so no
/// two services share an endpoint, as distinct services have distinct endpoints.
const PORT: u16 = 8080;
const ENDPOINT_PORT: u16 = 20000;
const IPERF_PORT: u16 = 5201;
/// The VIP of the throughput service: one backend, so that iperf3's control and data connections
/// reach the same server.
const IPERF_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(172, 31, 255, 1), IPERF_PORT);
/// Services the load is spread over (evenly through the table).
const TARGETS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Contender {
    /// No load balancer: the client connects to the backends' own addresses, routed by the
    /// load balancer's namespace.
    Direct,
    /// This project: `lbctl agent` with XDP on every interface of the load balancer.
    Lb,
    /// `iptables-restore` (the nf_tables back end, Debian's default) of KUBE-SERVICES-style rules.
    IptablesNft,
    /// The same rules with `iptables-legacy-restore`.
    IptablesLegacy,
    /// `nft`: a verdict map `ip daddr . tcp dport` to a chain per service doing
    /// `dnat to numgen random mod N map {...}`.
    Nftables,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "no load balancer (routing only)",
            Contender::Lb => "lb (this project, XDP)",
            Contender::IptablesNft => "iptables DNAT (nf_tables back end)",
            Contender::IptablesLegacy => "iptables DNAT (legacy back end)",
            Contender::Nftables => "nftables DNAT (verdict map + numgen)",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    /// (contender, services) pairs, measured in turn in every round. The services take the
    /// requests; the iperf3 service comes on top.
    pub configs: Vec<(Contender, usize)>,
    pub rounds: usize,
    pub backends: usize,
    pub duration: Duration,
    pub cps_threads: usize,
    pub rps_threads: usize,
    pub iperf_secs: u32,
    pub iperf_omit: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub contender: Contender,
    pub services: usize,
    pub round: usize,
    /// Time to put the services in place: rules loaded, or the agent serving all of them.
    pub setup_ms: f64,
    pub cps: Outcome,
    pub cps_latency_us: Option<Summary>,
    pub rps: Outcome,
    pub rps_latency_us: Option<Summary>,
    pub iperf_gbps: Option<f64>,
    pub iperf_retransmits: Option<u64>,
    pub iperf_error: Option<String>,
    /// The client interface's segmentation offloads while this contender ran.
    pub client_offloads: String,
    /// `iface:hook` for each interface of this project's agent (empty for the others).
    pub lb_hooks: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub backends: usize,
    pub rounds: usize,
    pub duration_s: f64,
    pub cps_threads: usize,
    pub rps_threads: usize,
    pub iperf_secs: u32,
    pub measurements: Vec<Measurement>,
}

pub fn run(plan: &Plan) -> Result<Results> {
    let mut out = Results {
        backends: plan.backends,
        rounds: plan.rounds,
        duration_s: plan.duration.as_secs_f64(),
        cps_threads: plan.cps_threads,
        rps_threads: plan.rps_threads,
        iperf_secs: plan.iperf_secs,
        measurements: Vec::new(),
    };
    let n = plan.configs.len();
    for round in 0..plan.rounds {
        // Each round starts one further along, so no contender always runs first.
        for k in 0..n {
            let (contender, services) = plan.configs[(k + round) % n];
            eprintln!(
                "bench: e2e round {}/{}: {} with {services} services",
                round + 1,
                plan.rounds,
                contender.name()
            );
            let m = measure(plan, contender, services, round, lbtest::Hooks::Xdp)
                .with_context(|| format!("{} with {services} services", contender.name()))?;
            out.measurements.push(m);
        }
    }
    Ok(out)
}

/// A service: its VIP and its endpoints.
pub struct Service {
    pub vip: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
}

/// `n` services that take the requests, each with an endpoint on every backend, then the iperf3
/// service.
fn services(n: usize, backends: &[Ipv4Addr]) -> Vec<Service> {
    let mut out: Vec<Service> = (0..n)
        .map(|i| Service {
            vip: SocketAddrV4::new(doc::vip_addr(i), PORT),
            endpoints: backends
                .iter()
                .map(|b| SocketAddrV4::new(*b, ENDPOINT_PORT + i as u16))
                .collect(),
        })
        .collect();
    out.push(Service {
        vip: IPERF_VIP,
        endpoints: vec![SocketAddrV4::new(backends[0], IPERF_PORT)],
    });
    out
}

/// Up to `TARGETS` of the first `n` services, spread evenly: the ones the load goes to.
fn targets(n: usize) -> Vec<usize> {
    let k = n.min(TARGETS);
    (0..k).map(|i| i * n / k).collect()
}

/// One measurement of `contender` in a fresh Lab built for `hooks` (this section always uses
/// `Hooks::Xdp`: far ends tuned and XDP forced, as it has always measured; `hooks.rs` uses both).
/// No iperf3 run when `plan.iperf_secs` is 0.
pub fn measure(
    plan: &Plan,
    contender: Contender,
    services: usize,
    round: usize,
    hooks: lbtest::Hooks,
) -> Result<Measurement> {
    let prefix = sys::name("e2e");
    let mut lab = lbtest::Lab::new_with(&prefix, plan.backends, hooks);
    let dir = std::env::temp_dir().join(format!("{prefix}-files"));
    std::fs::create_dir_all(&dir)?;
    let _files = RemoveDir(dir.clone());
    sys::in_ns(
        &lab.client_ns,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65000",
        ],
    )?;
    let addrs: Vec<Ipv4Addr> = lab.backends.iter().map(|b| b.addr).collect();
    let services = self::services(services, &addrs);
    let n = services.len() - 1;
    let targets = targets(n);
    let mut servers = Vec::new();
    for b in &lab.backends {
        let ports: Vec<SocketAddrV4> = targets
            .iter()
            .map(|t| SocketAddrV4::new(b.addr, ENDPOINT_PORT + *t as u16))
            .collect();
        servers.push(Server::start(&b.ns, &ports, &b.name)?);
    }
    let _iperf_server = Process::spawn(&[
        "ip",
        "netns",
        "exec",
        &lab.backends[0].ns,
        "iperf3",
        "-s",
        "-p",
        "5201",
    ])?;
    let start = Instant::now();
    match contender {
        Contender::Direct => {}
        Contender::Lb => {
            let apps: Vec<App> = services
                .iter()
                .enumerate()
                .map(|(i, s)| App {
                    id: format!("/bench/app{i}"),
                    vip: SocketAddr::V4(s.vip),
                    protocol: "tcp",
                    tasks: s.endpoints.iter().map(|e| SocketAddr::V4(*e)).collect(),
                })
                .collect();
            let file = dir.join("apps.json");
            std::fs::write(&file, doc::document(&apps))?;
            let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
            let table = super::lb_table(services.len(), endpoints, endpoints)?;
            let mut args = vec!["--apps".to_string(), file.display().to_string()];
            args.extend(super::agent_flags(&table));
            lab.start_agent_with(&args, &[], &dir.join("agent.log"));
            lab.wait_for_kernel(Duration::from_secs(120), |s| s.len() == services.len())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the agent did not serve {} services: {e}\n{}",
                        services.len(),
                        lbtest::read_log(&dir.join("agent.log"))
                    )
                })?;
        }
        Contender::IptablesNft | Contender::IptablesLegacy => {
            let restore = if contender == Contender::IptablesNft {
                "iptables-restore"
            } else {
                "iptables-legacy-restore"
            };
            let rules = iptables_rules(&services);
            sys::run_with_input(&["ip", "netns", "exec", &lab.lb_ns, restore], Some(&rules))?;
        }
        Contender::Nftables => {
            let rules = nft_rules(&services);
            sys::run_with_input(
                &["ip", "netns", "exec", &lab.lb_ns, "nft", "-f", "-"],
                Some(&rules),
            )?;
        }
    }
    // Without a load balancer the client goes to the first service's endpoints themselves.
    let (targets, iperf_target) = if contender == Contender::Direct {
        (services[0].endpoints.clone(), services[n].endpoints[0])
    } else {
        (
            targets.iter().map(|t| services[*t].vip).collect(),
            IPERF_VIP,
        )
    };
    let setup_ms = start.elapsed().as_secs_f64() * 1e3;
    let client_offloads = offloads(&lab.client_ns);
    let load = |threads| Load {
        targets: targets.clone(),
        threads,
        duration: plan.duration,
        max_per_thread: 5_000_000,
    };
    // A short warm-up (first neighbour resolutions, first flows), not counted.
    let warm = Load {
        duration: Duration::from_millis(200),
        ..load(1)
    };
    let w = load::connections(&lab.client_ns, &warm);
    ensure!(w.ops > 0, "no request got through: {:?}", w.first_error);
    let cps = load::connections(&lab.client_ns, &load(plan.cps_threads));
    let rps = load::requests(&lab.client_ns, &load(plan.rps_threads));
    for (what, o) in [("new connections", &cps), ("kept-alive requests", &rps)] {
        ensure!(o.ops > 0, "{what}: nothing completed: {:?}", o.first_error);
    }
    // Thousands of new connections reach every backend; a few kept-alive ones need not.
    ensure!(
        cps.answered_by.len() == plan.backends,
        "new connections were answered by {:?}, not by all {} backends",
        cps.answered_by,
        plan.backends
    );
    let (iperf_gbps, iperf_retransmits, iperf_error) = match plan.iperf_secs {
        0 => (None, None, None),
        secs => match iperf(&lab.client_ns, iperf_target, secs, plan.iperf_omit) {
            Ok((g, r)) => (Some(g), Some(r), None),
            Err(e) => (None, None, Some(format!("{e:#}"))),
        },
    };
    // The hook each of the load balancer's interfaces got, as the agent reports it.
    let lb_hooks = match contender {
        Contender::Lb => lab
            .status_at(&lab.status_socket())
            .and_then(|s| s["agent"]["hooks"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|h| {
                let field = |k: &str| h[k].as_str().unwrap_or("?").to_string();
                format!("{}:{}", field("iface"), field("hook"))
            })
            .collect(),
        _ => Vec::new(),
    };
    teardown(&mut lab, contender)?;
    drop(servers);
    Ok(Measurement {
        contender,
        services: n,
        round,
        setup_ms,
        cps_latency_us: Summary::of_u32(&cps.latency_us),
        cps,
        rps_latency_us: Summary::of_u32(&rps.latency_us),
        rps,
        iperf_gbps,
        iperf_retransmits,
        iperf_error,
        client_offloads,
        lb_hooks,
    })
}

/// Removes the contender and checks that it is gone from the load balancer's namespace.
fn teardown(lab: &mut lbtest::Lab, contender: Contender) -> Result<()> {
    let ns = lab.lb_ns.clone();
    match contender {
        Contender::Direct => {}
        Contender::Lb => {
            lab.stop_agents(false);
            lab.lbctl(&["down"]);
            let links = sys::run(&["ip", "-n", &ns, "-d", "link", "show"])?;
            ensure!(
                !links.contains("prog/xdp"),
                "XDP is still attached after `lbctl down`:\n{links}"
            );
        }
        Contender::IptablesNft | Contender::Nftables => {
            sys::in_ns(&ns, &["nft", "flush", "ruleset"])?;
            let left = sys::in_ns(&ns, &["nft", "list", "ruleset"])?;
            ensure!(left.trim().is_empty(), "rules left after flushing:\n{left}");
        }
        Contender::IptablesLegacy => {
            sys::in_ns(&ns, &["iptables-legacy", "-t", "nat", "-F"])?;
            sys::in_ns(&ns, &["iptables-legacy", "-t", "nat", "-X"])?;
            let left = sys::in_ns(&ns, &["iptables-legacy-save", "-t", "nat"])?;
            ensure!(!left.contains("-A "), "rules left after flushing:\n{left}");
        }
    }
    Ok(())
}

/// The rules kube-proxy's iptables mode writes for ClusterIP services, reduced to what routes
/// a packet: PREROUTING jumps to KUBE-SERVICES, one rule per service jumps to its KUBE-SVC
/// chain, which picks an endpoint with `statistic --mode random` (probabilities 1/n, 1/(n-1), ...
/// so each is equally likely), and each KUBE-SEP chain DNATs.
pub fn iptables_rules(services: &[Service]) -> String {
    let mut chains = vec![
        "*nat".to_string(),
        ":PREROUTING ACCEPT [0:0]".into(),
        ":KUBE-SERVICES - [0:0]".into(),
    ];
    let mut rules = vec!["-A PREROUTING -j KUBE-SERVICES".to_string()];
    for (i, s) in services.iter().enumerate() {
        let svc = format!("KUBE-SVC-{i}");
        chains.push(format!(":{svc} - [0:0]"));
        rules.push(format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {} -j {svc}",
            s.vip.ip(),
            s.vip.port()
        ));
        for (j, ep) in s.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i}-{j}");
            chains.push(format!(":{sep} - [0:0]"));
            let left = s.endpoints.len() - j;
            if left > 1 {
                rules.push(format!(
                    "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                ));
            } else {
                rules.push(format!("-A {svc} -j {sep}"));
            }
            rules.push(format!(
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {ep}"
            ));
        }
    }
    chains.extend(rules);
    chains.push("COMMIT".into());
    chains.join("\n") + "\n"
}

/// One table: a verdict map from `ip daddr . tcp dport` to a chain per service, which DNATs to
/// `numgen random mod N` of its endpoints.
pub fn nft_rules(services: &[Service]) -> String {
    let mut s = String::from("table ip lbbench {\n");
    for (i, svc) in services.iter().enumerate() {
        let map: Vec<String> = svc
            .endpoints
            .iter()
            .enumerate()
            .map(|(j, e)| format!("{j} : {} . {}", e.ip(), e.port()))
            .collect();
        s.push_str(&format!(
            "  chain svc{i} {{\n    meta l4proto tcp dnat ip to numgen random mod {} map {{ {} }}\n  }}\n",
            svc.endpoints.len(),
            map.join(", ")
        ));
    }
    let elements: Vec<String> = services
        .iter()
        .enumerate()
        .map(|(i, svc)| format!("{} . {} : goto svc{i}", svc.vip.ip(), svc.vip.port()))
        .collect();
    s.push_str(&format!(
        "  map services {{\n    type ipv4_addr . inet_service : verdict\n    elements = {{ {} }}\n  }}\n",
        elements.join(",\n      ")
    ));
    s.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr . tcp dport vmap @services\n  }\n}\n",
    );
    s
}

/// `tcp-segmentation-offload` and `generic-segmentation-offload` of the client's interface.
fn offloads(client_ns: &str) -> String {
    sys::in_ns(client_ns, &["ethtool", "-k", "c0"])
        .map(|t| {
            t.lines()
                .filter(|l| {
                    l.starts_with("tcp-segmentation-offload")
                        || l.starts_with("generic-segmentation-offload")
                })
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|e| format!("unknown: {e}"))
}

/// One iperf3 TCP stream from the client: (Gbit/s received, retransmits).
fn iperf(client_ns: &str, target: SocketAddrV4, secs: u32, omit: u32) -> Result<(f64, u64)> {
    let (t, o) = (secs.to_string(), omit.to_string());
    let ip = target.ip().to_string();
    let port = target.port().to_string();
    let args = [
        "ip",
        "netns",
        "exec",
        client_ns,
        "iperf3",
        "-c",
        &ip,
        "-p",
        &port,
        "-t",
        &t,
        "-O",
        &o,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    // The server may still be starting: a few tries, 300 ms apart.
    let mut last = None;
    for _ in 0..5 {
        match sys::run(&args) {
            Ok(json) => {
                let v: serde_json::Value = serde_json::from_str(&json).context("iperf3 -J")?;
                if let Some(e) = v["error"].as_str() {
                    bail!("iperf3: {e}");
                }
                let bps = v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .context("iperf3 gave no received rate")?;
                let retr = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
                return Ok((bps / 1e9, retr));
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("iperf3 did not run")))
}

/// A child process, killed on drop.
struct Process(Child);

impl Process {
    fn spawn(args: &[&str]) -> Result<Process> {
        let child = Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?}"))?;
        Ok(Process(child))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory removed on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
