//! A sandbox of network namespaces for the privileged end-to-end tests and the demo: a client, a
//! load balancer running the real `lbctl agent`, and backends running real TCP and UDP servers.
//!
//! Everything lives in namespaces this code creates, joined by veth pairs, with no link to a real
//! interface. Addresses come from 198.18.0.0/15. Dropping a `Lab` stops the processes it started,
//! detaches and unpins the data plane and deletes its namespaces, also when a test panics.
pub mod capture;
pub mod checksum;
pub mod dns;
pub mod fake_marathon;
pub mod fake_misbehave;
pub mod http;
pub mod local_lab;
pub mod packet;
pub mod pktlab;
pub mod prop;
pub mod reference;
pub mod tempdir;

pub use tempdir::{TestDir, TestFile};

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Runs a command and panics, with its output, if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure (for cleanup).
pub fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs the calling thread on `cpu` alone (a test run of a program runs on the caller's CPU).
pub fn pin_thread_to(cpu: usize) {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a zeroed cpu_set_t is a valid empty set, one bit set; 0 is this thread.
    let pinned = unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(pinned, 0, "pinning the test's thread to CPU {cpu}");
}

/// True when this process may create namespaces and load BPF. In CI (CI set) a missing privilege
/// is a failure; on a developer machine without root the caller skips and says so.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root, and CI runs as root: this is a broken CI machine");
    }
    eprintln!(
        "SKIPPED {test}: needs root (network namespaces and BPF); run `sudo cargo xtask test`"
    );
    record_skip(test);
    false
}

/// The environment variable naming the file where skipped tests are listed, one a line:
/// `cargo xtask test` sets it and counts them (libtest itself can only count them as passed).
pub const SKIPS_FILE_ENV: &str = "LBTEST_SKIPS_FILE";

/// Appends `test` to the skip list, if there is one; failing to is a test failure, so that a
/// skip is never silently counted as a pass.
fn record_skip(test: &str) {
    let Some(path) = std::env::var_os(SKIPS_FILE_ENV) else {
        return;
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening the skip list {path:?}: {e}"));
    writeln!(f, "{test}").unwrap_or_else(|e| panic!("writing the skip list {path:?}: {e}"));
}

/// The `lbctl` binary under test: $LBCTL_BIN, else the workspace's target/debug/lbctl.
pub fn lbctl_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LBCTL_BIN") {
        let p = PathBuf::from(p);
        return std::fs::canonicalize(&p).unwrap_or(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lbctl");
    assert!(
        p.exists(),
        "{} does not exist: build it first (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// Runs `f` on a thread that has joined network namespace `ns`. Sockets made there stay there.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Starts `f` on a thread that has joined network namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
}

fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: setns(2) on an open namespace file; affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// One backend host: its namespace and address.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    /// Its IPv6 address, from the benchmarking prefix 2001:2::/48 (RFC 5180).
    pub addr6: Ipv6Addr,
}

/// Request counters of the servers, by backend name.
#[derive(Default)]
pub struct Hits {
    pub tcp: AtomicU64,
    pub udp: AtomicU64,
}

/// The hooks a lab's load balancer uses. Default labs build their veth pairs as Linux makes them
/// (partial checksums on the far ends) and let the agent choose: TC on veth. `LBTEST_HOOK=xdp`
/// in the environment (set by `cargo xtask test` for its second pass) makes every lab `Xdp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hooks {
    /// Interfaces as Linux makes them; `--iface NAME` (auto: TC on veth).
    Plain,
    /// Far ends tuned (transmit checksum offload off, GRO on) and `--iface NAME:xdp`.
    Xdp,
    /// The client's link tuned with XDP forced; the backends' links as Linux makes them, on TC
    /// (their far ends get GRO so that XDP can redirect into them).
    Mixed,
}

/// The environment variable that makes every lab `Hooks::Xdp`.
pub const HOOK_ENV: &str = "LBTEST_HOOK";

