//! One agent per data plane, and the data plane's objects as its own (issue 14, items 3, 5 and
//! 9), through the real binary: a second agent on the same pin directory or status socket is
//! refused naming the first one's pid, two agents started at once leave exactly one running, a
//! killed agent's lock is taken over, `lbctl down` refuses while an agent runs (unless
//! `--force`), an unprivileged `lbctl` exits 4 with a sentence, a map of another layout under
//! one of our names is refused before loading and left in place by `down`, and a Marathon URL's
//! credentials appear nowhere (log, status text and JSON, `--print-config`, metrics).
use lbtest::{
    Lab, apps_doc, fake_marathon::FakeMarathon, fake_marathon::Mode, in_netns, lbctl_bin,
    privileged_or_skip, read_log, sh, wait_until, write_atomically,
};
use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const PORT: u16 = 31000;
const VIP: &str = "172.16.0.1:8080";

fn tempdir(name: &str) -> lbtest::TestDir {
    lbtest::TestDir::new(&format!("own-{name}"))
}

/// For test `test` (None: skipped without root), a lab with servers on its backends and an
/// apps file with one VIP over all of them.
fn lab_with_apps(test: &str, prefix: &str) -> Option<(Lab, lbtest::TestDir, PathBuf)> {
    if !privileged_or_skip(test) {
        return None;
    }
    let mut lab = Lab::new(prefix, 2);
    lab.serve(PORT);
    let dir = tempdir(prefix);
    let apps = dir.join("apps.json");
    write_atomically(
        &apps,
        &apps_doc("/web", "tcp", &[("VIP_0", VIP)], &lab.backends, PORT),
    );
    Some((lab, dir, apps))
}

/// `lbctl agent` in the lab's load balancer namespace on `pin_dir` and `socket`, on every lab
/// interface.
fn agent_cmd(lab: &Lab, pin_dir: &Path, socket: &Path, apps: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", lab.lb_ns))
        .arg(lbctl_bin())
        .arg("agent")
        .arg("--apps")
        .arg(apps)
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--status-socket")
        .arg(socket)
        .env("LBCTL_LOG", "info");
    for i in &lab.lb_ifaces {
        c.args(["--iface", &lab.iface_arg(i)]);
    }
    c
}

/// Runs a command that must end by itself within 30 s; returns its output.
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let end = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} did not end within 30 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The id of the load balancer's program on `iface` (XDP or TC).
fn xdp_prog_id(lab: &Lab, iface: &str) -> Option<u32> {
    lab.program_on(iface).map(|(_, id)| id)
}

fn lock_file_of(pin_dir: &Path) -> PathBuf {
    lbctl::lock::Guarded::PinDir(pin_dir).lock_path()
}

/// Starts the lab's agent on `apps`, logging to `log`, and waits until it has synced; returns
/// its pid.
fn start_synced(lab: &mut Lab, apps: &Path, log: &Path) -> u64 {
    lab.start_agent(apps, log);
    let st = lab.wait_status(
        Duration::from_secs(20),
        |v| v["agent"]["last_sync"].is_u64(),
        "the agent synced",
    );
    st["agent"]["pid"].as_u64().expect("pid")
}

/// `lbctl ARGS --pin-dir <the lab's>`, bounded.
fn lbctl_at(lab: &Lab, args: &[&str]) -> Output {
    let mut c = Command::new(lbctl_bin());
    c.args(args).arg("--pin-dir").arg(&lab.pin_dir);
    run_bounded(c)
}

/// `lbctl down --json` (with ARGS) on the lab's pin directory, which must succeed.
fn down_json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    let out = lbctl_at(lab, args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("down --json")
}

