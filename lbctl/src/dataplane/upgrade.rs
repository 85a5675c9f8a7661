//! Upgrades from an agent whose counter maps had an older layout version. A counter map's new
//! version only appends counters (entry `i` counts the same thing in both), so a newer agent
//! need not refuse the pin directory: it creates the new map, attaches its programs, then
//! carries the old counts over and removes the old pin. Service maps have no such rule; their
//! other versions are still refused (`pins::check_layouts`).
//!
//! Also from an agent whose counters by service and backend id were per-CPU arrays
//! (`lb_svctr_v1`, `lb_betr_v1`, `lb_socksv_v1`, `lb_sockbe_v1`): the arrays in regions that
//! replace them (`counters`) are made beside them, and once the new programs are attached each
//! id's counts are added CPU by CPU and the older pins go (`retire_predecessors`).
//!
//! Also from an agent whose flow tables were LRU hashes (`lb_ct_v1`, `lb_ct6_v1`), whose IPv6
//! table of buckets hashed its keys in a chain (`lb_ct6_v2`) or had slots of 56 bytes
//! (`lb_ct6_v3`), or whose tables of buckets put a key's first bucket anywhere in the table
//! (`lb_ct_v2`, `lb_ct6_v4`, before `lb_common::flow_table::hot_buckets`): the new tables (`lb_ct_v3`,
//! `lb_ct6_v5`) are made beside them, and once the new programs are attached (the older ones
//! add flows until then) every flow is carried over, unless the new programs tracked it in the
//! meantime, and the older pins go (`retire_predecessors`).
//!
//! Also from an agent that kept two Maglev tables per service for every possible service in
//! one array (`lb_ring_v2`): the tables live services use are carried into `lb_tables_v2` when
//! the new maps are made, before any new program runs (`carry_tables`), and the old array's pin
//! goes once the new programs are attached. And from an agent whose tables all had the
//! configured size (`lb_tables_v1`): its chunks are put into `lb_tables_v2` as they are
//! (`carry_chunks`), at the same moment; its pin goes with the others.
use super::{
    counters::{Count, Counters},
    flow_tables,
    pins::{Found, mismatch},
    spec::{self, open_map},
    sys,
    tables::Tables,
};
use crate::error::{Error, Result};
use aya::maps::{HashMap, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues};
use lb_common::{
    self as common, Service, Traffic, VipKey, VipKey6,
    flow_table::{Flow6V2, Flow6V3, FlowBucket},
};
use std::path::Path;

/// (older name, the map that replaces it). Each pair only appended counters:
/// - `lb_stats_v2` → v3: `icmp_too_big` (path MTU) appended;
/// - `lb_sockst_v1` → v2: `local_ended` (sockets whose backend left) appended.
const PREDECESSORS: &[(&str, &str)] = &[
    ("lb_stats_v2", common::MAP_STATS),
    ("lb_sockst_v1", common::MAP_SOCK_STATS),
];

/// The tables of older agents: `max services * 2` tables of `ring_stride(size)` elements of
/// 16 slots (mmapable); a service's entry said which of its two was live (now `_unused`).
const OLD_TABLES: &str = "lb_ring_v2";

/// The tables of the agents before size classes: an array of maps like `lb_tables_v2`, whose
/// chunks all hold tables of the configured size, and whose services' entries name a block
/// alone. Such a block is a block of class 0 in `lb_tables_v2`, named by the same number, so
/// its chunks go into the new outer map as they are (`carry_chunks`).
const V1_TABLES: &str = "lb_tables_v1";