impl Hooks {
    /// `Xdp` when `LBTEST_HOOK=xdp`, else `Plain`.
    pub fn from_env() -> Hooks {
        match std::env::var(HOOK_ENV).as_deref() {
            Ok("xdp") => Hooks::Xdp,
            Ok("") | Ok("auto") | Err(_) => Hooks::Plain,
            Ok(other) => panic!("{HOOK_ENV}={other}: give xdp or auto"),
        }
    }
}

pub struct Lab {
    pub prefix: String,
    pub client_ns: String,
    pub lb_ns: String,
    pub lb_ifaces: Vec<String>,
    /// The hooks asked of the agent (`Lab::new_with`).
    pub hooks: Hooks,
    /// The load balancer's interfaces whose `--iface` forces XDP (their far ends are tuned).
    pub xdp_ifaces: Vec<String>,
    pub backends: Vec<Backend>,
    pub pin_dir: PathBuf,
    pub client_addr: Ipv4Addr,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    agents: Vec<Child>,
    /// The last agent started runs the local path too (`--local`): `programs_attached` waits
    /// for its cgroup programs as well.
    local_path: bool,
    namespaces: Vec<String>,
}

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

impl Lab {
    /// Builds the sandbox: `prefix` names its namespaces and pin directory (a rerun first removes
    /// what a killed earlier run left), `n` backends on their own links, with the hooks
    /// `LBTEST_HOOK` asks for (`Hooks::from_env`).
    pub fn new(prefix: &str, n: usize) -> Lab {
        Lab::new_with(prefix, n, Hooks::from_env())
    }