/// Kills and reaps a child this test started.
fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn a_second_agent_is_refused_naming_the_first_and_touches_nothing() {
    let Some((mut lab, dir, apps)) = lab_with_apps(
        "a_second_agent_is_refused_naming_the_first_and_touches_nothing",
        "lbo1",
    ) else {
        return;
    };
    let first_pid = start_synced(&mut lab, &apps, &dir.join("first.log"));
    let prog = xdp_prog_id(&lab, &lab.lb_ifaces[0]).expect("XDP attached");
    let services = lab.kernel_services();
    assert_eq!(services.len(), 1, "{services:?}");

    // The same pin directory, another status socket.
    let other_socket = dir.join("second.sock");
    let t = Instant::now();
    let out = run_bounded(agent_cmd(&lab, &lab.pin_dir, &other_socket, &apps));
    eprintln!("second agent refused after {:?}", t.elapsed());
    let err = stderr(&out);
    let lock = lock_file_of(&lab.pin_dir);
    assert!(!out.status.success(), "a second agent ran: {err}");
    assert!(
        err.contains(&format!("pid {first_pid}")) && err.contains(&lock.display().to_string()),
        "the refusal names neither the first agent's pid {first_pid} nor the lock {}: {err}",
        lock.display()
    );
    // The same status socket, another pin directory: refused before it pins or attaches.
    let other_pins = PathBuf::from("/sys/fs/bpf/lbo1-other");
    let out = run_bounded(agent_cmd(&lab, &other_pins, &lab.status_socket(), &apps));
    let err = stderr(&out);
    assert!(!out.status.success(), "a second agent ran: {err}");
    assert!(
        err.contains(&format!("pid {first_pid}")) && err.contains("status socket"),
        "the refusal does not name the first agent's pid {first_pid}: {err}"
    );
    let other_pinned = other_pins.exists();
    if other_pinned {
        let _ = lbctl::dataplane::down(&other_pins);
    }
    // The refused agent's lock file of that pin directory (it exited).
    let _ = std::fs::remove_file(lock_file_of(&other_pins));
    assert!(!other_pinned, "the refused agent pinned a data plane");

    // Nothing of the first agent's was touched.
    assert_eq!(xdp_prog_id(&lab, &lab.lb_ifaces[0]), Some(prog));
    assert_eq!(lab.kernel_services(), services);
    let now = lab.wait_status(Duration::from_secs(5), |_| true, "the first agent answers");
    assert_eq!(now["agent"]["pid"].as_u64(), Some(first_pid));
    assert_eq!(
        lab.tcp_requests(VIP.parse::<SocketAddr>().expect("vip"), 10)
            .len(),
        10
    );
    lab.stop_agents(false);
}

