//! The flow tables (`lb_ct_v3`, `lb_ct6_v5`): lookups, inserts and removals of the layout in
//! `lb_common::flow_table`, each on a flow's two buckets.
use crate::maps::{FLOWS, FLOWS6, flow_pressure};
use aya_ebpf::maps::Array;
use lb_common::{
    FLOW_PRESSURE_EVICTED, FLOW_PRESSURE_MOVED, Flow, Flow6, FlowEntry, MAX_FLOWS,
    flow_table::{
        Buckets, FLOW_SLOTS, FLOW6_KEY_WORDS, FlowBucket, FlowKey, buckets_of, flow_buckets,
        move_out, put,
    },
};

/// The flow tables' seed (`lb_common::GLOBAL_FLOW_SEED`), which the loader sets from
/// `lb_ctseed_v1` (the default is never used: a non-zero value keeps it in `.rodata`).
#[unsafe(no_mangle)]
static LB_FLOW_SEED: u64 = 0x5eed_f10e_0000_0001;

/// The keys of `lb_ct6_v5`'s hash (`lb_common::GLOBAL_FLOW_KEYS6`: `FlowKey::keys` of the
/// seed), which the loader sets (non-zero defaults, never used, keep them in `.rodata`).
#[unsafe(no_mangle)]
static LB_FLOW_KEYS6: [u32; FLOW6_KEY_WORDS] = [1; FLOW6_KEY_WORDS];

/// The flow tables' buckets (`lb_common::GLOBAL_FLOW_BUCKETS`), which the loader sets from the
/// flow table size it created them with.
#[unsafe(no_mangle)]
static LB_FLOW_BUCKETS: u32 = flow_buckets(MAX_FLOWS);

/// A flow key whose hash keys the loader set as globals.
pub trait Keyed: FlowKey + 'static {
    /// The keys of the table's hash.
    fn loaded_keys() -> Self::Keys;
    /// Its table (`lb_ct_v3` or `lb_ct6_v5`).
    fn table() -> &'static Array<FlowBucket<Self>>;
    /// Its table's `lb_locate*`.
    fn locate(key: &Self) -> u64;
    /// Its table's `lb_insert*`.
    fn insert_call(key: &Self, entry: &FlowEntry, evict: u32) -> i32;
    /// Its table's `lb_room*`.
    fn room_call(key: &Self, which: u32) -> i32;
    /// Its table's `lb_remove*`.
    fn remove_call(key: &Self);
}

// SAFETY (both): reads of constants the loader sets before the program is loaded (volatile:
// the compiler must not fold the defaults in).
impl Keyed for Flow {
    #[inline(always)]
    fn loaded_keys() -> u64 {
        unsafe { core::ptr::read_volatile(&LB_FLOW_SEED) }
    }
    #[inline(always)]
    fn table() -> &'static Array<FlowBucket<Flow>> {
        &FLOWS
    }
    #[inline(always)]
    fn locate(key: &Flow) -> u64 {
        lb_locate4(key)
    }
    #[inline(always)]
    fn insert_call(key: &Flow, entry: &FlowEntry, evict: u32) -> i32 {
        lb_insert4(key, entry, evict)
    }
    #[inline(always)]
    fn room_call(key: &Flow, which: u32) -> i32 {
        lb_room4(key, which)
    }
    #[inline(always)]
    fn remove_call(key: &Flow) {
        let _ = lb_remove4(key);
    }
}

impl Keyed for Flow6 {
    #[inline(always)]
    fn loaded_keys() -> [u32; FLOW6_KEY_WORDS] {
        unsafe { core::ptr::read_volatile(&LB_FLOW_KEYS6) }
    }
    #[inline(always)]
    fn table() -> &'static Array<FlowBucket<Flow6>> {
        &FLOWS6
    }
    #[inline(always)]
    fn locate(key: &Flow6) -> u64 {
        lb_locate6(key)
    }
    #[inline(always)]
    fn insert_call(key: &Flow6, entry: &FlowEntry, evict: u32) -> i32 {
        lb_insert6(key, entry, evict)
    }
    #[inline(always)]
    fn room_call(key: &Flow6, which: u32) -> i32 {
        lb_room6(key, which)
    }
    #[inline(always)]
    fn remove_call(key: &Flow6) {
        let _ = lb_remove6(key);
    }
}

