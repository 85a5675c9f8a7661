//! The flow tables (`lb_ct_v2`, `lb_ct6_v2`): lookups, inserts and removals of the layout in
//! `lb_common::flow_table`, on one bucket each.
use aya_ebpf::maps::Array;
use lb_common::{
    FlowEntry, MAX_FLOWS,
    flow_table::{FLOW_SLOTS, FlowBucket, FlowKey, bucket_of, fill, flow_buckets, slot_for},
};

/// The flow tables' seed (`lb_common::GLOBAL_FLOW_SEED`), which the loader sets from
/// `lb_ctseed_v1` (the default is never used: a non-zero value keeps it in `.rodata`).
#[unsafe(no_mangle)]
static LB_FLOW_SEED: u64 = 0x5eed_f10e_0000_0001;

/// The flow tables' buckets (`lb_common::GLOBAL_FLOW_BUCKETS`), which the loader sets from the
/// flow table size it created them with.
#[unsafe(no_mangle)]
static LB_FLOW_BUCKETS: u32 = flow_buckets(MAX_FLOWS);

/// The hash of `key` and its bucket.
#[inline(always)]
fn place<K: FlowKey>(key: &K) -> (u64, u32) {
    // SAFETY: reads of constants the loader sets before the program is loaded (volatile: the
    // compiler must not fold the defaults in).
    let (seed, buckets) = unsafe {
        (
            core::ptr::read_volatile(&LB_FLOW_SEED),
            core::ptr::read_volatile(&LB_FLOW_BUCKETS),
        )
    };
    let mix = key.mix(seed);
    (mix, bucket_of(mix, buckets))
}

/// The entry of `key`'s flow, in place.
#[inline(always)]
pub fn find<K: FlowKey>(map: &Array<FlowBucket<K>>, key: &K) -> Option<*mut FlowEntry> {
    let (mix, b) = place(key);
    // SAFETY: a map value; concurrent writers are what the slots' checks are for.
    let bucket = unsafe { &mut *map.get_ptr_mut(b)? };
    for i in 0..FLOW_SLOTS {
        let s = &mut bucket.slots[i];
        if s.holds(key, mix) {
            return Some(&mut s.entry as *mut FlowEntry);
        }
    }
    None
}

/// Writes `entry` for `key`: over its own slot, an empty one, or the one of its bucket noted
/// longest ago (`slot_for`).
#[inline(always)]
pub fn insert<K: FlowKey>(
    map: &Array<FlowBucket<K>>,
    key: &K,
    entry: &FlowEntry,
    now: u64,
) -> Result<(), i32> {
    let (mix, b) = place(key);
    let Some(bucket) = map.get_ptr_mut(b) else {
        return Err(-1);
    };
    // SAFETY: as in `find`.
    let bucket = unsafe { &mut *bucket };
    let i = slot_for(bucket, key, mix, now);
    let Some(slot) = bucket.slots.get_mut(i) else {
        return Err(-1);
    };
    fill(slot, key, mix, entry);
    Ok(())
}

/// Empties `key`'s slot.
#[inline(always)]
pub fn remove<K: FlowKey>(map: &Array<FlowBucket<K>>, key: &K) {
    let (mix, b) = place(key);
    let Some(bucket) = map.get_ptr_mut(b) else {
        return;
    };
    // SAFETY: as in `find`.
    let bucket = unsafe { &mut *bucket };
    for i in 0..FLOW_SLOTS {
        let s = &mut bucket.slots[i];
        if s.holds(key, mix) {
            s.check = 0;
        }
    }
}
