//! Attaching the programs to interfaces through pinned bpf links (`link_xdp_<iface>` for XDP,
//! `link_tc_<iface>` for a tcx ingress link), replacing the program of a link already pinned in
//! place (`bpf_link_update`), and resizing a pinned data plane first when asked for other room.
//! Which hook an interface gets is `hooks`' decision; an interface that moves from one hook to
//! the other gets its new link before the old one goes, so it is never without a program.
use super::{
    hooks::{HookKind, IfaceHook, IfaceSpec, Plan, plan_for},
    load::{
        Programs, ensure_loaded, load_packet_programs, load_programs, program_id, tc_program,
        xdp_program,
    },
    pins::{check_layouts, link_path, pinned_hook_links, unpin_link},
    resize,
    sizing::TableConfig,
    sys,
};
use crate::error::{Error, Result};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};
use serde::Serialize;
use std::path::Path;

/// What `attach` did.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    /// The kernel's id of the program attached: the XDP program's when any interface runs XDP,
    /// else the TC program's; 0 when no interface was asked for (the local path alone).
    pub program_id: u32,
    /// The kernel's id of the XDP program, when `attach` loaded it (only the programs the
    /// interfaces' hooks need are; one no interface runs is unloaded when `attach` returns).
    pub xdp_program_id: Option<u32>,
    /// The kernel's id of the TC program, when `attach` loaded it.
    pub tc_program_id: Option<u32>,
    /// Interfaces whose existing pinned link now runs this program (adopted, hitless).
    pub replaced: Vec<String>,
    /// Interfaces attached for the first time (or moved to the other hook).
    pub attached: Vec<String>,
    /// Interfaces attached before but not asked for now: detached.
    pub detached: Vec<String>,
    /// The hook each interface asked for got, and why.
    pub hooks: Vec<IfaceHook>,
}

/// Loads the programs the interfaces' hooks need (reusing maps already pinned in `dir`, so that
/// an agent restart keeps every service and flow), and attaches each interface of `ifaces`
/// (`--iface` values: `NAME`, `NAME:xdp`, `NAME:tc`) through a pinned bpf link of the hook
/// `hooks::plan` chooses. A link already pinned for an interface and hook is updated in place to
/// run the new program, which never leaves the interface without a program; a link of the other
/// hook is removed once the new one is in place. With no interface, no packet program is loaded
/// (the maps are made or checked all the same).
pub fn attach(dir: &Path, ifaces: &[String], table: &TableConfig) -> Result<Attached> {
    attach_with(None, dir, ifaces, table)
}

/// `attach` with the object `make_maps` loaded for `dir` (its maps made, no program loaded),
/// which saves loading it again.
pub fn attach_made(
    made: aya::Ebpf,
    dir: &Path,
    ifaces: &[String],
    table: &TableConfig,
) -> Result<Attached> {
    attach_with(Some(made), dir, ifaces, table)
}

fn attach_with(
    made: Option<aya::Ebpf>,
    dir: &Path,
    ifaces: &[String],
    table: &TableConfig,
) -> Result<Attached> {
    let specs = IfaceSpec::parse_all(ifaces)?;
    check_layouts(dir)?;
    // The hooks first: only their programs are verified (a few hundred ms of CPU each). A
    // driver that refuses native XDP gets TC, loaded then.
    let plans = specs
        .iter()
        .map(|spec| plan_for(spec).map(|(plan, driver)| (spec, plan, driver)))
        .collect::<Result<Vec<_>>>()?;
    let programs = Programs {
        xdp: plans.iter().any(|(_, p, _)| p.kind == HookKind::Xdp),
        tc: plans.iter().any(|(_, p, _)| p.kind == HookKind::Tc),
    };
    // A data plane pinned with other room (not other tables) is moved to the new sizes.
    let (mut ebpf, old_flows) = match (resize::needed(dir, table)?, made) {
        (Some(pinned), _) => {
            let (ebpf, old) = resize::prepare(dir, &pinned, table, programs)?;
            (ebpf, Some(old))
        }
        (None, Some(mut ebpf)) => {
            load_packet_programs(&mut ebpf, programs)?;
            (ebpf, None)
        }
        (None, None) => (load_programs(dir, table, programs)?, None),
    };
    let mut out = Attached {
        program_id: 0,
        xdp_program_id: None,
        tc_program_id: None,
        replaced: Vec::new(),
        attached: Vec::new(),
        detached: Vec::new(),
        hooks: Vec::new(),
    };
    for (spec, plan, driver) in plans {
        let plan = match attach_one(&mut ebpf, dir, &spec.name, &plan, &mut out) {
            Err(e) if plan.native_only => {
                // The driver has no native XDP: TC it is.
                let fallback = plan.fallback(&driver, &e.to_string());
                attach_one(&mut ebpf, dir, &spec.name, &fallback, &mut out)?;
                fallback
            }
            other => other.map(|()| plan)?,
        };
        if plan.warn_veth {
            tracing::warn!(
                iface = %spec.name,
                "XDP forced on a veth: its peer must have transmit checksum offload off (ethtool -K <peer> tx off), or the partial checksums of the peer's traffic are corrupted; without :xdp this interface gets TC"
            );
        }
        // The interface runs its new hook now: the other one's link goes.
        let other = link_path(dir, plan.kind.other(), &spec.name);
        if other.exists() {
            unpin_link(&other)?;
        }
        tracing::info!(iface = %spec.name, hook = %plan.kind, reason = %plan.reason, "hook chosen");
        out.hooks.push(IfaceHook {
            iface: spec.name.clone(),
            hook: plan.kind,
            reason: plan.reason,
        });
    }
    // What was loaded, whether or not an interface runs it (a refused native XDP leaves its
    // program loaded, unused, until this returns).
    out.xdp_program_id = program_id(&mut ebpf, HookKind::Xdp)?;
    out.tc_program_id = program_id(&mut ebpf, HookKind::Tc)?;
    let runs = |kind| out.hooks.iter().any(|h| h.hook == kind);
    out.program_id = if runs(HookKind::Xdp) {
        out.xdp_program_id
    } else if runs(HookKind::Tc) {
        out.tc_program_id
    } else {
        None
    }
    .unwrap_or(0);
    for (iface, _, path) in pinned_hook_links(dir)? {
        if !specs.iter().any(|s| s.name == iface) {
            unpin_link(&path)?;
            out.detached.push(iface);
        }
    }
    if let Some(old) = old_flows {
        // The links run the new program now: flows the old one made meanwhile move over too.
        let n = old.copy_into(dir)?;
        tracing::debug!(flows = n, "flow entries copied after the program switch");
    }
    Ok(out)
}