/// The flow tables' bucket count, as the loader set it.
#[inline(always)]
fn bucket_count() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&LB_FLOW_BUCKETS) }
}

/// The hash of `key` and its two buckets.
#[inline(always)]
fn place<K: Keyed>(key: &K) -> (u64, u32, u32) {
    let buckets = bucket_count();
    let mix = key.mix(&K::loaded_keys());
    let (first, second) = buckets_of(mix, buckets);
    (mix, first, second)
}

/// Always 0, in `.bss`, which the verifier cannot read as a constant (unlike `.rodata`).
#[unsafe(no_mangle)]
static mut LB_OPAQUE_ZERO: u32 = 0;

/// The slot of `key` in bucket `b`.
#[inline(always)]
fn slot_in<K: Keyed>(
    map: &Array<FlowBucket<K>>,
    b: u32,
    key: &K,
    mix: u64,
) -> Option<(*mut FlowBucket<K>, u32)> {
    let bucket = map.get_ptr_mut(b)?;
    // SAFETY: a map value; concurrent writers are what the slots' checks are for.
    let slots = unsafe { &(*bucket).slots };
    for (i, s) in slots.iter().enumerate() {
        if s.holds(key, mix) {
            return Some((bucket, i as u32));
        }
    }
    None
}

/// Where `key`'s flow is: `bucket * FLOW_SLOTS + slot + 1`, or 0 when it is in neither of its
/// buckets.
#[inline(always)]
fn locate<K: Keyed>(map: &Array<FlowBucket<K>>, key: &K) -> u64 {
    let (mix, first, second) = place(key);
    let at = |b: u32, i: u32| b as u64 * FLOW_SLOTS as u64 + i as u64 + 1;
    match slot_in(map, first, key, mix) {
        Some((_, i)) => at(first, i),
        None => match slot_in(map, second, key, mix) {
            Some((_, i)) => at(second, i),
            None => 0,
        },
    }
}

/// `locate` in `lb_ct_v3`, as a global function: the kernel verifies it once, not at every
/// place a flow is looked up.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_locate4(key: *const Flow) -> u64 {
    // SAFETY: checked for null; the kernel checked that the caller passed a whole `Flow`.
    match unsafe { key.as_ref() } {
        Some(key) => locate(Flow::table(), key),
        None => 0,
    }
}

/// `locate` in `lb_ct6_v5`, as `lb_locate4`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_locate6(key: *const Flow6) -> u64 {
    // SAFETY: as in `lb_locate4`.
    match unsafe { key.as_ref() } {
        Some(key) => locate(Flow6::table(), key),
        None => 0,
    }
}

/// The entry of `key`'s flow, in place (in its first bucket, else its second), marked used.
#[inline(always)]
pub fn find<K: Keyed>(map: &Array<FlowBucket<K>>, key: &K) -> Option<*mut FlowEntry> {
    let (mix, first, second) = place(key);
    let (bucket, i) = match slot_in(map, first, key, mix) {
        Some(found) => found,
        None => slot_in(map, second, key, mix)?,
    };
    // The eight ways to find a flow (two buckets, four slots) would each carry their own
    // pointer through the rest of the program for the verifier, which walks each: the slot's
    // index plus a zero it cannot know makes them one (an index below four in a bucket).
    // SAFETY: a read of a global nothing writes.
    let zero = unsafe { core::ptr::read_volatile(&raw const LB_OPAQUE_ZERO) };
    Some(used_entry(
        bucket,
        (i.wrapping_add(zero) as usize) % FLOW_SLOTS,
    ))
}

