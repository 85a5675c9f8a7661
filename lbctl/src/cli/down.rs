//! `lbctl down`: detach the data plane and remove its pins.
use super::ReadArgs;
use crate::{api, dataplane};
use std::process::ExitCode;

/// Prints [`api::DownOutput`] with --json.
pub(super) fn run(args: &ReadArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.pin.pin_dir;
    let removed: api::DownOutput = dataplane::down(dir)?;
    if args.json {
        super::print_line(&removed)?;
    } else if removed.links.is_empty() && removed.maps.is_empty() {
        println!("nothing was pinned at {}", dir.display());
    } else {
        println!(
            "detached from {} interface(s) [{}], removed {} map(s) from {}",
            removed.links.len(),
            removed.links.join(", "),
            removed.maps.len(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
