//! The flow tables' layout (`lb_ct_v3`, `lb_ct6_v5`) and the rules both sides follow to use them.
//!
//! A flow table is an array of buckets; a bucket holds `FLOW_SLOTS` slots, each a flow's key, its
//! `FlowEntry`, a check word and a `used` mark. A flow lives in one of the two buckets its keyed
//! hash picks, in any slot of it, the first bucket while it has room: the first is one of the
//! table's first quarter, the second one of the rest (`buckets_of`). Key and entry sit in the
//! bucket itself, so a lookup reads one bucket (one or two cache lines) where the kernel's hash
//! map reads a bucket head, then the element it points to.
//!
//! Several CPUs write one table without a lock. A slot is live only when its check word is
//! what `check` computes from its key and the ids of its entry: two writers that meet on one slot
//! leave a mix that fails the check (a miss: the flow is decided again), not a flow that reaches
//! another flow's backend. Writes of the note (`FlowEntry::noted`, `ending`) keep the ids, so
//! they leave the check true. An emptied slot has check 0, which `check` never gives.
use crate::{Flow, Flow6, FlowEntry};

/// Slots of a bucket.
pub const FLOW_SLOTS: usize = 4;

/// A flow key of a flow table: its words, hashed with keys made from the table's seed.
pub trait FlowKey: Copy + PartialEq {
    /// What the hash is keyed with.
    type Keys: Copy;
    /// The keys made from the table's seed (`lb_ctseed_v1`).
    fn keys(seed: u64) -> Self::Keys;
    /// A keyed 64-bit hash of the key: the high 32 bits pick the bucket, the low 32 bits make
    /// the check.
    fn mix(&self, keys: &Self::Keys) -> u64;
    /// Whether two keys are equal, a 32-bit word at a time (the derived comparison takes the
    /// ports and padding field by field).
    fn same(&self, other: &Self) -> bool;
    /// What follows a slot's fields to make it 32 or 64 bytes, so that in a table whose values
    /// start on a cache line (`crate::FLOW_TABLE_FLAGS`) no slot crosses one: nothing after an
    /// IPv4 slot's 32 bytes, 8 bytes after an IPv6 slot's 56.
    type Pad: Copy + Default + core::fmt::Debug + PartialEq + Eq;
}

/// The key's bytes as `N` 32-bit words.
#[inline(always)]
fn words<K, const N: usize>(k: &K) -> &[u32; N] {
    const { assert!(size_of::<K>() == N * 4 && align_of::<K>() == 4) };
    // SAFETY: the keys are repr(C), 4-byte aligned, N words long, and every byte is a field
    // (their padding is explicit), so they read as N initialised u32.
    unsafe { &*(k as *const K as *const [u32; N]) }
}

