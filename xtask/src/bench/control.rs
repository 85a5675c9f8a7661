//! The control plane: deriving and applying documents of many apps, building Maglev tables,
//! the time from one task change to the kernel maps, and the memory of the real agent.
use super::{
    doc::{self, App},
    stats::Summary,
    sys::{self, Netns, Pins},
};
use anyhow::{Context as _, Result, bail, ensure};
use lbctl::marathon::SystemResolver;
use serde::Serialize;
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

pub struct Plan {
    /// Documents of this many apps are derived and applied.
    pub apply_apps: Vec<usize>,
    pub tasks_per_app: usize,
    pub reps: usize,
    pub maglev_backends: Vec<usize>,
    pub maglev_sizes: Vec<u32>,
    /// Each Maglev size is built repeatedly for this long (at least 5 times).
    pub maglev_time: Duration,
    /// Sizes of the documents that single-task changes are made to.
    pub change_apps: Vec<usize>,
    pub changes: usize,
    /// Sizes at which the real agent's memory is read.
    pub rss_apps: Vec<usize>,
    /// Starts of the real agent with one app, per kind (`start_times`).
    pub starts: usize,
    /// Sizes of the documents a fake Marathon serves the real agent, and the one-task changes
    /// made through its events (`events`).
    pub event_apps: Vec<usize>,
    pub event_changes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApplyResult {
    pub apps: usize,
    pub tasks_per_app: usize,
    pub services: usize,
    pub derive_ms: Summary,
    /// Into empty maps sized for the document (`lb_table`).
    pub apply_ms: Summary,
    /// Slots of each service's Maglev table.
    pub ring_size: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct MaglevResult {
    pub backends: usize,
    pub table_size: u32,
    pub us: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChangeResult {
    pub apps: usize,
    pub changes: usize,
    /// The agent's reconcile (`marathon::Snapshot::parse` and `resolve_hosts_with` its cache,
    /// then `agent::Sync::apply`: derive and merge what changed, diff, write) of a document
    /// that differs from the last by one task.
    pub reconcile_ms: Summary,
    /// Of that, reading the document (what the agent's source threads do: split it into apps,
    /// hash them, read those the cache does not hold, resolve host names).
    pub read_ms: Summary,
    /// Of that, the reconciler's part before the writer: derive and merge what changed.
    pub merge_ms: Summary,
    /// For comparison, deriving the same document from scratch (`marathon::derive`: no cache).
    pub scratch_ms: Summary,
    /// Of that, the writer's part (`Writer::apply`: diff against the mirror, build the changed
    /// table, write the maps), as `Writer::last_apply` reports it.
    pub write_ms: Summary,
    /// Changes then seen in the kernel maps (read back after each).
    pub verified: usize,
    /// The same kind of change as the agent applies it after an event naming the app: the app
    /// alone (`{"app": ...}`, as `GET /v2/apps/{id}` answers) read (`Snapshot::parse_owned`,
    /// `resolve_hosts`) and applied (`agent::Sync::apply_app`), to the maps written.
    pub alone_ms: Summary,
    /// Of that, reading the app.
    pub alone_read_ms: Summary,
    /// Of that, the writer's part.
    pub alone_write_ms: Summary,
    /// Those changes then seen in the kernel maps.
    pub alone_verified: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RssResult {
    pub apps: usize,
    pub services_in_kernel: usize,
    /// From the agent's start to the service the writer writes last being served, checked
    /// (by the read that follows it) to be the time every service was.
    pub last_ms: f64,
    /// From the agent's start to the end of that read: an upper bound.
    pub serve_ms: f64,
    pub vm_rss_kb: u64,
    pub vm_hwm_kb: u64,
}

/// Start to served of the real agent with one app, for each way it can run (`start_times`).
#[derive(Clone, Debug, Serialize)]
pub struct StartResult {
    /// What the agent was asked to run (its flags, in words).
    pub kind: &'static str,
    /// The packet programs that kind loads.
    pub programs: &'static str,
    pub ms: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub starts: Vec<StartResult>,
    pub apply: Vec<ApplyResult>,
    pub maglev: Vec<MaglevResult>,
    pub change: Vec<ChangeResult>,
    pub rss: Vec<RssResult>,
    pub events: Vec<super::events::EventResult>,
}

/// Distinct backend addresses the generated apps' tasks are drawn from.
pub(super) const BACKENDS: usize = 4000;

/// `apps` apps of `tasks` tasks, each app one TCP VIP; backends drawn in turn from `BACKENDS`
/// addresses.
pub fn apps(apps: usize, tasks: usize) -> Vec<App> {
    (0..apps)
        .map(|i| App {
            id: format!("/bench/app{i}"),
            vip: SocketAddr::V4(SocketAddrV4::new(doc::vip_addr(i), 8080)),
            protocol: "tcp",
            tasks: (0..tasks)
                .map(|j| SocketAddr::V4(backend((i * tasks + j) % BACKENDS)))
                .collect(),
        })
        .collect()
}

fn backend(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 2) as u8),
        8080,
    )
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub fn run(plan: &Plan, lbctl: &Path) -> Result<Results> {
    let mut out = Results {
        apply: Vec::new(),
        maglev: Vec::new(),
        change: Vec::new(),
        rss: Vec::new(),
        events: Vec::new(),
        starts: Vec::new(),
    };
    let opts = lbctl::marathon::Options::default();
    for (i, n) in plan.apply_apps.iter().enumerate() {
        eprintln!("bench: control: derive and apply {n} apps");
        let text = doc::document(&apps(*n, plan.tasks_per_app));
        let table = super::lb_table(*n, BACKENDS, n * plan.tasks_per_app)?;
        let (mut derive, mut apply) = (Vec::new(), Vec::new());
        let mut services = 0;
        for rep in 0..plan.reps {
            let t = Instant::now();
            let (_, derived) = lbctl::marathon::derive(&text, "bench", &opts)?;
            derive.push(ms(t));
            ensure!(
                derived.problems.is_empty(),
                "{:?}",
                derived.problems.first()
            );
            services = derived.services.len();
            let pins = Pins::new(&format!("cp{i}-{rep}"));
            let _ebpf = lbctl::dataplane::load_with(&pins.dir, &table)?;
            let mut writer = lbctl::dataplane::Writer::open_made(&pins.dir)?;
            let t = Instant::now();
            let applied = writer.apply(&derived.services);
            apply.push(ms(t));
            ensure!(applied.failed.is_empty(), "{:?}", applied.failed.first());
            ensure!(applied.added.len() == services, "{applied:?}");
        }
        out.apply.push(ApplyResult {
            apps: *n,
            tasks_per_app: plan.tasks_per_app,
            services,
            derive_ms: Summary::of(&derive).context("no reps")?,
            apply_ms: Summary::of(&apply).context("no reps")?,
            ring_size: table.size,
        });
    }
    for size in &plan.maglev_sizes {
        for n in &plan.maglev_backends {
            let names: Vec<String> = (0..*n).map(|i| backend(i).to_string()).collect();
            let mut us = Vec::new();
            let start = Instant::now();
            while us.len() < 5 || (start.elapsed() < plan.maglev_time && us.len() < 10_000) {
                let t = Instant::now();
                let table = lbctl::maglev::table(&names, *size, lbctl::maglev::DEFAULT_SEED);
                us.push(t.elapsed().as_secs_f64() * 1e6);
                ensure!(table.len() == *size as usize, "a short table");
            }
            out.maglev.push(MaglevResult {
                backends: *n,
                table_size: *size,
                us: Summary::of(&us).context("no builds")?,
            });
        }
    }
    for n in plan.change_apps.iter().filter(|_| plan.changes > 0) {
        eprintln!(
            "bench: control: {} single-task changes in {n} apps",
            plan.changes
        );
        out.change.push(changes(plan, *n)?);
    }
    if plan.starts > 0 {
        eprintln!(
            "bench: control: {} starts of the agent, each way it runs",
            plan.starts
        );
        out.starts = start_times(plan.starts, lbctl)?;
    }
    for n in &plan.rss_apps {
        eprintln!("bench: control: the agent's memory with {n} apps");
        out.rss.push(agent_rss(*n, plan.tasks_per_app, lbctl)?);
    }
    for n in &plan.event_apps {
        eprintln!(
            "bench: control: {} task events through a fake Marathon of {n} apps",
            plan.event_changes
        );
        out.events.push(super::events::run(
            *n,
            plan.tasks_per_app,
            plan.event_changes,
            lbctl,
        )?);
    }
    Ok(out)
}

/// Applies a document with the agent's own reconciler, then documents that each move one task
/// of one app to a new address; each change is read back from the kernel maps.
fn changes(plan: &Plan, n: usize) -> Result<ChangeResult> {
    let opts = lbctl::marathon::Options::default();
    let pins = Pins::new("change");
    // Each change moves a task to an address no app has: a backend slot more each.
    let table = super::lb_table(n, BACKENDS + 2 * plan.changes, n * plan.tasks_per_app)?;
    let _ebpf = lbctl::dataplane::load_with(&pins.dir, &table)?;
    let mut writer = lbctl::dataplane::Writer::open(&pins.dir)?;
    let maps = lbctl::dataplane::Maps::open(&pins.dir)?;
    let mut apps = apps(n, plan.tasks_per_app);
    let mut sync = lbctl::agent::Sync::default();
    // The agent's source: the apps its reconciler holds are not read again.
    let cache = sync.cache().clone();
    let read = |text: String| -> Result<lbctl::marathon::Snapshot> {
        let mut snapshot = lbctl::marathon::Snapshot::parse_owned(text, "bench")?;
        snapshot.resolve_hosts_with(&SystemResolver, Some(&cache));
        Ok(snapshot)
    };
    sync.apply(&read(doc::document(&apps))?, &opts, &mut writer);
    let (mut reconcile, mut reading, mut merging, mut scratch, mut write) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut alone, mut alone_read, mut alone_write) = (Vec::new(), Vec::new(), Vec::new());
    let (mut verified, mut alone_verified) = (0, 0);
    // Addresses no app has: 198.19.20.2 onwards, one for each change of either kind.
    let fresh = |k: usize| {
        SocketAddrV4::new(
            Ipv4Addr::new(198, 19, 20 + (k / 250) as u8, (k % 250 + 2) as u8),
            8080,
        )
    };
    let in_kernel = |app: &doc::App, moved: SocketAddrV4| -> Result<bool> {
        let vip = lbctl::model::Vip {
            addr: app.vip,
            proto: lbctl::model::Proto::Tcp,
        };
        Ok(maps
            .read()?
            .services
            .get(&vip)
            .is_some_and(|s| s.backends.contains_key(&SocketAddr::V4(moved))))
    };
    for k in 0..plan.changes {
        // The app alone, as after an event naming it (another app than the document's change).
        let a = (k * 7919 + 13) % apps.len();
        let moved = fresh(plan.changes + k);
        apps[a].tasks[k % plan.tasks_per_app] = SocketAddr::V4(moved);
        let text = doc::app_document(&apps[a]);
        let start = Instant::now();
        let mut snapshot = lbctl::marathon::Snapshot::parse_owned(text, "bench")?;
        snapshot.resolve_hosts(&SystemResolver);
        alone_read.push(ms(start));
        let (_, applied) = sync
            .apply_app(&snapshot, &opts, &mut writer)
            .context("an app of the last document was refused")?;
        alone.push(ms(start));
        alone_write.push(writer.last_apply().as_secs_f64() * 1e3);
        ensure!(
            applied.changed.len() == 1 && applied.failed.is_empty(),
            "one task change of an app alone gave {applied:?}"
        );
        alone_verified += usize::from(in_kernel(&apps[a], moved)?);

        let a = (k * 7919) % apps.len();
        let t = k % plan.tasks_per_app;
        let moved = fresh(k);
        apps[a].tasks[t] = SocketAddr::V4(moved);
        let text = doc::document(&apps);
        // The agent's source hands over the text it fetched: no copy is timed.
        let owned = text.clone();
        let start = Instant::now();
        let snapshot = read(owned)?;
        reading.push(ms(start));
        let applying = Instant::now();
        let (_, applied) = sync.apply(&snapshot, &opts, &mut writer);
        reconcile.push(ms(start));
        let writer_ms = writer.last_apply().as_secs_f64() * 1e3;
        write.push(writer_ms);
        merging.push(ms(applying) - writer_ms);
        ensure!(
            applied.changed.len() == 1 && applied.failed.is_empty(),
            "one task change gave {applied:?}"
        );
        let start = Instant::now();
        lbctl::marathon::derive(&text, "bench", &opts)?;
        scratch.push(ms(start));
        verified += usize::from(in_kernel(&apps[a], moved)?);
        // Untimed, as the agent's loop does it whenever it has waited 100 ms for an update: the
        // periodic whole apply, when due (else an update pays for it after 120 s).
        sync.check_whole(Instant::now(), &opts, &mut writer);
    }
    Ok(ChangeResult {
        apps: n,
        changes: plan.changes,
        reconcile_ms: Summary::of(&reconcile).context("no changes")?,
        read_ms: Summary::of(&reading).context("no changes")?,
        merge_ms: Summary::of(&merging).context("no changes")?,
        scratch_ms: Summary::of(&scratch).context("no changes")?,
        write_ms: Summary::of(&write).context("no changes")?,
        verified,
        alone_ms: Summary::of(&alone).context("no changes")?,
        alone_read_ms: Summary::of(&alone_read).context("no changes")?,
        alone_write_ms: Summary::of(&alone_write).context("no changes")?,
        alone_verified,
    })
}

/// Runs the real `lbctl agent --apps FILE` in a namespace of its own until the kernel holds
/// every service it can and its interface's program is attached, then reads its VmRSS and VmHWM.
fn agent_rss(n: usize, tasks: usize, lbctl: &Path) -> Result<RssResult> {
    let lab = AgentLab::new(&format!("rss{n}"))?;
    let (pins, dir) = (&lab.pins, &lab.dir);
    let file = dir.join("apps.json");
    std::fs::write(&file, doc::document(&apps(n, tasks)))?;
    let table = super::lb_table(n, BACKENDS, n * tasks)?;
    let start = Instant::now();
    let mut agent = lab.agent(
        lbctl,
        &["--apps".into(), file.display().to_string()],
        &table,
        "warn",
    )?;
    let want = n;
    let mut have = 0;
    let (mut last_ms, mut serve_ms) = (0.0, 0.0);
    // The writer writes services in VIP order, each after its memberships and table: the last
    // one is checked every 10 ms (a few map lookups, which take next to no CPU from the agent),
    // and only once it is served is every service read back (tens of thousands of system calls
    // at 10,000 services, which would otherwise compete with the agent for the CPUs all along).
    // When that read finds them all, the time the last one was seen is when all were served;
    // the time after the read is kept too, as an upper bound that assumes no order.
    let last = apps(n, tasks)
        .iter()
        .map(|a| lbctl::model::Vip {
            addr: a.vip,
            proto: lbctl::model::Proto::Tcp,
        })
        .max()
        .context("no apps")?;
    let mut maps = None;
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(status) = agent.0.try_wait()? {
            bail!(
                "the agent exited ({status}): {}",
                std::fs::read_to_string(lab.log()).unwrap_or_default()
            );
        }
        if maps.is_none() {
            maps = lbctl::dataplane::Maps::open(&pins.dir).ok();
        }
        if let Some(m) = &maps
            && matches!(m.pick_slot(&last, 0), Ok(Some(_)))
            && attached(&pins.dir, false)
        {
            let seen = ms(start);
            if let Ok(state) = m.read() {
                have = state.services.len();
                if have == want {
                    last_ms = seen;
                    serve_ms = ms(start);
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(
        have == want,
        "the agent applied {have} of {want} services in 120 s"
    );
    // Let it finish what follows the last write (its status, the failures it reports).
    std::thread::sleep(Duration::from_millis(500));
    let pid = agent.0.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(
        comm.trim() == "lbctl",
        "process {pid} is {comm:?}, not the agent"
    );
    let vm_rss_kb = sys::status_kb(pid, "VmRSS").context("VmRSS")?;
    let vm_hwm_kb = sys::status_kb(pid, "VmHWM").context("VmHWM")?;
    drop(agent);
    drop(lab);
    Ok(RssResult {
        apps: n,
        services_in_kernel: have,
        last_ms,
        serve_ms,
        vm_rss_kb,
        vm_hwm_kb,
    })
}

/// Whether the agent's programs run on the data plane pinned in `dir`: its interface's (`lbv`)
/// link is pinned, or (`local`) every program of the local path's is. An agent starting on a fresh
/// data plane writes its first document while the kernel verifies the programs, so a service in
/// the maps alone is not yet served.
fn attached(dir: &Path, local: bool) -> bool {
    if local {
        lbtest::local_path_linked(dir)
    } else {
        lbtest::ifaces_linked(dir, &["lbv".to_string()])
    }
}

/// The ways the agent runs that `start_times` starts: a name, the packet programs it loads, and
/// whether it serves the local path (else an interface, which the veth's TC hook serves).
const START_KINDS: [(&str, &str, bool); 2] = [
    ("`--iface lbv` (a veth: TC)", "TC", false),
    ("`--local --cgroup C` (the local path alone)", "none", true),
];

/// The real agent started `rounds` times each way (`START_KINDS`, alternating, each in a fresh
/// namespace and pin directory; the local one with a child cgroup of its own), with a document
/// of one app: time from starting the process to its service being served (its table slot
/// found in the kernel maps and its programs attached, checked every 2 ms).
fn start_times(rounds: usize, lbctl: &Path) -> Result<Vec<StartResult>> {
    let apps = apps(1, 5);
    let vip = lbctl::model::Vip {
        addr: apps[0].vip,
        proto: lbctl::model::Proto::Tcp,
    };
    let table = lbctl::dataplane::TableConfig::default();
    let mut ms_of: Vec<Vec<f64>> = vec![Vec::new(); START_KINDS.len()];
    for round in 0..rounds {
        for (k, (_, _, local)) in START_KINDS.iter().enumerate() {
            let lab = AgentLab::new(&format!("start{round}{k}"))?;
            let file = lab.dir.join("apps.json");
            std::fs::write(&file, doc::document(&apps))?;
            let cgroup = local.then(|| lbtest::local_lab::TestCgroup::new("bench-start"));
            let mut args = vec!["--apps".to_string(), file.display().to_string()];
            match &cgroup {
                Some(c) => args.extend([
                    "--local".into(),
                    "--cgroup".into(),
                    c.0.display().to_string(),
                ]),
                None => args.extend(["--iface".into(), "lbv".into()]),
            }
            let start = Instant::now();
            let mut agent = lab.spawn(lbctl, &args, &table, "warn")?;
            let mut served = None;
            while start.elapsed() < Duration::from_secs(30) {
                if let Some(status) = agent.0.try_wait()? {
                    bail!(
                        "the agent exited ({status}): {}",
                        std::fs::read_to_string(lab.log()).unwrap_or_default()
                    );
                }
                if let Ok(m) = lbctl::dataplane::Maps::open(&lab.pins.dir)
                    && matches!(m.pick_slot(&vip, 0), Ok(Some(_)))
                    && attached(&lab.pins.dir, *local)
                {
                    served = Some(ms(start));
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let served = served.context("the agent did not serve its app in 30 s")?;
            ms_of[k].push(served);
            // The agent, then its pins and links, then the cgroup they were attached to.
            drop(agent);
            drop(lab);
            drop(cgroup);
        }
    }
    START_KINDS
        .iter()
        .zip(ms_of)
        .map(|((kind, programs, _), ms)| {
            Ok(StartResult {
                kind,
                programs,
                ms: Summary::of(&ms).context("no starts")?,
            })
        })
        .collect()
}

/// A namespace of its own for a real agent: a veth pair (`lbv`, `lbvp`) to attach to, a pin
/// directory, and a scratch directory (its log, `agent.log`); all removed on drop.
pub struct AgentLab {
    // Dropped in this order, after the agent: the pins, then the namespace.
    pub pins: Pins,
    pub ns: Netns,
    pub dir: std::path::PathBuf,
}

impl AgentLab {
    pub fn new(tag: &str) -> Result<AgentLab> {
        let ns = Netns::new(tag)?;
        let n = ns.name.as_str();
        sys::run(&[
            "ip", "-n", n, "link", "add", "lbv", "type", "veth", "peer", "name", "lbvp",
        ])?;
        for dev in ["lbv", "lbvp", "lo"] {
            sys::run(&["ip", "-n", n, "link", "set", dev, "up"])?;
        }
        let dir = std::env::temp_dir().join(sys::name(tag));
        std::fs::create_dir_all(&dir)?;
        Ok(AgentLab {
            pins: Pins::new(tag),
            ns,
            dir,
        })
    }

    pub fn log(&self) -> std::path::PathBuf {
        self.dir.join("agent.log")
    }

    /// Starts `lbctl agent` in the namespace with `source` (its flags), attached to the veth,
    /// sized for `table`, logging at `level` to `log()`.
    pub fn agent(
        &self,
        lbctl: &Path,
        source: &[String],
        table: &lbctl::dataplane::TableConfig,
        level: &str,
    ) -> Result<Agent> {
        let mut args = source.to_vec();
        args.extend(["--iface".into(), "lbv".into()]);
        self.spawn(lbctl, &args, table, level)
    }

    /// `agent` with `args` in place of the source and the interface.
    pub fn spawn(
        &self,
        lbctl: &Path,
        args: &[String],
        table: &lbctl::dataplane::TableConfig,
        level: &str,
    ) -> Result<Agent> {
        let log = std::fs::File::create(self.log())?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name))
            .arg(lbctl)
            .arg("agent")
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pins.dir)
            .args(super::agent_flags(table))
            .env("LBCTL_LOG", level)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lbctl agent")?;
        Ok(Agent(child))
    }
}

impl Drop for AgentLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process, stopped with SIGTERM (then SIGKILL) on drop.
pub struct Agent(pub std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
