//! The one table of the maps the data plane pins (`MAPS`): for each its name and layout version,
//! kind, key and value types, how it is sized from the `TableConfig`, and how a resize moves its
//! contents. Loading sizes the maps from it, `Maps::open` checks that all of them are pinned, a
//! resize copies and renames each of them, and `down` removes each of them; a unit test checks
//! that it names exactly the maps of the BPF object. A new map is therefore one new row here, and
//! cannot be forgotten by one of them.
use super::{
    counters::{Count, Counters},
    sizing::TableConfig,
    sys,
};
use crate::error::{Error, Result};
use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use lb_common::{
    self as common, Backend, Backend6, BackendKey, BackendKey6, BackendVips, BackendVips6, Flow,
    Flow6, FlowEntry, FragEntry, FragKey, Member, MemberKey, ReplyEntry, ReplyEntry6, Service,
    SockKey, Traffic, VipKey, VipKey6,
    flow_table::{FlowBucket, FlowKey},
};
use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::Path,
};

/// The kind of a BPF map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A hash map (`BPF_MAP_TYPE_HASH`).
    Hash,
    /// A hash map that evicts the least recently used entry when full (`BPF_MAP_TYPE_LRU_HASH`).
    LruHash,
    /// An array indexed by id.
    Array,
    /// An array with one value per CPU.
    PerCpuArray,
    /// An array of maps (`BPF_MAP_TYPE_ARRAY_OF_MAPS`): each value is another map.
    ArrayOfMaps,
    /// An array of programs (`BPF_MAP_TYPE_PROG_ARRAY`), for tail calls.
    ProgArray,
}

/// How many entries a map is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    /// As the program declares it (a fixed size).
    Program,
    /// `TableConfig::services`.
    Services,
    /// `TableConfig::backends`.
    Backends,
    /// `TableConfig::members`.
    Members,
    /// `TableConfig::flows`.
    Flows,
    /// Buckets for `TableConfig::flows` flows (`flow_table::flow_buckets`).
    FlowBuckets,
    /// Chunks of Maglev tables for `TableConfig::services` (`common::table_chunks`).
    TableChunks,
    /// The VIP filter's words for `TableConfig::services` (`common::vip_filter_words`).
    VipFilterWords,
    /// A region of `TableConfig::services` slots for each possible CPU (`counters`).
    ServicesPerCpu,
    /// A region of `TableConfig::backends` slots for each possible CPU.
    BackendsPerCpu,
}

impl Sizing {
    /// The entries a map sized this way gets for `table`; None: the program's own size.
    pub fn entries(self, table: &TableConfig) -> Option<u32> {
        match self {
            Sizing::Program => None,
            Sizing::Services => Some(table.services),
            Sizing::Backends => Some(table.backends),
            Sizing::Members => Some(table.members),
            Sizing::Flows => Some(table.flows),
            Sizing::FlowBuckets => Some(common::flow_table::flow_buckets(table.flows)),
            Sizing::TableChunks => Some(common::table_chunks(table.services)),
            Sizing::VipFilterWords => Some(common::vip_filter_words(table.services)),
            Sizing::ServicesPerCpu => Some(super::counters::entries(table.services)),
            Sizing::BackendsPerCpu => Some(super::counters::entries(table.backends)),
        }
    }
}

/// How a resize moves a map's contents into the new map of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyHow {
    /// Every entry, key by key.
    Entries,
    /// Every entry, and once more after the links run the new program: the old program adds
    /// entries (flows) until then.
    EntriesTwice,
    /// The slots below both maps' sizes, index by index (one value per CPU for per-CPU arrays).
    Slots,
    /// The counts of the ids both maps hold, CPU by CPU (`counters`: the regions' sizes
    /// differ).
    Regions,
    /// The Maglev tables of the services both sizes hold: the same tables put in the new map.
    Tables,
    /// Not copied, for the reason given.
    Skip(&'static str),
    /// A program array: the load fills the new one with its own programs. The old one is kept
    /// open until the links run the new program, as the old program tail-calls through it
    /// until then and the kernel empties the slots of a program array that no pin and no
    /// descriptor holds.
    Programs,
}

