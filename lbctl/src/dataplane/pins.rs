//! The pin directory: bpffs, the pinned links (`link_xdp_<iface>`, `link_tc_<iface>`, and the
//! local path's `link_sock_<program>`), maps of another layout
//! version or of another program under our names (refused before loading), and `down`, which
//! removes what this project pinned and leaves (and reports) the rest.
use super::{
    hooks::HookKind,
    spec::{self, Kind, MapSpec},
    sys,
};
use crate::error::{Error, Result};
use aya::maps::{MapError, MapInfo, MapType};
use aya::programs::links::PinnedLink;
use lb_common::BPF_F_MMAPABLE;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where the agent pins its maps and links unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// The local path's cgroup links: `link_sock_<program>`.
const SOCK_LINK_PREFIX: &str = "link_sock_";
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
        .filter(|n| {
            n.starts_with("lb_")
                && n.contains("_v")
                && spec::find(n).is_none()
                && !super::upgrade::is_predecessor(n)
        })
        .collect();
    out.sort();
    out
}

fn link_prefix(kind: HookKind) -> &'static str {
    match kind {
        HookKind::Xdp => "link_xdp_",
        HookKind::Tc => "link_tc_",
    }
}

pub(super) fn link_path(dir: &Path, kind: HookKind, iface: &str) -> PathBuf {
    dir.join(format!("{}{iface}", link_prefix(kind)))
}

/// The interfaces with a pinned link in `dir` (an interface moving from one hook to the other
/// may briefly have two).
pub fn pinned_links(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(pinned_hook_links(dir)?
        .into_iter()
        .map(|(iface, _, path)| (iface, path))
        .collect())
}

/// The pinned links in `dir`, each with its interface and hook.
pub fn pinned_hook_links(dir: &Path) -> Result<Vec<(String, HookKind, PathBuf)>> {
    let mut out = Vec::new();
    for kind in HookKind::ALL {
        out.extend(
            links_named(dir, link_prefix(kind))?
                .into_iter()
                .map(|(iface, path)| (iface, kind, path)),
        );
    }
    out.sort();
    Ok(out)
}

pub(super) fn sock_link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{SOCK_LINK_PREFIX}{program}"))
}

/// The local path's programs with a pinned cgroup link in `dir`.
pub fn sock_links(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    links_named(dir, SOCK_LINK_PREFIX)
}

/// Detaches every cgroup program of the local path pinned in `dir` (for `down`, and when the
/// local path is turned off). Returns the programs detached, as `cgroup:<program>`.
pub fn detach_local(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (program, path) in sock_links(dir)? {
        unpin_link(&path)?;
        out.push(format!("cgroup:{program}"));
    }
    Ok(out)
}

/// The pins in `dir` named `<prefix><name>`: (name, path), sorted.
fn links_named(dir: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(iface) = name.strip_prefix(prefix) {
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

/// What `down` removed, and what it left.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    /// Interfaces whose link was removed (their program detached).
    pub links: Vec<String>,
    /// Maps whose pin was removed.
    pub maps: Vec<String>,
    /// What `down` left in place because this project did not pin it: each with why.
    pub left: Vec<String>,
}

/// Detaches every program the agent attached and removes the pins of this project in `dir`: the
/// links it pinned, and the maps of the spec table whose layout is the table's. Anything else (a
/// map of another layout under one of our names, another program's pins) is left in place and
/// reported in `left`; the directory is removed only when nothing is left.
pub fn down(dir: &Path) -> Result<Removed> {
    let mut out = Removed::default();
    // What a resize that was interrupted left beside the pins.
    let staging = dir.join(STAGING);
    if staging.is_dir() {
        let inner = down(&staging)?;
        out.left
            .extend(inner.left.into_iter().map(|l| format!("{STAGING}/{l}")));
    }
    out.links.extend(detach_local(dir)?);
    for (iface, path) in pinned_links(dir)? {
        match unpin_link(&path) {
            Ok(()) => out.links.push(iface),
            Err(e) if is_foreign(&e) => out
                .left
                .push(format!("{} (not a bpf link: {e})", file_name(&path))),
            Err(e) => return Err(e),
        }
    }
    for spec in spec::MAPS.iter() {
        let path = dir.join(spec.name);
        match mismatch(spec, &path)? {
            Some(Found::Missing) => continue,
            Some(Found::Other(has)) => {
                out.left.push(format!(
                    "{} ({has}; ours is {})",
                    spec.name,
                    describe_spec(spec)
                ));
                continue;
            }
            None => {}
        }
        match std::fs::remove_file(&path) {
            Ok(()) => out.maps.push(spec.name.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }
    let (removed, left) = super::upgrade::remove_predecessors(dir)?;
    out.maps.extend(removed);
    out.left.extend(left);
    let reported: Vec<String> = out.left.iter().map(|l| leading_name(l)).collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut others: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !reported.contains(n))
            .map(|n| format!("{n} (not pinned by this load balancer)"))
            .collect();
        others.sort();
        out.left.extend(others);
    }
    if !out.left.is_empty() {
        return Ok(out);
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing {}", dir.display()), e)),
    }
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The first path component of a `left` entry (`resizing/x (...)` is reported as `resizing`).
fn leading_name(entry: &str) -> String {
    let name = entry.split(' ').next().unwrap_or_default();
    name.split('/').next().unwrap_or_default().to_string()
}

/// A pin that is not a bpf link at all (opening it as one is refused), not a failure to remove.
fn is_foreign(e: &Error) -> bool {
    matches!(e, Error::Link { .. }) && !e.not_permitted()
}

/// What is pinned at a map's path when it is not the map of the spec.
pub(super) enum Found {
    /// Nothing.
    Missing,
    /// Something else, described.
    Other(String),
}

/// None when the map pinned at `path` has the kind, key and value sizes and flags of `spec`, or
/// is one an older agent made without `BPF_F_MMAPABLE` where the spec has it (`accepts`).
pub(super) fn mismatch(spec: &MapSpec, path: &Path) -> Result<Option<Found>> {
    let info = match MapInfo::from_pin(path) {
        Ok(info) => info,
        Err(MapError::SyscallError(s)) if s.io_error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(Found::Missing));
        }
        Err(MapError::SyscallError(s))
            if s.io_error.kind() == std::io::ErrorKind::PermissionDenied
                || s.io_error.raw_os_error() == Some(libc::EPERM) =>
        {
            return Err(Error::NotPermitted(path.to_path_buf()));
        }
        Err(e) => return Ok(Some(Found::Other(format!("not a BPF map ({e})")))),
    };
    let kind = match info.map_type() {
        Ok(t) => format!("{t:?}"),
        Err(_) => "an unknown map type".to_string(),
    };
    let mmapable = info.map_flags() & BPF_F_MMAPABLE != 0;
    let has = describe(&kind, info.key_size(), info.value_size(), mmapable);
    Ok(
        (!accepts(spec, &kind, info.key_size(), info.value_size(), mmapable))
            .then_some(Found::Other(has)),
    )
}

