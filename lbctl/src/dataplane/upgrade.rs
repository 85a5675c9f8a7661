//! Upgrades from an agent whose counter maps had an older layout version. A counter map's new
//! version only appends counters (entry `i` counts the same thing in both), so a newer agent
//! need not refuse the pin directory: it creates the new map, attaches its programs, then
//! carries the old counts over and removes the old pin. Flow and service maps have no such
//! rule; their other versions are still refused (`pins::check_layouts`).
use super::{
    pins::{Found, mismatch},
    spec::{self, open_map},
};
use crate::error::{Error, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use lb_common as common;
use std::path::Path;

/// (older name, the map that replaces it). Each pair only appended counters:
/// - `lb_stats_v2` → v3: `icmp_too_big` (path MTU) appended;
/// - `lb_sockst_v1` → v2: `local_ended` (sockets whose backend left) appended.
const PREDECESSORS: &[(&str, &str)] = &[
    ("lb_stats_v2", common::MAP_STATS),
    ("lb_sockst_v1", common::MAP_SOCK_STATS),
];

/// Whether `name` is the older version of a counter map this agent carries over.
pub(super) fn is_predecessor(name: &str) -> bool {
    PREDECESSORS.iter().any(|(old, _)| *old == name)
}

/// The older counter maps pinned in `dir`, each with the map replacing it.
fn pinned(dir: &Path) -> Vec<(&'static str, &'static str)> {
    PREDECESSORS
        .iter()
        .copied()
        .filter(|(old, _)| dir.join(old).exists())
        .collect()
}

/// Adds the counts of each older counter map pinned in `dir` to the map replacing it, then
/// removes the older pin. Called once the new programs are attached: a program that still
/// counts into the older map (a link this agent did not replace) keeps running, its counts are
/// no longer shown. Returns the names retired. A pin under an older name whose layout is not a
/// counter map's is left alone and reported as an error.
pub fn retire_predecessors(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (old, new) in pinned(dir) {
        check_layout(dir, old, new)?;
        let from: PerCpuArray<MapData, u64> = open_map(dir, old)?;
        let mut to: PerCpuArray<MapData, u64> = open_map(dir, new)?;
        for i in 0..from.len().min(to.len()) {
            let read = |m: &PerCpuArray<MapData, u64>, name: &str| {
                m.get(&i, 0)
                    .map_err(|e| Error::map(format!("reading {name}"), e))
            };
            let (a, b) = (read(&from, old)?, read(&to, new)?);
            let sum: Vec<u64> = a.iter().zip(b.iter()).map(|(x, y)| x + y).collect();
            let values = PerCpuValues::try_from(sum)
                .map_err(|e| Error::io(format!("carrying {old} into {new}"), e))?;
            to.set(i, values, 0)
                .map_err(|e| Error::map(format!("carrying {old} into {new}"), e))?;
        }
        remove(dir, old)?;
        tracing::info!(
            from = old,
            to = new,
            "counters of the older layout carried over, its pin removed"
        );
        out.push(old.to_string());
    }
    Ok(out)
}

/// Removes the pins of older counter maps in `dir` (for `lbctl down`). Returns the names
/// removed, and those left in place because their layout is not a counter map's (with why).
pub(super) fn remove_predecessors(dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let (mut removed, mut left) = (Vec::new(), Vec::new());
    for (old, new) in pinned(dir) {
        match check_layout(dir, old, new) {
            Ok(()) => {
                remove(dir, old)?;
                removed.push(old.to_string());
            }
            Err(Error::Layout { .. }) => left.push(format!(
                "{old} (an older name of {new}, but not a per-CPU array of u64 counters)"
            )),
            Err(e) => return Err(e),
        }
    }
    Ok((removed, left))
}

/// Refuses (before anything is loaded) an older counter name pinned in `dir` whose layout is
/// not a counter map's: it is not what an older agent left.
pub(super) fn check_predecessors(dir: &Path) -> Result<()> {
    pinned(dir)
        .into_iter()
        .try_for_each(|(old, new)| check_layout(dir, old, new))
}

fn check_layout(dir: &Path, old: &str, new: &str) -> Result<()> {
    let spec = spec::find(new).ok_or_else(|| Error::Layout {
        dir: dir.to_path_buf(),
        maps: old.to_string(),
    })?;
    match mismatch(spec, &dir.join(old))? {
        None | Some(Found::Missing) => Ok(()),
        Some(Found::Other(_)) => Err(Error::Layout {
            dir: dir.to_path_buf(),
            maps: old.to_string(),
        }),
    }
}

fn remove(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predecessors_are_older_versions_of_counter_maps() {
        for (old, new) in PREDECESSORS {
            let spec = spec::find(new).map(|s| (s.kind, s.key_size, s.value_size));
            assert!(
                matches!(spec, Some((spec::Kind::PerCpuArray, 4, 8))),
                "{new} is a per-CPU array of u64"
            );
            let stem = |n: &str| {
                n.rsplit_once("_v")
                    .map(|(s, v)| (s.to_string(), v.to_string()))
            };
            let (os, ov) = stem(old).unwrap_or_default();
            let (ns, nv) = stem(new).unwrap_or_default();
            assert_eq!(os, ns, "{old} and {new} name the same map");
            assert!(
                ov.parse::<u32>().ok() < nv.parse::<u32>().ok(),
                "{old} is older than {new}"
            );
            assert!(spec::find(old).is_none(), "{old} is not a current map");
        }
    }
}
