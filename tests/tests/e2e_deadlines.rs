//! Deadlines and size limits, through the real agent against a misbehaving Marathon
//! (tests/src/fake_misbehave.rs): a first URL that hangs after its headers, or drips its body,
//! fails over to the second within the request deadline, and the status names the stall; a
//! silent event stream is reopened after its idle deadline; a huge event line and a huge body
//! leave the agent's memory bounded and name their limit; the metrics endpoint answers while
//! slow clients hold connections, and refuses a huge request with bounded memory.
use lbtest::{
    Lab, apps_doc,
    fake_misbehave::{Events, Misbehaving, Snap},
    in_netns, privileged_or_skip, read_log, wait_log, wait_until, write_atomically,
};
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

const PORT: u16 = 31000;
const VIP: &str = "172.16.0.1:8080";
/// The request deadline the tests give the agent (`--timeout-secs`).
const DEADLINE: u64 = 2;
/// How much the agent's peak memory may grow while huge input comes (it is 200 MB each).
const GROWTH_LIMIT_KB: u64 = 64 << 10;
const HUGE: u64 = 200 << 20;

fn temp_dir(name: &str) -> lbtest::TestDir {
    lbtest::TestDir::new(&format!("ddl-{name}"))
}

/// The document of app `/web` with `VIP` served by the lab's backends `which`.
fn doc(lab: &Lab, which: &[usize]) -> String {
    let b: Vec<_> = which.iter().map(|i| lab.backends[*i].clone()).collect();
    apps_doc("/web", "tcp", &[("VIP_0", VIP)], &b, PORT)
}

/// The backend addresses the kernel serves `VIP` with.
fn served(lab: &Lab) -> Option<Vec<String>> {
    lab.kernel_services()
        .into_iter()
        .find(|(v, _, _)| v == VIP)
        .map(|(_, _, b)| b)
}

fn backend(lab: &Lab, i: usize) -> String {
    format!("{}:{PORT} active", lab.backends[i].addr)
}

/// A fake Marathon listening on 127.0.0.1:`port` in the lab's load balancer namespace.
fn fake(lab: &Lab, port: u16, snap: Snap, events: Events) -> Misbehaving {
    let l = in_netns(&lab.lb_ns, move || {
        TcpListener::bind(("127.0.0.1", port)).expect("bind fake Marathon")
    });
    Misbehaving::start(l, snap, events)
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM: the peak).
fn vm_kb(pid: u64, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent's status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn agent_pid(lab: &Lab) -> u64 {
    let st = lab.wait_status(
        Duration::from_secs(20),
        |v| v["agent"]["pid"].as_u64().is_some(),
        "agent status",
    );
    st["agent"]["pid"].as_u64().expect("pid")
}

/// Arguments of an agent following `urls` with the test's deadline, a snapshot every
/// `resync_secs`, and `extra`.
fn marathon_args(urls: &[String], resync_secs: u64, extra: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    for u in urls {
        args.push("--marathon".to_string());
        args.push(u.clone());
    }
    args.extend(
        [
            "--timeout-secs",
            &DEADLINE.to_string(),
            "--resync-secs",
            &resync_secs.to_string(),
            "--debounce-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// After a good snapshot from the first URL, it hangs after its headers, then drips its body: each
/// time the second URL's snapshot (which removed a backend) reaches the kernel within the request
/// deadline and a resync, and the status names the first URL and the deadline.
#[test]
fn a_hanging_or_dripping_marathon_fails_over_within_the_deadline() {
    if !privileged_or_skip("a_hanging_or_dripping_marathon_fails_over_within_the_deadline") {
        return;
    }
    let mut lab = Lab::new("lbt-ddl1", 3);
    let dir = temp_dir("failover");
    let log = dir.join("agent.log");
    let first = fake(&lab, 18281, Snap::Ok(doc(&lab, &[0, 1, 2])), Events::Silent);
    let second = fake(&lab, 18282, Snap::Ok(doc(&lab, &[0, 1])), Events::Silent);
    lab.start_agent_with(
        &marathon_args(&[first.url(), second.url()], 1, &[]),
        &[],
        &log,
    );
    let all = vec![backend(&lab, 0), backend(&lab, 1), backend(&lab, 2)];
    lab.wait_for_kernel(Duration::from_secs(30), |_| {
        served(&lab) == Some(all.clone())
    })
    .unwrap_or_else(|e| panic!("first snapshot never applied: {e}\n{}", read_log(&log)));

    let gap = Duration::from_millis(500);
    let faults = [
        ("hang after headers", Snap::HangAfterHeaders, &[0, 1][..]),
        (
            "drip",
            Snap::Drip {
                doc: doc(&lab, &[0, 2]),
                gap,
            },
            &[0, 2][..],
        ),
    ];
    let mut measured = Vec::new();
    for (what, snap, second_has) in faults {
        second.set_snap(Snap::Ok(doc(&lab, second_has)));
        let before = lab.wait_status(Duration::from_secs(5), |_| true, "status");
        let t = Instant::now();
        first.set_snap(snap);
        let want: Vec<String> = second_has.iter().map(|i| backend(&lab, *i)).collect();
        // A resync (1 s), the first URL's deadline, the second's answer and the reconcile.
        let bound = Duration::from_secs(1 + DEADLINE + 3);
        let took = lab
            .wait_for_kernel(bound, |_| served(&lab) == Some(want.clone()))
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: the second URL's snapshot did not reach the kernel: {e}\n{}",
                    read_log(&log)
                )
            });
        measured.push((what, t.elapsed()));
        // The agent notes the sync in its status right after it wrote the kernel maps: the
        // kernel may show the second URL's state a moment before the status names it.
        let st = lab.wait_status(
            Duration::from_secs(5),
            |v| {
                v["agent"]["last_error_at"] != before["agent"]["last_error_at"]
                    && v["agent"]["last_sync_from"].as_str() == Some(second.url().as_str())
            },
            &format!("{what}: the status never showed the stall and the second URL's sync"),
        );
        let err = st["agent"]["last_error"].as_str().unwrap_or("");
        assert!(
            err.contains(&first.url())
                && err.contains(&format!("no answer within {DEADLINE} s (timeout_secs)")),
            "{what}: last_error {err:?}"
        );
        assert_eq!(
            st["agent"]["last_sync_from"].as_str(),
            Some(second.url().as_str()),
            "{what}"
        );
        eprintln!("{what}: failed over in {took:?}");
    }
    eprintln!("time to fail over: {measured:?}");
    lab.stop_agents(false);
}