/// The per-CPU arrays of counters by id of older agents, each with the array in regions that
/// replaces it (`counters`), its value's size, and how its counts are carried.
#[allow(clippy::type_complexity)]
const PER_CPU_BY_ID: [(&str, &str, u32, fn(&Path, &str, &str) -> Result<usize>); 4] = [
    (
        "lb_svctr_v1",
        common::MAP_SERVICE_TRAFFIC,
        TRAFFIC,
        carry_by_id::<Traffic>,
    ),
    (
        "lb_betr_v1",
        common::MAP_BACKEND_TRAFFIC,
        TRAFFIC,
        carry_by_id::<Traffic>,
    ),
    (
        "lb_socksv_v1",
        common::MAP_SOCK_SERVICE,
        8,
        carry_by_id::<u64>,
    ),
    (
        "lb_sockbe_v1",
        common::MAP_SOCK_BACKEND,
        8,
        carry_by_id::<u64>,
    ),
];

const TRAFFIC: u32 = std::mem::size_of::<Traffic>() as u32;

/// Adds the counts of the per-CPU array `old` pinned in `dir` to the array in regions `new`,
/// CPU by CPU. Returns the ids carried.
fn carry_by_id<V: Count>(dir: &Path, old: &str, new: &str) -> Result<usize> {
    let from: PerCpuArray<MapData, V> = open_map(dir, old)?;
    let counts = (0..from.len())
        .map(|i| {
            from.get(&i, 0)
                .map(|per_cpu| per_cpu.iter().copied().collect::<Vec<V>>())
                .map_err(|e| Error::map(format!("reading {old}"), e))
        })
        .collect::<Result<Vec<_>>>()?;
    Counters::<V>::open(dir, new)?.add_per_cpu(&counts)
}

/// The older per-CPU counter arrays by id pinned in `dir`, each refused unless it is what an
/// older agent left.
#[allow(clippy::type_complexity)]
fn per_cpu_by_id(
    dir: &Path,
) -> Vec<(
    &'static str,
    &'static str,
    u32,
    fn(&Path, &str, &str) -> Result<usize>,
)> {
    PER_CPU_BY_ID
        .into_iter()
        .filter(|(old, ..)| dir.join(old).exists())
        .collect()
}

fn check_by_id(dir: &Path, old: &str, new: &str, value_size: u32) -> Result<()> {
    check_pin(
        dir,
        old,
        new,
        MapType::PerCpuArray,
        value_size,
        "a per-CPU array of counters by id",
    )
}

/// Whether `name` is the older version of a map this agent carries over.
pub(super) fn is_predecessor(name: &str) -> bool {
    name == OLD_TABLES
        || PER_CPU_BY_ID.iter().any(|(old, ..)| *old == name)
        || name == V1_TABLES
        || PREDECESSORS.iter().any(|(old, _)| *old == name)
        || OLD_FLOWS.iter().any(|(old, ..)| *old == name)
}

/// What an older agent's flow table is.
#[derive(Clone, Copy)]
enum OldFlows {
    /// An LRU hash of a flow's key, of this many bytes, to its `FlowEntry`.
    Lru(u32),
    /// `lb_ct6_v2`: the buckets of `lb_ct6_v3`, their keys hashed as `Flow6V2`.
    Buckets6,
    /// `lb_ct6_v3`: buckets of 56-byte slots (`Flow6V3`), the keys hashed as `lb_ct6_v5`'s.
    Buckets6V3,
    /// `lb_ct_v2` / `lb_ct6_v4`: the new table's buckets, slots and hash, a key's first bucket
    /// any of the table's (before `flow_table::hot_buckets`); true for IPv6.
    Spread(bool),
}

/// The flow tables of older agents and the table that replaces each: `lb_ct_v3` and
/// `lb_ct6_v5` hold the same entries in buckets (`lb_common::flow_table`).
const OLD_FLOWS: [(&str, &str, OldFlows); 6] = [
    (common::MAP_FLOWS_V1, common::MAP_FLOWS, OldFlows::Lru(16)),
    (
        common::MAP_FLOWS_V2,
        common::MAP_FLOWS,
        OldFlows::Spread(false),
    ),
    (
        common::MAP_FLOWS6_V4,
        common::MAP_FLOWS6,
        OldFlows::Spread(true),
    ),
    (common::MAP_FLOWS6_V1, common::MAP_FLOWS6, OldFlows::Lru(40)),
    (
        common::MAP_FLOWS6_V2,
        common::MAP_FLOWS6,
        OldFlows::Buckets6,
    ),
    (
        common::MAP_FLOWS6_V3,
        common::MAP_FLOWS6,
        OldFlows::Buckets6V3,
    ),
];

