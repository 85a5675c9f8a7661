//! The pin directory: bpffs, the pinned links (`link_xdp_<iface>`), maps of another layout
//! version, and `down`, which removes every pin.
use super::{spec, sys};
use crate::error::{Error, Result};
use aya::programs::links::PinnedLink;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where the agent pins its maps and links unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
const LINK_PREFIX: &str = "link_xdp_";
/// Where a resize makes the new maps before they take the old ones' places.
pub(super) const STAGING: &str = "resizing";

/// Makes sure `dir` can hold pins: mounts bpffs on /sys/fs/bpf when none is mounted there.
pub fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !sys::is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|e| Error::io("creating /sys/fs/bpf", e))?;
        sys::mount_bpffs()?;
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))
}

/// Pinned maps in `dir` whose names look like ours but with another layout version: an agent of
/// another version left them, and this one must not read them as its own.
pub fn foreign_layouts(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lb_") && n.contains("_v") && spec::find(n).is_none())
        .collect();
    out.sort();
    out
}

pub(super) fn link_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{iface}"))
}

/// The interfaces with a pinned link in `dir`.
pub fn pinned_links(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(iface) = name.strip_prefix(LINK_PREFIX) {
            out.push((iface.to_string(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn unpin_link(path: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(path).map_err(|e| Error::Link {
        what: format!("opening {}", path.display()),
        source: e,
    })?;
    // Removing the pin and closing the last descriptor detaches the program.
    link.unpin()
        .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    Ok(())
}

/// What `down` removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    /// Interfaces whose link was removed (their program detached).
    pub links: Vec<String>,
    /// Maps whose pin was removed.
    pub maps: Vec<String>,
}

/// Detaches every program the agent attached and removes every pin in `dir`.
pub fn down(dir: &Path) -> Result<Removed> {
    let mut out = Removed::default();
    // What a resize that was interrupted left beside the pins.
    let staging = dir.join(STAGING);
    if staging.is_dir() {
        down(&staging)?;
    }
    for (iface, path) in pinned_links(dir)? {
        unpin_link(&path)?;
        out.links.push(iface);
    }
    for name in spec::MAPS.iter().map(|m| m.name) {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => out.maps.push(name.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing {}", dir.display()), e)),
    }
    Ok(out)
}
