//! An agent before `lb_tables_v1` kept two Maglev tables for every possible service in one
//! mmapable array (`lb_ring_v2`), each service's entry saying which of its two was live. A newer
//! agent's load carries each live table into a table of its own before any new program runs,
//! so new flows go to the same backends as before from the first packet, and the older pin goes
//! once the new programs are attached (`retire_predecessors`).
use aya::maps::{Array, HashMap, MapData};
use lb_common::{RingChunk, Service, VipKey};
use lbctl::{
    dataplane::{self, Maps, TableConfig, Writer},
    model::{BackendSpec, BackendState, Desired, Proto, ServiceSpec, Vip},
};
use lbtest::privileged_or_skip;
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

/// Removes a pin directory on drop, also when the test fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = dataplane::down(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The smallest size class: every service's table has this configured size (class 0), as all
/// tables had before size classes.
const SIZE: u32 = 251;
const SERVICES: u32 = 16;
/// Elements of one table of `SIZE` slots.
const STRIDE: u32 = 16;

fn desired() -> Desired {
    services(0, 5, |i| (1 + i, i + 1))
}

/// `n` services 172.16.`net`.(i + 1):80, each with the backends `shape(i)` gives: (third octet,
/// how many), at 198.18.octet.(10 + j):8080.
fn services(net: u8, n: u8, shape: impl Fn(u8) -> (u8, u8)) -> Desired {
    (0..n)
        .map(|i| {
            let vip = Vip {
                addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(172, 16, net, i + 1), 80)),
                proto: Proto::Tcp,
            };
            let mut spec = ServiceSpec::new(vip, None);
            let (octet, count) = shape(i);
            for j in 0..count {
                spec.add_backend(BackendSpec {
                    addr: SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::new(198, 18, octet, 10 + j),
                        8080,
                    )),
                    state: BackendState::Active,
                    app: format!("/app{i}").into(),
                    task: format!("t{j}").into(),
                });
            }
            (vip, spec)
        })
        .collect()
}

/// Where each of 200 clients of every service goes, as the kernel's tables say.
fn picks(maps: &Maps, want: &Desired) -> Vec<(Vip, SocketAddr, Option<SocketAddr>)> {
    let mut out = Vec::new();
    for vip in want.keys() {
        for k in 0..200u16 {
            let src = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 2), 1024 + k));
            out.push((*vip, src, maps.pick(vip, src).expect("pick")));
        }
    }
    out
}

/// An empty pin directory (removed on drop) and sizes with room for `services`.
fn fresh(name: &str, services: u32) -> (Pins, TableConfig) {
    let pins = Pins(PathBuf::from("/sys/fs/bpf").join(name));
    let _ = dataplane::down(&pins.0);
    let table = TableConfig::new(SIZE, 0x77)
        .and_then(|t| t.with_capacity(services, 64, 256))
        .expect("sizes");
    (pins, table)
}

/// A data plane loaded in `dir` serving `want`, and where it sends new flows.
#[allow(clippy::type_complexity)]
fn serving(
    dir: &std::path::Path,
    table: &TableConfig,
    want: &Desired,
) -> (aya::Ebpf, Maps, Vec<(Vip, SocketAddr, Option<SocketAddr>)>) {
    let ebpf = dataplane::load_with(dir, table).expect("load");
    let applied = Writer::open(dir).expect("writer").apply(want);
    assert!(applied.failed.is_empty(), "{:?}", applied.failed);
    let maps = Maps::open(dir).expect("maps");
    let before = picks(&maps, want);
    assert!(
        before.iter().all(|(_, _, b)| b.is_some()),
        "every service serves"
    );
    (ebpf, maps, before)
}