#[inline(always)]
fn same_words<const N: usize>(a: &[u32; N], b: &[u32; N]) -> bool {
    let mut i = 0;
    while i < N {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const K3: u64 = 0x1656_67B1_9E37_79F9;

#[inline(always)]
const fn finish(h: u64) -> u64 {
    let h = (h ^ (h >> 29)).wrapping_mul(K3);
    h ^ (h >> 32)
}

#[inline(always)]
const fn step(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(K1).rotate_left(27) ^ w.wrapping_mul(K2)
}

impl FlowKey for Flow {
    type Keys = u64;
    type Pad = [u32; 0];
    fn keys(seed: u64) -> u64 {
        seed
    }
    #[inline(always)]
    fn mix(&self, &seed: &u64) -> u64 {
        let a = (self.src as u64) << 32 | self.dst as u64;
        let b = ((self.sport as u64) << 16 | self.dport as u64) << 8 | self.proto as u64;
        finish(step(step(seed, a), b))
    }
    #[inline(always)]
    fn same(&self, other: &Flow) -> bool {
        same_words::<4>(words(self), words(other))
    }
}

/// Words of the keys of `Flow6`'s hash.
pub const FLOW6_KEY_WORDS: usize = 10;

impl FlowKey for Flow6 {
    /// Ten random 32-bit words.
    type Keys = [u32; FLOW6_KEY_WORDS];
    type Pad = [u32; 2];
    fn keys(seed: u64) -> [u32; FLOW6_KEY_WORDS] {
        let mut k = [0; FLOW6_KEY_WORDS];
        let mut i = 0;
        while i < FLOW6_KEY_WORDS {
            k[i] = finish(step(seed, i as u64 + 1)) as u32;
            i += 1;
        }
        k
    }
    /// NH (the hash of UMAC): the key's ten 32-bit words in pairs, each word added to a key word
    /// and each pair's two sums multiplied (32 x 32 -> 64 bits), the five products added, then
    /// mixed as the IPv4 hash is. The five multiplications do not wait for each other (the
    /// chained hash of `lb_ct6_v2` took five in a row): IPv6 lookups are shorter by that chain.
    /// For two different keys the sums collide with probability at most 2^-32 over the keys.
    #[inline(always)]
    fn mix(&self, k: &[u32; FLOW6_KEY_WORDS]) -> u64 {
        let nh = |x: u32, y: u32, i: usize| {
            (x.wrapping_add(k[i]) as u64) * (y.wrapping_add(k[i + 1]) as u64)
        };
        let ports = (self.sport as u32) << 16 | self.dport as u32;
        let s = nh(self.src[0], self.src[1], 0)
            .wrapping_add(nh(self.src[2], self.src[3], 2))
            .wrapping_add(nh(self.dst[0], self.dst[1], 4))
            .wrapping_add(nh(self.dst[2], self.dst[3], 6))
            .wrapping_add(nh(ports, self.proto as u32, 8));
        finish(s)
    }
    #[inline(always)]
    fn same(&self, other: &Flow6) -> bool {
        same_words::<10>(words(self), words(other))
    }
}

/// An IPv6 key of the older table `lb_ct6_v3` (slots of 56 bytes, no padding; the hash of
/// `Flow6`), to read its flows when they are carried into `lb_ct6_v5`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow6V3(pub Flow6);

impl FlowKey for Flow6V3 {
    type Keys = [u32; FLOW6_KEY_WORDS];
    type Pad = [u32; 0];
    fn keys(seed: u64) -> [u32; FLOW6_KEY_WORDS] {
        Flow6::keys(seed)
    }
    #[inline(always)]
    fn mix(&self, k: &[u32; FLOW6_KEY_WORDS]) -> u64 {
        self.0.mix(k)
    }
    fn same(&self, other: &Flow6V3) -> bool {
        self.0.same(&other.0)
    }
}

/// An IPv6 key of the older table `lb_ct6_v2` (`lb_ct6_v3`'s slots, hashed with the seed over
/// five 64-bit words in a row), to read its flows when they are carried into `lb_ct6_v5`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow6V2(pub Flow6);

impl FlowKey for Flow6V2 {
    type Keys = u64;
    type Pad = [u32; 0];
    fn keys(seed: u64) -> u64 {
        seed
    }
    fn mix(&self, &seed: &u64) -> u64 {
        let f = &self.0;
        let w = |x: u32, y: u32| (x as u64) << 32 | y as u64;
        let mut h = step(seed, w(f.src[0], f.src[1]));
        h = step(h, w(f.src[2], f.src[3]));
        h = step(h, w(f.dst[0], f.dst[1]));
        h = step(h, w(f.dst[2], f.dst[3]));
        h = step(
            h,
            ((f.sport as u64) << 16 | f.dport as u64) << 8 | f.proto as u64,
        );
        finish(h)
    }
    fn same(&self, other: &Flow6V2) -> bool {
        self.0.same(&other.0)
    }
}

/// One slot of a bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot<K: FlowKey> {
    /// The flow (client -> VIP).
    pub key: K,
    /// Its entry, `FlowEntry`.
    pub entry: FlowEntry,
    /// `check(mix, entry)` while the slot is live; 0 when empty.
    pub check: u32,
    /// 1 once a packet found the flow after its entry was written (or after the last time a
    /// full pair of buckets gave every flow a second chance), 0 before: a new flow evicts a
    /// flow no packet came back for before one in use.
    pub used: u32,
    /// Zeroes (`FlowKey::Pad`).
    pub pad: K::Pad,
}

/// A bucket: the value of each slot of `lb_ct_v3` / `lb_ct6_v5` (32 and 64 bytes a slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket<K: FlowKey> {
    /// The slots, in no order.
    pub slots: [FlowSlot<K>; FLOW_SLOTS],
}

const _: () = assert!(
    size_of::<FlowSlot<Flow>>() == 32
        && size_of::<FlowSlot<Flow6>>() == 64
        && size_of::<FlowSlot<Flow6V3>>() == 56
        && size_of::<FlowSlot<Flow6V2>>() == 56
);

/// The bucket of a hash in a table of `buckets` buckets.
#[inline(always)]
pub const fn bucket_of(mix: u64, buckets: u32) -> u32 {
    (((mix >> 32) * buckets as u64) >> 32) as u32
}

