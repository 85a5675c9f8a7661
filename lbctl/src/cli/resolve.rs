//! `lbctl resolve NAME`: what the running agent's DNS server answers for a name, asked through
//! its status socket (the same answer whether or not it listens for DNS).
use super::SocketArgs;
use crate::{api, status};
use std::process::ExitCode;

/// The flags of `lbctl resolve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The name, e.g. payments.marathon.l4lb.thisdcos.directory.
    pub name: String,
    /// The record type.
    #[arg(long = "type", default_value = "A")]
    pub record_type: String,
    /// Where the agent is.
    #[command(flatten)]
    pub at: SocketArgs,
    /// Print [`api::ResolveOutput`] as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints the answer; exit 1 unless the name has an address of that type.
pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let out = status::resolve(&args.at.path(), &args.name, Some(&args.record_type))?;
    if args.json {
        super::print_pretty(&out)?;
    } else {
        print!("{}", resolve_text(&out));
    }
    Ok(if out.addresses.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `NAME TTL TYPE ADDRESS` per address (zone-file style), or `NAME TYPE RCODE` without one.
pub fn resolve_text(out: &api::ResolveOutput) -> String {
    if out.addresses.is_empty() {
        return format!("{} {} {}\n", out.name, out.record_type, out.rcode);
    }
    out.addresses
        .iter()
        .map(|a| format!("{} {} {} {a}\n", out.name, out.ttl, out.record_type))
        .collect()
}
