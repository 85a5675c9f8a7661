//! `lbctl status` and `lbctl problems`: what the agent's status socket says, and for `status`
//! what the pinned maps hold.
use super::SocketArgs;
use crate::{
    api,
    dataplane::{self, Maps},
    status,
};
use std::process::ExitCode;

/// The flags of `lbctl status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    at: SocketArgs,
    /// Print [`api::StatusOutput`] as JSON.
    #[arg(long)]
    json: bool,
}

/// The flags of `lbctl problems`.
#[derive(clap::Args, Debug)]
pub struct ProblemsArgs {
    #[command(flatten)]
    at: SocketArgs,
    /// Print [`api::ProblemsOutput`] as JSON.
    #[arg(long)]
    json: bool,
}

/// The kernel's figures, read once.
fn kernel(maps: &Maps) -> crate::Result<api::KernelSummary> {
    // The flows were counted by the agent for its own status: no walk of the flow tables here.
    let k = maps.inspect(false)?;
    let (chunks, bytes) = maps.table_memory()?;
    Ok(api::KernelSummary {
        services: k.state.services.len(),
        in_use: k.state.usage(),
        sizes: k.table,
        table_chunks: chunks,
        table_bytes: bytes,
        counters: api::counters(&k.counters),
        vip_filter: maps.filter_check()?,
    })
}

/// The pin directory whose maps `lbctl status` reads: `--pin-dir` when it is not the default,
/// else the one the agent that answered says it drives (an agent found through `--socket` may
/// drive another than the default; clap does not tell a default given on the command line from
/// none).
fn kernel_dir(flag: &std::path::Path, agent: &str) -> std::path::PathBuf {
    if flag == std::path::Path::new(dataplane::DEFAULT_PIN_DIR) && !agent.is_empty() {
        std::path::PathBuf::from(agent)
    } else {
        flag.to_path_buf()
    }
}

pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let agent = status::query(&args.at.path())?;
    let pin_dir = &kernel_dir(&args.at.pin.pin_dir, &agent.pin_dir);
    let kernel = match Maps::open(pin_dir).and_then(|m| kernel(&m)) {
        Ok(k) => api::KernelOutput::Read(k),
        Err(e) => api::KernelOutput::Unreadable {
            error: e.to_string(),
        },
    };
    // Running, but it never got a state, or services the programs pass by: say so in the exit
    // code too.
    let unserved = match &kernel {
        api::KernelOutput::Read(k) => k
            .vip_filter
            .as_ref()
            .is_some_and(|f| !f.unmarked.is_empty()),
        api::KernelOutput::Unreadable { .. } => false,
    };
    let code = if agent.last_error.is_some() && agent.last_sync.is_none() {
        ExitCode::from(5)
    } else if unserved {
        ExitCode::from(6)
    } else {
        ExitCode::SUCCESS
    };
    if args.json {
        super::print_pretty(&api::StatusOutput { agent, kernel })?;
        return Ok(code);
    }
    print!("{}", status_text(&agent));
    match &kernel {
        api::KernelOutput::Read(k) => {
            print!(
                "{}",
                kernel_text(
                    &k.in_use,
                    &k.sizes,
                    (k.table_chunks, k.table_bytes),
                    pin_dir
                )
            );
            print!("{}", flows_text(&k.counters, k.sizes.flows));
            if let Some(f) = &k.vip_filter {
                print!("{}", filter_text(f));
            }
        }
        api::KernelOutput::Unreadable { error } => println!("kernel:        {error}"),
    }
    Ok(code)
}