/// The buckets a key's first bucket is one of: the table's first quarter (`HOT_SHARE`), so
/// that the flows a table holds when it is not full lie in a quarter of its pages. A table is
/// made for its peak (a flood of new flows); its usual flows in use are far fewer. Spread over
/// the whole table, 10,000 of them touched about as many 4 KiB pages, more than the processor's
/// TLB holds: each lookup paid a page walk (under nested paging) that the same flows in a
/// quarter of the pages do not (`cargo xtask bench`, beside Katran).
#[inline(always)]
pub const fn hot_buckets(buckets: u32) -> u32 {
    let hot = buckets / HOT_SHARE;
    if hot == 0 { 1 } else { hot }
}

/// The share of a table's buckets that first buckets are in (`hot_buckets`): a table made for
/// N flows has 2N slots, so its first buckets still have room for N/2.
pub const HOT_SHARE: u32 = 4;

/// A key's two buckets: the first, where it is looked for first and goes when there is room,
/// one of the table's first quarter (`hot_buckets`), and the second, for when the first is
/// full, one of the other buckets. So every flow can go to the rest of the table when the first
/// quarter is full, and a flow of a full first bucket can move there (`make_room`). They differ
/// unless the table has one bucket.
#[inline(always)]
pub const fn buckets_of(mix: u64, buckets: u32) -> (u32, u32) {
    let hot = hot_buckets(buckets);
    let first = bucket_of(mix, hot);
    if hot >= buckets {
        return (first, first);
    }
    (first, hot + bucket_of(finish(mix ^ K2), buckets - hot))
}

/// The check word of a live slot holding a key of hash `mix` and `entry`: never 0.
#[inline(always)]
pub const fn check(mix: u64, entry: &FlowEntry) -> u32 {
    let ids = (entry.service() as u64) << 32 | entry.backend() as u64;
    (mix as u32 ^ (ids.wrapping_mul(K2) >> 32) as u32) | 1
}

/// Buckets of a flow table meant to hold `flows` flows: twice as many slots as flows, so that
/// a table holding its size still has a free slot in one of almost every flow's two buckets.
pub const fn flow_buckets(flows: u32) -> u32 {
    let b = flows / (FLOW_SLOTS as u32 / 2);
    if b == 0 { 1 } else { b }
}

impl<K: FlowKey> FlowSlot<K> {
    /// Whether the slot is live and holds `key` (of hash `mix`).
    #[inline(always)]
    pub fn holds(&self, key: &K, mix: u64) -> bool {
        self.key.same(key) && self.check == check(mix, &self.entry)
    }

    /// Whether the slot is live (its check matches its own key).
    pub fn live(&self, keys: &K::Keys) -> bool {
        self.check != 0 && self.check == check(self.key.mix(keys), &self.entry)
    }

    /// The slot's key and entry, when it is live.
    pub fn get(&self, keys: &K::Keys) -> Option<(K, FlowEntry)> {
        self.live(keys).then_some((self.key, self.entry))
    }
}

/// Where a new entry for `key` goes, as (0 for the first bucket or 1 for the second, slot):
/// the slot that holds the key; else the first empty slot (first bucket first); else the first
/// slot of a flow no packet came back for; else one of the eight picked by the key's hash, a
/// flow in use (the third value says so: the writer then gives the others of its bucket a
/// second chance, as a clock does). Every search stops at its first find: the verifier walks
/// one path a slot, not one a combination of slots.
#[inline(always)]
pub fn place<K: FlowKey>(
    first: &FlowBucket<K>,
    second: &FlowBucket<K>,
    key: &K,
    mix: u64,
) -> (usize, usize, bool) {
    let both = [first, second];
    for (b, bucket) in both.iter().enumerate() {
        for (i, s) in bucket.slots.iter().enumerate() {
            if s.holds(key, mix) {
                return (b, i, false);
            }
        }
    }
    for (b, bucket) in both.iter().enumerate() {
        for (i, s) in bucket.slots.iter().enumerate() {
            if s.check == 0 {
                return (b, i, false);
            }
        }
    }
    for (b, bucket) in both.iter().enumerate() {
        for (i, s) in bucket.slots.iter().enumerate() {
            if s.used == 0 {
                return (b, i, false);
            }
        }
    }
    (
        (mix >> 8) as usize & 1,
        (mix >> 9) as usize % FLOW_SLOTS,
        true,
    )
}

/// Writes `key` and `entry` into `slot`: the entry and key first, the check last; not used yet.
#[inline(always)]
pub fn fill<K: FlowKey>(slot: &mut FlowSlot<K>, key: &K, mix: u64, entry: &FlowEntry) {
    slot.check = 0;
    slot.entry = *entry;
    slot.key = *key;
    slot.used = 0;
    slot.check = check(mix, entry);
}

