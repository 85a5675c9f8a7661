//! The flat lab of the local-path tests (issue 15): a client and backends on one bridge (in a
//! switch namespace: no load balancer namespace, interfaces as Linux makes them, no ethtool
//! tuning), an agent run with `--local --cgroup <a child cgroup of the test's own>`, and
//! clients run as processes of their own (`lbtest-client`) inside that cgroup or outside it.
//! Dropping the lab stops what it started, runs `down`, removes the cgroup and the namespaces,
//! also when a test panics.
use crate::{Backend, TestDir, lbctl_bin, remove_socket_files, sh, sh_quiet};
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The client's address in the flat lab.
pub const FLAT_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

/// The servers of one backend, stopped on their own (a task that ends).
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ns: String,
    listening: Vec<SocketAddr>,
}

/// The flat lab.
pub struct LocalLab {
    /// Names its namespaces, pin directory and cgroup.
    pub prefix: String,
    /// The client's namespace.
    pub client_ns: String,
    /// The backends (their namespaces and addresses).
    pub backends: Vec<Backend>,
    /// The data plane's pin directory.
    pub pin_dir: PathBuf,
    /// The test's own child cgroup.
    pub cgroup: PathBuf,
    /// Files of this lab (the apps document, agent logs).
    pub dir: TestDir,
    servers: Vec<Option<Servers>>,
    agents: Vec<Child>,
    namespaces: Vec<String>,
}

/// The child cgroup `name` of the cgroup2 root (found in /proc/self/mounts).
fn child_cgroup(name: &str) -> PathBuf {
    let root = lbctl::dataplane::default_cgroup().expect("a cgroup2 mount");
    root.join(name)
}

/// Moves every process still in `cgroup` to its parent and removes it.
fn remove_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    if let (Ok(procs), Some(parent)) = (
        std::fs::read_to_string(cgroup.join("cgroup.procs")),
        cgroup.parent(),
    ) {
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(cgroup);
}

