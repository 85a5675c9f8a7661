//! The agent's DNS server for named VIPs: answers per second and their latency, from a client
//! namespace to the real agent (`--dns-listen`) in a load-balancer namespace, next to the time
//! of one lookup of the same names in a plain `HashMap` in this process (what answering costs
//! beyond finding the address). All in an `lbtest::Lab` the bench creates and removes.
use super::{stats::Summary, sys};
use anyhow::{Context as _, Result, ensure};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use serde::Serialize;
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

/// Where the agent answers: the load balancer's address on the client's link.
const DNS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 53);
const PORT: u16 = 31200;

#[derive(Clone, Debug)]
pub struct Plan {
    /// Named VIPs in the zone (one app each).
    pub names: usize,
    /// Client threads, each with one query outstanding at a time.
    pub clients: usize,
    pub duration: Duration,
    /// Lookups timed in the HashMap.
    pub map_lookups: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub names: usize,
    pub clients: usize,
    pub duration_s: f64,
    /// Answers received per second, all clients together.
    pub answers_per_s: f64,
    /// Queries that got no answer within 1 s (counted, not in the latencies).
    pub lost: u64,
    /// Query-to-answer time of each answer, µs.
    pub latency_us: Option<Summary>,
    /// One lookup of the same names in a `HashMap<String, Ipv4Addr>`, ns (medians of batches).
    pub map_lookup_ns: Option<Summary>,
}

pub fn run(plan: &Plan) -> Result<Results> {
    let prefix = sys::name("dns");
    let mut lab = lbtest::Lab::new(&prefix, 1);
    let dir = std::env::temp_dir().join(format!("{prefix}-files"));
    std::fs::create_dir_all(&dir)?;
    let _files = RemoveDir(dir.clone());
    let names: Vec<String> = (0..plan.names).map(|i| format!("svc{i}")).collect();
    let task = lbtest::pktlab::Task {
        name: "b1".into(),
        host: lab.backends[0].addr.into(),
        port: PORT,
        state: "TASK_RUNNING",
    };
    let apps: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            let label = format!("/{n}:8080");
            let tasks = std::slice::from_ref(&task);
            lbtest::pktlab::app(&format!("/{n}"), "tcp", &[("VIP_0", label.as_str())], tasks)
        })
        .collect();
    let doc = lbtest::pktlab::apps(apps);
    let apps_file = dir.join("apps.json");
    std::fs::write(&apps_file, doc)?;
    let log = dir.join("agent.log");
    lab.start_agent_with(
        &[
            "--apps".into(),
            apps_file.display().to_string(),
            "--dns-listen".into(),
            DNS.to_string(),
        ],
        &[],
        &log,
    );
    let fqdns: Vec<String> = names
        .iter()
        .map(|n| format!("{n}.marathon.l4lb.thisdcos.directory."))
        .collect();
    // Ready when the last name answers.
    let last = fqdns[fqdns.len() - 1].clone();
    let t = Instant::now();
    let addr = loop {
        let l = last.clone();
        let got = lbtest::in_netns(&lab.client_ns, move || ask_once(&l));
        if let Some(a) = got {
            break a;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the agent did not answer for {last} within 30 s:\n{}",
            lbtest::read_log(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        addr.octets()[0] == 11,
        "{last} answered {addr}, not a named-pool address"
    );

    // The load: each client thread asks the names in turn, one query outstanding.
    let queries: Vec<Vec<u8>> = fqdns
        .iter()
        .enumerate()
        .map(|(i, n)| query(n, i as u16).to_vec().context("encoding a query"))
        .collect::<Result<_>>()?;
    let mut handles = Vec::new();
    for c in 0..plan.clients {
        let queries = queries.clone();
        let duration = plan.duration;
        handles.push(lbtest::spawn_in_netns(&lab.client_ns, move || {
            load(&queries, c, duration)
        }));
    }
    let mut latencies = Vec::new();
    let mut answers = 0u64;
    let mut lost = 0u64;
    for h in handles {
        let (l, a, x) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a DNS client panicked"))??;
        latencies.extend(l);
        answers += a;
        lost += x;
    }
    // The same names in a plain map, in this process.
    let map: HashMap<String, Ipv4Addr> = fqdns
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), Ipv4Addr::from(0x0b00_0000 + i as u32)))
        .collect();
    let map_lookup_ns = map_lookups(&map, &fqdns, plan.map_lookups);
    Ok(Results {
        names: plan.names,
        clients: plan.clients,
        duration_s: plan.duration.as_secs_f64(),
        answers_per_s: answers as f64 / plan.duration.as_secs_f64(),
        lost,
        latency_us: Summary::of(&latencies),
        map_lookup_ns,
    })
}

