//! The local path (issue 15) in the flat lab of its tests (client and backends on one bridge,
//! no load balancer in the path): new TCP connections per second and request latency through a
//! VIP with the client in the agent's cgroup (`lbctl agent --local`), against the direct path
//! (the same client connecting to the same backend's own address) measured twice: from inside
//! the cgroup (the programs run and return at once: not a VIP), so that the only difference is
//! the rewrite, and from outside it (no program); at 1 and at 10,000 services. And the cost of
//! the connect() call itself (a UDP connect: no handshake), rewritten, against a connect to the
//! backend's own address.
//!
//! The load generator is `lbtest-client rate`: one process, sequential connections, one request
//! each; the same binary, lab and backend for every path. The three paths are measured in turn
//! within each round, the order rotating from round to round, and each round gives a paired
//! ratio (local / direct of the same round), so that a slow moment of the shared machine hits
//! both sides of a ratio alike.
//!
//! The client's namespace reuses TIME_WAIT ports (`net.ipv4.tcp_tw_reuse = 1`, in the lab's own
//! namespace only). Without it, the ~12,000 connections of one 2 s run leave as many sockets in
//! TIME_WAIT for 60 s to the one backend address and port; once they hold about half of the
//! 28,232 ephemeral ports, connect() searches long for a free one (measured: 12,350 connections
//! in the first 2 s, 2,291 in the second, then about 640: 3 ms per connect()), which made the
//! earlier numbers of this section bimodal (230 to 6,400 conn/s) depending on how many runs had
//! gone before.
use super::stats::Summary;
use anyhow::{Context as _, Result, bail};
use lbtest::local_lab::LocalLab;
use serde::Serialize;
use std::time::Duration;

const PORT: u16 = 8080;

/// What to measure.
pub struct Plan {
    /// Numbers of services the agent serves (the measured VIP is the last).
    pub services: Vec<usize>,
    /// Rounds, each measuring both paths.
    pub rounds: usize,
    /// Seconds of each `rate` run.
    pub seconds: u64,
    /// connect() calls of each `udp-connect` run.
    pub connects: u64,
}

/// One number of services.
#[derive(Serialize)]
pub struct Row {
    /// Services the agent serves.
    pub services: usize,
    /// Rounds measured.
    pub rounds: usize,
    /// New connections per second, through the VIP (local path).
    pub local_cps: Option<Summary>,
    /// New connections per second to the backend's own address from inside the cgroup.
    pub direct_in_cgroup_cps: Option<Summary>,
    /// New connections per second to the backend's own address from outside it (no program).
    pub direct_cps: Option<Summary>,
    /// Per round: local conn/s over direct-in-cgroup conn/s.
    pub ratio_in_cgroup: Option<Summary>,
    /// Per round: local conn/s over direct (outside) conn/s.
    pub ratio_outside: Option<Summary>,
    /// Mean request latency (connect, request, reply) through the VIP, µs.
    pub local_latency_us: Option<Summary>,
    /// The same to the backend's own address from inside the cgroup, µs.
    pub direct_in_cgroup_latency_us: Option<Summary>,
    /// The same from outside the cgroup, µs.
    pub direct_latency_us: Option<Summary>,
    /// One UDP connect() to the VIP, rewritten by the local path, ns.
    pub connect_vip_ns: Option<Summary>,
    /// One UDP connect() to a backend's address from inside the cgroup (the programs run and
    /// return at once: not a VIP), ns.
    pub connect_in_cgroup_ns: Option<Summary>,
    /// One UDP connect() to a backend's address from outside the cgroup (no program), ns.
    pub connect_direct_ns: Option<Summary>,
    /// Per round: connect() to the VIP minus connect() to the backend from inside the cgroup, ns.
    pub rewrite_ns: Option<Summary>,
}

/// The section's results.
#[derive(Serialize)]
pub struct Results {
    /// One row per number of services.
    pub rows: Vec<Row>,
}

fn vip(i: usize) -> String {
    format!("172.16.{}.{}:80", i / 250, i % 250 + 1)
}

