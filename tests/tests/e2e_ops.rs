//! Operating the agent: restarts under load (SIGKILL, and a new program swapped in) without
//! breaking a connection, the status socket and its permissions, `lbctl` tables and JSON, and
//! Prometheus metrics.
use lbtest::{
    Lab, apps_doc, privileged_or_skip, read_log,
    reference::{DEFAULT_TABLE_SEED, DEFAULT_TABLE_SIZE, backend_for},
    spawn_in_netns, wait_until, write_atomically,
};
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const PORT: u16 = 31000;
const LONG_LIVED: usize = 100;

fn vip() -> SocketAddrV4 {
    "172.16.0.1:8080".parse().expect("vip")
}

/// Counters of the traffic that runs through the restarts.
#[derive(Default)]
struct Load {
    exchanges: AtomicU64,
    broken: AtomicU64,
    new_ok: AtomicU64,
    new_failed: AtomicU64,
}

/// 100 connections that each exchange a line every ~20 ms until `stop`; any error counts as a
/// broken connection.
fn long_lived(ns: &str, load: Arc<Load>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    spawn_in_netns(ns, move || {
        let mut conns: Vec<(TcpStream, BufReader<TcpStream>)> = (0..LONG_LIVED)
            .map(|i| {
                let s = TcpStream::connect_timeout(&SocketAddr::V4(vip()), Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("long-lived connection {i}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                let r = BufReader::new(s.try_clone().expect("clone"));
                (s, r)
            })
            .collect();
        let end = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            for (w, r) in conns.iter_mut() {
                let mut line = String::new();
                let ok =
                    w.write_all(b"ping\n").is_ok() && r.read_line(&mut line).is_ok_and(|n| n > 0);
                if ok {
                    load.exchanges.fetch_add(1, Ordering::Relaxed);
                } else {
                    load.broken.fetch_add(1, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// A new connection every 10 ms until `stop`.
fn new_connections(
    ns: &str,
    load: Arc<Load>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    spawn_in_netns(ns, move || {
        let end = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match lbtest::tcp_request(vip()) {
                Ok(_) => load.new_ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => load.new_failed.fetch_add(1, Ordering::Relaxed),
            };
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Waits (at most 20 s) for the agent's status on `socket` to satisfy `ok`.
fn wait_status(
    lab: &Lab,
    socket: &Path,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    lab.wait_status_at(socket, Duration::from_secs(20), ok, "the agent's status")
}

/// The backend the independent reference names for a TCP flow from `client` to the VIP, served
/// by the lab's three backends.
fn reference_backend(lab: &Lab, client: SocketAddr) -> SocketAddr {
    let active: Vec<SocketAddr> = lab
        .backends
        .iter()
        .map(|b| SocketAddr::V4(SocketAddrV4::new(b.addr, PORT)))
        .collect();
    backend_for(
        client,
        SocketAddr::V4(vip()),
        6,
        &active,
        DEFAULT_TABLE_SIZE,
        DEFAULT_TABLE_SEED,
    )
    .expect("a backend")
}

#[test]
fn restarts_under_load_and_inspection() {
    if !privileged_or_skip("restarts_under_load_and_inspection") {
        return;
    }
    let mut lab = Lab::new("lbt-ops", 3);
    let _hits = lab.serve(PORT);
    let dir = lbtest::TestDir::new("ops");
    let apps = dir.join("apps.json");
    let socket = dir.join("agent.sock");
    let backends = lab.backends.clone();
    // One bad label on a second app, so that `lbctl problems` has something to say.
    let good = apps_doc(
        "/web",
        "tcp",
        &[("VIP_0", "172.16.0.1:8080")],
        &backends,
        PORT,
    );
    let mut doc: serde_json::Value = serde_json::from_str(&good).expect("doc");
    let mut bad = doc["apps"][0].clone();
    bad["id"] = "/bad".into();
    bad["portDefinitions"][0]["labels"] = serde_json::json!({"VIP_3": "172.16.0.9:nope"});
    doc["apps"].as_array_mut().expect("apps").push(bad);
    write_atomically(&apps, &doc.to_string());
    let agent_args = |metrics: &str| -> Vec<String> {
        vec![
            "--apps".into(),
            apps.display().to_string(),
            "--status-socket".into(),
            socket.display().to_string(),
            "--metrics-listen".into(),
            metrics.into(),
        ]
    };
    let log1 = dir.join("agent1.log");
    lab.start_agent_with(&agent_args("127.0.0.1:19100"), &[], &log1);
    let first = wait_status(&lab, &socket, |v| v["agent"]["last_sync"].is_u64());
    let first_prog = first["agent"]["program_id"].as_u64().expect("program id");
    // Read now: a program replaced later is unloaded.
    let first_tag = program_tag(first_prog);
    // The status socket also says what the kernel serves, and its counters.
    let svc = &first["agent"]["services"][0];
    assert_eq!(svc["vip"], "172.16.0.1:8080", "{first}");
    let listed: Vec<(String, String)> = svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["address"].to_string(), b["state"].to_string()))
        .collect();
    assert_eq!(
        listed,
        ["198.18.1.2:31000", "198.18.2.2:31000", "198.18.3.2:31000"]
            .map(|a| (format!("\"{a}\""), "\"active\"".to_string())),
        "{first}"
    );
    // No client has sent anything yet.
    assert_eq!(first["agent"]["counters"]["new_flow"], 0, "{first}");
    assert_eq!(first["agent"]["counters"]["forwarded"], 0, "{first}");

    // The status socket is root's alone.
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "status socket mode {mode:o}");
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lbtest::lbctl_bin())
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .expect("setpriv");
    assert_eq!(as_nobody.status.code(), Some(4), "{as_nobody:?}");
    assert!(
        String::from_utf8_lossy(&as_nobody.stderr).contains("needs root"),
        "{as_nobody:?}"
    );
    let list_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lbtest::lbctl_bin())
        .args(["list", "--pin-dir"])
        .arg(&lab.pin_dir)
        .output()
        .expect("setpriv");
    assert_eq!(list_nobody.status.code(), Some(4), "{list_nobody:?}");

    // lbctl for people and scripts.
    let table = lab.lbctl(&["list"]);
    assert!(
        table.contains("TCP  172.16.0.1:8080") && table.contains("3/3"),
        "{table}"
    );
    assert_eq!(table.matches("  -> 198.18.").count(), 3, "{table}");
    let problems = lab.lbctl(&["problems", "--socket", socket.to_str().expect("p")]);
    assert!(
        problems.contains("/bad") && problems.contains("VIP_3") && problems.contains("nope"),
        "{problems}"
    );
    let pj: serde_json::Value = serde_json::from_str(&lab.lbctl(&[
        "problems",
        "--json",
        "--socket",
        socket.to_str().expect("p"),
    ]))
    .expect("json");
    assert_eq!(pj["problems"][0]["label"], "VIP_3", "{pj}");
    let text = lab.lbctl(&["status", "--socket", socket.to_str().expect("p")]);
    assert!(
        text.contains("source:        file") && text.contains("lb-c"),
        "{text}"
    );
    let sim = lab.lbctl(&[
        "simulate",
        "--vip",
        "172.16.0.1:8080",
        "--src",
        "198.18.0.2:40000",
    ]);
    let client: SocketAddr = "198.18.0.2:40000".parse().expect("client");
    assert_eq!(
        sim.trim(),
        reference_backend(&lab, client).to_string(),
        "{sim}"
    );
    let simj: serde_json::Value = serde_json::from_str(&lab.lbctl(&[
        "simulate",
        "--json",
        "--vip",
        "172.16.0.1:8080",
        "--src",
        "198.18.0.2:40000",
    ]))
    .expect("simulate --json");
    assert_eq!(simj["backend"].as_str(), Some(sim.trim()), "{simj}");

    // Metrics, parsed as Prometheus text.
    let metrics = lbtest::http::scrape(&lab, "127.0.0.1:19100");
    let lines: Vec<String> = metrics.lines().map(str::to_string).collect();
    let parsed = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).expect("metrics parse");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        parsed
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} {label:?} in:\n{metrics}"))
    };
    assert_eq!(value("lb_services", None), 1.0);
    assert_eq!(value("lb_backends", Some(("state", "active"))), 3.0);
    assert_eq!(value("lb_capacity", Some(("resource", "services"))), 1024.0);
    assert_eq!(value("lb_in_use", Some(("resource", "services"))), 1.0);
    assert_eq!(value("lb_in_use", Some(("resource", "backends"))), 3.0);
    assert_eq!(
        value("lb_capacity", Some(("resource", "memberships"))),
        65536.0
    );
    assert!(value("lb_marathon_sync_age_seconds", None) < 60.0);
    assert_eq!(
        value("lb_dropped_packets_total", Some(("reason", "no_backend"))),
        0.0
    );
    assert_eq!(value("lb_marathon_sync_errors_total", None), 0.0);

    // Restart under load.
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let ll = long_lived(&lab.client_ns, load.clone(), stop.clone());
    let nc = new_connections(&lab.client_ns, load.clone(), stop.clone());
    let l = load.clone();
    wait_until(
        Duration::from_secs(10),
        move || {
            l.exchanges.load(Ordering::Relaxed) >= 3 * LONG_LIVED as u64
                && l.new_ok.load(Ordering::Relaxed) >= 10
        },
        "traffic did not start",
    );
    // SIGKILL: nothing cleans up; the data plane forwards alone.
    lab.stop_agents(true);
    let during = load.new_ok.load(Ordering::Relaxed);
    let l = load.clone();
    wait_until(
        Duration::from_secs(10),
        move || l.new_ok.load(Ordering::Relaxed) >= during + 50,
        "no 50 new connections while the agent was down",
    );
    // A new agent of a rebuilt lbctl whose program differs (the bpf-log build: the same data
    // plane with per-packet logging compiled in): it adopts the maps and swaps its program into
    // the pinned links.
    let rebuilt = rebuilt_lbctl();
    let plain = lbtest::lbctl_bin();
    // SAFETY: this file's only test; the variable is read when the agent is started, below.
    unsafe { std::env::set_var("LBCTL_BIN", &rebuilt) };
    let log2 = dir.join("agent2.log");
    lab.start_agent_with(&agent_args("127.0.0.1:19101"), &[], &log2);
    // SAFETY: as above.
    unsafe { std::env::set_var("LBCTL_BIN", &plain) };
    let second = wait_status(&lab, &socket, |v| {
        v["agent"]["last_sync"].is_u64() && v["agent"]["program_id"].as_u64() != Some(first_prog)
    });
    let second_prog = second["agent"]["program_id"].as_u64().expect("program id");
    assert_ne!(
        first_tag,
        program_tag(second_prog),
        "the rebuilt program must differ from the first"
    );
    let log2_text = read_log(&log2);
    assert!(log2_text.contains("replaced=[\"lb-c\""), "{log2_text}");
    assert!(
        !log2_text.contains("service added"),
        "adoption rewrote services:\n{log2_text}"
    );
    // And once more, gracefully, with a third program.
    lab.stop_agents(false);
    let log3 = dir.join("agent3.log");
    lab.start_agent_with(&agent_args("127.0.0.1:19102"), &[], &log3);
    wait_status(&lab, &socket, |v| {
        v["agent"]["last_sync"].is_u64()
            && v["agent"]["program_id"] != second["agent"]["program_id"]
    });
    // Traffic keeps flowing under the third program: every long-lived connection exchanges
    // twice more.
    let since = load.exchanges.load(Ordering::Relaxed);
    let l = load.clone();
    wait_until(
        Duration::from_secs(10),
        move || l.exchanges.load(Ordering::Relaxed) >= since + 2 * LONG_LIVED as u64,
        "the long-lived connections stalled under the third program",
    );
    // The long-lived connections are tracked flows, each with its backend.
    let flows: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["flows", "--json", "--vip", "172.16.0.1:8080"]))
            .expect("flows json");
    let flows = flows["flows"].as_array().expect("flows");
    assert!(
        flows.len() >= LONG_LIVED,
        "only {} tracked flows",
        flows.len()
    );
    for f in flows {
        let client: SocketAddr = f["client"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("a flow without a client: {f}"));
        assert_eq!(
            f["backend"].as_str(),
            Some(reference_backend(&lab, client).to_string().as_str()),
            "{f}"
        );
    }
    let scraped = lbtest::http::scrape(&lab, "127.0.0.1:19102");
    assert!(
        scraped.contains("lb_service_packets_total{vip=\"172.16.0.1:8080\",protocol=\"tcp\"}"),
        "{scraped}"
    );
    // Rates over time while traffic runs.
    let rates = lab.lbctl(&[
        "stats",
        "--watch",
        "--count",
        "1",
        "--interval",
        "0.5",
        "--json",
    ]);
    let rates: serde_json::Value = serde_json::from_str(rates.trim()).expect("rates json");
    assert!(
        rates["forwarded"].as_f64().unwrap_or(0.0) > 100.0,
        "{rates}"
    );
    stop.store(true, Ordering::Relaxed);
    ll.join().expect("long-lived connections");
    nc.join().expect("new connections");
    // Per service and backend, read once the traffic stopped so that the counters hold still:
    // tracked flows and what clients sent. The connections' last segments may still be counted
    // just after the threads end, and one counted between the reading of the service's counter
    // and its backends' makes that reading disagree: the one taken matches the one before it.
    let read = || -> serde_json::Value {
        serde_json::from_str(&lab.lbctl(&["list", "--json"])).expect("list json")
    };
    let packets = |l: &serde_json::Value| {
        let svc = &l["services"][0];
        let backends: Vec<u64> = svc["backends"]
            .as_array()
            .map(|b| {
                b.iter()
                    .map(|b| b["packets"].as_u64().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default();
        (svc["packets"].as_u64(), backends)
    };
    let settling = Instant::now();
    let mut list = read();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let next = read();
        if packets(&next) == packets(&list) {
            break;
        }
        assert!(
            settling.elapsed() < Duration::from_secs(10),
            "the counters still moved 10 s after the traffic stopped: {next}"
        );
        list = next;
    }
    let svc = &list["services"][0];
    assert!(
        svc["flows"].as_u64().unwrap_or(0) >= LONG_LIVED as u64,
        "{svc}"
    );
    assert!(
        svc["packets"].as_u64().unwrap_or(0) > 1000 && svc["bytes"].as_u64().unwrap_or(0) > 50_000,
        "{svc}"
    );
    let per_backend: u64 = svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["packets"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        per_backend,
        svc["packets"].as_u64().unwrap_or(0),
        "backend packets must add up to the service's: {svc}"
    );

    let (ex, broken) = (
        load.exchanges.load(Ordering::Relaxed),
        load.broken.load(Ordering::Relaxed),
    );
    let (ok, failed) = (
        load.new_ok.load(Ordering::Relaxed),
        load.new_failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "restart under load: {ex} exchanges on {LONG_LIVED} long-lived connections, {broken} broken; {ok} new connections, {failed} failed"
    );
    assert_eq!(broken, 0, "established connections broke");
    assert_eq!(failed, 0, "new connections failed");
    assert!(ex > (LONG_LIVED * 50) as u64, "too little traffic: {ex}");
    lab.stop_agents(false);

    // Maps of another layout version in the pin directory: the agent refuses, saying what to do.
    let foreign = lab.pin_dir.join("lb_svc_v0");
    lbtest::sh(&[
        "bpftool",
        "map",
        "create",
        foreign.to_str().expect("path"),
        "type",
        "hash",
        "key",
        "8",
        "value",
        "16",
        "entries",
        "16",
        "name",
        "lb_svc_v0",
    ]);
    let refused = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.lb_ns))
        .arg(lbtest::lbctl_bin())
        .args(["agent", "--apps"])
        .arg(&apps)
        .args(["--iface", "lb-c", "--pin-dir"])
        .arg(&lab.pin_dir)
        .args(["--status-socket"])
        .arg(&socket)
        .output()
        .expect("agent");
    let _ = std::fs::remove_file(&foreign);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("another layout version")
            && err.contains("lb_svc_v0"),
        "{err}"
    );
    // lbctl down detaches from every interface and removes every map.
    let down: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["down", "--json"])).expect("down --json");
    assert_eq!(
        down["links"].as_array().map(Vec::len),
        Some(lab.lb_ifaces.len()),
        "{down}"
    );
    assert_eq!(
        down["maps"].as_array().map(Vec::len),
        Some(lbctl::dataplane::MAPS.len()),
        "{down}"
    );
    assert!(!lab.pin_dir.exists());
}

/// The lbctl built with the data plane's debug log ($LBCTL_LOG_BIN, which `cargo xtask test`
/// builds): a rebuilt, different program for the replacement under load.
fn rebuilt_lbctl() -> std::path::PathBuf {
    match std::env::var_os("LBCTL_LOG_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => panic!(
            "LBCTL_LOG_BIN is not set: run the tests with `cargo xtask test`, which builds it"
        ),
    }
}

/// The tag (hash of the instructions) of loaded program `id`, as bpftool reports it.
fn program_tag(id: u64) -> String {
    let out = lbtest::sh(&["bpftool", "-j", "prog", "show", "id", &id.to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool -j");
    v["tag"].as_str().expect("tag").to_string()
}