/// An event stream that goes silent (no events, no keep-alives) is reopened after the idle
/// deadline, and the log says why.
#[test]
fn a_silent_event_stream_is_reopened() {
    if !privileged_or_skip("a_silent_event_stream_is_reopened") {
        return;
    }
    let mut lab = Lab::new("lbt-ddl2", 1);
    let dir = temp_dir("idle");
    let log = dir.join("agent.log");
    let m = fake(&lab, 18283, Snap::Ok(doc(&lab, &[0])), Events::Silent);
    lab.start_agent_with(
        &marathon_args(&[m.url()], 1, &["--stream-idle-secs", "2"]),
        &[],
        &log,
    );
    wait_until(
        Duration::from_secs(20),
        || m.streams() >= 1,
        "the agent never opened the event stream",
    );
    let t = Instant::now();
    // Two more openings: each after 2 s of silence (and at most the reconnect's own time).
    wait_until(
        Duration::from_secs(2 * 2 + 4),
        || m.streams() >= 3,
        "the silent event stream was not reopened after its idle deadline",
    );
    eprintln!("3 stream openings after {:?}", t.elapsed());
    assert!(
        read_log(&log).contains("no byte within 2 s (stream_idle_secs)"),
        "{}",
        read_log(&log)
    );
    lab.stop_agents(false);
}

/// A 200 MB event line and a 200 MB snapshot body: the agent's peak memory grows by less than
/// 64 MB, the log and the status name the limits, the huge event still triggers a snapshot, and
/// the last good state keeps serving.
#[test]
fn huge_input_keeps_the_agent_small() {
    if !privileged_or_skip("huge_input_keeps_the_agent_small") {
        return;
    }
    let mut lab = Lab::new("lbt-ddl3", 1);
    let dir = temp_dir("huge");
    let log = dir.join("agent.log");
    let m = fake(&lab, 18284, Snap::Ok(doc(&lab, &[0])), Events::Silent);
    lab.start_agent_with(
        &marathon_args(
            &[m.url()],
            30,
            &["--max-snapshot-mib", "1", "--max-event-line-kib", "64"],
        ),
        &[],
        &log,
    );
    let one = vec![backend(&lab, 0)];
    lab.wait_for_kernel(Duration::from_secs(30), |_| {
        served(&lab) == Some(one.clone())
    })
    .unwrap_or_else(|e| panic!("first snapshot never applied: {e}\n{}", read_log(&log)));
    wait_until(
        Duration::from_secs(10),
        || m.streams() >= 1,
        "the agent never opened the event stream",
    );
    let pid = agent_pid(&lab);
    let start_kb = vm_kb(pid, "VmHWM");

    // A 200 MB line in the event stream.
    let snapshots = m.snapshots();
    m.set_events(Events::HugeLine { bytes: HUGE });
    wait_log(&log, "max_event_line_kib = 64 KiB", Duration::from_secs(30));
    wait_until(
        Duration::from_secs(10),
        || m.snapshots() > snapshots,
        "the huge event did not trigger a snapshot",
    );
    let after_line = vm_kb(pid, "VmHWM");
    assert!(
        after_line < start_kb + GROWTH_LIMIT_KB,
        "a 200 MB event line took the agent's peak from {start_kb} kB to {after_line} kB"
    );

    // A 200 MB snapshot body without a Content-Length.
    let before = lab.wait_status(Duration::from_secs(5), |_| true, "status");
    m.set_snap(Snap::Huge { bytes: HUGE });
    // An event makes the snapshot come now rather than at the next resync.
    m.poke();
    let st = lab.wait_status(
        Duration::from_secs(40),
        |v| v["agent"]["last_error_at"] != before["agent"]["last_error_at"],
        "the huge snapshot was not refused",
    );
    let err = st["agent"]["last_error"].as_str().unwrap_or("");
    assert!(
        err.contains("max_snapshot_mib = 1 MiB"),
        "last_error {err:?}"
    );
    let after_body = vm_kb(pid, "VmHWM");
    assert!(
        after_body < start_kb + GROWTH_LIMIT_KB,
        "a 200 MB snapshot took the agent's peak from {start_kb} kB to {after_body} kB"
    );
    assert_eq!(served(&lab), Some(one), "the last good state must stay");
    eprintln!(
        "agent peak memory: {start_kb} kB at start, {after_line} kB after the huge line, \
         {after_body} kB after the huge body"
    );
    lab.stop_agents(false);
}