/// A table's buckets besides the pair a new flow is written to: what `make_room` needs to move
/// a flow in use to its other bucket.
pub trait Buckets<K: FlowKey> {
    /// The keys of the table's hash (taken each time a key is hashed).
    fn keys(&self) -> K::Keys;
    /// How many buckets the table has.
    fn count(&self) -> u32;
    /// Runs `f` on bucket `b`; None when the table has no such bucket.
    fn with<R>(&mut self, b: u32, f: impl FnOnce(&mut FlowBucket<K>) -> R) -> Option<R>;
}

/// A slot of `bucket` that a flow moved there may take: an empty one, else one of a flow no
/// packet came back for (the slot `place` would give a new flow).
#[inline(always)]
fn room_in<K: FlowKey>(bucket: &FlowBucket<K>) -> Option<usize> {
    for (j, s) in bucket.slots.iter().enumerate() {
        if s.check == 0 {
            return Some(j);
        }
    }
    for (j, s) in bucket.slots.iter().enumerate() {
        if s.used == 0 {
            return Some(j);
        }
    }
    None
}

/// For a new flow whose two buckets (`at`) hold only flows in use: moves the first of them
/// whose other bucket has room (`room_in`) there and empties the slot it left, which the new
/// flow then takes (`put`); the first bucket's flows are tried first (`move_out`). False when
/// no flow can move (each one's other bucket is full of flows in use, or is one of the pair).
#[inline(always)]
pub fn make_room<K: FlowKey, T: Buckets<K>>(
    (first, second): (&mut FlowBucket<K>, &mut FlowBucket<K>),
    at: [u32; 2],
    table: &mut T,
) -> bool {
    move_out(first, 0, at, table) || move_out(second, 1, at, table)
}

/// `make_room`'s work on one bucket of the pair, `at[which]`: its first flow whose other bucket
/// has room moves there and its slot is emptied. A slot that is not live (two writers met on
/// it) is emptied as it is. (The program makes one call a bucket, each on its own small stack.)
///
/// The copy is written before the old slot is emptied, so a lookup finds the moved flow in one
/// place or the other throughout; a note another CPU writes into the old slot meanwhile is
/// lost, as it would be if the flow were evicted.
#[inline(always)]
pub fn move_out<K: FlowKey, T: Buckets<K>>(
    bucket: &mut FlowBucket<K>,
    which: usize,
    at: [u32; 2],
    table: &mut T,
) -> bool {
    let here = if which == 0 { at[0] } else { at[1] };
    for s in bucket.slots.iter_mut() {
        // The keys taken for each flow, not kept across the loop: the program's keys are read
        // from its constants where they are used, not held on its small stack.
        let mix = s.key.mix(&table.keys());
        if s.check != check(mix, &s.entry) {
            s.check = 0;
            return true;
        }
        let (x, y) = buckets_of(mix, table.count());
        let other = if x == here { y } else { x };
        if other == at[0] || other == at[1] {
            continue;
        }
        let moved = table.with(other, |o| match room_in(o) {
            Some(j) => match o.slots.get_mut(j) {
                Some(slot) => {
                    fill(slot, &s.key, mix, &s.entry);
                    slot.used = s.used;
                    true
                }
                None => false,
            },
            None => false,
        });
        if moved == Some(true) {
            s.check = 0;
            return true;
        }
    }
    false
}

/// Writes a new entry for `key` (of hash `mix`) into its two buckets where `place` puts it,
/// unless that would take a flow in use and `evict` is false: then nothing is written and the
/// answer is None (the caller may `make_room` and put again). A flow in use taken makes the
/// other slots of its bucket lose their `used` marks (a second chance). Returns where it
/// wrote.
#[inline(always)]
pub fn put<K: FlowKey>(
    first: &mut FlowBucket<K>,
    second: &mut FlowBucket<K>,
    key: &K,
    mix: u64,
    entry: &FlowEntry,
    evict: bool,
) -> Option<Written> {
    let (b, i, in_use) = place(first, second, key, mix);
    if in_use && !evict {
        return None;
    }
    let bucket = if b == 0 { first } else { second };
    if in_use {
        for s in bucket.slots.iter_mut() {
            s.used = 0;
        }
    }
    if let Some(slot) = bucket.slots.get_mut(i) {
        fill(slot, key, mix, entry);
    }
    Some(Written {
        bucket: b,
        took_in_use: in_use,
    })
}

/// Where `put` wrote a new entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The bucket of the pair (0 or 1).
    pub bucket: usize,
    /// Whether the slot held a flow in use (which lost its slot).
    pub took_in_use: bool,
}

