//! The local path (issue 15) in the flat lab of its tests (client and backends on one bridge,
//! no load balancer in the path): new TCP connections per second and request latency through a
//! VIP with the client in the agent's cgroup (`lbctl agent --local`), against the direct path
//! (the same client, outside the cgroup, connecting to a backend's own address), at 1 and at
//! 10,000 services; and the cost of the connect() call itself (a UDP connect: no handshake),
//! rewritten to a backend, against a connect to the backend's own address.
//!
//! The load generator is `lbtest-client rate`: one process, sequential connections, one request
//! each; the same binary and lab for both paths, measured in alternation round by round.
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
    /// New connections per second, through the VIP (local path).
    pub local_cps: Option<Summary>,
    /// New connections per second to a backend's own address (no program).
    pub direct_cps: Option<Summary>,
    /// Mean request latency (connect, request, reply) through the VIP, µs.
    pub local_latency_us: Option<Summary>,
    /// The same to a backend's own address, µs.
    pub direct_latency_us: Option<Summary>,
    /// One UDP connect() to the VIP, rewritten by the local path, ns.
    pub connect_vip_ns: Option<Summary>,
    /// One UDP connect() to a backend's address from inside the cgroup (the programs run and
    /// return at once: not a VIP), ns.
    pub connect_in_cgroup_ns: Option<Summary>,
    /// One UDP connect() to a backend's address from outside the cgroup (no program), ns.
    pub connect_direct_ns: Option<Summary>,
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
    // TCP services; the measured one (the last) is UDP too, for the connect() cost.
    let apps: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let protocol = if i == n - 1 { "tcp,udp" } else { "tcp" };
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

fn measure(plan: &Plan, n: usize) -> Result<Row> {
    let mut lab = LocalLab::new("lbb-local", 3);
    for i in 0..3 {
        lab.serve(i, PORT);
    }
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
    let (mut lc, mut dc, mut ll, mut dl) = (vec![], vec![], vec![], vec![]);
    let (mut cv, mut ci, mut cd) = (vec![], vec![], vec![]);
    for _ in 0..plan.rounds {
        let local = numbers(&lab.client(true, &["rate", &target, &secs]), "rate")?;
        let plain = numbers(&lab.client(false, &["rate", &direct, &secs]), "rate")?;
        if local[0] == 0.0 || plain[0] == 0.0 {
            bail!("no connection made: local {local:?}, direct {plain:?}");
        }
        lc.push(local[0] / plan.seconds as f64);
        dc.push(plain[0] / plan.seconds as f64);
        ll.push(local[1] / 1000.0);
        dl.push(plain[1] / 1000.0);
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
    Ok(Row {
        services: n,
        local_cps: Summary::of(&lc),
        direct_cps: Summary::of(&dc),
        local_latency_us: Summary::of(&ll),
        direct_latency_us: Summary::of(&dl),
        connect_vip_ns: Summary::of(&cv),
        connect_in_cgroup_ns: Summary::of(&ci),
        connect_direct_ns: Summary::of(&cd),
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
         sequential new TCP connections, one request each); through a VIP from inside the \
         agent's cgroup (local), and to a backend's own address from outside it (direct). \
         connect(): one UDP socket connected again and again (no handshake), so the number is \
         the call itself. Medians of the rounds, with their spread.\n"
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
        "| services | local conn/s | direct conn/s | local/direct | local latency µs | direct latency µs | connect() to VIP ns | to backend, in cgroup ns | to backend, no program ns | rewrite cost ns |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &r.rows {
        let ratio = p50(&row.local_cps) / p50(&row.direct_cps);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {ratio:.3} | {} | {} | {} | {} | {} | {:.0} |",
            row.services,
            cell(&row.local_cps),
            cell(&row.direct_cps),
            cell(&row.local_latency_us),
            cell(&row.direct_latency_us),
            cell(&row.connect_vip_ns),
            cell(&row.connect_in_cgroup_ns),
            cell(&row.connect_direct_ns),
            p50(&row.connect_vip_ns) - p50(&row.connect_direct_ns)
        );
    }
}

fn p50(s: &Option<Summary>) -> f64 {
    s.map_or(f64::NAN, |s| s.p50)
}

/// A median with its spread: `p50 (min–max)`.
fn cell(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.0} ({:.0}–{:.0})", s.p50, s.min, s.max),
        None => "-".into(),
    }
}
