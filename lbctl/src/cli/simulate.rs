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
    /// The client, ADDRESS:PORT (`[v6]:PORT` for an IPv6 VIP); not with --local.
    #[arg(long, required_unless_present = "local")]
    src: Option<SocketAddr>,
    /// Say what the local path would do with a connect()/sendmsg() to the VIP by a process of
    /// its cgroup, whose socket has --cookie (the kernel picks by socket cookie, not by address).
    #[arg(long, conflicts_with = "src")]
    local: bool,
    /// The socket cookie of --local.
    #[arg(long, default_value_t = 1, requires = "local")]
    cookie: u64,
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
    let asked = dataplane::parse_vip(&args.vip, &args.proto).map_err(anyhow::Error::msg)?;
    // The local path serves a v4-mapped VIP of an IPv6 socket as its IPv4 VIP.
    let vip = if args.local {
        dataplane::local_vip(&asked)
    } else {
        asked
    };
    let (hash, client) = match (args.local, args.src) {
        (true, _) => (
            Some(dataplane::local_hash(&vip, args.cookie)),
            format!("socket cookie {}", args.cookie),
        ),
        (false, Some(src)) => (None, src.to_string()),
        (false, None) => anyhow::bail!("give --src ADDRESS:PORT (or --local)"),
    };
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
                .and_then(|s| match (hash, args.src) {
                    (Some(h), _) => dataplane::predict_slot(s, h, &table),
                    (None, Some(src)) => dataplane::predict(s, src, &table),
                    (None, None) => None,
                })
        }
        None => {
            let maps = Maps::open(&args.pin.pin_dir)?;
            match (hash, args.src) {
                (Some(h), _) => maps.pick_slot(&vip, h)?,
                (None, Some(src)) => maps.pick(&vip, src)?,
                (None, None) => None,
            }
        }
    };
    let outcome = match (args.local, picked) {
        (false, Some(b)) => format!("a new flow from {client} goes to {b}"),
        (false, None) => format!("dropped: {asked} is not served or has no active backend"),
        (true, Some(b)) => format!(
            "connect()/sendmsg() to {asked} goes to {b} (getpeername/recvfrom show {asked})"
        ),
        (true, None) => format!(
            "connect()/sendmsg() to {asked} fails with ECONNREFUSED if it is a VIP with no active backend; not a VIP: untouched"
        ),
    };
    if args.json {
        super::print_line(&api::SimulateOutput {
            vip: asked.addr.to_string(),
            protocol: asked.proto,
            client,
            backend: picked.map(|b| b.to_string()),
            path: if args.local { "local" } else { "gateway" }.into(),
            outcome,
        })?;
    } else if let (false, Some(b)) = (args.local, picked) {
        println!("{b}");
    } else {
        println!("{outcome}");
    }
    Ok(if picked.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
