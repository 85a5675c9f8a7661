//! `lbctl list`: the services and backends in the kernel, `ipvsadm -Ln` style.
use super::ReadArgs;
use crate::{api, dataplane::Maps};
use std::process::ExitCode;

/// Prints [`api::ListOutput`] with --json.
pub(super) fn run(args: &ReadArgs) -> anyhow::Result<ExitCode> {
    let services = Maps::open(&args.pin.pin_dir)?.views()?;
    if args.json {
        super::print_pretty(&api::ListOutput { services })?;
    } else {
        print!("{}", list_table(&services));
    }
    Ok(ExitCode::SUCCESS)
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