pub(super) fn problems(args: &ProblemsArgs) -> anyhow::Result<ExitCode> {
    let st = status::query(&args.at.path())?;
    let out = api::ProblemsOutput {
        not_applied: st.last_apply.map(|a| a.failed).unwrap_or_default(),
        problems: st.problems,
    };
    if args.json {
        super::print_pretty(&out)?;
    } else if out.problems.is_empty() && out.not_applied.is_empty() {
        println!("no problems in the last document");
    } else {
        for p in &out.problems {
            println!("{p}");
        }
        for s in &out.not_applied {
            println!("not applied (keeps what it had): {s}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The kernel lines of `lbctl status`: what is in use of the data plane's room, and its tables.
pub fn kernel_text(
    used: &dataplane::Usage,
    t: &dataplane::TableConfig,
    (chunks, bytes): (usize, u64),
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
         tables:        Maglev up to {} slots a service, {} a backend below that ({} of {} tables, {:.1} MiB), flows {} per direction and family\n",
        dir.display(),
        in_use.join(", "),
        t.size,
        lb_common::SLOTS_PER_BACKEND,
        if chunks == 1 {
            "1 chunk".to_string()
        } else {
            format!("{chunks} chunks")
        },
        lb_common::TABLES_PER_CHUNK,
        bytes as f64 / (1u64 << 20) as f64,
        t.flows
    )
}

/// The flow tables' line of `lbctl status`: what new flows did to flows in use since the data
/// plane was made (`lb_ftpres_v1`), and the flows that came back without their entry
/// (`lb_lost_v1`). Flows in use evicted mean the tables are too small for the flows in use
/// (`flows`, the size they were made with): the line says which setting to raise.
pub fn flows_text(counters: &api::Counters, flows: u32) -> String {
    let count = |c: &lb_common::Counter| counters.get(c.name).copied().unwrap_or(0);
    let [moved, evicted] = [&lb_common::FLOW_PRESSURE[0], &lb_common::FLOW_PRESSURE[1]].map(count);
    let lost = count(&lb_common::FLOWS_LOST);
    let advice = if evicted > 0 {
        format!("; raise --flow-table-size above {flows}")
    } else {
        String::new()
    };
    format!(
        "flow tables:   moved {moved}, evicted {evicted} (flows in use, to make room for new \
         ones), lost {lost} (packets of established flows that found no entry){advice}\n"
    )
}

/// The VIP filter's lines of `lbctl status`: its bits, and any service it hides from the
/// programs.
pub fn filter_text(f: &dataplane::FilterCheck) -> String {
    let mut out = format!(
        "vip filter:    {} of {} bits set, {} with no service (they cost only a lookup)\n",
        f.set, f.bits, f.stale
    );
    if !f.unmarked.is_empty() {
        out.push_str(&format!(
            "NOT SERVED:    {} service(s) whose bit is clear, passed as not for a VIP (written by \
             an agent that does not set the filter; restarting this agent sets every service's \
             bit): {}\n",
            f.unmarked.len(),
            f.unmarked.join(", ")
        ));
    }
    out
}

/// The agent's status for people.
pub fn status_text(st: &api::AgentStatus) -> String {
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
    if st.interfaces.is_empty() {
        let _ = writeln!(out, "interfaces:    none");
    } else {
        let _ = writeln!(
            out,
            "interfaces:    {} (program id {})",
            st.interfaces.join(", "),
            st.program_id
        );
    }
    for h in &st.hooks {
        let _ = writeln!(out, "  {:<12} {:<4} {}", h.iface, h.hook.name(), h.reason);
    }
    let _ = writeln!(
        out,
        "local path:    {}",
        match &st.local.cgroup {
            Some(c) => format!("sockets of cgroup {}", c.display()),
            None => "off".into(),
        }
    );
    let _ = writeln!(out, "problems:      {} (lbctl problems)", st.problems.len());
    out.push_str(&guard_text(st));
    out
}

/// The snapshot guards' lines of `lbctl status`: a large removal being held.
fn guard_text(st: &api::AgentStatus) -> String {
    let Some(h) = &st.holding_removal else {
        return String::new();
    };
    let now = status::now();
    let wait = match h.confirm_from.saturating_sub(now) {
        0 => "confirmable now, by the next snapshot that agrees".to_string(),
        s => format!("confirmable in {s}s, by a snapshot that agrees"),
    };
    format!(
        "holding:       a large removal of {} of {} services since {}s ago, still served \
         ({wait}; {} held since the start)\n               {}{}\n",
        h.removing,
        h.served,
        now.saturating_sub(h.since),
        st.held_removals,
        h.services.join(", "),
        if h.removing > h.services.len() {
            ", ..."
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// Without `--pin-dir`, status reads the maps of the agent that answered; with it, those.
    #[test]
    fn status_reads_the_answering_agents_pin_dir_unless_told_another() {
        let default = Path::new(dataplane::DEFAULT_PIN_DIR);
        assert_eq!(
            kernel_dir(default, "/sys/fs/bpf/edge"),
            PathBuf::from("/sys/fs/bpf/edge")
        );
        assert_eq!(
            kernel_dir(Path::new("/sys/fs/bpf/mine"), "/sys/fs/bpf/edge"),
            PathBuf::from("/sys/fs/bpf/mine")
        );
        // An agent that did not say (an older one): the flag's, the default.
        assert_eq!(kernel_dir(default, ""), PathBuf::from(default));
    }

    /// The flow tables' line gives the counts, and names the setting only once a flow in use
    /// was evicted.
    #[test]
    fn the_flow_tables_line_says_what_to_raise_once_a_flow_in_use_was_evicted() {
        let quiet = api::counters(&[(lb_common::FLOW_PRESSURE[0], 3)]);
        assert_eq!(
            flows_text(&quiet, 262_144),
            "flow tables:   moved 3, evicted 0 (flows in use, to make room for new ones), lost 0 \
             (packets of established flows that found no entry)\n"
        );
        let full = api::counters(&[
            (lb_common::FLOW_PRESSURE[0], 40),
            (lb_common::FLOW_PRESSURE[1], 2),
            (lb_common::FLOWS_LOST, 1),
        ]);
        assert_eq!(
            flows_text(&full, 1024),
            "flow tables:   moved 40, evicted 2 (flows in use, to make room for new ones), lost 1 \
             (packets of established flows that found no entry); raise --flow-table-size above \
             1024\n"
        );
    }
}
