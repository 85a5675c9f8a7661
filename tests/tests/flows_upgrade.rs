//! An agent before the flow tables of buckets kept its flows in LRU hashes (`lb_ct_v1`,
//! `lb_ct6_v1`), the next one its IPv6 flows in buckets of another hash (`lb_ct6_v2`), and the
//! next in buckets of 56-byte slots (`lb_ct6_v3`), the next in buckets whose keys' first bucket
//! was any of the table's (`lb_ct_v2`, `lb_ct6_v4`). A newer agent makes `lb_ct_v3` / `lb_ct6_v5`
//! beside them; once its programs are attached,
//! `retire_predecessors` carries every flow over (a flow the new programs tracked in the
//! meantime keeps its new entry) and removes the older pins. A pin under those names of another
//! layout is refused, and `down` removes the older tables.
use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    Flow, Flow6, FlowEntry, MAP_FLOW_SEED, MAP_FLOWS, MAP_FLOWS_V1, MAP_FLOWS_V2, MAP_FLOWS6,
    MAP_FLOWS6_V1, MAP_FLOWS6_V2, MAP_FLOWS6_V3, MAP_FLOWS6_V4,
    flow_table::{self, Flow6V2, Flow6V3, FlowBucket, FlowKey, bucket_of, buckets_of},
};
use lbctl::{
    dataplane::{self, FlowTable, TableConfig},
    error::Error,
};
use lbtest::privileged_or_skip;
use std::path::{Path, PathBuf};