/// One map the data plane pins.
#[derive(Debug, Clone, Copy)]
pub struct MapSpec {
    /// The name it is pinned and declared under (at most 15 bytes), ending in `_v<version>`.
    pub name: &'static str,
    /// Its layout version: a change of its key or value layout takes a new one.
    pub version: u32,
    /// Its kind.
    pub kind: Kind,
    /// Bytes of a key.
    pub key_size: usize,
    /// Bytes of a value (of one CPU's value for per-CPU arrays).
    pub value_size: usize,
    /// How many entries it is created with.
    pub sizing: Sizing,
    /// The flags it is created with (`lb_common::FLOW_TABLE_FLAGS` for the flow tables, else
    /// none).
    pub flags: u32,
    /// How a resize moves its contents.
    pub copy: CopyHow,
    io: Io,
}

/// The typed operations of a map, instantiated for its key and value types.
#[derive(Debug, Clone, Copy)]
struct Io {
    /// Copies into the map of the same name pinned in a directory: every entry of a hash map,
    /// or the first `slots` of an array. Returns how many were copied.
    copy: fn(MapData, &Path, &str, u32) -> Result<usize>,
    /// What a map (pinned in the directory given) holds, in its first `slots` for an array.
    contents: fn(MapData, &Path, &str, u32) -> Result<Contents>,
}

/// A summary of what a map holds, to compare two maps: how many entries (non-zero slots of an
/// array) and a digest of them that does not depend on the order a hash map is walked in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contents {
    /// Entries of a hash map; slots holding anything but zeroes of an array.
    pub entries: usize,
    /// The sum of a hash of each (key, value) pair.
    pub digest: u64,
}

impl Contents {
    pub(super) fn add(&mut self, key: &[u8], value: &[u8]) {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        value.hash(&mut h);
        self.entries += 1;
        self.digest = self.digest.wrapping_add(h.finish());
    }
}

const fn hash<K: Pod, V: Pod>(
    name: &'static str,
    version: u32,
    kind: Kind,
    sizing: Sizing,
    copy: CopyHow,
) -> MapSpec {
    MapSpec {
        name,
        version,
        kind,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        sizing,
        flags: 0,
        copy,
        io: Io {
            copy: copy_hash::<K, V>,
            contents: hash_contents::<K, V>,
        },
    }
}

/// A map indexed by a 4-byte id: an array, per-CPU or not.
const fn by_index(
    name: &'static str,
    version: u32,
    kind: Kind,
    value_size: usize,
    sizing: Sizing,
    copy: CopyHow,
    io: Io,
) -> MapSpec {
    MapSpec {
        name,
        version,
        kind,
        key_size: 4,
        value_size,
        sizing,
        flags: 0,
        copy,
        io,
    }
}

const fn array<V: Pod>(name: &'static str, version: u32, sizing: Sizing, copy: CopyHow) -> MapSpec {
    let io = Io {
        copy: copy_array::<V>,
        contents: array_contents::<V>,
    };
    by_index(name, version, Kind::Array, size_of::<V>(), sizing, copy, io)
}

const fn per_cpu<V: Pod>(name: &'static str, version: u32, sizing: Sizing) -> MapSpec {
    let io = Io {
        copy: copy_per_cpu::<V>,
        contents: per_cpu_contents::<V>,
    };
    let kind = Kind::PerCpuArray;
    by_index(
        name,
        version,
        kind,
        size_of::<V>(),
        sizing,
        CopyHow::Slots,
        io,
    )
}

/// A counter array by id (`counters`): a region of ids for each possible CPU.
const fn counters<V: Count>(name: &'static str, version: u32, sizing: Sizing) -> MapSpec {
    let io = Io {
        copy: copy_regions::<V>,
        contents: regions_contents::<V>,
    };
    by_index(
        name,
        version,
        Kind::Array,
        size_of::<V>(),
        sizing,
        CopyHow::Regions,
        io,
    )
}

fn copy_regions<V: Count>(src: MapData, to: &Path, name: &str, _: u32) -> Result<usize> {
    let src = Counters::<V>::of(typed(src, name)?, name)?;
    src.copy_into(&mut Counters::open(to, name)?)
}

