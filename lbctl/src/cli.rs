//! The command line: one subcommand enum, each command a function of the library.
use crate::{
    agent,
    config::Settings,
    dataplane::{self, Maps},
    error::Error,
    marathon::{self, Cidr, Options},
    model::Desired,
    status,
};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::json;
use std::{
    io::Read as _,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

#[derive(Parser, Debug)]
#[command(
    name = "lbctl",
    version,
    about = "XDP layer-4 load balancer for Marathon VIPs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PinArgs {
    /// Where the data plane's maps and links are pinned.
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DeriveArgs {
    /// Allowed range for IP VIPs (repeatable); replaces the defaults
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and fc00::/7.
    #[arg(long = "vip-range", value_name = "CIDR")]
    pub vip_ranges: Vec<Cidr>,
}

impl DeriveArgs {
    fn options(&self) -> Options {
        let mut o = Options::default();
        if !self.vip_ranges.is_empty() {
            o.vip_ranges = self.vip_ranges.clone();
        }
        o
    }
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// A TOML file with any of the settings below (see examples/agent.toml); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets hidden) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// A `GET /v2/apps?embed=apps.tasks` body on disk, followed as it changes.
    #[arg(long)]
    pub apps: Option<PathBuf>,
    /// A Marathon base URL (repeatable; tried in order).
    #[arg(long)]
    pub marathon: Vec<String>,
    /// An interface to load balance on (repeatable).
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
    /// Where the data plane's maps and links are pinned [default: /sys/fs/bpf/lb].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Allowed range for IP VIPs (repeatable); replaces the defaults.
    #[arg(long = "vip-range", value_name = "CIDR")]
    pub vip_ranges: Vec<String>,
    /// How often to check --apps for changes, in ms [default: 250].
    #[arg(long)]
    pub poll_ms: Option<u64>,
    /// Full Marathon snapshot interval, in s [default: 30].
    #[arg(long)]
    pub resync_secs: Option<u64>,
    /// Quiet time after a Marathon event before fetching, in ms [default: 500].
    #[arg(long)]
    pub debounce_ms: Option<u64>,
    /// PEM CA certificates for an HTTPS Marathon.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The status socket [default: /run/lb/agent.sock].
    #[arg(long)]
    pub status_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDRESS:PORT (off by default).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub table: TableArgs,
    /// Relay the data plane's per-packet debug log (needs a build with `--features bpf-log`).
    #[arg(long)]
    pub bpf_log: bool,
}

/// The Maglev tables: every agent of a cluster must use the same size and seed.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TableArgs {
    /// Slots of each service's Maglev table: a prime up to 131071 [default: 16381].
    #[arg(long)]
    pub ring_size: Option<u32>,
    /// The Maglev seed [default: built in].
    #[arg(long)]
    pub maglev_seed: Option<u64>,
    /// Tracked flows per direction and family [default: 262144].
    #[arg(long)]
    pub flow_table_size: Option<u32>,
    /// Services the data plane can hold [default: 1024]. Each takes 2 x ring size x 4 bytes of
    /// kernel memory (128 KiB at the default ring size).
    #[arg(long)]
    pub max_services: Option<u32>,
    /// Distinct backends (address, port) the data plane can hold [default: 4096].
    #[arg(long)]
    pub max_backends: Option<u32>,
    /// (service, backend) memberships the data plane can hold [default: 65536].
    #[arg(long)]
    pub max_members: Option<u32>,
}

impl TableArgs {
    fn settings(&self) -> Settings {
        Settings {
            ring_size: self.ring_size,
            maglev_seed: self.maglev_seed,
            flow_table_size: self.flow_table_size,
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_members: self.max_members,
            ..Default::default()
        }
    }
}