#[test]
fn older_tables_are_carried_over() {
    if !privileged_or_skip("older_tables_are_carried_over") {
        return;
    }
    let (pins, table) = fresh("lbt-tables-upgrade", SERVICES);
    let dir = pins.0.clone();
    let want = desired();

    // The tables this layout makes, and where they send new flows.
    let (ebpf, maps, before) = serving(&dir, &table, &want);
    let outer_path = dir.join(lb_common::MAP_TABLES);
    let outer: aya::maps::ArrayOfMaps<_, MapData> =
        aya::maps::Map::from_map_data(MapData::from_pin(&outer_path).expect("pin"))
            .expect("map")
            .try_into()
            .expect("an array of maps");
    let services: HashMap<MapData, VipKey, Service> = aya::maps::Map::from_map_data(
        MapData::from_pin(dir.join(lb_common::MAP_SERVICES)).expect("pin"),
    )
    .expect("map")
    .try_into()
    .expect("a hash map");
    // Each service's table, read from the block its entry names.
    let mut tables: Vec<(u32, Vec<RingChunk>)> = Vec::new();
    for entry in services.iter() {
        let (_, svc) = entry.expect("entry");
        let (chunk, first, _) = lb_common::table_index(svc.table, 0, STRIDE);
        let chunk: Array<MapData, RingChunk> =
            aya::maps::Map::from_map_data(outer.get(&chunk, 0).expect("the table's chunk"))
                .expect("chunk")
                .try_into()
                .expect("an array");
        let t = (first..first + STRIDE)
            .map(|e| chunk.get(&e, 0).expect("element"))
            .collect();
        tables.push((svc.id, t));
    }
    assert_eq!(tables.len(), want.len(), "one table a service");
    drop((outer, services, maps, ebpf));

    // What an older agent would have left: the same tables in lb_ring_v2, each in the half its
    // entry names (odd ids in the second), the other half full of a backend id no service has,
    // and no lb_tables_v2.
    const BPF_F_MMAPABLE: u32 = 1 << 10;
    let mut ring: Array<MapData, RingChunk> =
        Array::create(SERVICES * 2 * STRIDE, BPF_F_MMAPABLE).expect("lb_ring_v2");
    let mut services: HashMap<MapData, VipKey, Service> = aya::maps::Map::from_map_data(
        MapData::from_pin(dir.join(lb_common::MAP_SERVICES)).expect("pin"),
    )
    .expect("map")
    .try_into()
    .expect("a hash map");
    let entries: Vec<(VipKey, Service)> = services.iter().map(|e| e.expect("entry")).collect();
    for (key, svc) in entries {
        let half = svc.id % 2;
        let (_, chunks) = tables
            .iter()
            .find(|(id, _)| *id == svc.id)
            .expect("the service's table");
        for (e, chunk) in chunks.iter().enumerate() {
            let at = |h: u32| (svc.id * 2 + h) * STRIDE + e as u32;
            ring.set(at(half), chunk, 0).expect("old table");
            ring.set(at(half ^ 1), [0xdead; 16], 0).expect("other half");
        }
        let old = Service { table: half, ..svc };
        services.insert(key, old, 0).expect("entry");
    }
    ring.pin(dir.join("lb_ring_v2"))
        .expect("pinning lb_ring_v2");
    std::fs::remove_file(&outer_path).expect("removing lb_tables_v2");
    drop(services);

    // The newer agent's load: the tables are there before any program runs.
    let _ebpf = dataplane::load_with(&dir, &table).expect("load over the older layout");
    assert!(
        dir.join("lb_ring_v2").exists(),
        "the older pin stays until the programs are attached"
    );
    let maps = Maps::open(&dir).expect("maps");
    assert_eq!(
        picks(&maps, &want),
        before,
        "new flows go where the older tables sent them"
    );
    let mut writer = Writer::open(&dir).expect("writer");
    assert!(
        writer.apply(&want).is_noop(),
        "the agent need not write the tables again"
    );
    // Until the links switch, the older programs read the entries' `table` as the live half.
    let services: HashMap<MapData, VipKey, Service> = aya::maps::Map::from_map_data(
        MapData::from_pin(dir.join(lb_common::MAP_SERVICES)).expect("pin"),
    )
    .expect("map")
    .try_into()
    .expect("a hash map");
    for entry in services.iter() {
        let (_, svc) = entry.expect("entry");
        assert_eq!(
            svc.table & 1,
            svc.id % 2,
            "service {}'s block keeps its half",
            svc.id
        );
    }
    let retired = dataplane::retire_predecessors(&dir).expect("retire");
    assert!(retired.contains(&"lb_ring_v2".to_string()), "{retired:?}");
    assert!(!dir.join("lb_ring_v2").exists(), "the older pin is gone");
    assert_eq!(picks(&maps, &want), before, "and the tables stay");
}