/// The ids' totals over every CPU (the CPUs' shares need not match), of the ids below
/// `slots` / the possible CPUs.
fn regions_contents<V: Count>(map: MapData, _: &Path, name: &str, slots: u32) -> Result<Contents> {
    let map = Counters::<V>::of(typed(map, name)?, name)?;
    let ids = slots / super::counters::possible_cpus()?;
    let mut out = Contents::default();
    for (i, v) in map.totals()?.iter().enumerate().take(ids as usize) {
        out.add_slot(i as u32, sys::bytes_of(v));
    }
    Ok(out)
}

/// A program array of the packet programs (`lb_common::MAP_V6_XDP`, `MAP_V6_TC`,
/// `MAP_PMTU_XDP`, `MAP_PMTU_TC`): one slot, the program the loader puts there.
const fn prog_array(name: &'static str, version: u32) -> MapSpec {
    MapSpec {
        name,
        version,
        kind: Kind::ProgArray,
        key_size: 4,
        // A program's descriptor when written, its id when read.
        value_size: 4,
        sizing: Sizing::Program,
        flags: 0,
        copy: CopyHow::Programs,
        io: Io {
            copy: no_copy,
            contents: no_contents,
        },
    }
}

fn no_copy(_: MapData, _: &Path, _: &str, _: u32) -> Result<usize> {
    Ok(0)
}

/// A program array's slots hold the programs of the load that filled them, which differ from
/// load to load: nothing to compare.
fn no_contents(_: MapData, _: &Path, _: &str, _: u32) -> Result<Contents> {
    Ok(Contents::default())
}

/// A flow table (`lb_common::flow_table`): an array of buckets of keys `K`.
const fn flow_table<K: FlowKey + Pod>(name: &'static str, version: u32) -> MapSpec
where
    FlowBucket<K>: Pod + Default,
{
    MapSpec {
        name,
        version,
        kind: Kind::Array,
        key_size: 4,
        value_size: size_of::<FlowBucket<K>>(),
        sizing: Sizing::FlowBuckets,
        flags: common::FLOW_TABLE_FLAGS,
        copy: CopyHow::EntriesTwice,
        io: Io {
            copy: copy_flows::<K>,
            contents: flow_contents::<K>,
        },
    }
}

fn copy_flows<K: FlowKey>(src: MapData, to: &Path, name: &str, _: u32) -> Result<usize>
where
    FlowBucket<K>: Pod + Default,
{
    super::flow_tables::copy::<K>(src, to, name)
}

fn flow_contents<K: FlowKey + Pod>(map: MapData, dir: &Path, name: &str, _: u32) -> Result<Contents>
where
    FlowBucket<K>: Pod + Default,
{
    super::flow_tables::contents::<K>(map, dir, name)
}

use {CopyHow::*, Kind::*, Sizing::*};

/// Every map the agent pins, in the order `lbctl down` removes them.
pub static MAPS: [MapSpec; 32] = [
    hash::<VipKey, Service>(common::MAP_SERVICES, 1, Hash, Services, Entries),
    array::<Backend>(common::MAP_BACKENDS, 1, Backends, Slots),
    MapSpec {
        name: common::MAP_TABLES,
        // 2: chunks of tables of several size classes, named by class and block.
        version: 2,
        kind: ArrayOfMaps,
        key_size: 4,
        // A map id (the agent writes a map's descriptor; the kernel keeps the map).
        value_size: 4,
        sizing: TableChunks,
        flags: 0,
        copy: CopyHow::Tables,
        io: Io {
            copy: super::tables::copy_tables,
            contents: super::tables::contents,
        },
    },
    hash::<MemberKey, Member>(common::MAP_MEMBERS, 1, Hash, Members, Entries),
    flow_table::<Flow>(common::MAP_FLOWS, 3),
    hash::<Flow, ReplyEntry>(common::MAP_REPLIES, 1, LruHash, Flows, EntriesTwice),
    per_cpu::<u64>(common::MAP_STATS, 3, Program),
    array::<u64>(common::MAP_REPLY_PORTS, 1, Program, Slots),
    hash::<BackendKey, BackendVips>(common::MAP_BACKEND_VIPS, 1, Hash, Backends, Entries),
    hash::<BackendKey6, BackendVips6>(common::MAP_BACKEND_VIPS6, 1, Hash, Backends, Entries),
    array::<u64>(
        common::MAP_VIP_FILTER,
        1,
        VipFilterWords,
        Skip(
            "a filter of another size puts the services on other bits: marked from the copied services",
        ),
    ),
    array::<u32>(common::MAP_DEPARTURES, 1, Services, Slots),
    counters::<Traffic>(common::MAP_SERVICE_TRAFFIC, 2, ServicesPerCpu),
    counters::<Traffic>(common::MAP_BACKEND_TRAFFIC, 2, BackendsPerCpu),
    hash::<VipKey6, Service>(common::MAP_SERVICES6, 1, Hash, Services, Entries),
    array::<Backend6>(common::MAP_BACKENDS6, 1, Backends, Slots),
    flow_table::<Flow6>(common::MAP_FLOWS6, 5),
    hash::<Flow6, ReplyEntry6>(common::MAP_REPLIES6, 1, LruHash, Flows, EntriesTwice),
    per_cpu::<u64>(common::MAP_FLOWS_LOST, 1, Program),
    per_cpu::<u64>(common::MAP_FLOW_PRESSURE, 1, Program),
    array::<u64>(
        common::MAP_FLOW_SEED,
        1,
        Program,
        Skip("the same map: a resize pins it in the new directory before it loads"),
    ),
    hash::<FragKey, FragEntry>(common::MAP_FRAGMENTS, 1, LruHash, Program, EntriesTwice),
    array::<u32>(
        common::MAP_CONFIG,
        2,
        Program,
        Skip("written by the loader with the new sizes"),
    ),
    hash::<SockKey, FlowEntry>(common::MAP_SOCK_FWD, 1, LruHash, Program, Entries),
    hash::<SockKey, ReplyEntry6>(common::MAP_SOCK_REV, 1, LruHash, Program, Entries),
    per_cpu::<u64>(common::MAP_SOCK_STATS, 2, Program),
    counters::<u64>(common::MAP_SOCK_SERVICE, 2, ServicesPerCpu),
    counters::<u64>(common::MAP_SOCK_BACKEND, 2, BackendsPerCpu),
    prog_array(common::MAP_V6_XDP, 1),
    prog_array(common::MAP_V6_TC, 1),
    prog_array(common::MAP_PMTU_XDP, 1),
    prog_array(common::MAP_PMTU_TC, 1),
];

/// The spec of map `name`.
pub fn find(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name == name)
}