/// Attaches `plan.kind`'s program to `iface`: in place if its link is pinned, else a new pinned
/// link.
fn attach_one(
    ebpf: &mut aya::Ebpf,
    dir: &Path,
    iface: &str,
    plan: &Plan,
    out: &mut Attached,
) -> Result<()> {
    ensure_loaded(ebpf, plan.kind)?;
    let path = link_path(dir, plan.kind, iface);
    if path.exists() {
        let pinned = PinnedLink::from_pin(&path).map_err(|e| Error::Link {
            what: format!("opening the pinned link {}", path.display()),
            source: e,
        })?;
        let fd: FdLink = pinned.into();
        match plan.kind {
            HookKind::Xdp => replace_xdp(xdp_program(ebpf)?, fd, &path, iface)?,
            HookKind::Tc => replace_tc(tc_program(ebpf)?, fd, &path, iface)?,
        }
        out.replaced.push(iface.to_string());
        return Ok(());
    }
    let index = sys::if_index(iface)?;
    let fd = match plan.kind {
        HookKind::Xdp => new_xdp(xdp_program(ebpf)?, index, plan.native_only, iface)?,
        HookKind::Tc => new_tc(tc_program(ebpf)?, iface)?,
    };
    fd.pin(&path).map_err(|e| Error::Pin {
        what: format!("pinning the link of {iface} at {}", path.display()),
        source: e,
    })?;
    out.attached.push(iface.to_string());
    Ok(())
}

fn replace_xdp(prog: &mut Xdp, fd: FdLink, path: &Path, iface: &str) -> Result<()> {
    let link = XdpLink::try_from(fd).map_err(|e| Error::Link {
        what: format!("the pinned link {} is not an XDP link", path.display()),
        source: e,
    })?;
    prog.attach_to_link(link)
        .map_err(|e| Error::program(format!("replacing the XDP program on {iface}"), e))?;
    Ok(())
}

fn replace_tc(prog: &mut SchedClassifier, fd: FdLink, path: &Path, iface: &str) -> Result<()> {
    let link = SchedClassifierLink::try_from(fd).map_err(|e| Error::Link {
        what: format!("the pinned link {} is not a tcx link", path.display()),
        source: e,
    })?;
    prog.attach_to_link(link)
        .map_err(|e| Error::program(format!("replacing the TC program on {iface}"), e))?;
    Ok(())
}

fn new_xdp(prog: &mut Xdp, index: u32, native: bool, iface: &str) -> Result<FdLink> {
    let mode = if native {
        XdpMode::Driver
    } else {
        XdpMode::Default
    };
    let id = prog
        .attach_to_if_index(index, mode)
        .map_err(|e| Error::program(format!("attaching XDP to {iface}"), e))?;
    let link = prog
        .take_link(id)
        .map_err(|e| Error::program(format!("taking the link on {iface}"), e))?;
    link.try_into().map_err(|e| Error::Link {
        what: format!("the link on {iface} is not a bpf link (netlink attach?)"),
        source: e,
    })
}

fn new_tc(prog: &mut SchedClassifier, iface: &str) -> Result<FdLink> {
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| Error::program(format!("attaching TC (tcx ingress) to {iface}"), e))?;
    let link = prog
        .take_link(id)
        .map_err(|e| Error::program(format!("taking the tcx link on {iface}"), e))?;
    link.try_into().map_err(|e| Error::Link {
        what: format!("the link on {iface} is not a tcx link (kernel older than 6.6?)"),
        source: e,
    })
}
