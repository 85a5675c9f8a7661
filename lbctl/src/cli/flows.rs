//! `lbctl flows`: the tracked flows.
use super::PinArgs;
use crate::{api, dataplane};
use std::process::ExitCode;

/// The flags of `lbctl flows`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pin: PinArgs,
    /// Only the flows of this VIP (ADDRESS:PORT).
    #[arg(long)]
    vip: Option<String>,
    /// The VIP's protocol.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
    proto: String,
    /// At most this many flows.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    limit: u64,
    /// Print [`api::FlowsOutput`] as JSON.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let vip = match &args.vip {
        Some(v) => Some(dataplane::parse_vip(v, &args.proto).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let flows = dataplane::Maps::open(&args.pin.pin_dir)?.flows(vip.as_ref(), limit)?;
    if args.json {
        return super::print_pretty(&api::FlowsOutput { flows }).map(|()| ExitCode::SUCCESS);
    }
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
    Ok(ExitCode::SUCCESS)
}
