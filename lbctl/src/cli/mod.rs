//! The command line: one subcommand enum, each command a function of the library in its own
//! module. Every `--json` output is a type of [`crate::api`].
use crate::{dataplane, error::Error, secrets};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::{path::PathBuf, process::ExitCode};

mod agent;
mod down;
mod flows;
mod list;
mod render;
mod resolve;
mod simulate;
mod stats;
mod status;
#[cfg(test)]
mod tests;

pub use agent::AgentArgs;
pub use list::list_table;
pub use render::render_table;
pub use resolve::resolve_text;
pub use status::{filter_text, flows_text, kernel_text, status_text};

/// `lbctl`: the agent and the commands that inspect it.
#[derive(Parser, Debug)]
#[command(
    name = "lbctl",
    version,
    about = "XDP layer-4 load balancer for Marathon VIPs"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the data plane to inspect is pinned.
#[derive(clap::Args, Debug, Clone)]
pub struct PinArgs {
    /// Where the data plane's maps and links are pinned.
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// The flags of the commands that read the pinned maps and print a table or, with --json, a
/// document of [`crate::api`].
#[derive(clap::Args, Debug, Clone)]
pub struct ReadArgs {
    /// Where the data plane's maps and links are pinned.
    #[command(flatten)]
    pub pin: PinArgs,
    /// Print JSON (the command's type in `lbctl::api`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where the agent's status socket is.
#[derive(clap::Args, Debug, Clone)]
pub struct SocketArgs {
    /// Where the data plane's maps and links are pinned.
    #[command(flatten)]
    pub pin: PinArgs,
    /// The agent's status socket [default: derived from --pin-dir].
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl SocketArgs {
    fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| crate::status::default_socket_for(&self.pin.pin_dir))
    }
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent in the foreground: attach XDP or TC to the interfaces and serve the VIPs of
    /// Marathon's apps, following their changes, until SIGINT or SIGTERM.
    Agent(Box<AgentArgs>),
    /// Show the services and backends in the kernel now.
    List(list::Args),
    /// Show the agent's state: source, last sync, errors, interfaces, program, problems count.
    Status(status::Args),
    /// Show the problems the agent found in Marathon's data.
    Problems(status::ProblemsArgs),
    /// Show the data plane's counters; with --watch, their rates every --interval seconds.
    Stats(stats::Args),
    /// Show the tracked flows: client, VIP, backend.
    Flows(flows::Args),
    /// Show which backend a new flow would reach, with the kernel's own table.
    Simulate(Box<simulate::Args>),
    /// Show the services a Marathon document yields (no root, no kernel needed).
    Render(render::Args),
    /// Show what the running agent's DNS server answers for a name (exit 1 when it has no
    /// address of that type).
    Resolve(resolve::Args),
    /// Detach the data plane and remove what it pinned (refused while an agent runs, unless
    /// --force; objects of other programs are left and reported).
    Down(down::Args),
}

/// Exit codes: 0 success, 1 failure, 2 (simulate) no backend, 3 no data plane pinned or no agent
/// running, 4 not permitted, 5 (status) the agent runs but never got a Marathon state, 6 (status)
/// services the programs do not serve: their bit in the VIP filter is clear.
///
/// A refusal for lack of privilege anywhere (EACCES or EPERM from the kernel or the file system)
/// is exit 4 with a sentence saying what is needed.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let name = cli.command.name();
    match run(cli) {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<Error>() {
            Some(Error::NotRunning(_) | Error::AgentNotRunning(_)) => {
                eprintln!("lbctl: {}", secrets::text(&format!("{e:#}")));
                ExitCode::from(3)
            }
            Some(Error::NotPermitted(_)) => {
                eprintln!("lbctl: {}", secrets::text(&format!("{e:#}")));
                ExitCode::from(4)
            }
            Some(err) if err.not_permitted() => {
                eprintln!(
                    "lbctl: lbctl {name} needs root (CAP_BPF, CAP_NET_ADMIN): {}",
                    secrets::text(&format!("{e:#}"))
                );
                ExitCode::from(4)
            }
            _ => {
                eprintln!("lbctl: {}", secrets::text(&format!("{e:#}")));
                ExitCode::from(1)
            }
        },
    }
}

impl Command {
    /// The subcommand's name, for messages.
    fn name(&self) -> &'static str {
        match self {
            Command::Agent(_) => "agent",
            Command::List(_) => "list",
            Command::Status(_) => "status",
            Command::Problems(_) => "problems",
            Command::Stats(_) => "stats",
            Command::Flows(_) => "flows",
            Command::Simulate(_) => "simulate",
            Command::Render(_) => "render",
            Command::Resolve(_) => "resolve",
            Command::Down(_) => "down",
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LBCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The data plane's own records (builds with `bpf-log` only) are wanted whenever relayed.
    let filter = match "lb_ebpf=debug".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs a parsed command line; the exit code says how it went (see [`main`]).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => agent::run(&args),
        Command::List(args) => list::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Problems(args) => status::problems(&args),
        Command::Stats(args) => stats::run(&args),
        Command::Flows(args) => flows::run(&args),
        Command::Simulate(args) => simulate::run(&args),
        Command::Render(args) => render::run(&args),
        Command::Resolve(args) => resolve::run(&args),
        Command::Down(args) => down::run(&args),
    }
}

/// Prints an output document as indented JSON.
fn print_pretty(doc: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(doc)?);
    Ok(())
}

/// Prints an output document as JSON on one line.
fn print_line(doc: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(doc)?);
    Ok(())
}
