//! Attaching the program to interfaces through pinned bpf links, replacing the program of a
//! link already pinned in place (`bpf_link_update`), and resizing a pinned data plane first when
//! asked for other room.
use super::{
    load::{load_with, xdp_program},
    pins::{check_layouts, link_path, pinned_links, unpin_link},
    resize,
    sizing::TableConfig,
    sys,
};
use crate::error::{Error, Result};
use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use serde::Serialize;
use std::path::Path;

/// What `attach` did.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    /// The kernel's id of the program now attached.
    pub program_id: u32,
    /// Interfaces whose existing pinned link now runs this program (adopted, hitless).
    pub replaced: Vec<String>,
    /// Interfaces attached for the first time.
    pub attached: Vec<String>,
    /// Interfaces attached before but not asked for now: detached.
    pub detached: Vec<String>,
}

/// Loads the XDP program (reusing maps already pinned in `dir`, so that an agent restart keeps
/// every service and flow), and attaches it to `ifaces` through pinned bpf links. A link already
/// pinned for an interface is updated in place to run the new program, which never leaves the
/// interface without a program.
pub fn attach(dir: &Path, ifaces: &[String], table: &TableConfig) -> Result<Attached> {
    check_layouts(dir)?;
    // A data plane pinned with other room (not other tables) is moved to the new sizes.
    let (mut ebpf, old_flows) = match resize::needed(dir, table)? {
        Some(pinned) => {
            let (ebpf, old) = resize::prepare(dir, &pinned, table)?;
            (ebpf, Some(old))
        }
        None => (load_with(dir, table)?, None),
    };
    let prog = xdp_program(&mut ebpf)?;
    let program_id = prog
        .info()
        .map_err(|e| Error::program("reading the XDP program's id", e))?
        .id();
    let mut out = Attached {
        program_id,
        replaced: Vec::new(),
        attached: Vec::new(),
        detached: Vec::new(),
    };
    for iface in ifaces {
        let path = link_path(dir, iface);
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| Error::Link {
                what: format!("opening the pinned link {}", path.display()),
                source: e,
            })?;
            let fd: FdLink = pinned.into();
            let link = XdpLink::try_from(fd).map_err(|e| Error::Link {
                what: format!("the pinned link {} is not an XDP link", path.display()),
                source: e,
            })?;
            prog.attach_to_link(link)
                .map_err(|e| Error::program(format!("replacing the program on {iface}"), e))?;
            out.replaced.push(iface.clone());
        } else {
            let index = sys::if_index(iface)?;
            let id = prog
                .attach_to_if_index(index, XdpMode::default())
                .map_err(|e| Error::program(format!("attaching XDP to {iface}"), e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| Error::program(format!("taking the link on {iface}"), e))?;
            let fd: FdLink = link.try_into().map_err(|e| Error::Link {
                what: format!("the link on {iface} is not a bpf link (netlink attach?)"),
                source: e,
            })?;
            fd.pin(&path).map_err(|e| Error::Pin {
                what: format!("pinning the link of {iface} at {}", path.display()),
                source: e,
            })?;
            out.attached.push(iface.clone());
        }
    }
    for (iface, path) in pinned_links(dir)? {
        if !ifaces.contains(&iface) {
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