/// Sends `request` to the metrics endpoint in the lab and reads the answer, within `within`.
fn scrape(lab: &Lab, addr: &'static str, request: &'static [u8]) -> (String, Duration) {
    in_netns(&lab.lb_ns, move || {
        let t = Instant::now();
        let mut c = TcpStream::connect(addr).expect("connect to metrics");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.write_all(request).expect("send");
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        (out, t.elapsed())
    })
}

/// Three clients that send half a request and wait do not keep another from its scrape within
/// 1 s; a 200 MB request line is refused and leaves the agent's peak memory where it was.
#[test]
fn metrics_serve_clients_at_once_with_bounded_requests() {
    if !privileged_or_skip("metrics_serve_clients_at_once_with_bounded_requests") {
        return;
    }
    const ADDR: &str = "127.0.0.1:19301";
    let mut lab = Lab::new("lbt-ddl4", 1);
    let dir = temp_dir("metrics");
    let log = dir.join("agent.log");
    let apps = dir.join("apps.json");
    write_atomically(&apps, &doc(&lab, &[0]));
    let source = [
        "--apps".to_string(),
        apps.display().to_string(),
        "--metrics-listen".into(),
        ADDR.into(),
    ];
    lab.start_agent_with(&source, &[], &log);
    wait_log(&log, "serving Prometheus metrics", Duration::from_secs(30));
    let pid = agent_pid(&lab);

    // Slow clients, held open in the namespace while another scrapes.
    let slow: Vec<TcpStream> = in_netns(&lab.lb_ns, || {
        (0..3)
            .map(|_| {
                let mut c = TcpStream::connect(ADDR).expect("connect");
                c.write_all(b"GET /metr").expect("send");
                c
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(100)); // let the agent accept them first
    let (answer, took) = scrape(&lab, ADDR, b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("lb_marathon_sync_errors"), "{answer}");
    assert!(
        took < Duration::from_secs(1),
        "a scrape took {took:?} behind 3 slow clients"
    );
    eprintln!("a scrape behind 3 slow clients took {took:?}");
    let (other, _) = scrape(&lab, ADDR, b"GET /metricsfoo HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    drop(slow);

    // A 200 MB request line.
    let start_kb = vm_kb(pid, "VmHWM");
    let sent = in_netns(&lab.lb_ns, || {
        let mut c = TcpStream::connect(ADDR).expect("connect");
        c.set_write_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let piece = vec![b'a'; 64 << 10];
        let mut sent = c.write(b"GET /").unwrap_or(0) as u64;
        while sent < HUGE {
            match c.write(&piece) {
                Ok(n) if n > 0 => sent += n as u64,
                _ => break,
            }
        }
        sent
    });
    let after_kb = vm_kb(pid, "VmHWM");
    eprintln!(
        "a huge request: {sent} bytes taken before the agent closed; peak {start_kb} kB -> {after_kb} kB"
    );
    assert!(sent < HUGE, "the agent read the whole 200 MB request line");
    assert!(
        after_kb < start_kb + GROWTH_LIMIT_KB,
        "a 200 MB request line took the agent's peak from {start_kb} kB to {after_kb} kB"
    );
    // Still serving.
    let (again, _) = scrape(&lab, ADDR, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(again.starts_with("HTTP/1.1 200 OK"), "{again}");
    lab.stop_agents(false);
}
