//! `lbctl simulate`: which backend a new flow would reach, from the kernel's own table or from a
//! Marathon document.
use super::PinArgs;
use crate::{
    api,
    config::{DeriveSettings, TableSettings},
    dataplane::{self, Maps},
    error::Error,
    marathon,
};
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

/// The flags of `lbctl simulate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VIP, ADDRESS:PORT.
    #[arg(long)]
    vip: String,
    /// The VIP's protocol.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
    proto: String,
    /// The client, ADDRESS:PORT (`[v6]:PORT` for an IPv6 VIP).
    #[arg(long)]
    src: SocketAddr,
    /// Compute from this Marathon document instead of the kernel (no root needed), with the
    /// table settings below.
    #[arg(long)]
    apps: Option<PathBuf>,
    #[command(flatten)]
    table: TableSettings,
    #[command(flatten)]
    derive: DeriveSettings,
    #[command(flatten)]
    pin: PinArgs,
    /// Print [`api::SimulateOutput`] as JSON.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let vip = dataplane::parse_vip(&args.vip, &args.proto).map_err(anyhow::Error::msg)?;
    let src = args.src;
    let picked = match &args.apps {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
                path: path.clone(),
                source: e,
            })?;
            let derived = marathon::desired_state(
                &text,
                &path.display().to_string(),
                &args.derive.options()?,
                &marathon::SystemResolver,
            )?;
            let table = args.table.table()?;
            derived
                .services
                .get(&vip)
                .and_then(|s| dataplane::predict(s, src, &table))
        }
        None => Maps::open(&args.pin.pin_dir)?.pick(&vip, src)?,
    };
    if args.json {
        super::print_line(&api::SimulateOutput {
            vip: vip.addr.to_string(),
            protocol: vip.proto,
            client: src.to_string(),
            backend: picked.map(|b| b.to_string()),
        })?;
    } else if let Some(b) = picked {
        println!("{b}");
    } else {
        println!("no backend: {vip} is not served or has no active backend");
    }
    Ok(if picked.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