    /// `new` with these hooks.
    pub fn new_with(prefix: &str, n: usize, hooks: Hooks) -> Lab {
        assert!((1..=200).contains(&n));
        let mut lab = Lab {
            prefix: prefix.to_string(),
            client_ns: format!("{prefix}-c"),
            lb_ns: format!("{prefix}-lb"),
            lb_ifaces: Vec::new(),
            hooks,
            xdp_ifaces: Vec::new(),
            backends: Vec::new(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}")),
            client_addr: CLIENT_ADDR,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            agents: Vec::new(),
            local_path: false,
            namespaces: Vec::new(),
        };
        lab.cleanup_leftovers();
        let (c, lb) = (lab.client_ns.clone(), lab.lb_ns.clone());
        lab.add_ns(&lb);
        for knob in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            sh(&["ip", "netns", "exec", &lb, "sysctl", "-q", "-w", knob]);
        }
        lab.add_ns(&c);
        lab.link(&c, "c0", "198.18.0.2/24", "lb-c", "198.18.0.1/24");
        for net in ["fc00::/7", "2001:2::/48"] {
            sh(&[
                "ip",
                "-n",
                &c,
                "-6",
                "route",
                "add",
                net,
                "via",
                "2001:2::1",
            ]);
        }
        // VIP ranges (and the named-VIP pool) and the backends are reached through the balancer.
        for net in ["172.16.0.0/12", "10.0.0.0/8", "11.0.0.0/8", "198.18.0.0/15"] {
            sh(&["ip", "-n", &c, "route", "add", net, "via", "198.18.0.1"]);
        }
        for i in 1..=n {
            let ns = format!("{prefix}-b{i}");
            lab.add_ns(&ns);
            let lb_if = format!("lb-b{i}");
            lab.link(
                &ns,
                "b0",
                &format!("198.18.{i}.2/24"),
                &lb_if,
                &format!("198.18.{i}.1/24"),
            );
            sh(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{i}.1"),
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("2001:2:0:{i}::1"),
            ]);
            lab.backends.push(Backend {
                name: format!("b{i}"),
                ns,
                addr: Ipv4Addr::new(198, 18, i as u8, 2),
                addr6: format!("2001:2:0:{i}::2").parse().expect("v6"),
            });
        }
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// A veth pair between namespace `ns` (interface `inner`) and the load balancer (`lb_if`),
    /// as Linux makes it, unless the lab's hooks force XDP on `lb_if`: then the far end gets GRO
    /// (so that veth accepts XDP-redirected frames) and computes its own checksums (so that the
    /// XDP program sees complete ones, as on a wire).
    fn link(&mut self, ns: &str, inner: &str, inner_addr: &str, lb_if: &str, lb_addr: &str) {
        let lb = self.lb_ns.clone();
        // The IPv6 subnet follows the IPv4 one: 198.18.N.0/24 <-> 2001:2:0:N::/64.
        let subnet = inner_addr.split('.').nth(2).unwrap_or("0").to_string();
        sh(&[
            "ip", "-n", &lb, "link", "add", lb_if, "type", "veth", "peer", "name", inner, "netns",
            ns,
        ]);
        sh(&["ip", "-n", &lb, "addr", "add", lb_addr, "dev", lb_if]);
        sh(&["ip", "-n", ns, "addr", "add", inner_addr, "dev", inner]);
        let (inner6, lb6) = (
            format!("2001:2:0:{subnet}::2/64"),
            format!("2001:2:0:{subnet}::1/64"),
        );
        sh(&["ip", "-n", &lb, "addr", "add", &lb6, "dev", lb_if, "nodad"]);
        sh(&[
            "ip", "-n", ns, "addr", "add", &inner6, "dev", inner, "nodad",
        ]);
        sh(&["ip", "-n", &lb, "link", "set", lb_if, "up"]);
        sh(&["ip", "-n", ns, "link", "set", inner, "up"]);
        let xdp = match self.hooks {
            Hooks::Plain => false,
            Hooks::Xdp => true,
            Hooks::Mixed => ns == self.client_ns,
        };
        if xdp {
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", inner, "gro", "on", "tx", "off",
            ]);
            self.xdp_ifaces.push(lb_if.to_string());
        } else if self.hooks == Hooks::Mixed {
            // Frames redirected by XDP on the client's side come into this veth.
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", inner, "gro", "on",
            ]);
        }
        self.lb_ifaces.push(lb_if.to_string());
    }

    /// Detaches and unpins this lab's data plane, if any.
    fn remove_pins(&self) {
        if self.pin_dir.exists() {
            let _ = lbctl::dataplane::down(&self.pin_dir);
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }

    fn cleanup_leftovers(&self) {
        self.remove_pins();
        let list = sh(&["ip", "netns", "list"]);
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{}-", self.prefix)) {
                sh_quiet(&["ip", "netns", "del", name]);
            }
        }
    }

    /// Starts TCP and UDP servers on every backend at `port`; each answers a request with its
    /// backend's name and counts it.
    pub fn serve(&mut self, port: u16) -> Vec<(String, Arc<Hits>)> {
        let mut out = Vec::new();
        for b in self.backends.clone() {
            let hits = Arc::new(Hits::default());
            for addr in [
                SocketAddr::new(b.addr.into(), port),
                SocketAddr::new(b.addr6.into(), port),
            ] {
                let (tcp, udp) = in_netns(&b.ns, move || {
                    let t =
                        TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
                    let u =
                        UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
                    (t, u)
                });
                tcp.set_nonblocking(true).expect("nonblocking");
                udp.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                let (stop, name, h) = (self.stop.clone(), b.name.clone(), hits.clone());
                self.servers
                    .push(std::thread::spawn(move || tcp_server(tcp, name, h, stop)));
                let (stop, name, h) = (self.stop.clone(), b.name.clone(), hits.clone());
                self.servers
                    .push(std::thread::spawn(move || udp_server(udp, name, h, stop)));
            }
            out.push((b.name.clone(), hits));
        }
        out
    }

    /// Starts `lbctl agent` in the load balancer's namespace (sharing this process's bpffs),
    /// logging to `log`.
    pub fn start_agent(&mut self, apps: &Path, log: &Path) {
        let source = ["--apps".to_string(), apps.display().to_string()];
        self.start_agent_with(&source, &[], log);
    }

    /// Starts `lbctl agent` with these source arguments (besides the pin directory and
    /// interfaces) and extra environment.
    pub fn start_agent_with(&mut self, source: &[String], env: &[(&str, &str)], log: &Path) {
        let mut args: Vec<String> = vec![
            format!("--net=/run/netns/{}", self.lb_ns),
            lbctl_bin().display().to_string(),
            "agent".into(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
        ];
        args.extend(source.iter().cloned());
        if !source.iter().any(|a| a == "--status-socket") {
            args.push("--status-socket".into());
            args.push(self.status_socket().display().to_string());
        }
        for i in &self.lb_ifaces {
            args.push("--iface".into());
            args.push(self.iface_arg(i));
        }
        self.local_path = source.iter().any(|a| a == "--local");
        let mut cmd = Command::new("nsenter");
        cmd.args(&args).envs(env.iter().copied());
        self.agents.push(spawn_agent(cmd, log));
    }

    /// The `--iface` value for the load balancer's interface `iface`: `NAME:xdp` where the lab
    /// forces XDP, else `NAME` (auto: TC on veth).
    pub fn iface_arg(&self, iface: &str) -> String {
        if self.xdp_ifaces.iter().any(|i| i == iface) {
            format!("{iface}:xdp")
        } else {
            iface.to_string()
        }
    }

    /// The id of the load balancer's program on `iface`, and its hook (`"xdp"` from `ip link`,
    /// `"tc"` from the interface's tcx ingress programs), if one is attached.
    pub fn program_on(&self, iface: &str) -> Option<(&'static str, u32)> {
        let text = sh(&["ip", "-n", &self.lb_ns, "-d", "link", "show", "dev", iface]);
        if let Some(rest) = text.split("prog/xdp id ").nth(1) {
            return Some(("xdp", rest.split_whitespace().next()?.parse().ok()?));
        }
        let name = iface.to_string();
        let ids = in_netns(&self.lb_ns, move || {
            aya::programs::SchedClassifier::query_tcx(
                name.as_str(),
                aya::programs::TcAttachType::Ingress,
            )
            .map(|(_, progs)| progs.iter().map(|p| p.id()).collect::<Vec<u32>>())
            .unwrap_or_default()
        });
        ids.first().map(|id| ("tc", *id))
    }

    /// The status socket of the agents this lab starts (unless their arguments name another).
    pub fn status_socket(&self) -> PathBuf {
        std::env::temp_dir().join(format!("lbtest-{}-agent.sock", self.prefix))
    }

    /// `lbctl status --json` from the agent at `socket`, or None while it does not answer.
    pub fn status_at(&self, socket: &Path) -> Option<serde_json::Value> {
        let out = Command::new(lbctl_bin())
            .args(["status", "--json", "--socket"])
            .arg(socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Waits until the status of the agent at `socket` satisfies `ok`, at most `timeout`;
    /// returns it, or panics with `what` and the last status seen.
    pub fn wait_status_at(
        &self,
        socket: &Path,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
        what: &str,
    ) -> serde_json::Value {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Some(v) = self.status_at(socket) {
                if ok(&v) {
                    return v;
                }
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: not within {timeout:?}; last status: {last:?}");
    }

    /// `wait_status_at` this lab's own status socket.
    pub fn wait_status(
        &self,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
        what: &str,
    ) -> serde_json::Value {
        self.wait_status_at(&self.status_socket(), timeout, ok, what)
    }

    /// Waits until the agent on this lab's status socket has reconciled a document since it
    /// reported `before`: a later `last_sync`, or another `last_reconcile_seconds` (a second
    /// reconcile within the same second). Returns the new status.
    pub fn wait_reconciled_since(
        &self,
        before: &serde_json::Value,
        timeout: Duration,
        what: &str,
    ) -> serde_json::Value {
        let (sync, took) = (
            before["agent"]["last_sync"].as_u64(),
            before["agent"]["last_reconcile_seconds"].as_f64(),
        );
        self.wait_status(
            timeout,
            |v| {
                let now = v["agent"]["last_sync"].as_u64();
                now > sync
                    || (now.is_some() && v["agent"]["last_reconcile_seconds"].as_f64() != took)
            },
            what,
        )
    }

    /// Stops the agents with SIGTERM (or SIGKILL when `kill`), waiting at most 10 s.
    pub fn stop_agents(&mut self, kill: bool) {
        stop_children(&mut self.agents, kill);
    }

    /// Runs `lbctl ARGS --pin-dir <this lab's>` and returns its standard output.
    pub fn lbctl(&self, args: &[&str]) -> String {
        lbctl_at(&self.pin_dir, args)
    }

    /// `lbctl list --json` as (vip, protocol) -> sorted backend addresses with state.
    pub fn kernel_services(&self) -> Vec<(String, String, Vec<String>)> {
        parse_list(&self.lbctl(&["list", "--json"]))
    }
}

fn parse_list(out: &str) -> Vec<(String, String, Vec<String>)> {
    let v: serde_json::Value = serde_json::from_str(out).expect("lbctl list --json");
    v["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            let backends = s["backends"]
                .as_array()
                .expect("backends")
                .iter()
                .map(|b| {
                    format!(
                        "{} {}",
                        b["address"].as_str().unwrap_or(""),
                        b["state"].as_str().unwrap_or("")
                    )
                })
                .collect();
            (
                s["vip"].as_str().unwrap_or("").to_string(),
                s["protocol"].as_str().unwrap_or("").to_string(),
                backends,
            )
        })
        .collect()
}

impl Lab {
    fn try_kernel_services(&self) -> Option<Vec<(String, String, Vec<String>)>> {
        let out = Command::new(lbctl_bin())
            .args(["list", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| parse_list(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Whether every load-balancer interface of the lab has a pinned link, and (for an agent
    /// started with `--local`) every program of the local path: the agent's programs run. An
    /// agent starting on a fresh data plane writes its first document into the maps while the
    /// kernel verifies its programs, so services in the maps are not served before this holds.
    pub fn programs_attached(&self) -> bool {
        (!self.local_path || local_path_linked(&self.pin_dir))
            && ifaces_linked(&self.pin_dir, &self.lb_ifaces)
    }

    /// Waits until `ok(services)` holds, polling `lbctl list`, and the programs are attached
    /// (`programs_attached`); returns how long it took.
    pub fn wait_for_kernel(
        &self,
        timeout: Duration,
        ok: impl Fn(&[(String, String, Vec<String>)]) -> bool,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = Vec::new();
        while start.elapsed() < timeout {
            // The agent may still be creating its pins: a failing `lbctl list` means "not yet".
            if let Some(now) = self.try_kernel_services() {
                last = now;
                if ok(&last) && self.programs_attached() {
                    return Ok(start.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "not reached within {timeout:?}; kernel has {last:?}, programs attached: {}",
            self.programs_attached()
        ))
    }

    /// `count` TCP connections from the client to `vip`, one request each. Returns the backend
    /// names that answered, in order; panics on the first failure, naming it.
    pub fn tcp_requests(&self, vip: impl Into<SocketAddr>, count: usize) -> Vec<String> {
        self.requests("TCP", vip.into(), count, tcp_request)
    }

    /// `count` UDP request/replies from fresh sockets; each reply must come from `vip`.
    pub fn udp_requests(&self, vip: impl Into<SocketAddr>, count: usize) -> Vec<String> {
        self.requests("UDP", vip.into(), count, udp_request)
    }

    fn requests(
        &self,
        what: &'static str,
        vip: SocketAddr,
        count: usize,
        one: fn(SocketAddr) -> Result<String, String>,
    ) -> Vec<String> {
        in_netns(&self.client_ns, move || {
            (0..count)
                .map(|i| one(vip).unwrap_or_else(|e| panic!("{what} request {i} to {vip}: {e}")))
                .collect()
        })
    }

    /// `n` TCP connections from the client to `vip`, kept open (the sockets stay in the client's
    /// namespace; use them from any thread with `exchange`).
    pub fn open_connections(&self, vip: SocketAddrV4, n: usize) -> Vec<TcpStream> {
        in_netns(&self.client_ns, move || {
            (0..n)
                .map(|i| {
                    let s =
                        TcpStream::connect_timeout(&SocketAddr::V4(vip), Duration::from_secs(3))
                            .unwrap_or_else(|e| panic!("connection {i} to {vip}: {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(3)))
                        .expect("timeout");
                    s
                })
                .collect()
        })
    }

    /// One TCP request from the client, as a result.
    pub fn tcp_try(&self, vip: SocketAddrV4) -> Result<String, String> {
        in_netns(&self.client_ns, move || tcp_request(vip))
    }

    /// One UDP request from the client, as a result.
    pub fn udp_try(&self, vip: SocketAddrV4) -> Result<String, String> {
        in_netns(&self.client_ns, move || udp_request(vip))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for mut a in self.agents.drain(..) {
            let _ = a.kill();
            let _ = a.wait();
        }
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        self.remove_pins();
        // The agents' lock files (no agent of this lab runs any more), and the files beside
        // their status sockets: this lab's own, and the default one of its pin directory.
        let _ = std::fs::remove_file(lbctl::lock::Guarded::PinDir(&self.pin_dir).lock_path());
        for socket in [
            self.status_socket(),
            lbctl::status::default_socket_for(&self.pin_dir),
        ] {
            remove_socket_files(&socket);
        }
        for ns in self.namespaces.drain(..).rev() {
            sh_quiet(&["ip", "netns", "del", &ns]);
        }
    }
}

/// Removes an agent's status socket and the files beside it: its lock file and its named-VIP
/// book. Only for a socket no agent serves any more.
pub fn remove_socket_files(socket: &Path) {
    let _ = std::fs::remove_file(lbctl::lock::Guarded::Socket(socket).lock_path());
    let _ = std::fs::remove_file(lbctl::marathon::book_path(socket));
    let _ = std::fs::remove_file(socket);
}

fn tcp_server(l: TcpListener, name: String, hits: Arc<Hits>, stop: Arc<AtomicBool>) {
    let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let (name, hits, stop) = (name.clone(), hits.clone(), stop.clone());
                let h = std::thread::spawn(move || serve_conn(s, &name, &hits, &stop));
                conns.lock().expect("conns").push(h);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    for h in conns.lock().expect("conns").drain(..) {
        let _ = h.join();
    }
}

/// Answers every line on the connection with the backend's name until EOF or stop (the
/// servers of `Lab` and of `local_lab::LocalLab`).
pub fn serve_conn(s: TcpStream, name: &str, hits: &Hits, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                hits.tcp.fetch_add(1, Ordering::Relaxed);
                if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Answers every datagram with the backend's name until stop (the servers of `Lab` and of
/// `local_lab::LocalLab`); `s` needs a read timeout.
pub fn udp_server(s: UdpSocket, name: String, hits: Arc<Hits>, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, from)) = s.recv_from(&mut buf) {
            hits.udp.fetch_add(1, Ordering::Relaxed);
            let _ = s.send_to(name.as_bytes(), from);
        }
    }
}

/// One TCP connection, one request line, one reply line.
pub fn tcp_request(vip: impl Into<SocketAddr>) -> Result<String, String> {
    tcp_request_from(vip).map(|(_, reply)| reply)
}

/// `tcp_request`, also returning the client's address (its port is the one the kernel chose).
pub fn tcp_request_from(vip: impl Into<SocketAddr>) -> Result<(SocketAddr, String), String> {
    let vip: SocketAddr = vip.into();
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let peer = s.peer_addr().map_err(|e| e.to_string())?;
    if peer != vip {
        return Err(format!("connected to {peer}, not {vip}"));
    }
    let local = s.local_addr().map_err(|e| e.to_string())?;
    s.write_all(b"hello\n").map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(&mut s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    if line.is_empty() {
        return Err("connection closed without a reply".into());
    }
    Ok((local, line.trim().to_string()))
}

/// One request line on an open connection; returns the answering backend's name.
pub fn exchange(s: &mut TcpStream) -> Result<String, String> {
    s.write_all(b"hello\n").map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    let mut byte = [0u8; 1];
    while !line.ends_with('\n') {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0] as char),
            Ok(_) => return Err("connection closed".into()),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(line.trim().to_string())
}

/// One UDP request from a fresh socket; the reply must come from the VIP.
pub fn udp_request(vip: impl Into<SocketAddr>) -> Result<String, String> {
    let vip: SocketAddr = vip.into();
    let any: SocketAddr = if vip.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    udp_request_from(any, vip)
}

/// One UDP request from a fresh socket bound to `from` (a fixed client port: a known flow); the
/// reply must come from the VIP.
pub fn udp_request_from(from: SocketAddr, vip: impl Into<SocketAddr>) -> Result<String, String> {
    let vip: SocketAddr = vip.into();
    let s = UdpSocket::bind(from).map_err(|e| format!("bind {from}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.send_to(b"hello", vip).map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 256];
    let (n, from) = s
        .recv_from(&mut buf)
        .map_err(|e| format!("no reply: {e}"))?;
    if from != vip {
        return Err(format!("reply came from {from}, not from the VIP {vip}"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).to_string())
}

/// A Marathon `/v2/apps?embed=apps.tasks` body with one host-networking app whose first port
/// definition carries `labels`, and one running task per backend listening on `port`.
pub fn apps_doc(
    app: &str,
    protocol: &str,
    labels: &[(&str, &str)],
    backends: &[Backend],
    port: u16,
) -> String {
    let tasks: Vec<pktlab::Task> = backends
        .iter()
        .map(|b| pktlab::Task {
            name: b.name.clone(),
            host: b.addr.into(),
            port,
            state: "TASK_RUNNING",
        })
        .collect();
    pktlab::apps(vec![pktlab::app(app, protocol, labels, &tasks)])
}

/// Writes `text` to `path` atomically (write, then rename), as config management tools do.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing apps file");
    std::fs::rename(&tmp, path).expect("renaming apps file");
}

/// Waits until `ok()` holds, at most `timeout`; panics with `what` otherwise.
/// Whether each of `ifaces` has a pinned link in the data plane at `pin_dir`: the programs
/// see its traffic.
pub fn ifaces_linked(pin_dir: &Path, ifaces: &[String]) -> bool {
    let linked = lbctl::dataplane::pinned_links(pin_dir).unwrap_or_default();
    ifaces
        .iter()
        .all(|i| linked.iter().any(|(name, _)| name == i))
}

/// Whether every program of the local path has a pinned cgroup link in the data plane at
/// `pin_dir`.
pub fn local_path_linked(pin_dir: &Path) -> bool {
    lbctl::dataplane::sock_links(pin_dir).is_ok_and(|l| l.len() == lb_common::PROG_SOCK.len() + 1)
}

pub fn wait_until(timeout: Duration, ok: impl Fn() -> bool, what: &str) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} (after {timeout:?})");
}

/// Waits until the agent's log contains `needle`; panics with the log otherwise.
pub fn wait_log(log: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if read_log(log).contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "no {needle:?} in the agent log after {timeout:?}:\n{}",
        read_log(log)
    );
}

/// Reads a whole file, or "" when it is missing.
pub fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Tallies names: (name, count), sorted by name.
pub fn tally(names: &[String]) -> Vec<(String, usize)> {
    let mut m = std::collections::BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m.into_iter().collect()
}

/// Stops `agents` (children this test started) with SIGTERM (or SIGKILL when `kill`), waiting at
/// most 10 s for each; panics naming the signal when one does not stop.
pub fn stop_children(agents: &mut Vec<Child>, kill: bool) {
    for mut a in agents.drain(..) {
        let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(a.id() as i32, sig) };
        let end = Instant::now() + Duration::from_secs(10);
        while a.try_wait().ok().flatten().is_none() {
            if Instant::now() > end {
                let _ = a.kill();
                let _ = a.wait();
                panic!("lbctl agent did not stop within 10 s of signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `cmd` (an `lbctl agent` command line) logging at info level to `log` (both output
/// streams); panics when it cannot start.
pub fn spawn_agent(mut cmd: Command, log: &Path) -> Child {
    let log = File::create(log).expect("agent log");
    cmd.env("LBCTL_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting lbctl agent")
}

/// Runs `lbctl ARGS --pin-dir PIN_DIR` and returns its standard output.
pub fn lbctl_at(pin_dir: &Path, args: &[&str]) -> String {
    let mut cmd = vec![lbctl_bin().display().to_string()];
    cmd.extend(args.iter().map(|s| s.to_string()));
    cmd.push("--pin-dir".into());
    cmd.push(pin_dir.display().to_string());
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    sh(&refs)
}