impl MapSpec {
    /// Copies what the map `src` (of this spec) holds into the map of the same name pinned in
    /// `to`: every entry of a hash map, the slots below both sizes of an array. Entries that
    /// leave an LRU map while it is walked are skipped, as the program would have lost them too.
    /// Returns how many entries (slots, table elements) were copied.
    pub fn copy(&self, src: MapData, to: &Path) -> Result<usize> {
        if let Skip(_) | Programs = self.copy {
            return Ok(0);
        }
        let dst = open_data(to, self.name)?;
        let slots = max_entries(&src, self.name)?.min(max_entries(&dst, self.name)?);
        drop(dst);
        (self.io.copy)(src, to, self.name, slots)
    }

    /// What the map of this spec pinned in `dir` holds; for an array, in the slots a data plane
    /// sized `table` has (so that a map grown by a resize compares equal to the old one).
    pub fn contents(&self, dir: &Path, table: &TableConfig) -> Result<Contents> {
        let map = open_data(dir, self.name)?;
        let slots = match self.sizing.entries(table) {
            Some(n) => n,
            None => max_entries(&map, self.name)?,
        };
        (self.io.contents)(map, dir, self.name, slots)
    }
}

/// Opens map `name` pinned in `dir` as raw map data.
pub(super) fn open_data(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|e| match &e {
        MapError::SyscallError(s) if s.io_error.kind() == std::io::ErrorKind::NotFound => {
            Error::NotRunning(dir.to_path_buf())
        }
        MapError::SyscallError(s) if s.io_error.kind() == std::io::ErrorKind::PermissionDenied => {
            Error::NotPermitted(path.clone())
        }
        _ => Error::map(format!("opening {}", path.display()), e),
    })
}

/// Opens map `name` pinned in `dir` as `M` (a typed aya map), checking its kind and layout.
pub(crate) fn open_map<M>(dir: &Path, name: &str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    typed(open_data(dir, name)?, name)
}