/// An agent before size classes kept its chunks in `lb_tables_v1`, every table of the configured
/// size, each service's entry naming a block alone: a block of class 0, named the same way in
/// `lb_tables_v2`. A newer agent's load puts those chunks into `lb_tables_v2` before any new
/// program runs, so new flows go where they went, and the older pin goes once the programs are
/// attached. (The pin is made by renaming a newer agent's: the same map type and the same
/// tables, since at this size every table is of class 0.)
#[test]
fn chunks_of_lb_tables_v1_are_carried_over() {
    if !privileged_or_skip("chunks_of_lb_tables_v1_are_carried_over") {
        return;
    }
    let (pins, table) = fresh("lbt-tables-v1", SERVICES);
    let dir = pins.0.clone();
    let want = desired();
    let (ebpf, maps, before) = serving(&dir, &table, &want);
    let chunks = maps.table_chunks().expect("chunks");
    drop((maps, ebpf));
    let v1 = dir.join("lb_tables_v1");
    std::fs::rename(dir.join(lb_common::MAP_TABLES), &v1).expect("renaming the pin");

    let _ebpf = dataplane::load_with(&dir, &table).expect("load over lb_tables_v1");
    assert!(
        v1.exists(),
        "the older pin stays until the programs are attached"
    );
    let maps = Maps::open(&dir).expect("maps");
    assert_eq!(
        maps.table_chunks().expect("chunks"),
        chunks,
        "the same chunks"
    );
    assert_eq!(picks(&maps, &want), before, "new flows go where they went");
    assert!(
        Writer::open(&dir).expect("writer").apply(&want).is_noop(),
        "the agent need not write the tables again"
    );
    let retired = dataplane::retire_predecessors(&dir).expect("retire");
    assert!(retired.contains(&"lb_tables_v1".to_string()), "{retired:?}");
    assert!(!v1.exists(), "the older pin is gone");
    assert_eq!(picks(&maps, &want), before, "and the tables stay");
}

/// A block a service just left is not the next one written: writes take the block freed
/// longest ago, and 16 stay free (a packet that read the service's former entry may still be
/// reading that block for a few microseconds). Chunks no service uses are removed.
#[test]
fn a_block_just_left_is_written_last() {
    if !privileged_or_skip("a_block_just_left_is_written_last") {
        return;
    }
    let (pins, table) = fresh("lbt-tables-reuse", SERVICES * 4);
    let dir = pins.0.clone();
    let _ebpf = dataplane::load_with(&dir, &table).expect("load");
    let mut writer = Writer::open(&dir).expect("writer");
    let mut want = desired();
    assert!(writer.apply(&want).failed.is_empty());
    let maps = Maps::open(&dir).expect("maps");
    let block = |vip: &Vip| maps.read().expect("read").services[vip].table;
    let first = *want.keys().next().expect("a service");
    let left = block(&first);
    // The first service's backends change: it moves to another block.
    let spec = want.get_mut(&first).expect("spec");
    spec.add_backend(BackendSpec {
        addr: "198.18.9.9:8080".parse().expect("addr"),
        state: BackendState::Active,
        app: "/app0".into(),
        task: "moved".into(),
    });
    assert_eq!(writer.apply(&want).changed.len(), 1);
    assert_ne!(block(&first), left, "a new table goes into another block");
    // Services arriving next take other blocks, however many fit the chunks there are.
    for i in 0..8u8 {
        let vip = Vip {
            addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(172, 16, 1, i + 1), 80)),
            proto: Proto::Tcp,
        };
        let mut spec = ServiceSpec::new(vip, None);
        spec.add_backend(BackendSpec {
            addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, 8, i + 1), 8080)),
            state: BackendState::Active,
            app: format!("/new{i}").into(),
            task: "t".into(),
        });
        want.insert(vip, spec);
        assert!(writer.apply(&want).failed.is_empty());
        assert_ne!(block(&vip), left, "service {i} took the block just left");
    }
    // Every service but one leaves: only its chunk and the spare stay (16 blocks and a chunk
    // more: three chunks). Chunks go at most 4 an apply.
    let one: Desired = want.iter().take(1).map(|(v, s)| (*v, s.clone())).collect();
    for _ in 0..2 {
        assert!(writer.apply(&one).failed.is_empty());
    }
    assert_eq!(
        maps.table_chunks().expect("chunks"),
        3,
        "the chunks follow the services"
    );
    // The last one leaves: a size no service uses keeps no spare.
    assert!(writer.apply(&Desired::new()).failed.is_empty());
    assert_eq!(maps.table_chunks().expect("chunks"), 0, "no chunk is left");
}