/// Whether a pinned map of kind `kind` (as `describe` names it), key and value sizes `key` and
/// `value`, mmapable or not, is the map of `spec`: one with the spec's kind, sizes and flags, or
/// one without `BPF_F_MMAPABLE` where the spec has it. The agent makes no mapping of a pinned
/// map: the flag only aligns the values (`lb_common::FLOW_TABLE_FLAGS`), and a map an agent made
/// before it has the same layout.
fn accepts(spec: &MapSpec, kind: &str, key: u32, value: u32, mmapable: bool) -> bool {
    let wanted = describe_spec(spec);
    describe(kind, key, value, mmapable) == wanted
        || (!mmapable
            && spec.flags & BPF_F_MMAPABLE != 0
            && describe(kind, key, value, true) == wanted)
}

fn describe(kind: &str, key: u32, value: u32, mmapable: bool) -> String {
    let flags = if mmapable { ", BPF_F_MMAPABLE" } else { "" };
    format!("a {kind} map, key {key} bytes, value {value} bytes{flags}")
}

fn describe_spec(spec: &MapSpec) -> String {
    let kind = match spec.kind {
        Kind::Hash => MapType::Hash,
        Kind::LruHash => MapType::LruHash,
        Kind::Array => MapType::Array,
        Kind::PerCpuArray => MapType::PerCpuArray,
        Kind::ArrayOfMaps => MapType::ArrayOfMaps,
        Kind::ProgArray => MapType::ProgramArray,
    };
    describe(
        &format!("{kind:?}"),
        u32::try_from(spec.key_size).unwrap_or(u32::MAX),
        u32::try_from(spec.value_size).unwrap_or(u32::MAX),
        spec.flags & BPF_F_MMAPABLE != 0,
    )
}

/// Refuses a pin directory this agent must not load into: maps of another layout version of
/// ours (`Error::Layout`), or a map under one of our names whose kind, key or value size or flags
/// are not the spec table's (`Error::ForeignMap`, naming the map, what it has and what we need).
/// Checked before anything is loaded, so that the kernel's verifier never sees a foreign map.
pub fn check_layouts(dir: &Path) -> Result<()> {
    let foreign = foreign_layouts(dir);
    if !foreign.is_empty() {
        return Err(Error::Layout {
            dir: dir.to_path_buf(),
            maps: foreign.join(", "),
        });
    }
    super::upgrade::check_predecessors(dir)?;
    for spec in spec::MAPS.iter() {
        let path = dir.join(spec.name);
        if let Some(Found::Other(has)) = mismatch(spec, &path)? {
            return Err(Error::ForeignMap {
                path,
                has,
                needs: describe_spec(spec),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> &'static MapSpec {
        spec::MAPS
            .iter()
            .find(|m| m.name == name)
            .expect("a map of the spec")
    }

    #[test]
    fn a_flow_table_is_taken_with_or_without_alignment_and_nothing_else_is() {
        let flows = spec(lb_common::MAP_FLOWS);
        let (key, value) = (flows.key_size as u32, flows.value_size as u32);
        assert_eq!(flows.flags, lb_common::FLOW_TABLE_FLAGS);
        // What this agent makes, and what an agent before the flag made.
        assert!(accepts(flows, "Array", key, value, true));
        assert!(accepts(flows, "Array", key, value, false));
        // Another layout is refused, with the flag or without.
        assert!(!accepts(flows, "Array", key, value + 8, false));
        assert!(!accepts(flows, "Hash", key, value, true));
        // A map whose spec has no flags is refused with BPF_F_MMAPABLE.
        let backends = spec(lb_common::MAP_BACKENDS);
        let (key, value) = (backends.key_size as u32, backends.value_size as u32);
        assert!(accepts(backends, "Array", key, value, false));
        assert!(!accepts(backends, "Array", key, value, true));
    }
}