/// Removes a pin directory on drop, also when the test fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = dataplane::down(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn flow(i: u32) -> Flow {
    Flow {
        src: (0xc612_0000 | i).to_be(),
        dst: 0xac10_0001u32.to_be(),
        sport: (40_000 + i as u16).to_be(),
        dport: 8080u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

fn flow6(i: u32) -> Flow6 {
    Flow6 {
        src: [0x2001_0002u32.to_be(), 0, 0, i.to_be()],
        dst: [0x2001_0002u32.to_be(), 0, 1, 1u32.to_be()],
        sport: (40_000 + i as u16).to_be(),
        dport: 8080u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// A map of `kind` with `key`- and `value`-byte entries, pinned as `name` in `dir`.
fn pin_map(dir: &Path, name: &str, kind: u32, key: usize, value: usize) -> MapData {
    let obj = aya_obj::Map::new_from_params(kind, key as u32, value as u32, 1024, 0);
    let data = MapData::create(obj, name, None).expect("creating a map");
    data.pin(dir.join(name)).expect("pinning it");
    data
}

/// An LRU hash like an older agent's flow table, pinned as `name` in `dir`.
fn older_table<K: aya::Pod>(dir: &Path, name: &str) -> HashMap<MapData, K, FlowEntry> {
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let data = pin_map(
        dir,
        name,
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<K>(),
        size_of::<FlowEntry>(),
    );
    aya::maps::Map::from_map_data(data)
        .expect("map")
        .try_into()
        .expect("a hash map")
}

/// Asserts that the layout check refuses the pin `name` in `dir`, saying `why`.
fn refused(dir: &Path, name: &str, why: &str) {
    match dataplane::check_layouts(dir) {
        Err(Error::Layout { maps, .. }) => {
            assert!(maps.contains(name) && maps.contains(why), "{maps}")
        }
        other => panic!("{other:?}"),
    }
}

/// A data plane made for 4,096 flows in the pin directory `pins`, whose layout check refuses a
/// hash (values of `bucket` bytes) pinned as `old_name`, saying `why`: an older agent left no
/// such thing there. Returns the directory (removed on drop) and the loaded programs.
fn loaded_refusing_a_hash(
    pins: &str,
    old_name: &str,
    bucket: usize,
    why: &str,
) -> (Pins, aya::Ebpf) {
    let pins = Pins(PathBuf::from("/sys/fs/bpf").join(pins));
    let _ = dataplane::down(&pins.0);
    let table = TableConfig::default().with_flows(4096).expect("sizes");
    let ebpf = dataplane::load_with(&pins.0, &table).expect("load");
    drop(pin_map(&pins.0, old_name, 1, 4, bucket));
    refused(&pins.0, old_name, why);
    std::fs::remove_file(pins.0.join(old_name)).expect("unpin");
    (pins, ebpf)
}

#[test]
fn flows_of_the_older_tables_are_carried_over() {
    if !privileged_or_skip("flows_of_the_older_tables_are_carried_over") {
        return;
    }
    let pins = Pins(PathBuf::from("/sys/fs/bpf/lbt-flows-upgrade"));
    let dir = pins.0.clone();
    let _ = dataplane::down(&dir);
    // The default size: 65,536 buckets, which a walk reads in several batches.
    let table = TableConfig::default();
    let _ebpf = dataplane::load_with(&dir, &table).expect("load");

    let mut v4 = older_table::<Flow>(&dir, MAP_FLOWS_V1);
    let mut v6 = older_table::<Flow6>(&dir, MAP_FLOWS6_V1);
    let entry = |i: u32| FlowEntry::new(3, 100 + i).noted(1, 5 << 24);
    for i in 0..300 {
        v4.insert(flow(i), entry(i), 0).expect("an older flow");
    }
    for i in 0..20 {
        v6.insert(flow6(i), entry(i), 0).expect("an older flow");
    }
    dataplane::check_layouts(&dir).expect("older flow tables are not a foreign layout");
    // A flow the new program tracked before the carry: its own entry stays.
    let mut new4: FlowTable<Flow> = FlowTable::open(&dir, MAP_FLOWS).expect("lb_ct_v3");
    let own = FlowEntry::new(3, 7);
    assert!(new4.insert_absent(&flow(0), &own).expect("write"));

    let retired = dataplane::retire_predecessors(&dir).expect("retire");
    assert!(
        retired.contains(&MAP_FLOWS_V1.to_string()) && retired.contains(&MAP_FLOWS6_V1.to_string()),
        "{retired:?}"
    );
    assert!(!dir.join(MAP_FLOWS_V1).exists() && !dir.join(MAP_FLOWS6_V1).exists());
    let new6 = FlowTable::<Flow6>::open(&dir, MAP_FLOWS6).expect("lb_ct6_v5");
    assert_eq!(new4.get(&flow(0)).expect("read"), Some(own));
    // 300 flows in 65,536 buckets of four: none is pushed out.
    for i in 1..300 {
        assert_eq!(
            new4.get(&flow(i)).expect("read"),
            Some(entry(i)),
            "flow {i}"
        );
    }
    for i in 0..20 {
        assert_eq!(
            new6.get(&flow6(i)).expect("read"),
            Some(entry(i)),
            "flow6 {i}"
        );
    }
    assert_eq!(new4.entries().expect("read").len(), 300);
    assert_eq!(new6.entries().expect("read").len(), 20);

    // `down` removes an older table too.
    drop(older_table::<Flow>(&dir, MAP_FLOWS_V1));
    let removed = dataplane::down(&dir).expect("down");
    assert!(
        removed.maps.contains(&MAP_FLOWS_V1.to_string()),
        "{removed:?}"
    );
    assert!(!dir.exists(), "{removed:?}");
}

#[test]
fn an_older_flow_table_of_another_layout_is_refused() {
    if !privileged_or_skip("an_older_flow_table_of_another_layout_is_refused") {
        return;
    }
    let pins = Pins(PathBuf::from("/sys/fs/bpf/lbt-flows-foreign"));
    let dir = pins.0.clone();
    let _ = dataplane::down(&dir);
    let table = TableConfig::default().with_flows(4096).expect("sizes");
    let _ebpf = dataplane::load_with(&dir, &table).expect("load");
    // A hash of 16-byte keys to 16-byte values: not the older agents' flow table.
    drop(pin_map(&dir, MAP_FLOWS_V1, 1, 16, 16));
    refused(&dir, MAP_FLOWS_V1, "not an LRU hash of flows");
    assert!(dataplane::retire_predecessors(&dir).is_err());
    assert!(dir.join(MAP_FLOWS_V1).exists(), "left in place");
    let removed = dataplane::down(&dir).expect("down");
    assert!(
        removed.left.iter().any(|l| l.contains(MAP_FLOWS_V1)),
        "{removed:?}"
    );
    let _ = std::fs::remove_file(dir.join(MAP_FLOWS_V1));
}

#[test]
fn flows_of_the_older_ipv6_buckets_are_carried_over() {
    if !privileged_or_skip("flows_of_the_older_ipv6_buckets_are_carried_over") {
        return;
    }
    // Buckets of the chained hash.
    carries_ipv6_buckets("lbt-flows-upgrade6", MAP_FLOWS6_V2, Flow6V2);
}

#[test]
fn flows_of_the_ipv6_buckets_of_unaligned_slots_are_carried_over() {
    if !privileged_or_skip("flows_of_the_ipv6_buckets_of_unaligned_slots_are_carried_over") {
        return;
    }
    // Buckets of 56-byte slots, hashed as the new ones.
    carries_ipv6_buckets("lbt-flows-upgrade6v3", MAP_FLOWS6_V3, Flow6V3);
}

/// An older agent's IPv6 table of buckets `old_name` (keys `K`, made of a `Flow6` by `wrap`) is
/// refused when it is not an array of its buckets, else its flows are carried into `lb_ct6_v5`
/// and its pin removed.
fn carries_ipv6_buckets<K: FlowKey>(pins: &str, old_name: &str, wrap: fn(Flow6) -> K)
where
    FlowBucket<K>: aya::Pod + Default,
{
    let bucket = size_of::<FlowBucket<K>>();
    let (pins, _ebpf) =
        loaded_refusing_a_hash(pins, old_name, bucket, "not an array of IPv6 flow buckets");
    let dir = pins.0.clone();
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // Nor is an array of buckets of the new table's layout.
    drop(pin_map(
        &dir,
        old_name,
        BPF_MAP_TYPE_ARRAY,
        4,
        size_of::<FlowBucket<Flow6>>(),
    ));
    refused(&dir, old_name, "not an array of IPv6 flow buckets");
    std::fs::remove_file(dir.join(old_name)).expect("unpin");

    // The older agent's table, with the same seed (`lb_ctseed_v1` is shared).
    drop(pin_map(&dir, old_name, BPF_MAP_TYPE_ARRAY, 4, bucket));
    let mut old: FlowTable<K> = FlowTable::open(&dir, old_name).expect("the older table");
    let entry = |i: u32| FlowEntry::new(4, 200 + i).noted(1, 5 << 24);
    for i in 0..100 {
        assert!(
            old.insert_absent(&wrap(flow6(i)), &entry(i))
                .expect("write")
        );
    }
    assert_eq!(old.entries().expect("read").len(), 100);
    dataplane::check_layouts(&dir).expect("the older IPv6 table is not a foreign layout");

    let retired = dataplane::retire_predecessors(&dir).expect("retire");
    assert!(retired.contains(&old_name.to_string()), "{retired:?}");
    assert!(!dir.join(old_name).exists());
    let new6 = FlowTable::<Flow6>::open(&dir, MAP_FLOWS6).expect("lb_ct6_v5");
    for i in 0..100 {
        assert_eq!(
            new6.get(&flow6(i)).expect("read"),
            Some(entry(i)),
            "flow6 {i}"
        );
    }
    assert_eq!(new6.entries().expect("read").len(), 100);
}

#[test]
fn flows_of_the_tables_whose_first_buckets_were_anywhere_are_carried_over() {
    if !privileged_or_skip("flows_of_the_tables_whose_first_buckets_were_anywhere_are_carried_over")
    {
        return;
    }
    carries_spread_buckets(
        "lbt-flows-upgrade-spread4",
        MAP_FLOWS_V2,
        MAP_FLOWS,
        flow,
        "IPv4",
    );
    carries_spread_buckets(
        "lbt-flows-upgrade-spread6",
        MAP_FLOWS6_V4,
        MAP_FLOWS6,
        flow6,
        "IPv6",
    );
}

/// An older agent's table `old_name` of `new_name`'s layout, whose keys' first bucket was any
/// of the table's: refused when it is not an array of its buckets; else its flows, each written
/// where the older agent put it (in its first bucket then, which is none of the two a key has
/// now), are carried into `new_name` and its pin removed.
fn carries_spread_buckets<K: FlowKey>(
    pins: &str,
    old_name: &str,
    new_name: &str,
    key: fn(u32) -> K,
    family: &str,
) where
    FlowBucket<K>: aya::Pod + Default,
{
    let bucket = size_of::<FlowBucket<K>>();
    let why = format!("not an array of {family} flow buckets");
    let (pins, _ebpf) = loaded_refusing_a_hash(pins, old_name, bucket, &why);
    let dir = pins.0.clone();
    const BPF_MAP_TYPE_ARRAY: u32 = 2;

    // The older agent's table (1,024 buckets), with the same seed (`lb_ctseed_v1` is shared),
    // its flows written by its rule: each in the first free slot of its first bucket.
    let data = pin_map(&dir, old_name, BPF_MAP_TYPE_ARRAY, 4, bucket);
    let mut old: Array<MapData, FlowBucket<K>> = aya::maps::Map::from_map_data(data)
        .expect("map")
        .try_into()
        .expect("an array");
    let seed: Array<MapData, u64> =
        aya::maps::Map::from_map_data(MapData::from_pin(dir.join(MAP_FLOW_SEED)).expect("seed"))
            .expect("map")
            .try_into()
            .expect("an array");
    let keys = K::keys(seed.get(&0, 0).expect("the seed"));
    let entry = |i: u32| FlowEntry::new(4, 200 + i).noted(1, 5 << 24);
    let mut written = Vec::new();
    for i in 0..10_000 {
        if written.len() == 100 {
            break;
        }
        let (k, mix) = (key(i), key(i).mix(&keys));
        let then = bucket_of(mix, 1024);
        // Only keys whose bucket then is neither of those they have now.
        let (first, second) = buckets_of(mix, 1024);
        if then == first || then == second {
            continue;
        }
        let mut b = old.get(&then, 0).expect("read");
        let Some(slot) = b.slots.iter_mut().find(|s| s.check == 0) else {
            continue;
        };
        flow_table::fill(slot, &k, mix, &entry(i));
        old.set(then, b, 0).expect("write");
        written.push(i);
    }
    assert_eq!(written.len(), 100);
    let before = FlowTable::<K>::open(&dir, old_name).expect("the older table");
    assert_eq!(before.entries().expect("read").len(), 100);
    // Where they are, the new rule does not find them.
    for &i in &written {
        assert_eq!(
            before.get(&key(i)).expect("read"),
            None,
            "{family} flow {i}"
        );
    }
    dataplane::check_layouts(&dir).expect("the older table is not a foreign layout");

    let retired = dataplane::retire_predecessors(&dir).expect("retire");
    assert!(retired.contains(&old_name.to_string()), "{retired:?}");
    assert!(!dir.join(old_name).exists());
    let new = FlowTable::<K>::open(&dir, new_name).expect("the new table");
    for &i in &written {
        assert_eq!(
            new.get(&key(i)).expect("read"),
            Some(entry(i)),
            "{family} flow {i}"
        );
    }
    assert_eq!(new.entries().expect("read").len(), 100);
}