impl LocalLab {
    /// Builds the lab: `n` backends, a child cgroup, nothing started yet. A rerun first removes
    /// what a killed earlier run left.
    pub fn new(prefix: &str, n: usize) -> LocalLab {
        assert!((1..=50).contains(&n));
        let mut lab = LocalLab {
            prefix: prefix.to_string(),
            client_ns: format!("{prefix}-c"),
            backends: Vec::new(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}")),
            cgroup: child_cgroup(&format!("lbtest-{prefix}")),
            dir: TestDir::new(prefix),
            servers: Vec::new(),
            agents: Vec::new(),
            namespaces: Vec::new(),
        };
        lab.cleanup_leftovers();
        std::fs::create_dir(&lab.cgroup)
            .unwrap_or_else(|e| panic!("creating {}: {e}", lab.cgroup.display()));
        let sw = format!("{prefix}-sw");
        lab.add_ns(&sw);
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        let c = lab.client_ns.clone();
        lab.add_ns(&c);
        lab.plug(&sw, &c, "c", FLAT_CLIENT, 0x10);
        for i in 1..=n {
            let ns = format!("{prefix}-b{i}");
            lab.add_ns(&ns);
            let addr = Ipv4Addr::new(198, 18, 0, 10 + i as u8);
            let addr6 = lab.plug(&sw, &ns, &format!("b{i}"), addr, 0x10 + i as u16);
            lab.backends.push(Backend {
                name: format!("b{i}"),
                ns,
                addr,
                addr6,
            });
            lab.servers.push(None);
        }
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// A veth from the bridge to `ns` with `addr`/24 and 2001:2::`host6`/64; returns the latter.
    fn plug(
        &mut self,
        sw: &str,
        ns: &str,
        name: &str,
        addr: Ipv4Addr,
        host6: u16,
    ) -> std::net::Ipv6Addr {
        let port = format!("p-{name}");
        sh(&[
            "ip", "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        sh(&["ip", "-n", sw, "link", "set", &port, "master", "br0", "up"]);
        let addr6 = std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, host6);
        // nodad: the IPv6 address is usable at once (no duplicate address detection wait).
        for (a, flag) in [(format!("{addr}/24"), ""), (format!("{addr6}/64"), "nodad")] {
            let mut args = vec!["ip", "-n", ns, "addr", "add", &a, "dev", "eth0"];
            args.extend((!flag.is_empty()).then_some(flag));
            sh(&args);
        }
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        addr6
    }

    fn cleanup_leftovers(&self) {
        if self.pin_dir.exists() {
            let _ = lbctl::dataplane::down(&self.pin_dir);
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        remove_cgroup(&self.cgroup);
        let list = sh(&["ip", "netns", "list"]);
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{}-", self.prefix)) {
                sh_quiet(&["ip", "netns", "del", name]);
            }
        }
    }

    /// Starts TCP and UDP servers (IPv4 and IPv6) on backend `i` at `port`; each answers a
    /// request with the backend's name.
    pub fn serve(&mut self, i: usize, port: u16) {
        let b = self.backends[i].clone();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in [
            SocketAddr::new(b.addr.into(), port),
            SocketAddr::new(b.addr6.into(), port),
        ] {
            let (tcp, udp) = crate::in_netns(&b.ns, move || {
                let t = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
                let u = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
                (t, u)
            });
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let (s, name) = (stop.clone(), b.name.clone());
            threads.push(std::thread::spawn(move || tcp_server(tcp, &name, &s)));
            let (s, name) = (stop.clone(), b.name.clone());
            let hits = Arc::new(crate::Hits::default());
            threads.push(std::thread::spawn(move || {
                crate::udp_server(udp, name, hits, s)
            }));
        }
        self.servers[i] = Some(Servers {
            stop,
            threads,
            ns: b.ns.clone(),
            listening: vec![
                SocketAddr::new(b.addr.into(), port),
                SocketAddr::new(b.addr6.into(), port),
            ],
        });
    }

    /// Stops backend `i`'s servers (their ports close: the kernel refuses what comes).
    pub fn unserve(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.stop.store(true, Ordering::Relaxed);
            // Wake the blocking accepts (from the backend's own namespace: no cgroup program
            // runs for this test process).
            let listening = s.listening.clone();
            crate::in_netns(&s.ns, move || {
                for a in listening {
                    let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1));
                }
            });
            for t in s.threads {
                let _ = t.join();
            }
        }
    }

    /// The status socket of this lab's agents.
    pub fn status_socket(&self) -> PathBuf {
        std::env::temp_dir().join(format!("lbtest-{}-agent.sock", self.prefix))
    }

    /// Starts `lbctl agent --local --cgroup <the lab's cgroup> --apps APPS` plus `extra`, in
    /// this (the machine's) network namespace, logging to `log`.
    pub fn start_agent(&mut self, apps: &Path, extra: &[&str], log: &Path) {
        let mut cmd = Command::new(lbctl_bin());
        cmd.args(["agent", "--local", "--cgroup"])
            .arg(&self.cgroup)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--status-socket")
            .arg(self.status_socket())
            .arg("--apps")
            .arg(apps)
            .args(["--poll-ms", "50"])
            .args(extra);
        self.agents.push(crate::spawn_agent(cmd, log));
    }

    /// Stops the agents with SIGTERM (or SIGKILL when `kill`), waiting at most 10 s.
    pub fn stop_agents(&mut self, kill: bool) {
        crate::stop_children(&mut self.agents, kill);
    }

    /// Runs `lbctl ARGS --pin-dir <this lab's>` and returns its standard output.
    pub fn lbctl(&self, args: &[&str]) -> String {
        crate::lbctl_at(&self.pin_dir, args)
    }

    /// Whether every program of the local path has a pinned cgroup link: they run. An agent
    /// starting on a fresh data plane writes its first document into the maps while the kernel
    /// verifies its programs, so services in the maps are not served before this holds.
    pub fn programs_attached(&self) -> bool {
        crate::local_path_linked(&self.pin_dir)
    }

    /// Waits until `lbctl list --json` satisfies `ok` and the local path's programs are attached
    /// (`programs_attached`), at most `timeout`; returns how long.
    pub fn wait_list(
        &self,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
        what: &str,
    ) -> Duration {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            let out = Command::new(lbctl_bin())
                .args(["list", "--json", "--pin-dir"])
                .arg(&self.pin_dir)
                .output()
                .expect("lbctl list");
            if out.status.success() {
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("lbctl list --json");
                if ok(&v) && self.programs_attached() {
                    return start.elapsed();
                }
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A summary: a list of thousands of services would bury the message.
        let summary = last.map(|v| {
            let text = v.to_string();
            let n = v["services"].as_array().map_or(0, Vec::len);
            format!("{n} services: {}", &text[..text.len().min(2000)])
        });
        panic!(
            "{what}: not within {timeout:?}; last list: {summary:?}; programs attached: {}",
            self.programs_attached()
        );
    }

    /// Runs the client to completion in the client namespace, inside the lab's cgroup
    /// (`in_cgroup`) or not; returns its output lines.
    pub fn client(&self, in_cgroup: bool, args: &[&str]) -> Vec<String> {
        self.client_in(&self.client_ns, in_cgroup, args)
    }

    /// `client` in namespace `ns` (a backend's, for hairpin).
    pub fn client_in(&self, ns: &str, in_cgroup: bool, args: &[&str]) -> Vec<String> {
        run_client(in_cgroup.then_some(self.cgroup.as_path()), ns, args)
    }

    /// Starts the client (piped stdin and stdout) in the client namespace, for `hold` and
    /// concurrent runs.
    pub fn spawn_client(&self, in_cgroup: bool, args: &[&str]) -> RunningClient {
        let cgroup = in_cgroup.then_some(self.cgroup.as_path());
        let mut child = client_cmd(cgroup, &self.client_ns, args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("client");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        RunningClient {
            child,
            stdin,
            stdout,
        }
    }

    /// Programs of each local attach type attached to the lab's cgroup, as the kernel says
    /// (BPF_PROG_QUERY): (attach type, count).
    pub fn attached_programs(&self) -> Vec<(u32, u32)> {
        query_cgroup(&self.cgroup)
    }
}

/// The client command: in `cgroup` (None: where this process is) and namespace `ns`.
fn client_cmd(cgroup: Option<&Path>, ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(client_bin());
    let cg = cgroup.map_or_else(|| "-".to_string(), |c| c.display().to_string());
    cmd.arg(cg)
        .arg(ns)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `lbtest-client` to completion in `cgroup` (None: where this process is) and namespace
/// `ns`; returns its output lines.
pub fn run_client(cgroup: Option<&Path>, ns: &str, args: &[&str]) -> Vec<String> {
    let out = client_cmd(cgroup, ns, args)
        .output()
        .expect("running lbtest-client");
    assert!(
        out.status.success(),
        "lbtest-client {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A child cgroup of the cgroup2 root for a test, removed (its processes moved out) on drop.
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    /// Creates `lbtest-<name>` under the cgroup2 root (removing a leftover first).
    pub fn new(name: &str) -> TestCgroup {
        let path = child_cgroup(&format!("lbtest-{name}"));
        remove_cgroup(&path);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestCgroup(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}

/// A client started with `spawn_client`.
pub struct RunningClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl RunningClient {
    /// The next output line (panics at the end of the output).
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.stdout.read_line(&mut l).expect("client output");
        assert!(n > 0, "the client ended early");
        l.trim().to_string()
    }

    /// Sends a line to the client's stdin.
    pub fn say(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").expect("client stdin");
        stdin.flush().expect("client stdin");
    }

    /// Waits for the client to end; returns the rest of its output.
    pub fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let mut rest = String::new();
        self.stdout
            .read_to_string(&mut rest)
            .expect("client output");
        let status = self.child.wait().expect("client");
        assert!(status.success(), "client failed: {status}");
        rest.lines().map(str::to_string).collect()
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `lbtest-client` binary: beside the test binaries' `lbctl` (cargo builds it with them).
pub fn client_bin() -> PathBuf {
    let lbctl = lbctl_bin();
    let p = lbctl.with_file_name("lbtest-client");
    assert!(
        p.exists(),
        "{} does not exist: build it (`cargo build -p tests --bins`)",
        p.display()
    );
    p
}

/// The cgroup attach types of the local path: connect4/6, sendmsg4/6, recvmsg4/6,
/// getpeername4/6, inet_sock_release (enum bpf_attach_type).
pub const LOCAL_ATTACH_TYPES: [u32; 9] = [10, 11, 14, 15, 19, 20, 29, 30, 34];

/// How many programs are attached to `cgroup` for each local attach type (BPF_PROG_QUERY).
pub fn query_cgroup(cgroup: &Path) -> Vec<(u32, u32)> {
    use std::os::fd::AsRawFd as _;
    let dir = File::open(cgroup).unwrap_or_else(|e| panic!("opening {}: {e}", cgroup.display()));
    LOCAL_ATTACH_TYPES
        .iter()
        .map(|&t| {
            // union bpf_attr query: target_fd, attach_type, query_flags, attach_flags,
            // prog_ids (u64), prog_cnt.
            let mut attr = [0u32; 16];
            attr[0] = dir.as_raw_fd() as u32;
            attr[1] = t;
            // SAFETY: a zeroed bpf_attr of the size passed; prog_ids is NULL, so the kernel
            // only writes the count.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    16, // BPF_PROG_QUERY
                    attr.as_mut_ptr(),
                    size_of_val(&attr) as u32,
                )
            };
            assert_eq!(
                rc,
                0,
                "BPF_PROG_QUERY {t}: {}",
                std::io::Error::last_os_error()
            );
            (t, attr[6])
        })
        .collect()
}

impl Drop for LocalLab {
    fn drop(&mut self) {
        for mut a in self.agents.drain(..) {
            let _ = a.kill();
            let _ = a.wait();
        }
        for i in 0..self.servers.len() {
            self.unserve(i);
        }
        if self.pin_dir.exists() {
            let _ = lbctl::dataplane::down(&self.pin_dir);
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        let _ = std::fs::remove_file(lbctl::lock::Guarded::PinDir(&self.pin_dir).lock_path());
        remove_socket_files(&self.status_socket());
        remove_socket_files(&lbctl::status::default_socket_for(&self.pin_dir));
        remove_cgroup(&self.cgroup);
        for ns in self.namespaces.drain(..).rev() {
            sh_quiet(&["ip", "netns", "del", &ns]);
        }
    }
}

fn tcp_server(l: TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    let mut conns = Vec::new();
    // Blocking accept: `unserve` wakes it with a connection after setting `stop`.
    while let Ok((s, _)) = l.accept() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (name, stop) = (name.to_string(), stop.clone());
        let hits = crate::Hits::default();
        conns.push(std::thread::spawn(move || {
            crate::serve_conn(s, &name, &hits, &stop)
        }));
        conns.retain(|c: &JoinHandle<()>| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
}

/// Writes one entry into each of the local path's maps pinned in `dir` (as its programs would
/// for one UDP socket given a backend), so that a test of what a resize copies sees them hold
/// something without a cgroup.
pub fn fill_socket_maps(dir: &Path) {
    use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
    use lb_common::{FlowEntry, ReplyEntry6, SOCK_FAMILY_V4, SockKey};
    let open = |name: &str| {
        aya::maps::Map::from_map_data(
            MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("opening {name}: {e}")),
        )
        .expect("a map")
    };
    let key = |addr: u32, port: u16| SockKey {
        cookie: 4242,
        addr: [addr.to_be(), 0, 0, 0],
        port: port.to_be(),
        family: SOCK_FAMILY_V4,
        proto: lb_common::PROTO_UDP,
        _pad: 0,
    };
    let mut fwd: HashMap<_, SockKey, FlowEntry> =
        open(lb_common::MAP_SOCK_FWD).try_into().expect("lb_sockfw");
    fwd.insert(key(0xac10_0001, 53), FlowEntry::new(0, 0), 0)
        .expect("writing lb_sockfw");
    let mut rev: HashMap<_, SockKey, ReplyEntry6> =
        open(lb_common::MAP_SOCK_REV).try_into().expect("lb_sockrv");
    rev.insert(
        key(0xc612_010b, 53),
        ReplyEntry6 {
            vip_addr: [0xac10_0001u32.to_be(), 0, 0, 0],
            vip_port: 53u16.to_be(),
            ends: 0,
        },
        0,
    )
    .expect("writing lb_sockrv");
    let n = aya::util::nr_cpus().expect("CPUs");
    let mut m: PerCpuArray<_, u64> = open(lb_common::MAP_SOCK_STATS)
        .try_into()
        .expect("a per-CPU array");
    m.set(0, PerCpuValues::try_from(vec![3u64; n]).expect("values"), 0)
        .expect("writing lb_sockst");
    // Id 0's counts on every CPU, in its region of the arrays by id.
    for name in [lb_common::MAP_SOCK_SERVICE, lb_common::MAP_SOCK_BACKEND] {
        let mut m: Array<_, u64> = open(name).try_into().expect("an array");
        let ids = m.len() / n as u32;
        for cpu in 0..n as u32 {
            m.set(lb_common::counter_slot(cpu, ids, 0), 3, 0)
                .unwrap_or_else(|e| panic!("writing {name}: {e}"));
        }
    }
}
