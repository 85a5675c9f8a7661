//! `cargo xtask bench [--quick] [--json FILE]`: this project measured next to baselines in one
//! run, written to BENCHMARKS.md with the machine, the date and the command line.
//!
//! 1. `xdp`: per-packet cost with BPF_PROG_TEST_RUN, against the trivial `lb_floor`, at sizes from
//!    one VIP to 100,000 services; kernel memory of the maps.
//! 2. `control`: derive and apply, Maglev tables, one task change to the kernel, agent memory.
//! 3. `e2e`: the same load generator against this project, iptables (kube-proxy style), nftables
//!    and plain routing, in network namespaces.
//!
//! The user-space parts (control plane, load generator) are measured in a release build: a debug
//! `cargo xtask` builds `xtask` and `lbctl` with `--release` and runs that build.
mod control;
mod dns;
mod doc;
mod e2e;
mod events;
mod hooks;
mod katran;
mod katran_obj;
mod live;
mod load;
mod local;
mod packet;
mod paired;
mod report;
mod stats;
mod sys;
mod xdp;

use anyhow::{Context as _, Result, bail};
use e2e::Contender;
use lbctl::dataplane::TableConfig;
use serde::Serialize;
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// Set in the release build's environment by the debug one that starts it.
const CHILD: &str = "XTASK_BENCH_RELEASE";

pub struct Options {
    pub quick: bool,
    pub json: Option<PathBuf>,
    /// Only this section: "xdp", "control", "e2e", "dns", "local" or "hooks".
    pub only: Option<String>,
}

impl Options {
    /// The command line as a user types it.
    pub fn command_line(&self) -> String {
        let mut s = "cargo xtask bench".to_string();
        if self.quick {
            s.push_str(" --quick");
        }
        if let Some(j) = &self.json {
            s.push_str(&format!(" --json {}", j.display()));
        }
        if let Some(o) = &self.only {
            s.push_str(&format!(" --only {o}"));
        }
        s
    }

    fn runs(&self, section: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == section)
    }
}

/// True in the release build started by `run` (setup and build are done).
pub fn is_release_child() -> bool {
    std::env::var_os(CHILD).is_some() && !cfg!(debug_assertions)
}

/// Builds `xtask` and `lbctl` in release and runs the bench there.
pub fn run(ws: &Path, opts: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench creates network namespaces and loads BPF: run it as root");
    }
    if !cfg!(debug_assertions) {
        return bench(ws, opts);
    }
    eprintln!("xtask: building the release build the bench measures");
    super::run(Command::new("cargo").current_dir(ws).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "-p",
        "lbctl",
        "-p",
        "tests",
        "--features",
        "xtask/lab",
    ]))?;
    let mut cmd = Command::new(ws.join("target/release/xtask"));
    cmd.arg("bench").env(CHILD, "1");
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(j) = &opts.json {
        cmd.arg("--json").arg(std::path::absolute(j)?);
    }
    if let Some(o) = &opts.only {
        cmd.args(["--only", o]);
    }
    super::run(&mut cmd)
}

#[derive(Serialize)]
pub struct Report {
    pub command: String,
    pub quick: bool,
    pub machine: sys::Machine,
    pub seconds: f64,
    pub xdp: Section<xdp::Results>,
    pub control: Section<control::Results>,
    pub e2e: Section<e2e::Results>,
    pub dns: Section<dns::Results>,
    pub local: Section<local::Results>,
    pub hooks: Section<hooks::Results>,
    pub katran: Section<katran::Results>,
    pub live: Section<live::Results>,
}

#[derive(Serialize)]
pub struct Section<T> {
    pub seconds: f64,
    pub result: Option<T>,
    pub error: Option<String>,
}

fn section<T>(what: &str, run: bool, f: impl FnOnce() -> Result<T>) -> Section<T> {
    if !run {
        return Section {
            seconds: 0.0,
            result: None,
            error: None,
        };
    }
    eprintln!("bench: == {what}");
    let t = Instant::now();
    let r = f();
    let seconds = t.elapsed().as_secs_f64();
    eprintln!("bench: {what} took {seconds:.0} s");
    match r {
        Ok(v) => Section {
            seconds,
            result: Some(v),
            error: None,
        },
        Err(e) => {
            eprintln!("bench: {what} FAILED: {e:#}");
            Section {
                seconds,
                result: None,
                error: Some(format!("{e:#}")),
            }
        }
    }
}