#[test]
fn two_agents_started_at_once_leave_exactly_one_running() {
    let Some((lab, dir, apps)) = lab_with_apps(
        "two_agents_started_at_once_leave_exactly_one_running",
        "lbo2",
    ) else {
        return;
    };
    let sockets = [dir.join("a.sock"), dir.join("b.sock")];
    let mut cmds: Vec<Command> = sockets
        .iter()
        .map(|s| {
            let mut c = agent_cmd(&lab, &lab.pin_dir, s, &apps);
            c.stdout(Stdio::null()).stderr(Stdio::piped());
            c
        })
        .collect();
    let a = cmds[0].spawn().expect("agent a");
    let b = cmds[1].spawn().expect("agent b");
    let mut children = vec![Some(a), Some(b)];
    let pids: Vec<u32> = children.iter().flatten().map(Child::id).collect();
    // Wait until one of them has exited (bounded), then give the other time to fail too if it
    // were going to.
    let end = Instant::now() + Duration::from_secs(20);
    let mut exited = Vec::new();
    while exited.is_empty() && Instant::now() < end {
        for (i, c) in children.iter_mut().enumerate() {
            if let Some(ch) = c
                && ch.try_wait().expect("try_wait").is_some()
            {
                exited.push(i);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(exited.len(), 1, "not exactly one agent exited: {exited:?}");
    let loser = exited[0];
    let winner = 1 - loser;
    let out = children[loser]
        .take()
        .expect("loser")
        .wait_with_output()
        .expect("output");
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains(&format!("pid {}", pids[winner])),
        "the agent that stopped does not name the one running (pid {}): {err}",
        pids[winner]
    );
    let st = lab.wait_status_at(
        &sockets[winner],
        Duration::from_secs(20),
        |v| v["agent"]["last_sync"].is_u64(),
        "the remaining agent synced",
    );
    assert_eq!(st["agent"]["pid"].as_u64(), Some(pids[winner] as u64));
    let still = children[winner]
        .as_mut()
        .expect("winner")
        .try_wait()
        .expect("try_wait");
    assert!(still.is_none(), "the remaining agent exited too: {still:?}");
    assert_eq!(
        lab.tcp_requests(VIP.parse::<SocketAddr>().expect("vip"), 10)
            .len(),
        10
    );
    for c in children.into_iter().flatten() {
        kill(c);
    }
}

#[test]
fn a_killed_agents_lock_is_taken_over() {
    let Some((mut lab, dir, apps)) = lab_with_apps("a_killed_agents_lock_is_taken_over", "lbo3")
    else {
        return;
    };
    let log = dir.join("first.log");
    let dead = start_synced(&mut lab, &apps, &log);
    lab.stop_agents(true);
    let lock = lock_file_of(&lab.pin_dir);
    let left = std::fs::read_to_string(&lock).expect("the lock file stays");
    assert_eq!(
        left.trim(),
        dead.to_string(),
        "the lock file names the killed agent"
    );

    let log = dir.join("second.log");
    lab.start_agent(&apps, &log);
    let st = lab.wait_status(
        Duration::from_secs(20),
        |v| v["agent"]["last_sync"].is_u64() && v["agent"]["pid"].as_u64() != Some(dead),
        "a new agent runs after the first was killed",
    );
    let pid = st["agent"]["pid"].as_u64().expect("pid");
    assert_eq!(
        std::fs::read_to_string(&lock).expect("lock").trim(),
        pid.to_string()
    );
    let text = read_log(&log);
    assert!(
        text.contains("took over a lock file") && text.contains(&dead.to_string()),
        "{text}"
    );
    lab.stop_agents(false);
}

#[test]
fn down_refuses_while_an_agent_runs_unless_forced() {
    let Some((mut lab, dir, apps)) =
        lab_with_apps("down_refuses_while_an_agent_runs_unless_forced", "lbo4")
    else {
        return;
    };
    let pid = start_synced(&mut lab, &apps, &dir.join("agent.log"));
    let out = lbctl_at(&lab, &["down"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains("--force"),
        "{err}"
    );
    assert!(lab.pin_dir.join(lb_common::MAP_SERVICES).exists());
    assert_eq!(lab.kernel_services().len(), 1);

    let v = down_json(&lab, &["down", "--force", "--json"]);
    assert_eq!(
        v["maps"].as_array().map(Vec::len),
        Some(lbctl::dataplane::MAPS.len()),
        "{v}"
    );
    assert!(xdp_prog_id(&lab, &lab.lb_ifaces[0]).is_none());
    lab.stop_agents(false);
}

/// Runs `lbctl ARGS` as nobody (uid and gid 65534, no groups), in the lab's namespace.
fn as_nobody(lab: &Lab, args: &[&str]) -> Output {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", lab.lb_ns))
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(lbctl_bin())
        .args(args);
    run_bounded(c)
}

#[test]
fn without_root_lbctl_exits_4_with_a_sentence() {
    let Some((mut lab, dir, apps)) =
        lab_with_apps("without_root_lbctl_exits_4_with_a_sentence", "lbo5")
    else {
        return;
    };
    start_synced(&mut lab, &apps, &dir.join("agent.log"));
    lab.stop_agents(false);
    let pins = lab.pin_dir.display().to_string();
    let out = as_nobody(&lab, &["down", "--pin-dir", &pins]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("lbctl down needs root (CAP_BPF, CAP_NET_ADMIN): "),
        "{err}"
    );
    assert!(lab.pin_dir.join(lb_common::MAP_SERVICES).exists());

    // The agent: apps file readable by anyone, a socket where nobody may write.
    let public = lbtest::TestFile::new(
        std::env::temp_dir().join(format!("lbtest-own-apps-{}.json", std::process::id())),
    );
    std::fs::copy(&apps, &public).expect("copy apps");
    let public_s = public.display().to_string();
    let socket = dir.join("nobody.sock").display().to_string();
    let mut args = vec![
        "agent",
        "--apps",
        &public_s,
        "--pin-dir",
        &pins,
        "--status-socket",
        &socket,
    ];
    let ifaces: Vec<String> = lab.lb_ifaces.iter().map(|i| lab.iface_arg(i)).collect();
    for i in &ifaces {
        args.extend(["--iface", i]);
    }
    let out = as_nobody(&lab, &args);
    let _ = std::fs::remove_file(&public);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("lbctl agent needs root (CAP_BPF, CAP_NET_ADMIN): "),
        "{err}"
    );
    // The pinned data plane is still there, still serving.
    assert_eq!(lab.kernel_services().len(), 1);
}

#[test]
fn a_foreign_map_under_our_name_is_refused_and_left_by_down() {
    let Some((mut lab, dir, apps)) = lab_with_apps(
        "a_foreign_map_under_our_name_is_refused_and_left_by_down",
        "lbo6",
    ) else {
        return;
    };
    std::fs::create_dir_all(&lab.pin_dir).expect("pin dir");
    let foreign = lab.pin_dir.join(lb_common::MAP_SERVICES);
    let foreign_s = foreign.display().to_string();
    create_map(&foreign_s, "hash", "4", "4", "8", "lb_svc_v1");
    let socket = dir.join("agent.sock");
    let out = run_bounded(agent_cmd(&lab, &lab.pin_dir, &socket, &apps));
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&foreign_s)
            && err.contains("is not this load balancer's map")
            && err.contains("key 4 bytes, value 4 bytes")
            && err.contains(&format!(
                "key {} bytes, value {} bytes",
                size_of::<lb_common::VipKey>(),
                size_of::<lb_common::Service>()
            )),
        "{err}"
    );
    assert!(!err.contains("verifier"), "a verifier dump: {err}");
    assert!(
        lab.lb_ifaces.iter().all(|i| xdp_prog_id(&lab, i).is_none()),
        "the refused agent attached"
    );

    // `down` leaves the foreign map in place and says so.
    let v = down_json(&lab, &["down", "--json"]);
    assert_eq!(v["maps"].as_array().map(Vec::len), Some(0), "{v}");
    let left = v["left"].to_string();
    assert!(left.contains("lb_svc_v1"), "{v}");
    assert!(foreign.exists(), "down removed a map it did not make");
    std::fs::remove_file(&foreign).expect("removing the foreign map");

    // With the foreign map gone, the agent runs; after it, another program's pin in the
    // directory is left by `down` too, while all of ours go.
    start_synced(&mut lab, &apps, &dir.join("agent.log"));
    lab.stop_agents(false);
    let other = lab.pin_dir.join("other_v1");
    create_map(
        &other.display().to_string(),
        "array",
        "4",
        "8",
        "4",
        "other_v1",
    );
    let v = down_json(&lab, &["down", "--json"]);
    assert_eq!(
        v["maps"].as_array().map(Vec::len),
        Some(lbctl::dataplane::MAPS.len()),
        "{v}"
    );
    assert!(v["left"].to_string().contains("other_v1"), "{v}");
    assert!(other.exists());
    std::fs::remove_file(&other).expect("removing the other map");
}