impl AgentArgs {
    fn settings(&self) -> crate::Result<Settings> {
        let file = match &self.config {
            Some(p) => Settings::from_file(p)?,
            None => Settings::default(),
        };
        Ok(file.overridden_by(Settings {
            apps: self.apps.clone(),
            marathon: self.marathon.clone(),
            iface: self.ifaces.clone(),
            pin_dir: self.pin_dir.clone(),
            vip_range: self.vip_ranges.clone(),
            poll_ms: self.poll_ms,
            resync_secs: self.resync_secs,
            debounce_ms: self.debounce_ms,
            ca_file: self.ca_file.clone(),
            status_socket: self.status_socket.clone(),
            metrics_listen: self.metrics_listen.clone(),
            ring_size: self.table.ring_size,
            maglev_seed: self.table.maglev_seed,
            flow_table_size: self.table.flow_table_size,
            max_services: self.table.max_services,
            max_backends: self.table.max_backends,
            max_members: self.table.max_members,
            bpf_log: self.bpf_log.then_some(true),
            ..Default::default()
        }))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent in the foreground: attach XDP to the interfaces and serve the VIPs of
    /// Marathon's apps, following their changes, until SIGINT or SIGTERM.
    Agent(Box<AgentArgs>),
    /// Show the services and backends in the kernel now.
    List {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show the agent's state: source, last sync, errors, interfaces, program, problems count.
    Status {
        #[command(flatten)]
        pin: PinArgs,
        /// The agent's status socket [default: derived from --pin-dir].
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show the problems the agent found in Marathon's data.
    Problems {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show the data plane's counters; with --watch, their rates every --interval seconds.
    Stats {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(long)]
        json: bool,
        /// Print rates per second, every --interval, --count times (0: until interrupted).
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Show the tracked flows: client, VIP, backend.
    Flows {
        #[command(flatten)]
        pin: PinArgs,
        /// Only the flows of this VIP (ADDRESS:PORT).
        #[arg(long)]
        vip: Option<String>,
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// At most this many flows.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show which backend a new flow would reach, with the kernel's own table.
    Simulate {
        /// The VIP, ADDRESS:PORT.
        #[arg(long)]
        vip: String,
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// The client, ADDRESS:PORT (`[v6]:PORT` for an IPv6 VIP).
        #[arg(long)]
        src: std::net::SocketAddr,
        /// Compute from this Marathon document instead of the kernel (no root needed), with the
        /// table settings below.
        #[arg(long)]
        apps: Option<PathBuf>,
        #[command(flatten)]
        table: TableArgs,
        #[command(flatten)]
        derive: DeriveArgs,
        #[command(flatten)]
        pin: PinArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show the services a Marathon document yields (no root, no kernel needed).
    Render {
        /// The document; `-` or nothing reads standard input.
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        derive: DeriveArgs,
    },
    /// Detach the data plane and remove everything pinned.
    Down {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(long)]
        json: bool,
    },
}

/// Exit codes: 0 success, 1 failure, 2 (simulate) no backend, 3 no data plane pinned or no agent
/// running, 4 not permitted, 5 (status) the agent runs but never got a Marathon state.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            match e.downcast_ref::<Error>() {
                Some(Error::NotRunning(_) | Error::AgentNotRunning(_)) => ExitCode::from(3),
                Some(Error::NotPermitted(_)) => ExitCode::from(4),
                _ => ExitCode::from(1),
            }
        }
    }
}

fn init_tracing() {
    // The data plane's own records (builds with `bpf-log` only) are wanted whenever relayed.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LBCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive("lb_ebpf=debug".parse().expect("a valid directive"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => {
            let settings = args.settings()?;
            if args.print_config {
                print!("{}", settings.to_toml_redacted());
                return Ok(ExitCode::SUCCESS);
            }
            let cfg = settings.agent_config()?;
            let shutdown = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, shutdown.clone())
                    .context("installing signal handlers")?;
            }
            agent::run(&cfg, shutdown)?;
        }
        Command::List { pin, json } => {
            let maps = Maps::open(&pin.pin_dir)?;
            let views = maps.views()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "services": views }))?
                );
            } else {
                print!("{}", list_table(&views));
            }
        }
        Command::Status { pin, socket, json } => {
            let path = socket.unwrap_or_else(|| status::default_socket_for(&pin.pin_dir));
            let st = status::query(&path)?;
            let kernel =
                Maps::open(&pin.pin_dir).and_then(|m| Ok((m.read()?, m.stats()?, m.table()?)));
            if json {
                let kernel = match &kernel {
                    Ok((state, stats, table)) => json!({
                        "services": state.services.len(),
                        "in_use": state.usage(),
                        "sizes": table,
                        "table_bytes": table.ring_bytes(),
                        "counters": stats.iter().map(|(s, v)| (s.name().to_string(), json!(v)))
                            .collect::<serde_json::Map<String, serde_json::Value>>(),
                    }),
                    Err(e) => json!({ "error": e.to_string() }),
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "agent": st, "kernel": kernel }))?
                );
            } else {
                print!("{}", status_text(&st));
                match &kernel {
                    Ok((state, _, table)) => {
                        print!("{}", kernel_text(&state.usage(), table, &pin.pin_dir))
                    }
                    Err(e) => println!("kernel:        {e}"),
                }
            }
            if st.last_error.is_some() && st.last_sync.is_none() {
                // Running, but it never got a state: say so in the exit code too.
                return Ok(ExitCode::from(5));
            }
        }
        Command::Problems { pin, socket, json } => {
            let path = socket.unwrap_or_else(|| status::default_socket_for(&pin.pin_dir));
            let st = status::query(&path)?;
            // Services the document asked for that the data plane could not take (full, or a
            // failed write): they keep what they had.
            let not_applied: &[String] = st.last_apply.as_ref().map_or(&[], |a| &a.failed);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({ "problems": st.problems, "not_applied": not_applied })
                    )?
                );
            } else if st.problems.is_empty() && not_applied.is_empty() {
                println!("no problems in the last document");
            } else {
                for p in &st.problems {
                    println!("{p}");
                }
                for s in not_applied {
                    println!("not applied (keeps what it had): {s}");
                }
            }
        }
        Command::Stats {
            pin,
            json,
            watch: true,
            interval,
            count,
        } => {
            let maps = Maps::open(&pin.pin_dir)?;
            watch_stats(&maps, json, interval, count)?;
        }
        Command::Flows {
            pin,
            vip,
            proto,
            limit,
            json,
        } => {
            let vip = match vip {
                Some(v) => Some(dataplane::parse_vip(&v, &proto).map_err(anyhow::Error::msg)?),
                None => None,
            };
            let flows = Maps::open(&pin.pin_dir)?.flows(vip.as_ref(), limit)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "flows": flows }))?
                );
            } else {
                println!(
                    "{:<5} {:<22} {:<22} {:<22} State",
                    "Prot", "Client", "VirtualAddress", "Backend"
                );
                for f in &flows {
                    println!(
                        "{:<5} {:<22} {:<22} {:<22} {}",
                        f.protocol.name().to_uppercase(),
                        f.client,
                        f.vip,
                        f.backend
                            .as_deref()
                            .unwrap_or("(gone: moves on next packet)"),
                        f.backend_state.as_deref().unwrap_or("-")
                    );
                }
                println!("{} flow(s)", flows.len());
            }
        }
        Command::Stats { pin, json, .. } => {
            let maps = Maps::open(&pin.pin_dir)?;
            let stats = maps.stats()?;
            if json {
                let mut obj: serde_json::Map<String, serde_json::Value> = stats
                    .iter()
                    .map(|(s, v)| (s.name().to_string(), json!(v)))
                    .collect();
                obj.insert("flows_lost".into(), json!(maps.flows_lost()?));
                println!("{}", serde_json::to_string_pretty(&obj)?);
            } else {
                for (s, v) in stats {
                    println!("{:<20} {v:<7} {}", s.name(), stat_meaning(s));
                }
                println!(
                    "{:<20} {:<7} established TCP segments that found no flow entry (evicted while alive)",
                    "flows_lost",
                    maps.flows_lost()?
                );
            }
        }
        Command::Simulate {
            vip,
            proto,
            src,
            apps,
            table,
            derive,
            pin,
            json,
        } => {
            let vip = dataplane::parse_vip(&vip, &proto).map_err(anyhow::Error::msg)?;
            let picked = match apps {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| Error::Read {
                        path: path.clone(),
                        source: e,
                    })?;
                    let derived = marathon::desired_state(
                        &text,
                        &path.display().to_string(),
                        &derive.options(),
                        &marathon::SystemResolver,
                    )?;
                    let table = table.settings().table()?;
                    derived
                        .services
                        .get(&vip)
                        .and_then(|s| dataplane::predict(s, src, &table))
                }
                None => Maps::open(&pin.pin_dir)?.pick(&vip, src)?,
            };
            if json {
                let backend = picked.map(|b| b.to_string());
                println!(
                    "{}",
                    json!({"vip": vip.addr.to_string(), "protocol": vip.proto, "client": src.to_string(), "backend": backend})
                );
            } else if let Some(b) = picked {
                println!("{b}");
            } else {
                println!("no backend: {vip} is not served or has no active backend");
            }
            if picked.is_none() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Render { file, json, derive } => {
            let (text, what) = match file.as_deref() {
                None => (read_stdin()?, "standard input".to_string()),
                Some(p) if p.as_os_str() == "-" => (read_stdin()?, "standard input".to_string()),
                Some(p) => (
                    std::fs::read_to_string(p).map_err(|e| Error::Read {
                        path: p.to_path_buf(),
                        source: e,
                    })?,
                    p.display().to_string(),
                ),
            };
            let derived = marathon::desired_state(
                &text,
                &what,
                &derive.options(),
                &marathon::SystemResolver,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&render_json(&derived))?);
            } else {
                print!("{}", render_table(&derived));
            }
        }
        Command::Down { pin, json } => {
            let removed = dataplane::down(&pin.pin_dir)?;
            if json {
                println!("{}", serde_json::to_string(&removed)?);
            } else if removed.links.is_empty() && removed.maps.is_empty() {
                println!("nothing was pinned at {}", pin.pin_dir.display());
            } else {
                println!(
                    "detached from {} interface(s) [{}], removed {} map(s) from {}",
                    removed.links.len(),
                    removed.links.join(", "),
                    removed.maps.len(),
                    pin.pin_dir.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lbctl stats --watch`: per-second rates of every counter, every `interval` seconds.
fn watch_stats(maps: &Maps, json: bool, interval: f64, count: u64) -> anyhow::Result<()> {
    let interval = std::time::Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
    let mut last = maps.stats()?;
    let mut t = std::time::Instant::now();
    let mut n = 0;
    while count == 0 || n < count {
        std::thread::sleep(interval);
        let now = maps.stats()?;
        let secs = t.elapsed().as_secs_f64();
        t = std::time::Instant::now();
        let rates: Vec<(&str, f64)> = now
            .iter()
            .zip(&last)
            .map(|((s, v), (_, old))| (s.name(), v.saturating_sub(*old) as f64 / secs))
            .collect();
        if json {
            let obj: serde_json::Map<String, serde_json::Value> = rates
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            println!("{}", serde_json::Value::Object(obj));
        } else {
            let busy: Vec<String> = rates
                .iter()
                .filter(|(_, v)| *v > 0.0)
                .map(|(k, v)| format!("{k} {v:.0}/s"))
                .collect();
            println!(
                "{}",
                if busy.is_empty() {
                    "idle".to_string()
                } else {
                    busy.join("  ")
                }
            );
        }
        last = now;
        n += 1;
    }
    Ok(())
}

/// The agent's status for people.
/// What a counter of `lbctl stats` counts, in a line.
pub fn stat_meaning(s: lb_common::Stat) -> &'static str {
    use lb_common::Stat;
    match s {
        Stat::PassNotOurs => "packets neither for a VIP nor a reply: passed untouched",
        Stat::NewFlow => "new flows given a backend",
        Stat::Forwarded => "packets of tracked flows sent to their backend",
        Stat::Reply => "replies rewritten to come from the VIP",
        Stat::RewrittenToStack => {
            "rewritten, then handed to the kernel to forward (no neighbour entry yet)"
        }
        Stat::DropNoBackend => "dropped: the VIP has no backend taking new flows",
        Stat::DropMalformed => "dropped: a packet to a VIP with truncated or inconsistent headers",
        Stat::DropFragment => {
            "dropped: a first fragment to a VIP the fragment table could not take"
        }
        Stat::DropFlowTable => "dropped: the flow table could not take a new flow",
        Stat::DropBadBackend => "dropped: the table pointed at a backend slot that is not live",
        Stat::Tx => "sent back out of the interface it came in on",
        Stat::Redirect => "sent out of another interface",
        Stat::IcmpToClient => {
            "ICMP errors about a flow translated for its client (path MTU, unreachable)"
        }
        Stat::IcmpToBackend => "ICMP errors about a reply translated for the flow's backend",
    }
}

/// The kernel lines of `lbctl status`: what is in use of the data plane's room, and its tables.
pub fn kernel_text(
    used: &dataplane::Usage,
    t: &dataplane::TableConfig,
    dir: &std::path::Path,
) -> String {
    let in_use: Vec<String> = used
        .against(t)
        .iter()
        .map(|(what, u, room, _)| {
            let pct = *u as f64 * 100.0 / (*room).max(1) as f64;
            format!("{u} of {room} {what} ({pct:.0}%)")
        })
        .collect();
    format!(
        "kernel:        pinned at {}\n\
         in use:        {}\n\
         tables:        Maglev {} slots a service ({:.1} MiB), flows {} per direction and family\n",
        dir.display(),
        in_use.join(", "),
        t.size,
        t.ring_bytes() as f64 / (1u64 << 20) as f64,
        t.flows
    )
}

pub fn status_text(st: &status::AgentStatus) -> String {
    use std::fmt::Write as _;
    let ago = |t: Option<u64>| match t {
        Some(t) => format!("{}s ago", status::now().saturating_sub(t)),
        None => "never".into(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "agent:         lbctl {} (pid {})", st.version, st.pid);
    let _ = writeln!(out, "source:        {}", st.source);
    let _ = writeln!(
        out,
        "last sync:     {}{}",
        ago(st.last_sync),
        st.last_sync_from
            .as_deref()
            .map(|f| format!(" from {f}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "last error:    {}",
        match &st.last_error {
            Some(e) => format!("{} ({e})", ago(st.last_error_at)),
            None => "none".into(),
        }
    );
    let _ = writeln!(out, "sync errors:   {}", st.sync_errors);
    let _ = writeln!(
        out,
        "reconcile:     {:.1} ms (last)",
        st.last_reconcile_seconds * 1000.0
    );
    let _ = writeln!(
        out,
        "interfaces:    {} (XDP program id {})",
        st.interfaces.join(", "),
        st.program_id
    );
    let _ = writeln!(out, "problems:      {} (lbctl problems)", st.problems.len());
    out
}

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}

/// `ipvsadm -Ln` style: a line per service, then its backends, with flows and what clients sent.
pub fn list_table(views: &[dataplane::ServiceView]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Prot VirtualAddress:Port        Backends  {:>8} {:>10} {:>12} {:>10}",
        "Flows", "Packets", "Bytes", "NewFlows"
    );
    let _ = writeln!(out, "  -> BackendAddress:Port        State");
    for v in views {
        let _ = writeln!(
            out,
            "{:<4} {:<28} {:<9} {:>8} {:>10} {:>12} {:>10}",
            v.protocol.name().to_uppercase(),
            v.vip,
            format!("{}/{}", v.active, v.backends.len()),
            v.flows,
            v.packets,
            v.bytes,
            v.new_flows
        );
        for b in &v.backends {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<9} {:>8} {:>10} {:>12} {:>10}",
                b.address,
                b.state.name(),
                b.flows,
                b.packets,
                b.bytes,
                b.new_flows
            );
        }
    }
    out
}

/// The JSON shape of `lbctl render --json`.
pub fn render_json(d: &marathon::Derived) -> serde_json::Value {
    let services: Vec<serde_json::Value> = d
        .services
        .values()
        .map(|s| {
            json!({
                "vip": s.vip.addr.to_string(),
                "protocol": s.vip.proto,
                "name": s.name,
                "apps": s.apps,
                "backends": s.backends.values().map(|b| json!({
                    "address": b.addr.to_string(),
                    "app": b.app,
                    "task": b.task,
                    "state": b.state,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "services": services, "problems": d.problems })
}

pub fn render_table(d: &marathon::Derived) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let services: &Desired = &d.services;
    for s in services.values() {
        let name = s
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let apps: Vec<&str> = s.apps.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "{} {}{} apps: {}",
            s.vip.proto.name().to_uppercase(),
            s.vip.addr,
            name,
            apps.join(", ")
        );
        for b in s.backends.values() {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<9} {} {}",
                b.addr,
                b.state.name(),
                b.app,
                b.task
            );
        }
    }
    if !d.problems.is_empty() {
        let _ = writeln!(out, "problems:");
        for p in &d.problems {
            let _ = writeln!(out, "  {p}");
        }
    }
    out
}
