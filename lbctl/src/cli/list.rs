//! `lbctl list`: the services and backends in the kernel, `ipvsadm -Ln` style.
use super::SocketArgs;
use crate::{
    api,
    dataplane::{self, Maps},
    status,
};
use std::{path::Path, process::ExitCode};

/// The flags of `lbctl list`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pin directory, and the agent's status socket (asked why each interface has its hook).
    #[command(flatten)]
    at: SocketArgs,
    /// Print [`api::ListOutput`] as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints [`api::ListOutput`] with --json.
pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let services = Maps::open(&args.at.pin.pin_dir)?.views()?;
    let interfaces = hooks(&args.at.pin.pin_dir, &args.at.path())?;
    if args.json {
        super::print_pretty(&api::ListOutput {
            interfaces,
            services,
        })?;
    } else {
        for h in &interfaces {
            println!(
                "Interface {:<12} {:<4} {}",
                h.iface,
                h.hook.name(),
                h.reason
            );
        }
        print!("{}", list_table(&services));
    }
    Ok(ExitCode::SUCCESS)
}

/// The hook of each pinned link, with the agent's reason when its status socket answers.
fn hooks(pin_dir: &Path, socket: &Path) -> crate::Result<Vec<api::IfaceHook>> {
    let agent = status::query(socket).map(|s| s.hooks).unwrap_or_default();
    Ok(dataplane::pinned_hook_links(pin_dir)?
        .into_iter()
        .map(|(iface, hook, _)| {
            let reason = agent
                .iter()
                .find(|h| h.iface == iface && h.hook == hook)
                .map(|h| h.reason.clone())
                .unwrap_or_else(|| "pinned link (the agent did not say why)".into());
            api::IfaceHook {
                iface,
                hook,
                reason,
            }
        })
        .collect())
}

/// `ipvsadm -Ln` style: a line per service, then its backends, with flows and what clients sent
/// through the gateway (packets), and the connections the local path made (LocalConns).
pub fn list_table(views: &[api::ServiceView]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Prot VirtualAddress:Port        Backends  {:>8} {:>10} {:>12} {:>10} {:>10}",
        "Flows", "Packets", "Bytes", "NewFlows", "LocalConns"
    );
    let _ = writeln!(out, "  -> BackendAddress:Port        State");
    for v in views {
        let _ = writeln!(
            out,
            "{:<4} {:<28} {:<9} {:>8} {:>10} {:>12} {:>10} {:>10}",
            v.protocol.name().to_uppercase(),
            v.vip,
            format!("{}/{}", v.active, v.backends.len()),
            v.flows,
            v.packets,
            v.bytes,
            v.new_flows,
            v.local_connections
        );
        for b in &v.backends {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<9} {:>8} {:>10} {:>12} {:>10} {:>10}",
                b.address,
                b.state.name(),
                b.flows,
                b.packets,
                b.bytes,
                b.new_flows,
                b.local_connections
            );
        }
    }
    out
}