const USER: &str = "lbuser";
const PASSWORD: &str = "Url-Pw-7f3e9a";
const MARATHON_PORT: u16 = 18090;
const METRICS: &str = "127.0.0.1:19190";

#[test]
fn credentials_in_the_marathon_url_appear_nowhere() {
    if !privileged_or_skip("credentials_in_the_marathon_url_appear_nowhere") {
        return;
    }
    let mut lab = Lab::new("lbo7", 2);
    lab.serve(PORT);
    let dir = tempdir("lbo7");
    let log = dir.join("agent.log");
    let doc = apps_doc("/web", "tcp", &[("VIP_0", VIP)], &lab.backends, PORT);
    let listener = in_netns(&lab.lb_ns, || {
        TcpListener::bind(("127.0.0.1", MARATHON_PORT)).expect("bind fake Marathon")
    });
    let auth = lbtest::http::basic_auth(USER, PASSWORD);
    let m = FakeMarathon::start(listener, &doc, Some(auth));
    let url = format!("http://{USER}:{PASSWORD}@127.0.0.1:{MARATHON_PORT}");
    lab.start_agent_with(
        &[
            "--marathon".into(),
            url.clone(),
            "--metrics-listen".into(),
            METRICS.into(),
            "--resync-secs".into(),
            "1".into(),
        ],
        &[],
        &log,
    );
    lab.wait_status(
        Duration::from_secs(20),
        |v| v["agent"]["last_sync"].is_u64(),
        "the agent synced with the credentials of its URL",
    );
    assert_eq!(m.unauthorized(), 0, "the URL's credentials were not sent");
    // Marathon fails: the HTTP client's error quotes the URL it tried.
    let before =
        lab.wait_status(Duration::from_secs(5), |_| true, "status")["agent"]["sync_errors"]
            .as_u64()
            .unwrap_or(0);
    m.set_mode(Mode::Reset);
    lab.wait_status(
        Duration::from_secs(20),
        |v| v["agent"]["sync_errors"].as_u64().unwrap_or(0) > before,
        "the agent recorded Marathon's failure",
    );
    wait_until(
        Duration::from_secs(10),
        || read_log(&log).contains("no Marathon state this time"),
        "the failure reached the log",
    );

    let mut status = Command::new(lbctl_bin());
    status
        .args(["status", "--socket"])
        .arg(lab.status_socket())
        .arg("--pin-dir")
        .arg(&lab.pin_dir);
    let text = String::from_utf8_lossy(&run_bounded(status).stdout).into_owned();
    let mut status = Command::new(lbctl_bin());
    status
        .args(["status", "--json", "--socket"])
        .arg(lab.status_socket())
        .arg("--pin-dir")
        .arg(&lab.pin_dir);
    let json = String::from_utf8_lossy(&run_bounded(status).stdout).into_owned();
    let mut print = Command::new(lbctl_bin());
    print.args([
        "agent",
        "--print-config",
        "--iface",
        "lb-c",
        "--marathon",
        &url,
    ]);
    let printed = run_bounded(print);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&printed.stdout),
        stderr(&printed)
    );
    let metrics = lbtest::http::scrape(&lab, METRICS);
    lab.stop_agents(false);
    let agent_log = read_log(&log);
    for (what, out) in [
        ("the agent's log", &agent_log),
        ("lbctl status", &text),
        ("lbctl status --json", &json),
        ("lbctl agent --print-config", &printed),
        ("the metrics", &metrics),
    ] {
        assert!(!out.contains(PASSWORD), "the password is in {what}:\n{out}");
        assert!(
            !out.contains(&format!("{USER}:")),
            "the user is in {what}:\n{out}"
        );
    }
    // Each of them did show where it came from (so the absence above means something).
    for (what, out) in [
        ("the agent's log", &agent_log),
        ("lbctl status", &text),
        ("lbctl status --json", &json),
        ("lbctl agent --print-config", &printed),
    ] {
        assert!(
            out.contains(&format!("127.0.0.1:{MARATHON_PORT}")),
            "{what} does not name Marathon at all:\n{out}"
        );
    }
    assert!(metrics.contains("lb_marathon_sync_errors"), "{metrics}");
}