pub(super) fn typed<M>(data: MapData, name: &str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = Map::from_map_data(data).map_err(|e| Error::map(format!("reading {name}"), e))?;
    M::try_from(map).map_err(|e| Error::map(format!("{name} has an unexpected layout"), e))
}

pub(super) fn max_entries(map: &MapData, name: &str) -> Result<u32> {
    Ok(map
        .info()
        .map_err(|e| Error::map(format!("reading {name}'s description"), e))?
        .max_entries())
}

fn copy_hash<K: Pod, V: Pod>(src: MapData, to: &Path, name: &str, _: u32) -> Result<usize> {
    let src: HashMap<MapData, K, V> = typed(src, name)?;
    let mut dst: HashMap<MapData, K, V> = open_map(to, name)?;
    let mut n = 0;
    for (k, v) in src.iter().flatten() {
        dst.insert(k, v, 0)
            .map_err(|e| Error::map(format!("copying {name}"), e))?;
        n += 1;
    }
    Ok(n)
}

fn hash_contents<K: Pod, V: Pod>(map: MapData, _: &Path, name: &str, _: u32) -> Result<Contents> {
    let map: HashMap<MapData, K, V> = typed(map, name)?;
    let mut out = Contents::default();
    for item in map.iter() {
        let (k, v) = item.map_err(|e| Error::map(format!("reading {name}"), e))?;
        out.add(sys::bytes_of(&k), sys::bytes_of(&v));
    }
    Ok(out)
}

/// `copy_array`/`array_contents` and `copy_per_cpu`/`per_cpu_contents`: the first `slots` of an
/// array map of type `$map`, whose value's bytes `$bytes` gives.
macro_rules! slot_maps {
    ($copy:ident, $contents:ident, $map:ident, $bytes:expr) => {
        fn $copy<V: Pod>(src: MapData, to: &Path, name: &str, slots: u32) -> Result<usize> {
            let src: $map<MapData, V> = typed(src, name)?;
            let mut dst: $map<MapData, V> = open_map(to, name)?;
            for i in 0..slots {
                let v = src
                    .get(&i, 0)
                    .map_err(|e| Error::map(format!("reading {name}"), e))?;
                dst.set(i, v, 0)
                    .map_err(|e| Error::map(format!("copying {name}"), e))?;
            }
            Ok(slots as usize)
        }

        fn $contents<V: Pod>(map: MapData, _: &Path, name: &str, slots: u32) -> Result<Contents> {
            let map: $map<MapData, V> = typed(map, name)?;
            let mut out = Contents::default();
            for i in 0..slots.min(map.len()) {
                let v = map
                    .get(&i, 0)
                    .map_err(|e| Error::map(format!("reading {name}"), e))?;
                out.add_slot(i, &$bytes(&v));
            }
            Ok(out)
        }
    };
}
slot_maps!(copy_array, array_contents, Array, |v: &V| sys::bytes_of(v)
    .to_vec());
slot_maps!(
    copy_per_cpu,
    per_cpu_contents,
    PerCpuArray,
    |v: &PerCpuValues<V>| v
        .iter()
        .flat_map(|x| sys::bytes_of(x).iter().copied())
        .collect::<Vec<u8>>()
);