fn apps(lab: &LocalLab, n: usize) -> String {
    let tasks: Vec<serde_json::Value> = lab
        .backends
        .iter()
        .map(|b| {
            serde_json::json!({"id": format!("t.{}", b.name), "host": b.addr.to_string(),
                "ports": [PORT], "state": "TASK_RUNNING", "startedAt": "2026-11-25T00:00:00.000Z"})
        })
        .collect();
    // TCP services; the measured one (the last) is UDP too, for the connect() cost, and has
    // the first backend alone: the one the direct runs connect to.
    let apps: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let (protocol, tasks) = if i == n - 1 {
                ("tcp,udp", &tasks[..1])
            } else {
                ("tcp", &tasks[..])
            };
            serde_json::json!({"id": format!("/s{i}"), "portDefinitions": [{"protocol": protocol,
                "labels": {"VIP_0": vip(i)}}], "tasks": tasks})
        })
        .collect();
    serde_json::json!({ "apps": apps }).to_string()
}

/// The numbers of a client line `<tag> <numbers...>`.
fn numbers(lines: &[String], tag: &str) -> Result<Vec<f64>> {
    let line = lines
        .iter()
        .find(|l| l.starts_with(tag))
        .with_context(|| format!("no `{tag}` line in {lines:?}"))?;
    line.split(' ')
        .skip(1)
        .map(|n| n.parse::<f64>().with_context(|| format!("`{line}`")))
        .collect()
}

pub fn run(plan: &Plan) -> Result<Results> {
    let mut rows = Vec::new();
    for &n in &plan.services {
        rows.push(measure(plan, n)?);
    }
    Ok(Results { rows })
}

/// The paths a round measures: (name, in the cgroup, to the VIP).
const PATHS: [(&str, bool, bool); 3] = [
    ("local", true, true),
    ("direct in cgroup", true, false),
    ("direct", false, false),
];