/// `bpftool map create PATH type TYPE key KEY value VALUE entries ENTRIES name NAME`.
fn create_map(path: &str, kind: &str, key: &str, value: &str, entries: &str, name: &str) {
    sh(&[
        "bpftool", "map", "create", path, "type", kind, "key", key, "value", value, "entries",
        entries, "name", name,
    ]);
}

/// `bpftool map create` of a per-CPU array of u64 pinned at `path`, with `entries` entries, and
/// `value` written to every CPU's copy of entry `key`.
fn pin_counters(path: &Path, name: &str, entries: u32, key: u8, value: u8) {
    pin_per_cpu(path, name, 8, entries, key, value);
}

/// `pin_counters` of values of `size` bytes: `value` is the first byte of each CPU's copy.
fn pin_per_cpu(path: &Path, name: &str, size: usize, entries: u32, key: u8, value: u8) {
    let p = path.display().to_string();
    create_map(
        &p,
        "percpu_array",
        "4",
        &size.to_string(),
        &entries.to_string(),
        name,
    );
    let (key, value) = (key.to_string(), value.to_string());
    let mut args = vec![
        "bpftool", "map", "update", "pinned", &p, "key", &key, "0", "0", "0", "value", &value,
    ];
    args.extend(std::iter::repeat_n("0", size - 1));
    sh(&args);
}

/// The sum over every CPU of id `id`'s counts in the counter array `name` pinned in `dir` (a
/// region of ids for each possible CPU, `lb_common::counter_slot`).
fn id_total<V: aya::Pod + Copy>(dir: &Path, name: &str, id: u32, add: fn(u64, V) -> u64) -> u64 {
    let data = aya::maps::MapData::from_pin(dir.join(name)).expect("pinned");
    let map: aya::maps::Array<_, V> = aya::maps::Map::from_map_data(data)
        .expect("a map")
        .try_into()
        .expect("an array");
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
    let ids = map.len() / cpus;
    (0..cpus).fold(0, |sum, c| {
        add(
            sum,
            map.get(&lb_common::counter_slot(c, ids, id), 0)
                .expect("slot"),
        )
    })
}