impl Contents {
    /// Adds array slot `i` unless it holds only zeroes (an unused slot).
    pub(super) fn add_slot(&mut self, i: u32, value: &[u8]) {
        if value.iter().any(|b| *b != 0) {
            self.add(&i.to_ne_bytes(), value);
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_fit_the_kernel_and_carry_their_version() {
        let mut seen = BTreeSet::new();
        for m in &MAPS {
            assert!(m.name.len() <= 15, "{} is longer than 15 bytes", m.name);
            assert!(
                m.name.ends_with(&format!("_v{}", m.version)),
                "{} does not end in _v{}",
                m.name,
                m.version
            );
            assert!(seen.insert(m.name), "{} is listed twice", m.name);
        }
    }

    /// The table names exactly the maps the BPF object declares, with their kinds and key and
    /// value sizes: a map added to lb-ebpf and not here (so not sized, copied by a resize or
    /// removed by `down`) fails this test.
    #[test]
    fn the_table_names_every_map_of_the_program() {
        let data = super::super::load::embedded_object();
        assert!(
            !data.is_empty(),
            "lbctl was built without its BPF object (AYA_BUILD_SKIP): build it with `cargo xtask build`"
        );
        let obj = aya_obj::Object::parse(data).expect("parsing the embedded BPF object");
        let declared: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| n.starts_with("lb_"))
            .collect();
        let listed: BTreeSet<&str> = MAPS.iter().map(|m| m.name).collect();
        assert_eq!(declared, listed, "the program's maps and spec::MAPS differ");
        for m in &MAPS {
            let o = &obj.maps[m.name];
            assert_eq!(o.key_size() as usize, m.key_size, "{}: key size", m.name);
            assert_eq!(
                o.value_size() as usize,
                m.value_size,
                "{}: value size",
                m.name
            );
            // BPF_MAP_TYPE_HASH, _ARRAY, _PERCPU_ARRAY, _LRU_HASH, _ARRAY_OF_MAPS.
            let kind = match o.map_type() {
                1 => Kind::Hash,
                2 => Kind::Array,
                3 => Kind::ProgArray,
                6 => Kind::PerCpuArray,
                9 => Kind::LruHash,
                12 => Kind::ArrayOfMaps,
                t => panic!("{}: map type {t} is not one the table knows", m.name),
            };
            assert_eq!(kind, m.kind, "{}: kind", m.name);
            assert_eq!(o.map_flags(), m.flags, "{}: flags", m.name);
        }
        // The chunks' template: what the agent makes each chunk as (`Tables::new_chunk`).
        let inner = obj.maps[common::MAP_TABLES]
            .inner()
            .expect("lb_tables_v2 names its inner map");
        assert_eq!(
            (
                inner.map_type(),
                inner.key_size(),
                inner.value_size(),
                inner.map_flags()
            ),
            (
                2,
                4,
                size_of::<common::RingChunk>() as u32,
                common::TABLE_FLAGS
            ),
            "the tables' template"
        );
        assert_eq!(
            inner.max_entries(),
            common::TABLES_PER_CHUNK * common::ring_stride(common::MAX_RING_SIZE),
            "the template is a chunk of the largest tables"
        );
    }

    /// The loader sizes the programs' per-CPU caches by these names for every possible CPU: a
    /// map of another name would keep the default, one CPU's slots, and every other CPU would
    /// miss.
    #[test]
    fn the_per_cpu_caches_are_the_maps_the_loader_sizes() {
        let obj = aya_obj::Object::parse(super::super::load::embedded_object()).expect("object");
        let slot_bytes = [
            (common::MAP_NEAR_HOPS, 64),
            (common::MAP_NEAR_SINGLES, 32),
            (common::MAP_NEAR_SINGLES6, 64),
        ];
        assert_eq!(slot_bytes.len(), common::PER_CPU_SLOTS.len());
        for ((name, bits), (named, bytes)) in common::PER_CPU_SLOTS.into_iter().zip(slot_bytes) {
            assert_eq!(name, named);
            let map = &obj.maps[name];
            assert_eq!(
                (
                    map.map_type(),
                    map.value_size(),
                    map.map_flags(),
                    map.max_entries()
                ),
                (2, bytes, common::BPF_F_MMAPABLE, 1 << bits),
                "{name}: an array of {bytes}-byte slots, mmapable, one CPU's slots by default"
            );
        }
    }

    #[test]
    fn every_map_sized_by_the_config_grows_with_it() {
        let small = TableConfig::default();
        // (Above 16,384 services, where the VIP filter starts to grow.)
        let big = small
            .with_capacity(32_768, 8192, 131072)
            .expect("valid sizes");
        for m in &MAPS {
            match (m.sizing.entries(&small), m.sizing.entries(&big)) {
                (None, None) => assert_eq!(m.sizing, Program, "{}", m.name),
                (Some(a), Some(b)) if m.sizing != Flows && m.sizing != FlowBuckets => {
                    assert!(b > a, "{}", m.name)
                }
                (Some(a), Some(b)) => assert_eq!(a, b, "{}", m.name),
                other => panic!("{}: {other:?}", m.name),
            }
        }
    }
}