/// The entry of slot `i` of `bucket`, marked used.
#[inline(always)]
fn used_entry<K: FlowKey>(bucket: *mut FlowBucket<K>, i: usize) -> *mut FlowEntry {
    // SAFETY: a map value (as in `slot_in`); `i` is below FLOW_SLOTS (the index is checked).
    let s = unsafe { &mut (*bucket).slots[i] };
    // Written once after the entry is, not by every packet: the line stays clean.
    if s.used == 0 {
        s.used = 1;
    }
    &mut s.entry as *mut FlowEntry
}

/// `find` through the global `lb_locate*`: a call more at run time, but the kernel verifies
/// the lookup once rather than at every place it is inlined. For the lookups off the paths of
/// a tracked packet and of a reply (loops over a backend's VIPs, new flows, ICMP errors).
#[inline(always)]
pub fn find_cold<K: Keyed>(key: &K) -> Option<*mut FlowEntry> {
    let at = K::locate(key).checked_sub(1)?;
    let bucket = K::table().get_ptr_mut((at / FLOW_SLOTS as u64) as u32)?;
    Some(used_entry(bucket, (at % FLOW_SLOTS as u64) as usize))
}

/// Writes `entry` for `key` as `flow_table::insert` does: over its own slot, else where `put`
/// puts it; where that would take a flow in use, a flow of its buckets moves to its other
/// bucket first if it can (`make_room`, a call a bucket). Through the globals `lb_insert*` and
/// `lb_room*` (verified once, as `find_cold`; apart, so that their stacks do not add up on top
/// of the program's): the callers are a new flow's tries.
#[inline(always)]
pub fn insert_cold<K: Keyed>(key: &K, entry: &FlowEntry) -> Result<(), i32> {
    let mut done = K::insert_call(key, entry, 0);
    if done == NOT_WRITTEN {
        if K::room_call(key, 0) == 1 || K::room_call(key, 1) == 1 {
            flow_pressure(FLOW_PRESSURE_MOVED);
        }
        done = K::insert_call(key, entry, 1);
    }
    match done {
        0 => Ok(()),
        TOOK_IN_USE => {
            flow_pressure(FLOW_PRESSURE_EVICTED);
            Ok(())
        }
        e => Err(e),
    }
}

/// Empties `key`'s slot, through the global `lb_remove*`.
#[inline(always)]
pub fn remove_cold<K: Keyed>(key: &K) {
    K::remove_call(key)
}

/// What `lb_insert*` answers when it would have taken a flow in use and was told not to.
const NOT_WRITTEN: i32 = 1;
/// What `lb_insert*` answers when it took the slot of a flow in use (it was told it may).
const TOOK_IN_USE: i32 = 2;

/// The hash of `key` and its two buckets in `map`.
#[inline(always)]
fn pair<K: Keyed>(
    map: &'static Array<FlowBucket<K>>,
    key: &K,
) -> Option<(u64, &'static mut FlowBucket<K>, &'static mut FlowBucket<K>)> {
    let (mix, first, second) = place(key);
    let (a, b) = (map.get_ptr_mut(first)?, map.get_ptr_mut(second)?);
    // SAFETY: as in `slot_in`; the two buckets differ (`buckets_of`: the tables have more than
    // one bucket).
    Some((mix, unsafe { &mut *a }, unsafe { &mut *b }))
}

/// `insert_cold`'s write (`flow_table::put`, taking a flow in use only if `evict`): 0,
/// `NOT_WRITTEN`, `TOOK_IN_USE`, or -1 when a bucket is outside the table.
#[inline(always)]
fn insert<K: Keyed>(
    map: &'static Array<FlowBucket<K>>,
    key: &K,
    entry: &FlowEntry,
    evict: bool,
) -> i32 {
    let Some((mix, a, b)) = pair(map, key) else {
        return -1;
    };
    match put(a, b, key, mix, entry, evict) {
        Some(w) if w.took_in_use => TOOK_IN_USE,
        Some(_) => 0,
        None => NOT_WRITTEN,
    }
}