#[test]
fn older_counter_maps_are_carried_over_and_retired() {
    let Some((mut lab, dir, apps)) =
        lab_with_apps("older_counter_maps_are_carried_over_and_retired", "lbo8")
    else {
        return;
    };
    std::fs::create_dir_all(&lab.pin_dir).expect("pin dir");
    // What the agent before path MTU and before ending sockets left: lb_stats_v2 (14 counters)
    // and lb_sockst_v1 (9), with counts in them.
    let stats_v2 = lab.pin_dir.join("lb_stats_v2");
    let sockst_v1 = lab.pin_dir.join("lb_sockst_v1");
    pin_counters(
        &stats_v2,
        "lb_stats_v2",
        14,
        lb_common::Stat::DropMalformed as u8,
        7,
    );
    pin_counters(
        &sockst_v1,
        "lb_sockst_v1",
        9,
        lb_common::SockStat::Connect as u8,
        5,
    );
    // And the per-CPU arrays by id of the agents before the arrays in regions, with counts of
    // an id no service of this test is given (100).
    let svctr_v1 = lab.pin_dir.join("lb_svctr_v1");
    let sockbe_v1 = lab.pin_dir.join("lb_sockbe_v1");
    let traffic = std::mem::size_of::<lb_common::Traffic>();
    pin_per_cpu(&svctr_v1, "lb_svctr_v1", traffic, 1024, 100, 9);
    pin_counters(&sockbe_v1, "lb_sockbe_v1", 4096, 100, 6);
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u64;

    let log = dir.join("agent.log");
    start_synced(&mut lab, &apps, &log);
    assert!(!stats_v2.exists(), "lb_stats_v2 was not retired");
    assert!(!sockst_v1.exists(), "lb_sockst_v1 was not retired");
    assert!(!svctr_v1.exists(), "lb_svctr_v1 was not retired");
    assert!(!sockbe_v1.exists(), "lb_sockbe_v1 was not retired");
    let packets = |sum: u64, t: lb_common::Traffic| sum + t.packets;
    let counts = |sum: u64, n: u64| sum + n;
    assert_eq!(
        id_total(&lab.pin_dir, lb_common::MAP_SERVICE_TRAFFIC, 100, packets),
        9 * cpus
    );
    assert_eq!(
        id_total(&lab.pin_dir, lb_common::MAP_SOCK_BACKEND, 100, counts),
        6 * cpus
    );
    let stats: serde_json::Value =
        serde_json::from_str(&lab.lbctl(&["stats", "--json"])).expect("stats --json");
    assert_eq!(stats["drop_malformed"].as_u64(), Some(7 * cpus), "{stats}");
    assert_eq!(stats["local_connect"].as_u64(), Some(5 * cpus), "{stats}");
    let text = read_log(&log);
    assert!(
        text.contains("counters of the older layout carried over") && text.contains("lb_stats_v2"),
        "{text}"
    );
    lab.stop_agents(false);

    // An older counter map left beside the current one is ours for `down` too.
    pin_counters(&stats_v2, "lb_stats_v2", 14, 0, 1);
    pin_counters(&sockbe_v1, "lb_sockbe_v1", 4096, 0, 1);
    let v = down_json(&lab, &["down", "--json"]);
    assert!(v["maps"].to_string().contains("lb_stats_v2"), "{v}");
    assert!(v["maps"].to_string().contains("lb_sockbe_v1"), "{v}");
    assert_eq!(v["left"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(!lab.pin_dir.exists(), "down left the pin directory");

    // Under an older counter name, a map of another layout is still refused.
    std::fs::create_dir_all(&lab.pin_dir).expect("pin dir");
    create_map(
        &stats_v2.display().to_string(),
        "hash",
        "4",
        "4",
        "8",
        "lb_stats_v2",
    );
    let out = run_bounded(agent_cmd(
        &lab,
        &lab.pin_dir,
        &dir.join("agent2.sock"),
        &apps,
    ));
    let _ = std::fs::remove_file(&stats_v2);
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains("another layout version")
            && err.contains("lb_stats_v2"),
        "{err}"
    );
}