/// The older flow tables pinned in `dir`, each with the check that it is what an older agent
/// left.
fn old_flows(dir: &Path) -> Vec<(&'static str, &'static str, OldFlows)> {
    OLD_FLOWS
        .into_iter()
        .filter(|(old, ..)| dir.join(old).exists())
        .collect()
}

/// Refuses an older flow table's pin that is not what `kind` says.
fn check_old_flows(dir: &Path, old: &str, new: &str, kind: OldFlows) -> Result<()> {
    let info = MapInfo::from_pin(dir.join(old))
        .map_err(|e| Error::map(format!("reading {old}'s description"), e))?;
    let (want, key, value, what) = match kind {
        OldFlows::Lru(key_size) => (
            MapType::LruHash,
            key_size,
            std::mem::size_of::<common::FlowEntry>(),
            "an LRU hash of flows",
        ),
        OldFlows::Buckets6 => (
            MapType::Array,
            4,
            std::mem::size_of::<FlowBucket<Flow6V2>>(),
            "an array of IPv6 flow buckets",
        ),
        OldFlows::Buckets6V3 => (
            MapType::Array,
            4,
            std::mem::size_of::<FlowBucket<Flow6V3>>(),
            "an array of IPv6 flow buckets",
        ),
        OldFlows::Spread(false) => (
            MapType::Array,
            4,
            std::mem::size_of::<FlowBucket<common::Flow>>(),
            "an array of IPv4 flow buckets",
        ),
        OldFlows::Spread(true) => (
            MapType::Array,
            4,
            std::mem::size_of::<FlowBucket<common::Flow6>>(),
            "an array of IPv6 flow buckets",
        ),
    };
    let fits = info.map_type().is_ok_and(|t| t == want)
        && info.key_size() == key
        && info.value_size() == value as u32;
    if fits {
        Ok(())
    } else {
        Err(Error::Layout {
            dir: dir.to_path_buf(),
            maps: format!("{old} (an older name of {new}, but not {what})"),
        })
    }
}

/// Puts the chunks of an older agent's `lb_tables_v1` pinned in `dir` at the same indexes of
/// `lb_tables_v2` (the same chunks: nothing is copied). Called when the maps were made and
/// before the new programs are attached, so every service's entry names a block the new
/// programs find; the older programs keep reading `lb_tables_v1` until the links switch, and
/// its pin goes once they did (`retire_predecessors`). Returns how many chunks were carried.
pub(super) fn carry_chunks(dir: &Path, size: u32) -> Result<usize> {
    if !dir.join(V1_TABLES).exists() {
        return Ok(0);
    }
    check_v1_tables(dir)?;
    if !Tables::open(dir, size)?.present()?.is_empty() {
        // Carried already (an agent stopped before its programs were attached).
        return Ok(0);
    }
    let room = spec::max_entries(
        &spec::open_data(dir, common::MAP_TABLES)?,
        common::MAP_TABLES,
    )?;
    let carried = super::tables::copy_tables(
        spec::open_data(dir, V1_TABLES)?,
        dir,
        common::MAP_TABLES,
        room,
    )?;
    tracing::info!(
        chunks = carried,
        from = V1_TABLES,
        to = common::MAP_TABLES,
        "Maglev tables of the older layout carried over"
    );
    Ok(carried)
}

/// Refuses an `lb_tables_v1` pin that is not the older agents' array of table chunks.
fn check_v1_tables(dir: &Path) -> Result<()> {
    check_pin(
        dir,
        V1_TABLES,
        common::MAP_TABLES,
        MapType::ArrayOfMaps,
        4,
        "an array of maps",
    )
}