fn bench(ws: &Path, opts: &Options) -> Result<()> {
    let start = Instant::now();
    let lbctl = ws.join("target/release/lbctl");
    if !lbctl.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p lbctl`",
            lbctl.display()
        );
    }
    // SAFETY: no other thread runs yet; lbtest reads the variable to find the agent.
    unsafe { std::env::set_var("LBCTL_BIN", &lbctl) };
    std::env::set_current_dir(ws)?;
    sys::remove_leftovers();
    let machine = sys::machine();
    if let Some(o) = &opts.only
        && ![
            "xdp", "control", "e2e", "dns", "local", "hooks", "katran", "live",
        ]
        .contains(&o.as_str())
    {
        bail!("--only takes xdp, control, e2e, dns, local, hooks, katran or live, not {o}");
    }
    let q = opts.quick;
    let xdp = section(
        "per-packet cost (BPF_PROG_TEST_RUN)",
        opts.runs("xdp"),
        || xdp::run(xdp_plan(q)),
    );
    let control = section("control plane", opts.runs("control"), || {
        control::run(&control_plan(q), &lbctl)
    });
    let e2e = section("end to end in namespaces", opts.runs("e2e"), || {
        e2e::run(&e2e_plan(q))
    });
    let dns = section("DNS server", opts.runs("dns"), || dns::run(&dns_plan(q)));
    let local = section("local path (socket level)", opts.runs("local"), || {
        local::run(&local_plan(q))
    });
    let hooks = section("end to end by hook", opts.runs("hooks"), || {
        hooks::run(&hooks_plan(q))
    });
    let katran = section("beside Katran", opts.runs("katran"), || {
        katran::run(ws, katran_plan(q))
    });
    let live = section("live frames", opts.runs("live"), || {
        live::run(live::Plan {
            rounds: if q { 2 } else { 5 },
            frames: if q { 100_000 } else { 2_000_000 },
            batch: 64,
        })
    });
    let report = Report {
        command: opts.command_line(),
        quick: q,
        machine,
        seconds: start.elapsed().as_secs_f64(),
        xdp,
        control,
        e2e,
        dns,
        local,
        hooks,
        katran,
        live,
    };
    let text = report::markdown(&report);
    let out_dir = ws.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let name = match (&opts.only, q) {
        (Some(o), _) => format!("BENCHMARKS.{o}.md"),
        (None, true) => "BENCHMARKS.quick.md".into(),
        (None, false) => "BENCHMARKS.md".into(),
    };
    let path = out_dir.join(name);
    std::fs::write(&path, &text)?;
    if let Some(j) = &opts.json {
        std::fs::write(j, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    let failed: Vec<&str> = [
        ("xdp", report.xdp.error.is_some()),
        ("control", report.control.error.is_some()),
        ("e2e", report.e2e.error.is_some()),
        ("dns", report.dns.error.is_some()),
        ("local", report.local.error.is_some()),
        ("hooks", report.hooks.error.is_some()),
        ("katran", report.katran.error.is_some()),
        ("live", report.live.error.is_some()),
    ]
    .iter()
    .filter(|(_, f)| *f)
    .map(|(n, _)| *n)
    .collect();
    if !failed.is_empty() {
        bail!(
            "bench sections failed: {failed:?}; the report is in {} (BENCHMARKS.md left as it was)",
            path.display()
        );
    }
    if !q && opts.only.is_none() {
        std::fs::write(ws.join("BENCHMARKS.md"), &text)?;
        eprintln!("bench: wrote BENCHMARKS.md");
    } else {
        eprintln!("bench: wrote {}", path.display());
    }
    eprintln!("bench: finished in {:.0?}", start.elapsed());
    Ok(())
}

fn xdp_plan(quick: bool) -> xdp::Plan {
    use xdp::Size;
    let s = |services, backends| Size { services, backends };
    if quick {
        return xdp::Plan {
            sizes: vec![s(3, 1), s(16, 5)],
            rounds: 5,
            batch: 300,
            repeat: 1000,
        };
    }
    xdp::Plan {
        sizes: vec![
            s(3, 1),
            s(3, 10),
            s(3, 100),
            s(3, 1000),
            s(1000, 5),
            s(1000, 60),
            s(10_000, 5),
            s(100_000, 5),
        ],
        rounds: 7,
        batch: 10_000,
        repeat: 10_000,
    }
}

fn katran_plan(quick: bool) -> katran::Plan {
    katran::Plan {
        rounds: if quick { 2 } else { 5 },
        packets: if quick { 2000 } else { 50_000 },
        flows: if quick { 1000 } else { 10_000 },
        build: !quick,
    }
}

fn dns_plan(quick: bool) -> dns::Plan {
    dns::Plan {
        names: if quick { 50 } else { 1000 },
        clients: 2,
        duration: Duration::from_secs(if quick { 1 } else { 5 }),
        map_lookups: if quick { 10_000 } else { 1_000_000 },
    }
}

fn control_plan(quick: bool) -> control::Plan {
    if quick {
        return control::Plan {
            apply_apps: vec![100],
            tasks_per_app: 5,
            reps: 2,
            maglev_backends: vec![10, 100],
            maglev_sizes: vec![lb_common::DEFAULT_RING_SIZE],
            maglev_time: Duration::from_millis(100),
            change_apps: vec![100],
            changes: 10,
            rss_apps: vec![10],
            starts: 1,
            event_apps: vec![100],
            event_changes: 10,
        };
    }
    control::Plan {
        apply_apps: vec![1000, 10_000],
        tasks_per_app: 5,
        reps: 5,
        maglev_backends: vec![10, 100, 1000],
        maglev_sizes: vec![lb_common::DEFAULT_RING_SIZE, lb_common::MAX_RING_SIZE],
        maglev_time: Duration::from_secs(1),
        change_apps: vec![1000, 10_000],
        changes: 200,
        rss_apps: vec![1, 1000, 10_000, 100_000],
        starts: 5,
        event_apps: vec![1000, 10_000],
        // Enough for a p99 that is not the second slowest change.
        event_changes: 300,
    }
}

/// The data plane this project is measured with when it holds `services` services of
/// `memberships` (service, backend) pairs over `backends` distinct backends: the defaults where they
/// suffice, else just enough (services and backends rounded up to a multiple of 1024). The Maglev
/// tables keep the default 16,381 slots up to 10,000 services and have 4,093 above, which keeps
/// 100,000 services at 3 GiB of tables (section 2 says so next to the numbers).
pub fn lb_table(services: usize, backends: usize, memberships: usize) -> Result<TableConfig> {
    let up = |n: usize, default: u32| (n.div_ceil(1024) * 1024).max(default as usize) as u32;
    let ring = if services > 10_240 {
        LARGE_RING_SIZE
    } else {
        lb_common::DEFAULT_RING_SIZE
    };
    TableConfig::new(ring, lbctl::maglev::DEFAULT_SEED)
        .and_then(|t| {
            t.with_capacity(
                up(services, lb_common::DEFAULT_MAX_SERVICES),
                up(backends, lb_common::DEFAULT_MAX_BACKENDS),
                up(memberships, lb_common::DEFAULT_MAX_MEMBERS),
            )
        })
        .map_err(anyhow::Error::msg)
}

/// The ring size of the largest configurations.
pub const LARGE_RING_SIZE: u32 = 4093;

/// `lbctl agent` flags for the data plane `t`.
pub fn agent_flags(t: &TableConfig) -> Vec<String> {
    [
        ("--ring-size", t.size),
        ("--max-services", t.services),
        ("--max-backends", t.backends),
        ("--max-members", t.members),
    ]
    .iter()
    .flat_map(|(f, v)| [f.to_string(), v.to_string()])
    .collect()
}

fn local_plan(quick: bool) -> local::Plan {
    if quick {
        return local::Plan {
            services: vec![1],
            rounds: 1,
            seconds: 1,
            connects: 20_000,
        };
    }
    local::Plan {
        services: vec![1, 10_000],
        rounds: 7,
        seconds: 2,
        connects: 200_000,
    }
}

fn hooks_plan(quick: bool) -> hooks::Plan {
    use hooks::Path::*;
    if quick {
        let configs = [Direct, Tc, Xdp, Iptables, Nftables].map(|p| (p, 1));
        return hooks::Plan {
            configs: configs.to_vec(),
            load: e2e::Plan {
                backends: 2,
                duration: Duration::from_millis(300),
                ..e2e_plan(true)
            },
        };
    }
    let both = [Tc, Xdp, Iptables, Nftables].map(|p| [(p, 1), (p, 10_000)]);
    let configs = [(Direct, 1), (DirectTuned, 1)]
        .into_iter()
        .chain(both.into_iter().flatten())
        .collect();
    hooks::Plan {
        configs,
        load: e2e::Plan {
            rounds: 2,
            duration: Duration::from_millis(1500),
            ..e2e_plan(false)
        },
    }
}

fn e2e_plan(quick: bool) -> e2e::Plan {
    use Contender::*;
    let one = [Direct, Lb, IptablesNft, IptablesLegacy, Nftables].map(|c| (c, 1));
    if quick {
        return e2e::Plan {
            configs: one.to_vec(),
            rounds: 1,
            backends: 4,
            duration: Duration::from_millis(500),
            cps_threads: 4,
            rps_threads: 8,
            iperf_secs: 1,
            iperf_omit: 0,
        };
    }
    let many = [
        (Lb, 10_000),
        (IptablesNft, 10_000),
        (IptablesLegacy, 10_000),
        (Nftables, 10_000),
    ];
    e2e::Plan {
        configs: one.into_iter().chain(many).collect(),
        rounds: 5,
        backends: 4,
        duration: Duration::from_secs(2),
        cps_threads: 4,
        rps_threads: 8,
        iperf_secs: 2,
        iperf_omit: 1,
    }
}
