//! End to end by hook (issue 13): this project on TC (the lab's links as Linux makes them, the
//! agent choosing: TC on veth) and on XDP (far ends tuned, XDP forced), next to iptables DNAT,
//! nftables DNAT and the direct path, in the same run, at 1 and 10,000 services.
//!
//! Every measurement is `e2e::measure`: the e2e section's Lab (a fresh one each time), services,
//! rules, load generator (`load.rs`: new connections per second, kept-alive requests per second)
//! and teardown checks, without iperf3. Only the Lab's links differ: `Hooks::Plain` for TC and the
//! netfilter contenders (what a user has), `Hooks::Xdp` for XDP (what XDP on a veth needs). The
//! direct path is measured on both, so the cost of the tuning itself shows. The hook the agent
//! reports for every interface is checked against the one the row names.
use super::{
    e2e::{self, Contender, Measurement},
    stats::Summary,
};
use anyhow::{Context as _, Result, ensure};
use lbtest::Hooks;
use serde::Serialize;

/// What is measured in one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Path {
    /// No load balancer, links as Linux makes them.
    Direct,
    /// No load balancer, far ends tuned as for XDP.
    DirectTuned,
    /// This project, the agent choosing (TC on every veth).
    Tc,
    /// This project, XDP forced, far ends tuned.
    Xdp,
    /// iptables DNAT rules as kube-proxy writes them (nf_tables back end, Debian's default).
    Iptables,
    /// nftables DNAT through a verdict map.
    Nftables,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "no load balancer",
            Path::DirectTuned => "no load balancer (far ends tuned)",
            Path::Tc => "lb, TC (default on veth)",
            Path::Xdp => "lb, XDP (forced, far ends tuned)",
            Path::Iptables => "iptables DNAT",
            Path::Nftables => "nftables DNAT",
        }
    }

    fn contender(self) -> Contender {
        match self {
            Path::Direct | Path::DirectTuned => Contender::Direct,
            Path::Tc | Path::Xdp => Contender::Lb,
            Path::Iptables => Contender::IptablesNft,
            Path::Nftables => Contender::Nftables,
        }
    }

    fn hooks(self) -> Hooks {
        match self {
            Path::DirectTuned | Path::Xdp => Hooks::Xdp,
            _ => Hooks::Plain,
        }
    }

    /// The hook the agent must report on every interface.
    fn hook(self) -> Option<&'static str> {
        match self {
            Path::Tc => Some("tc"),
            Path::Xdp => Some("xdp"),
            _ => None,
        }
    }
}

pub struct Plan {
    /// (path, services) pairs, measured in turn in every round.
    pub configs: Vec<(Path, usize)>,
    /// Rounds, backends, phase length and threads, as section 4 takes them (its own configs
    /// and iperf3 unused).
    pub load: e2e::Plan,
}

/// One configuration over all rounds.
#[derive(Serialize)]
pub struct Row {
    pub path: Path,
    pub services: usize,
    pub setup_ms: Option<Summary>,
    /// New connections per second, one sample per round.
    pub cps: Option<Summary>,
    /// Each round's median connection latency, µs.
    pub cps_latency_us: Option<Summary>,
    /// Kept-alive requests per second, one sample per round.
    pub rps: Option<Summary>,
    /// Each round's median request latency, µs.
    pub rps_latency_us: Option<Summary>,
    pub errors: u64,
    /// `iface:hook` as the agent reported it (last round).
    pub hooks: Vec<String>,
    /// The client interface's segmentation offloads (last round).
    pub client_offloads: String,
}

#[derive(Serialize)]
pub struct Results {
    pub backends: usize,
    pub rounds: usize,
    pub duration_s: f64,
    pub cps_threads: usize,
    pub rps_threads: usize,
    pub rows: Vec<Row>,
}

pub fn run(plan: &Plan) -> Result<Results> {
    let e2e_plan = e2e::Plan {
        iperf_secs: 0,
        ..plan.load.clone()
    };
    let n = plan.configs.len();
    let mut samples: Vec<Vec<Measurement>> = (0..n).map(|_| Vec::new()).collect();
    for round in 0..e2e_plan.rounds {
        // Each round starts one further along, so no configuration always runs first.
        for k in 0..n {
            let i = (k + round) % n;
            let (path, services) = plan.configs[i];
            eprintln!(
                "bench: hooks round {}/{}: {} with {services} services",
                round + 1,
                e2e_plan.rounds,
                path.name()
            );
            let m = e2e::measure(&e2e_plan, path.contender(), services, round, path.hooks())
                .with_context(|| format!("{} with {services} services", path.name()))?;
            if let Some(hook) = path.hook() {
                let suffix = format!(":{hook}");
                ensure!(
                    !m.lb_hooks.is_empty() && m.lb_hooks.iter().all(|h| h.ends_with(&suffix)),
                    "{}: the agent reported hooks {:?}, not {hook} on every interface",
                    path.name(),
                    m.lb_hooks
                );
            }
            samples[i].push(m);
        }
    }
    let rows = plan
        .configs
        .iter()
        .zip(samples)
        .map(|(&(path, services), ms)| row(path, services, &ms))
        .collect();
    Ok(Results {
        backends: e2e_plan.backends,
        rounds: e2e_plan.rounds,
        duration_s: e2e_plan.duration.as_secs_f64(),
        cps_threads: e2e_plan.cps_threads,
        rps_threads: e2e_plan.rps_threads,
        rows,
    })
}