fn measure(plan: &Plan, n: usize) -> Result<Row> {
    let mut lab = LocalLab::new("lbb-local", 3);
    for i in 0..3 {
        lab.serve(i, PORT);
    }
    // See the module's documentation: without it the runs exhaust the client's ports.
    lbtest::sh(&[
        "ip",
        "netns",
        "exec",
        &lab.client_ns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    let file = lab.dir.join("apps.json");
    std::fs::write(&file, apps(&lab, n))?;
    let log = lab.dir.join("agent.log");
    // Small tables, so that 10,000 services fit in memory (the same for every n).
    lab.start_agent(
        &file,
        &["--max-services", "16384", "--ring-size", "1021"],
        &log,
    );
    let want = n + 1;
    lab.wait_list(
        Duration::from_secs(300),
        |v| v["services"].as_array().is_some_and(|s| s.len() == want),
        &format!("the agent serving {n} services"),
    );
    let target = vip(n - 1);
    let direct = format!("{}:{PORT}", lab.backends[0].addr);
    let secs = plan.seconds.to_string();
    let connects = plan.connects.to_string();
    // Per path: conn/s and latency (µs) of each round.
    let mut cps: [Vec<f64>; 3] = Default::default();
    let mut lat: [Vec<f64>; 3] = Default::default();
    let (mut cv, mut ci, mut cd) = (vec![], vec![], vec![]);
    for round in 0..plan.rounds {
        for k in 0..PATHS.len() {
            let p = (k + round) % PATHS.len();
            let (name, in_cg, to_vip) = PATHS[p];
            let to = if to_vip { &target } else { &direct };
            let got = numbers(&lab.client(in_cg, &["rate", to, &secs]), "rate")?;
            if got[0] == 0.0 {
                bail!("no connection made ({name}): {got:?}");
            }
            cps[p].push(got[0] / plan.seconds as f64);
            lat[p].push(got[1] / 1000.0);
        }
        let one = |in_cg: bool, to: &str| -> Result<f64> {
            Ok(numbers(
                &lab.client(in_cg, &["udp-connect", to, &connects]),
                "udp-connect",
            )?[0])
        };
        cv.push(one(true, &target)?);
        ci.push(one(true, &direct)?);
        cd.push(one(false, &direct)?);
    }
    let s = stats_check(&lab)?;
    eprintln!("bench: local, {n} services: {s} local connects counted");
    let ratios =
        |other: usize| -> Vec<f64> { cps[0].iter().zip(&cps[other]).map(|(l, d)| l / d).collect() };
    let rewrite: Vec<f64> = cv.iter().zip(&ci).map(|(v, d)| v - d).collect();
    Ok(Row {
        services: n,
        rounds: plan.rounds,
        local_cps: Summary::of(&cps[0]),
        direct_in_cgroup_cps: Summary::of(&cps[1]),
        direct_cps: Summary::of(&cps[2]),
        ratio_in_cgroup: Summary::of(&ratios(1)),
        ratio_outside: Summary::of(&ratios(2)),
        local_latency_us: Summary::of(&lat[0]),
        direct_in_cgroup_latency_us: Summary::of(&lat[1]),
        direct_latency_us: Summary::of(&lat[2]),
        connect_vip_ns: Summary::of(&cv),
        connect_in_cgroup_ns: Summary::of(&ci),
        connect_direct_ns: Summary::of(&cd),
        rewrite_ns: Summary::of(&rewrite),
    })
}

/// The local path really served the VIP runs: its connect counter moved.
fn stats_check(lab: &LocalLab) -> Result<u64> {
    let s: serde_json::Value = serde_json::from_str(&lab.lbctl(&["stats", "--json"]))?;
    match s["local_connect"].as_u64() {
        Some(n) if n > 0 => Ok(n),
        _ => bail!("the local path counted no connect: {s}"),
    }
}

/// The section of BENCHMARKS.md.
pub fn markdown(o: &mut String, s: &super::Section<Results>) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\n## Local path (socket-level, `lbctl agent --local`)\n\n\
         The flat lab of `tests/tests/e2e_local.rs`: a client and three backends on one bridge, \
         no load balancer in the path. Load generator: `lbtest-client rate` (one process, \
         sequential new TCP connections, one request each), always to the same backend: through \
         a VIP whose only backend it is, from inside the agent's cgroup (local); to its own \
         address from inside the cgroup (the programs run, not a VIP: the only difference is the \
         rewrite) and from outside it (no program). The three runs of a round follow each other, \
         their order rotating; ratios are per round (local over direct of the same round). The \
         client's namespace reuses TIME_WAIT ports (`tcp_tw_reuse = 1`), else the runs exhaust \
         its ephemeral ports and connect() slows down tenfold. connect(): one UDP socket \
         connected again and again (no handshake), so the number is the call itself; rewrite \
         cost = to VIP minus to backend in cgroup, per round. Medians of the rounds (min–max).\n"
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
        "| services | rounds | local conn/s | direct in cgroup conn/s | direct conn/s | local/direct in cgroup | local/direct | local latency µs | direct in cgroup latency µs | direct latency µs |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.services,
            row.rounds,
            cell(&row.local_cps),
            cell(&row.direct_in_cgroup_cps),
            cell(&row.direct_cps),
            ratio(&row.ratio_in_cgroup),
            ratio(&row.ratio_outside),
            cell(&row.local_latency_us),
            cell(&row.direct_in_cgroup_latency_us),
            cell(&row.direct_latency_us),
        );
    }
    let _ = writeln!(
        o,
        "\n| services | connect() to VIP ns | to backend, in cgroup ns | to backend, no program ns | rewrite cost ns |\n|---|---|---|---|---|"
    );
    for row in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
            row.services,
            cell(&row.connect_vip_ns),
            cell(&row.connect_in_cgroup_ns),
            cell(&row.connect_direct_ns),
            cell(&row.rewrite_ns),
        );
    }
    let _ = writeln!(o);
}

/// A ratio with its spread: `p50 (min–max)`.
fn ratio(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.3} ({:.3}–{:.3})", s.p50, s.min, s.max),
        None => "-".into(),
    }
}

/// A median with its spread: `p50 (min–max)`.
fn cell(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.0} ({:.0}–{:.0})", s.p50, s.min, s.max),
        None => "-".into(),
    }
}