/// Carries the live table of every service with active backends from an older agent's
/// `lb_ring_v2` pinned in `dir` into a block of class 0 of `lb_tables_v2`, and points the
/// service's entry at it. Called when the maps were made and before the new programs are
/// attached, so new flows find every table from the first packet. Until the links switch, the older programs read the
/// same field as which of the service's two tables is live: each table goes into a block whose
/// lowest bit is that half, so they keep reading the right one. Returns how many were carried.
pub(super) fn carry_tables(dir: &Path, size: u32) -> Result<usize> {
    if !dir.join(OLD_TABLES).exists() {
        return Ok(0);
    }
    check_old_tables(dir)?;
    let old = spec::open_data(dir, OLD_TABLES)?;
    let mut tables = Tables::open(dir, size)?;
    tables.adopt([])?;
    if tables.chunks() > 0 {
        // Carried already (an agent stopped before its programs were attached).
        return Ok(0);
    }
    let mut v4: HashMap<MapData, VipKey, Service> = open_map(dir, common::MAP_SERVICES)?;
    let mut v6: HashMap<MapData, VipKey6, Service> = open_map(dir, common::MAP_SERVICES6)?;
    let e4: Vec<(VipKey, Service)> = v4
        .iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::map("reading lb_svc_v1", e))?;
    let e6: Vec<(VipKey6, Service)> = v6
        .iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::map("reading lb_svc6_v1", e))?;
    let live = e4.iter().filter(|(_, s)| s.active > 0).count()
        + e6.iter().filter(|(_, s)| s.active > 0).count();
    // Blocks of both parities for every table.
    tables.reserve(&std::collections::BTreeMap::from([(0, 2 * live)]))?;
    let mut carry = |svc: Service| -> Result<Service> {
        let table = old_table(&old, svc, size)?;
        let half = svc.table & 1;
        // Class 0: the block's number itself.
        let block = tables.write(0, &table, |b| b & 1 == half)?;
        Ok(Service {
            table: block,
            ..svc
        })
    };
    let mut carried = 0;
    for (k, svc) in e4.into_iter().filter(|(_, s)| s.active > 0) {
        v4.insert(k, carry(svc)?, 0)
            .map_err(|e| Error::map("writing lb_svc_v1", e))?;
        carried += 1;
    }
    for (k, svc) in e6.into_iter().filter(|(_, s)| s.active > 0) {
        v6.insert(k, carry(svc)?, 0)
            .map_err(|e| Error::map("writing lb_svc6_v1", e))?;
        carried += 1;
    }
    tables.trim()?;
    tracing::info!(
        tables = carried,
        from = OLD_TABLES,
        "Maglev tables of the older layout carried over"
    );
    Ok(carried)
}