/// `put` with the rule the programs follow: where it would take a flow in use, a flow of the
/// pair moves to its other bucket first if it can (`make_room`), and only when none can is a
/// flow in use taken. `at`: the two buckets' numbers in `table`. Returns which bucket was
/// written (0 or 1).
#[inline(always)]
pub fn insert<K: FlowKey, T: Buckets<K>>(
    (first, second): (&mut FlowBucket<K>, &mut FlowBucket<K>),
    at: [u32; 2],
    table: &mut T,
    key: &K,
    mix: u64,
    entry: &FlowEntry,
) -> usize {
    if let Some(w) = put(first, second, key, mix, entry, false) {
        return w.bucket;
    }
    make_room((first, second), at, table);
    put(first, second, key, mix, entry, true).map_or(0, |w| w.bucket)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{collections::BTreeMap, vec, vec::Vec};

    const SEED: u64 = 0x1234_5678_9abc_def1;

    /// A small deterministic generator (xorshift), so a failure repeats.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn flow(i: u32) -> Flow {
        Flow {
            src: 0xc612_0000 | i,
            dst: 0xac10_0001,
            sport: (i % 60_000) as u16,
            dport: 80,
            proto: 6,
            _pad: [0; 3],
        }
    }

    /// A table's buckets in memory, for `put`.
    struct Rest<'a>(&'a mut Vec<FlowBucket<Flow>>);
    impl Buckets<Flow> for Rest<'_> {
        fn keys(&self) -> u64 {
            SEED
        }
        fn count(&self) -> u32 {
            self.0.len() as u32
        }
        fn with<R>(&mut self, b: u32, f: impl FnOnce(&mut FlowBucket<Flow>) -> R) -> Option<R> {
            self.0.get_mut(b as usize).map(f)
        }
    }

    /// A table as the program uses it, in memory.
    struct Table(Vec<FlowBucket<Flow>>);
    impl Table {
        fn new(buckets: usize) -> Table {
            Table(vec![FlowBucket::default(); buckets])
        }
        fn at(&self, k: &Flow) -> (u64, usize, usize) {
            let mix = k.mix(&SEED);
            let (a, b) = buckets_of(mix, self.0.len() as u32);
            (mix, a as usize, b as usize)
        }
        fn find(&mut self, k: &Flow) -> Option<FlowEntry> {
            let (mix, a, b) = self.at(k);
            [a, b]
                .iter()
                .find_map(|b| self.0[*b].slots.iter().find(|s| s.holds(k, mix)))
                .map(|s| s.entry)
        }
        fn insert(&mut self, k: &Flow, e: &FlowEntry) {
            let (mix, a, b) = self.at(k);
            let (mut x, mut y) = (self.0[a], self.0[b]);
            let at = [a as u32, b as u32];
            insert((&mut x, &mut y), at, &mut Rest(&mut self.0), k, mix, e);
            (self.0[a], self.0[b]) = (x, y);
        }
        fn remove(&mut self, k: &Flow) {
            let (mix, a, b) = self.at(k);
            for b in [a, b] {
                for s in self.0[b].slots.iter_mut() {
                    if s.holds(k, mix) {
                        s.check = 0;
                    }
                }
            }
        }
    }

    /// Against a model: a flow just written is found with its entry, a flow removed is not
    /// found, and a flow found always has the entry last written for it (evictions only lose
    /// flows, never give one another's entry).
    #[test]
    fn the_table_finds_what_was_written_and_only_that() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let mut t = Table::new(16);
        let mut model: BTreeMap<u32, FlowEntry> = BTreeMap::new();
        let (mut found, mut lost) = (0, 0);
        for step in 0..20_000u64 {
            let i = (g.next() % 200) as u32;
            let k = flow(i);
            match g.next() % 4 {
                0 | 1 => {
                    let e = FlowEntry::new(i, (g.next() % 1000) as u32).noted(1, step << 20);
                    t.insert(&k, &e);
                    assert_eq!(t.find(&k), Some(e), "{i} just written");
                    model.insert(i, e);
                }
                2 => {
                    t.remove(&k);
                    assert_eq!(t.find(&k), None, "{i} just removed");
                    model.remove(&i);
                }
                _ => match (t.find(&k), model.get(&i)) {
                    (Some(e), Some(m)) => {
                        assert_eq!(e, *m, "{i}");
                        found += 1;
                    }
                    (Some(e), None) => panic!("{i} found ({e:?}) but removed"),
                    (None, Some(_)) => lost += 1,
                    (None, None) => {}
                },
            }
        }
        // 64 slots for up to 200 flows: both happen.
        assert!(found > 100 && lost > 100, "found {found}, lost {lost}");
    }

    /// Two writers that meet on one slot leave a key of one flow beside the entry of another:
    /// the check refuses it for both flows.
    #[test]
    fn a_slot_mixed_by_two_writers_holds_neither_flow() {
        let (a, b) = (flow(1), flow(2));
        let (ea, eb) = (FlowEntry::new(3, 10), FlowEntry::new(3, 11));
        let (ma, mb) = (a.mix(&SEED), b.mix(&SEED));
        let mut s = FlowSlot::default();
        fill(&mut s, &a, ma, &ea);
        assert!(s.holds(&a, ma));
        // b's entry and check over a's key; a's check over b's entry.
        let mut mixed = s;
        mixed.entry = eb;
        mixed.check = check(mb, &eb);
        assert!(!mixed.holds(&a, ma) && !mixed.holds(&b, mb));
        let mut mixed = s;
        mixed.entry = eb;
        assert!(!mixed.holds(&a, ma) && !mixed.live(&SEED));
        // Half of b's key over a's.
        let mut mixed = s;
        mixed.key.src = b.src;
        assert!(!mixed.holds(&a, ma) && !mixed.holds(&b, mb) && !mixed.live(&SEED));
        // A note in place keeps the ids, so the slot stays live.
        let mut noted = s;
        noted.entry = ea.noted(7, 123 << 24);
        assert!(noted.holds(&a, ma));
        noted.entry = ea.ending(crate::END_MASK);
        assert!(noted.holds(&a, ma));
    }

    #[test]
    fn checks_are_never_zero_and_buckets_in_range() {
        let mut g = Gen(77);
        for _ in 0..100_000 {
            let m = g.next();
            let e = FlowEntry::new(g.next() as u32, g.next() as u32);
            assert_ne!(check(m, &e), 0);
            for buckets in [1, 3, 256, 65_536, 1 << 22] {
                assert!(bucket_of(m, buckets) < buckets);
            }
        }
        assert_eq!(bucket_of(u64::MAX, 7), 6);
        assert_eq!(flow_buckets(1024), 512);
        assert_eq!(flow_buckets(1), 1);
    }

    /// A live slot of key `i`, used or not.
    fn slot(i: u32, used: bool) -> FlowSlot<Flow> {
        let (k, e) = (flow(i), FlowEntry::new(1, i));
        let mut s = FlowSlot::default();
        fill(&mut s, &k, k.mix(&SEED), &e);
        s.used = used as u32;
        s
    }

    /// A new flow takes its own slot, else an empty one, else one of a flow no packet came
    /// back for (first bucket first); with both full of flows in use, the one its hash picks,
    /// and the others of that bucket get a second chance.
    #[test]
    fn a_new_flow_takes_room_first_then_the_unused_then_a_second_chance() {
        let k = flow(9);
        let mix = k.mix(&SEED);
        let full = |base: u32| FlowBucket {
            slots: core::array::from_fn(|i| slot(base + i as u32, true)),
        };
        let (mut a, mut b) = (full(100), full(200));
        let picked = (
            (mix >> 8) as usize & 1,
            (mix >> 9) as usize % FLOW_SLOTS,
            true,
        );
        assert_eq!(place(&a, &b, &k, mix), picked);
        // A flow no packet came back for goes before any in use, in the first bucket first.
        b.slots[3].used = 0;
        assert_eq!(place(&a, &b, &k, mix), (1, 3, false));
        a.slots[2].used = 0;
        assert_eq!(place(&a, &b, &k, mix), (0, 2, false));
        // An empty slot before that, in either bucket.
        b.slots[1].check = 0;
        assert_eq!(place(&a, &b, &k, mix), (1, 1, false));
        a.slots[3].check = 0;
        assert_eq!(place(&a, &b, &k, mix), (0, 3, false));
        // And the key's own slot whatever the others are.
        let own = flow(202);
        assert_eq!(place(&a, &b, &own, own.mix(&SEED)), (1, 2, false));
        // A flow in use taken where none can move (a table of two buckets: each flow's other
        // bucket is one of the pair): the others of its bucket lose their marks, the other
        // bucket's keep theirs; the new flow starts unused.
        let mut two = vec![full(100), full(200)];
        let (mut a, mut b) = (two[0], two[1]);
        let (pb, pi, _) = picked;
        let e = FlowEntry::new(1, 9);
        assert_eq!(put(&mut a, &mut b, &k, mix, &e, false), None);
        assert_eq!((a, b), (two[0], two[1]), "nothing written");
        // Told it may, `put` takes that flow and says so (the programs count it).
        let (mut c, mut d) = (two[0], two[1]);
        let taken = Written {
            bucket: pb,
            took_in_use: true,
        };
        assert_eq!(put(&mut c, &mut d, &k, mix, &e, true), Some(taken));
        // Where a slot is free it says it took none.
        c.slots[pi].check = 0;
        let free = put(&mut c, &mut d, &flow(300), flow(300).mix(&SEED), &e, false);
        assert_eq!(free.map(|w| w.took_in_use), Some(false));
        let rest = &mut Rest(&mut two);
        assert_eq!(insert((&mut a, &mut b), [0, 1], rest, &k, mix, &e), pb);
        let (taken, other) = if pb == 0 { (&a, &b) } else { (&b, &a) };
        assert!(taken.slots[pi].holds(&k, mix));
        assert!(taken.slots.iter().all(|s| s.used == 0));
        assert!(other.slots.iter().all(|s| s.used == 1));
    }

    /// Where both of a new flow's buckets hold only flows in use, one of them whose other
    /// bucket has room moves there, and the new flow takes its slot: every flow is kept, with
    /// its entry and its mark.
    #[test]
    fn a_flow_in_use_moves_to_its_other_bucket_to_make_room() {
        let mut t = Table::new(64);
        let k = flow(9);
        let (_, a, b) = t.at(&k);
        // Four flows in use written in `a`, their first bucket, and four in `b`, their second
        // (a first bucket is in the table's first quarter, a second in the rest).
        let mut held = Vec::new();
        for (which, want) in [(0, a), (1, b)] {
            let mut i = 1_000;
            let mut slot = 0;
            while slot < FLOW_SLOTS {
                let f = flow(i);
                let (mix, first, second) = t.at(&f);
                if [first, second][which] == want {
                    let e = FlowEntry::new(2, i);
                    fill(&mut t.0[want].slots[slot], &f, mix, &e);
                    held.push((i, want));
                    slot += 1;
                }
                i += 1;
                assert!(i < 100_000, "no flow for bucket {want}");
            }
        }
        for bucket in [a, b] {
            for s in t.0[bucket].slots.iter_mut() {
                s.used = 1;
            }
        }
        let e = FlowEntry::new(1, 9);
        t.insert(&k, &e);
        assert_eq!(t.find(&k), Some(e));
        let mut moved = 0;
        for &(i, written) in &held {
            let f = flow(i);
            assert_eq!(t.find(&f), Some(FlowEntry::new(2, i)), "flow {i}");
            let (m, first, second) = t.at(&f);
            let other = if written == first { second } else { first };
            let at = |b: usize| t.0[b].slots.iter().find(|s| s.holds(&f, m)).copied();
            match (at(written), at(other)) {
                (Some(s), None) => assert_eq!(s.used, 1, "flow {i}"),
                (None, Some(s)) => {
                    assert_eq!(s.used, 1, "flow {i} moved");
                    moved += 1;
                }
                other => panic!("flow {i}: {other:?}"),
            }
        }
        assert_eq!(moved, 1);
    }

    /// A table filled to its size (half its slots) with flows in use, one at a time, each
    /// marked by a packet, then flooded with ten times its slots of new flows no packet comes
    /// back for: every flow in use is kept. (Without the moves, this loses about 20 flows in
    /// the filling and about 1,000 in the flood, whose evictions take away the marks of the
    /// others of their buckets.)
    #[test]
    fn a_table_at_its_size_keeps_its_flows_in_use_through_a_flood() {
        let buckets = 4_096;
        let mut t = Table::new(buckets);
        let mut g = Gen(0x5151);
        let mut key = || {
            let r = g.next();
            Flow {
                src: r as u32,
                dst: 0xac10_0000 | (r >> 40) as u32,
                sport: (r >> 32) as u16,
                dport: 80,
                proto: 6,
                _pad: [0; 3],
            }
        };
        let mut in_use = Vec::new();
        for _ in 0..buckets * FLOW_SLOTS / 2 {
            let k = key();
            t.insert(&k, &FlowEntry::new(1, 1));
            let (mix, a, b) = t.at(&k);
            for b in [a, b] {
                for s in t.0[b].slots.iter_mut().filter(|s| s.holds(&k, mix)) {
                    s.used = 1;
                }
            }
            in_use.push(k);
        }
        for _ in 0..10 * buckets * FLOW_SLOTS {
            t.insert(&key(), &FlowEntry::new(1, 2));
        }
        let lost = in_use.iter().filter(|k| t.find(k).is_none()).count();
        assert_eq!(lost, 0, "of {}", in_use.len());
    }

    #[test]
    fn a_keys_two_buckets_differ() {
        let mut g = Gen(5);
        for _ in 0..100_000 {
            for buckets in [2, 3, 512, 65_536] {
                let (a, b) = buckets_of(g.next(), buckets);
                assert!(a != b && a < buckets && b < buckets);
            }
        }
        assert_eq!(buckets_of(g.next(), 1), (0, 0));
    }

    /// First buckets are the table's first quarter, every one of them used; second buckets
    /// are the rest, every one of them used too.
    #[test]
    fn first_buckets_are_the_first_quarter_and_second_ones_the_rest() {
        let mut g = Gen(11);
        for buckets in [2, 5, 512, 4_099] {
            let hot = hot_buckets(buckets);
            assert_eq!(hot, (buckets / 4).max(1));
            let (mut firsts, mut seconds) =
                (vec![0u32; buckets as usize], vec![0u32; buckets as usize]);
            for _ in 0..100 * buckets {
                let (a, b) = buckets_of(g.next(), buckets);
                assert!(a < hot && b >= hot && b < buckets, "{buckets}: {a} {b}");
                firsts[a as usize] += 1;
                seconds[b as usize] += 1;
            }
            assert!(firsts[..hot as usize].iter().all(|&n| n > 0), "{buckets}");
            assert!(seconds[hot as usize..].iter().all(|&n| n > 0), "{buckets}");
        }
    }

    /// An IPv6 key with every word different.
    fn sample6() -> Flow6 {
        Flow6 {
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            sport: 9,
            dport: 10,
            proto: 6,
            _pad: [0; 3],
        }
    }

    #[test]
    fn ipv6_keys_compare_every_word() {
        let a = sample6();
        assert!(a.same(&a));
        let k = Flow6::keys(SEED);
        for w in 0..10 {
            let mut b = a;
            match w {
                0..4 => b.src[w] ^= 1,
                4..8 => b.dst[w - 4] ^= 1,
                8 => b.sport ^= 1,
                _ => b.proto ^= 1,
            }
            assert!(!a.same(&b), "word {w}");
            assert_ne!(a.mix(&k), b.mix(&k), "word {w}");
        }
    }

    #[test]
    fn ipv6_keys_follow_the_seed() {
        let k = Flow6::keys(SEED);
        assert_eq!(k, Flow6::keys(SEED));
        assert_ne!(k, Flow6::keys(SEED ^ 1));
        for i in 0..FLOW6_KEY_WORDS {
            for j in 0..i {
                assert_ne!(k[i], k[j], "key words {j} and {i}");
            }
        }
    }

    #[test]
    fn ipv6_hash_spreads_one_prefixs_clients_and_ports() {
        // Flows to one VIP from one /64 (random low words and ports), from one /64 counting up
        // its lowest word, and from one client counting up its ports: each as even over the
        // buckets as uniform hashing (at 64 flows a bucket on average, the fullest of 1,024
        // buckets stays far from 2 x 64, the emptiest far from 0).
        let k = Flow6::keys(SEED);
        let buckets = 1024;
        let mut g = Gen(7);
        for pattern in ["random", "lowest word", "ports"] {
            let mut load = vec![0u32; buckets as usize];
            for i in 0..(64 * buckets) {
                let r = g.next();
                let mut f = Flow6 {
                    src: [0x2001_0db8, 0, 7, 9],
                    dst: [0x2001_0db8, 0, 0, 1],
                    sport: 40_000,
                    dport: 443,
                    proto: 6,
                    _pad: [0; 3],
                };
                match pattern {
                    "random" => {
                        f.src[2] = r as u32;
                        f.src[3] = (r >> 32) as u32;
                        f.sport = (r >> 17) as u16;
                    }
                    "lowest word" => f.src[3] = i,
                    _ => {
                        f.sport = i as u16;
                        f.src[3] = i >> 16;
                    }
                }
                load[bucket_of(f.mix(&k), buckets) as usize] += 1;
            }
            let max = load.iter().max().copied().unwrap_or(0);
            let min = load.iter().min().copied().unwrap_or(0);
            assert!(
                max < 110 && min > 25,
                "{pattern}: bucket loads {min}..{max}"
            );
        }
    }

    #[test]
    fn the_older_ipv6_hash_is_kept_for_the_carry() {
        // The hash `lb_ct6_v2`'s programs used, from that version's code: its flows are found
        // where they were put only with it.
        let f = sample6();
        // `f.mix(SEED)` at commit 8537bd5, the last with `lb_ct6_v2`.
        const OLD_MIX: u64 = 0xe40f_163f_394e_7957;
        assert_eq!(Flow6V2(f).mix(&SEED), OLD_MIX);
    }
}