/// `insert_cold`'s move from bucket `which` (0 or 1) of `key`'s pair (`flow_table::move_out`,
/// half of `make_room`): 1 when a flow moved, else 0.
#[inline(always)]
fn room<K: Keyed>(map: &'static Array<FlowBucket<K>>, key: &K, which: u32) -> i32 {
    let (_, first, second) = place(key);
    let at = [first, second];
    let Some(bucket) = map.get_ptr_mut(if which == 0 { first } else { second }) else {
        return 0;
    };
    // SAFETY: as in `slot_in`; `move_out` asks `Rest` for no bucket of the pair.
    move_out(
        unsafe { &mut *bucket },
        which as usize & 1,
        at,
        &mut Rest(map),
    ) as i32
}

/// A table's buckets for `move_out` to move a flow into (never one of the pair).
struct Rest<K: FlowKey + 'static>(&'static Array<FlowBucket<K>>);

impl<K: Keyed> Buckets<K> for Rest<K> {
    #[inline(always)]
    fn keys(&self) -> K::Keys {
        K::loaded_keys()
    }
    #[inline(always)]
    fn count(&self) -> u32 {
        bucket_count()
    }
    #[inline(always)]
    fn with<R>(&mut self, b: u32, f: impl FnOnce(&mut FlowBucket<K>) -> R) -> Option<R> {
        let bucket = self.0.get_ptr_mut(b)?;
        // SAFETY: as in `slot_in`; `move_out` asks for no bucket of the pair.
        Some(f(unsafe { &mut *bucket }))
    }
}

/// `insert` in `lb_ct_v3`, as a global function (as `lb_locate4`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_insert4(key: *const Flow, entry: *const FlowEntry, evict: u32) -> i32 {
    // SAFETY: checked for null; the kernel checked that the caller passed a whole `Flow` and a
    // whole `FlowEntry`.
    match unsafe { (key.as_ref(), entry.as_ref()) } {
        (Some(key), Some(entry)) => insert(Flow::table(), key, entry, evict != 0),
        _ => -1,
    }
}

/// `insert` in `lb_ct6_v5`, as `lb_insert4`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_insert6(key: *const Flow6, entry: *const FlowEntry, evict: u32) -> i32 {
    // SAFETY: as in `lb_insert4`.
    match unsafe { (key.as_ref(), entry.as_ref()) } {
        (Some(key), Some(entry)) => insert(Flow6::table(), key, entry, evict != 0),
        _ => -1,
    }
}

/// `room` in `lb_ct_v3`, as a global function (as `lb_locate4`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_room4(key: *const Flow, which: u32) -> i32 {
    // SAFETY: as in `lb_locate4`.
    match unsafe { key.as_ref() } {
        Some(key) => room(Flow::table(), key, which),
        None => 0,
    }
}

/// `room` in `lb_ct6_v5`, as `lb_room4`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_room6(key: *const Flow6, which: u32) -> i32 {
    // SAFETY: as in `lb_locate4`.
    match unsafe { key.as_ref() } {
        Some(key) => room(Flow6::table(), key, which),
        None => 0,
    }
}

/// `remove` in `lb_ct_v3`, as a global function (as `lb_locate4`); always 0 (the kernel takes
/// global functions that return a scalar only).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_remove4(key: *const Flow) -> i32 {
    // SAFETY: as in `lb_locate4`.
    if let Some(key) = unsafe { key.as_ref() } {
        remove(Flow::table(), key)
    }
    0
}

/// `remove` in `lb_ct6_v5`, as `lb_remove4`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_remove6(key: *const Flow6) -> i32 {
    // SAFETY: as in `lb_locate4`.
    if let Some(key) = unsafe { key.as_ref() } {
        remove(Flow6::table(), key)
    }
    0
}

/// Empties `key`'s slot.
#[inline(always)]
fn remove<K: Keyed>(map: &Array<FlowBucket<K>>, key: &K) {
    let (mix, first, second) = place(key);
    for b in [first, second] {
        let Some(bucket) = map.get_ptr_mut(b) else {
            continue;
        };
        // SAFETY: as in `slot_in`.
        let bucket = unsafe { &mut *bucket };
        for i in 0..FLOW_SLOTS {
            let s = &mut bucket.slots[i];
            if s.holds(key, mix) {
                s.check = 0;
            }
        }
    }
}