/// The live table of `svc` in an older agent's `lb_ring_v2`: `size` slots.
fn old_table(old: &MapData, svc: Service, size: u32) -> Result<Vec<u32>> {
    let elements = spec::max_entries(old, OLD_TABLES)? as usize;
    let stride = common::ring_stride(size) as usize;
    let first = (svc.id as usize * 2 + (svc.table & 1) as usize) * stride;
    if first + stride > elements {
        return Err(Error::io(
            format!("carrying the tables of {OLD_TABLES}"),
            std::io::Error::other(format!(
                "service {}'s table is outside the map ({elements} elements)",
                svc.id
            )),
        ));
    }
    let window = sys::map_read(old, first * CHUNK, stride * CHUNK)?;
    Ok(window
        .chunks_exact(4)
        .take(size as usize)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Refuses an `lb_ring_v2` pin that is not the older agents' table array.
fn check_old_tables(dir: &Path) -> Result<()> {
    check_pin(
        dir,
        OLD_TABLES,
        common::MAP_TABLES,
        MapType::Array,
        CHUNK as u32,
        "an array of 64-byte table elements",
    )
}

/// Refuses the pin `old` in `dir` (an older name of `new`) unless it is a map of `kind` with
/// 4-byte keys and `value_size`-byte values (`what`, for the error).
fn check_pin(
    dir: &Path,
    old: &str,
    new: &str,
    kind: MapType,
    value_size: u32,
    what: &str,
) -> Result<()> {
    let info = MapInfo::from_pin(dir.join(old))
        .map_err(|e| Error::map(format!("reading {old}'s description"), e))?;
    let fits = info.map_type().is_ok_and(|t| t == kind)
        && info.key_size() == 4
        && info.value_size() == value_size;
    if fits {
        Ok(())
    } else {
        Err(Error::Layout {
            dir: dir.to_path_buf(),
            maps: format!("{old} (an older name of {new}, but not {what})"),
        })
    }
}

const CHUNK: usize = std::mem::size_of::<common::RingChunk>();

/// The older tables' pins in `dir`, each with the check that it is what an older agent left.
#[allow(clippy::type_complexity)]
fn old_tables(dir: &Path) -> Vec<(&'static str, fn(&Path) -> Result<()>)> {
    let all: [(&'static str, fn(&Path) -> Result<()>); 2] =
        [(OLD_TABLES, check_old_tables), (V1_TABLES, check_v1_tables)];
    all.into_iter()
        .filter(|(name, _)| dir.join(name).exists())
        .collect()
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
    for (old, new, size, carry) in per_cpu_by_id(dir) {
        check_by_id(dir, old, new, size)?;
        let ids = carry(dir, old, new)?;
        remove(dir, old)?;
        tracing::info!(
            from = old,
            to = new,
            ids,
            "counters of the per-CPU array carried into the array in regions, its pin removed"
        );
        out.push(old.to_string());
    }
    // Their tables were carried when the maps were made.
    for (old, check) in old_tables(dir) {
        check(dir)?;
        remove(dir, old)?;
        out.push(old.to_string());
    }
    // The older programs added flows to these until the links switched.
    for (old, new, kind) in old_flows(dir) {
        check_old_flows(dir, old, new, kind)?;
        let n = match kind {
            OldFlows::Lru(16) => flow_tables::carry::<common::Flow>(dir, old, new)?,
            OldFlows::Lru(_) => flow_tables::carry::<common::Flow6>(dir, old, new)?,
            OldFlows::Buckets6 => flow_tables::carry_buckets(dir, old, new, |k: Flow6V2| k.0)?,
            OldFlows::Buckets6V3 => flow_tables::carry_buckets(dir, old, new, |k: Flow6V3| k.0)?,
            OldFlows::Spread(false) => {
                flow_tables::carry_buckets(dir, old, new, |k: common::Flow| k)?
            }
            OldFlows::Spread(true) => {
                flow_tables::carry_buckets(dir, old, new, |k: common::Flow6| k)?
            }
        };
        remove(dir, old)?;
        tracing::info!(
            from = old,
            to = new,
            flows = n,
            "flows of the older flow table carried over, its pin removed"
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
    let checked: Vec<(&str, Result<()>)> = per_cpu_by_id(dir)
        .into_iter()
        .map(|(old, new, size, _)| (old, check_by_id(dir, old, new, size)))
        .chain(
            old_tables(dir)
                .into_iter()
                .map(|(old, check)| (old, check(dir))),
        )
        .chain(
            old_flows(dir)
                .into_iter()
                .map(|(old, new, kind)| (old, check_old_flows(dir, old, new, kind))),
        )
        .collect();
    for (old, check) in checked {
        match check {
            Ok(()) => {
                remove(dir, old)?;
                removed.push(old.to_string());
            }
            Err(Error::Layout { maps, .. }) => left.push(maps),
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
        .try_for_each(|(old, new)| check_layout(dir, old, new))?;
    per_cpu_by_id(dir)
        .into_iter()
        .try_for_each(|(old, new, size, _)| check_by_id(dir, old, new, size))?;
    old_tables(dir)
        .into_iter()
        .try_for_each(|(_, check)| check(dir))?;
    old_flows(dir)
        .into_iter()
        .try_for_each(|(old, new, kind)| check_old_flows(dir, old, new, kind))
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