/// Sizes by backends: at the default size, services of 1 to 20 backends get tables of 251 to
/// 2039 slots, in chunks of their class; new flows go where the control plane predicts; when
/// every service moves to another class, the data plane's room (a chunk for each service's
/// 16, one to spare and one per class) still holds them all, and chunks follow the services.
#[test]
fn tables_take_the_size_of_their_backends() {
    if !privileged_or_skip("tables_take_the_size_of_their_backends") {
        return;
    }
    let pins = Pins(PathBuf::from("/sys/fs/bpf/lbt-tables-sizes"));
    let _ = dataplane::down(&pins.0);
    let table = TableConfig::new(lb_common::DEFAULT_RING_SIZE, 0x77)
        .and_then(|t| t.with_capacity(SERVICES, 64, 512))
        .expect("sizes");
    let dir = pins.0.clone();
    let _ebpf = dataplane::load_with(&dir, &table).expect("load");
    let mut writer = Writer::open(&dir).expect("writer");
    let maps = Maps::open(&dir).expect("maps");
    let check = |want: &Desired, when: &str| {
        let state = maps.read().expect("read");
        for (vip, spec) in want {
            let n = spec.backends.len();
            let t = state.services[vip].table;
            assert_eq!(
                table.size_of(t),
                table.size_for(n),
                "{when}: {vip} ({n} backends)"
            );
            for k in 0..50u16 {
                let src = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 2), 2000 + k));
                assert_eq!(
                    maps.pick(vip, src).expect("pick"),
                    dataplane::predict(spec, src, &table),
                    "{when}: {vip} ({n} backends) from {src}"
                );
            }
        }
    };
    // 1, 4, 7 and 10 backends: classes 1 (251 slots), 2 (509) and 3 (1021).
    let first = services(2, SERVICES as u8, |i| (2, (i % 4) * 3 + 1));
    let applied = writer.apply(&first);
    assert!(applied.failed.is_empty(), "{:?}", applied.failed);
    check(&first, "first");
    // 11 to 20 backends: all of class 4 (2039 slots).
    let second = services(2, SERVICES as u8, |i| (2, 11 + i % 10));
    let applied = writer.apply(&second);
    assert!(applied.failed.is_empty(), "{:?}", applied.failed);
    assert_eq!(applied.changed.len(), SERVICES as usize);
    check(&second, "second");
    assert!(writer.apply(&second).is_noop(), "and they stay");
    // Every service leaves: chunks go, 4 at most an apply.
    for _ in 0..4 {
        assert!(writer.apply(&Desired::new()).failed.is_empty());
    }
    assert_eq!(
        maps.table_chunks().expect("chunks"),
        0,
        "the chunks follow the services"
    );
}

/// Chunks are made with a chunk to spare beyond the 16 blocks: 16 services of one size class
/// fill a chunk exactly, and the change of one of them that follows must make no chunk (making
/// one waits for an RCU grace period of the outer map: 20 ms on the path of a task event).
#[test]
fn a_change_after_an_apply_makes_no_chunk() {
    if !privileged_or_skip("a_change_after_an_apply_makes_no_chunk") {
        return;
    }
    let (pins, table) = fresh("lbt-tables-spare", SERVICES * 2);
    let dir = pins.0.clone();
    let _ebpf = dataplane::load_with(&dir, &table).expect("load");
    let mut writer = Writer::open(&dir).expect("writer");
    // Two backends each: every table is of one class.
    let mut want = services(0, SERVICES as u8, |i| (1 + i, 2));
    assert_eq!(writer.apply(&want).added.len(), SERVICES as usize);
    let maps = Maps::open(&dir).expect("maps");
    let chunks = maps.table_chunks().expect("chunks");
    assert_eq!(chunks, 3, "16 blocks used, 16 spare and a chunk more");
    let vips: Vec<Vip> = want.keys().take(4).copied().collect();
    for (k, vip) in vips.iter().enumerate() {
        let spec = want.get_mut(vip).expect("spec");
        let moved = spec.backends.keys().next().copied().expect("a backend");
        spec.backends.remove(&moved);
        spec.add_backend(BackendSpec {
            addr: SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(198, 18, 99, k as u8 + 1),
                8080,
            )),
            state: BackendState::Active,
            app: "/moved".into(),
            task: "t".into(),
        });
        assert_eq!(writer.apply(&want).changed.len(), 1, "change {k}");
        assert_eq!(
            maps.table_chunks().expect("chunks"),
            chunks,
            "change {k} made a chunk"
        );
    }
}