fn query(name: &str, id: u16) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let name = Name::from_ascii(name).unwrap_or_else(|_| Name::root());
    m.add_query(Query::query(name, RecordType::A));
    m
}

/// The A address of `name`, asked once over UDP.
fn ask_once(name: &str) -> Option<Ipv4Addr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.send_to(&query(name, 1).to_vec().ok()?, DNS).ok()?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf).ok()?;
    let m = Message::from_vec(&buf[..n]).ok()?;
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// Asks `queries` in turn (starting at `offset`) for `duration`: each answer's latency in µs,
/// answers, and queries lost (no answer within 1 s). Every answer is checked: its id, NOERROR
/// and one address.
fn load(queries: &[Vec<u8>], offset: usize, duration: Duration) -> Result<(Vec<f64>, u64, u64)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(DNS)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut lat = Vec::new();
    let (mut answers, mut lost) = (0u64, 0u64);
    let mut buf = [0u8; 1500];
    let start = Instant::now();
    let mut i = offset * 7919;
    while start.elapsed() < duration {
        let q = &queries[i % queries.len()];
        let id = (i % queries.len()) as u16;
        i += 1;
        let t = Instant::now();
        s.send(q)?;
        let n = match s.recv(&mut buf) {
            Ok(n) => n,
            Err(_) => {
                lost += 1;
                continue;
            }
        };
        let us = t.elapsed().as_secs_f64() * 1e6;
        let m = Message::from_vec(&buf[..n]).context("an answer that is not DNS")?;
        if m.metadata.id != id {
            // A late answer to a query counted as lost.
            continue;
        }
        ensure!(
            m.metadata.response_code == ResponseCode::NoError && m.answers.len() == 1,
            "a wrong answer: {m:?}"
        );
        lat.push(us);
        answers += 1;
    }
    Ok((lat, answers, lost))
}

/// The time of one `map.get`, in ns: the median of 1,000-lookup batches over `names`.
fn map_lookups(map: &HashMap<String, Ipv4Addr>, names: &[String], n: usize) -> Option<Summary> {
    let mut per = Vec::new();
    let mut found = 0u64;
    let batch = 1000;
    for b in 0..n.div_ceil(batch) {
        let t = Instant::now();
        for k in 0..batch {
            let name = &names[(b * batch + k) % names.len()];
            if std::hint::black_box(map.get(name.as_str())).is_some() {
                found += 1;
            }
        }
        per.push(t.elapsed().as_secs_f64() * 1e9 / batch as f64);
    }
    std::hint::black_box(found);
    Summary::of(&per)
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Section 5 of the report.
pub fn markdown(o: &mut String, r: &Results) {
    let _ = writeln!(
        o,
        "How: `lbtest::Lab` builds a client namespace and a load-balancer namespace; the release \
         `lbctl agent` follows a document of {} apps, each with one named VIP, and answers DNS on \
         {DNS} (`--dns-listen`). {} client thread{} in the client namespace ask the names in \
         turn over UDP for {:.0} s, each with one query outstanding; every answer is checked (its \
         id, NOERROR, one address). Latency is from the query sent to the answer received. The \
         map lookup is `HashMap<String, Ipv4Addr>::get` of the same names in the bench's process \
         (batches of 1,000): the price of finding the address alone.\n",
        r.names,
        r.clients,
        if r.clients == 1 { "" } else { "s" },
        r.duration_s
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| answers per second | {:.0} |", r.answers_per_s);
    if let Some(l) = &r.latency_us {
        let _ = writeln!(
            o,
            "| latency p50 / p99 / max | {:.0} / {:.0} / {:.0} µs ({} answers) |",
            l.p50, l.p99, l.max, l.n
        );
    }
    let _ = writeln!(o, "| queries without an answer within 1 s | {} |", r.lost);
    if let Some(m) = &r.map_lookup_ns {
        let _ = writeln!(o, "| one HashMap lookup (median) | {:.0} ns |", m.p50);
        if let Some(l) = &r.latency_us {
            let _ = writeln!(
                o,
                "| answer p50 over map lookup | {:.0}× |",
                l.p50 * 1000.0 / m.p50.max(0.001)
            );
        }
    }
    let _ = writeln!(o);
}