fn row(path: Path, services: usize, ms: &[Measurement]) -> Row {
    let of = |f: fn(&Measurement) -> Option<f64>| {
        Summary::of(&ms.iter().filter_map(f).collect::<Vec<_>>())
    };
    Row {
        path,
        services,
        setup_ms: of(|m| Some(m.setup_ms)),
        cps: of(|m| Some(m.cps.rate)),
        cps_latency_us: of(|m| m.cps_latency_us.map(|s| s.p50)),
        rps: of(|m| Some(m.rps.rate)),
        rps_latency_us: of(|m| m.rps_latency_us.map(|s| s.p50)),
        errors: ms.iter().map(|m| m.cps.errors + m.rps.errors).sum(),
        hooks: ms.last().map(|m| m.lb_hooks.clone()).unwrap_or_default(),
        client_offloads: ms
            .last()
            .map(|m| m.client_offloads.clone())
            .unwrap_or_default(),
    }
}

/// The section of BENCHMARKS.md.
pub fn markdown(o: &mut String, s: &super::Section<Results>) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\n## End to end by hook: TC, XDP, iptables, nftables\n\n\
         Which hook a user gets: `--iface NAME` (auto) attaches XDP in native mode on a NIC whose \
         driver takes it, and TC (`lb_tc`, tcx ingress) on veth, bridges, bonds, VLANs, tun/tap, \
         dummy and every other virtual device, and on a NIC whose driver refuses native XDP; \
         `NAME:xdp` / `NAME:tc` force one. In this lab every interface is a veth, so the default \
         is TC.\n\n\
         How: each measurement is one of section 4's (`e2e::measure`): a fresh `lbtest::Lab` \
         (client, load balancer, backends on veth pairs), the contender set up, the same load \
         generator, the contender removed and checked gone; no iperf3. The Lab's links differ: \
         TC, iptables, nftables and \"no load balancer\" run on links as Linux makes them (what \
         a user has); XDP runs with the far ends tuned as XDP on a veth needs (transmit checksum \
         offload off, GRO on; `Hooks::Xdp`), and \"no load balancer (far ends tuned)\" shows \
         what that tuning alone changes (the client's TCP segmentation offload is off in the XDP \
         rows because the kernel turns it off on a veth whose peer has an XDP program, see \
         \"client offloads\"). The hook the agent reports for each interface is \
         checked against the row (the run fails otherwise). iptables: kube-proxy-style rules, \
         nf_tables back end; nftables: a verdict map to `numgen` DNAT (both as in section 4).\n"
    );
    if let Some(e) = &s.error {
        let _ = writeln!(o, "Failed: {e}\n");
        return;
    }
    let Some(r) = &s.result else {
        let _ = writeln!(o, "Not run.\n");
        return;
    };
    let _ = writeln!(
        o,
        "{} backends; {} round{}, each running every row once, starting one further along than \
         the round before; each phase {:.1} s; new connections: {} threads, one request per \
         connection, closed with RST; requests: {} threads, one kept-alive connection each. \
         Cells: median over rounds (lowest–highest round); latencies are the median over rounds \
         of each round's median.\n",
        r.backends,
        r.rounds,
        if r.rounds == 1 { "" } else { "s" },
        r.duration_s,
        r.cps_threads,
        r.rps_threads
    );
    let _ = writeln!(
        o,
        "| path | services | setup, ms | new conn/s | conn latency, µs | requests/s | request latency, µs | errors | hooks reported | client offloads |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &r.rows {
        let services = if row.path.contender() == Contender::Direct {
            "–".to_string()
        } else {
            super::report::num(row.services as f64, 0)
        };
        let _ = writeln!(
            o,
            "| {} | {services} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.path.name(),
            p50(&row.setup_ms),
            cell(&row.cps),
            p50(&row.cps_latency_us),
            cell(&row.rps),
            p50(&row.rps_latency_us),
            row.errors,
            if row.hooks.is_empty() {
                "–".to_string()
            } else {
                row.hooks.join(" ")
            },
            row.client_offloads
        );
    }
    let _ = writeln!(o);
}

fn p50(s: &Option<Summary>) -> String {
    s.map_or("–".into(), |s| super::report::num(s.p50, 0))
}

/// A median with its spread: `p50 (min–max)`.
fn cell(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!(
            "{} ({}–{})",
            super::report::num(s.p50, 0),
            super::report::num(s.min, 0),
            super::report::num(s.max, 0)
        ),
        None => "–".into(),
    }
}
