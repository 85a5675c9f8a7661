//! The counters by service and backend id (`lb_svctr_v2`, `lb_betr_v2`, `lb_socksv_v2`,
//! `lb_sockbe_v2`): plain arrays with one region of ids per possible CPU, CPU `c`'s counters of
//! id `i` in slot `c × ids + i` (`lb_common::counter_slot`). The kernel makes such an array with
//! one allocation, where a per-CPU array of the same counters takes one per id under one lock;
//! an id's total is the sum of its slots.
use super::{spec, sys};
use crate::error::{Error, Result};
use aya::{
    Pod,
    maps::{Array, IterableMap as _, MapData},
};
use lb_common::Traffic;
use std::path::Path;

/// A value of a counter array: counts that add up.
pub(crate) trait Count: Pod + Default + Copy {
    /// The two counts together.
    fn plus(self, other: Self) -> Self;
}

impl Count for u64 {
    fn plus(self, other: u64) -> u64 {
        self.wrapping_add(other)
    }
}

impl Count for Traffic {
    fn plus(self, o: Traffic) -> Traffic {
        Traffic {
            packets: self.packets.wrapping_add(o.packets),
            bytes: self.bytes.wrapping_add(o.bytes),
            new_flows: self.new_flows.wrapping_add(o.new_flows),
        }
    }
}

/// The CPUs the kernel may run the programs on (`/sys/devices/system/cpu/possible`): the
/// counter arrays have one region for each.
pub(crate) fn possible_cpus() -> Result<u32> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(what, e)| Error::io(format!("counting the possible CPUs ({what})"), e))
}

/// The entries a counter array for `ids` ids gets: a region for each possible CPU. Without the
/// CPU count, one region (the loader, which needs the count too, refuses to load then); beyond
/// what a map can index, the largest index, which the kernel refuses to make, naming the map.
pub(crate) fn entries(ids: u32) -> u32 {
    ids.saturating_mul(possible_cpus().unwrap_or(1))
}

/// One counter array, opened.
pub(crate) struct Counters<V: Count> {
    map: Array<MapData, V>,
    name: String,
    /// Ids in each region.
    ids: u32,
    cpus: u32,
}

impl<V: Count> Counters<V> {
    /// Opens counter array `name` pinned in `dir`.
    pub(crate) fn open(dir: &Path, name: &str) -> Result<Counters<V>> {
        Counters::of(spec::open_map(dir, name)?, name)
    }

    /// `map`, named `name`: its regions follow from its size and the possible CPUs.
    pub(crate) fn of(map: Array<MapData, V>, name: &str) -> Result<Counters<V>> {
        let cpus = possible_cpus()?;
        let len = map.len();
        if len == 0 || !len.is_multiple_of(cpus) {
            return Err(Error::io(
                format!("reading {name}"),
                std::io::Error::other(format!(
                    "{len} slots are not a region for each of the {cpus} possible CPUs"
                )),
            ));
        }
        Ok(Counters {
            map,
            name: name.to_string(),
            ids: len / cpus,
            cpus,
        })
    }

    /// The slots of id `id`, one per CPU.
    fn slots(&self, id: u32) -> Result<Vec<u32>> {
        if id >= self.ids {
            return Err(Error::io(
                format!("the counters of id {id} in {}", self.name),
                std::io::Error::other(format!("its regions hold {} ids", self.ids)),
            ));
        }
        Ok((0..self.cpus)
            .map(|c| lb_common::counter_slot(c, self.ids, id))
            .collect())
    }

    /// Zeroes id `id`'s counts on every CPU, with one system call.
    pub(crate) fn reset(&mut self, id: u32) -> Result<()> {
        let slots = self.slots(id)?;
        let zeros = vec![V::default(); slots.len()];
        sys::map_update_batch(self.map.map(), &slots, &zeros)
            .map_err(|(_, e)| Error::io(format!("zeroing counters in {}", self.name), e))
    }

    /// Gives `f` each slot's CPU, id and counts, read a chunk at a time.
    fn walk(&self, mut f: impl FnMut(u32, u32, &V)) -> Result<()> {
        let ids = self.ids;
        sys::array_walk_batch(self.map.map(), self.map.len(), CHUNK, |k, v: &V| {
            f(k / ids, k % ids, v)
        })
        .map_err(|e| Error::io(format!("reading {}", self.name), e))
    }

    /// Every id's counts, over every CPU: one value for each id of a region.
    pub(crate) fn totals(&self) -> Result<Vec<V>> {
        let mut out = vec![V::default(); self.ids as usize];
        self.walk(|_, id, v| out[id as usize] = out[id as usize].plus(*v))?;
        Ok(out)
    }

    /// Copies the counts of every id both hold, CPU by CPU, into `to` (a resize: its regions
    /// may hold more or fewer ids). Returns the ids copied.
    pub(crate) fn copy_into(&self, to: &mut Counters<V>) -> Result<usize> {
        let (ids, cpus) = (self.ids.min(to.ids), self.cpus.min(to.cpus));
        let mut out = Writes::new(to);
        let mut failed = Ok(());
        self.walk(|c, id, v| {
            if c < cpus && id < ids && failed.is_ok() {
                failed = out.push(lb_common::counter_slot(c, out.to.ids, id), *v);
            }
        })?;
        failed?;
        out.flush()?;
        Ok(ids as usize)
    }

    /// Adds `counts` (`counts[id][cpu]`) to this array's, CPU by CPU: an older agent's per-CPU
    /// array carried over. Ids and CPUs beyond this array's are left out. Returns the ids
    /// carried.
    pub(crate) fn add_per_cpu(&mut self, counts: &[Vec<V>]) -> Result<usize> {
        let mut sums = Vec::new();
        self.walk(|c, id, v| {
            if let Some(old) = counts.get(id as usize).and_then(|p| p.get(c as usize)) {
                sums.push((lb_common::counter_slot(c, self.ids, id), v.plus(*old)));
            }
        })?;
        let mut out = Writes::new(self);
        for (slot, v) in sums {
            out.push(slot, v)?;
        }
        out.flush()?;
        Ok(counts.len().min(self.ids as usize))
    }
}

/// Slots read or written with one system call.
const CHUNK: u32 = 65536;

/// Writes to a counter array, `CHUNK` slots a system call.
struct Writes<'a, V: Count> {
    to: &'a mut Counters<V>,
    keys: Vec<u32>,
    values: Vec<V>,
}

impl<'a, V: Count> Writes<'a, V> {
    fn new(to: &'a mut Counters<V>) -> Writes<'a, V> {
        Writes {
            to,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    fn push(&mut self, slot: u32, v: V) -> Result<()> {
        self.keys.push(slot);
        self.values.push(v);
        if self.keys.len() >= CHUNK as usize {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        sys::map_update_batch(self.to.map.map(), &self.keys, &self.values)
            .map_err(|(_, e)| Error::io(format!("writing {}", self.to.name), e))?;
        self.keys.clear();
        self.values.clear();
        Ok(())
    }
}
