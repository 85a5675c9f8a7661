//! `lbctl down`: detach the data plane and remove its pins (only what this project pinned),
//! refused while an agent holds the data plane's lock unless `--force`.
use super::ReadArgs;
use crate::{
    api, dataplane,
    error::Error,
    lock::{self, Guarded},
};
use std::process::ExitCode;

/// The flags of `lbctl down`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The pin directory and --json.
    #[command(flatten)]
    pub read: ReadArgs,
    /// Remove the data plane even while an agent runs on it (the agent then serves nothing
    /// until it is restarted).
    #[arg(long)]
    pub force: bool,
}

/// Prints [`api::DownOutput`] with --json.
pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let dir = &args.read.pin.pin_dir;
    // Held while the pins are removed, so that no agent starts on them meanwhile.
    let _lock = match lock::acquire(
        Guarded::PinDir(dir),
        "stop that agent first (the data plane keeps forwarding while no agent runs), or run `lbctl down --force` to remove it anyway",
    ) {
        Ok(l) => Some(l),
        Err(Error::Locked { pid, .. }) if args.force => {
            tracing::warn!(
                agent_pid = pid,
                "--force: removing the data plane while an agent holds it"
            );
            None
        }
        Err(e) => return Err(e.into()),
    };
    let removed: api::DownOutput = dataplane::down(dir)?;
    if args.read.json {
        super::print_line(&removed)?;
    } else {
        if removed.links.is_empty() && removed.maps.is_empty() {
            println!(
                "nothing of this load balancer was pinned at {}",
                dir.display()
            );
        } else {
            println!(
                "detached {} link(s) [{}] (interfaces, and cgroup:<program> for the local path), removed {} map(s) from {}",
                removed.links.len(),
                removed.links.join(", "),
                removed.maps.len(),
                dir.display()
            );
        }
        for left in &removed.left {
            println!("left in place (not this load balancer's): {left}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
